"""The repository alone is enough: what a stranger who clones it gets must install, run and test.

A copy of exactly the tracked files (`git ls-files`) in an empty folder, with nothing beside it, runs the whole demo
command at a tiny size (its `export --verify` on the clouds the package ships, its scene query on procedural rooms),
from another working directory and with the copy's own package (nothing new installed). No tracked file names the
development shelf that sits beside the repository. A wheel built from the copy holds every asset and config the
commands read, and the console scripts.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import tomllib

from cg3d_jax.configs import tiny_test
from tests.conftest import REPO_ROOT, TINY_CLIP

# Built from pieces so that this file does not match its own check.
SHELF_MARKERS = ('..' + '/shared', 'shared' + '/fixtures')


def tracked_files() -> list[str]:
  done = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO_ROOT, capture_output=True, text=True)
  if done.returncode:
    pytest.fail(f'git ls-files failed in {REPO_ROOT}: {done.stderr.strip()} (these tests need the git checkout)')
  return [name for name in done.stdout.split('\0') if name]


@pytest.fixture(scope='module')
def lone_copy(tmp_path_factory) -> pathlib.Path:
  """The tracked files copied into <empty folder>/cg3d-jax: no sibling folders, no untracked or ignored files."""
  root = tmp_path_factory.mktemp('lone') / 'cg3d-jax'
  for name in tracked_files():
    target = root / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO_ROOT / name, target)
  assert sorted(p.name for p in root.parent.iterdir()) == ['cg3d-jax']
  return root


def _run(copy: pathlib.Path, cwd: pathlib.Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """python -m <args> from `cwd`, importing the copy's package (PYTHONPATH comes before the installed one)."""
  env = {**os.environ, 'PYTHONPATH': str(copy)}
  done = subprocess.run([sys.executable, '-m', *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert done.returncode == 0, f'{args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}'
  return done


def test_no_tracked_file_reads_the_development_shelf():
  offenders = []
  for name in tracked_files():
    data = (REPO_ROOT / name).read_bytes()
    if any(marker.encode() in data for marker in SHELF_MARKERS):
      offenders.append(name)
  assert not offenders, f'tracked files that refer to the development shelf: {offenders}'


def test_a_lone_copy_runs_the_demo_from_another_folder(lone_copy, tmp_path):
  """The whole demo command at a tiny size (assets, training, zero-shot evaluation, export --verify, procedural rooms
  and a scene query): the commands a stranger runs first."""
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  found = subprocess.run([sys.executable, '-c', 'import cg3d_jax; print(cg3d_jax.__file__)'], cwd=elsewhere,
                         env={**os.environ, 'PYTHONPATH': str(lone_copy)}, capture_output=True, text=True)
  assert pathlib.Path(found.stdout.strip()).is_relative_to(lone_copy), found.stdout + found.stderr

  work = tmp_path / 'demo'
  # The model, CLIP and batch sizes of the tests' tiny config (itself the demo config shrunk), so that the session's
  # compilation cache already holds these programs.
  tiny = {'demo.synthetic.num_train_per_class': 2, 'demo.synthetic.num_test_per_class': 1,
          'demo.synthetic.num_points': 256, 'demo.synthetic.image_size': 32, 'train.total_steps': 2,
          'eval.every_steps': 2, 'checkpoint.every_steps': 2}
  tiny_config = tiny_test.get_config()
  for group, keys in (('model', ('embed_dim', 'num_points')), ('data', ('num_stored_points',)),
                      ('train', ('batch_size',)), ('eval', ('batch_size',)), ('logging', ('tensorboard',))):
    tiny.update({f'{group}.{k}': tiny_config[group][k] for k in keys})
  tiny.update({f'model.point_transformer.{k}': v for k, v in tiny_config.model.point_transformer.items()})
  tiny.update({f'demo.clip.{k}': v for k, v in TINY_CLIP.items()})
  demo = _run(lone_copy, elsewhere, 'cg3d_jax.demo', '--workdir', str(work),
              *(f'--override={k}={v}' for k, v in tiny.items()), timeout=900)
  assert (work / 'demo_assets' / 'clip' / 'vocab.json').is_file()
  assert (work / 'zeroshot' / 'results.json').is_file() and 'verify: OK' in demo.stdout
  assert 'airplane_0002' in demo.stdout  # the package's own --verify clouds
  summary = json.loads((work / 'scene_query' / 'summary.json').read_text())
  assert [r['query'] for r in summary['results']] == ['torus', 'cross', 'mug', 'cone']


def test_the_wheel_holds_assets_configs_and_console_scripts(lone_copy, tmp_path):
  done = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                         '-w', str(tmp_path), str(lone_copy)], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  (wheel,) = tmp_path.glob('cg3d_jax-*.whl')
  names = set(zipfile.ZipFile(wheel).namelist())
  for asset in ('bpe_simple_vocab_16e6.txt.gz', 'cg3d_templates.json', 'ulip_templates.json',
                'modelnet40_verify_clouds.npz', 'shapenet55_synsets.json', 'SOURCES.md'):
    assert f'cg3d_jax/assets/{asset}' in names, asset
  shipped = {p.name for p in (REPO_ROOT / 'cg3d_jax' / 'configs').glob('*.py')}
  assert shipped >= {'demo.py', 'pretrain_pointbert.py', 'zeroshot_modelnet40.py', 'finetune_modelnet40.py'}
  assert {f'cg3d_jax/configs/{name}' for name in shipped} <= names
  (entry_points,) = [n for n in names if n.endswith('.dist-info/entry_points.txt')]
  scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
  for script in ('cg3d-train', 'cg3d-evaluate', 'cg3d-predict', 'cg3d-export', 'cg3d-finetune', 'cg3d-query-scene',
                 'cg3d-evaluate-scenes', 'cg3d-demo', 'cg3d-demo-assets', 'cg3d-build-data', 'cg3d-synthetic-scenes'):
    assert f'{script} =' in scripts, script


def test_requirements_install_the_package_with_its_extras_and_pin_torch_within_them():
  """requirements.txt is the README's one-line install; it must not drift from pyproject.toml."""
  project = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']
  lines = [line.split('#')[0].strip() for line in (REPO_ROOT / 'requirements.txt').read_text().splitlines()]
  lines = [line for line in lines if line]
  assert lines[0] == '-e .[torch,test]'  # every dependency from pyproject.toml, with the torch and test extras
  assert lines[1:] == ['torch==2.13.0']  # and nothing else: no second list of dependencies to keep in step
  (torch_spec,) = project['optional-dependencies']['torch']
  lower = re.fullmatch(r'torch>=([\d.]+)', torch_spec).group(1)
  assert tuple(map(int, '2.13.0'.split('.'))) >= tuple(map(int, lower.split('.')))
  assert {'torch', 'test', 'cuda12', 'tpu'} <= set(project['optional-dependencies'])
