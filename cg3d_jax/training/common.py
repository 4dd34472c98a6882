"""What the two training loops (pretrain.py, finetune.py) share: the mesh and step counts from a config, the train
state placed on its shardings, the checkpointer and restore-or-start, and when to log, evaluate and save.

Each loop keeps its own step and its own body, as big_vision keeps one trainer per recipe: a pretraining step and a
fine-tuning step share almost nothing, while this setup is the same line for line.
"""

import dataclasses
import time
from typing import Any

import jax
from absl import logging

from cg3d_jax import sharding
from cg3d_jax.checkpoints import CHECKPOINTS_DIR, CheckpointDamagedError, Checkpointer
from cg3d_jax.errors import ConfigError
from cg3d_jax.metric_writer import MetricsWriter


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  return sharding.make_mesh({'data': config.mesh.data, 'fsdp': config.mesh.fsdp}, devices)


def check_batch_sizes(config, mesh: jax.sharding.Mesh, names=('train', 'eval')) -> None:
  """Batches split their leading dimension over every device of the mesh."""
  for name in names:
    size = config[name].batch_size
    if size < 1 or size % mesh.size:
      raise ConfigError(
        f'config.{name}.batch_size={size} must be a positive multiple of the {mesh.size} devices '
        f'of the mesh, e.g. --config.{name}.batch_size={mesh.size * max(1, size // mesh.size)}'
      )


def total_steps(config, steps_per_epoch: int) -> int:
  """config.train.total_steps when set, else epochs x steps per epoch (epochs + 1 under train.lr_schedule
  'original': the original runner loops over range(start_epoch, max_epoch + 1))."""
  if config.train.total_steps:
    return int(config.train.total_steps)
  extra = 1 if config.train.lr_schedule == 'original' else 0
  return int((config.train.epochs + extra) * steps_per_epoch)


def place_state(state: dict, mesh: jax.sharding.Mesh, config) -> tuple[dict, Any]:
  """The train state on its shardings (sharding.state_shardings), and those shardings."""
  shardings = sharding.state_shardings(
    jax.eval_shape(lambda s: s, state), mesh, min_fsdp_size=config.mesh.min_fsdp_size
  )
  return jax.device_put(state, shardings), shardings


def make_checkpointer(config, workdir: str, best_metric: str = 'val/top1') -> Checkpointer:
  c = config.checkpoint
  return Checkpointer(
    f'{workdir}/{CHECKPOINTS_DIR}',
    keep=c.keep,
    keep_best=c.keep_best,
    best_metric=best_metric,
    async_save=c.async_save,
    every_steps=c.every_steps,
  )


# Settings that fix the shapes of the saved state: a resume under other values cannot restore it. Regularisation and
# compute settings may change between runs.
_SHAPE_SETTINGS = ('model', 'clip.prompt')
_FREE_SETTINGS = ('drop_path_rate', 'head_dropout', 'dtype', 'remat', 'attention', 'scan_layers')


def _changed_settings(saved, config) -> list[str]:
  out = []
  for group in _SHAPE_SETTINGS:
    old, new = _get(saved, group), _get(config, group)
    if old is None or new is None:
      continue
    flat_old, flat_new = _flat(old, group), _flat(new, group)
    out += [
      f'{k}: saved {flat_old.get(k)!r}, now {flat_new.get(k)!r}'
      for k in sorted(set(flat_old) | set(flat_new))
      if flat_old.get(k) != flat_new.get(k) and k.rsplit('.', 1)[-1] not in _FREE_SETTINGS
    ]
  return out


def _get(config, dotted: str):
  for part in dotted.split('.'):
    if not hasattr(config, 'get') or part not in config:
      return None
    config = config[part]
  return config


def _flat(value, prefix: str) -> dict:
  if hasattr(value, 'items'):
    return {k: v for key, sub in value.items() for k, v in _flat(sub, f'{prefix}.{key}').items()}
  return {prefix: list(value) if isinstance(value, tuple) else value}


def restore_or_start(ckpt: Checkpointer, state: dict, shardings, config=None) -> tuple[dict, dict | None]:
  """The newest intact checkpoint's state, read onto `shardings` (and its extras), or the fresh `state` and None.

  With `config`, the settings that fix the state's shapes must equal the saved ones (else a ConfigError naming them).
  A damaged newest step falls back to the next older intact one, with a warning naming the damage.
  """
  steps = ckpt.all_steps()
  if not steps:
    return state, None
  saved = ckpt.saved_config(steps[-1]) if config is not None else None
  changed = _changed_settings(saved, config) if saved is not None else []
  if changed:
    raise ConfigError(
      f'{ckpt.directory} holds a run with other model settings than this command: '
      f'{"; ".join(changed[:6])}{" ..." if len(changed) > 6 else ""}. Resume it with its own '
      'settings, or start a new --workdir'
    )
  target = sharding.with_shardings(jax.eval_shape(lambda s: s, state), shardings)
  for step in reversed(steps):
    try:
      restored, extras = ckpt.restore(step, target_state_shapes_with_shardings=target)
    except CheckpointDamagedError as err:
      if step == steps[0]:
        raise
      logging.warning('%s -- falling back to the next older step', err)
      continue
    if step != steps[-1]:
      moved = [str(ckpt.set_aside(s)) for s in steps if s > step]
      logging.warning(
        'RESUMING FROM STEP %d, NOT THE NEWEST SAVED STEP %d, WHICH IS DAMAGED: steps %d..%d run again; '
        'the damaged step folders are kept as %s',
        step,
        steps[-1],
        step + 1,
        steps[-1],
        ', '.join(moved),
      )
    logging.info('resumed from step %d (data step %d)', extras['step'], extras['data_step'])
    return restored, extras
  raise AssertionError('unreachable')


def itstime(step: int, every: int, total: int) -> bool:
  """Every `every` steps (never when 0) and at the last step, as big_vision's utils.itstime."""
  return bool(every and step % every == 0) or step == total


@dataclasses.dataclass
class Progress:
  """Throughput and ETA for the log line (samples/s over the steps this process ran, not the resumed ones)."""

  start_step: int
  total: int
  batch_size: int
  started: float = dataclasses.field(default_factory=time.time)

  def samples_per_s(self, done: int) -> float:
    return (done - self.start_step) * self.batch_size / max(time.time() - self.started, 1e-9)

  def recent_samples_per_s(self, done: int) -> float:
    """Samples/s since the previous call (the first call: since the start, compilation included): the rate that
    TFLOP/s and MFU are computed from, so that they describe the steps, not the start-up."""
    now = time.time()
    step, then = getattr(self, '_previous', (self.start_step, self.started))
    self._previous = (done, now)
    return (done - step) * self.batch_size / max(now - then, 1e-9)

  def eta(self, done: int) -> str:
    seconds = int((self.total - done) * (time.time() - self.started) / max(done - self.start_step, 1))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def metrics_writer(config, workdir: str, name: str, resume_step: int | None = None) -> MetricsWriter:
  return MetricsWriter(
    workdir, name, tensorboard=config.logging.tensorboard, jsonl=config.logging.jsonl, resume_step=resume_step
  )
