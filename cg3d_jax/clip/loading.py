"""The frozen CLIP from a local path: a transformers CLIP folder (weights.hf_clip) or a SLIP checkpoint file
(weights.slip), told apart by what the path is. Nothing is downloaded."""

import os
import pathlib

import jax.numpy as jnp

from cg3d_jax.clip import hf_clip, slip
from cg3d_jax.clip.loaded_clip import LoadedCLIP


def is_slip_path(path) -> bool:
  return pathlib.Path(os.path.expanduser(str(path))).is_file()


def load_clip(
  path,
  *,
  prompt_mode: str = 'deep',
  num_prompts: int = 5,
  dtype=jnp.float32,
  remat='none',
  attention: str = 'auto',
  scan_layers: bool = True,
  seed: int = 0,
) -> LoadedCLIP:
  """A transformers CLIP folder or a SLIP `.pt` file; prompts (if any) freshly initialised from `seed`."""
  kwargs = dict(
    prompt_mode=prompt_mode,
    num_prompts=num_prompts,
    dtype=dtype,
    remat=remat,
    attention=attention,
    scan_layers=scan_layers,
    seed=seed,
  )
  if is_slip_path(path):
    return slip.load_slip(pathlib.Path(os.path.expanduser(str(path))), **kwargs)
  return hf_clip.load_transformers_clip(path, **kwargs)
