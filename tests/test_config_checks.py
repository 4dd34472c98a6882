"""The validation pass over a config (cg3d_jax/training/config_checks.py): every leaf of every shipped config set to
bad values of its kind either stops with one ConfigError naming that field or is accepted for a stated reason; and
the two mistakes that used to end in a traceback now end in one line."""

import copy
import importlib
import math
import pkgutil

import ml_collections
import pytest

import cg3d_jax.configs
from cg3d_jax import train
from cg3d_jax.errors import ConfigError
from cg3d_jax.training import config_checks, pretrain
from tests.conftest import run_command, tiny_config

CONFIG_ARGS = {'zeroshot_scanobjectnn': 'obj_bg', 'finetune_scanobjectnn': 'obj_bg'}
# Checked elsewhere, against what they name, before any model is built: the dataset by its builder or layout
# (data.builders.checked_builder, data/sources/openshape_layout.py), folders and files by whether they exist.
NOT_FUZZED = ('data.name', 'data.manual_dir', 'data.data_dir', 'data.train_split', 'eval.dataset', 'demo.')
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


def accepted_because(config, path: str, value) -> str | None:
  """Why (path, value) is a valid setting, or None when validation must refuse it."""
  encoder = config.model.encoder
  for other in ('point_transformer', 'pointmlp'):
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
  if path in ('eval.split', 'data.openshape.gpt4_filtering') and value == 'no_such_word':
    return 'a name checked against the files when they are read (one line naming the setting)'
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
      if path.startswith(NOT_FUZZED):
        continue
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


def test_a_split_smaller_than_one_global_batch_is_one_line_naming_the_batch_size(
  tmp_path, tiny_clip_dir, tiny_shapenet
):
  """Relations that need the data are checked as soon as its size is known, still before training."""
  config = tiny_config(tiny_clip_dir, tiny_shapenet, **{'train.batch_size': 8 * 64, 'eval.batch_size': 8})
  with pytest.raises(ConfigError, match=r'fewer than one global batch of 512 \(config.train.batch_size\)'):
    pretrain.train(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def _command_cases(config_name: str, limit: int) -> list[tuple[str, str]]:
  """(field, command-line value) pairs the validation refuses, of the field's own type (a value of the wrong type
  never reaches validation from the command line: ml_collections refuses it while parsing)."""
  shipped = importlib.import_module(f'cg3d_jax.configs.{config_name}').get_config(None)
  cases = []
  for path, good in _leaves(shipped):
    if path.startswith(NOT_FUZZED) or isinstance(good, bool) or good is None:
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


@pytest.mark.parametrize('field,value', _command_cases('demo', 24))
def test_refused_settings_stop_the_train_command_as_validation_says(tmp_path, capsys, field, value):
  """A sample of the fuzz cases through the real command, as a user types them: validation and execution agree."""
  argv = ['--config', 'demo', '--workdir', str(tmp_path / 'run'), f'--config.{field}={value}']
  argv += ['--config.data.manual_dir', str(tmp_path / 'raw'), '--config.data.data_dir', str(tmp_path / 'tfds')]
  code = run_command(train.main, argv)
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert code == 2 and err and err[-1].startswith('error: ') and f'config.{field}' in err[-1], err
  assert not any(tmp_path.iterdir())
