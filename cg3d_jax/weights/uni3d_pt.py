"""Uni3D's released checkpoints <-> Flax variables of models/uni3d.py.

Uni3D trains under DeepSpeed and saves with `engine.save_checkpoint` (main.py), i.e. DeepSpeed's
`mp_rank_00_model_states.pt` (DeepSpeed 0.10.3, runtime/engine.py `_save_checkpoint`); its evaluation reads a
released `model.pt` as `torch.load(...)['module']` and strips a `module.` prefix where the keys have one
(main.py `test_zeroshot_3d`). The dict DeepSpeed writes for Uni3D's settings:

  'module'        the Uni3D model's state dict (the engine's own module: no `module.` prefix; Uni3D strips one where
                  a file has it). DeepSpeed's fp16 mode (Uni3D's deepspeed config: fp16 enabled unless --precision
                  bf16) calls module.half(), so every floating tensor is float16, BatchNorm statistics included (bf16
                  runs: bfloat16); num_batches_tracked is int64.
  'buffer_names'  list of str;  'param_shapes' a list of OrderedDicts of name -> torch.Size (ZeRO stage 1);
  'optimizer', 'frozen_param_shapes', 'frozen_param_fragments', 'lr_scheduler', 'data_sampler', 'random_ltd'
                  None at Uni3D's settings (ZeRO keeps the optimizer in separate files);
  'shared_params' dict of str -> str;  'sparse_tensor_module_names' a set;  'skipped_steps', 'global_steps',
                  'global_samples', 'dp_world_size', 'mp_world_size' ints;  'ds_config' the config file's path (str);
                  'ds_version' str;  Uni3D's client state 'epoch' (int) and 'best_acc1' (float).
All of it is tensors, plain containers, torch.Size and a set, which `torch.load(weights_only=True)` rebuilds with no
extra class allowed (torch.Size and set are in its default allow-list; checked with torch 2.13), so
cg3d_pth.load_file reads it as it reads every family; a file that needs anything else is refused before anything in
it runs. A file holding only {'module': ...}, or the bare state dict, reads the same.

The name map, state dict key (after `module.`) -> Flax (models/uni3d.py's tree; blocks stacked in the model):

  point_encoder.cls_token, cls_pos                  params/cls_token, cls_pos
  point_encoder.encoder.{first,second}_conv.{0,3}   params/encoder/{first,second}_conv_{0,1}  (1x1 Conv1d)
  point_encoder.encoder.{first,second}_conv.1       params/encoder/{first,second}_bn, batch_stats/encoder/...
  point_encoder.encoder2trans, trans2embed          params/encoder2trans, trans2embed
  point_encoder.pos_embed.{0,2}                     params/pos_embed_{0,1}
  point_encoder.visual.blocks.{i}.  (V below)       params/blocks_{i}/  (stacked on a leading axis in the model)
    V norm1, norm2                                  norm1, norm2
    V attn.q_bias, attn.v_bias, attn.qkv (no bias)  attn/q_bias, attn/v_bias, attn/qkv        (fused qkv)
    V attn.{q,k,v}_proj (k without bias)            attn/{q,k,v}_proj                         (separate q/k/v)
    V attn.proj                                     attn/proj
    V mlp.fc1, mlp.fc2                              mlp/fc1, mlp/fc2                          ('glu', 'gelu')
    V mlp.fc1_g, mlp.fc1_x, mlp.norm, mlp.fc2       mlp/fc1_g, mlp/fc1_x, mlp/norm, mlp/fc2   ('swiglu')
  point_encoder.visual.fc_norm                      params/fc_norm
Unused by the point encoder, listed as ignored on reading and written back on export (UNUSED_KEYS):
  logit_scale (the contrastive temperature, log scale), point_encoder.visual.{cls_token, pos_embed,
  patch_embed.proj.weight, patch_embed.proj.bias} (timm's image stem) and point_encoder.visual.head.{weight, bias}
  (timm's classifier; absent for tiny and small, whose timm configs have no classes).
"""

import collections
import functools
import math
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cg3d_jax.atomic import atomic_write
from cg3d_jax.models.uni3d import PATCH_SIZE, UNI3D_SIZES, Uni3D, size_of
from cg3d_jax.trees import non_finite, stack_layers, unstack_layers
from cg3d_jax.weights import torch_io
from cg3d_jax.weights.cg3d_pth import CheckpointFormatError, load_file, strip_module_prefix, without_module_prefix
from cg3d_jax.weights.torch_io import BATCH_STATS, PARAMS, conv1x1, layer_norm, linear, tensor

_PE, _VIS = 'point_encoder', 'point_encoder.visual'
_SIGNATURE = f'{_PE}.encoder2trans.weight'  # only Uni3D's point encoder has it
_BLOCK = re.compile(r'point_encoder\.visual\.blocks\.(\d+)\.')
LOGIT_SCALE = 'logit_scale'
_STEM = (f'{_VIS}.cls_token', f'{_VIS}.pos_embed', f'{_VIS}.patch_embed.proj.weight', f'{_VIS}.patch_embed.proj.bias')
_HEAD = (f'{_VIS}.head.weight', f'{_VIS}.head.bias')
UNUSED_KEYS = (LOGIT_SCALE, *_STEM, *_HEAD)
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)  # Uni3D's initial value
# Uni3D's scripts/*.sh: --num-group 512 --group-size 64; the weights do not record them.
GROUPING = dict(num_groups=512, group_size=64)


# --- the name map -----------------------------------------------------------------------------------------------


def _encoder_entries() -> list[torch_io.Entry]:
  entries = []
  for stage in ('first', 'second'):
    entries += conv1x1(f'{_PE}.encoder.{stage}_conv.0', f'encoder/{stage}_conv_0')
    entries += torch_io.batch_norm(f'{_PE}.encoder.{stage}_conv.1', f'encoder/{stage}_bn')
    entries += conv1x1(f'{_PE}.encoder.{stage}_conv.3', f'encoder/{stage}_conv_1')
  return entries


def _block_entries(i: int, mlp: str, qkv_fused: bool) -> list[torch_io.Entry]:
  t, f = f'{_VIS}.blocks.{i}', f'blocks_{i}'
  entries = layer_norm(f'{t}.norm1', f'{f}/norm1')
  if qkv_fused:  # own parameters before the child Linear in the state dict
    entries += tensor(f'{t}.attn.q_bias', f'{f}/attn/q_bias') + tensor(f'{t}.attn.v_bias', f'{f}/attn/v_bias')
    entries += linear(f'{t}.attn.qkv', f'{f}/attn/qkv', bias=False)
  else:
    entries += linear(f'{t}.attn.q_proj', f'{f}/attn/q_proj')
    entries += linear(f'{t}.attn.k_proj', f'{f}/attn/k_proj', bias=False)
    entries += linear(f'{t}.attn.v_proj', f'{f}/attn/v_proj')
  entries += linear(f'{t}.attn.proj', f'{f}/attn/proj') + layer_norm(f'{t}.norm2', f'{f}/norm2')
  if mlp == 'swiglu':
    entries += linear(f'{t}.mlp.fc1_g', f'{f}/mlp/fc1_g') + linear(f'{t}.mlp.fc1_x', f'{f}/mlp/fc1_x')
    entries += layer_norm(f'{t}.mlp.norm', f'{f}/mlp/norm')
  else:
    entries += linear(f'{t}.mlp.fc1', f'{f}/mlp/fc1')
  return entries + linear(f'{t}.mlp.fc2', f'{f}/mlp/fc2')


def uni3d_entries(depth: int, mlp: str, qkv_fused: bool) -> list[torch_io.Entry]:
  """The point encoder's name map, in the released state dict's order (the unused keys left out)."""
  entries = tensor(f'{_PE}.cls_token', 'cls_token') + tensor(f'{_PE}.cls_pos', 'cls_pos') + _encoder_entries()
  entries += linear(f'{_PE}.encoder2trans', 'encoder2trans') + linear(f'{_PE}.trans2embed', 'trans2embed')
  entries += linear(f'{_PE}.pos_embed.0', 'pos_embed_0') + linear(f'{_PE}.pos_embed.2', 'pos_embed_1')
  for i in range(depth):
    entries += _block_entries(i, mlp, qkv_fused)
  return entries + layer_norm(f'{_VIS}.fc_norm', 'fc_norm')


def _model_entries(model: Uni3D) -> list[torch_io.Entry]:
  return uni3d_entries(model.depth, model.mlp, model.qkv_fused)


def released_size(width: int, mlp: str, qkv_fused: bool) -> str | None:
  """The released size with this width and block layout (any depth), or None."""
  for name, s in UNI3D_SIZES.items():
    if (s['width'], s['mlp'], s['qkv_fused']) == (width, mlp, qkv_fused):
      return name
  return None


def unused_shapes(width: int, mlp: str, qkv_fused: bool) -> 'collections.OrderedDict[str, tuple[int, ...]]':
  """The unused keys' shapes for a model of this layout: the timm image stem (and head) of the released size with
  the same width and blocks; an unreleased layout gets a 224-pixel stem and no head (timm's Eva defaults for a
  headless model)."""
  size = released_size(width, mlp, qkv_fused)
  image_size = UNI3D_SIZES[size]['image_size'] if size else 224
  num_classes = UNI3D_SIZES[size]['num_classes'] if size else 0
  shapes = collections.OrderedDict({LOGIT_SCALE: ()})
  shapes[_STEM[0]] = (1, 1, width)
  shapes[_STEM[1]] = (1, (image_size // PATCH_SIZE) ** 2 + 1, width)
  shapes[_STEM[2]] = (width, 3, PATCH_SIZE, PATCH_SIZE)
  shapes[_STEM[3]] = (width,)
  if num_classes:
    shapes[_HEAD[0]] = (num_classes, width)
    shapes[_HEAD[1]] = (num_classes,)
  return shapes


@functools.lru_cache(maxsize=16)
def expected_variables(model: Uni3D) -> dict:
  """Shapes of `model`'s Flax variables, blocks one by one ({'params', 'batch_stats'} of ShapeDtypeStructs)."""
  points = jax.ShapeDtypeStruct((1, model.group_size, model.in_channels), jnp.float32)
  return jax.eval_shape(lambda p: unstack_layers(model.init(jax.random.key(0), p, train=False)), points)


def _ordered(encoder: Mapping[str, Any], unused: Mapping[str, Any]) -> 'collections.OrderedDict[str, Any]':
  """Encoder and unused entries in Uni3D's state-dict order: logit_scale, the point encoder's own layers, the timm
  stem, the blocks and fc_norm, the timm head."""
  out = collections.OrderedDict()
  if LOGIT_SCALE in unused:
    out[LOGIT_SCALE] = unused[LOGIT_SCALE]
  stem = [k for k in _STEM if k in unused]
  for key, value in encoder.items():
    if key.startswith(f'{_VIS}.') and stem:  # timm's own parameters come before its blocks
      out.update((k, unused[k]) for k in stem)
      stem = []
    out[key] = value
  out.update((k, unused[k]) for k in (*stem, *_HEAD) if k in unused)
  return out


def expected_torch_shapes(model: Uni3D | None = None) -> 'collections.OrderedDict[str, tuple[int, ...]]':
  """Every state-dict key -> shape of the file Uni3D's code writes for `model` (default: the giant), in its order."""
  model = model or Uni3D()
  encoder = torch_io.torch_shapes(_model_entries(model), expected_variables(model))
  return _ordered(encoder, unused_shapes(model.width, model.mlp, model.qkv_fused))


# --- Flax -> torch ----------------------------------------------------------------------------------------------


def _count(names, pattern: str) -> int:
  found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
  if found != set(range(len(found))):
    raise ValueError(f'numbered entries {pattern!r} are not contiguous from 0: {sorted(found)}')
  return len(found)


def _layout_of_params(params: Mapping[str, Any]) -> tuple[int, int, str, bool]:
  """(width, depth, mlp kind, qkv fused) of Flax Uni3D params with the blocks one by one."""
  depth = _count(params, r'blocks_(\d+)$')
  width = int(np.shape(params['cls_token'])[-1])
  if depth == 0:
    return width, 0, 'gelu', True
  block = params['blocks_0']
  mlp = block['mlp']
  if 'fc1_g' in mlp:
    kind = 'swiglu'
  else:
    kind = 'glu' if np.shape(mlp['fc1']['kernel'])[1] == 2 * np.shape(mlp['fc2']['kernel'])[0] else 'gelu'
  return width, depth, kind, 'qkv' in block['attn']


def uni3d_to_torch(
  params: Mapping[str, Any],
  batch_stats: Mapping[str, Any],
  *,
  num_batches_tracked: int = 0,
  unused: Mapping[str, Any] | None = None,
  logit_scale: float | None = None,
) -> 'collections.OrderedDict[str, torch.Tensor]':
  """Flax Uni3D variables (blocks stacked or one by one) -> Uni3D's model state dict (float32, the released key
  order, no `module.`): what Uni3D's `model.load_state_dict(checkpoint['module'])` loads strictly.

  unused: tensors for the keys the point encoder does not use (UNUSED_KEYS; what read_uni3d_checkpoint returns in
  info['unused']), written as given; the others are written as Uni3D would start them: logit_scale log(1 / 0.07)
  (or `logit_scale`, the log scale), the timm stem and head as zeros of their shapes.
  """
  params = unstack_layers(dict(params))
  width, depth, mlp, qkv_fused = _layout_of_params(params)
  encoder = torch_io.flax_to_torch(
    {PARAMS: params, BATCH_STATS: batch_stats},
    uni3d_entries(depth, mlp, qkv_fused),
    num_batches_tracked=num_batches_tracked,
  )
  given = dict(unused or {})
  unknown = sorted(set(given) - set(UNUSED_KEYS))
  if unknown:
    raise ValueError(f'unused: {unknown} are not keys the point encoder leaves unused ({list(UNUSED_KEYS)})')
  extras = collections.OrderedDict()
  for key, shape in unused_shapes(width, mlp, qkv_fused).items():
    if key in given:
      value = given[key]
      extras[key] = value.detach().clone() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    elif key == LOGIT_SCALE:
      extras[key] = torch.tensor(DEFAULT_LOGIT_SCALE if logit_scale is None else logit_scale, dtype=torch.float32)
    else:
      extras[key] = torch.zeros(shape, dtype=torch.float32)
  return _ordered(encoder, extras)


# --- torch -> Flax ----------------------------------------------------------------------------------------------


def uni3d_kwargs_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Uni3D sizes read off a state dict (`module.` stripped or not).

  Width, depth, the MLP kind and width, fused or separate qkv, the mini-PointNet width, the input channels and
  embed_dim are in the shapes: 'swiglu' has mlp.fc1_g, 'glu' an fc1 twice as wide as fc2's input, 'gelu' neither;
  fused blocks have attn.qkv, separate ones attn.q_proj. The head count is not: it is the released size's with this
  width and layout, else width / 64. The grouping (512 x 64) is Uni3D's scripts'. `assumptions` says which of these
  a state dict needed.
  """
  state_dict = without_module_prefix(state_dict)
  if _SIGNATURE not in state_dict:
    raise ValueError(f'not a Uni3D state dict: key {_SIGNATURE!r} is missing')
  # Sizes several tensors carry are read from all of them, the majority wins: one mis-shaped tensor is then named
  # by the shape check instead of resizing the model around it.
  width = torch_io.vote(
    state_dict,
    [
      (f'{_PE}.cls_token', -1),
      (f'{_PE}.cls_pos', -1),
      (_SIGNATURE, 0),
      (f'{_PE}.trans2embed.weight', 1),
      (f'{_VIS}.fc_norm.weight', 0),
    ],
  )
  depth = _count(state_dict, _BLOCK.pattern)
  if depth == 0:
    raise ValueError('not a Uni3D state dict: no point_encoder.visual.blocks.<i> entries')
  b = f'{_VIS}.blocks.0'
  qkv_fused = f'{b}.attn.qkv.weight' in state_dict
  if not qkv_fused and f'{b}.attn.q_proj.weight' not in state_dict:
    raise ValueError(f'not a Uni3D state dict: neither {b}.attn.qkv.weight nor {b}.attn.q_proj.weight')
  if f'{b}.mlp.fc1_g.weight' in state_dict:
    mlp, hidden = 'swiglu', torch_io.shape_of(state_dict, f'{b}.mlp.fc1_g.weight', 'Uni3D')[0]
  else:
    fc1, fc2_in = (
      torch_io.shape_of(state_dict, f'{b}.mlp.fc1.weight', 'Uni3D')[0],
      torch_io.shape_of(state_dict, f'{b}.mlp.fc2.weight', 'Uni3D')[1],
    )
    mlp, hidden = ('glu', fc2_in) if fc1 == 2 * fc2_in else ('gelu', fc1)
  size = released_size(width, mlp, qkv_fused)
  return dict(
    width=width,
    depth=depth,
    num_heads=UNI3D_SIZES[size]['num_heads'] if size else max(1, width // 64),
    mlp=mlp,
    mlp_hidden=hidden,
    qkv_fused=qkv_fused,
    encoder_dim=torch_io.shape_of(state_dict, _SIGNATURE, 'Uni3D')[1],
    in_channels=torch_io.shape_of(state_dict, f'{_PE}.encoder.first_conv.0.weight', 'Uni3D')[1],
    embed_dim=torch_io.shape_of(state_dict, f'{_PE}.trans2embed.weight', 'Uni3D')[0],
    **GROUPING,
  )


def assumptions(kwargs: Mapping[str, Any]) -> list[str]:
  """What uni3d_kwargs_from_torch had to assume for these kwargs, the weights not recording it."""
  out = []
  if not released_size(kwargs['width'], kwargs['mlp'], kwargs['qkv_fused']):
    out.append(f'num_heads={kwargs["num_heads"]} (width / 64: no released Uni3D size has this width and block layout)')
  out.append(
    f"num_groups={kwargs['num_groups']}, group_size={kwargs['group_size']} (Uni3D's scripts; not recorded in the "
    'weights)'
  )
  return out


def check_state_dict(state_dict: Mapping[str, Any], model: Uni3D) -> None:
  """ValueError naming every missing, unexpected, mis-shaped (both shapes) or non-float entry, a few of each. The
  unused keys (UNUSED_KEYS) may be present or not; any other key must be one `model` has."""
  torch_io.check_state_dict(state_dict, expected_torch_shapes(model), 'Uni3D encoder', optional=UNUSED_KEYS)


def _as_float32(value):
  """float16 / bfloat16 / float64 tensors -> float32 (float16 and bfloat16 exactly: every value is a float32)."""
  if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.dtype != torch.float32:
    return value.float()
  return value


def uni3d_from_torch(state_dict: Mapping[str, Any], model: Uni3D | None = None) -> tuple[dict, dict]:
  """Uni3D's model state dict (`module.` stripped or not; float16 as DeepSpeed saves it, or float32) -> float32
  Flax (params with the blocks stacked, batch_stats). The unused keys (UNUSED_KEYS) are skipped.

  Every other key and shape is checked against `model`; without one, against a Uni3D with the sizes read off the
  state dict (so only internal inconsistencies are caught).
  """
  state_dict = without_module_prefix(state_dict)
  model = model or Uni3D(**uni3d_kwargs_from_torch(state_dict))
  check_state_dict(state_dict, model)
  used = {k: _as_float32(v) for k, v in state_dict.items() if k not in UNUSED_KEYS}
  variables = torch_io.torch_to_flax(used, _model_entries(model), expected_variables(model))
  return stack_layers(variables[PARAMS]), variables.get(BATCH_STATS, {})


# --- the released file ------------------------------------------------------------------------------------------


def _has_signature(state) -> bool:
  return isinstance(state, Mapping) and (_SIGNATURE in state or f'module.{_SIGNATURE}' in state)


def is_uni3d_container(loaded) -> bool:
  """Whether what cg3d_pth.load_file read is Uni3D's: DeepSpeed's dict whose 'module' holds a Uni3D point encoder
  (or that state dict saved bare)."""
  if not isinstance(loaded, Mapping):
    return False
  return _has_signature(loaded.get('module')) or _has_signature(loaded)


def _state_dict_of(path: pathlib.Path, loaded: Any) -> tuple[Mapping[str, Any], dict[str, Any]]:
  """The file's model state dict (prefix stripped) and its other entries, or a CheckpointFormatError saying what the
  file is."""
  if isinstance(loaded, Mapping) and 'module' in loaded:
    state, rest = loaded['module'], {k: v for k, v in loaded.items() if k != 'module'}
  elif isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
    state, rest = loaded, {}  # a bare state dict
  else:
    if isinstance(loaded, Mapping):
      known = {
        'state_dict': 'an OpenShape checkpoint (weights.openshape_pt reads those)',
        'base_model': 'a CG3D / Point-BERT checkpoint (weights.cg3d_pth reads those)',
      }
      found = [what for key, what in known.items() if key in loaded]
      what = found[0] if found else f'top-level keys {sorted(map(str, loaded))[:10]}'
    else:
      what = type(loaded).__name__
    raise CheckpointFormatError(
      path,
      f"not a Uni3D checkpoint: expected DeepSpeed's model-states dict with a 'module' state dict (what Uni3D's "
      f'evaluation reads), got {what}',
    )
  if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise CheckpointFormatError(path, "'module' is not a state dict of tensors")
  state = strip_module_prefix(path, state)
  if _SIGNATURE not in state:
    raise CheckpointFormatError(
      path,
      f'not a Uni3D point-encoder checkpoint: its state dict has no {_SIGNATURE!r} (no known family); first '
      f'keys: {list(state)[:6]}',
    )
  return state, rest


def _plain(value):
  if isinstance(value, torch.Tensor) and value.numel() == 1:
    return value.item()
  return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None


def read_uni3d_checkpoint(path, model: Uni3D | None = None, loaded=None) -> tuple[Uni3D, dict, dict, dict]:
  """A released Uni3D `model.pt` -> (model, params (blocks stacked), batch_stats, info), float32.

  Loaded with torch.load(weights_only=True) (cg3d_pth.load_file; `loaded`: what it returned, when the caller has
  read the file already): nothing pickled in the file runs. Float16 weights (DeepSpeed's fp16 saves) are read as
  float16 and upcast to float32, exactly. model: the Uni3D to check the weights against; default one sized from
  the weights (info['assumed'] says what the weights cannot). info: {'path', 'size' (the released size or None),
  'timm_model', 'dtypes' (the file's floating dtypes), 'logit_scale' (exp of the stored log scale, or None),
  'epoch', 'global_steps', 'ds_version', 'num_batches_tracked', 'ignored' (the unused keys present), 'unused'
  (those tensors as stored, for uni3d_to_torch), 'other_entries' (the file's other top-level keys), 'assumed'}.
  Every refusal is a CheckpointFormatError naming the file: not a torch file, truncated, needing pickled code, of
  no known family, missing or mis-shaped tensors (named, with both shapes), non-finite weights.
  """
  path = pathlib.Path(path)
  if loaded is None:
    loaded = load_file(path)
  state, rest = _state_dict_of(path, loaded)
  assumed = []
  try:
    if model is None:
      kwargs = uni3d_kwargs_from_torch(state)
      assumed = assumptions(kwargs)
      model = Uni3D(**kwargs)
    params, batch_stats = uni3d_from_torch(state, model)
  except ValueError as err:
    raise CheckpointFormatError(path, str(err)) from None
  bad = non_finite({'params': params, 'batch_stats': batch_stats})
  if bad:
    raise CheckpointFormatError(path, f'non-finite (NaN/Inf) weights in {bad[:5]}')
  unused = collections.OrderedDict((k, state[k]) for k in UNUSED_KEYS if k in state)
  log_scale = _plain(unused.get(LOGIT_SCALE))
  size = size_of(model)
  tracked = [int(v) for k, v in state.items() if k.endswith('.num_batches_tracked')]
  info = dict(
    path=str(path),
    size=size,
    timm_model=UNI3D_SIZES[size]['timm_model'] if size else None,
    dtypes=sorted({torch_io._dtype_name(v) for v in state.values() if v.dtype.is_floating_point}),
    logit_scale=None if log_scale is None else float(np.exp(log_scale)),
    epoch=_plain(rest.get('epoch')),
    global_steps=_plain(rest.get('global_steps')),
    ds_version=_plain(rest.get('ds_version')),
    num_batches_tracked=max(tracked, default=0),
    ignored=list(unused),
    unused=unused,
    other_entries=sorted(map(str, rest)),
    assumed=assumed,
  )
  return model, params, batch_stats, info


def write_checkpoint(path, params, batch_stats, *, step: int = 0) -> pathlib.Path:
  """The encoder as DeepSpeed's model-states file holds Uni3D's: {'module': the state dict, 'global_steps', 'epoch'},
  atomically; Uni3D's own `model.load_state_dict(checkpoint['module'])` reads it. In float32, not the released
  files' float16: a JAX run's weights are kept exactly, and loading casts them to the model's dtype. The keys the
  point encoder leaves unused are written as Uni3D would start them (uni3d_to_torch)."""
  container = {'module': uni3d_to_torch(params, batch_stats, num_batches_tracked=step), 'global_steps': int(step)}
  container['epoch'] = 0
  path = pathlib.Path(path)
  atomic_write(path, lambda f: torch.save(container, f))
  return path
