"""PointMLP parameters: Flax (params, batch_stats) <-> the original CG3D PyTorch `ModelProject` state dict.

The name map, module by module (conversion and checking are weights/torch_io.py's generic machinery):

  Flax (channels-last, 1x1 convs are Dense)        PyTorch (CG3D models/PointMLP.py)
  embedding/{conv,bn}                              embedding.net.{0,1}
  local_grouper_i/affine_{alpha,beta}              local_grouper_list.i.affine_{alpha,beta}   (1, 1, 1, C) both
  pre_blocks_i/transfer/{conv,bn}                  pre_blocks_list.i.transfer.net.{0,1}
  {pre,pos}_blocks_i/block_j/{conv1,bn1,conv2,bn2} {pre,pos}_blocks_list.i.operation.j.{net1.0,net1.1,net2.0,net2.1}
  projection                                       projection (Conv1d 1x1 with bias)
"""

import functools
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cg3d_jax.models.pointmlp import PointMLP
from cg3d_jax.trees import flatten
from cg3d_jax.weights.torch_io import (
  BATCH_STATS,
  PARAMS,
  Entry,
  batch_norm,
  conv1x1,
  flax_to_torch,
  tensor,
  torch_to_flax,
)


def _conv_bn(
  torch_prefix: str, flax_prefix: str, conv: str = 'conv', bn: str = 'bn', torch_conv: str = '0', torch_bn: str = '1'
) -> list[Entry]:
  return conv1x1(f'{torch_prefix}.{torch_conv}', f'{flax_prefix}/{conv}', bias=False) + batch_norm(
    f'{torch_prefix}.{torch_bn}', f'{flax_prefix}/{bn}'
  )


def _residual_block(torch_prefix: str, flax_prefix: str) -> list[Entry]:
  return _conv_bn(f'{torch_prefix}.net1', flax_prefix, 'conv1', 'bn1') + _conv_bn(
    f'{torch_prefix}.net2', flax_prefix, 'conv2', 'bn2'
  )


def pointmlp_entries(pre_blocks: Iterable[int], pos_blocks: Iterable[int]) -> list[Entry]:
  """The name map for a PointMLP with these per-stage block counts, in the original state dict's key order."""
  pre_blocks, pos_blocks = tuple(pre_blocks), tuple(pos_blocks)
  entries = _conv_bn('embedding.net', 'embedding')
  for i in range(len(pre_blocks)):
    for name in ('affine_alpha', 'affine_beta'):
      entries += tensor(f'local_grouper_list.{i}.{name}', f'local_grouper_{i}/{name}')
  for i, blocks in enumerate(pre_blocks):
    entries += _conv_bn(f'pre_blocks_list.{i}.transfer.net', f'pre_blocks_{i}/transfer')
    for j in range(blocks):
      entries += _residual_block(f'pre_blocks_list.{i}.operation.{j}', f'pre_blocks_{i}/block_{j}')
  for i, blocks in enumerate(pos_blocks):
    for j in range(blocks):
      entries += _residual_block(f'pos_blocks_list.{i}.operation.{j}', f'pos_blocks_{i}/block_{j}')
  return entries + conv1x1('projection', 'projection')


def _numbered(names: Iterable[str], pattern: str, what: str) -> int:
  found = {int(m.group(1)) for n in names if (m := re.fullmatch(pattern, n))}
  if found != set(range(len(found))):
    raise ValueError(f'PointMLP {what} numbers are not contiguous from 0: {sorted(found)}')
  return len(found)


def _block_counts_from_params(params: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  stages = _numbered(params, r'local_grouper_(\d+)', 'stage')
  pre = tuple(
    _numbered(params.get(f'pre_blocks_{i}', {}), r'block_(\d+)', f'pre_blocks_{i} block') for i in range(stages)
  )
  pos = tuple(
    _numbered(params.get(f'pos_blocks_{i}', {}), r'block_(\d+)', f'pos_blocks_{i} block') for i in range(stages)
  )
  return pre, pos


def pointmlp_kwargs_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The shape-determining PointMLP settings read off a state dict.

  k_neighbors and reducers leave no trace in the parameters; they get CG3D's values (24 and 2 in every stage).
  """
  for key in ('embedding.net.0.weight', 'projection.weight', 'local_grouper_list.0.affine_alpha'):
    if key not in state_dict:
      raise ValueError(f'not a PointMLP ModelProject state dict: key {key!r} is missing')
  stages = _numbered({k.split('.')[1] for k in state_dict if k.startswith('local_grouper_list.')}, r'(\d+)', 'stage')
  embed_dim = int(state_dict['embedding.net.0.weight'].shape[0])
  widths = [embed_dim]
  for i in range(stages):
    key = f'pre_blocks_list.{i}.transfer.net.0.weight'
    if key not in state_dict:
      raise ValueError(f'not a PointMLP ModelProject state dict: key {key!r} is missing')
    widths.append(int(state_dict[key].shape[0]))
  if any(b % a for a, b in zip(widths, widths[1:])):
    raise ValueError(f'PointMLP stage widths {widths} are not integer multiples of each other')

  def blocks(kind: str, i: int) -> int:
    prefix = f'{kind}_blocks_list.{i}.operation.'
    return _numbered(
      {k[len(prefix) :].split('.')[0] for k in state_dict if k.startswith(prefix)},
      r'(\d+)',
      f'{kind}_blocks_list.{i} block',
    )

  first_block = 'pre_blocks_list.0.operation.0.net1.0.weight'
  res_expansion = state_dict[first_block].shape[0] / widths[1] if first_block in state_dict else 1.0
  return dict(
    embed_dim=embed_dim,
    res_expansion=float(res_expansion),
    dim_expansion=tuple(b // a for a, b in zip(widths, widths[1:])),
    pre_blocks=tuple(blocks('pre', i) for i in range(stages)),
    pos_blocks=tuple(blocks('pos', i) for i in range(stages)),
    k_neighbors=(24,) * stages,
    reducers=(2,) * stages,
    projection_dim=int(state_dict['projection.weight'].shape[0]),
    in_channels=int(state_dict['embedding.net.0.weight'].shape[1]),
  )


def _numpy_dtype(value) -> np.dtype:
  if hasattr(value, 'detach'):  # a torch tensor; torch is not imported here for one dtype lookup
    return value.detach()[()].numpy().dtype if value.dim() == 0 else value.detach().reshape(-1)[:1].numpy().dtype
  return np.asarray(value).dtype


@functools.lru_cache(maxsize=16)
def expected_variables(model: PointMLP) -> dict:
  """Shapes of `model`'s Flax variables ({'params', 'batch_stats'} of ShapeDtypeStructs). Cached; read-only."""
  num_points = int(np.prod(model.reducers)) * max(model.k_neighbors)  # enough points for every stage
  points = jax.ShapeDtypeStruct((1, num_points, model.in_channels), jnp.float32)
  return jax.eval_shape(lambda p: model.init(jax.random.key(0), p, train=False), points)


def expected_torch_shapes(model: PointMLP | None = None) -> dict[str, tuple[int, ...]]:
  """PyTorch state-dict key -> shape for `model` (default: CG3D's PointMLP), in the original key order."""
  model = model or PointMLP()
  flat = {c: flatten(v) for c, v in expected_variables(model).items()}
  shapes = {}
  for e in pointmlp_entries(model.pre_blocks, model.pos_blocks):
    if e.kind == 'num_batches_tracked':
      shapes[e.torch_key] = ()
    else:
      shape = flat[e.collection][e.flax_path].shape
      shapes[e.torch_key] = (shape[1], shape[0], 1) if e.kind == 'conv1x1' else tuple(shape)
  return shapes


def pointmlp_to_torch(params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, num_batches_tracked: int = 0):
  """Flax PointMLP variables -> PyTorch state dict (float32 tensors) that CG3D's `ModelProject` loads strictly.

  Flax keeps no BatchNorm step counter; `num_batches_tracked` (unused by PyTorch when momentum is set) is written
  as the given value.
  """
  entries = pointmlp_entries(*_block_counts_from_params(params))
  return flax_to_torch({PARAMS: params, BATCH_STATS: batch_stats}, entries, num_batches_tracked=num_batches_tracked)


def pointmlp_from_torch(state_dict: Mapping[str, Any], model: PointMLP | None = None) -> tuple[dict, dict]:
  """CG3D `ModelProject` state dict (torch tensors or arrays) -> float32 Flax (params, batch_stats).

  Every key and shape is checked against `model`; without one, against a PointMLP with the sizes read off the
  state dict (so only internal inconsistencies are caught). A DataParallel `module.` prefix is refused: strip it.
  """
  model = model or PointMLP(**pointmlp_kwargs_from_torch(state_dict))
  entries = pointmlp_entries(model.pre_blocks, model.pos_blocks)
  for e in entries:
    value = state_dict.get(e.torch_key)
    if e.collection and value is not None and not np.issubdtype(_numpy_dtype(value), np.floating):
      raise ValueError(f'state dict entry {e.torch_key} has dtype {_numpy_dtype(value)}; expected floating point')
  variables = torch_to_flax(state_dict, entries, expected_variables(model))
  return variables[PARAMS], variables[BATCH_STATS]
