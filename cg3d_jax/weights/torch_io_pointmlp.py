"""PointMLP parameters: Flax (params, batch_stats) <-> the original CG3D PyTorch `ModelProject` state dict.

The two trees are in one-to-one correspondence, module by module:

  Flax (channels-last, 1x1 convs are Dense)        PyTorch (CG3D models/PointMLP.py)
  embedding/{conv,bn}                              embedding.net.{0,1}
  local_grouper_i/affine_{alpha,beta} (C,)         local_grouper_list.i.affine_{alpha,beta} (1, 1, 1, C)
  pre_blocks_i/transfer/{conv,bn}                  pre_blocks_list.i.transfer.net.{0,1}
  {pre,pos}_blocks_i/block_j/{conv1,bn1,conv2,bn2} {pre,pos}_blocks_list.i.operation.j.{net1.0,net1.1,net2.0,net2.1}
  projection                                       projection
  conv kernel (in, out)                            weight (out, in, 1)
  bn scale, bias / batch_stats mean, var           weight, bias / running_mean, running_var (+ num_batches_tracked)

Both directions check every key and shape against the model's expected layout and fail with the list of missing,
unexpected and mis-shaped entries.
"""

import collections
import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cg3d_jax.models.pointmlp import PointMLP, stage_point_counts

# (Flax module path regex, PyTorch module path template); module paths are '/'-joined Flax names.
_MODULE_RULES = [
    (r'embedding/(conv|bn)', 'embedding.net.{layer}'),
    (r'local_grouper_(\d+)', 'local_grouper_list.{0}'),
    (r'pre_blocks_(\d+)/transfer/(conv|bn)', 'pre_blocks_list.{0}.transfer.net.{layer}'),
    (r'(pre|pos)_blocks_(\d+)/block_(\d+)/(conv|bn)([12])', '{0}_blocks_list.{1}.operation.{2}.net{4}.{layer}'),
    (r'projection', 'projection'),
]
_LAYER_INDEX = {'conv': '0', 'bn': '1'}
# Flax leaf name -> PyTorch leaf name, per kind of module.
_CONV_LEAVES = {'kernel': 'weight', 'bias': 'bias'}
_BN_PARAM_LEAVES = {'scale': 'weight', 'bias': 'bias'}
_BN_STAT_LEAVES = {'mean': 'running_mean', 'var': 'running_var'}


def _torch_module(flax_module: str) -> tuple[str, str]:
  """Flax module path -> (PyTorch module path, kind in {'conv', 'bn', 'grouper'})."""
  for pattern, template in _MODULE_RULES:
    m = re.fullmatch(pattern, flax_module)
    if m:
      groups = m.groups()
      kind = next((g for g in groups if g in _LAYER_INDEX), 'grouper' if 'grouper' in flax_module else 'conv')
      return template.format(*groups, layer=_LAYER_INDEX.get(kind, '')), kind
  raise KeyError(f'no PyTorch name for the Flax PointMLP module {flax_module!r}')


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = leaf
  return out


def _to_torch_array(kind: str, leaf_name: str, value: np.ndarray) -> np.ndarray:
  if kind == 'conv' and leaf_name == 'kernel':
    return np.ascontiguousarray(value.T[:, :, None])
  if kind == 'grouper':
    return value.reshape(1, 1, 1, -1)
  return value


def _from_torch_array(kind: str, leaf_name: str, value: np.ndarray) -> np.ndarray:
  if kind == 'conv' and leaf_name == 'kernel':
    return np.ascontiguousarray(value[:, :, 0].T)
  if kind == 'grouper':
    return value.reshape(-1)
  return value


def _correspondence(params, batch_stats) -> list[tuple[str, str, tuple[str, ...]]]:
  """(torch key, Flax collection, Flax path) for every state-dict entry except num_batches_tracked, in Flax order."""
  entries = []
  for collection, tree in (('params', params), ('batch_stats', batch_stats)):
    for path in _flat(tree):
      torch_module, kind = _torch_module('/'.join(path[:-1]))
      leaf = path[-1]
      if kind == 'grouper':
        torch_leaf = leaf
      elif kind == 'conv':
        torch_leaf = _CONV_LEAVES[leaf]
      else:
        torch_leaf = (_BN_PARAM_LEAVES if collection == 'params' else _BN_STAT_LEAVES)[leaf]
      entries.append((f'{torch_module}.{torch_leaf}', collection, path))
  return entries


def _bn_modules(entries) -> list[str]:
  return sorted({key.rsplit('.', 1)[0] for key, collection, _ in entries if collection == 'batch_stats'})


@functools.lru_cache(maxsize=16)
def expected_variables(model: PointMLP) -> dict:
  """Shapes of the Flax variables ({'params': ..., 'batch_stats': ...} of ShapeDtypeStructs) for `model`.

  Cached: tracing the model (its sampling loops included) takes a second or two. Treat the result as read-only.
  """
  counts_ok = int(np.prod(model.reducers)) * max(model.k_neighbors)
  assert stage_point_counts(counts_ok, model.reducers)[-1] >= 1
  points = jax.ShapeDtypeStruct((2, counts_ok, 3), jnp.float32)
  return jax.eval_shape(lambda p: model.init(jax.random.key(0), p, train=False), points)


def expected_torch_shapes(model: PointMLP | None = None) -> dict[str, tuple[int, ...]]:
  """PyTorch state-dict key -> shape for `model` (default: CG3D's PointMLP), in the twin's key order."""
  variables = expected_variables(model or PointMLP())
  shapes = {}
  for key, collection, path in _correspondence(variables['params'], variables['batch_stats']):
    leaf = _flat(variables[collection])[path]
    kind = _torch_module('/'.join(path[:-1]))[1]
    shapes[key] = _to_torch_array(kind, path[-1], np.zeros(leaf.shape, np.float32)).shape
  for bn in _bn_modules(_correspondence(variables['params'], variables['batch_stats'])):
    shapes[f'{bn}.num_batches_tracked'] = ()
  return {k: shapes[k] for k in _twin_key_order(shapes)}


def _check_against(found: Mapping[str, tuple], expected: Mapping[str, tuple], what: str) -> None:
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  misshaped = sorted(f'{k}: got {tuple(found[k])}, expected {tuple(expected[k])}'
                     for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
  if missing or unexpected or misshaped:
    lines = [f'{what} does not match the PointMLP layout:']
    for title, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', misshaped)):
      if items:
        lines.append(f'  {title} ({len(items)}): ' + ', '.join(items[:20]) + (' ...' if len(items) > 20 else ''))
    raise ValueError('\n'.join(lines))


def pointmlp_to_torch(params, batch_stats, *, num_batches_tracked: int = 0) -> 'collections.OrderedDict':
  """Flax PointMLP variables -> PyTorch state dict (torch tensors) that CG3D's `ModelProject` loads strictly.

  Flax keeps no BatchNorm step counter; `num_batches_tracked` (unused by PyTorch when momentum is set) is written
  as the given value.
  """
  import torch  # export-only dependency

  entries = _correspondence(params, batch_stats)
  flat = {'params': _flat(params), 'batch_stats': _flat(batch_stats)}
  arrays = {}
  for key, collection, path in entries:
    kind = _torch_module('/'.join(path[:-1]))[1]
    arrays[key] = _to_torch_array(kind, path[-1], np.asarray(flat[collection][path], np.float32))
  for bn in _bn_modules(entries):
    arrays[f'{bn}.num_batches_tracked'] = np.asarray(num_batches_tracked, np.int64)
  # Same key order as the PyTorch module, which is what `torch.save(model.state_dict())` would have written.
  order = _twin_key_order(arrays)
  return collections.OrderedDict((k, torch.from_numpy(np.array(arrays[k]))) for k in order)


def _twin_key_order(arrays: Mapping[str, np.ndarray]) -> list[str]:
  """The PyTorch module's registration order (what `model.state_dict()` yields), not alphabetical order."""
  top = ['embedding', 'local_grouper_list', 'pre_blocks_list', 'pos_blocks_list', 'projection']
  submodule_rank = {'net': 0, 'transfer': 0, 'operation': 1, 'net1': 0, 'net2': 1}
  leaf_rank = ['affine_alpha', 'affine_beta', 'weight', 'bias', 'running_mean', 'running_var',
               'num_batches_tracked']

  def sort_key(key: str):
    parts = key.split('.')
    module = [int(p) if p.isdigit() else submodule_rank[p] for p in parts[1:-1]]
    return top.index(parts[0]), module, leaf_rank.index(parts[-1])
  return sorted(arrays, key=sort_key)


def pointmlp_from_torch(state_dict: Mapping[str, Any], model: PointMLP | None = None, *,
                        dtype: Any = np.float32) -> tuple[dict, dict]:
  """PyTorch `ModelProject` state dict (torch tensors or arrays) -> Flax (params, batch_stats) for `model`.

  `model` (default: CG3D's PointMLP) fixes the expected layout; every key and shape is checked against it.
  Values are converted to `dtype` (float32: the parameter dtype of the Flax model; tests pass float64).
  A `module.` prefix (DataParallel) is not accepted silently: strip it first.
  """
  model = model or PointMLP()
  found = {}
  for key, value in state_dict.items():
    array = value.detach().cpu().numpy() if hasattr(value, 'detach') else np.asarray(value)
    found[key] = array
  _check_against({k: v.shape for k, v in found.items()}, expected_torch_shapes(model), 'PyTorch state dict')
  variables = expected_variables(model)
  flat = {'params': {}, 'batch_stats': {}}
  for key, collection, path in _correspondence(variables['params'], variables['batch_stats']):
    array = found[key]
    if not np.issubdtype(array.dtype, np.floating):
      raise ValueError(f'PyTorch state dict entry {key} has dtype {array.dtype}; expected floating point')
    kind = _torch_module('/'.join(path[:-1]))[1]
    flat[collection][path] = jnp.asarray(_from_torch_array(kind, path[-1], array.astype(dtype)))
  return _nest(flat['params']), _nest(flat['batch_stats'])
