"""Supervised fine-tuning of a CG3D point encoder for classification (ModelNet40/10, ScanObjectNN).

`finetune(config, workdir, init=...)` is what `python -m cg3d_jax.finetune` runs: the encoder with a classification
head (models/classifiers.py), initialised from a CG3D pretraining run, an original CG3D `.pth` (trained.load_trained)
or from scratch; trained with the original recipe on a device mesh; evaluated with the classification evaluator
(overall and class-mean accuracy, optional voting); checkpointed with orbax and resumed from the newest checkpoint in
`<workdir>/checkpoints`. A finished fine-tune is read with trained.load_finetuned and exported by the export command.

Initialising from pretraining copies every trunk leaf (params and BatchNorm statistics) by name and shape; the
pretraining projection and 55-class head are dropped and the new head keeps its fresh initialisation.

Training step, as Point-BERT's runner_finetune: farthest-point sampling to `fps_points` (1200 for 1024 inputs), one
random subset of `num_points` of those for the whole batch, per-cloud scale and translation, cross-entropy (with
the original's label smoothing when set).
"""

import dataclasses
import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from cg3d_jax import sharding, step_cost
from cg3d_jax.data import builders, pipeline
from cg3d_jax.data.device_transforms import fps_count, sample_training_points
from cg3d_jax.errors import ConfigError, InputError
from cg3d_jax.evaluators.classification import ClassificationEvaluator
from cg3d_jax.models.classifiers import HEAD_PREFIXES, build_classifier, classifier_logits, init_variables
from cg3d_jax.models.point_ops import sample_points
from cg3d_jax.trained import TrainedModel, load_trained
from cg3d_jax.training import common, config_checks, optim
from cg3d_jax.trees import flatten, stack_layers, unflatten, unstack_layers

# Leaves of a pretrained encoder that fine-tuning drops: its CLIP projection and its pretraining head.
DROPPED_PREFIXES = ('projection', 'cls_head_')


def transfer_encoder(fresh: Mapping[str, Any], pretrained: TrainedModel, encoder: str) -> dict:
  """`fresh` classifier variables with every trunk leaf replaced by the pretrained one (checked by name and shape).

  The head (HEAD_PREFIXES) and the PointTransformer's unused projection keep their fresh values; the pretrained
  projection and pretraining head are dropped. Any other difference between the trees is an error.
  """
  if pretrained.encoder_name != encoder:
    raise ConfigError(
      f'{pretrained.source} holds a {pretrained.encoder_name} encoder, but config.model.encoder is {encoder!r}'
    )
  keep_fresh = HEAD_PREFIXES[encoder] + ('projection',)
  out, problems = {}, []
  for collection in ('params', 'batch_stats'):
    # Compared layer by layer, so that a depth mismatch is named as the blocks one side lacks.
    source = flatten(unstack_layers(pretrained.encoder_vars.get(collection, {})))
    target = flatten(unstack_layers(fresh.get(collection, {})))
    used = set()
    flat = {}
    for name, leaf in target.items():
      if name.startswith(keep_fresh):
        flat[name] = leaf
        continue
      if name not in source:
        problems.append(f'{collection}/{name} is missing from the pretrained encoder')
        continue
      if tuple(source[name].shape) != tuple(leaf.shape):
        problems.append(
          f'{collection}/{name}: pretrained shape {tuple(source[name].shape)}, model shape {tuple(leaf.shape)}'
        )
        continue
      flat[name] = jnp.asarray(source[name], leaf.dtype)
      used.add(name)
    extra = [n for n in source if n not in used and not n.startswith(DROPPED_PREFIXES)]
    problems += [f'{collection}/{n} of the pretrained encoder has no place in the classifier' for n in extra]
    out[collection] = stack_layers(unflatten(flat))
  if problems:
    raise ConfigError(
      f'cannot initialise the classifier from {pretrained.source} (do config.model sizes match the '
      f'pretraining run?): ' + '; '.join(problems[:10]) + (' ...' if len(problems) > 10 else '')
    )
  return out


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy against (1 - eps) on the label and eps / (C - 1) on every other class.

  This is the original's smooth_loss (Point-BERT, PointMLP's cal_loss), not optax's eps / C form; eps = 0 is plain
  cross-entropy.
  """
  num_classes = logits.shape[-1]
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if smoothing:
    one_hot = one_hot * (1.0 - smoothing) + (1.0 - one_hot) * (smoothing / (num_classes - 1))
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(one_hot * log_probs, axis=-1))


def train_step(
  state: dict,
  batch: dict,
  *,
  model: nn.Module,
  tx,
  num_points: int,
  fps_points: int,
  augment: bool,
  label_smoothing: float,
):
  """One update; returns (new state, metrics). Pure: jit it with shardings."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
  sample_key, drop_key = jax.random.split(key)
  points = sample_training_points(sample_key, sample_points(batch['points'], fps_points), num_points, augment=augment)

  def loss_fn(params):
    logits, new_stats = classifier_logits(
      model, {'params': params, 'batch_stats': state['batch_stats']}, points, train=True, rngs={'dropout': drop_key}
    )
    return smoothed_cross_entropy(logits, batch['label'], label_smoothing), (logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new_state = dict(
    state,
    step=state['step'] + 1,
    params=optax.apply_updates(state['params'], updates),
    opt_state=opt_state,
    batch_stats=new_stats,
  )
  metrics = {
    'loss': loss,
    'train_acc': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
    'grad_norm': optax.tree.norm(grads),
  }
  return new_state, metrics


def optimizer_rules(config) -> list:
  """The fine-tune optimizer for the whole classifier, picked by encoder; the unused projection is frozen."""
  recipes = config.finetune.optim
  encoder = config.model.encoder
  if encoder not in recipes:
    raise ValueError(f'config.finetune.optim has no recipe for encoder {encoder!r}; it has {sorted(recipes)}')
  return [('^projection/', None), ('.*', dict(recipes[encoder], group='classifier'))]


@dataclasses.dataclass
class Setup:
  config: Any
  mesh: jax.sharding.Mesh
  model: nn.Module
  tx: Any
  state: dict
  state_shardings: Any
  batch_sharding: Any
  class_names: list
  steps_per_epoch: int
  total_steps: int
  fps_points: int
  init_source: str


def build_setup(config, *, init: str | None = None, devices=None) -> Setup:
  init = init or config.finetune.init
  pretrained = load_trained(init, model_config=config.model) if init else None  # cheap checks before the data
  builder = builders.get_builder(
    config.data.name,
    data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
    skip_bad=config.data.skip_bad,
    process_count=jax.process_count(),
  )
  class_names = builders.class_names(builder)
  if config.model.num_classes != len(class_names):
    raise ConfigError(
      f'config.model.num_classes={config.model.num_classes} but {config.data.name} has {len(class_names)} classes'
    )
  mesh = common.make_mesh(config, devices)
  common.check_batch_sizes(config, mesh)
  spe = pipeline.steps_per_epoch(config.data, config.train.batch_size)
  total = common.total_steps(config, spe)
  model = build_classifier(config.model, len(class_names))
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  variables = init_variables(model, init_rng, config.model.num_points)
  if pretrained is not None:
    variables = transfer_encoder(variables, pretrained, config.model.encoder)
  tx, _ = optim.make_optimizer(optimizer_rules(config), steps_per_epoch=spe, total_steps=total)
  state = dict(
    step=jnp.zeros((), jnp.int32),
    params=variables['params'],
    opt_state=tx.init(variables['params']),
    batch_stats=variables['batch_stats'],
    rng=jax.random.key_data(train_rng),
  )
  state, state_sh = common.place_state(state, mesh, config)
  fps_points = fps_count(config.model.num_points, config.data.num_stored_points, config.finetune.fps_points)
  return Setup(
    config=config,
    mesh=mesh,
    model=model,
    tx=tx,
    state=state,
    state_shardings=state_sh,
    batch_sharding=sharding.batch_sharding(mesh),
    class_names=class_names,
    steps_per_epoch=spe,
    total_steps=total,
    fps_points=fps_points,
    init_source=pretrained.source if pretrained else 'random initialisation',
  )


def jit_train_step(setup: Setup):
  config = setup.config
  fn = functools.partial(
    train_step,
    model=setup.model,
    tx=setup.tx,
    num_points=config.model.num_points,
    fps_points=setup.fps_points,
    augment=config.data.augment,
    label_smoothing=float(config.finetune.label_smoothing),
  )
  return jax.jit(
    fn,
    in_shardings=(setup.state_shardings, setup.batch_sharding),
    out_shardings=(setup.state_shardings, None),
    donate_argnums=(0,),
  )


def evaluator(
  setup: Setup, *, votes: int = 1, split: str | None = None, prefix: str = 'val/'
) -> ClassificationEvaluator:
  config = setup.config
  batches = functools.partial(
    pipeline.make_eval_iterator,
    config.data.name,
    data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
    batch_size=config.eval.batch_size,
    sharding=setup.batch_sharding,
    num_points_stored=config.data.num_stored_points,
    split=split or config.eval.split,
    max_examples=config.eval.max_examples,
    skip_bad=config.data.skip_bad,
  )
  return ClassificationEvaluator(
    setup.model,
    batches=batches,
    mesh=setup.mesh,
    num_classes=len(setup.class_names),
    num_points=config.model.num_points,
    fps_points=setup.fps_points,
    votes=votes,
    vote_augment=config.finetune.vote_augment,
    seed=config.seed + 1,
    prefix=prefix,
  )


def finetune(config, workdir: str, *, init: str | None = None, devices=None) -> dict:
  """Fine-tune (or resume) in `workdir`; returns the final metrics ('val/top1', 'val/class_mean', ...).

  devices: the mesh's devices (default: all of every process).
  """
  config_checks.check(config, device_count=len(devices) if devices else jax.device_count())
  source = init or config.finetune.get('init')
  if source and not os.path.exists(os.path.expanduser(str(source))):  # before the dataset is prepared
    raise InputError(f'--init {source}: no such pretraining run or .pth file')
  setup = build_setup(config, init=init, devices=devices)
  spe, total = setup.steps_per_epoch, setup.total_steps
  logging.info(
    'fine-tuning %s on %s (%d classes) from %s; mesh %s; %d steps per epoch; %d steps',
    config.model.encoder,
    config.data.name,
    len(setup.class_names),
    setup.init_source,
    dict(setup.mesh.shape),
    spe,
    total,
  )
  ckpt = common.make_checkpointer(config, workdir)
  state, _ = common.restore_or_start(ckpt, setup.state, setup.state_shardings, config)
  start = int(state['step'])
  batches = pipeline.make_labelled_iterator(
    config.data,
    global_batch_size=config.train.batch_size,
    sharding=setup.batch_sharding,
    seed=config.seed,
    start_step=start,
  )
  step_fn = step_cost.CompiledStep(jit_train_step(setup), jnp.dtype(config.model.dtype), 'the fine-tuning step')
  rules = optimizer_rules(config)
  validation = evaluator(setup)
  eval_every = int(config.finetune.eval_every_epochs or 0) * spe
  writer = common.metrics_writer(config, workdir, 'finetune', resume_step=start)
  progress = common.Progress(start, total, config.train.batch_size)
  last, val = {}, {}
  profiler = step_cost.Profiler(config.logging.profile_steps, workdir)
  try:
    for step in range(start, total):
      profiler.before(step)
      state, metrics = step_fn(state, next(batches))
      profiler.after(step, metrics)
      done = step + 1
      if common.itstime(done, config.train.log_every, total):
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last['lr'] = float(optim.learning_rates(rules, done, steps_per_epoch=spe, total_steps=total)['classifier'])
        last['samples_per_s'] = progress.samples_per_s(done)
        last.update(
          step_cost.rate_metrics([step_fn.cost], progress.recent_samples_per_s(done), config.train.batch_size)
        )
        writer.write_scalars(done, last)
        logging.info(
          'step %d/%d (epoch %.2f)  loss %.4f  train acc %.3f  %s',
          done,
          total,
          done / spe,
          last['loss'],
          last['train_acc'],
          step_cost.format_rate(last),
        )
      if common.itstime(done, eval_every, total):
        val = validation.run({'params': state['params'], 'batch_stats': state['batch_stats']})
        writer.write_scalars(done, val)
        logging.info(
          'step %d  %s top-1 %.4f  class-mean %.4f  (%d shapes)',
          done,
          config.eval.split,
          val['val/top1'],
          val['val/class_mean'],
          val['val/count'],
        )
      if ckpt.should_save(done) or done == total:
        ckpt.save(
          done,
          state,
          data_step=done,
          rng=state['rng'],
          config=config,
          metrics={**val, 'epoch': done / spe},
          force=done == total,
        )
    if config.finetune.votes > 1:
      voted = evaluator(setup, votes=int(config.finetune.votes), prefix='val_vote/').run(
        {'params': state['params'], 'batch_stats': state['batch_stats']}
      )
      val.update({k: v for k, v in voted.items() if not k.endswith('count')})
      writer.write_scalars(int(state['step']), val)
      logging.info(
        'voting (%d passes): top-1 %.4f  class-mean %.4f',
        config.finetune.votes,
        val['val_vote/top1'],
        val['val_vote/class_mean'],
      )
  finally:
    profiler.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return {**last, **val}
