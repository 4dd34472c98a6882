"""Reading a finished (or running) pretraining checkpoint for evaluation, export and fine-tuning.

A training checkpoint holds the trainable state only (point encoder, BatchNorm statistics, prompts, optimizer
state) plus the config it was trained with; frozen CLIP is reloaded from `config.clip.path` by whoever needs it.
Here the state is read onto one device from its own metadata, so no mesh or model has to be rebuilt first and a
checkpoint written on any mesh opens on a laptop.
"""

import dataclasses
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cg3d_jax.models.cg3d import build_encoder


class CheckpointNotFoundError(FileNotFoundError):
  pass


@dataclasses.dataclass
class TrainedModel:
  config: ml_collections.ConfigDict  # the config the run was trained with
  step: int
  encoder: nn.Module
  encoder_vars: dict  # {'params': ..., 'batch_stats': ...}, jax arrays on one device
  prompts: np.ndarray | None  # (num_layers or 1, num_tokens, width) visual prompts, None without prompts
  path: pathlib.Path  # the step folder that was read
  metrics: dict | None = None  # validation metrics saved with the step, when there were any


def find_step_dir(path, step: int | None = None) -> pathlib.Path:
  """A training workdir, its checkpoints/ folder, or one step folder -> the step folder (newest if not given)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointNotFoundError(f'checkpoint path {path} does not exist')
  if (path / 'state').is_dir():
    return path
  root = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / 'state').is_dir())
  if not steps:
    raise CheckpointNotFoundError(f'no checkpoint under {root}: expected step folders such as {root}/1000/state '
                                  '(a training workdir, its checkpoints/ folder or one step folder)')
  if step is None:
    return root / str(steps[-1])
  if step not in steps:
    raise CheckpointNotFoundError(f'no checkpoint for step {step} under {root}; available: {steps}')
  return root / str(step)


def read_state(step_dir: pathlib.Path, device=None) -> dict:
  """The saved train state, every leaf on `device` (default: the first local device)."""
  sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(str(step_dir / 'state')).item_metadata
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), dict(meta))
  return checkpointer.restore(str(step_dir / 'state'), target)


def _read_json(path: pathlib.Path):
  # orbax writes a JsonSave item as <item>/metadata
  for candidate in (path / 'metadata', path / path.name, path):
    if candidate.is_file():
      return json.loads(candidate.read_text())
  return None


def load_trained(path, step: int | None = None) -> TrainedModel:
  """Everything a downstream command needs from a pretraining checkpoint."""
  step_dir = find_step_dir(path, step)
  raw_config = _read_json(step_dir / 'config')
  if raw_config is None:
    raise CheckpointNotFoundError(f'{step_dir} has no config item: not a cg3d-jax training checkpoint')
  config = ml_collections.ConfigDict(raw_config)
  state = read_state(step_dir)
  encoder = build_encoder(config.model)
  prompts = state['params'].get('clip', {}).get('prompts', {}).get('tokens')
  return TrainedModel(
      config=config, step=int(state['step']), encoder=encoder,
      encoder_vars={'params': state['params']['encoder'], 'batch_stats': state['batch_stats']},
      prompts=None if prompts is None else np.asarray(prompts), path=step_dir,
      metrics=_read_json(step_dir / 'metrics'))


def encoder_only(trained: TrainedModel) -> dict[str, Any]:
  """The encoder variables as NumPy, e.g. for conversion to PyTorch."""
  return jax.tree.map(np.asarray, trained.encoder_vars)
