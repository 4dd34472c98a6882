"""Foundation: the pretraining configs against the paper's recipes, config loading with overrides, the metrics writer,
entry-point --help, layer-stack layouts."""

import json
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app, flags
from ml_collections import config_flags
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cg3d_jax import cli, trees
from cg3d_jax.metric_writer import MetricsWriter, read_jsonl
from tests.conftest import REPO_ROOT


def _parse_config(argv):
  # sys_argv: config_flags reads overrides from sys.argv unless given the argv being parsed.
  argv = ['prog', *argv]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


# The paper's recipes (CG3D, ICCVW 2023, and its released runner; DESIGN.md's "Recipe"), as the files must give them
# through the command line: encoder, points, batch, epochs, encoder AdamW lr / wd, prompt SGD lr, prompt tokens.
RECIPES = {
  'pretrain_pointbert': ('point_transformer', 1024, 64, 100, 5e-5, 0.05, 2e-3, 5),
  'pretrain_pointbert:8192': ('point_transformer', 8192, 64, 100, 5e-5, 0.05, 2e-3, 5),
  'pretrain_pointmlp': ('pointmlp', 1024, 32, 100, 1e-4, 0.1, 1e-2, 5),
}


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_pretraining_configs_are_the_papers_recipes(name):
  file, _, arg = name.partition(':')
  config = _parse_config([f'--config={REPO_ROOT}/configs/{file}.py' + (f':{arg}' if arg else '')])
  t = config.train
  assert (
    config.model.encoder,
    config.model.num_points,
    t.batch_size,
    t.epochs,
    t.encoder_optim.lr,
    t.encoder_optim.weight_decay,
    t.prompt_optim.lr,
    config.clip.prompt.num_tokens,
  ) == RECIPES[name]
  assert config.model.point_transformer.depth == 12 and config.model.point_transformer.width == 384


def test_config_override_reaches_configdict():
  config = _parse_config(
    [
      f'--config={REPO_ROOT}/configs/base.py',
      '--config.train.batch_size=32',
      '--config.clip.path=/models/clip',
      '--config.mesh.fsdp=2',
    ]
  )
  assert config.train.batch_size == 32
  assert config.clip.path == '/models/clip'
  assert config.mesh.fsdp == 2


def test_unknown_config_key_is_rejected():
  with pytest.raises(Exception, match='batch_szie'):
    _parse_config([f'--config={REPO_ROOT}/configs/base.py', '--config.train.batch_szie=32'])


def test_metrics_writer_round_trip(tmp_path):
  with MetricsWriter(str(tmp_path), 'train', enabled=True) as w:
    w.write_scalars(1, {'loss': 2.5, 'lr': 1e-4})
    w.write_scalars(2, {'loss': 2.0, 'lr': 9e-5})
    w.write_scalars(3, {'loss': float('nan')})
  rows = read_jsonl(str(tmp_path / 'train.jsonl'))
  assert rows[:2] == [{'step': 1, 'loss': 2.5, 'lr': 1e-4}, {'step': 2, 'loss': 2.0, 'lr': 9e-5}]
  assert rows[2] == {'step': 3, 'loss': 'nan'}
  json.dumps(rows)  # still plain JSON
  acc = EventAccumulator(str(tmp_path / 'tb' / 'train'))
  acc.Reload()
  loss = acc.Scalars('loss')
  assert [e.step for e in loss][:2] == [1, 2]
  assert [e.value for e in loss][:2] == pytest.approx([2.5, 2.0])
  assert acc.Scalars('lr')[1].value == pytest.approx(9e-5)


def test_metrics_writer_rejects_non_scalars(tmp_path):
  with MetricsWriter(str(tmp_path), 'train', enabled=True) as w:
    with pytest.raises(TypeError, match="'loss'"):
      w.write_scalars(1, {'loss': 'high'})


# Each command runs cold (`python -m`) once in the suite; the rest of the suite calls the entry functions in-process.
# The demo (tests/test_standalone.py, from the lone copy) runs demo_assets, train, evaluate, export, synthetic_scenes
# and query_scene, and the lone copy runs predict; the other three run here, as --help.
@pytest.mark.parametrize(
  'command, listed',
  [
    ('finetune', ('--config', '--workdir', '--init')),
    ('build_data', ('--dataset', '--manual_dir', '--data_dir', 'skip_bad')),
    ('evaluate_scenes', ('--checkpoint', '--s3dis', '--out', '--areas', '--classes')),
  ],
)
def test_entry_point_help_lists_flags(command, listed):
  out = subprocess.run(
    [sys.executable, '-m', f'cg3d_jax.{command}', '--help'], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
  )
  # absl exits with status 1 after printing --help; what matters is that the usage text, not a traceback, came out.
  assert 'Traceback' not in out.stderr, out.stderr
  assert all(flag in out.stdout for flag in listed), out.stdout[-3000:]


def test_config_names_resolve_to_the_shipped_files(tmp_path):
  shipped = REPO_ROOT / 'configs'
  assert cli.resolve_config('demo') == f'{shipped / "demo.py"}'
  assert cli.resolve_config('pretrain_pointbert:8192') == f'{shipped / "pretrain_pointbert.py"}:8192'
  own = tmp_path / 'mine.py'
  own.write_text('from cg3d_jax.configs import demo\nget_config = demo.get_config\n')
  assert cli.resolve_config(f'{own}:x') == f'{own}:x'  # a file path is kept, arg and all
  with pytest.raises(app.UsageError, match=r"'pretrain_pointbret' is not a shipped config; shipped: .*pointbert"):
    cli.resolve_config('pretrain_pointbret')
  with pytest.raises(app.UsageError, match='no such file'):
    cli.resolve_config(str(tmp_path / 'missing.py'))


def test_console_script_takes_a_config_name_from_any_folder(tmp_path):
  """The installed `cg3d-train` script, run outside the repository, parses `--config demo` with an override."""
  script = shutil.which('cg3d-train')
  assert script, 'the cg3d-train console script is not installed (pip install -r requirements.txt)'
  out = subprocess.run(
    [script, '--config', 'demo', '--config.train.total_steps=bad', '--workdir', str(tmp_path)],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    timeout=300,
  )
  # The name resolved to the shipped file and the override reached it: the value, not the file, is what is refused.
  assert out.returncode != 0 and 'total_steps' in out.stderr and 'no such file' not in out.stderr, out.stderr[-2000:]


# Each installed console script's own flags (a sample), as `python -m cg3d_jax.<command> --help` lists them.
SCRIPT_FLAGS = {
  'cg3d-train': ('--config', '--workdir', '--coordinator'),
  'cg3d-finetune': ('--config', '--workdir', '--init'),
  'cg3d-evaluate': ('--config', '--checkpoint', '--step', '--workdir'),
  'cg3d-predict': ('--checkpoint', '--points', '--labels', '--json'),
  'cg3d-export': ('--checkpoint', '--out', '--[no]verify'),
  'cg3d-query-scene': ('--checkpoint', '--scene', '--queries'),
  'cg3d-evaluate-scenes': ('--checkpoint', '--s3dis', '--areas'),
  'cg3d-demo': ('--workdir', '--override', '--steps'),
  'cg3d-embed': ('--checkpoint', '--shapes', '--library', '--points_per_shape'),
  'cg3d-search': ('--library', '--checkpoint', '--text', '--k'),
  'cg3d-serve': ('--checkpoint', '--library', '--host', '--port'),
  'cg3d-demo-assets': ('--config', '--root'),
  'cg3d-build-data': ('--dataset', '--manual_dir', '--data_dir'),
  'cg3d-synthetic-scenes': ('--root', '--num_rooms'),
}


def test_every_console_script_help_lists_its_own_flags(tmp_path):
  """Every installed `cg3d-*` script, run outside the repository as after `pip install`: `--help` lists the
  command's flags. absl lists the key flags of the main module, which for a console script is its generated stub:
  before cli registered the command's key flags for it, every script printed only its usage line (shown by running
  this test without cli._list_command_flags_in_help); evaluate and demo_assets also adopted cli's flags before
  defining theirs, so --checkpoint and --root were missing from their help under `python -m` too."""
  import tomllib

  scripts = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']['scripts']
  assert set(scripts) == set(SCRIPT_FLAGS)
  running = {}
  for name in scripts:
    path = shutil.which(name)
    assert path, f'the {name} console script is not installed (pip install -r requirements.txt)'
    running[name] = subprocess.Popen(
      [path, '--help'], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
  for name, proc in running.items():
    out, err = proc.communicate(timeout=300)
    assert 'Traceback' not in err, (name, err[-2000:])
    listed = set(re.findall(r'^  (--[\w\[\]]+)', out, re.MULTILINE))
    missing = [flag for flag in SCRIPT_FLAGS[name] if flag not in listed]
    assert not missing, (name, missing, out[-1500:])


def test_layer_stacks_round_trip_and_refuse_gaps():
  rng = np.random.default_rng(0)
  unrolled = {
    'vision': {
      f'layers_{i}': {'mlp': {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=4)}} for i in range(3)
    },
    'pre_blocks_0': {'w': rng.normal(size=2)},
  }  # PointMLP's stages are not a layer stack
  stacked = trees.stack_layers(unrolled)
  assert set(stacked['vision']) == {'layers'} and 'pre_blocks_0' in stacked
  np.testing.assert_array_equal(
    stacked['vision']['layers']['mlp']['kernel'][2], unrolled['vision']['layers_2']['mlp']['kernel']
  )
  back = trees.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(unrolled)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(unrolled)):
    np.testing.assert_array_equal(a, b)
  assert trees.stack_layers(stacked)['vision']['layers']['mlp']['kernel'].shape == (3, 3, 4)  # already stacked
  assert trees.in_stack('vision/layers/mlp/kernel') and not trees.in_stack('vision/layers_wide/kernel')
  with pytest.raises(ValueError, match='not contiguous from 0: \\[0, 2\\]'):
    trees.stack_layers({'blocks_0': {'w': 1.0}, 'blocks_2': {'w': 2.0}})
