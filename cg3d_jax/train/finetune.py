"""Supervised fine-tuning of a CG3D point encoder for classification (ModelNet40/10, ScanObjectNN).

`finetune(config, workdir, init=...)` is what `python -m cg3d_jax.finetune` runs: the encoder with a classification
head (models/classifiers.py), initialised from a CG3D pretraining checkpoint (a training workdir), an original CG3D
`.pth`, or from scratch; trained with the original recipe on a device mesh; evaluated (overall and class-mean
accuracy, optional voting); checkpointed with orbax and resumed from the newest checkpoint in `<workdir>/checkpoints`.
Reading a finished fine-tune and exporting it to PyTorch is train/finetuned.py.

Initialising from pretraining copies every trunk leaf (params and BatchNorm statistics) by name and shape; the
pretraining projection and 55-class head are dropped and the new head keeps its fresh initialisation.

Training step, as Point-BERT's runner_finetune: farthest-point sampling to `fps_points` (1200 for 1024 inputs), one
random subset of `num_points` of those for the whole batch, per-cloud scale and translation, cross-entropy (with
the original's label smoothing when set). Evaluation: FPS to `num_points`; voting averages the logits of `votes`
passes, each with the training-time sampling and augmentation (the original's test_vote).
"""

import dataclasses
import functools
import pathlib
import time
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cg3d_jax.data import builders, finetune_pipeline, pipeline
from cg3d_jax.data.transforms import scale_and_translate
from cg3d_jax.eval import metrics as eval_metrics
from cg3d_jax.metrics import MetricsWriter
from cg3d_jax.models import pointmlp
from cg3d_jax.models.classifiers import HEAD_PREFIXES, build_classifier, init_variables
from cg3d_jax.models.point_ops import farthest_point_sample, gather_points
from cg3d_jax.models.point_transformer import PointTransformer
from cg3d_jax.train import optim, sharding, trained
from cg3d_jax.weights.trees import unflatten
from cg3d_jax.train.checkpoint import Checkpointer

# Leaves of a pretrained encoder that fine-tuning drops: its CLIP projection and its pretraining head.
DROPPED_PREFIXES = ('projection', 'cls_head_')


# ----------------------------------------------------------------------------------------------------------------
# Initialisation from pretrained weights.


@dataclasses.dataclass
class PretrainedEncoder:
  encoder: str  # 'point_transformer' or 'pointmlp'
  params: dict
  batch_stats: dict
  source: str  # what was read, for logs


def _flat(tree) -> dict[str, Any]:
  return {optim.path_to_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_pretrained(path, model_config=None) -> PretrainedEncoder:
  """The point encoder of a cg3d-jax pretraining checkpoint (workdir, checkpoints/ or step folder) or of an
  original CG3D `.pth`.

  model_config (config.model of the fine-tune run) sizes what a `.pth` does not record (the PointTransformer's
  head count and grouping); without it the importer assumes CG3D's released sizes.
  """
  path = pathlib.Path(path)
  if path.suffix in ('.pth', '.pt', '.safetensors'):
    if not path.is_file():
      raise FileNotFoundError(f'--init {path}: no such file')
    from cg3d_jax.weights import cg3d_checkpoint  # pylint: disable=g-import-not-at-top  (torch only when needed)
    model = None if model_config is None else _source_model(path, model_config, cg3d_checkpoint)
    encoder, params, batch_stats, _prompts, _info = cg3d_checkpoint.load_cg3d_checkpoint(str(path), model=model)
    return PretrainedEncoder(encoder, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, batch_stats),
                             f'original CG3D checkpoint {path}')
  model = trained.load_trained(path)
  return PretrainedEncoder(model.config.model.encoder, model.encoder_vars['params'],
                           model.encoder_vars.get('batch_stats', {}), f'pretraining checkpoint {model.path}')


def _source_model(path, model_config, cg3d_checkpoint) -> nn.Module:
  """The pretrained encoder as the fine-tune config sizes it, with the projection and head sizes of the file."""
  state_dict = cg3d_checkpoint.strip_module_prefix(path, cg3d_checkpoint.read_container(path)['base_model'])
  projection = state_dict.get('projection.weight')
  if model_config.encoder == 'point_transformer':
    model = PointTransformer.from_config(model_config)
    hidden, head = state_dict.get('cls_head_finetune.0.weight'), state_dict.get('cls_head_finetune.3.weight')
    model = model.clone(num_classes=None if head is None else int(head.shape[0]),
                        head_hidden=model.head_hidden if hidden is None else int(hidden.shape[0]))
    return model if projection is None else model.clone(embed_dim=int(projection.shape[0]))
  model = pointmlp.PointMLP.from_config(model_config)
  return model if projection is None else model.clone(projection_dim=int(projection.shape[0]))


def transfer_encoder(fresh: Mapping[str, Any], pretrained: PretrainedEncoder, encoder: str) -> dict:
  """`fresh` classifier variables with every trunk leaf replaced by the pretrained one (checked by name and shape).

  The head (HEAD_PREFIXES) and the PointTransformer's unused projection keep their fresh values; the pretrained
  projection and pretraining head are dropped. Any other difference between the trees is an error.
  """
  if pretrained.encoder != encoder:
    raise ValueError(f'{pretrained.source} holds a {pretrained.encoder} encoder, but config.model.encoder is '
                     f'{encoder!r}')
  keep_fresh = HEAD_PREFIXES[encoder] + ('projection',)
  out, problems = {}, []
  for collection in ('params', 'batch_stats'):
    source = _flat(getattr(pretrained, collection))
    target = _flat(fresh.get(collection, {}))
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
        problems.append(f'{collection}/{name}: pretrained shape {tuple(source[name].shape)}, model shape '
                        f'{tuple(leaf.shape)}')
        continue
      flat[name] = jnp.asarray(source[name], leaf.dtype)
      used.add(name)
    extra = [n for n in source if n not in used and not n.startswith(DROPPED_PREFIXES)]
    problems += [f'{collection}/{n} of the pretrained encoder has no place in the classifier' for n in extra]
    out[collection] = unflatten(flat)
  if problems:
    raise ValueError(f'cannot initialise the classifier from {pretrained.source} (do config.model sizes match the '
                     f'pretraining run?): ' + '; '.join(problems[:10]) + (' ...' if len(problems) > 10 else ''))
  return out


# ----------------------------------------------------------------------------------------------------------------
# Loss, sampling and the train step.


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


def fps(points: jax.Array, num_points: int) -> jax.Array:
  if points.shape[1] == num_points:
    return points
  if points.shape[1] < num_points:
    raise ValueError(f'cannot sample {num_points} points from clouds of {points.shape[1]} (config.data.'
                     'num_stored_points must be at least config.model.num_points and finetune.fps_points)')
  return gather_points(points, farthest_point_sample(points, num_points))


def sample_training_points(key: jax.Array, sampled: jax.Array, num_points: int, *, augment: bool) -> jax.Array:
  """From FPS-sampled clouds (B, F, 3): one random subset of num_points for the whole batch (the original's
  np.random.choice(point_all, npoints, False)), then per-cloud scale and translation."""
  subset_key, aug_key = jax.random.split(key)
  if sampled.shape[1] > num_points:
    sampled = sampled[:, jax.random.choice(subset_key, sampled.shape[1], (num_points,), replace=False)]
  return scale_and_translate(aug_key, sampled) if augment else sampled


def fps_count(num_points: int, stored: int, fps_points: int | None) -> int:
  """Points farthest-point sampled before the random subset: finetune.fps_points, else the original's table
  (1024 -> 1200, 2048 -> 2400, 4096 -> 4800, 8192 -> 8192); never more than the stored cloud holds."""
  if not fps_points:
    fps_points = {1024: 1200, 2048: 2400, 4096: 4800}.get(num_points, num_points)
  if fps_points < num_points:
    raise ValueError(f'finetune.fps_points={fps_points} is below config.model.num_points={num_points}')
  return min(fps_points, stored)


def logits_fn(model: nn.Module, variables: dict, points: jax.Array, *, train: bool, rngs=None):
  """(logits, updated batch_stats or None)."""
  if train:
    logits, updates = model.apply(variables, points, train=True, return_logits=True, rngs=rngs,
                                  mutable=['batch_stats'])
    return logits, updates['batch_stats']
  return model.apply(variables, points, train=False, return_logits=True), None


def train_step(state: dict, batch: dict, *, model: nn.Module, tx, num_points: int, fps_points: int, augment: bool,
               label_smoothing: float):
  """One update; returns (new state, metrics). Pure: jit it with shardings."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
  sample_key, drop_key = jax.random.split(key)
  points = sample_training_points(sample_key, fps(batch['points'], fps_points), num_points, augment=augment)

  def loss_fn(params):
    logits, new_stats = logits_fn(model, {'params': params, 'batch_stats': state['batch_stats']}, points,
                                  train=True, rngs={'dropout': drop_key})
    return smoothed_cross_entropy(logits, batch['label'], label_smoothing), (logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new_state = dict(state, step=state['step'] + 1, params=optax.apply_updates(state['params'], updates),
                   opt_state=opt_state, batch_stats=new_stats)
  metrics = {'loss': loss, 'train_acc': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
             'grad_norm': optax.tree.norm(grads)}
  return new_state, metrics


def optimizer_rules(config) -> list:
  """The fine-tune optimizer for the whole classifier, picked by encoder; the unused projection is frozen."""
  recipes = config.finetune.optim
  encoder = config.model.encoder
  if encoder not in recipes:
    raise ValueError(f'config.finetune.optim has no recipe for encoder {encoder!r}; it has {sorted(recipes)}')
  return [('^projection/', None), ('.*', dict(recipes[encoder], group='classifier'))]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


def make_predict(model: nn.Module, *, num_points: int, fps_points: int, votes: int = 1, vote_augment: bool = True,
                 out_sharding=None):
  """jit(variables, points, key) -> logits (B, C); with votes > 1, the mean logits of `votes` passes.

  A voting pass samples and augments as training does (FPS to fps_points, a random num_points subset, scale and
  translate) unless vote_augment is False; then every pass is FPS to num_points, i.e. the single pass.
  """
  def predict(variables, points, key):
    if votes <= 1:
      return logits_fn(model, variables, fps(points, num_points), train=False)[0]
    sampled = fps(points, fps_points if vote_augment else num_points)

    def one_pass(total, pass_key):
      view = sample_training_points(pass_key, sampled, num_points, augment=vote_augment)
      return total + logits_fn(model, variables, view, train=False)[0].astype(jnp.float32), None

    zeros = jnp.zeros((points.shape[0], int(model.num_classes)), jnp.float32)
    total, _ = jax.lax.scan(one_pass, zeros, jax.random.split(key, votes))
    return total / votes

  return jax.jit(predict, out_shardings=out_sharding)


def evaluate(predict, variables: dict, batches: Iterator[dict], *, num_classes: int, key: jax.Array) -> dict:
  """Overall (top-1) and class-mean accuracy over padded, masked batches; also returns the logits and labels."""
  logits, labels, masks = [], [], []
  for i, batch in enumerate(batches):
    out = predict(variables, batch['points'], jax.random.fold_in(key, i))
    # `predict` replicates its output: every process holds the whole batch's logits.
    logits.append(np.asarray(out if out.is_fully_addressable else out.addressable_data(0)))
    labels.append(_host(batch['label']))
    masks.append(_host(batch['mask']))
  if not logits:
    raise ValueError('evaluation split is empty')
  logits, labels, mask = np.concatenate(logits), np.concatenate(labels), np.concatenate(masks)
  return {'top1': eval_metrics.topk_accuracy(logits[mask], labels[mask], ks=(1,))[1],
          'class_mean': eval_metrics.class_mean_accuracy(eval_metrics.predictions(logits[mask]), labels[mask],
                                                         num_classes),
          'count': int(mask.sum()), 'logits': logits[mask], 'labels': labels[mask]}


def _host(x) -> np.ndarray:
  """A (possibly multi-host) batch array as a full NumPy array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def eval_batches(config, batch_sharding, split: str | None = None):
  return pipeline.make_eval_iterator(
      config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir,
      batch_size=config.eval.batch_size, sharding=batch_sharding, num_points_stored=config.data.num_stored_points,
      split=split or config.eval.split, max_examples=config.eval.max_examples, skip_bad=config.data.skip_bad)


# ----------------------------------------------------------------------------------------------------------------
# The loop.


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


def _check_config(config, num_classes: int, mesh) -> None:
  if config.model.num_classes != num_classes:
    raise ValueError(f'config.model.num_classes={config.model.num_classes} but {config.data.name} has '
                     f'{num_classes} classes')
  for name in ('train', 'eval'):
    # Batches split their leading dimension over every device of the mesh.
    if config[name].batch_size % mesh.size:
      raise ValueError(f'config.{name}.batch_size={config[name].batch_size} must be divisible by the {mesh.size} '
                       'devices of the mesh')


def build_setup(config, *, init: str | None = None, devices=None) -> Setup:
  builder = builders.get_builder(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir,
                                 skip_bad=config.data.skip_bad, process_count=jax.process_count())
  class_names = builders.class_names(builder)
  mesh = sharding.make_mesh({'data': config.mesh.data, 'fsdp': config.mesh.fsdp}, devices)
  _check_config(config, len(class_names), mesh)
  spe = finetune_pipeline.steps_per_epoch(config.data, config.train.batch_size)
  total = int(config.train.total_steps) if config.train.total_steps else int(config.train.epochs * spe)
  model = build_classifier(config.model, len(class_names))
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  variables = init_variables(model, init_rng, config.model.num_points)
  init = init or config.finetune.init
  source = 'random initialisation'
  if init:
    pretrained = load_pretrained(init, config.model)
    variables = transfer_encoder(variables, pretrained, config.model.encoder)
    source = pretrained.source
  tx, _ = optim.make_optimizer(optimizer_rules(config), steps_per_epoch=spe, total_steps=total)
  state = dict(step=jnp.zeros((), jnp.int32), params=variables['params'], opt_state=tx.init(variables['params']),
               batch_stats=variables['batch_stats'], rng=jax.random.key_data(train_rng))
  state_sh = sharding.state_shardings(jax.eval_shape(lambda s: s, state), mesh,
                                      min_fsdp_size=config.mesh.min_fsdp_size)
  state = jax.device_put(state, state_sh)
  fps_points = fps_count(config.model.num_points, config.data.num_stored_points, config.finetune.fps_points)
  return Setup(config=config, mesh=mesh, model=model, tx=tx, state=state, state_shardings=state_sh,
               batch_sharding=sharding.batch_sharding(mesh), class_names=class_names, steps_per_epoch=spe,
               total_steps=total, fps_points=fps_points, init_source=source)


def jit_train_step(setup: Setup):
  config = setup.config
  fn = functools.partial(train_step, model=setup.model, tx=setup.tx, num_points=config.model.num_points,
                         fps_points=setup.fps_points, augment=config.data.augment,
                         label_smoothing=float(config.finetune.label_smoothing))
  return jax.jit(fn, in_shardings=(setup.state_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def run_eval(setup: Setup, state: dict, *, votes: int = 1, split: str | None = None) -> dict:
  config = setup.config
  predict = make_predict(setup.model, num_points=config.model.num_points, fps_points=setup.fps_points, votes=votes,
                         vote_augment=config.finetune.vote_augment, out_sharding=sharding.replicated(setup.mesh))
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return evaluate(predict, variables, eval_batches(config, setup.batch_sharding, split),
                  num_classes=len(setup.class_names), key=jax.random.key(config.seed + 1))


def finetune(config, workdir: str, *, init: str | None = None, devices=None) -> dict:
  """Fine-tune (or resume) in `workdir`; returns the final metrics ('val/top1', 'val/class_mean', ...).

  devices: the mesh's devices (default: all of every process).
  """
  setup = build_setup(config, init=init, devices=devices)
  spe, total = setup.steps_per_epoch, setup.total_steps
  logging.info('fine-tuning %s on %s (%d classes) from %s; mesh %s; %d steps per epoch; %d steps',
               config.model.encoder, config.data.name, len(setup.class_names), setup.init_source,
               dict(setup.mesh.shape), spe, total)
  ckpt = Checkpointer(f'{workdir}/checkpoints', keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
                      best_metric='val/top1', async_save=config.checkpoint.async_save,
                      every_steps=config.checkpoint.every_steps)
  state = setup.state
  if ckpt.latest_step() is not None:
    target = sharding.with_shardings(jax.eval_shape(lambda s: s, state), setup.state_shardings)
    state, extras = ckpt.restore(target_state_shapes_with_shardings=target)
    logging.info('resumed from step %d', extras['step'])
  start = int(state['step'])
  batches = finetune_pipeline.make_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                                  sharding=setup.batch_sharding, seed=config.seed, start_step=start)
  step_fn = jit_train_step(setup)
  rules = optimizer_rules(config)
  eval_every = int(config.finetune.eval_every_epochs or 0) * spe
  writer = MetricsWriter(workdir, 'finetune', tensorboard=config.logging.tensorboard, jsonl=config.logging.jsonl)
  last, val = {}, {}
  t0 = time.time()
  try:
    for step in range(start, total):
      state, metrics = step_fn(state, next(batches))
      done = step + 1
      if done % config.train.log_every == 0 or done == total:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last['lr'] = float(optim.learning_rates(rules, done, steps_per_epoch=spe, total_steps=total)['classifier'])
        last['samples_per_s'] = (done - start) * config.train.batch_size / max(time.time() - t0, 1e-9)
        writer.write_scalars(done, last)
        logging.info('step %d/%d (epoch %.2f)  loss %.4f  train acc %.3f', done, total, done / spe, last['loss'],
                     last['train_acc'])
      if (eval_every and done % eval_every == 0) or done == total:
        result = run_eval(setup, state)
        val = {'val/top1': result['top1'], 'val/class_mean': result['class_mean'], 'val/count': result['count']}
        writer.write_scalars(done, val)
        logging.info('step %d  %s top-1 %.4f  class-mean %.4f  (%d shapes)', done, config.eval.split,
                     val['val/top1'], val['val/class_mean'], val['val/count'])
      if ckpt.should_save(done) or done == total:
        ckpt.save(done, state, data_step=done, rng=state['rng'], config=config,
                  metrics={**val, 'epoch': done / spe}, force=done == total)
    if config.finetune.votes > 1:
      result = run_eval(setup, state, votes=int(config.finetune.votes))
      val.update({'val_vote/top1': result['top1'], 'val_vote/class_mean': result['class_mean']})
      writer.write_scalars(int(state['step']), val)
      logging.info('voting (%d passes): top-1 %.4f  class-mean %.4f', config.finetune.votes, result['top1'],
                   result['class_mean'])
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return {**last, **val}
