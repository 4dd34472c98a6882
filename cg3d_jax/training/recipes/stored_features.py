"""OpenShape's recipe on its layout: the stored CLIP image and text features of each shape are the targets, so the
step runs no CLIP tower; the encoder and the temperature train (OpenShape's loss)."""

import jax
import jax.numpy as jnp

from cg3d_jax import sharding, step_cost
from cg3d_jax.data.sources.source import TrainData
from cg3d_jax.errors import ConfigError
from cg3d_jax.models.cg3d import CG3D, build_encoder
from cg3d_jax.training import common, optim
from cg3d_jax.training.pretrain_step import jit_features_train_step
from cg3d_jax.training.recipes.recipe import (
  Recipe,
  Setup,
  adopt_starting_architecture,
  initial_state,
  starting_encoder_vars,
  validation_evaluator,
)


def build_features_setup(config, *, feature_dim: int, steps_per_epoch: int, devices=None) -> Setup:
  """The stored-feature recipe's model and state: the encoder and log(temperature) train; no CLIP is loaded."""
  mesh = common.make_mesh(config, devices)
  adopt_starting_architecture(config)
  if config.model.embed_dim != feature_dim:
    raise ConfigError(
      f'config.model.embed_dim={config.model.embed_dim} but the stored CLIP features are '
      f'{feature_dim}-dimensional: the point encoder must project into their space, e.g. '
      f'--config.model.embed_dim={feature_dim}'
    )
  model = CG3D(encoder=build_encoder(config.model), clip=None, num_points=config.model.num_points)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  encoder_vars = starting_encoder_vars(config, model, init_rng)
  trainable = {
    'encoder': encoder_vars['params'],
    'logit_scale': jnp.log(jnp.asarray(config.train.logit_scale_init, jnp.float32)),
  }
  total = common.total_steps(config, steps_per_epoch)
  tx, labels_fn = optim.make_optimizer(
    optim.feature_optimizer_rules(config), steps_per_epoch=steps_per_epoch, total_steps=total
  )
  state, state_sh = initial_state(config, mesh, trainable, tx, encoder_vars, train_rng)
  return Setup(
    config=config,
    mesh=mesh,
    model=model,
    clip=None,
    tx=tx,
    labels_fn=labels_fn,
    state=state,
    frozen={},
    text_table=None,
    class_names=[],
    shardings=dict(state=state_sh, batch=sharding.batch_sharding(mesh)),
    steps_per_epoch=steps_per_epoch,
    total_steps=total,
  )


def recipe(config, data: TrainData) -> Recipe:
  setup = build_features_setup(config, feature_dim=data.feature_dim, steps_per_epoch=data.steps_per_epoch)
  compiled = step_cost.CompiledStep(
    jit_features_train_step(
      setup.model,
      setup.tx,
      state_shardings=setup.shardings['state'],
      batch_shardings=setup.shardings['batch'],
      lambda_text=config.train.lambda_text,
      lambda_image=config.train.lambda_image,
    ),
    jnp.dtype(config.model.dtype),
    'the training step (stored features)',
  )

  def variables(state):
    return {'encoder': {'params': state['params']['encoder'], 'batch_stats': state['batch_stats']}, 'clip': None}

  return Recipe(
    setup=setup,
    batches=lambda start: data.batches(start, sharding=setup.shardings['batch']),
    step=lambda _: compiled,
    fixed_inputs=(),
    evaluator=lambda: validation_evaluator(config, setup, None, None),
    eval_variables=variables,
    rules=optim.feature_optimizer_rules(config),
    what=data.describe,
  )
