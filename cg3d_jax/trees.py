"""Nested parameter dicts <-> flat {'a/b/c': leaf} maps, the form every name mapping in this package works on."""

from typing import Any, Mapping

import jax


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
