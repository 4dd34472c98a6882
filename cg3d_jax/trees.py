"""Nested parameter dicts <-> flat {'a/b/c': leaf} maps, the form every name mapping in this package works on; and
the two layouts of a transformer's layer stack.

Layer stacks. In the models, each tower's layers are one `nn.scan`ned module whose parameters carry a leading layer
axis: `vision/layers/mlp/fc1/kernel` (layers, in, out), `blocks/attn/qkv/kernel` (depth, in, out). Name tables that
map to other libraries (transformers, timm/SLIP, the original CG3D) are written per layer, `layers_{i}/...`,
`blocks_{i}/...`, and checkpoints written before the scan hold that layout too. `stack_layers` and `unstack_layers`
convert between the two, on any nested tree (params, optimizer state, shape trees under jax.eval_shape).
"""

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

STACKS = ('layers', 'blocks')  # the names of the scanned layer stacks in the models
_NUMBERED = re.compile(rf'^({"|".join(STACKS)})_(\d+)$')


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update({f'{key}/{sub}': leaf for sub, leaf in flatten(value).items()})
    else:
      flat[key] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict."""
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    *parents, name = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


def path_to_str(path) -> str:
  """'/'-joined names of a jax key path: {'encoder': {'blocks_0': {'kernel'}}} -> 'encoder/blocks_0/kernel'."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(getattr(key, 'key', key)))
  return '/'.join(parts)


def non_finite(tree: Mapping[str, Any]) -> list[str]:
  """'a/b/c' names of the float leaves holding NaN or infinity (weights read from a file must hold none)."""
  import numpy as np

  bad = []
  for name, leaf in flatten(tree).items():
    value = np.asarray(leaf)
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
      bad.append(name)
  return sorted(bad)


def in_numbered_layer(path: str) -> bool:
  """True for a '/'-joined leaf path under a per-layer subtree (`layers_3/...`: the layout before the scan)."""
  return any(_NUMBERED.match(part) for part in path.split('/')[:-1])


def in_stack(path: str) -> bool:
  """True for a '/'-joined leaf path inside a scanned layer stack (its leading axis is the layer axis)."""
  return any(part in STACKS for part in path.split('/')[:-1])


def _stack_leaves(leaves: Sequence[Any]):
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):  # shape trees (jax.eval_shape templates)
    return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
  if all(isinstance(x, np.ndarray) or np.isscalar(x) for x in leaves):
    return np.stack(leaves)
  return jax.numpy.stack(leaves)


def _map_dicts(tree, fn):
  """Applies fn to every Mapping in a nested tree of Mappings, lists and tuples (namedtuples kept), bottom up."""
  if isinstance(tree, Mapping):
    return fn({k: _map_dicts(v, fn) for k, v in tree.items()})
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):
    return type(tree)(*(_map_dicts(v, fn) for v in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(_map_dicts(v, fn) for v in tree)
  return tree


def stack_layers(tree):
  """Per-layer siblings `layers_0..layers_{n-1}` (or `blocks_*`) -> one `layers` subtree with a leading layer axis.

  Numbering must run from 0 without gaps; the layers' subtrees must have the same structure. Trees already stacked
  pass unchanged.
  """

  def stack_dict(node: dict) -> dict:
    groups: dict[str, dict[int, str]] = {}
    for key in node:
      if isinstance(key, str) and (m := _NUMBERED.match(key)):
        groups.setdefault(m.group(1), {})[int(m.group(2))] = key
    for base, numbered in groups.items():
      if base in node:
        raise ValueError(f'tree has both {base!r} and {base}_<i> entries')
      if sorted(numbered) != list(range(len(numbered))):
        raise ValueError(f'{base}_<i> numbers are not contiguous from 0: {sorted(numbered)}')
      layers = [node.pop(numbered[i]) for i in range(len(numbered))]
      node[base] = jax.tree.map(lambda *xs: _stack_leaves(xs), *layers)
    return node

  return _map_dicts(tree, stack_dict)


def _layer(x, i: int):
  if isinstance(x, jax.ShapeDtypeStruct):  # a shape (a restore target): one layer's, its sharding without the axis
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
  return x[i]


def unstack_layers(tree):
  """Inverse of `stack_layers`: each `layers`/`blocks` subtree -> `layers_{i}` siblings, one per leading index
  (arrays are indexed; a ShapeDtypeStruct gives one layer's shape and sharding).
  """

  def unstack_dict(node: dict) -> dict:
    for base in STACKS:
      stacked = node.get(base)
      if not isinstance(stacked, Mapping):
        continue
      sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(stacked)}
      if len(sizes) != 1 or None in sizes:
        raise ValueError(f'{base!r} leaves do not share one leading layer axis: sizes {sorted(map(str, sizes))}')
      del node[base]
      for i in range(sizes.pop()):
        node[f'{base}_{i}'] = jax.tree.map(lambda x, i=i: _layer(x, i), stacked)
    return node

  return _map_dicts(tree, unstack_dict)
