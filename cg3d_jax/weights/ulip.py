"""ULIP's and ULIP-2's released Point-BERT encoders (salesforce/ULIP) <-> cg3d-jax's PointTransformer.

A released file is ULIP's training checkpoint: `{'epoch', 'state_dict', 'optimizer', 'scaler', 'best_acc1', 'args'}`
(main.py), `state_dict` keys `module.`-prefixed, `args` an `argparse.Namespace` (the one class the safe load
allows). Its point side is `point_encoder.*` (models/pointbert/point_encoder.py: CG3D's PointTransformer blocks, no
projection, no head; PointTransformer_Colored takes xyz + rgb) and `pc_projection` [2 x width, embed_dim], a plain
matrix (`encode_pc`: pooled feature @ pc_projection). ULIP-1's files also hold the SLIP ViT-B/16 towers it aligns to
(`visual.*`, `transformer.*`, ...: clip/slip.py reads them from the same file); ULIP-2 aligns to OpenCLIP
ViT-bigG-14 (1280), whose towers a released point-encoder file does not need to hold.

What the weights do not record comes from ULIP's configs (models/pointbert/*.yaml): 6 heads at width 384 (64 per
head), 512 groups of 32 points; 8,192 xyz points (ULIP-1, PointTransformer_8192point.yaml) or 10,000 xyz + rgb points
(ULIP-2, ULIP_2_PointBERT_10k_colored_pointclouds.yaml).
"""

import argparse
import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cg3d_jax.atomic import atomic_write
from cg3d_jax.models.point_transformer import PointTransformer
from cg3d_jax.trees import stack_layers, unstack_layers
from cg3d_jax.weights import torch_io
from cg3d_jax.weights.cg3d_pth import CheckpointFormatError, strip_module_prefix

PREFIX = 'point_encoder.'
PROJECTION = 'pc_projection'
HEAD_WIDTH = 64  # ULIP's Point-BERT: 384 wide, 6 heads
NUM_GROUPS, GROUP_SIZE = 512, 32


@dataclasses.dataclass(frozen=True)
class Release:
  """What a ULIP generation's files imply beyond their tensors."""

  name: str
  num_points: int
  clip: str  # the CLIP its point features align to


# By the joint space the projection maps into: SLIP ViT-B/16's 512 (ULIP-1) or OpenCLIP ViT-bigG-14's 1280 (ULIP-2).
RELEASES = {
  512: Release('ULIP (Point-BERT)', 8192, 'SLIP ViT-B/16 (its towers are in the same file)'),
  1280: Release('ULIP-2 (Point-BERT)', 10000, 'OpenCLIP ViT-bigG-14'),
}


def is_ulip_state_dict(names) -> bool:
  """Whether a (prefix-stripped) state dict, or its keys, is ULIP's: a point encoder and its pc_projection."""
  return PROJECTION in names and f'{PREFIX}cls_token' in names


def entries(depth: int, *, in_projection: bool = True) -> list[torch_io.Entry]:
  """ULIP's point-side names, in its state dict's order: pc_projection, stored as the Flax kernel is ([in, out], no
  transpose), then CG3D's PointTransformer map under `point_encoder.` without its Linear projection and head."""
  cg3d = torch_io.point_transformer_entries(depth, with_head=False)
  out = [
    dataclasses.replace(e, torch_key=PREFIX + e.torch_key) for e in cg3d if not e.flax_path.startswith('projection/')
  ]
  # pc_projection first: a module's own parameters come before its submodules' in a PyTorch state dict.
  return (torch_io.tensor(PROJECTION, 'projection/kernel') if in_projection else []) + out


def encoder_kwargs(path, state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The PointTransformer a ULIP state dict sizes (what the weights do not record: ULIP's configs)."""
  inner = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
  inner['projection.weight'] = np.empty(tuple(reversed(state_dict[PROJECTION].shape)))  # sizes embed_dim
  try:
    kwargs = torch_io.point_transformer_kwargs_from_torch(inner)
  except (ValueError, KeyError, IndexError) as err:
    raise CheckpointFormatError(path, f'the ULIP point encoder is not usable: {err}') from None
  if kwargs['width'] % HEAD_WIDTH:
    raise CheckpointFormatError(
      path, f'point_encoder is {kwargs["width"]} wide, not a multiple of the {HEAD_WIDTH} channels of a ULIP head'
    )
  return dict(
    kwargs,
    num_heads=kwargs['width'] // HEAD_WIDTH,
    num_groups=NUM_GROUPS,
    group_size=GROUP_SIZE,
    projection_bias=False,
    num_classes=None,
  )


def release_of(model: PointTransformer) -> Release | None:
  return RELEASES.get(model.embed_dim)


def from_torch(path, state_dict: Mapping[str, Any], model: PointTransformer | None = None):
  """A prefix-stripped ULIP state dict -> (model, params (blocks stacked), batch_stats, ignored keys). Keys outside
  the point side (the CLIP towers, logit_scale) are returned as ignored; a missing, unexpected or mis-shaped point
  key is an error naming it."""
  import jax

  if model is None:
    model = PointTransformer(**encoder_kwargs(path, state_dict))
  if model.projection_bias:
    raise CheckpointFormatError(path, "ULIP's pc_projection has no bias: the encoder must have projection_bias=False")
  point_side = {k: v for k, v in state_dict.items() if k.startswith(PREFIX) or k == PROJECTION}
  dummy = jax.ShapeDtypeStruct((1, max(model.group_size, model.num_groups), model.in_channels), np.float32)
  template = jax.eval_shape(lambda p: unstack_layers(model.init(jax.random.key(0), p, train=False)), dummy)
  try:
    variables = torch_io.torch_to_flax(point_side, entries(model.depth), template)
  except ValueError as err:
    raise CheckpointFormatError(
      path, f'the ULIP point encoder does not fit a {model.depth}-block encoder: {err}'
    ) from None
  ignored = sorted(set(state_dict) - set(point_side))
  return model, stack_layers(variables[torch_io.PARAMS]), variables.get(torch_io.BATCH_STATS, {}), ignored


def to_torch(params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, num_batches_tracked: int = 0):
  """Flax PointTransformer variables (projection without bias) -> ULIP's point-side state dict (strict-loadable by
  twins.point_transformer.ULIPPointBERT, and by ULIP's own model with strict=False beside its CLIP towers)."""
  params = unstack_layers(params)
  if 'bias' in params.get('projection', {}):
    raise ValueError("the encoder's projection has a bias; ULIP's pc_projection is a plain matrix")
  depth = len([k for k in params if k.startswith('blocks_')])
  variables = {torch_io.PARAMS: params, torch_io.BATCH_STATS: batch_stats}
  return torch_io.flax_to_torch(variables, entries(depth), num_batches_tracked=num_batches_tracked)


def is_ulip_container(loaded) -> bool:
  """Whether what load_file read is a ULIP checkpoint (its `state_dict` holds ULIP's point side)."""
  state = loaded.get('state_dict') if isinstance(loaded, Mapping) else None
  if not isinstance(state, Mapping):
    return False
  names = {k[len('module.') :] if k.startswith('module.') else k for k in state}
  return is_ulip_state_dict(names)


def point_state(path, loaded) -> dict[str, Any]:
  """A loaded ULIP checkpoint -> its prefix-stripped state dict (tensors only)."""
  state = loaded['state_dict']
  bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise CheckpointFormatError(path, f'state_dict[{bad[0]!r}] is a {type(state[bad[0]]).__name__}, not a tensor')
  return strip_module_prefix(path, state)


def write_checkpoint(path, params, batch_stats, *, epoch: int = 0, num_batches_tracked: int = 0) -> pathlib.Path:
  """The encoder as ULIP's main.py saves a checkpoint: {'epoch', 'state_dict' (point side, `module.` keys, as from
  DistributedDataParallel), 'args' (the model name ULIP's test_zeroshot_3d builds from)}; atomically. ULIP's own
  model loads its state_dict with strict=False beside the CLIP towers it builds."""
  state = to_torch(params, batch_stats, num_batches_tracked=num_batches_tracked)
  coloured = state['point_encoder.encoder.first_conv.0.weight'].shape[1] == 6
  container = {
    'epoch': int(epoch),
    'state_dict': {f'module.{k}': v for k, v in state.items()},
    'args': argparse.Namespace(model='ULIP2_PointBERT_Colored' if coloured else 'ULIP_PointBERT'),
  }
  path = pathlib.Path(path)
  atomic_write(path, lambda f: torch.save(container, f))
  return path
