"""What a pretraining recipe is, and what the recipes share. A recipe holds what differs between ways of pretraining
(the model and state, the compiled step, its fixed inputs, the batches, the validation): CG3D's own (cg3d.py: renders
through the frozen, prompt-tuned image tower, captions from class names), OpenShape's stored features
(stored_features.py) and CG3D's method on OpenShape's renders (renders.py). The data source names the recipe its
data calls for (data/sources); the loop around every recipe is one (training/pretrain.py)."""

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from cg3d_jax.data.sources import source
from cg3d_jax.errors import ConfigError
from cg3d_jax.evaluators import evaluator
from cg3d_jax.models.cg3d import CG3D
from cg3d_jax.training import common, config_checks
from cg3d_jax.training.optim import ENCODER, PROMPTS


@dataclasses.dataclass
class Setup:
  """The model, state and shardings a recipe builds once from the config."""

  config: Any
  mesh: jax.sharding.Mesh
  model: CG3D
  clip: Any  # LoadedCLIP, or None when the step runs no CLIP tower
  tx: Any
  labels_fn: Any
  state: dict
  frozen: dict
  text_table: jax.Array | None
  class_names: list
  shardings: dict
  steps_per_epoch: int
  total_steps: int


@dataclasses.dataclass
class Recipe:
  setup: Setup
  batches: Callable[[int], Iterator[dict]]  # start step -> global batches
  step: Callable[[int], Any]  # global step -> the compiled step (state, *fixed_inputs, batch) -> (state, metrics)
  fixed_inputs: tuple  # what every step also takes: frozen CLIP and the caption table, or nothing
  evaluator: Callable[[], Any]  # -> an evaluator (run(variables) -> metrics), built on first use
  eval_variables: Callable[[dict], dict]
  rules: list
  what: str  # for the log line


def initial_state(config, mesh, trainable: dict, tx, encoder_vars: dict, rng) -> tuple[dict, dict]:
  """Step 0's train state, placed on the mesh, and its shardings: what a checkpoint restores into."""
  state = dict(
    step=jnp.zeros((), jnp.int32),
    params=trainable,
    opt_state=tx.init(trainable),
    batch_stats=encoder_vars.get('batch_stats', {}),
    rng=jax.random.key_data(rng),
    bad_steps=jnp.zeros((), jnp.int32),
  )
  return common.place_state(state, mesh, config)


# Each trainable encoder's architecture fields in its config.model block (the compute settings, dtype, remat,
# attention, scan_layers and drop_path_rate, stay the config's).
_ARCHITECTURE = {
  'point_transformer': (
    'width',
    'depth',
    'num_heads',
    'mlp_ratio',
    'num_groups',
    'group_size',
    'encoder_dim',
    'projection_bias',
  ),
  'ppat': ('width', 'depth', 'num_heads', 'head_dim', 'mlp_dim', 'sa_channels', 'num_patches', 'radius', 'num_samples'),
  'uni3d': ('width', 'depth', 'num_heads', 'mlp', 'mlp_hidden', 'qkv_fused', 'num_groups', 'group_size', 'encoder_dim'),
}


@functools.cache
def _starting_file(path: str):
  from cg3d_jax import trained

  return trained.load_trained(path)


def adopt_starting_architecture(config) -> None:
  """With config.model.init (a training run, a CG3D .pth / .safetensors, or a released ULIP / ULIP-2, OpenShape or
  Uni3D file), the run trains that encoder: its kind, architecture and projection (into the family's CLIP space)
  replace config.model's, so that the run's saved config describes what it trains and resumes it. What the file
  does not record (ULIP's grouping) stays the config's: groups hold no weights."""
  path = config.model.get('init')
  if not path:
    return
  loaded = _starting_file(str(path))
  name, encoder = loaded.encoder_name, loaded.encoder
  if name not in _ARCHITECTURE:
    raise ConfigError(
      f'config.model.init={path!r} holds a {name}; pretraining starts from a Point-BERT (CG3D, ULIP, ULIP-2), '
      "OpenShape's PPAT or a Uni3D encoder"
    )
  model = config.model
  model.encoder = name
  model.embed_dim, model.in_channels = int(encoder.embed_dim), int(encoder.in_channels)
  model.num_classes = int(getattr(encoder, 'num_classes', None) or 0)
  unrecorded = set(loaded.config.get('unrecorded', ()))  # e.g. ULIP's grouping: the run's own config sets it
  block = model[name]
  for field in _ARCHITECTURE[name]:
    if f'model.{name}.{field}' not in unrecorded:
      value = getattr(encoder, field)
      block[field] = tuple(value) if isinstance(value, (tuple, list)) else type(block[field])(value)
  if name == 'point_transformer' and encoder.num_classes:
    model.point_transformer.head_hidden = int(encoder.head_hidden)
  config_checks.check_encoder_block(config, name, int(model.num_points))  # the file's sizes with the run's points


def starting_encoder_vars(config, model: CG3D, rng) -> dict:
  """Step 0's encoder variables: config.model.init's (whose architecture config.model holds by now), else fresh."""
  fresh = jax.eval_shape(model.init_encoder, rng)
  path = config.model.get('init')
  if not path:
    return model.init_encoder(rng)
  loaded = _starting_file(str(path)).encoder_vars
  want = jax.tree.map(lambda x: x.shape, fresh)
  got = jax.tree.map(lambda x: tuple(x.shape), loaded)
  if want != got:
    raise ConfigError(f'config.model.init={path!r}: its encoder variables do not fit the encoder built from it')
  return jax.tree.map(lambda x, like: jnp.asarray(x, like.dtype), loaded, fresh)


def from_config(config) -> Recipe:
  """The recipe config.data's source calls for, built (data checked first, then model and state; a starting file
  of config.model.init is read before the data, whose channels must be its encoder's)."""
  from cg3d_jax.training.recipes import cg3d, renders, stored_features

  adopt_starting_architecture(config)  # the file's encoder first: the data is checked against what will train
  data = source.train_source(config)
  recipes = {'cg3d': cg3d.recipe, 'stored_features': stored_features.recipe, 'renders': renders.recipe}
  return recipes[data.recipe](config, data)


def active_groups(config, setup_params: dict, step: int, steps_per_epoch: int) -> tuple[str, ...]:
  """The groups that global step `step` updates. Alternating mode follows the original runner, which alternates on
  the batch's index within its epoch (`idx % 2`): the encoder on even indices, the prompts on odd ones, so with an
  odd number of batches per epoch an epoch's last batch and the next epoch's first both train the encoder."""
  has_prompts = 'clip' in setup_params
  if not has_prompts:
    return (ENCODER,)
  if config.train.mode == 'joint':
    return (ENCODER, PROMPTS)
  if config.train.mode == 'alternating':
    return (ENCODER,) if (step % steps_per_epoch) % 2 == 0 else (PROMPTS,)
  raise ConfigError(f"config.train.mode must be 'joint' or 'alternating', got {config.train.mode!r}")


def validation_evaluator(config, setup: Setup, clip_params, tokenizer):
  """Zero-shot on the split config.eval names for validation (the training data's config.eval.split, or a layout
  set); the text tower is frozen and prompt-less, so its classifier is built once."""
  return evaluator.from_config(
    config.eval,
    source.validation_source(config),
    model=setup.model,
    clip_params=clip_params,
    tokenizer=tokenizer,
    mesh=setup.mesh,
    sharding=setup.shardings['batch'],
  )
