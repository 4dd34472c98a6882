"""CG3D's pretraining recipe: each object's render through the frozen CLIP image tower with trainable prompts,
captions from the class names through the frozen text tower, the point encoder trained against both (the original
runner's joint or alternating updates). Also the setup the renders recipe reuses."""

import jax
import jax.numpy as jnp

from cg3d_jax import sharding, step_cost
from cg3d_jax.clip import templates
from cg3d_jax.clip.loaded_clip import load_clip, tokenize
from cg3d_jax.data.sources.source import TrainData
from cg3d_jax.errors import ConfigError
from cg3d_jax.models.cg3d import CG3D, build_encoder
from cg3d_jax.training import common, optim
from cg3d_jax.training.pretrain_step import jit_train_step, merge_clip
from cg3d_jax.training.recipes.recipe import (
  Recipe,
  Setup,
  active_groups,
  adopt_starting_architecture,
  initial_state,
  starting_encoder_vars,
  validation_evaluator,
)


def build_setup(config, *, train_classes: list[str] | None, steps_per_epoch: int, devices=None) -> Setup:
  """CG3D's model, frozen CLIP and state. train_classes None: the batches carry their own text features (OpenShape's
  layout with renders), so no caption table is built (a one-row placeholder keeps the step's signature)."""
  mesh = common.make_mesh(config, devices)
  if not config.clip.path:
    raise ConfigError(
      'config.clip.path is not set: give a local CLIP folder, e.g. --config.clip.path=/models/clip-vit-base-patch16'
    )
  clip = load_clip(
    config.clip.path,
    prompt_mode=config.clip.prompt.mode,
    num_prompts=config.clip.prompt.num_tokens,
    dtype=jnp.dtype(config.clip.dtype),
    remat=config.clip.remat,
    attention=config.clip.attention,
    scan_layers=config.clip.scan_layers,
    seed=config.seed,
  )
  adopt_starting_architecture(config)
  if config.model.embed_dim != clip.spec.projection_dim:
    raise ConfigError(
      f'config.model.embed_dim={config.model.embed_dim} but the CLIP at {config.clip.path} projects '
      f'to {clip.spec.projection_dim}: the point encoder must project into the same joint space'
    )
  model = CG3D(encoder=build_encoder(config.model), clip=clip.model, num_points=config.model.num_points)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  encoder_vars = starting_encoder_vars(config, model, init_rng)
  rules = optim.optimizer_rules(config)
  if config.train.mode == 'alternating' and steps_per_epoch < 2 and config.clip.prompt.mode != 'none':
    raise ConfigError(
      f"config.train.mode='alternating' with {steps_per_epoch} batch per epoch: the prompts train on "
      "odd batch indices within an epoch (the original runner's idx % 2), so they would never be "
      "updated; use config.train.mode='joint', or a smaller config.train.batch_size"
    )
  trainable, frozen = optim.split_trainable({'encoder': encoder_vars['params'], 'clip': clip.params}, rules)
  total = common.total_steps(config, steps_per_epoch)
  tx, labels_fn = optim.make_optimizer(rules, steps_per_epoch=steps_per_epoch, total_steps=total)

  # One caption per (template, class); the table is replicated and looked up by (template_idx, label).
  if train_classes is None:
    text_table = jnp.zeros((1, 1, clip.spec.projection_dim), jnp.float32)
  else:
    caption_templates = templates.get_templates(config.data.templates)
    captions = [t.format(c) for t in caption_templates for c in train_classes]
    ids = tokenize(clip.tokenizer, captions).reshape(len(caption_templates), len(train_classes), -1)
    text_table = model.caption_table(merge_clip(frozen, trainable), ids)

  state, state_sh = initial_state(config, mesh, trainable, tx, encoder_vars, train_rng)
  frozen_sh = sharding.param_shardings(frozen, mesh, min_fsdp_size=config.mesh.min_fsdp_size)
  shardings = dict(
    state=state_sh, frozen=frozen_sh, table=sharding.replicated(mesh), batch=sharding.batch_sharding(mesh)
  )
  return Setup(
    config=config,
    mesh=mesh,
    model=model,
    clip=clip,
    tx=tx,
    labels_fn=labels_fn,
    state=state,
    frozen=jax.device_put(frozen, frozen_sh),
    text_table=jax.device_put(text_table, shardings['table']),
    class_names=list(train_classes or []),
    shardings=shardings,
    steps_per_epoch=steps_per_epoch,
    total_steps=total,
  )


def eval_variables(setup: Setup, state: dict) -> dict:
  return {
    'encoder': {'params': state['params']['encoder'], 'batch_stats': state['batch_stats']},
    'clip': merge_clip(setup.frozen, state['params']),
  }


def recipe(config, data: TrainData, setup: Setup | None = None) -> Recipe:
  """CG3D's recipe on `data` (a TFDS dataset with class names); with a given `setup`, the step and schedule alone
  (for the renders recipe)."""
  if setup is None:
    setup = build_setup(config, train_classes=data.class_names, steps_per_epoch=data.steps_per_epoch)
  compute_dtype = jnp.promote_types(jnp.dtype(config.model.dtype), jnp.dtype(config.clip.dtype))
  compiled = {}

  def step(global_step: int):
    groups = active_groups(config, setup.state['params'], global_step, setup.steps_per_epoch)
    if groups not in compiled:
      compiled[groups] = step_cost.CompiledStep(
        jit_train_step(
          setup.model,
          setup.tx,
          setup.labels_fn,
          active=groups,
          state_shardings=setup.shardings['state'],
          frozen_shardings=setup.shardings['frozen'],
          table_sharding=setup.shardings['table'],
          batch_shardings=setup.shardings['batch'],
          same_class_mask=config.train.same_class_mask,
          # OpenShape's layout is augmented on the host, by its own rules; the device adds nothing to it.
          augment=config.data.augment and data.recipe == 'cg3d',
        ),
        compute_dtype,
        f'the training step ({"+".join(groups)})',
      )
    return compiled[groups]

  def batches(start: int):
    return data.batches(
      start,
      sharding=setup.shardings['batch'],
      num_templates=setup.text_table.shape[0],
      preprocess=setup.clip.preprocess,
    )

  def evaluator():
    clip_params = merge_clip(setup.frozen, setup.state['params'])  # the text tower is frozen and prompt-less
    return validation_evaluator(config, setup, clip_params, setup.clip.tokenizer)

  return Recipe(
    setup=setup,
    batches=batches,
    step=step,
    fixed_inputs=(setup.frozen, setup.text_table),
    evaluator=evaluator,
    eval_variables=lambda state: eval_variables(setup, state),
    rules=optim.optimizer_rules(config),
    what=data.describe,
  )
