"""SLIP checkpoints (facebookresearch/SLIP, e.g. `slip_base_100ep.pt`) as the frozen CLIP: CG3D's own backbone.

A SLIP file is what SLIP's `main.py` saves with `torch.save`: {'state_dict': {'module.<key>': tensor}, 'args':
argparse.Namespace, 'epoch', maybe 'optimizer', 'scaler', ...}. Its model (SLIP `models.py`):

  image tower  timm `VisionTransformer` (`visual.*`): patch conv with bias, class token then `pos_embed` (which covers
               the class token), no LayerNorm before the blocks, pre-norm blocks with a fused `attn.qkv` (rows
               q | k | v), exact GELU, LayerNorm eps 1e-6, final `norm`, the class token.
  text tower   OpenAI CLIP's (`transformer.resblocks.*`, `token_embedding`, `positional_embedding`, `ln_final`):
               nn.MultiheadAttention with a fused `in_proj_weight`, quick GELU, eps 1e-5, causal mask, context 77,
               pooled at the largest token id.
  projections  `image_projection` (vision width, embed) and `text_projection` (text width, embed), `x @ P` matrices
               without bias; `logit_scale`. SLIP's self-supervised head `image_mlp.*` is not part of CLIP: ignored.

Heads are not stored: ViT-S/16 (width 384, SLIP's `vit_small_mocov3_patch16_224`) and ViT-B/16 (768) have 12,
ViT-L/16 (1024) 16, other widths (the tests' small towers) width / 64; the text tower has width / 64 (8 at 512).
The `args` Namespace is the one pickled object the loader lets `torch.load(weights_only=True)` rebuild; anything
else in the file is refused before it runs.

Tokens: OpenAI's BPE (the vocabulary the package ships), SLIP's framing: [SOT] + BPE + [EOT], cut to the context
(a cut drops the EOT), padded with 0. Images: shorter side to 224 bilinear, centre crop (torchvision rounds the
offset), /255, ImageNet mean and std.
"""

import argparse
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from cg3d_jax import assets
from cg3d_jax.clip.bpe import END_OF_TEXT, START_OF_TEXT, read_bpe
from cg3d_jax.clip.loaded_clip import CLIPLoadError, ImagePreprocess, LoadedCLIP, expected_shapes
from cg3d_jax.errors import BadInputError
from cg3d_jax.models.clip import CLIP, EOS_POOLING_ARGMAX, CLIPSpec, init_prompts
from cg3d_jax.trees import flatten, stack_layers, unflatten, unstack_layers
from cg3d_jax.weights import torch_files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VISION_HEADS = {384: 12, 768: 12, 1024: 16}  # SLIP's ViT-S/16 (MoCo v3's small: 12 heads), B/16, L/16
SLIP_MODELS = {384: 'SLIP_VITS16', 768: 'SLIP_VITB16', 1024: 'SLIP_VITL16'}
# SLIP's SSL head; the point side of a ULIP checkpoint, which holds the SLIP towers it aligns to (weights/ulip.py).
_IGNORED = re.compile(r'^(image_mlp\.|point_encoder\.|pc_projection$)')
_VISION_BLOCK = re.compile(r'^visual\.blocks\.(\d+)\.')
_TEXT_BLOCK = re.compile(r'^transformer\.resblocks\.(\d+)\.')


def slip_preprocess(image_size: int = 224) -> ImagePreprocess:
  return ImagePreprocess(
    size=image_size,
    crop_size=image_size,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    resample=Image.Resampling.BILINEAR,
    crop_offset='round',
  )


class SLIPTokenizer:
  """OpenAI's BPE framed as SLIP's tokenizer frames it; `token_ids(texts)` -> int32 (N, context) ids."""

  def __init__(self, context_length: int = 77, vocab_path=None):
    from transformers import CLIPTokenizer

    vocab, merges = read_bpe(vocab_path or assets.path(assets.BPE_VOCAB))
    self.bpe = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
    self.model_max_length = context_length
    self.sot, self.eot = vocab[START_OF_TEXT], vocab[END_OF_TEXT]
    self.vocab_size = len(vocab)

  def token_ids(self, texts, context_length: int | None = None) -> np.ndarray:
    context = context_length or self.model_max_length
    out = np.zeros((len(texts), context), np.int32)
    cut = []
    for i, text in enumerate(texts):
      ids = [self.sot, *self.bpe(text, add_special_tokens=False)['input_ids'], self.eot]
      if len(ids) > context:
        cut.append(text)
      ids = ids[:context]
      out[i, : len(ids)] = ids
    if cut:
      logging.warning(
        '%d text(s) longer than the %d-token context were cut as SLIP cuts them (the end-of-text '
        'token is lost; the text is pooled at its largest remaining id), e.g. %r',
        len(cut),
        context,
        cut[0][:80],
      )
    return out


# --- reading --------------------------------------------------------------------------------------------------------


def read_slip_file(path) -> tuple[dict[str, np.ndarray], Any]:
  """(state dict as float32 NumPy without the 'module.' prefix, the saved args or None)."""
  import torch

  path = pathlib.Path(path)
  try:
    container = torch_files.load(path, allowed=(argparse.Namespace,), what='a SLIP checkpoint')
  except BadInputError as err:
    raise CLIPLoadError(str(err)) from None
  if not isinstance(container, Mapping) or not isinstance(container.get('state_dict'), Mapping):
    keys = sorted(container)[:8] if isinstance(container, Mapping) else type(container).__name__
    raise CLIPLoadError(f'{path}: a SLIP checkpoint is a dict with a "state_dict" entry (SLIP main.py); found {keys}')
  state = {}
  for key, value in container['state_dict'].items():
    if not isinstance(value, torch.Tensor):
      raise CLIPLoadError(f'{path}: state_dict[{key!r}] is a {type(value).__name__}, not a tensor')
    state[key[len('module.') :] if key.startswith('module.') else key] = value.detach().float().numpy()
  if 'visual.pos_embed' not in state or 'token_embedding.weight' not in state:
    raise CLIPLoadError(
      f'{path}: not a SLIP CLIP checkpoint (no visual.pos_embed / token_embedding.weight; '
      f'found {sorted(state)[:6]} ...)'
    )
  return state, container.get('args')


def spec_from_state_dict(path, state: Mapping[str, np.ndarray], args=None) -> CLIPSpec:
  """The towers' sizes from the tensors' shapes (and the head counts SLIP's model names imply)."""

  def count(pattern):
    return len({int(m.group(1)) for k in state if (m := pattern.match(k))})

  vision_width = int(state['visual.pos_embed'].shape[-1])
  model_name = getattr(args, 'model', None)
  if (
    vision_width in VISION_HEADS
    and model_name
    and model_name.endswith(('VITS16', 'VITB16', 'VITL16'))
    and model_name[-6:] != SLIP_MODELS[vision_width][-6:]
  ):
    raise CLIPLoadError(
      f'{path}: args.model is {model_name} but the image tower is {vision_width} wide ({SLIP_MODELS[vision_width]})'
    )
  if vision_width % 64:
    raise CLIPLoadError(
      f"{path}: image tower width {vision_width} is none of SLIP's ViT-S/B/L/16 "
      f"({sorted(VISION_HEADS)}) nor a multiple of 64 (timm's head width): its head count is "
      'unknown'
    )
  patch = state['visual.patch_embed.proj.weight']
  positions = int(state['visual.pos_embed'].shape[1]) - 1
  grid = int(round(positions**0.5))
  if grid * grid != positions:
    raise CLIPLoadError(f'{path}: visual.pos_embed holds {positions} patch positions, not a square grid')
  text_width = int(state['token_embedding.weight'].shape[1])
  return CLIPSpec(
    vision_width=vision_width,
    vision_layers=count(_VISION_BLOCK),
    vision_heads=VISION_HEADS.get(vision_width, vision_width // 64),
    vision_mlp_dim=int(state['visual.blocks.0.mlp.fc1.weight'].shape[0]),
    vision_activation='gelu',
    vision_layer_norm_eps=1e-6,
    patch_size=int(patch.shape[-1]),
    image_size=grid * int(patch.shape[-1]),
    num_channels=int(patch.shape[1]),
    text_width=text_width,
    text_layers=count(_TEXT_BLOCK),
    text_heads=text_width // 64,
    text_mlp_dim=int(state['transformer.resblocks.0.mlp.c_fc.weight'].shape[0]),
    text_activation='quick_gelu',
    text_layer_norm_eps=1e-5,
    vocab_size=int(state['token_embedding.weight'].shape[0]),
    max_positions=int(state['positional_embedding'].shape[0]),
    eos_token_id=-1,
    eos_pooling=EOS_POOLING_ARGMAX,
    projection_dim=int(state['image_projection'].shape[1]),
    vision_pre_norm=False,
    patch_bias=True,
  )


def _layer_names(layers: int, block: str, norms, linears) -> dict[str, str]:
  """Per-layer Flax path -> torch name: each (ours, theirs) norm as scale/bias, each linear as kernel/bias."""
  names = {}
  for i in range(layers):
    for kind, pairs in (('scale', norms), ('kernel', linears)):
      for ours, theirs in pairs:
        names[f'layers_{i}/{ours}/{kind}'] = f'{block.format(i)}.{theirs}.weight'
        names[f'layers_{i}/{ours}/bias'] = f'{block.format(i)}.{theirs}.bias'
  return names


def _vision_names(spec: CLIPSpec) -> dict[str, str]:
  """Flax path under 'vision/' -> timm name (without 'visual.'), for the plain (unfused) tensors."""
  return {
    'patch_embedding/kernel': 'patch_embed.proj.weight',
    'patch_embedding/bias': 'patch_embed.proj.bias',
    'class_embedding': 'cls_token',
    'position_embedding/embedding': 'pos_embed',
    'post_layernorm/scale': 'norm.weight',
    'post_layernorm/bias': 'norm.bias',
    **_layer_names(
      spec.vision_layers,
      'blocks.{}',
      (('layer_norm1', 'norm1'), ('layer_norm2', 'norm2')),
      (('self_attn/out_proj', 'attn.proj'), ('mlp/fc1', 'mlp.fc1'), ('mlp/fc2', 'mlp.fc2')),
    ),
  }


def _text_names(spec: CLIPSpec) -> dict[str, str]:
  """Flax path under 'text/' -> OpenAI CLIP's text-tower name, for the plain (unfused) tensors."""
  return {
    'token_embedding/embedding': 'token_embedding.weight',
    'position_embedding/embedding': 'positional_embedding',
    'final_layer_norm/scale': 'ln_final.weight',
    'final_layer_norm/bias': 'ln_final.bias',
    **_layer_names(
      spec.text_layers,
      'transformer.resblocks.{}',
      (('layer_norm1', 'ln_1'), ('layer_norm2', 'ln_2')),
      (('self_attn/out_proj', 'attn.out_proj'), ('mlp/fc1', 'mlp.c_fc'), ('mlp/fc2', 'mlp.c_proj')),
    ),
  }


def _to_flax(name: str, value: np.ndarray) -> np.ndarray:
  if name.endswith('patch_embed.proj.weight'):
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if name.endswith(('cls_token', 'pos_embed')):
    return value.reshape(value.shape[-2:]) if name.endswith('pos_embed') else value.reshape(-1)
  if name.endswith('.weight') and value.ndim == 2 and 'embedding' not in name:
    return value.T  # torch Linear [out, in] -> flax [in, out]
  return value


def clip_params_from_slip(path, state: Mapping[str, np.ndarray], spec: CLIPSpec) -> dict:
  """SLIP state dict -> Flax CLIP parameter tree (no prompts, layers stacked); every tensor present, shape-checked
  and used."""
  flat, used = {}, set()

  def take(key):
    if key not in state:
      raise CLIPLoadError(f'{path}: SLIP checkpoint is missing tensor {key!r}')
    used.add(key)
    return np.asarray(state[key], np.float32)

  for ours, theirs in _vision_names(spec).items():
    flat[f'vision/{ours}'] = _to_flax(theirs, take(f'visual.{theirs}'))
  for ours, theirs in _text_names(spec).items():
    flat[f'text/{ours}'] = _to_flax(theirs, take(theirs))
  for tower, count, fused in (
    ('vision', spec.vision_layers, 'visual.blocks.{}.attn.qkv'),
    ('text', spec.text_layers, 'transformer.resblocks.{}.attn.in_proj'),
  ):
    for i in range(count):
      prefix = fused.format(i)
      weight_key, bias_key = (
        (f'{prefix}.weight', f'{prefix}.bias') if tower == 'vision' else (f'{prefix}_weight', f'{prefix}_bias')
      )
      weights, biases = np.split(take(weight_key), 3), np.split(take(bias_key), 3)  # rows q | k | v
      for proj, w, b in zip(('q_proj', 'k_proj', 'v_proj'), weights, biases):
        flat[f'{tower}/layers_{i}/self_attn/{proj}/kernel'] = w.T
        flat[f'{tower}/layers_{i}/self_attn/{proj}/bias'] = b
  flat['visual_projection/kernel'] = take('image_projection')
  flat['text_projection/kernel'] = take('text_projection')
  flat['logit_scale'] = take('logit_scale').reshape(())

  shapes = expected_shapes(spec)
  if set(shapes) != set(flat):  # a guard on this module's own tables
    raise AssertionError(f'SLIP name table disagrees with the Flax CLIP: {sorted(set(shapes) ^ set(flat))}')
  for name, want in shapes.items():
    if flat[name].shape != want:
      raise CLIPLoadError(
        f'{path}: SLIP tensor for {name} has shape {flat[name].shape} after conversion, expected '
        f'{want} for a tower of these sizes'
      )
  unexpected = sorted(k for k in state if k not in used and not _IGNORED.match(k))
  if unexpected:
    raise CLIPLoadError(f'{path}: SLIP checkpoint has tensors a SLIP CLIP does not have: {unexpected[:10]}')
  bad = [k for k in used if not np.all(np.isfinite(state[k]))]
  if bad:
    raise CLIPLoadError(f'{path}: SLIP tensor(s) hold NaN or infinity: {sorted(bad)[:5]}')
  return stack_layers(unflatten({k: np.array(v, order='C') for k, v in flat.items()}))


def load_slip(
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
  """A SLIP checkpoint file as the frozen CLIP; prompts (if any) freshly initialised from `seed`."""
  state, args = read_slip_file(path)
  spec = spec_from_state_dict(path, state, args)
  params = clip_params_from_slip(path, state, spec)
  prompts = init_prompts(jax.random.key(seed), spec, prompt_mode, num_prompts)
  if prompts is not None:
    params['prompts'] = prompts
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
    params=jax.tree.map(jnp.asarray, params),
    tokenizer=SLIPTokenizer(context_length=spec.max_positions),
    preprocess=slip_preprocess(spec.image_size),
    spec=spec,
    hf_config=None,
    kind='slip',
    source=str(path),
  )


# --- writing: the frozen image tower in timm's names, as CG3D saves it under visual_clip_model -------------------


def visual_tensors(path) -> dict[str, np.ndarray]:
  """The SLIP file's image tower as CG3D saves it (timm names without 'visual.', SLIP's order and values)."""
  state, _ = read_slip_file(path)
  return {k[len('visual.') :]: v for k, v in state.items() if k.startswith('visual.')}


def vision_state_dict(params: Mapping[str, Any], spec: CLIPSpec) -> dict[str, np.ndarray]:
  """The Flax image tower -> timm's `VisionTransformer` state dict (CG3D's `visual_clip_model` without prompts), in
  timm's parameter order."""
  vision = flatten(unstack_layers(params['vision']))
  out = {
    'cls_token': np.asarray(vision['class_embedding']).reshape(1, 1, -1),
    'pos_embed': np.asarray(vision['position_embedding/embedding'])[None],
    'patch_embed.proj.weight': np.asarray(vision['patch_embedding/kernel']).transpose(3, 2, 0, 1),
    'patch_embed.proj.bias': np.asarray(vision['patch_embedding/bias']),
  }
  names = _vision_names(spec)
  for i in range(spec.vision_layers):
    layer = f'layers_{i}/self_attn'
    block = {theirs: ours for ours, theirs in names.items() if theirs.startswith(f'blocks.{i}.')}
    for suffix in ('norm1.weight', 'norm1.bias'):
      out[f'blocks.{i}.{suffix}'] = np.asarray(vision[block[f'blocks.{i}.{suffix}']])
    out[f'blocks.{i}.attn.qkv.weight'] = np.concatenate(
      [np.asarray(vision[f'{layer}/{p}/kernel']).T for p in ('q_proj', 'k_proj', 'v_proj')]
    )
    out[f'blocks.{i}.attn.qkv.bias'] = np.concatenate(
      [np.asarray(vision[f'{layer}/{p}/bias']) for p in ('q_proj', 'k_proj', 'v_proj')]
    )
    for suffix in (
      'attn.proj.weight',
      'attn.proj.bias',
      'norm2.weight',
      'norm2.bias',
      'mlp.fc1.weight',
      'mlp.fc1.bias',
      'mlp.fc2.weight',
      'mlp.fc2.bias',
    ):
      value = np.asarray(vision[block[f'blocks.{i}.{suffix}']])
      out[f'blocks.{i}.{suffix}'] = value.T if value.ndim == 2 else value
  out['norm.weight'] = np.asarray(vision['post_layernorm/scale'])
  out['norm.bias'] = np.asarray(vision['post_layernorm/bias'])
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
