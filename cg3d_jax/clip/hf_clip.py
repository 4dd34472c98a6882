"""Loads a local transformers CLIP folder into the Flax `CLIP`: config, weights, tokenizer, image preprocessing.

The folder is what `CLIPModel.save_pretrained` plus the tokenizer and image processor write (the layout of the
Hugging Face hub repositories such as openai/clip-vit-base-patch16): config.json, model.safetensors (or a sharded
index, or pytorch_model.bin), tokenizer files and preprocessor_config.json. Nothing is ever downloaded: a hub name
that is not a local folder is an error that says so.
"""

import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from cg3d_jax.clip.loaded_clip import CLIPLoadError, ImagePreprocess, LoadedCLIP, expected_shapes
from cg3d_jax.models.clip import CLIP, CLIPSpec, init_prompts
from cg3d_jax.trees import stack_layers, unflatten
from cg3d_jax.weights import safetensors_files

_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin')
# Buffers that old transformers versions saved next to the weights; they hold arange(n) and carry no information.
_IGNORED_KEYS = re.compile(r'^(vision_model|text_model)\.embeddings\.position_ids$')


def _looks_like_hub_name(path: str) -> bool:
  return bool(re.fullmatch(r'[A-Za-z0-9][\w.\-]*/[\w.\-]+', path))


def _check_folder(path) -> pathlib.Path:
  folder = pathlib.Path(os.path.expanduser(str(path)))
  if folder.is_dir():
    return folder
  if not folder.exists() and _looks_like_hub_name(str(path)):
    raise CLIPLoadError(
      f'CLIP path {str(path)!r} looks like a Hugging Face hub name but is not a local folder. Nothing is '
      f'downloaded here: download the model elsewhere (e.g. `huggingface-cli download {path} --local-dir DIR`) '
      f'and point clip.path at that local folder (config.json, model.safetensors, tokenizer and '
      f'preprocessor files).'
    )
  if folder.exists():
    raise CLIPLoadError(f'CLIP path {str(folder)!r} is a file; expected a transformers CLIP folder')
  raise CLIPLoadError(f'CLIP folder {str(folder)!r} does not exist')


def load_hf_config(folder: pathlib.Path):
  """Reads config.json as a transformers `CLIPConfig`, after checking that it describes a CLIP model."""
  from transformers import CLIPConfig  # imported here: importing transformers is slow and only loading needs it

  config_path = folder / 'config.json'
  if not config_path.is_file():
    raise CLIPLoadError(f'{config_path} is missing: a transformers CLIP folder needs its config.json')
  with open(config_path, encoding='utf-8') as f:
    raw = json.load(f)
  if raw.get('model_type') != 'clip':
    raise CLIPLoadError(
      f'{config_path} describes model_type {raw.get("model_type")!r}, expected "clip" '
      f'(a transformers CLIPModel with vision_config and text_config)'
    )
  return CLIPConfig.from_pretrained(str(folder), local_files_only=True)


def read_state_dict(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of the folder's weight file(s), as float32 NumPy arrays keyed by transformers' names."""
  present = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
  if not present:
    raise CLIPLoadError(f'no weights in CLIP folder {str(folder)!r}: expected one of {", ".join(_WEIGHT_FILES)}')
  name = present[0]
  if name == 'model.safetensors':
    return _read_safetensors(folder / name)
  if name == 'model.safetensors.index.json':
    with open(folder / name, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    state = {}
    for shard in shards:
      if not (folder / shard).is_file():
        raise CLIPLoadError(f'{folder / name} lists shard {shard!r}, which is missing')
      state.update(_read_safetensors(folder / shard))
    return state
  from cg3d_jax.weights import torch_files  # only the legacy pickle format needs torch

  state = torch_files.load(folder / name, what='a transformers weight file')
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, dtype=np.float32) for k, v in safetensors_files.read_tensors(path).items()}


def _layer_names(layers: int) -> dict[str, tuple[str, bool]]:
  """Per-layer (flax path suffix, torch name suffix, is a Linear weight needing a transpose)."""
  names = {}
  for i in range(layers):
    for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      names[f'layers_{i}/self_attn/{proj}/kernel'] = (f'encoder.layers.{i}.self_attn.{proj}.weight', True)
      names[f'layers_{i}/self_attn/{proj}/bias'] = (f'encoder.layers.{i}.self_attn.{proj}.bias', False)
    for fc in ('fc1', 'fc2'):
      names[f'layers_{i}/mlp/{fc}/kernel'] = (f'encoder.layers.{i}.mlp.{fc}.weight', True)
      names[f'layers_{i}/mlp/{fc}/bias'] = (f'encoder.layers.{i}.mlp.{fc}.bias', False)
    for norm in ('layer_norm1', 'layer_norm2'):
      names[f'layers_{i}/{norm}/scale'] = (f'encoder.layers.{i}.{norm}.weight', False)
      names[f'layers_{i}/{norm}/bias'] = (f'encoder.layers.{i}.{norm}.bias', False)
  return names


def torch_names(spec: CLIPSpec) -> dict[str, tuple[str, str]]:
  """Flax parameter path ('vision/layers_0/mlp/fc1/kernel') -> (transformers state-dict key, layout rule).

  Layout rules: 'copy'; 'linear' (torch [out, in] -> flax [in, out]); 'conv' (torch OIHW -> flax HWIO).
  """
  names = {
    'vision/patch_embedding/kernel': ('vision_model.embeddings.patch_embedding.weight', 'conv'),
    'vision/class_embedding': ('vision_model.embeddings.class_embedding', 'copy'),
    'vision/position_embedding/embedding': ('vision_model.embeddings.position_embedding.weight', 'copy'),
    'vision/pre_layernorm/scale': ('vision_model.pre_layrnorm.weight', 'copy'),
    'vision/pre_layernorm/bias': ('vision_model.pre_layrnorm.bias', 'copy'),
    'vision/post_layernorm/scale': ('vision_model.post_layernorm.weight', 'copy'),
    'vision/post_layernorm/bias': ('vision_model.post_layernorm.bias', 'copy'),
    'text/token_embedding/embedding': ('text_model.embeddings.token_embedding.weight', 'copy'),
    'text/position_embedding/embedding': ('text_model.embeddings.position_embedding.weight', 'copy'),
    'text/final_layer_norm/scale': ('text_model.final_layer_norm.weight', 'copy'),
    'text/final_layer_norm/bias': ('text_model.final_layer_norm.bias', 'copy'),
    'visual_projection/kernel': ('visual_projection.weight', 'linear'),
    'text_projection/kernel': ('text_projection.weight', 'linear'),
    'logit_scale': ('logit_scale', 'copy'),
  }
  for tower, prefix, layers in (
    ('vision', 'vision_model', spec.vision_layers),
    ('text', 'text_model', spec.text_layers),
  ):
    for flax_suffix, (torch_suffix, is_linear) in _layer_names(layers).items():
      names[f'{tower}/{flax_suffix}'] = (f'{prefix}.{torch_suffix}', 'linear' if is_linear else 'copy')
  return names


_TO_TORCH_LAYOUT = {'copy': lambda s: s, 'linear': lambda s: s[::-1], 'conv': lambda s: (s[3], s[2], s[0], s[1])}
_FROM_TORCH = {'copy': lambda a: a, 'linear': lambda a: a.T, 'conv': lambda a: a.transpose(2, 3, 1, 0)}


def clip_params_from_state_dict(state_dict: dict[str, np.ndarray], spec: CLIPSpec) -> dict:
  """transformers CLIPModel state dict -> Flax parameter tree (no prompts, layers stacked), every tensor present and
  shape-checked."""
  shapes = expected_shapes(spec)
  names = torch_names(spec)
  if set(shapes) != set(names):  # a guard on this module's own tables, not on the checkpoint
    raise AssertionError(f'flax/torch name tables disagree: {sorted(set(shapes) ^ set(names))}')
  used = set()
  flat = {}
  for flax_path, (key, layout) in names.items():
    want = _TO_TORCH_LAYOUT[layout](shapes[flax_path])
    if key not in state_dict:
      raise CLIPLoadError(f'CLIP checkpoint is missing tensor {key!r} (expected shape {want})')
    value = np.asarray(state_dict[key])
    if tuple(value.shape) != tuple(want):
      raise CLIPLoadError(
        f'CLIP checkpoint tensor {key!r} has shape {tuple(value.shape)}, expected {want} for the config'
      )
    # np.array, not np.ascontiguousarray: the latter turns the 0-d logit_scale into shape (1,).
    flat[flax_path] = np.array(_FROM_TORCH[layout](value.astype(np.float32)), order='C')
    used.add(key)
  bad = sorted(key for key in used if not np.all(np.isfinite(np.asarray(state_dict[key], np.float32))))
  if bad:
    raise CLIPLoadError(f'CLIP checkpoint tensor(s) hold NaN or infinity: {bad[:5]}')
  unexpected = sorted(k for k in state_dict if k not in used and not _IGNORED_KEYS.match(k))
  if unexpected:
    raise CLIPLoadError(
      f'CLIP checkpoint has tensors the config does not account for: {unexpected[:10]}'
      f'{" ..." if len(unexpected) > 10 else ""}'
    )
  return stack_layers(unflatten(flat))


def load_tokenizer(folder: pathlib.Path):
  from transformers import CLIPTokenizer

  has_json = (folder / 'tokenizer.json').is_file()
  has_bpe = (folder / 'vocab.json').is_file() and (folder / 'merges.txt').is_file()
  if not (has_json or has_bpe):
    raise CLIPLoadError(
      f'no tokenizer in CLIP folder {str(folder)!r}: expected tokenizer.json or vocab.json + merges.txt'
    )
  return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_preprocess(folder: pathlib.Path) -> ImagePreprocess:
  path = folder / 'preprocessor_config.json'
  if not path.is_file():
    raise CLIPLoadError(f'{path} is missing: the image size, mean and std come from it')
  with open(path, encoding='utf-8') as f:
    return ImagePreprocess.from_config(json.load(f), source=str(path))


def load_transformers_clip(
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
  """Loads a local transformers CLIP folder; prompts (if any) are freshly initialised from `seed`."""
  folder = _check_folder(path)
  hf_config = load_hf_config(folder)
  spec = CLIPSpec.from_hf_config(hf_config)
  params = clip_params_from_state_dict(read_state_dict(folder), spec)
  prompts = init_prompts(jax.random.key(seed), spec, prompt_mode, num_prompts)
  if prompts is not None:
    params['prompts'] = prompts
  params = jax.tree.map(jnp.asarray, params)
  model = CLIP(
    spec,
    prompt_mode=prompt_mode,
    num_prompts=num_prompts,
    dtype=dtype,
    remat=remat,
    attention=attention,
    scan_layers=scan_layers,
  )
  return LoadedCLIP(
    model=model,
    params=params,
    tokenizer=load_tokenizer(folder),
    preprocess=load_preprocess(folder),
    spec=spec,
    hf_config=hf_config,
    source=str(folder),
  )
