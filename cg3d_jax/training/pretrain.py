"""The pretraining loop: set up model, data, shardings and checkpoints from a config, then train and validate.

`train(config, workdir)` is what `python -m cg3d_jax.train` runs. It resumes from the newest checkpoint in
`<workdir>/checkpoints` when there is one (step, optimizer state, RNG and data position), so a preempted job is
restarted with the same command.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from cg3d_jax import sharding, step_cost
from cg3d_jax.checkpoints import Checkpointer
from cg3d_jax.data import builders, pipeline, templates
from cg3d_jax.errors import ConfigError
from cg3d_jax.evaluators.zeroshot import ZeroShotEvaluator
from cg3d_jax.models.cg3d import CG3D, build_encoder
from cg3d_jax.training import common, optim
from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, jit_train_step, merge_clip
from cg3d_jax.weights.clip_files import load_clip
from cg3d_jax.weights.hf_clip import tokenize


def optimizer_rules(config) -> list:
  """big_vision-style (regex, settings | None) list: the first match decides; None freezes."""
  # In alternating mode each group is updated every other step; updates_every=2 keeps its schedule on the global
  # step (and epoch) rather than on its own update count.
  every = 2 if config.train.mode == 'alternating' else 1
  return [
      # The classification head (kept for strict exports and fine-tuning) gets no gradient in pretraining; torch's
      # AdamW skips a parameter without a gradient, decay included, so it must not decay here either.
      ('^encoder/', dict(config.train.encoder_optim, group=ENCODER, updates_every=every,
                         no_decay_regex='^encoder/cls_head_')),
      # The prompts' updates fall on the odd steps: their n-th is global step 2n + 1, whose epoch it must take.
      ('^clip/prompts/', dict(config.train.prompt_optim, group=PROMPTS, updates_every=every,
                              first_update_step=every - 1)),
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


def build_setup(config, *, train_classes: list[str], steps_per_epoch: int, devices=None) -> Setup:
  mesh = common.make_mesh(config, devices)
  if not config.clip.path:
    raise ConfigError('config.clip.path is not set: give a local CLIP folder, e.g. '
                      '--config.clip.path=/models/clip-vit-base-patch16')
  clip = load_clip(config.clip.path, prompt_mode=config.clip.prompt.mode, num_prompts=config.clip.prompt.num_tokens,
                   dtype=jnp.dtype(config.clip.dtype), remat=config.clip.remat,
                   attention=config.clip.get('attention', 'auto'), scan_layers=config.clip.get('scan_layers', True),
                   seed=config.seed)
  if config.model.embed_dim != clip.spec.projection_dim:
    raise ConfigError(f'config.model.embed_dim={config.model.embed_dim} but the CLIP at {config.clip.path} projects '
                      f'to {clip.spec.projection_dim}: the point encoder must project into the same joint space')
  model = CG3D(encoder=build_encoder(config.model), clip=clip.model, num_points=config.model.num_points)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  encoder_vars = model.init_encoder(init_rng)
  rules = optimizer_rules(config)
  trainable, frozen = split_trainable({'encoder': encoder_vars['params'], 'clip': clip.params}, rules)
  total = common.total_steps(config, steps_per_epoch)
  tx, labels_fn = optim.make_optimizer(rules, steps_per_epoch=steps_per_epoch, total_steps=total)

  # One caption per (template, class); the table is replicated and looked up by (template_idx, label).
  caption_templates = templates.get_templates(config.data.templates)
  captions = [t.format(c) for t in caption_templates for c in train_classes]
  ids = tokenize(clip.tokenizer, captions).reshape(len(caption_templates), len(train_classes), -1)
  text_table = model.caption_table(merge_clip(frozen, trainable), ids)

  state = dict(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
               batch_stats=encoder_vars.get('batch_stats', {}), rng=jax.random.key_data(train_rng),
               bad_steps=jnp.zeros((), jnp.int32))
  state, state_sh = common.place_state(state, mesh, config)
  frozen_sh = sharding.param_shardings(frozen, mesh, min_fsdp_size=config.mesh.min_fsdp_size)
  shardings = dict(state=state_sh, frozen=frozen_sh, table=sharding.replicated(mesh),
                   batch=sharding.batch_sharding(mesh))
  return Setup(config=config, mesh=mesh, model=model, clip=clip, tx=tx, labels_fn=labels_fn, state=state,
               frozen=jax.device_put(frozen, frozen_sh), text_table=jax.device_put(text_table, shardings['table']),
               class_names=list(train_classes), shardings=shardings, steps_per_epoch=steps_per_epoch,
               total_steps=total)


def active_groups(config, setup_params: dict, step: int) -> tuple[str, ...]:
  has_prompts = 'clip' in setup_params
  if not has_prompts:
    return (ENCODER,)
  if config.train.mode == 'joint':
    return (ENCODER, PROMPTS)
  if config.train.mode == 'alternating':
    return (ENCODER,) if step % 2 == 0 else (PROMPTS,)
  raise ConfigError(f"config.train.mode must be 'joint' or 'alternating', got {config.train.mode!r}")


class NonFiniteError(RuntimeError):
  pass


def validation_evaluator(setup: Setup) -> ZeroShotEvaluator:
  """Zero-shot on config.eval.split; the text tower is frozen and prompt-less, so its classifier is built once."""
  config = setup.config
  batches = functools.partial(
      pipeline.make_eval_iterator, config.data.name, data_dir=config.data.data_dir,
      manual_dir=config.data.manual_dir, batch_size=config.eval.batch_size, sharding=setup.shardings['batch'],
      num_points_stored=config.data.num_stored_points, split=config.eval.split,
      max_examples=config.eval.max_examples, skip_bad=config.data.skip_bad)
  return ZeroShotEvaluator(setup.model, merge_clip(setup.frozen, setup.state['params']), setup.clip.tokenizer,
                           batches=batches, class_names=setup.class_names, mesh=setup.mesh,
                           templates=config.eval.templates)


def eval_variables(setup: Setup, state: dict) -> dict:
  return {'encoder': {'params': state['params']['encoder'], 'batch_stats': state['batch_stats']},
          'clip': merge_clip(setup.frozen, state['params'])}


def train(config, workdir: str) -> dict:
  """Train (or resume) in `workdir`; returns the last validation metrics (and the final training metrics)."""
  common.validate_config(config, device_count=jax.device_count())
  if config.train.get('mode') not in ('joint', 'alternating'):
    raise ConfigError(f"config.train.mode={config.train.get('mode')!r}: expected 'joint' or 'alternating'")
  builder = builders.get_builder(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir,
                                 skip_bad=config.data.skip_bad, process_count=jax.process_count())
  class_names = builders.class_names(builder)
  spe = pipeline.steps_per_epoch(config.data, config.train.batch_size)
  setup = build_setup(config, train_classes=class_names, steps_per_epoch=spe)
  common.check_batch_sizes(config, setup.mesh)
  total = setup.total_steps
  logging.info('mesh %s; %d classes; %d steps per epoch; %d steps', dict(setup.mesh.shape), len(class_names), spe,
               total)

  ckpt = common.make_checkpointer(config, workdir)
  state, _ = common.restore_or_start(ckpt, setup.state, setup.shardings['state'], config)
  start = int(state['step'])
  batches = pipeline.make_pretrain_iterator(
      config.data, global_batch_size=config.train.batch_size, sharding=setup.shardings['batch'],
      num_templates=setup.text_table.shape[0], seed=config.seed, start_step=start,
      **setup.clip.preprocess.pipeline_settings())
  steps = {}

  compute_dtype = jnp.promote_types(jnp.dtype(config.model.dtype), jnp.dtype(config.clip.dtype))

  def step_fn(step: int):
    groups = active_groups(config, state['params'], step)
    if groups not in steps:
      steps[groups] = step_cost.CompiledStep(jit_train_step(
          setup.model, setup.tx, setup.labels_fn, active=groups, state_shardings=setup.shardings['state'],
          frozen_shardings=setup.shardings['frozen'], table_sharding=setup.shardings['table'],
          batch_shardings=setup.shardings['batch'], same_class_mask=config.train.same_class_mask,
          augment=config.data.augment), compute_dtype, f'the training step ({"+".join(groups)})')
    return steps[groups]

  writer = common.metrics_writer(config, workdir, 'train', resume_step=start)
  rules = optimizer_rules(config)
  evaluator = None
  val_metrics: dict = {}
  last: dict = {}
  pending = None
  progress = common.Progress(start, total, config.train.batch_size)
  profiler = step_cost.Profiler(config.logging.get('profile_steps'), workdir)
  try:
    for step in range(start, total):
      batch = next(batches)
      profiler.before(step)
      state, metrics = step_fn(step)(state, setup.frozen, setup.text_table, batch)
      profiler.after(step, metrics)
      # The non-finite check reads the previous step's flag, so the host never waits on the step just dispatched.
      if pending is not None:
        _check_finite(pending, config.train.max_bad_steps, ckpt)
      pending = metrics | {'step': step}
      done = step + 1
      if common.itstime(done, config.train.log_every, total):
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for group, lr in optim.learning_rates(rules, done, steps_per_epoch=spe, total_steps=total).items():
          last[f'lr/{group}'] = float(lr)
        last['samples_per_s'] = progress.samples_per_s(done)
        last.update(step_cost.rate_metrics([s.cost for s in steps.values()], progress.recent_samples_per_s(done),
                                           config.train.batch_size))
        writer.write_scalars(done, last)
        logging.info('step %d/%d  loss %.4f  %.1f samples/s  %s  ETA %s', done, total, last['loss'],
                     last['samples_per_s'], step_cost.format_rate(last), progress.eta(done))
      if config.eval.every_steps and common.itstime(done, config.eval.every_steps, total):
        evaluator = evaluator or validation_evaluator(setup)
        val_metrics = evaluator.run(eval_variables(setup, state))
        writer.write_scalars(done, val_metrics)
        logging.info('step %d  zero-shot top-1 %.4f on %d %s shapes', done, val_metrics['val/top1'],
                     val_metrics['val/count'], config.eval.split)
      if ckpt.should_save(done) or done == total:
        ckpt.save(done, state, data_step=done, rng=state['rng'], config=config,
                  metrics=val_metrics if val_metrics else None, force=done == total)
    if pending is not None:
      _check_finite(pending, config.train.max_bad_steps, ckpt)
  finally:
    profiler.close()
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
