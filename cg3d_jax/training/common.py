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
from cg3d_jax.checkpoints import CHECKPOINTS_DIR, Checkpointer
from cg3d_jax.errors import ConfigError
from cg3d_jax.metric_writer import MetricsWriter


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  return sharding.make_mesh({'data': config.mesh.data, 'fsdp': config.mesh.fsdp}, devices)


def check_batch_sizes(config, mesh: jax.sharding.Mesh, names=('train', 'eval')) -> None:
  """Batches split their leading dimension over every device of the mesh."""
  for name in names:
    size = config[name].batch_size
    if size < 1 or size % mesh.size:
      raise ConfigError(f'config.{name}.batch_size={size} must be a positive multiple of the {mesh.size} devices '
                        f'of the mesh, e.g. --config.{name}.batch_size={mesh.size * max(1, size // mesh.size)}')


def total_steps(config, steps_per_epoch: int) -> int:
  """config.train.total_steps when set, else epochs x steps per epoch."""
  return int(config.train.total_steps) if config.train.total_steps else int(config.train.epochs * steps_per_epoch)


def place_state(state: dict, mesh: jax.sharding.Mesh, config) -> tuple[dict, Any]:
  """The train state on its shardings (sharding.state_shardings), and those shardings."""
  shardings = sharding.state_shardings(jax.eval_shape(lambda s: s, state), mesh,
                                       min_fsdp_size=config.mesh.min_fsdp_size)
  return jax.device_put(state, shardings), shardings


def make_checkpointer(config, workdir: str, best_metric: str = 'val/top1') -> Checkpointer:
  c = config.checkpoint
  return Checkpointer(f'{workdir}/{CHECKPOINTS_DIR}', keep=c.keep, keep_best=c.keep_best, best_metric=best_metric,
                      async_save=c.async_save, every_steps=c.every_steps)


def restore_or_start(ckpt: Checkpointer, state: dict, shardings) -> tuple[dict, dict | None]:
  """The newest checkpoint's state, read onto `shardings` (and its extras), or the fresh `state` and None."""
  if ckpt.latest_step() is None:
    return state, None
  target = sharding.with_shardings(jax.eval_shape(lambda s: s, state), shardings)
  restored, extras = ckpt.restore(target_state_shapes_with_shardings=target)
  logging.info('resumed from step %d (data step %d)', extras['step'], extras['data_step'])
  return restored, extras


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

  def eta(self, done: int) -> str:
    seconds = int((self.total - done) * (time.time() - self.started) / max(done - self.start_step, 1))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def metrics_writer(config, workdir: str, name: str) -> MetricsWriter:
  return MetricsWriter(workdir, name, tensorboard=config.logging.tensorboard, jsonl=config.logging.jsonl)
