"""The repository alone is enough: what a stranger who clones it gets must install, run and test.

conftest.demo_run copies exactly the tracked files (`git ls-files`) into an empty folder and runs the whole demo
command there at a tiny size (its `export --verify` on the clouds the package ships, its scene query on procedural
rooms), from another working directory and with the copy's own package (nothing new installed). No tracked file
names the development shelf that sits beside the repository. A wheel built from the copy holds every asset and
config the commands read, and the console scripts.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import tomllib

from tests.conftest import REPO_ROOT, tracked_files

# Built from pieces so that this file does not match its own check.
SHELF_MARKERS = ('..' + '/shared', 'shared' + '/fixtures')


def test_no_tracked_file_reads_the_development_shelf():
  offenders = []
  for name in tracked_files():
    data = (REPO_ROOT / name).read_bytes()
    if any(marker.encode() in data for marker in SHELF_MARKERS):
      offenders.append(name)
  assert not offenders, f'tracked files that refer to the development shelf: {offenders}'


def test_a_lone_copy_runs_the_demo_from_another_folder(demo_run):
  """The whole demo command (assets, training, zero-shot evaluation, export --verify, procedural rooms and a scene
  query): the commands a stranger runs first, each as its own `python -m`."""
  assert sorted(p.name for p in demo_run.copy.parent.iterdir()) == ['cg3d-jax']  # nothing beside the copy
  assert pathlib.Path(demo_run.package.strip()).is_relative_to(demo_run.copy), demo_run.package
  work = demo_run.workdir
  assert (work / 'demo_assets' / 'clip' / 'vocab.json').is_file()
  assert (work / 'zeroshot' / 'results.json').is_file() and 'verify: OK' in demo_run.stdout
  assert 'airplane_0002' in demo_run.stdout  # the package's own --verify clouds
  summary = json.loads((work / 'scene_query' / 'summary.json').read_text())
  assert [r['query'] for r in summary['results']] == ['torus', 'cross', 'mug', 'cone']


def test_a_lone_copy_predicts_with_the_demo_model(demo_run, tmp_path):
  """`python -m cg3d_jax.predict` from the lone copy (this command's one cold process in the suite; the others call
  its entry function in-process) on the copy's own owl cloud, with the model the demo trained."""
  owl = demo_run.copy / 'tests' / 'fixtures' / 'openshape_owl'
  out = tmp_path / 'owl.json'
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'cg3d_jax.predict',
      '--checkpoint',
      str(demo_run.workdir),
      '--points',
      str(owl / 'owl.ply'),
      '--labels',
      'torus,cross,mug',
      '--images',
      str(owl / 'a.jpg'),
      '--json',
      str(out),
    ],
    cwd=tmp_path,
    env={**os.environ, 'PYTHONPATH': str(demo_run.copy)},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'owl.ply: 10000 points' in done.stdout
  result = json.loads(out.read_text())
  assert sorted(r['name'] for r in result['labels']) == ['cross', 'mug', 'torus']
  assert [r['rank'] for r in result['labels']] == [1, 2, 3] and len(result['images']) == 1


def test_the_wheel_holds_assets_configs_and_console_scripts(demo_run, tmp_path):
  """configs/ sits at the repository's top level and installs as cg3d_jax.configs (pyproject.toml's package-dir and
  its listed packages): the wheel holds exactly the package's modules and the shipped configs, not the tests' config,
  and a shipped config runs by name from the installed wheel in another folder. Shown to fail with the package-dir
  line removed (no configs in the wheel) and with a package left off the list (its modules missing)."""
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '--no-deps',
      '--no-build-isolation',
      '-q',
      '-w',
      str(tmp_path),
      str(demo_run.copy),
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  (wheel,) = tmp_path.glob('cg3d_jax-*.whl')
  names = set(zipfile.ZipFile(wheel).namelist())
  for asset in (
    'bpe_simple_vocab_16e6.txt.gz',
    'cg3d_templates.json',
    'ulip_templates.json',
    'modelnet40_verify_clouds.npz',
    'shapenet55_synsets.json',
    'SOURCES.md',
  ):
    assert f'cg3d_jax/assets/{asset}' in names, asset
  shipped = {p.name for p in (REPO_ROOT / 'configs').glob('*.py')}
  assert shipped >= {'demo.py', 'pretrain_pointbert.py', 'zeroshot_modelnet40.py', 'finetune_modelnet40.py'}
  modules = {f'cg3d_jax/configs/{name}' for name in shipped}
  modules |= {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / 'cg3d_jax').rglob('*.py')}
  assert {n for n in names if n.endswith('.py')} == modules

  # Installed alone into a folder and run from another one: a shipped config by name, with an override.
  site, elsewhere = tmp_path / 'site', tmp_path / 'elsewhere'
  elsewhere.mkdir()
  install = [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(site), str(wheel)]
  assert subprocess.run(install, capture_output=True, text=True).returncode == 0
  code = (
    'import sys; from cg3d_jax import cli; '
    "sys.argv = ['cg3d', '--config', 'pretrain_pointbert:8192', '--config.train.batch_size=8']; "
    'cli.parse_flags(sys.argv); '
    'c = cli.CONFIG.value; print(cli.CONFIG_DIR, c.model.num_points, c.train.batch_size)'
  )
  env = {**os.environ, 'PYTHONPATH': str(site)}
  done = subprocess.run([sys.executable, '-c', code], cwd=elsewhere, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == [str(site / 'cg3d_jax' / 'configs'), '8192', '8']
  (entry_points,) = [n for n in names if n.endswith('.dist-info/entry_points.txt')]
  scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
  for script in (
    'cg3d-train',
    'cg3d-evaluate',
    'cg3d-predict',
    'cg3d-export',
    'cg3d-finetune',
    'cg3d-query-scene',
    'cg3d-evaluate-scenes',
    'cg3d-demo',
    'cg3d-embed',
    'cg3d-search',
    'cg3d-serve',
    'cg3d-demo-assets',
    'cg3d-build-data',
    'cg3d-synthetic-scenes',
  ):
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
