"""The original CG3D checkpoint container: write a point encoder (and the visual prompts) as the PyTorch code saves
them, and read original or exported checkpoints back into Flax variables.

The `.pth` container is the dict the original `tools/builder.save_checkpoint` writes with `torch.save`:

  'base_model'         the point encoder's state dict in the original names: every entry a strict
                       `load_state_dict` of `PointTransformerProject` / PointMLP `ModelProject` needs, BatchNorm
                       running statistics and `num_batches_tracked` included, and for the PointTransformer the
                       `cls_head_finetune` head (55 classes at pre-training).
  'visual_clip_model'  {'prompt_embeddings': [1, n, width], 'deep_prompt_embeddings': [layers-1, n, width]}, the
                       parameter names of the original prompted ViT (`deep_prompt_embeddings` only for deep prompts;
                       the entry is absent when the run trained no prompts). The original stores its whole SLIP
                       visual state dict here (timm's names, frozen tensors beside the prompts): so does an export of
                       a run on SLIP; a run on a transformers CLIP exports only the prompts (load them with
                       strict=False, README).
  'epoch'              completed epochs, -1 when unknown (the original's own "no epoch" value).
  'metrics', 'best_metrics'   plain dicts of the exported step's validation metrics ({} when there were none).
  'config'             the cg3d-jax config as a plain dict; 'step' the training step; 'encoder' the encoder name.
There is no 'optimizer' entry: the original reads it only to resume its own runs.

The `safetensors` format holds the same tensors under flat names ('base_model.<key>',
'visual_clip_model.prompt_embeddings', ...) and writes everything else to a JSON sidecar next to it (`<stem>.json`).

Reading always uses `torch.load(..., weights_only=True)`: a file that needs any pickled object other than tensors and
plain containers is refused before anything in it runs.
"""

import argparse
import collections
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np
import torch

from cg3d_jax.atomic import atomic_write
from cg3d_jax.errors import BadInputError, InputError
from cg3d_jax.trees import unstack_layers
from cg3d_jax.weights import pointmlp_state_dict, safetensors_files, torch_files, torch_io

POINT_TRANSFORMER, POINTMLP = 'point_transformer', 'pointmlp'
PROMPT_KEY, DEEP_PROMPT_KEY = 'prompt_embeddings', 'deep_prompt_embeddings'
SAFETENSORS_FORMAT = 'cg3d-jax-safetensors/1'
# One key that only this encoder's state dict has, to tell the encoders apart in an original checkpoint.
_SIGNATURE_KEYS = {POINT_TRANSFORMER: 'cls_token', POINTMLP: 'embedding.net.0.weight'}


class CheckpointFormatError(InputError):
  """A file that is not a (safe) CG3D checkpoint, or whose contents do not fit the encoder."""

  def __init__(self, path, message: str):
    super().__init__(f'{os.fspath(path)}: {message}')


# --- building the container ---------------------------------------------------------------------------------------


def encoder_state_dict(
  encoder: str, params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, num_batches_tracked: int = 0
) -> 'collections.OrderedDict[str, torch.Tensor]':
  """Flax encoder variables -> the original `base_model` state dict (float32 tensors, original key order)."""
  if encoder == POINT_TRANSFORMER:
    return torch_io.point_transformer_to_torch(params, batch_stats, num_batches_tracked=num_batches_tracked)
  if encoder == POINTMLP:
    return pointmlp_state_dict.pointmlp_to_torch(params, batch_stats, num_batches_tracked=num_batches_tracked)
  raise ValueError(f'unknown encoder {encoder!r}; expected {POINT_TRANSFORMER!r} or {POINTMLP!r}')


def prompts_to_torch(prompts, prompt_mode: str) -> dict[str, torch.Tensor]:
  """(layers or 1, n, width) prompt tokens -> the original prompted ViT's parameters (layer 0 | layers 1..)."""
  if prompts is None or prompt_mode == 'none':
    return {}
  tokens = np.asarray(prompts, dtype=np.float32)
  if tokens.ndim != 3 or tokens.shape[0] < 1:
    raise ValueError(f'prompts must have shape (layers or 1, num_tokens, width), got {tokens.shape}')
  if prompt_mode == 'shallow':
    if tokens.shape[0] != 1:
      raise ValueError(f'shallow prompts must have shape (1, num_tokens, width), got {tokens.shape}')
    return {PROMPT_KEY: torch.from_numpy(tokens.copy())}
  if prompt_mode != 'deep':
    raise ValueError(f"prompt mode must be 'deep', 'shallow' or 'none', got {prompt_mode!r}")
  # Separate copies: safetensors refuses tensors that share storage.
  return {PROMPT_KEY: torch.from_numpy(tokens[:1].copy()), DEEP_PROMPT_KEY: torch.from_numpy(tokens[1:].copy())}


def build_container(
  encoder: str,
  params,
  batch_stats,
  *,
  prompts=None,
  prompt_mode: str = 'none',
  step: int = 0,
  epoch: int = -1,
  metrics: Mapping[str, Any] | None = None,
  config: Mapping[str, Any] | None = None,
  num_batches_tracked: int = 0,
  frozen_visual: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Everything an export writes, as the `.pth` dict (see the module docstring). frozen_visual: a SLIP run's frozen
  image tower in timm's names, saved beside the prompts as the original saves its whole prompted ViT."""
  metrics = _plain(dict(metrics or {}), 'metrics')
  container = {'base_model': encoder_state_dict(encoder, params, batch_stats, num_batches_tracked=num_batches_tracked)}
  visual = prompts_to_torch(prompts, prompt_mode)
  if visual and frozen_visual:
    visual = {**{k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in frozen_visual.items()}, **visual}
  if visual:
    container['visual_clip_model'] = collections.OrderedDict(visual)
  container.update(
    epoch=int(epoch),
    metrics=metrics,
    best_metrics=dict(metrics),
    step=int(step),
    encoder=encoder,
    config=_plain(dict(config or {}), 'config'),
  )
  return container


def _plain(value, what: str):
  """Plain JSON types (dict, list, str, numbers, bool, None): what weights_only loading and the sidecar accept."""

  def convert(obj):
    if isinstance(obj, np.generic):
      return obj.item()
    if isinstance(obj, np.ndarray):
      return obj.tolist()
    raise TypeError(f'{what}: {type(obj).__name__} is not a plain value: {obj!r}')

  return json.loads(json.dumps(value, default=convert))


# --- fine-tuned classifiers (Point-BERT's fine-tune container) ---------------------------------------------------


def _pointmlp_classifier_entries(params: Mapping[str, Any]) -> list:
  pre = tuple(
    len([k for k in params[f'pre_blocks_{i}'] if k.startswith('block_')])
    for i in range(len([k for k in params if k.startswith('pre_blocks_')]))
  )
  pos = tuple(len([k for k in params.get(f'pos_blocks_{i}', {}) if k.startswith('block_')]) for i in range(len(pre)))
  entries = [e for e in pointmlp_state_dict.pointmlp_entries(pre, pos) if not e.torch_key.startswith('projection.')]
  for i in (0, 4, 8):
    entries += torch_io.linear(f'classifier.{i}', f'classifier_{i}')
  for i in (1, 5):
    entries += torch_io.batch_norm(f'classifier.{i}', f'classifier_{i}')
  return entries


def classifier_state_dict(
  encoder: str, params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, num_batches_tracked: int = 0
) -> 'collections.OrderedDict[str, torch.Tensor]':
  """Fine-tuned classifier variables -> the original fine-tune `base_model` state dict.

  point_transformer: the pretraining keys without `projection.*`, with cls_head_finetune.{0,3} sized to C (what
  Point-BERT's PointTransformer classifier loads strictly). pointmlp: the CG3D PointMLP keys without `projection.*`
  plus the original pointMLP `classifier.{0,1,4,5,8}`.
  """
  params = {k: v for k, v in unstack_layers(params).items() if k != 'projection'}
  if encoder == POINT_TRANSFORMER:
    depth = len([k for k in params if k.startswith('blocks_')])
    entries = [
      e for e in torch_io.point_transformer_entries(depth, with_head=True) if not e.torch_key.startswith('projection.')
    ]
  elif encoder == POINTMLP:
    entries = _pointmlp_classifier_entries(params)
  else:
    raise ValueError(f'unknown encoder {encoder!r}; expected {POINT_TRANSFORMER!r} or {POINTMLP!r}')
  return torch_io.flax_to_torch(
    {'params': params, 'batch_stats': batch_stats}, entries, num_batches_tracked=num_batches_tracked
  )


def finetune_container(state_dict, *, epoch: int, accuracy: float) -> dict[str, Any]:
  """Point-BERT's fine-tune checkpoint: {'base_model', 'epoch', 'metrics': {'acc'}, 'best_metrics': {'acc'}}, the
  accuracy in percent (of the exported step)."""
  return {
    'base_model': state_dict,
    'epoch': int(epoch),
    'metrics': {'acc': float(accuracy)},
    'best_metrics': {'acc': float(accuracy)},
  }


# --- writing ------------------------------------------------------------------------------------------------------


def write_cg3d_checkpoint(path, container: Mapping[str, Any]) -> pathlib.Path:
  """The `.pth` container, written with torch.save atomically."""
  path = pathlib.Path(path)
  atomic_write(path, lambda f: torch.save(dict(container), f))
  return path


def write_container(path, container: Mapping[str, Any], fmt: str) -> list[pathlib.Path]:
  """The container as `fmt` says: 'cg3d' (the original .pth) or 'safetensors' (tensors + JSON sidecar)."""
  if fmt == 'cg3d':
    return [write_cg3d_checkpoint(path, container)]
  return list(write_safetensors_checkpoint(path, container))


def write_finetune_checkpoint(
  path, encoder: str, variables: Mapping[str, Any], *, step: int, epoch: int, accuracy: float
) -> int:
  """A fine-tuned classifier as Point-BERT's fine-tune .pth (accuracy in percent); returns its state-dict size."""
  state_dict = classifier_state_dict(encoder, variables['params'], variables['batch_stats'], num_batches_tracked=step)
  write_cg3d_checkpoint(path, finetune_container(state_dict, epoch=epoch, accuracy=accuracy))
  return len(state_dict)


def sidecar_path(path) -> pathlib.Path:
  return pathlib.Path(path).with_suffix('.json')


def write_safetensors_checkpoint(path, container: Mapping[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
  """Tensors to `path` (flat names), everything else to the JSON sidecar; each file written atomically.

  The sidecar is renamed into place first, so a present tensor file always has its complete sidecar.
  """
  from safetensors.torch import save as safetensors_bytes

  path = pathlib.Path(path)
  if path.suffix == '.json':
    raise ValueError(f'{path}: a safetensors export needs a name not ending in .json (the sidecar is <stem>.json)')
  tensors = {f'base_model.{k}': v.contiguous() for k, v in container['base_model'].items()}
  tensors.update({f'visual_clip_model.{k}': v.contiguous() for k, v in container.get('visual_clip_model', {}).items()})
  side = {k: v for k, v in container.items() if k not in ('base_model', 'visual_clip_model')}
  side['format'] = SAFETENSORS_FORMAT
  data = safetensors_bytes(
    tensors, metadata={'format': 'pt', 'cg3d_jax': SAFETENSORS_FORMAT, 'encoder': str(container.get('encoder', ''))}
  )
  atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(side, indent=1).encode()))
  try:
    atomic_write(path, lambda f: f.write(data))
  except BaseException:
    sidecar_path(path).unlink(missing_ok=True)  # a sidecar without its tensors would describe nothing
    raise
  return path, sidecar_path(path)


# --- reading ------------------------------------------------------------------------------------------------------


def load_file(path):
  """What a `.pth` / `.pt` holds (the one safe load: weights_only, `argparse.Namespace` allowed for the `args` that
  SLIP's and ULIP's files carry), so that the families' readers share it; None for a `.safetensors` (read_container
  reads it)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  if path.suffix == '.safetensors':
    return None
  try:
    return torch_files.load(path, allowed=(argparse.Namespace,), what='a PyTorch checkpoint')
  except BadInputError as err:
    raise CheckpointFormatError(path, err.reason) from None


def _read_safetensors(path: pathlib.Path) -> dict[str, Any]:
  flat = {k: torch.from_numpy(np.array(v)) for k, v in safetensors_files.read_tensors(path).items()}
  container: dict[str, Any] = {}
  side = sidecar_path(path)
  if side.is_file():
    try:
      container.update(json.loads(side.read_text()))
    except json.JSONDecodeError as err:
      raise CheckpointFormatError(side, f'sidecar is not valid JSON ({err})') from None
  for name, value in flat.items():
    group, dot, key = name.partition('.')
    if not dot or group not in ('base_model', 'visual_clip_model'):
      raise CheckpointFormatError(path, f"tensor {name!r} is neither 'base_model.<key>' nor 'visual_clip_model.<key>'")
    container.setdefault(group, {})[key] = value
  if 'base_model' not in container:
    raise CheckpointFormatError(path, "no 'base_model.<key>' tensors: not a cg3d-jax safetensors export")
  return container


def read_container(path, loaded=None) -> dict[str, Any]:
  """A `.pth` (original or exported) or an exported `.safetensors` -> the container dict (plain values, tensors).
  loaded: what load_file(path) returned, when the caller has read it already."""
  path = pathlib.Path(path)
  if path.suffix == '.safetensors':
    if not path.is_file():
      raise FileNotFoundError(f'{path}: no such checkpoint file')
    return _read_safetensors(path)
  if loaded is None:
    loaded = load_file(path)
  if not isinstance(loaded, Mapping):
    raise CheckpointFormatError(
      path,
      f'not a CG3D checkpoint: the file holds a {type(loaded).__name__}, expected a '
      "dict with a 'base_model' state dict",
    )
  if 'base_model' not in loaded and 'model' not in loaded:
    if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
      return {'base_model': loaded}  # a bare state dict, as some released encoders are
    state = loaded.get('state_dict')
    found = f'top-level keys are {sorted(map(str, loaded))[:10]}'
    if isinstance(state, Mapping):
      found = f"its 'state_dict' starts {list(state)[:4]}"
    raise CheckpointFormatError(
      path,
      f"not a checkpoint of a known family: {found}; expected CG3D's 'base_model' (or 'model') state dict, "
      "ULIP's 'state_dict' with point_encoder.* and pc_projection, or OpenShape's with ppat.* and proj.*",
    )
  container = dict(loaded)
  if 'base_model' not in container:
    container['base_model'] = container.pop('model')
  return container


def strip_module_prefix(path, state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops the `module.` that (Distributed)DataParallel puts in front of every key."""
  out = {}
  for key, value in state_dict.items():
    name = key[len('module.') :] if key.startswith('module.') else key
    if name in out:
      raise CheckpointFormatError(path, f'both {name!r} and module.{name!r} are present')
    out[name] = value
  return out


def without_module_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """strip_module_prefix where the state dict has the prefix; the state dict itself otherwise."""
  if not any(k.startswith('module.') for k in state_dict):
    return state_dict
  return strip_module_prefix('state_dict', state_dict)


def detect_encoder(path, state_dict: Mapping[str, Any]) -> str:
  found = [name for name, key in _SIGNATURE_KEYS.items() if key in state_dict]
  if len(found) != 1:
    raise CheckpointFormatError(
      path,
      f'cannot tell the point encoder from the base_model keys: expected exactly one of '
      f'{sorted(_SIGNATURE_KEYS.values())} (PointTransformer / PointMLP); first keys: {list(state_dict)[:8]}',
    )
  return found[0]


def _model_for(path, encoder: str, state_dict, config: Mapping[str, Any] | None, assumed: list[str]):
  """The Flax encoder whose shapes the state dict must have: from the saved config, else read off the weights."""
  from cg3d_jax.models.point_transformer import PointTransformer
  from cg3d_jax.models.pointmlp import PointMLP

  if config and 'model' in config:
    model_config = config['model']
    if model_config.get('encoder') != encoder:
      raise CheckpointFormatError(
        path, f'config says encoder {model_config.get("encoder")!r} but the weights are a {encoder}'
      )
    import ml_collections

    from cg3d_jax.models.cg3d import build_encoder

    try:
      return build_encoder(ml_collections.ConfigDict(dict(model_config)))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
      raise CheckpointFormatError(
        path,
        f"the saved config['model'] does not describe a cg3d-jax encoder ({err}); pass model= to load_cg3d_checkpoint",
      ) from None
  try:
    if encoder == POINT_TRANSFORMER:
      kwargs = torch_io.point_transformer_kwargs_from_torch(state_dict)
      # The weights do not fix the head count or grouping; CG3D's values are the only ones it released.
      kwargs['num_heads'] = PointTransformer.num_heads
      assumed.append(
        f'num_heads={PointTransformer.num_heads}, num_groups={PointTransformer.num_groups}, '
        f"group_size={PointTransformer.group_size} (CG3D's; not recorded in the weights)"
      )
      return PointTransformer(**kwargs)
    kwargs = pointmlp_state_dict.pointmlp_kwargs_from_torch(state_dict)
    assumed.append("k_neighbors=24, reducers=2 in every stage (CG3D's; not recorded in the weights)")
    return PointMLP(**kwargs)
  except (ValueError, KeyError, IndexError) as err:
    raise CheckpointFormatError(path, f'base_model is not a usable {encoder} state dict: {err}') from None


def sized_encoder(model_config, state_dict: Mapping[str, Any]):
  """The encoder as `model_config` sizes it, with the projection and head sizes the state dict holds."""
  from cg3d_jax.models.point_transformer import PointTransformer
  from cg3d_jax.models.pointmlp import PointMLP

  projection = state_dict.get('projection.weight')
  if model_config.encoder == POINT_TRANSFORMER:
    model = PointTransformer.from_config(model_config)
    hidden, head = state_dict.get('cls_head_finetune.0.weight'), state_dict.get('cls_head_finetune.3.weight')
    model = model.clone(
      num_classes=None if head is None else int(head.shape[0]),
      head_hidden=model.head_hidden if hidden is None else int(hidden.shape[0]),
    )
    return model if projection is None else model.clone(embed_dim=int(projection.shape[0]))
  model = PointMLP.from_config(model_config)
  return model if projection is None else model.clone(projection_dim=int(projection.shape[0]))


def has_classification_head(container: Mapping[str, Any]) -> bool:
  """Whether the container's Point-BERT encoder carries the `cls_head_finetune` the original builds (its strict load
  reports it missing otherwise)."""
  return 'cls_head_finetune.0.weight' in container['base_model']


def describe_visual(container: Mapping[str, Any]) -> str:
  """What the container's visual_clip_model holds, for the export's closing line."""
  visual = container.get('visual_clip_model')
  if not visual:
    return 'none'
  prompts = [k for k in visual if k.endswith(PROMPT_KEY)]
  frozen = len(visual) - len(prompts)
  return ', '.join(prompts) + (f' and the {frozen} frozen SLIP image-tower tensors' if frozen else '')


def prompts_from_torch(path, visual: Mapping[str, Any] | None) -> tuple[np.ndarray | None, str]:
  """The original prompted ViT's parameters -> ((layers or 1, n, width) float32 tokens or None, prompt mode)."""
  if not visual or PROMPT_KEY not in visual:
    if visual and DEEP_PROMPT_KEY in visual:
      raise CheckpointFormatError(path, f'visual_clip_model has {DEEP_PROMPT_KEY} but no {PROMPT_KEY}')
    return None, 'none'
  first = _numpy(visual[PROMPT_KEY])
  if first.ndim != 3 or first.shape[0] != 1:
    raise CheckpointFormatError(
      path, f'visual_clip_model.{PROMPT_KEY}: got shape {first.shape}, expected (1, num_tokens, width)'
    )
  deep = visual.get(DEEP_PROMPT_KEY)
  if deep is None:
    return first, 'shallow'
  deep = _numpy(deep)
  if deep.ndim != 3 or deep.shape[1:] != first.shape[1:]:
    raise CheckpointFormatError(
      path,
      f'visual_clip_model.{DEEP_PROMPT_KEY}: got shape {deep.shape}, expected '
      f'(layers - 1, {first.shape[1]}, {first.shape[2]})',
    )
  return np.concatenate([first, deep]), 'deep'


def _numpy(value) -> np.ndarray:
  value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
  return value.astype(np.float32)


def load_cg3d_checkpoint(path, model=None, model_config=None, loaded=None):
  """An original CG3D `.pth` or an exported `.pth` / `.safetensors` -> Flax variables.

  Returns (encoder name ('point_transformer' or 'pointmlp'), params, batch_stats, prompts or None, info).
  prompts: (layers, n, width) for deep prompts, (1, n, width) for shallow ones, as `params['prompts']['tokens']`.
  model: the Flax encoder to check shapes against; default the one in the file's saved config, else one sized
    from the weights with CG3D's values for what weights do not record (listed in info['assumed']).
  model_config: a config.model that sizes the encoder instead (a fine-tuning run's), with the projection and head
    sizes the file holds.
  info: {'path', 'format', 'model' (the Flax encoder), 'epoch', 'step', 'metrics', 'best_metrics', 'config' (plain
    dict or None), 'prompt_mode', 'num_batches_tracked', 'ignored_visual_keys', 'assumed', 'frozen_visual' (the
    frozen SLIP image tower the original saves beside the prompts, timm names -> float32 arrays, or None)}.
  Missing, unexpected and mis-shaped keys are errors that name each key.
  """
  path = pathlib.Path(path)
  container = read_container(path, loaded)
  base = container['base_model']
  if not isinstance(base, Mapping) or not all(isinstance(v, torch.Tensor) for v in base.values()):
    raise CheckpointFormatError(path, 'base_model is not a state dict of tensors')
  state_dict = strip_module_prefix(path, base)
  encoder = detect_encoder(path, state_dict)
  config = container.get('config') or None
  assumed: list[str] = []
  if model is None and model_config is not None:
    model = sized_encoder(model_config, state_dict)
  if model is None:
    model = _model_for(path, encoder, state_dict, config, assumed)
  try:
    if encoder == POINT_TRANSFORMER:
      params, batch_stats = torch_io.point_transformer_from_torch(state_dict, model)
    else:
      params, batch_stats = pointmlp_state_dict.pointmlp_from_torch(state_dict, model)
  except ValueError as err:
    raise CheckpointFormatError(path, f'base_model does not fit the {encoder}: {err}') from None
  visual = container.get('visual_clip_model')
  visual = strip_module_prefix(path, visual) if isinstance(visual, Mapping) else None
  prompts, prompt_mode = prompts_from_torch(path, visual)
  tracked = [int(v) for k, v in state_dict.items() if k.endswith('.num_batches_tracked')]
  info = dict(
    path=str(path),
    format='safetensors' if path.suffix == '.safetensors' else 'pth',
    model=model,
    epoch=epoch if isinstance(epoch := container.get('epoch'), int) else -1,
    step=container.get('step'),
    metrics=container.get('metrics') or {},
    best_metrics=container.get('best_metrics') or {},
    config=config,
    prompt_mode=prompt_mode,
    num_batches_tracked=max(tracked, default=0),
    ignored_visual_keys=sorted(set(visual or {}) - {PROMPT_KEY, DEEP_PROMPT_KEY}),
    assumed=assumed,
    frozen_visual={
      k: _numpy(v)
      for k, v in (visual or {}).items()
      if k not in (PROMPT_KEY, DEEP_PROMPT_KEY) and isinstance(v, torch.Tensor)
    }
    or None,
  )
  return encoder, params, batch_stats, prompts, info
