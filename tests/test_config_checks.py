"""The validation pass over a config (cg3d_jax/training/config_checks.py): every leaf of every shipped config set to
bad values of its kind either stops with one ConfigError naming that field or is accepted for a stated reason; and
the two mistakes that used to end in a traceback now end in one line."""

import copy
import importlib
import math
import pkgutil
import re
import subprocess
import sys

import ml_collections
import pytest

import cg3d_jax.configs
from cg3d_jax import train
from cg3d_jax.errors import ConfigError
from cg3d_jax.models.cg3d import ENCODERS
from cg3d_jax.training import config_checks
from tests.conftest import REPO_ROOT, run_command

TINY_CONFIG = REPO_ROOT / 'tests' / 'configs' / 'tiny_test.py'
LOG_LINE = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d')  # absl's log lines, which also go to stderr

CONFIG_ARGS = {'zeroshot_scanobjectnn': 'obj_bg', 'finetune_scanobjectnn': 'obj_bg'}
HUGE = (10**9, 1e12)


def _leaves(config, prefix=''):
  for key, value in config.items():
    path = f'{prefix}.{key}' if prefix else key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, path)
    else:
      yield path, value


def _bad_values(value):
  if isinstance(value, bool):
    return [0, 'yes', None]
  if isinstance(value, int):
    return [0, -1, 10**9, 'x', 2.5]
  if isinstance(value, float):
    return [0.0, -1.0, 1e12, math.nan, 'x']
  if isinstance(value, str):
    return ['', 'no_such_word', 0]
  if isinstance(value, tuple):
    return [(), (0,), ('x',), 5]
  return ['', -1]  # unset (None) fields: paths and optional numbers


def _set(config, path, value):
  *parents, leaf = path.split('.')
  node = config
  for key in parents:
    node = node[key]
  with node.ignore_type():  # what a Python config file (not the typed command line) can do
    node[leaf] = value


# Zeros that mean something (the accepted oddities): field suffix -> why 0 is a valid setting.
ZERO_MEANS = {
  'seed': 'a seed',
  'eval.every_steps': 'never validate during training',
  'eval.view_index': 'the first of the stored views',
  'train.total_steps': 'steps from config.train.epochs',
  'data.prefetch': 'no prefetching',
  'data.augment_prob': 'never augment',
  'data.openshape.workers': 'min(16, CPUs) reader threads',
  'data.openshape.rgb_random_drop_prob': 'never drop the colours',
  'mesh.min_fsdp_size': 'shard every parameter over fsdp',
  'finetune.label_smoothing': 'no smoothing',
  'finetune.eval_every_epochs': 'no evaluation until the end',
  'finetune.fps_points': "the original's table (1024 -> 1200 points, ...)",
  'drop_path_rate': 'no stochastic depth',
  'head_dropout': 'no dropout in the classification head',
  'b1': 'no first-moment averaging',
  'b2': 'no second-moment averaging',
  'clip_norm': 'no gradient clipping',
  'end_lr': 'a schedule that ends at 0',
  'warmup_lr': 'warm up from 0',
  'warmup_epochs': 'no warmup',
  'weight_decay': 'no weight decay',
  'momentum': 'plain SGD',
  'lambda_text': 'that loss term off',
  'lambda_image': 'that loss term off',
}


# Names whose every valid word only the data knows: the registered builders and layouts (data.builders, data/sources),
# a layout's split files, a filtering file. test_names_only_the_data_knows_... runs each through a command.
NAMES_CHECKED_WHERE_READ = (
  'data.name',
  'data.train_split',
  'eval.dataset',
  'eval.split',
  'data.openshape.gpt4_filtering',
)


def accepted_because(config, path: str, value) -> str | None:
  """Why (path, value) is a valid setting, or None when validation must refuse it."""
  encoder = config.model.encoder
  for other in ENCODERS:
    if other != encoder and (path.startswith(f'model.{other}.') or path.startswith(f'finetune.optim.{other}.')):
      return 'the block of the encoder that config.model.encoder does not name is not read'
  if isinstance(value, (int, float)) and not isinstance(value, bool) and value in HUGE:
    return 'sizes, counts, rates and intervals have no upper bound in a config: a huge one meets its memory or time'
  if value in (0, 0.0) and not isinstance(value, bool):
    for suffix, meaning in ZERO_MEANS.items():
      if path == suffix or path.endswith('.' + suffix):
        return f'0 means {meaning}'
  if value == 2.5 and path.endswith('epochs'):
    return 'fractional epochs are steps too (epochs x batches per epoch)'
  if path == 'train.epochs' and config.train.total_steps:
    return 'config.train.total_steps is set, so epochs are not read'
  if path == 'mesh.data' and value == -1:
    return '-1 takes the devices left over'
  if path == 'logging.profile_steps' and value in ((), (0,)):
    return 'no profile, or a profile of step 0'
  if path in NAMES_CHECKED_WHERE_READ and value == 'no_such_word':
    return 'a name checked against what it names where that is read (one line naming it)'
  return None


def test_every_bad_leaf_of_every_shipped_config_is_refused_by_name_or_accepted_for_a_reason():
  counts = {'cases': 0, 'refused': 0, 'accepted': 0}
  reasons: dict[str, int] = {}
  wrong = []
  for module in pkgutil.iter_modules(cg3d_jax.configs.__path__):
    if module.name == 'base':
      continue
    shipped = importlib.import_module(f'cg3d_jax.configs.{module.name}').get_config(CONFIG_ARGS.get(module.name))
    config_checks.check(shipped, device_count=8)  # every shipped config is valid as shipped
    for path, good in _leaves(shipped):
      for bad in _bad_values(good):
        config = copy.deepcopy(shipped)
        _set(config, path, bad)
        counts['cases'] += 1
        reason = accepted_because(config, path, bad)
        try:
          config_checks.check(config, device_count=8)
        except ConfigError as err:
          counts['refused'] += 1
          if f'config.{path}' not in str(err):
            wrong.append(f'{module.name}: {path}={bad!r} refused as {err}')
          continue
        counts['accepted'] += 1
        reasons[reason] = reasons.get(reason, 0) + 1
        if reason is None:
          wrong.append(f'{module.name}: {path}={bad!r} accepted')
  print(counts, reasons)
  assert not wrong, f'{len(wrong)} of {counts["cases"]} cases:\n' + '\n'.join(wrong[:40])
  assert counts['cases'] > 4000 and counts['refused'] > 3000


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('model.point_transformer.width', 128, 'config.model.point_transformer.width=128 is not divisible by'),
    ('model.point_transformer.num_heads', 0, 'config.model.point_transformer.num_heads=0 must be a positive integer'),
    ('model.point_transformer.group_size', 0, 'config.model.point_transformer.group_size=0 must be a positive'),
    ('model.point_transformer.num_groups', 2048, 'config.model.point_transformer.num_groups=2048 is more than'),
    ('model.point_transformer.depth', 0, 'config.model.point_transformer.depth=0 must be a positive integer'),
    ('mesh.fsdp', 3, 'config.mesh.data=-1 x config.mesh.fsdp=3 does not fill the 8 devices'),
  ],
)
def test_the_train_command_stops_a_bad_setting_with_one_line_before_any_work(tmp_path, capsys, field, value, message):
  """The mistakes the issue found ending in tracebacks from inside jit, or in a 29 GB allocation: one line naming
  the field, exit 2, nothing written (the data folders named do not exist, so any work would also fail)."""
  out = tmp_path / 'run'
  argv = ['--config', 'demo', '--workdir', str(out), f'--config.{field}={value}']
  argv += ['--config.data.manual_dir', str(tmp_path / 'raw'), '--config.data.data_dir', str(tmp_path / 'tfds')]
  code = run_command(train.main, argv)
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert code == 2 and err and err[-1].startswith('error: ') and message in err[-1], err
  assert not any(tmp_path.iterdir())


def _one_error_line(capsys) -> str:
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith('error: '), err
  return err[0]


def _tiny_argv(tiny_clip_dir, tiny_shapenet, *overrides) -> list[str]:
  """The train command's config: tests/configs/tiny_test.py on the fixtures' CLIP and prepared dataset."""
  manual, data = tiny_shapenet
  argv = ['--config', str(TINY_CONFIG), f'--config.clip.path={tiny_clip_dir}']
  return argv + [f'--config.data.manual_dir={manual}', f'--config.data.data_dir={data}', *overrides]


def test_a_split_smaller_than_one_global_batch_is_one_line_naming_the_batch_size(
  tmp_path, capsys, tiny_clip_dir, tiny_shapenet
):
  """The issue's second case at the tests' size (78 training objects, a global batch of 80): relations that need
  the data are checked as soon as its size is known, still before any model is built or anything written."""
  argv = _tiny_argv(tiny_clip_dir, tiny_shapenet, '--config.train.batch_size=80', '--workdir', str(tmp_path / 'run'))
  assert run_command(train.main, argv) == 2
  line = _one_error_line(capsys)
  assert 'has 78 examples, fewer than one global batch of 80 (config.train.batch_size)' in line, line
  assert not any(tmp_path.iterdir())


def test_the_demo_at_two_objects_per_class_stops_before_writing_anything(tmp_path):
  """The issue's case exactly as a user runs it: the demo command at 2 objects per class with the demo's batch of 32.
  Its first step (demo_assets) knows the split it would write (13 families x 2 = 26 objects) and stops with one line;
  the demo stops with that step's status, adding no second line."""
  done = subprocess.run(
    [sys.executable, '-m', 'cg3d_jax.demo', '--workdir', str(tmp_path / 'demo')]
    + ['--override', 'demo.synthetic.num_train_per_class=2'],
    capture_output=True,
    text=True,
    timeout=300,
  )
  err = [line for line in done.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
  assert done.returncode == 2 and len(err) == 1, (done.returncode, done.stderr[-3000:])
  assert err[0].startswith('error: config.demo.synthetic.num_train_per_class=2 writes 26 training objects'), err
  assert 'fewer than one global batch of config.train.batch_size=32' in err[0], err
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
  'argv,message',
  [
    (['--config.train.batch_size=abc'], 'error: flag --config.train.batch_size=abc: invalid literal for int()'),
    (
      ['--config.train.batchsize=8'],
      "--config.train.batchsize=8: config.train has no field 'batchsize' (did you mean batch_size?)",
    ),
    (
      ['--config.trian.mode=joint'],
      "--config.trian.mode=joint: config has no field 'trian' (did you mean train?)",
    ),
    (['--config.train.mode.x=1'], "config.train.mode has no field 'x'; it is a setting ('joint'), not a section"),
    (['--config.train.mode'], 'error: Missing value for flag --config.train.mode'),
    (['--config', 'no_such_config'], "error: --config 'no_such_config': no such file, and 'no_such_config' is not"),
  ],
)
def test_a_setting_the_command_line_cannot_parse_is_one_line_before_any_work(tmp_path, capsys, argv, message):
  """What absl and ml_collections refuse while parsing (a value of the wrong type, a field the config lacks, a
  missing value) was a FATAL line and a help hint with status 1, or a traceback: now one line and status 2."""
  code = run_command(train.main, ['--config', 'demo', '--workdir', str(tmp_path / 'run'), *argv])
  line = _one_error_line(capsys)
  assert code == 2 and message in line, line
  assert not any(tmp_path.iterdir())


def test_a_setting_the_validation_misses_that_a_library_refuses_is_one_line_naming_it(
  tmp_path, capsys, monkeypatch, tiny_clip_dir, tiny_shapenet
):
  """The safety net under the validation (cli.guard): with the validation switched off, the issue's first case
  reaches the PointTransformer, which refuses it from inside the jitted initialisation; the user still gets one line
  naming both settings, exit 2, and nothing written."""
  monkeypatch.setattr(config_checks, 'check', lambda *args, **kwargs: None)
  argv = _tiny_argv(
    tiny_clip_dir, tiny_shapenet, '--config.model.point_transformer.width=32', '--workdir', str(tmp_path / 'run')
  )
  argv.append('--config.model.point_transformer.num_heads=3')
  assert run_command(train.main, argv) == 2
  line = _one_error_line(capsys)
  assert line == (
    'error: config.model.point_transformer.num_heads=3, config.model.point_transformer.width=32: '
    'PointTransformer: width 32 is not divisible by num_heads 3'
  ), line
  assert not any(tmp_path.iterdir())


def test_an_error_that_names_no_setting_keeps_its_traceback(tmp_path):
  """A ValueError that names no setting is a bug, not an input error: the guard lets it through."""

  def main(argv):
    raise ValueError('shapes (3, 4) and (5,) do not broadcast')

  with pytest.raises(ValueError, match='do not broadcast'):
    run_command(main, ['--config', 'demo', '--workdir', str(tmp_path / 'run')])


def test_names_only_the_data_knows_are_checked_where_read_with_one_line_naming_them(
  tmp_path, capsys, tiny_clip_dir, tiny_shapenet, tiny_checkpoint
):
  """The fuzz's NAMES_CHECKED_WHERE_READ, a word that names nothing, through the commands that read them."""
  from cg3d_jax import evaluate
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout

  layout = write_openshape_layout(
    tmp_path / 'openshape',
    classes=('sphere', 'box'),
    train_per_class=2,
    lvis_per_class=1,
    num_points=64,
    feature_dim=16,
  )
  manual, data = tiny_shapenet
  missing = [f'--config.data.manual_dir={tmp_path / "raw"}', f'--config.data.data_dir={tmp_path / "tfds"}']
  runs = {
    'data.name': (train.main, ['--config', 'demo', *missing]),
    'data.train_split': (train.main, _tiny_argv(tiny_clip_dir, tiny_shapenet)),
    'data.openshape.gpt4_filtering': (
      train.main,
      ['--config', 'pretrain_openshape', f'--config.data.manual_dir={layout}'],
    ),
    'eval.dataset': (evaluate.main, ['--config', 'zeroshot_modelnet40', '--checkpoint', str(tiny_checkpoint)]),
    'eval.split': (
      evaluate.main,
      ['--config', 'zeroshot_demo', '--checkpoint', str(tiny_checkpoint), f'--config.eval.data_dir={data}'],
    ),
  }
  lines = {}
  for field, (main, argv) in runs.items():
    workdir = tmp_path / 'runs' / field
    code = run_command(main, [*argv, '--workdir', str(workdir), f'--config.{field}=no_such_word'])
    lines[field] = _one_error_line(capsys)
    assert code == 2 and f'config.{field}' in lines[field], (field, lines[field])
    assert not workdir.exists(), field
  print(lines)


def _command_cases(config_name: str, limit: int) -> list[tuple[str, str]]:
  """(field, command-line value) pairs the validation refuses, of the field's own type (a value of the wrong type
  never reaches validation from the command line: the parser refuses it, test_a_setting_the_command_line_...)."""
  shipped = importlib.import_module(f'cg3d_jax.configs.{config_name}').get_config(None)
  cases = []
  for path, good in _leaves(shipped):
    if isinstance(good, bool) or good is None:
      continue
    if isinstance(good, int):
      bad = [0, -1]
    elif isinstance(good, float):
      bad = [-1.0]
    elif isinstance(good, str):
      bad = ['no_such_word']
    else:
      continue
    for value in bad:
      config = copy.deepcopy(shipped)
      _set(config, path, value)
      try:
        config_checks.check(config, device_count=8)
      except ConfigError:
        cases.append((path, str(value)))
        break
  step = max(1, len(cases) // limit)
  return cases[::step][:limit]


COMMANDS = {'train': 'demo', 'evaluate': 'zeroshot_modelnet40', 'finetune': 'finetune_modelnet40'}
SAMPLES = {'train': 24, 'evaluate': 8, 'finetune': 8}


@pytest.mark.parametrize(
  'command,field,value',
  [(command, *case) for command, name in COMMANDS.items() for case in _command_cases(name, SAMPLES[command])],
)
def test_refused_settings_stop_the_commands_as_validation_says(tmp_path, capsys, command, field, value):
  """A sample of the fuzz cases through the real commands, as a user types them: validation and execution agree
  (one line naming the field, exit 2, nothing written; the data folders and checkpoint named do not exist, so any
  work done before the check would fail differently)."""
  from cg3d_jax import evaluate, finetune

  main = {'train': train.main, 'evaluate': evaluate.main, 'finetune': finetune.main}[command]
  argv = ['--config', COMMANDS[command], '--workdir', str(tmp_path / 'run'), f'--config.{field}={value}']
  if command == 'evaluate':
    argv += ['--checkpoint', str(tmp_path / 'no_run')]
  else:
    argv += [f'--config.data.manual_dir={tmp_path / "raw"}', f'--config.data.data_dir={tmp_path / "tfds"}']
  code = run_command(main, argv)
  line = _one_error_line(capsys)
  assert code == 2 and f'config.{field}' in line, line
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
  'encoder,field,value,message',
  [
    ('ppat', 'num_patches', 2048, 'config.model.ppat.num_patches=2048 is more than the 1024 points'),
    ('ppat', 'num_samples', 0, 'config.model.ppat.num_samples=0 must be a positive integer'),
    ('ppat', 'radius', 0.0, 'config.model.ppat.radius=0.0'),
    ('ppat', 'sa_channels', (64, 0), 'config.model.ppat.sa_channels'),
    ('uni3d', 'num_heads', 5, 'config.model.uni3d.width=192 is not divisible by config.model.uni3d.num_heads=5'),
    ('uni3d', 'mlp', 'relu', "config.model.uni3d.mlp='relu'"),
    ('uni3d', 'group_size', 4096, 'config.model.uni3d.group_size=4096 is more than the 1024 points'),
    ('uni3d', 'encoder_dim', -1, 'config.model.uni3d.encoder_dim=-1 must be a positive integer'),
  ],
)
def test_the_released_encoders_blocks_are_checked_by_name(encoder, field, value, message):
  from cg3d_jax.configs import pretrain_openshape

  config = pretrain_openshape.get_config()
  config.model.encoder, config.model.num_points = encoder, 1024
  config_checks.check(config, device_count=8)  # the shipped sizes are valid
  with config.unlocked():
    config.model[encoder][field] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_checks.check(config, device_count=8)


def test_a_starting_files_sizes_are_checked_against_the_runs_points(tmp_path):
  """With config.model.init the file names the encoder, so its block is checked once adopted: an OpenShape file's
  PPAT with the config's 384 patches on 128 points is one line naming the setting."""
  import torch

  from cg3d_jax.configs import pretrain_openshape
  from cg3d_jax.training.recipes import recipe
  from cg3d_jax.twins import ppat as twin_ppat
  from tests.test_ppat import released_file

  torch.manual_seed(0)
  released_file(tmp_path / 'model.pt', twin_ppat.make(out_channel=32, dim=64, heads=2, depth=1, mlp_dim=128, sa_dim=32))
  config = pretrain_openshape.get_config()
  config.model.init, config.model.num_points = str(tmp_path / 'model.pt'), 128
  config_checks.check(config, device_count=8)  # the point_transformer block is not what the run trains
  with pytest.raises(ConfigError, match=re.escape('config.model.ppat.num_patches=384 is more than the 128 points')):
    recipe.adopt_starting_architecture(config)
  assert config.model.encoder == 'ppat' and config.model.ppat.width == 64
