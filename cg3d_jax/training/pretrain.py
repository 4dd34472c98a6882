"""The pretraining loop, one for every recipe (training/recipes/: the data source names the recipe its data calls
for): set up model, data, shardings and checkpoints from a config, then train and validate.

`train(config, workdir)` is what `python -m cg3d_jax.train` runs. It resumes from the newest checkpoint in
`<workdir>/checkpoints` when there is one (step, optimizer state, RNG and data position), so a preempted job is
restarted with the same command.
"""

import jax
from absl import logging

from cg3d_jax import step_cost
from cg3d_jax.checkpoints import Checkpointer
from cg3d_jax.training import common, config_checks, optim
from cg3d_jax.training.recipes import recipe as recipes


class NonFiniteError(RuntimeError):
  pass


def train(config, workdir: str) -> dict:
  """Train (or resume) in `workdir`; returns the last validation metrics (and the final training metrics)."""
  config_checks.check(config, device_count=jax.device_count())
  recipe = recipes.from_config(config)
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
  profiler = step_cost.Profiler(config.logging.profile_steps, workdir)
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
