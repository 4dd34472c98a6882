"""The pretraining loop: set up model, data, shardings and checkpoints from a config, then train and validate.

`train(config, workdir)` is what `python -m cg3d_jax.train` runs. It resumes from the newest checkpoint in
`<workdir>/checkpoints` when there is one (step, optimizer state, RNG and data position), so a preempted job is
restarted with the same command.
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from cg3d_jax.data import builders, pipeline, templates
from cg3d_jax.eval import zeroshot
from cg3d_jax.metrics import MetricsWriter
from cg3d_jax.models.cg3d import CG3D, build_encoder
from cg3d_jax.train import demo_assets, optim, sharding
from cg3d_jax.train.checkpoint import Checkpointer
from cg3d_jax.train.step import ENCODER, PROMPTS, jit_train_step, merge_clip
from cg3d_jax.weights.hf_clip import load_clip, tokenize


def optimizer_rules(config) -> list:
  """big_vision-style (regex, settings | None) list: the first match decides; None freezes."""
  # In alternating mode each group is updated every other step; updates_every=2 keeps its schedule on the global
  # step (and epoch) rather than on its own update count.
  every = 2 if config.train.mode == 'alternating' else 1
  return [
      ('^encoder/', dict(config.train.encoder_optim, group=ENCODER, updates_every=every)),
      ('^clip/prompts/', dict(config.train.prompt_optim, group=PROMPTS, updates_every=every)),
      ('^clip/', None),
  ]


def _prune(tree):
  """Drops optax.MaskedNode leaves and the dicts they leave empty, giving a plain nested dict."""
  if isinstance(tree, dict):
    out = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, (dict, optax.MaskedNode)) and not _leaves(v))}
  return tree


def _leaves(tree) -> bool:
  return bool(jax.tree.leaves(tree))


def split_trainable(params: dict, rules) -> tuple[dict, dict]:
  """(trainable, frozen) as two plain nested dicts, by the optimizer rules."""
  trainable, frozen = optim.partition(params, rules)
  return _prune(trainable), _prune(frozen)


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, built once from the config."""
  config: Any
  mesh: jax.sharding.Mesh
  model: CG3D
  clip: Any  # LoadedCLIP
  tx: Any
  labels_fn: Any
  state: dict
  frozen: dict
  text_table: jax.Array
  class_names: list
  shardings: dict
  steps_per_epoch: int
  total_steps: int


def _total_steps(config, steps_per_epoch: int) -> int:
  return int(config.train.total_steps) if config.train.total_steps else int(config.train.epochs * steps_per_epoch)


def build_setup(config, *, train_classes: list[str], steps_per_epoch: int, devices=None) -> Setup:
  mesh = sharding.make_mesh({'data': config.mesh.data, 'fsdp': config.mesh.fsdp}, devices)
  min_fsdp = config.mesh.min_fsdp_size
  if not config.clip.path:
    raise ValueError('config.clip.path is not set: give a local transformers CLIP folder, '
                     'e.g. --config.clip.path=/models/clip-vit-base-patch16')
  clip = load_clip(config.clip.path, prompt_mode=config.clip.prompt.mode, num_prompts=config.clip.prompt.num_tokens,
                   dtype=jnp.dtype(config.clip.dtype), remat=config.clip.remat, seed=config.seed)
  if config.model.embed_dim != clip.spec.projection_dim:
    raise ValueError(f'config.model.embed_dim={config.model.embed_dim} but the CLIP at {config.clip.path} projects '
                     f'to {clip.spec.projection_dim}: the point encoder must project into the same joint space')
  model = CG3D(encoder=build_encoder(config.model), clip=clip.model, num_points=config.model.num_points)
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  encoder_vars = model.init_encoder(init_rng)
  all_params = {'encoder': encoder_vars['params'], 'clip': clip.params}
  rules = optimizer_rules(config)
  trainable, frozen = split_trainable(all_params, rules)
  total_steps = _total_steps(config, steps_per_epoch)
  tx, labels_fn = optim.make_optimizer(rules, steps_per_epoch=steps_per_epoch, total_steps=total_steps)

  # One caption per (template, class); the table is replicated and looked up by (template_idx, label).
  caption_templates = templates.get_templates(config.data.templates)
  captions = [[t.format(c) for c in train_classes] for t in caption_templates]
  ids = tokenize(clip.tokenizer, [c for row in captions for c in row]).reshape(len(caption_templates),
                                                                               len(train_classes), -1)
  text_table = model.caption_table(merge_clip(frozen, trainable), ids)

  state = dict(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
               batch_stats=encoder_vars.get('batch_stats', {}), rng=jax.random.key_data(train_rng),
               bad_steps=jnp.zeros((), jnp.int32))
  shapes = jax.eval_shape(lambda s: s, state)
  state_sh = sharding.state_shardings(shapes, mesh, min_fsdp_size=min_fsdp)
  frozen_sh = sharding.param_shardings(frozen, mesh, min_fsdp_size=min_fsdp)
  shardings = dict(state=state_sh, frozen=frozen_sh, table=sharding.replicated(mesh),
                   batch=sharding.batch_sharding(mesh))
  state = jax.device_put(state, state_sh)
  frozen = jax.device_put(frozen, frozen_sh)
  text_table = jax.device_put(text_table, shardings['table'])
  return Setup(config=config, mesh=mesh, model=model, clip=clip, tx=tx, labels_fn=labels_fn, state=state, frozen=frozen,
               text_table=text_table, class_names=list(train_classes), shardings=shardings,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def active_groups(config, setup_params: dict, step: int) -> tuple[str, ...]:
  has_prompts = 'clip' in setup_params
  if not has_prompts:
    return (ENCODER,)
  if config.train.mode == 'joint':
    return (ENCODER, PROMPTS)
  if config.train.mode == 'alternating':
    return (ENCODER,) if step % 2 == 0 else (PROMPTS,)
  raise ValueError(f"config.train.mode must be 'joint' or 'alternating', got {config.train.mode!r}")


class NonFiniteError(RuntimeError):
  pass


def validate(setup: Setup, state: dict, class_names: list[str], classifier) -> dict:
  """Zero-shot metrics of the current state on config.eval.split (val/top1, top3, top5, class_mean, count)."""
  encoder_vars = {'params': state['params']['encoder'], 'batch_stats': state['batch_stats']}
  return zeroshot.zero_shot_eval(setup.model, encoder_vars, merge_clip(setup.frozen, state['params']),
                                 setup.clip.tokenizer, _eval_batches(setup), class_names, setup.mesh,
                                 classifier=classifier)


def validation_classifier(setup: Setup, state: dict, class_names: list[str]):
  """(C, D) class weights from config.eval.templates; the text tower is frozen and prompt-less, so built once."""
  return zeroshot.text_classifier(setup.model.clip, merge_clip(setup.frozen, state['params']), setup.clip.tokenizer,
                                  class_names, setup.config.eval.templates)


def _image_settings(setup: Setup) -> dict:
  pre = setup.clip.preprocess
  return dict(image_size=pre.crop_size, image_mean=tuple(pre.mean), image_std=tuple(pre.std))


def _eval_batches(setup: Setup):
  config = setup.config
  return pipeline.make_eval_iterator(
      config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir,
      batch_size=config.eval.batch_size, sharding=setup.shardings['batch'],
      num_points_stored=config.data.num_stored_points, split=config.eval.split,
      max_examples=config.eval.max_examples, skip_bad=config.data.skip_bad)


def _restore_target(setup: Setup):
  shapes = jax.eval_shape(lambda s: s, setup.state)
  return sharding.with_shardings(shapes, setup.shardings['state'])


def train(config, workdir: str) -> dict:
  """Train (or resume) in `workdir`; returns the last validation metrics (and the final training metrics)."""
  if config.demo.enabled:
    demo_assets.prepare(config, workdir)
  builder = builders.get_builder(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir,
                                 skip_bad=config.data.skip_bad, process_count=jax.process_count())
  class_names = builders.class_names(builder)
  spe = pipeline.steps_per_epoch(config.data, config.train.batch_size)
  setup = build_setup(config, train_classes=class_names, steps_per_epoch=spe)
  total = setup.total_steps
  logging.info('mesh %s; %d classes; %d steps per epoch; %d steps', dict(setup.mesh.shape), len(class_names), spe,
               total)

  ckpt = Checkpointer(f'{workdir}/checkpoints', keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
                      async_save=config.checkpoint.async_save, every_steps=config.checkpoint.every_steps)
  state = setup.state
  if ckpt.latest_step() is not None:
    state, extras = ckpt.restore(target_state_shapes_with_shardings=_restore_target(setup))
    logging.info('resumed from step %d (data step %d)', extras['step'], extras['data_step'])
  start = int(state['step'])

  batches = pipeline.make_pretrain_iterator(
      config.data, global_batch_size=config.train.batch_size, sharding=setup.shardings['batch'],
      num_templates=setup.text_table.shape[0], seed=config.seed, start_step=start, **_image_settings(setup))
  steps = {}

  def step_fn(step: int):
    groups = active_groups(config, state['params'], step)
    if groups not in steps:
      steps[groups] = jit_train_step(
          setup.model, setup.tx, setup.labels_fn, active=groups, state_shardings=setup.shardings['state'],
          frozen_shardings=setup.shardings['frozen'], table_sharding=setup.shardings['table'],
          batch_shardings=setup.shardings['batch'], same_class_mask=config.train.same_class_mask,
          augment=config.data.augment)
    return steps[groups]

  writer = MetricsWriter(workdir, 'train', tensorboard=config.logging.tensorboard, jsonl=config.logging.jsonl)
  rules = optimizer_rules(config)
  val_metrics: dict = {}
  classifier = None
  last: dict = {}
  pending = None
  t0, seen = time.time(), 0
  try:
    for step in range(start, total):
      batch = next(batches)
      state, metrics = step_fn(step)(state, setup.frozen, setup.text_table, batch)
      # The non-finite check reads the previous step's flag, so the host never waits on the step just dispatched.
      if pending is not None:
        _check_finite(pending, config.train.max_bad_steps, ckpt)
      pending = metrics | {'step': step}
      seen += config.train.batch_size
      done = step + 1
      if done % config.train.log_every == 0 or done == total:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for group, lr in optim.learning_rates(rules, done, steps_per_epoch=spe,
                                              total_steps=total).items():
          last[f'lr/{group}'] = float(lr)
        elapsed = time.time() - t0
        last['samples_per_s'] = seen / max(elapsed, 1e-9)
        eta = (total - done) * elapsed / max(done - start, 1)
        writer.write_scalars(done, last)
        logging.info('step %d/%d  loss %.4f  %.1f samples/s  ETA %s', done, total, last['loss'],
                     last['samples_per_s'], _format_seconds(eta))
      if config.eval.every_steps and (done % config.eval.every_steps == 0 or done == total):
        if classifier is None:
          classifier = validation_classifier(setup, state, class_names)
        val_metrics = validate(setup, state, class_names, classifier)
        writer.write_scalars(done, val_metrics)
        logging.info('step %d  zero-shot top-1 %.4f on %d %s shapes', done, val_metrics['val/top1'],
                     val_metrics['val/count'], config.eval.split)
      if ckpt.should_save(done) or done == total:
        ckpt.save(done, state, data_step=done, rng=state['rng'], config=config,
                  metrics=val_metrics if val_metrics else None, force=done == total)
    if pending is not None:
      _check_finite(pending, config.train.max_bad_steps, ckpt)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return {**last, **val_metrics}


def _check_finite(metrics: dict, max_bad: int, ckpt: Checkpointer) -> None:
  bad = int(metrics['bad_steps'])
  if bad == 0:
    return
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  logging.warning('step %d was not applied: non-finite loss or gradients (%s)', values['step'], values)
  if bad >= max_bad:
    raise NonFiniteError(
        f'{bad} consecutive steps had non-finite losses or gradients (last: step {values["step"]}, {values}); '
        f'stopping. The last good checkpoint is step {ckpt.latest_step()}. Look for NaN/Inf in the data '
        '(config.data.skip_bad), lower the learning rates, or use float32 (config.model.dtype, config.clip.dtype).')


def _format_seconds(s: float) -> str:
  s = int(s)
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'
