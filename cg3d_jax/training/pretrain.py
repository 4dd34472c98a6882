"""The pretraining loop: set up model, data, shardings and checkpoints from a config, then train and validate.

`train(config, workdir)` is what `python -m cg3d_jax.train` runs. It resumes from the newest checkpoint in
`<workdir>/checkpoints` when there is one (step, optimizer state, RNG and data position), so a preempted job is
restarted with the same command.
"""

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging

from cg3d_jax import sharding, step_cost
from cg3d_jax.checkpoints import Checkpointer
from cg3d_jax.clip import templates
from cg3d_jax.clip.loaded_clip import tokenize
from cg3d_jax.clip.loading import load_clip
from cg3d_jax.data import host_batches, openshape_stream
from cg3d_jax.errors import ConfigError
from cg3d_jax.evaluators import evaluation_sets
from cg3d_jax.evaluators.zeroshot import ZeroShotEvaluator
from cg3d_jax.models.cg3d import CG3D, build_encoder
from cg3d_jax.training import common, optim
from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, jit_features_train_step, jit_train_step, merge_clip

OPENSHAPE = 'openshape'  # config.data.name of OpenShape's layout (stored CLIP features)


def optimizer_rules(config) -> list:
  """big_vision-style (regex, settings | None) list: the first match decides; None freezes."""
  # Alternating mode updates the encoder on the batches with an even index within their epoch and the prompts on
  # the odd ones (the original runner's idx % 2); steps_on lets each group's schedule follow the global step and
  # epoch rather than its own update count. lr_stepping 'original' applies the runner's end-of-epoch scheduler
  # calls (optim module docstring), whose cosine spans config.train.epochs although the runner trains one more.
  alternating = config.train.mode == 'alternating'
  stepping = dict(lr_stepping=config.train.get('lr_schedule', 'per_epoch'))
  if stepping['lr_stepping'] == 'original':
    stepping['epochs'] = int(config.train.epochs)
  return [
    # The classification head (kept for strict exports and fine-tuning) gets no gradient in pretraining; torch's
    # AdamW skips a parameter without a gradient, decay included, so it must not decay here either.
    (
      '^encoder/',
      dict(
        stepping,
        **config.train.encoder_optim,
        group=ENCODER,
        steps_on='even' if alternating else 'all',
        scheduler_parity='even',
        no_decay_regex='^encoder/cls_head_',
      ),
    ),
    (
      '^clip/prompts/',
      dict(
        stepping,
        **config.train.prompt_optim,
        group=PROMPTS,
        steps_on='odd' if alternating else 'all',
        scheduler_parity='odd',
      ),
    ),
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
    attention=config.clip.get('attention', 'auto'),
    scan_layers=config.clip.get('scan_layers', True),
    seed=config.seed,
  )
  if config.model.embed_dim != clip.spec.projection_dim:
    raise ConfigError(
      f'config.model.embed_dim={config.model.embed_dim} but the CLIP at {config.clip.path} projects '
      f'to {clip.spec.projection_dim}: the point encoder must project into the same joint space'
    )
  model = CG3D(encoder=build_encoder(config.model), clip=clip.model, num_points=config.model.num_points)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  encoder_vars = model.init_encoder(init_rng)
  rules = optimizer_rules(config)
  if config.train.mode == 'alternating' and steps_per_epoch < 2 and config.clip.prompt.mode != 'none':
    raise ConfigError(
      f"config.train.mode='alternating' with {steps_per_epoch} batch per epoch: the prompts train on "
      "odd batch indices within an epoch (the original runner's idx % 2), so they would never be "
      "updated; use config.train.mode='joint', or a smaller config.train.batch_size"
    )
  trainable, frozen = split_trainable({'encoder': encoder_vars['params'], 'clip': clip.params}, rules)
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

  state = dict(
    step=jnp.zeros((), jnp.int32),
    params=trainable,
    opt_state=tx.init(trainable),
    batch_stats=encoder_vars.get('batch_stats', {}),
    rng=jax.random.key_data(train_rng),
    bad_steps=jnp.zeros((), jnp.int32),
  )
  state, state_sh = common.place_state(state, mesh, config)
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


class NonFiniteError(RuntimeError):
  pass


def validation_evaluator(setup: Setup) -> ZeroShotEvaluator:
  """Zero-shot on config.eval.split; the text tower is frozen and prompt-less, so its classifier is built once."""
  from cg3d_jax.data import pipeline  # TFDS, with TensorFlow: imported by the recipe that reads it alone

  config = setup.config
  batches = functools.partial(
    pipeline.make_eval_iterator,
    config.data.name,
    data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
    batch_size=config.eval.batch_size,
    sharding=setup.shardings['batch'],
    num_points_stored=config.data.num_stored_points,
    split=config.eval.split,
    max_examples=config.eval.max_examples,
    skip_bad=config.data.skip_bad,
  )
  return ZeroShotEvaluator(
    setup.model,
    merge_clip(setup.frozen, setup.state['params']),
    setup.clip.tokenizer,
    batches=batches,
    class_names=setup.class_names,
    mesh=setup.mesh,
    templates=config.eval.templates,
  )


def eval_variables(setup: Setup, state: dict) -> dict:
  return {
    'encoder': {'params': state['params']['encoder'], 'batch_stats': state['batch_stats']},
    'clip': merge_clip(setup.frozen, state['params']),
  }


def uses_stored_features(config) -> bool:
  """The data decides the recipe: OpenShape's layout stores CLIP features, so its step runs no CLIP tower."""
  return config.data.name == OPENSHAPE


@dataclasses.dataclass
class Recipe:
  """What differs between the pretraining recipes (CG3D's on TFDS data, stored features, renders); the loop around
  them is one (`train`)."""

  setup: Setup
  batches: Callable[[int], Iterator[dict]]  # start step -> global batches
  step: Callable[[int], Any]  # global step -> the compiled step (state, *fixed_inputs, batch) -> (state, metrics)
  fixed_inputs: tuple  # what every step also takes: frozen CLIP and the caption table, or nothing
  evaluator: Callable[[], Any]  # -> an evaluator (run(variables) -> metrics), built on first use
  eval_variables: Callable[[dict], dict]
  rules: list
  what: str  # for the log line


def clip_recipe(config, setup: Setup | None = None) -> Recipe:
  """CG3D's recipe: renders through the frozen, prompt-tuned image tower; captions from class-name templates (the
  TFDS data of config.data.name; with a given `setup`, the step and schedule alone, for renders_recipe)."""
  from cg3d_jax.data import builders, pipeline  # TFDS, with TensorFlow: OpenShape's layout trains without it

  if setup is None:
    if config.model.get('in_channels', 3) != 3:
      raise ConfigError(
        f'config.model.in_channels={config.model.in_channels}: the TFDS datasets ({config.data.name}) '
        "carry xyz only; coloured encoders train on OpenShape's layout (--config pretrain_openshape)"
      )
    builder = builders.get_builder(
      config.data.name,
      data_dir=config.data.data_dir,
      manual_dir=config.data.manual_dir,
      skip_bad=config.data.skip_bad,
      process_count=jax.process_count(),
    )
    spe = pipeline.steps_per_epoch(config.data, config.train.batch_size)
    setup = build_setup(config, train_classes=builders.class_names(builder), steps_per_epoch=spe)
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
          augment=config.data.augment and not uses_stored_features(config),
        ),
        compute_dtype,
        f'the training step ({"+".join(groups)})',
      )
    return compiled[groups]

  def batches(start: int):
    return pipeline.make_pretrain_iterator(
      config.data,
      global_batch_size=config.train.batch_size,
      sharding=setup.shardings['batch'],
      num_templates=setup.text_table.shape[0],
      seed=config.seed,
      start_step=start,
      **setup.clip.preprocess.pipeline_settings(),
    )

  return Recipe(
    setup=setup,
    batches=batches,
    step=step,
    fixed_inputs=(setup.frozen, setup.text_table),
    evaluator=lambda: validation_evaluator(setup),
    eval_variables=functools.partial(eval_variables, setup),
    rules=optimizer_rules(config),
    what=f'{len(setup.class_names)} classes',
  )


def feature_optimizer_rules(config) -> list:
  """The encoder and the temperature in one AdamW group (OpenShape optimises both together); the scalar
  temperature never decays, nor does the unused classification head."""
  return [
    (
      '^(encoder/|logit_scale$)',
      dict(config.train.encoder_optim, group=ENCODER, no_decay_regex='^encoder/cls_head_|^logit_scale$'),
    )
  ]


def build_features_setup(config, *, feature_dim: int, steps_per_epoch: int, devices=None) -> Setup:
  """The stored-feature recipe's model and state: the encoder and log(temperature) train; no CLIP is loaded."""
  mesh = common.make_mesh(config, devices)
  if config.model.embed_dim != feature_dim:
    raise ConfigError(
      f'config.model.embed_dim={config.model.embed_dim} but the stored CLIP features are '
      f'{feature_dim}-dimensional: the point encoder must project into their space, e.g. '
      f'--config.model.embed_dim={feature_dim}'
    )
  model = CG3D(encoder=build_encoder(config.model), clip=None, num_points=config.model.num_points)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  encoder_vars = model.init_encoder(init_rng)
  trainable = {
    'encoder': encoder_vars['params'],
    'logit_scale': jnp.log(jnp.asarray(config.train.logit_scale_init, jnp.float32)),
  }
  total = common.total_steps(config, steps_per_epoch)
  tx, labels_fn = optim.make_optimizer(
    feature_optimizer_rules(config), steps_per_epoch=steps_per_epoch, total_steps=total
  )
  state = dict(
    step=jnp.zeros((), jnp.int32),
    params=trainable,
    opt_state=tx.init(trainable),
    batch_stats=encoder_vars.get('batch_stats', {}),
    rng=jax.random.key_data(train_rng),
    bad_steps=jnp.zeros((), jnp.int32),
  )
  state, state_sh = common.place_state(state, mesh, config)
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


def features_recipe(config) -> Recipe:
  """OpenShape's recipe on its layout: stored image and text features are the targets; no CLIP in the step."""
  source = openshape_stream.open_train_source(config.data)
  spe = _steps_per_epoch(source, config)
  _check_channels(config, source)
  setup = build_features_setup(config, feature_dim=source.feature_dim, steps_per_epoch=spe)
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

  def evaluator():
    return _layout_evaluator(config, setup, None, None)

  def variables(state):
    return {'encoder': {'params': state['params']['encoder'], 'batch_stats': state['batch_stats']}, 'clip': None}

  return Recipe(
    setup=setup,
    batches=functools.partial(_layout_batches, config, source, setup),
    step=lambda _: compiled,
    fixed_inputs=(),
    evaluator=evaluator,
    eval_variables=variables,
    rules=feature_optimizer_rules(config),
    what=f'{len(source.shapes)} shapes with stored {source.feature_dim}-d features',
  )


def renders_recipe(config) -> Recipe:
  """CG3D's method on OpenShape's data: its renders through the frozen, prompt-tuned image tower (config.clip.path:
  the CLIP the stored text features came from), the stored per-sample text features as text targets."""
  source = openshape_stream.open_train_source(config.data)
  spe = _steps_per_epoch(source, config)
  if config.train.same_class_mask:
    raise ConfigError("config.train.same_class_mask needs class labels; OpenShape's layout has none: set it False")
  _check_channels(config, source)
  setup = build_setup(config, train_classes=None, steps_per_epoch=spe)
  if setup.clip.spec.projection_dim != source.feature_dim:
    raise ConfigError(
      f'the CLIP at {config.clip.path} projects to {setup.clip.spec.projection_dim} but the stored '
      f'text features are {source.feature_dim}-dimensional: give the CLIP they came from '
      '(OpenShape: OpenCLIP ViT-bigG-14, laion2b_s39b_b160k, 1280)'
    )
  source = dataclasses.replace(source, preprocess=setup.clip.preprocess)
  recipe = clip_recipe(config, setup)

  def evaluator():
    clip_params = merge_clip(setup.frozen, setup.state['params'])  # the text tower is frozen and prompt-less
    return _layout_evaluator(config, setup, clip_params, setup.clip.tokenizer)

  return dataclasses.replace(
    recipe,
    batches=functools.partial(_layout_batches, config, source, setup),
    evaluator=evaluator,
    what=f'{len(source.shapes)} shapes with renders and stored {source.feature_dim}-d text features',
  )


def _layout_batches(config, source, setup: Setup, start: int) -> Iterator[dict]:
  """Global batches of OpenShape's layout from global step `start`, each process reading its own rows."""
  return host_batches.to_global(
    openshape_stream.train_local_batches(
      source,
      global_batch_size=config.train.batch_size,
      seed=config.seed,
      start_step=start,
      workers=config.data.openshape.workers,
      prefetch=config.data.prefetch,
    ),
    setup.shardings['batch'],
  )


def _steps_per_epoch(source, config) -> int:
  if len(source.shapes) < config.train.batch_size:
    raise ConfigError(
      f'the training split {config.data.train_split} has {len(source.shapes)} shapes, fewer than '
      f'one global batch of {config.train.batch_size} (config.train.batch_size)'
    )
  return len(source.shapes) // config.train.batch_size


def _check_channels(config, source) -> None:
  channels = 6 if source.sample.use_color else 3
  if config.model.get('in_channels', 3) != channels:
    raise ConfigError(
      f'config.model.in_channels={config.model.get("in_channels", 3)} but the data gives '
      f'{channels} channels per point (config.data.openshape.use_color={source.sample.use_color})'
    )


def _layout_evaluator(config, setup: Setup, clip_params, tokenizer) -> ZeroShotEvaluator:
  evalset = evaluation_sets.open_eval_set(config.eval, default_root=config.data.manual_dir)
  return ZeroShotEvaluator(
    setup.model,
    clip_params,
    tokenizer,
    class_names=evalset.class_names,
    mesh=setup.mesh,
    classifier=evaluation_sets.classifier(evalset, config.eval, setup.model, clip_params, tokenizer),
    batches=functools.partial(evaluation_sets.eval_iterator, evalset, config.eval, setup.shardings['batch']),
  )


def train(config, workdir: str) -> dict:
  """Train (or resume) in `workdir`; returns the last validation metrics (and the final training metrics)."""
  common.validate_config(config, device_count=jax.device_count())
  if config.train.get('mode') not in ('joint', 'alternating'):
    raise ConfigError(f"config.train.mode={config.train.get('mode')!r}: expected 'joint' or 'alternating'")
  if config.train.get('lr_schedule', 'per_epoch') not in optim.LR_STEPPINGS:
    raise ConfigError(f'config.train.lr_schedule={config.train.lr_schedule!r}: expected one of {optim.LR_STEPPINGS}')
  if not uses_stored_features(config):
    recipe = clip_recipe(config)
  elif config.data.openshape.get('renders'):
    recipe = renders_recipe(config)
  else:
    recipe = features_recipe(config)
  setup = recipe.setup
  common.check_batch_sizes(config, setup.mesh)
  total, spe = setup.total_steps, setup.steps_per_epoch
  logging.info('mesh %s; %s; %d steps per epoch; %d steps', dict(setup.mesh.shape), recipe.what, spe, total)

  ckpt = common.make_checkpointer(config, workdir)
  state, _ = common.restore_or_start(ckpt, setup.state, setup.shardings['state'], config)
  start = int(state['step'])
  batches = recipe.batches(start)
  writer = common.metrics_writer(config, workdir, 'train', resume_step=start)
  evaluator = None
  val_metrics: dict = {}
  last: dict = {}
  pending = None
  progress = common.Progress(start, total, config.train.batch_size)
  profiler = step_cost.Profiler(config.logging.get('profile_steps'), workdir)
  used = {}
  try:
    for step in range(start, total):
      batch = next(batches)
      profiler.before(step)
      step_fn = recipe.step(step)
      used[id(step_fn)] = step_fn
      state, metrics = step_fn(state, *recipe.fixed_inputs, batch)
      profiler.after(step, metrics)
      # The non-finite check reads the previous step's flag, so the host never waits on the step just dispatched.
      if pending is not None:
        _check_finite(pending, config.train.max_bad_steps, ckpt)
      pending = metrics | {'step': step}
      done = step + 1
      if common.itstime(done, config.train.log_every, total):
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for group, lr in optim.learning_rates(recipe.rules, done, steps_per_epoch=spe, total_steps=total).items():
          last[f'lr/{group}'] = float(lr)
        last['samples_per_s'] = progress.samples_per_s(done)
        last.update(
          step_cost.rate_metrics(
            [s.cost for s in used.values()], progress.recent_samples_per_s(done), config.train.batch_size
          )
        )
        writer.write_scalars(done, last)
        logging.info(
          'step %d/%d  loss %.4f  %.1f samples/s  %s  ETA %s',
          done,
          total,
          last['loss'],
          last['samples_per_s'],
          step_cost.format_rate(last),
          progress.eta(done),
        )
      if config.eval.every_steps and common.itstime(done, config.eval.every_steps, total):
        evaluator = evaluator or recipe.evaluator()
        val_metrics = evaluator.run(recipe.eval_variables(state))
        writer.write_scalars(done, val_metrics)
        logging.info(
          'step %d  zero-shot top-1 %.4f on %d %s shapes',
          done,
          val_metrics['val/top1'],
          val_metrics['val/count'],
          config.eval.split,
        )
      if ckpt.should_save(done) or done == total:
        ckpt.save(
          done,
          state,
          data_step=done,
          rng=state['rng'],
          config=config,
          metrics=val_metrics if val_metrics else None,
          force=done == total,
        )
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
      '(config.data.skip_bad), lower the learning rates, or use float32 (config.model.dtype, config.clip.dtype).'
    )
