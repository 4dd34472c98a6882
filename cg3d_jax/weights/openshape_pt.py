"""OpenShape's released PPAT ("PointBERT") checkpoints <-> Flax variables of models/ppat.py.

The released `model.pt` (e.g. openshape-pointbert-vitg14-rgb, ~388 MB) is the dict OpenShape's `Trainer.save_model`
writes with torch.save: 'state_dict' (the DistributedDataParallel model: every key `module.ppat.*` or
`module.proj.*`), 'logit_scale' (a state dict), 'text_proj' / 'image_proj' (None or state dicts), 'optimizer' and
'scheduler' (AdamW / StepLR state dicts: tensors, numbers, tuples), 'epoch', 'step' and the best accuracies (ints,
floats or 0-d tensors). All of that is tensors and plain containers, so `torch.load(weights_only=True)` reads it
with no extra class allowed; a file that needs any other pickled object is refused before anything in it runs.

The name map, state dict (after `module.` is stripped; order as OpenShape registers the modules) -> Flax:

  ppat.cls_token                                   params/cls_token
  ppat.sa.mlp_convs.{i}.{weight [o, i, 1, 1], bias} params/sa/conv_{i}/{kernel [i, o], bias}   (1x1 Conv2d)
  ppat.sa.mlp_bns.{i}.{weight, bias}               params/sa/bn_{i}/{scale, bias}
  ppat.sa.mlp_bns.{i}.{running_mean, running_var}  batch_stats/sa/bn_{i}/{mean, var}  (num_batches_tracked: torch only)
  ppat.lift.0.{weight [W, 3 + sa, 1], bias}        params/lift                                 (1x1 Conv1d)
  ppat.lift.2.{weight, bias}                       params/lift_norm/{scale, bias}
  ppat.transformer.layers.{i}.0.norm               params/layers_{i}/attn_norm   (layers stacked in the model)
  ppat.transformer.layers.{i}.0.fn.to_qkv.weight   params/layers_{i}/attn/to_qkv/kernel (no bias)
  ppat.transformer.layers.{i}.0.fn.to_out.0        params/layers_{i}/attn/to_out
  ppat.transformer.layers.{i}.1.norm               params/layers_{i}/ffn_norm
  ppat.transformer.layers.{i}.1.fn.net.{0, 3}      params/layers_{i}/ffn/{fc1, fc2}
  proj                                             params/proj
"""

import collections
import functools
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cg3d_jax.atomic import atomic_write
from cg3d_jax.models.ppat import OPENSHAPE_SCALINGS, PPAT
from cg3d_jax.trees import non_finite, stack_layers, unstack_layers
from cg3d_jax.weights import torch_io
from cg3d_jax.weights.cg3d_pth import CheckpointFormatError, load_file, strip_module_prefix, without_module_prefix
from cg3d_jax.weights.torch_io import BATCH_STATS, PARAMS, conv1x1, layer_norm, linear, tensor

_SIGNATURE = 'ppat.cls_token'  # only a PPAT state dict has it
_LAYER = re.compile(r'ppat\.transformer\.layers\.(\d+)\.')


def _conv2d_keys(num_sa_layers: int) -> set[str]:
  return {f'ppat.sa.mlp_convs.{i}.weight' for i in range(num_sa_layers)}


def ppat_entries(depth: int, num_sa_layers: int = 3, *, project_out: bool = True) -> list[torch_io.Entry]:
  """The name map in the released state dict's key order (tests/fixtures/reference/openshape_ppat_keys.tsv).

  project_out=False: no to_out (OpenShape's Identity when heads == 1 and dim_head == width).
  """
  entries = tensor('ppat.cls_token', 'cls_token')
  for i in range(num_sa_layers):
    entries += conv1x1(f'ppat.sa.mlp_convs.{i}', f'sa/conv_{i}')  # 4-D [o, i, 1, 1] on the torch side: see _to_torch
  for i in range(num_sa_layers):
    entries += torch_io.batch_norm(f'ppat.sa.mlp_bns.{i}', f'sa/bn_{i}')
  entries += conv1x1('ppat.lift.0', 'lift') + layer_norm('ppat.lift.2', 'lift_norm')
  for i in range(depth):
    t, f = f'ppat.transformer.layers.{i}', f'layers_{i}'
    entries += layer_norm(f'{t}.0.norm', f'{f}/attn_norm')
    entries += linear(f'{t}.0.fn.to_qkv', f'{f}/attn/to_qkv', bias=False)
    if project_out:
      entries += linear(f'{t}.0.fn.to_out.0', f'{f}/attn/to_out')
    entries += layer_norm(f'{t}.1.norm', f'{f}/ffn_norm')
    entries += linear(f'{t}.1.fn.net.0', f'{f}/ffn/fc1') + linear(f'{t}.1.fn.net.3', f'{f}/ffn/fc2')
  return entries + linear('proj', 'proj')


def _model_entries(model: PPAT) -> list[torch_io.Entry]:
  project_out = not (model.num_heads == 1 and model.head_dim == model.width)
  return ppat_entries(model.depth, len(model.sa_channels), project_out=project_out)


@functools.lru_cache(maxsize=16)
def expected_variables(model: PPAT) -> dict:
  """Shapes of `model`'s Flax variables, layers one by one ({'params', 'batch_stats'} of ShapeDtypeStructs)."""
  points = jax.ShapeDtypeStruct((1, max(model.num_patches, model.num_samples), model.in_channels), jnp.float32)
  return jax.eval_shape(lambda p: unstack_layers(model.init(jax.random.key(0), p, train=False)), points)


def expected_torch_shapes(model: PPAT | None = None) -> 'collections.OrderedDict[str, tuple[int, ...]]':
  """State-dict key -> shape for `model` (default: the released scaling-4 rgb encoder), in the released order."""
  model = model or PPAT()
  conv2d = _conv2d_keys(len(model.sa_channels))
  return torch_io.torch_shapes(_model_entries(model), expected_variables(model), conv2d=conv2d)


def _count(names, what: str) -> int:
  found = {int(m.group(1)) for n in names if (m := re.match(what, n))}
  if found != set(range(len(found))):
    raise ValueError(f'numbered entries {what!r} are not contiguous from 0: {sorted(found)}')
  return len(found)


def ppat_to_torch(
  params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, num_batches_tracked: int = 0
) -> 'collections.OrderedDict[str, torch.Tensor]':
  """Flax PPAT variables (layers stacked or one by one) -> OpenShape's `Projected` state dict (float32, released
  key order, without DDP's `module.`): what `make().load_state_dict(..., strict=True)` loads."""
  params = unstack_layers(dict(params))
  depth = _count(params, r'layers_(\d+)$')
  num_sa = _count(params.get('sa', {}), r'conv_(\d+)$')
  project_out = depth == 0 or 'to_out' in params['layers_0'].get('attn', {})
  entries = ppat_entries(depth, num_sa, project_out=project_out)
  state = torch_io.flax_to_torch(
    {PARAMS: params, BATCH_STATS: batch_stats}, entries, num_batches_tracked=num_batches_tracked
  )
  for key in _conv2d_keys(num_sa):  # Conv2d(k=1): torch_io writes Conv1d's [o, i, 1]
    state[key] = state[key][..., None].contiguous()
  return state


def openshape_scaling(kwargs: Mapping[str, Any]) -> int | None:
  """The OpenShape `model.scaling` whose transformer and tokenizer sizes these PPAT kwargs have, or None."""
  for scaling, s in OPENSHAPE_SCALINGS.items():
    if (kwargs.get('width'), kwargs.get('depth'), kwargs.get('num_heads'), kwargs.get('mlp_dim')) == (
      s['width'],
      s['depth'],
      s['num_heads'],
      s['mlp_dim'],
    ) and tuple(kwargs.get('sa_channels', ()))[-1:] == (s['sa_dim'],):
      return scaling
  return None


def ppat_kwargs_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """PPAT sizes read off a state dict (`module.` stripped or not).

  Widths, depth, FFN width, tokenizer channels, input channels and embed_dim are in the shapes. The head count is
  to_qkv's rows / (3 x 64): OpenShape always uses 64-wide heads. Grouping (num_patches, radius, num_samples) leaves
  no trace in the weights: it is taken from the OpenShape scaling with these sizes (scaling 4's when none matches,
  see `openshape_scaling`).
  """
  state_dict = without_module_prefix(state_dict)
  if _SIGNATURE not in state_dict:
    raise ValueError(f'not a PPAT state dict: key {_SIGNATURE!r} is missing')
  # Sizes several tensors carry are read from all of them, the majority wins: one mis-shaped tensor is then named
  # by the shape check instead of resizing the model around it.
  width = torch_io.vote(
    state_dict, [(_SIGNATURE, 0), ('ppat.lift.0.weight', 0), ('ppat.lift.2.weight', 0), ('proj.weight', 1)]
  )
  depth = _count(state_dict, _LAYER.pattern)
  if depth == 0:
    raise ValueError('not a PPAT state dict: no ppat.transformer.layers.<i> entries')
  num_sa = _count(state_dict, r'ppat\.sa\.mlp_convs\.(\d+)\.weight$')
  if num_sa == 0:
    raise ValueError("not a PPAT state dict: no 'ppat.sa.mlp_convs.<i>.weight' entries")
  sa_channels = tuple(torch_io.shape_of(state_dict, f'ppat.sa.mlp_convs.{i}.weight', 'PPAT')[0] for i in range(num_sa))
  inner = torch_io.shape_of(state_dict, 'ppat.transformer.layers.0.0.fn.to_qkv.weight', 'PPAT')[0] // 3
  head_dim = 64 if inner % 64 == 0 else inner
  kwargs = dict(
    width=width,
    depth=depth,
    num_heads=inner // head_dim,
    head_dim=head_dim,
    mlp_dim=torch_io.shape_of(state_dict, 'ppat.transformer.layers.0.1.fn.net.0.weight', 'PPAT')[0],
    sa_channels=sa_channels,
    in_channels=torch_io.shape_of(state_dict, 'ppat.sa.mlp_convs.0.weight', 'PPAT')[1] - 3,
    embed_dim=torch_io.shape_of(state_dict, 'proj.weight', 'PPAT')[0],
  )
  grouping = OPENSHAPE_SCALINGS[openshape_scaling(kwargs) or 4]
  kwargs.update({k: grouping[k] for k in ('num_patches', 'radius', 'num_samples')})
  return kwargs


def check_state_dict(state_dict: Mapping[str, Any], model: PPAT) -> None:
  """ValueError naming every missing, unexpected, mis-shaped (both shapes) or non-float entry, a few of each."""
  torch_io.check_state_dict(state_dict, expected_torch_shapes(model), 'PPAT')


def ppat_from_torch(state_dict: Mapping[str, Any], model: PPAT | None = None) -> tuple[dict, dict]:
  """OpenShape's `Projected` state dict (`module.` stripped or not; torch tensors or arrays) -> float32 Flax
  (params with the layers stacked, batch_stats).

  Every key and shape is checked against `model`; without one, against a PPAT with the sizes read off the state
  dict (so only internal inconsistencies are caught).
  """
  state_dict = without_module_prefix(state_dict)
  model = model or PPAT(**ppat_kwargs_from_torch(state_dict))
  check_state_dict(state_dict, model)
  variables = torch_io.torch_to_flax(state_dict, _model_entries(model), expected_variables(model))
  return stack_layers(variables[PARAMS]), variables.get(BATCH_STATS, {})


# --- the released file ------------------------------------------------------------------------------------------


def _state_dict_of(path: pathlib.Path, loaded: Any) -> tuple[Mapping[str, Any], dict[str, Any]]:
  """The checkpoint's model state dict and its other entries, or a CheckpointFormatError saying what the file is."""
  if isinstance(loaded, Mapping) and 'state_dict' in loaded:
    state, rest = loaded['state_dict'], {k: v for k, v in loaded.items() if k != 'state_dict'}
  elif isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
    state, rest = loaded, {}  # a bare state dict, as `torch.save(model.state_dict())` writes
  elif isinstance(loaded, Mapping) and ('base_model' in loaded or 'model' in loaded):
    raise CheckpointFormatError(
      path,
      "not an OpenShape checkpoint: it holds a 'base_model' (a CG3D / Point-BERT checkpoint: "
      'weights.cg3d_pth.load_cg3d_checkpoint reads those), not the state_dict OpenShape saves',
    )
  else:
    what = f'top-level keys {sorted(map(str, loaded))[:10]}' if isinstance(loaded, Mapping) else type(loaded).__name__
    raise CheckpointFormatError(
      path,
      f"not an OpenShape checkpoint: expected a dict with a 'state_dict' (what OpenShape's Trainer.save_model "
      f'writes), got {what}',
    )
  if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise CheckpointFormatError(path, "'state_dict' is not a state dict of tensors")
  state = strip_module_prefix(path, state)
  if _SIGNATURE not in state:
    raise CheckpointFormatError(
      path,
      f"not an OpenShape PPAT ('PointBERT') checkpoint: its state_dict has no {_SIGNATURE!r}, so it is another "
      f"backbone (OpenShape's SparseConv 'spconv' models are MinkowskiEngine networks) or another model; first keys: "
      f'{list(state)[:6]}',
    )
  return state, rest


def _plain_number(value) -> float | int | None:
  if isinstance(value, torch.Tensor) and value.numel() == 1:
    return value.item()
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def is_openshape_container(loaded) -> bool:
  """Whether what cg3d_pth.load_file read is OpenShape's: a state_dict holding a PPAT."""
  state = loaded.get('state_dict') if isinstance(loaded, Mapping) else None
  if not isinstance(state, Mapping):
    return False
  return _SIGNATURE in state or f'module.{_SIGNATURE}' in state


def read_openshape_checkpoint(path, model: PPAT | None = None, loaded=None) -> tuple[PPAT, dict, dict, dict]:
  """A released OpenShape PPAT `model.pt` -> (model, params (layers stacked), batch_stats, info).

  Loaded with torch.load(weights_only=True) (cg3d_pth.load_file; `loaded`: what it returned, when the caller has
  read the file already): nothing pickled in the file runs. model: the PPAT to check the weights
  against; default one sized from the weights (see ppat_kwargs_from_torch for what the weights cannot say; listed
  in info['assumed']). info: {'path', 'scaling' (the matching OpenShape model.scaling or None), 'epoch', 'step',
  'logit_scale' (exp of the stored log scale, or None), 'num_batches_tracked', 'other_entries' (the file's other
  top-level keys, optimizer and scheduler among them, unused), 'assumed'}. Every refusal is a CheckpointFormatError
  naming the file: not a torch file, truncated, needing pickled code, of no known family, missing or mis-shaped
  tensors (named, with both shapes), non-finite weights.
  """
  path = pathlib.Path(path)
  if loaded is None:
    loaded = load_file(path)
  state, rest = _state_dict_of(path, loaded)
  assumed = []
  try:
    if model is None:
      kwargs = ppat_kwargs_from_torch(state)
      scaling = openshape_scaling(kwargs)
      assumed.append(
        f'num_patches={kwargs["num_patches"]}, radius={kwargs["radius"]}, num_samples={kwargs["num_samples"]} '
        + (f'(OpenShape scaling {scaling}' if scaling else '(no OpenShape scaling has these sizes: scaling 4')
        + "'s grouping; not recorded in the weights)"
      )
      model = PPAT(**kwargs)
    params, batch_stats = ppat_from_torch(state, model)
  except ValueError as err:
    raise CheckpointFormatError(path, str(err)) from None
  bad = non_finite({'params': params, 'batch_stats': batch_stats})
  if bad:
    raise CheckpointFormatError(path, f'non-finite (NaN/Inf) weights in {bad[:5]}')
  log_scale = rest.get('logit_scale')
  if isinstance(log_scale, Mapping):
    log_scale = next((v for k, v in log_scale.items() if k.endswith('logit_scale')), None)
  log_scale = _plain_number(log_scale)
  tracked = [int(v) for k, v in state.items() if k.endswith('.num_batches_tracked')]
  info = dict(
    path=str(path),
    scaling=openshape_scaling(
      dict(
        width=model.width,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_dim=model.mlp_dim,
        sa_channels=model.sa_channels,
      )
    ),
    epoch=_plain_number(rest.get('epoch')),
    step=_plain_number(rest.get('step')),
    logit_scale=None if log_scale is None else float(np.exp(log_scale)),
    num_batches_tracked=max(tracked, default=0),
    other_entries=sorted(map(str, rest)),
    assumed=assumed,
  )
  return model, params, batch_stats, info


def write_checkpoint(path, params, batch_stats, *, step: int = 0) -> pathlib.Path:
  """The encoder as OpenShape's Trainer.save_model keeps it: {'state_dict' (`module.` keys, as from
  DistributedDataParallel), 'epoch', 'step'}, atomically; its own `model.load_state_dict(checkpoint['state_dict'])`
  (after DDP wrapping) reads it. The optimizer, scheduler and logit-scale entries of a training checkpoint are not
  written: the export is an encoder."""
  state = ppat_to_torch(params, batch_stats, num_batches_tracked=step)
  container = {'state_dict': collections.OrderedDict((f'module.{k}', v) for k, v in state.items()), 'epoch': 0}
  container['step'] = int(step)
  path = pathlib.Path(path)
  atomic_write(path, lambda f: torch.save(container, f))
  return path
