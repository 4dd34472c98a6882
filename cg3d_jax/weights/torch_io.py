"""Flax variables <-> PyTorch state dicts with the original CG3D names, checked key by key and shape by shape.

Generic machinery first: a name map is a list of `Entry`s, each tying one state-dict key to one Flax leaf
(collection + '/'-joined path) with a layout conversion. Build maps with `linear`, `conv1x1`, `batch_norm`,
`layer_norm` and `tensor`, then convert with `flax_to_torch` / `torch_to_flax`; both refuse missing, unexpected
and mis-shaped entries and name every offender. PointTransformer's map follows (CG3D's and ULIP's Point-BERT);
PointMLP's map is weights/pointmlp_state_dict.py.

Layouts: torch Linear weight [out, in] <-> Flax Dense kernel [in, out]; a 1x1 Conv1d weight [out, in, 1] <-> Dense
kernel [in, out]; BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var, and
num_batches_tracked exists only on the torch side (written as a given count, checked for shape and dropped on
import; with momentum set, PyTorch never reads it).
"""

import collections
import dataclasses
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cg3d_jax.trees import flatten, stack_layers, unflatten, unstack_layers

PARAMS, BATCH_STATS, TORCH_ONLY = 'params', 'batch_stats', ''


@dataclasses.dataclass(frozen=True)
class Entry:
  """One state-dict key and the Flax leaf it maps to. kind: 'copy', 'linear', 'conv1x1' or 'num_batches_tracked'."""

  torch_key: str
  collection: str
  flax_path: str
  kind: str = 'copy'


# --- name-map building blocks -----------------------------------------------------------------------------------


def tensor(torch_key: str, flax_path: str, collection: str = PARAMS) -> list[Entry]:
  """A tensor stored with the same layout on both sides (tokens, position embeddings, affine vectors)."""
  return [Entry(torch_key, collection, flax_path)]


def linear(torch_prefix: str, flax_path: str, *, bias: bool = True) -> list[Entry]:
  entries = [Entry(f'{torch_prefix}.weight', PARAMS, f'{flax_path}/kernel', 'linear')]
  return entries + ([Entry(f'{torch_prefix}.bias', PARAMS, f'{flax_path}/bias')] if bias else [])


def conv1x1(torch_prefix: str, flax_path: str, *, bias: bool = True) -> list[Entry]:
  """A kernel-size-1 Conv1d (or Conv2d) applied pointwise, stored as a Flax Dense."""
  entries = [Entry(f'{torch_prefix}.weight', PARAMS, f'{flax_path}/kernel', 'conv1x1')]
  return entries + ([Entry(f'{torch_prefix}.bias', PARAMS, f'{flax_path}/bias')] if bias else [])


def batch_norm(torch_prefix: str, flax_path: str) -> list[Entry]:
  return [
    Entry(f'{torch_prefix}.weight', PARAMS, f'{flax_path}/scale'),
    Entry(f'{torch_prefix}.bias', PARAMS, f'{flax_path}/bias'),
    Entry(f'{torch_prefix}.running_mean', BATCH_STATS, f'{flax_path}/mean'),
    Entry(f'{torch_prefix}.running_var', BATCH_STATS, f'{flax_path}/var'),
    Entry(f'{torch_prefix}.num_batches_tracked', TORCH_ONLY, '', 'num_batches_tracked'),
  ]


def layer_norm(torch_prefix: str, flax_path: str) -> list[Entry]:
  return [
    Entry(f'{torch_prefix}.weight', PARAMS, f'{flax_path}/scale'),
    Entry(f'{torch_prefix}.bias', PARAMS, f'{flax_path}/bias'),
  ]


# --- tree helpers -------------------------------------------------------------------------------------------------


def _to_torch_layout(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == 'linear':
    return x.T
  if kind == 'conv1x1':
    return x.T[:, :, None]
  return x


def _to_flax_layout(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == 'linear':
    return x.T
  if kind == 'conv1x1':
    if x.ndim < 3 or any(s != 1 for s in x.shape[2:]):
      raise ValueError(f'expected a kernel-size-1 convolution weight [out, in, 1...], got shape {x.shape}')
    return x.reshape(x.shape[:2]).T
  return x


def _list(names: Iterable[str], limit: int = 20) -> str:
  names = sorted(names)
  more = f' ... and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def _check_entries(entries: list[Entry]) -> None:
  dup_keys = [k for k, n in collections.Counter(e.torch_key for e in entries).items() if n > 1]
  dup_paths = [
    k for k, n in collections.Counter(f'{e.collection}:{e.flax_path}' for e in entries if e.collection).items() if n > 1
  ]
  if dup_keys or dup_paths:
    raise ValueError(
      f'name map is inconsistent: duplicate torch keys [{_list(dup_keys)}], duplicate Flax paths [{_list(dup_paths)}]'
    )


# --- conversions --------------------------------------------------------------------------------------------------


def flax_to_torch(
  variables: Mapping[str, Mapping[str, Any]], entries: list[Entry], *, num_batches_tracked: int = 0
) -> 'collections.OrderedDict[str, torch.Tensor]':
  """Flax collections {'params': ..., 'batch_stats': ...} -> state dict in the entries' order.

  Every Flax leaf of the collections the map uses must be mapped, and every mapped leaf must exist.
  """
  _check_entries(entries)
  collections_used = sorted({e.collection for e in entries if e.collection})
  flat = {c: flatten(variables.get(c, {})) for c in collections_used}
  wanted = {(e.collection, e.flax_path) for e in entries if e.collection}
  have = {(c, p) for c in collections_used for p in flat[c]}
  missing, unexpected = wanted - have, have - wanted
  if missing or unexpected:
    raise ValueError(
      'Flax variables do not match the name map: '
      f'missing [{_list(f"{c}/{p}" for c, p in missing)}]; '
      f'unexpected [{_list(f"{c}/{p}" for c, p in unexpected)}]'
    )
  state = collections.OrderedDict()
  for e in entries:
    if e.kind == 'num_batches_tracked':
      state[e.torch_key] = torch.tensor(int(num_batches_tracked), dtype=torch.int64)
      continue
    value = np.array(jax.device_get(flat[e.collection][e.flax_path]), dtype=np.float32)  # writable copy for torch
    state[e.torch_key] = torch.from_numpy(np.ascontiguousarray(_to_torch_layout(e.kind, value)).copy())
  return state


def torch_to_flax(
  state_dict: Mapping[str, Any], entries: list[Entry], template: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
  """State dict -> {'params': ..., 'batch_stats': ...} as float32 jnp arrays.

  Refuses missing and unexpected keys. With `template` (Flax variables, concrete or jax.ShapeDtypeStruct), every
  converted leaf must have the template's shape and the template must have no leaf the map does not fill.
  """
  _check_entries(entries)
  wanted = {e.torch_key for e in entries}
  missing, unexpected = wanted - set(state_dict), set(state_dict) - wanted
  if missing or unexpected:
    raise ValueError(
      f'state dict does not match the name map: missing keys [{_list(missing)}]; unexpected keys [{_list(unexpected)}]'
    )
  flat_template = {c: flatten(template.get(c, {})) for c in (PARAMS, BATCH_STATS)} if template else None
  out: dict[str, dict[str, Any]] = {}
  mis_shaped = []
  for e in entries:
    raw = state_dict[e.torch_key]
    value = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    if e.kind == 'num_batches_tracked':
      if value.shape != ():
        mis_shaped.append(f'{e.torch_key}: got {value.shape}, expected ()')
      continue
    try:
      value = _to_flax_layout(e.kind, value)
    except ValueError as err:
      mis_shaped.append(f'{e.torch_key}: {err}')
      continue
    if flat_template is not None:
      expected = flat_template[e.collection].get(e.flax_path)
      if expected is not None and tuple(expected.shape) != value.shape:
        want = _to_torch_layout(e.kind, np.empty(expected.shape, np.float32)).shape
        mis_shaped.append(f'{e.torch_key}: got {tuple(raw.shape)}, expected {want}')
    out.setdefault(e.collection, {})[e.flax_path] = jnp.asarray(value, dtype=jnp.float32)
  if mis_shaped:
    raise ValueError(f'state dict has mis-shaped entries: {"; ".join(mis_shaped)}')
  if flat_template is not None:
    unfilled = [f'{c}/{p}' for c in flat_template for p in flat_template[c] if p not in out.get(c, {})]
    if unfilled:
      raise ValueError(f'name map leaves Flax variables unfilled: [{_list(unfilled)}]')
  return {c: unflatten(leaves) for c, leaves in out.items()}


# --- PointTransformer (CG3D's PointTransformerProject) ----------------------------------------------------------


def point_transformer_entries(depth: int, with_head: bool) -> list[Entry]:
  """The name map, in the original state dict's key order."""
  entries = tensor('cls_token', 'cls_token') + tensor('cls_pos', 'cls_pos')
  for stage in ('first', 'second'):
    entries += conv1x1(f'encoder.{stage}_conv.0', f'encoder/{stage}_conv_0')
    entries += batch_norm(f'encoder.{stage}_conv.1', f'encoder/{stage}_bn')
    entries += conv1x1(f'encoder.{stage}_conv.3', f'encoder/{stage}_conv_1')
  entries += linear('reduce_dim', 'reduce_dim') + linear('projection', 'projection')
  entries += linear('pos_embed.0', 'pos_embed_0') + linear('pos_embed.2', 'pos_embed_1')
  for i in range(depth):
    t, f = f'blocks.blocks.{i}', f'blocks_{i}'
    entries += layer_norm(f'{t}.norm1', f'{f}/norm1') + layer_norm(f'{t}.norm2', f'{f}/norm2')
    entries += linear(f'{t}.mlp.fc1', f'{f}/mlp/fc1') + linear(f'{t}.mlp.fc2', f'{f}/mlp/fc2')
    entries += linear(f'{t}.attn.qkv', f'{f}/attn/qkv', bias=False) + linear(f'{t}.attn.proj', f'{f}/attn/proj')
  entries += layer_norm('norm', 'norm')
  if with_head:
    entries += linear('cls_head_finetune.0', 'cls_head_0') + linear('cls_head_finetune.3', 'cls_head_1')
  return entries


def _count_blocks(names: Iterable[str], pattern: str) -> int:
  found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
  if found != set(range(len(found))):
    raise ValueError(f'transformer block numbers are not contiguous from 0: {sorted(found)}')
  return len(found)


def point_transformer_to_torch(
  params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, num_batches_tracked: int = 0
) -> 'collections.OrderedDict[str, torch.Tensor]':
  """Flax PointTransformer variables (blocks stacked or one by one) -> the original's `base_model` state dict
  (strict-loadable)."""
  params = unstack_layers(params)
  depth = _count_blocks(params, r'blocks_(\d+)$')
  entries = point_transformer_entries(depth, with_head='cls_head_0' in params)
  return flax_to_torch({PARAMS: params, BATCH_STATS: batch_stats}, entries, num_batches_tracked=num_batches_tracked)


def torch_shapes(entries: list[Entry], variables, *, conv2d=()) -> 'collections.OrderedDict[str, tuple[int, ...]]':
  """State-dict key -> shape of the entries' torch side, from Flax variables (arrays or ShapeDtypeStructs); the
  1x1 convolutions named in `conv2d` are Conv2d ([out, in, 1, 1]), the others Conv1d ([out, in, 1])."""
  flat = {c: {k: tuple(v.shape) for k, v in flatten(variables.get(c, {})).items()} for c in (PARAMS, BATCH_STATS)}
  out = collections.OrderedDict()
  for e in entries:
    if e.kind == 'num_batches_tracked':
      out[e.torch_key] = ()
      continue
    shape = flat[e.collection][e.flax_path]
    if e.kind == 'linear':
      shape = (shape[1], shape[0])
    elif e.kind == 'conv1x1':
      shape = (shape[1], shape[0], 1, 1) if e.torch_key in conv2d else (shape[1], shape[0], 1)
    out[e.torch_key] = shape
  return out


def vote(state_dict: Mapping[str, Any], places: list[tuple[str, int]]) -> int | None:
  """The size most of the (key, axis) places carry (None when none is there): one mis-shaped tensor is then named
  by the shape check instead of resizing the model around it."""
  sizes = [
    int(state_dict[k].shape[axis])
    for k, axis in places
    if k in state_dict
    and hasattr(state_dict[k], 'shape')
    and len(state_dict[k].shape) > (axis if axis >= 0 else -axis - 1)
  ]
  return collections.Counter(sizes).most_common(1)[0][0] if sizes else None


def shape_of(state_dict: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
  if key not in state_dict:
    raise ValueError(f'not a {what} state dict: key {key!r} is missing')
  return tuple(state_dict[key].shape)


def _dtype_name(value) -> str:
  return str(value.dtype).removeprefix('torch.') if hasattr(value, 'dtype') else type(value).__name__


def _is_float(value) -> bool:
  if isinstance(value, torch.Tensor):
    return value.dtype.is_floating_point
  return hasattr(value, 'dtype') and np.issubdtype(np.asarray(value).dtype, np.floating)


def check_state_dict(
  state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str, *, optional=()
) -> None:
  """ValueError naming every missing, unexpected, mis-shaped (both shapes) or non-float entry of `state_dict`
  against `expected` (key -> shape), a few of each; keys in `optional` may be there or not, at any shape."""
  expected = {k: v for k, v in expected.items() if k not in optional}
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected and k not in optional]
  mis_shaped = [
    f'{k}: got {tuple(state_dict[k].shape)}, expected {expected[k]}'
    for k in expected
    if k in state_dict and tuple(getattr(state_dict[k], 'shape', ())) != expected[k]
  ]
  not_float = [
    f'{k} ({_dtype_name(state_dict[k])})'
    for k in expected
    if k in state_dict and not k.endswith('.num_batches_tracked') and not _is_float(state_dict[k])
  ]

  def few(names: list[str], limit: int = 5) -> str:
    return ', '.join(names[:limit]) + (f' ... and {len(names) - limit} more' if len(names) > limit else '')

  problems = []
  if missing:
    problems.append(f'{len(missing)} missing tensor{"s" * (len(missing) > 1)} [{few(missing)}]')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected [{few(unexpected)}]')
  if mis_shaped:
    problems.append(f'{len(mis_shaped)} mis-shaped [{few(mis_shaped, 3)}]')
  if not_float:
    problems.append(f'not floating point [{few(not_float)}]')
  if problems:
    raise ValueError(f'state dict does not fit the {what}: ' + '; '.join(problems))


def point_transformer_kwargs_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The shape-determining PointTransformer settings read off a state dict (num_heads is not recoverable)."""
  for key in ('cls_token', 'reduce_dim.weight', 'projection.weight', 'blocks.blocks.0.mlp.fc1.weight'):
    if key not in state_dict:
      raise ValueError(f'not a PointTransformer state dict: key {key!r} is missing')
  # Sizes that several tensors carry are read from all of them, the majority wins: one mis-shaped tensor is then
  # named by the shape check instead of resizing the model around it.
  width = vote(state_dict, [('cls_token', -1), ('cls_pos', -1), ('norm.weight', 0), ('reduce_dim.weight', 0)])
  encoder_dim = vote(
    state_dict, [('reduce_dim.weight', 1), ('encoder.second_conv.3.weight', 0), ('encoder.second_conv.3.bias', 0)]
  )
  kwargs = dict(
    width=width,
    depth=_count_blocks(state_dict, r'blocks\.blocks\.(\d+)\.'),
    encoder_dim=encoder_dim,
    in_channels=int(state_dict['encoder.first_conv.0.weight'].shape[1])
    if 'encoder.first_conv.0.weight' in state_dict
    else 3,
    mlp_ratio=state_dict['blocks.blocks.0.mlp.fc1.weight'].shape[0] / width,
    embed_dim=state_dict['projection.weight'].shape[0],
    num_heads=1,
    num_classes=None,
  )
  if 'cls_head_finetune.0.weight' in state_dict and 'cls_head_finetune.3.weight' in state_dict:
    kwargs.update(
      head_hidden=state_dict['cls_head_finetune.0.weight'].shape[0],
      num_classes=state_dict['cls_head_finetune.3.weight'].shape[0],
    )
  return kwargs


def point_transformer_from_torch(state_dict: Mapping[str, Any], model: Any = None) -> tuple[dict, dict]:
  """The original's `base_model` state dict -> (params (blocks stacked), batch_stats) for cg3d_jax's PointTransformer.

  With `model` (a PointTransformer), shapes are checked against that model; without, against a model with the
  sizes read off the state dict itself (so only internal inconsistencies are caught).
  """
  from cg3d_jax.models.point_transformer import PointTransformer  # models do not import weights; this is one-way

  if model is None:
    model = PointTransformer(**point_transformer_kwargs_from_torch(state_dict))
  dummy = jax.ShapeDtypeStruct((1, max(model.group_size, model.num_groups), model.in_channels), jnp.float32)
  template = jax.eval_shape(lambda p: unstack_layers(model.init(jax.random.key(0), p, train=False)), dummy)
  entries = point_transformer_entries(model.depth, with_head=model.num_classes is not None)
  variables = torch_to_flax(state_dict, entries, template)
  return stack_layers(variables[PARAMS]), variables.get(BATCH_STATS, {})
