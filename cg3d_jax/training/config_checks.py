"""The validation pass over a config: types, ranges and relations of every section a config holds, checked before
any data is prepared or any model is built, each failure one `ConfigError` naming the field as the command line
spells it (`config.model.point_transformer.num_heads=0: ...`). The training loops run it first; so does every
command that reads a config.

What needs the data (a split smaller than one global batch, the stored feature width) is checked by the data sources
as soon as the size is known, still before training.
"""

import math
import os
from typing import Any

from cg3d_jax.clip.templates import template_set_names
from cg3d_jax.data.sources.openshape_layout import LAYOUTS
from cg3d_jax.errors import ConfigError
from cg3d_jax.evaluators.evaluator import TASKS
from cg3d_jax.evaluators.protocols import PROTOCOLS
from cg3d_jax.evaluators.zeroshot import NAME_STYLES, PROMPT_SETS
from cg3d_jax.models.cg3d import ENCODERS
from cg3d_jax.models.clip import PROMPT_MODES
from cg3d_jax.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from cg3d_jax.models.uni3d import MLP_KINDS
from cg3d_jax.training import optim

DTYPES = ('float32', 'bfloat16', 'float16')
TRAIN_MODES = ('joint', 'alternating')


def _get(config, path: str):
  node = config
  for key in path.split('.'):
    node = node[key]
  return node


def _fail(path: str, value, expected: str):
  raise ConfigError(f'config.{path}={value!r}: expected {expected}')


def _int(config, path: str, low: int = 1, high: int | None = None, optional: bool = False) -> int | None:
  value = _get(config, path)
  if value is None and optional:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
    kind = {0: 'a non-negative integer', 1: 'a positive integer'}.get(low, f'an integer >= {low}')
    raise ConfigError(f'config.{path}={value!r} must be {kind}' + (f' <= {high}' if high is not None else ''))
  return value


def _float(config, path: str, low: float = 0.0, high: float | None = None, *, open_low: bool = False) -> float:
  value = _get(config, path)
  number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not number or value < low or (open_low and value == low) or (high is not None and value > high):
    bound = f'> {low}' if open_low else f'>= {low}'
    _fail(path, value, f'a finite number {bound}' + (f' and <= {high}' if high is not None else ''))
  return float(value)


def _bool(config, path: str) -> bool:
  value = _get(config, path)
  if not isinstance(value, bool):
    _fail(path, value, 'True or False')
  return value


def _choice(config, path: str, choices) -> Any:
  value = _get(config, path)
  if value not in tuple(choices):
    _fail(path, value, f'one of {choices}')
  return value


def _ints(config, path: str, low: int = 1, length: int | None = None) -> tuple[int, ...]:
  value = _get(config, path)
  ok = isinstance(value, (tuple, list)) and len(value) > 0 and (length is None or len(value) == length)
  if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value):
    count = f'{length} ' if length else ''
    _fail(path, value, f'a non-empty tuple of {count}integers >= {low}')
  return tuple(value)


def _name(config, path: str, example: str) -> str:
  """A name checked against what it names where that is read (a dataset, a split): here, its kind."""
  value = _get(config, path)
  if not isinstance(value, str) or not value.strip():
    _fail(path, value, f'a name such as {example!r}')
  return value


def _path(config, path: str) -> str | None:
  value = _get(config, path)
  if value is not None and (not isinstance(value, str) or not value.strip()):
    _fail(path, value, 'a local path, or unset')
  return value


def _has(config, path: str) -> bool:
  node = config
  for key in path.split('.'):
    if not hasattr(node, 'keys') or key not in node:
      return False
    node = node[key]
  return True


def _check_compute(config, section: str) -> None:
  """How a tower computes (config.model or config.clip): dtype, attention, remat, scanned layers."""
  _choice(config, f'{section}.dtype', DTYPES)
  _choice(config, f'{section}.attention', list(ATTENTION_IMPLEMENTATIONS))
  remat = _get(config, f'{section}.remat')
  if not (isinstance(remat, bool) or remat in REMAT_POLICIES):
    _fail(f'{section}.remat', remat, f"one of {list(REMAT_POLICIES)} (what was True is now 'full')")
  _bool(config, f'{section}.scan_layers')


def check_model(config) -> None:
  encoder = _choice(config, 'model.encoder', tuple(ENCODERS))
  points = _int(config, 'model.num_points')
  if _get(config, 'model.in_channels') not in (3, 6):
    _fail('model.in_channels', _get(config, 'model.in_channels'), '3 (xyz) or 6 (xyz + rgb)')
  _int(config, 'model.embed_dim')
  if _has(config, 'model.init') and _path(config, 'model.init') and not os.path.exists(_get(config, 'model.init')):
    raise ConfigError(f'config.model.init={_get(config, "model.init")!r}: no such file or folder')
  _check_compute(config, 'model')
  if _has(config, 'model.num_classes'):
    _int(config, 'model.num_classes', optional=True)
  if _has(config, 'model.init') and _get(config, 'model.init'):
    return  # the file names the encoder: its block is checked once adopted (recipe.adopt_starting_architecture)
  check_encoder_block(config, encoder, points)


def check_encoder_block(config, encoder: str, points: int) -> None:
  """config.model.<encoder>: the sizes of the encoder config.model.encoder names, against the points per cloud."""
  if encoder == 'point_transformer':
    p = 'model.point_transformer'
    width, heads = _int(config, f'{p}.width'), _int(config, f'{p}.num_heads')
    if width % heads:
      fitting = max(d for d in range(1, min(heads, width) + 1) if width % d == 0)
      raise ConfigError(
        f'config.{p}.width={width} is not divisible by config.{p}.num_heads={heads}: each head takes '
        f'width / num_heads channels (e.g. --config.{p}.num_heads={fitting})'
      )
    _int(config, f'{p}.depth')
    _float(config, f'{p}.mlp_ratio', open_low=True)
    groups, size = _int(config, f'{p}.num_groups'), _int(config, f'{p}.group_size')
    for name, value in (('num_groups', groups), ('group_size', size)):
      if value > points:
        raise ConfigError(
          f'config.{p}.{name}={value} is more than the {points} points per cloud (config.model.num_points): '
          'farthest-point sampling picks the group centres and the nearest neighbours among them'
        )
    _int(config, f'{p}.encoder_dim')
    _float(config, f'{p}.drop_path_rate', high=0.99)
    _int(config, f'{p}.head_hidden')
    _float(config, f'{p}.head_dropout', high=0.99)
    if _has(config, f'{p}.projection_bias'):
      _bool(config, f'{p}.projection_bias')
  elif encoder == 'ppat':
    p = 'model.ppat'
    for name in ('width', 'depth', 'num_heads', 'head_dim', 'mlp_dim'):
      _int(config, f'{p}.{name}')
    _ints(config, f'{p}.sa_channels')
    _float(config, f'{p}.radius', open_low=True)
    for name in ('num_patches', 'num_samples'):
      if _int(config, f'{p}.{name}') > points:
        raise ConfigError(
          f'config.{p}.{name}={_get(config, f"{p}.{name}")} is more than the {points} points per cloud '
          '(config.model.num_points): the patch centres and their ball-query neighbours are picked among them'
        )
  elif encoder == 'uni3d':
    p = 'model.uni3d'
    width, heads = _int(config, f'{p}.width'), _int(config, f'{p}.num_heads')
    if width % heads:
      raise ConfigError(
        f'config.{p}.width={width} is not divisible by config.{p}.num_heads={heads}: each head takes '
        'width / num_heads channels'
      )
    for name in ('depth', 'mlp_hidden', 'encoder_dim'):
      _int(config, f'{p}.{name}')
    _choice(config, f'{p}.mlp', MLP_KINDS)
    _bool(config, f'{p}.qkv_fused')
    _float(config, f'{p}.drop_path_rate', high=0.99)
    for name in ('num_groups', 'group_size'):
      if _int(config, f'{p}.{name}') > points:
        raise ConfigError(
          f'config.{p}.{name}={_get(config, f"{p}.{name}")} is more than the {points} points per cloud '
          '(config.model.num_points): farthest-point sampling picks the group centres and neighbours among them'
        )
  else:
    p = 'model.pointmlp'
    _int(config, f'{p}.embed_dim')
    _float(config, f'{p}.res_expansion', open_low=True)
    stages = len(_ints(config, f'{p}.dim_expansion'))
    for name in ('pre_blocks', 'pos_blocks'):
      _ints(config, f'{p}.{name}', low=0, length=stages)
    reducers = _ints(config, f'{p}.reducers', length=stages)
    neighbours = _ints(config, f'{p}.k_neighbors', length=stages)
    remaining = points
    for stage, (reducer, k) in enumerate(zip(reducers, neighbours)):
      remaining //= reducer
      if remaining < 1 or k > remaining * reducer:
        raise ConfigError(
          f'config.{p}.k_neighbors / reducers: stage {stage} groups {k} neighbours among '
          f'{remaining * reducer} points and keeps {remaining} (config.model.num_points={points}); '
          'fewer neighbours, smaller reducers or more points'
        )


def check_clip(config) -> None:
  _path(config, 'clip.path')
  _check_compute(config, 'clip')
  _choice(config, 'clip.prompt.mode', PROMPT_MODES)
  _int(config, 'clip.prompt.num_tokens')


def _check_optimizer(config, path: str) -> None:
  """One optimizer group: each known setting by its kind first (so the error names it), then optim's own rules
  (unknown keys, required ones)."""
  settings = dict(_get(config, path))
  _choice(config, f'{path}.name', tuple(sorted(optim.OPTIMIZER_KEYS)))
  if 'schedule' in settings:
    _choice(config, f'{path}.schedule', optim.SCHEDULES)
  for key in ('lr', 'end_lr', 'warmup_lr', 'weight_decay', 'momentum', 'clip_norm', 'warmup_epochs', 'epochs'):
    if key in settings and settings[key] is not None:
      _float(config, f'{path}.{key}', open_low=key in ('lr', 'epochs'))
  for key in ('b1', 'b2'):
    if key in settings:
      _float(config, f'{path}.{key}', high=0.999999)
  for key in ('nesterov',):
    if key in settings:
      _bool(config, f'{path}.{key}')
  try:
    optim.make_optimizer([('.*', settings)], steps_per_epoch=1, total_steps=1)
  except (TypeError, ValueError) as err:
    raise ConfigError(f'config.{path}: {err}') from None


def check_train(config) -> None:
  _int(config, 'train.batch_size')
  steps, epochs = _get(config, 'train.total_steps'), _get(config, 'train.epochs')
  if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
    raise ConfigError(f'config.train.total_steps={steps!r} must be a non-negative integer (0 or unset: from epochs)')
  if not steps and not (isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and 0 < epochs < math.inf):
    raise ConfigError(f'config.train.epochs={epochs!r} must be positive when config.train.total_steps is unset')
  if steps and epochs is not None:
    _float(config, 'train.epochs')
  if _get(config, 'train.mode') not in TRAIN_MODES:
    _fail('train.mode', _get(config, 'train.mode'), "'joint' or 'alternating'")
  _choice(config, 'train.lr_schedule', optim.LR_STEPPINGS)
  _bool(config, 'train.same_class_mask')
  _int(config, 'train.log_every')
  _int(config, 'train.max_bad_steps')
  for group in ('encoder_optim', 'prompt_optim'):
    if _has(config, f'train.{group}'):
      _check_optimizer(config, f'train.{group}')
  for name in ('lambda_text', 'lambda_image'):  # the stored-feature recipe's loss weights
    if _has(config, f'train.{name}'):
      _float(config, f'train.{name}')
  if _has(config, 'train.logit_scale_init'):
    _float(config, 'train.logit_scale_init', open_low=True)


def check_eval(config) -> None:
  _int(config, 'eval.batch_size')
  if _has(config, 'eval.every_steps'):
    _int(config, 'eval.every_steps', low=0)
  _int(config, 'eval.max_examples', optional=True)
  _name(config, 'eval.split', 'test')
  if _has(config, 'eval.dataset'):
    _name(config, 'eval.dataset', 'modelnet40')
  _choice(config, 'eval.templates', template_set_names())
  if _choice(config, 'eval.prompts', PROMPT_SETS) == 'file':
    path = _path(config, 'eval.class_features')
    if not path or not os.path.isfile(path):
      _fail('eval.class_features', path, "an existing .npz (names, features) or .npy file with eval.prompts='file'")
  elif _has(config, 'eval.class_features'):
    _path(config, 'eval.class_features')
  _choice(config, 'eval.name_style', NAME_STYLES)
  _bool(config, 'eval.normalize_text')
  _ints(config, 'eval.ks')
  # What the evaluation configs add (evaluate's dataset, a layout set's files, retrieval's grid).
  if _has(config, 'eval.task'):
    _choice(config, 'eval.task', TASKS)
  for name in ('data_dir', 'manual_dir', 'list_file'):
    if _has(config, f'eval.{name}'):
      _path(config, f'eval.{name}')
  for name in ('skip_bad', 'use_color'):
    if _has(config, f'eval.{name}'):
      _bool(config, f'eval.{name}')
  if _has(config, 'eval.y_up') and _get(config, 'eval.y_up') is not None:
    _bool(config, 'eval.y_up')
  if _has(config, 'eval.layout'):
    _choice(config, 'eval.layout', LAYOUTS)
  if _has(config, 'eval.num_stored_points'):
    _int(config, 'eval.num_stored_points')
  if _has(config, 'eval.protocol'):
    _choice(config, 'eval.protocol', PROTOCOLS)
  if _has(config, 'eval.num_points'):
    _int(config, 'eval.num_points', optional=True)
  if _has(config, 'eval.step'):
    _int(config, 'eval.step', low=0, optional=True)
  for name, low in (('view_index', 0), ('grid_queries', 1), ('grid_matches', 1)):
    if _has(config, f'eval.{name}'):
      _int(config, f'eval.{name}', low=low)


def check_mesh(config, device_count: int | None) -> None:
  sizes = {}
  for axis in ('data', 'fsdp'):
    value = _get(config, f'mesh.{axis}')
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      _fail(f'mesh.{axis}', value, 'a positive integer, or -1 (the devices left over)')
    sizes[axis] = value
  if sizes['data'] == -1 and sizes['fsdp'] == -1:
    raise ConfigError('config.mesh.data=-1 and config.mesh.fsdp=-1: at most one axis takes the devices left over')
  _int(config, 'mesh.min_fsdp_size', low=0)
  if device_count is not None:
    fixed = math.prod(v for v in sizes.values() if v != -1)
    whole = -1 in sizes.values() and device_count % fixed == 0
    if not whole and fixed != device_count:
      raise ConfigError(
        f'config.mesh.data={sizes["data"]} x config.mesh.fsdp={sizes["fsdp"]} does not fill the {device_count} '
        'devices: the axes must multiply to the device count (-1 takes the devices left over)'
      )


def check_checkpoint(config) -> None:
  _int(config, 'checkpoint.every_steps')
  _int(config, 'checkpoint.keep')
  _bool(config, 'checkpoint.keep_best')
  _bool(config, 'checkpoint.async_save')


def check_logging(config) -> None:
  _bool(config, 'logging.tensorboard')
  _bool(config, 'logging.jsonl')
  steps = _get(config, 'logging.profile_steps')
  if not isinstance(steps, (tuple, list)) or not all(isinstance(s, int) and s >= 0 for s in steps):
    _fail('logging.profile_steps', steps, 'a tuple of step numbers >= 0 (empty: no profile)')


def check_data(config) -> None:
  _name(config, 'data.name', 'shapenet55_cg3d')
  _name(config, 'data.train_split', 'train')
  _path(config, 'data.manual_dir')
  _path(config, 'data.data_dir')
  _int(config, 'data.num_stored_points')
  _bool(config, 'data.augment')
  _float(config, 'data.augment_prob', high=1.0)
  _int(config, 'data.num_views')
  _int(config, 'data.shuffle_buffer')
  _int(config, 'data.prefetch', low=0)
  _bool(config, 'data.skip_bad')
  _choice(config, 'data.templates', template_set_names())


TEXT_SOURCES = ('text', 'caption', 'retrieval_text')


def check_openshape_data(config) -> None:
  """config.data.openshape: OpenShape's per-sample rules (data/openshape.py)."""
  p = 'data.openshape'
  for name in ('y_up', 'random_z_rotate', 'use_color', 'use_text_filtering', 'use_prompt_engineering'):
    _bool(config, f'{p}.{name}')
  _float(config, f'{p}.rgb_random_drop_prob', high=1.0)
  sources = _get(config, f'{p}.text_source')
  if not isinstance(sources, (tuple, list)) or not sources or not set(sources) <= set(TEXT_SOURCES):
    _fail(f'{p}.text_source', sources, f'a non-empty tuple of {TEXT_SOURCES}')
  _path(config, f'{p}.gpt4_filtering')
  _int(config, f'{p}.workers', low=0)
  _path(config, f'{p}.renders')


def check_finetune(config) -> None:
  """config.finetune: the fine-tuning recipe (training/finetune.py)."""
  p = 'finetune'
  _path(config, f'{p}.init')
  _int(config, f'{p}.eval_every_epochs', low=0)  # 0: no evaluation until the end
  points = _int(config, f'{p}.fps_points', low=0, optional=True)  # unset or 0: the original's table
  if points and points < _get(config, 'model.num_points'):
    raise ConfigError(
      f'config.{p}.fps_points={points} is fewer than config.model.num_points={_get(config, "model.num_points")}: '
      'each training cloud is farthest-point sampled to fps_points, then num_points are drawn from them'
    )
  _float(config, f'{p}.label_smoothing', high=0.99)
  _int(config, f'{p}.votes')
  _bool(config, f'{p}.vote_augment')
  encoder = _get(config, 'model.encoder')
  if _has(config, f'{p}.optim.{encoder}'):
    _check_optimizer(config, f'{p}.optim.{encoder}')


DEMO_CLIP_KINDS = ('transformers', 'slip')
SLIP_HEAD_WIDTH = 64  # a SLIP tower's heads are width / 64 (synthetic/random_clip.write_random_slip)
VIEWS_PER_OBJECT = 5  # the ShapeNet-55 builder reads 000.png ... 004.png of each object (data/shapenet55.py)


def check_demo(config) -> None:
  """config.demo: the sizes of the offline demo's procedural dataset and random CLIP (synthetic/demo_inputs.py)."""
  kind = _choice(config, 'demo.clip_kind', DEMO_CLIP_KINDS)
  vocab = _path(config, 'demo.vocab_path')
  if vocab is not None and not os.path.isfile(vocab):
    raise ConfigError(
      f"config.demo.vocab_path={vocab!r}: no such file; expected a CLIP BPE vocabulary (unset: the package's copy)"
    )
  p = 'demo.synthetic'
  for name in ('num_train_per_class', 'num_test_per_class', 'num_points', 'image_size'):
    _int(config, f'{p}.{name}')
  views = _int(config, f'{p}.num_views')
  if views < VIEWS_PER_OBJECT:
    raise ConfigError(
      f'config.{p}.num_views={views}: the ShapeNet-55 layout it is written in holds {VIEWS_PER_OBJECT} views per '
      f'object, all of which the dataset build reads'
    )
  _int(config, f'{p}.seed', low=0)
  p = 'demo.clip'
  sizes = {name: _int(config, f'{p}.{name}') for name in ('patch_size', 'image_size', 'projection_dim')}
  _int(config, f'{p}.seed', low=0)
  if sizes['image_size'] % sizes['patch_size']:
    raise ConfigError(
      f'config.{p}.image_size={sizes["image_size"]} is not divisible by config.{p}.patch_size={sizes["patch_size"]}'
    )
  for tower in ('vision', 'text'):
    width = _int(config, f'{p}.{tower}_width')
    _int(config, f'{p}.{tower}_layers')
    heads = SLIP_HEAD_WIDTH if kind == 'slip' else _int(config, f'{p}.{tower}_heads')
    if width % heads:
      per = f"a SLIP tower's heads are width / {SLIP_HEAD_WIDTH}"
      if kind != 'slip':
        per = f'config.{p}.{tower}_heads={heads}'
      raise ConfigError(f'config.{p}.{tower}_width={width} is not divisible by {heads} ({per})')


def check_demo_run(config, *, device_count: int, families: int) -> None:
  """What the demo's assets (`families` shape families) must give the training run the same config drives: a
  training split of at least one global batch, and a CLIP that projects into the encoder's embedding width."""
  check(config, device_count=device_count)
  per_class, batch = _get(config, 'demo.synthetic.num_train_per_class'), _get(config, 'train.batch_size')
  if per_class * families < batch:
    raise ConfigError(
      f'config.demo.synthetic.num_train_per_class={per_class} writes {per_class * families} training objects '
      f'({families} families x {per_class}), fewer than one global batch of config.train.batch_size={batch}: '
      f'at least {-(-batch // families)} per class, or a smaller batch'
    )
  width, embed = _get(config, 'demo.clip.projection_dim'), _get(config, 'model.embed_dim')
  if width != embed:
    raise ConfigError(
      f'config.demo.clip.projection_dim={width} differs from config.model.embed_dim={embed}: the encoder projects '
      "into the CLIP's joint space"
    )


def check(config, *, device_count: int | None = None) -> None:
  """Every section `config` holds, in the order a run meets them; the first bad field raises ConfigError."""
  if device_count is not None:
    for name in ('train', 'eval'):
      size = _get(config, f'{name}.batch_size')
      if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % device_count:
        raise ConfigError(
          f'config.{name}.batch_size={size!r} must be a positive multiple of the {device_count} devices '
          f'the batch is split over, e.g. --config.{name}.batch_size='
          f'{device_count * max(1, (size if isinstance(size, int) else 0) // device_count)}'
        )
  _int(config, 'seed', low=0)
  check_model(config)
  check_clip(config)
  check_data(config)
  if _has(config, 'data.openshape'):
    check_openshape_data(config)
  check_train(config)
  if _has(config, 'finetune'):
    check_finetune(config)
  if _has(config, 'eval.batch_size'):
    check_eval(config)
  check_mesh(config, device_count)
  check_checkpoint(config)
  check_logging(config)
  if _has(config, 'demo'):
    check_demo(config)
