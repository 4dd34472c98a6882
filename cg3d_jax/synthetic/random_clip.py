"""Random CLIPs in the real formats, for tests, demos, benchmarks: a transformers CLIP folder, a SLIP checkpoint file.

The folder has the same layout as a real one (config.json, model.safetensors from `CLIPModel.save_pretrained`,
tokenizer files built from OpenAI's BPE file as OpenAI CLIP builds them (clip/bpe.py), preprocessor_config.json);
the SLIP file is what SLIP's main.py saves. Everything downstream runs the real loading code path.
"""

import json
import os
import pathlib
import shutil
import tempfile

from cg3d_jax import assets
from cg3d_jax.clip.bpe import START_OF_TEXT, read_bpe

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ViT-B/16-shaped CLIP (the size CG3D prompts): for benchmarks and the large parity test.
VIT_B16 = dict(
  vision_width=768,
  vision_layers=12,
  vision_heads=12,
  patch_size=16,
  image_size=224,
  text_width=512,
  text_layers=12,
  text_heads=8,
  projection_dim=512,
)


def write_tokenizer(folder, vocab_path, context_length: int = 77) -> None:
  """Writes vocab.json + merges.txt (the classic files) and tokenizer.json + tokenizer_config.json."""
  from transformers import CLIPTokenizer

  folder = pathlib.Path(folder)
  vocab, merges = read_bpe(vocab_path)
  with open(folder / 'vocab.json', 'w', encoding='utf-8') as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(folder / 'merges.txt', 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
  tokenizer.save_pretrained(str(folder))


def preprocessor_config(image_size: int) -> dict:
  """CLIPImageProcessor settings as OpenAI CLIP folders carry them (shortest side, centre crop, CLIP mean/std)."""
  return {
    'image_processor_type': 'CLIPImageProcessor',
    'do_resize': True,
    'size': {'shortest_edge': image_size},
    'resample': 3,
    'do_center_crop': True,
    'crop_size': {'height': image_size, 'width': image_size},
    'do_rescale': True,
    'rescale_factor': 1 / 255,
    'do_normalize': True,
    'image_mean': list(OPENAI_CLIP_MEAN),
    'image_std': list(OPENAI_CLIP_STD),
    'do_convert_rgb': True,
  }


def _perturb_norms_and_biases(model, seed: int) -> None:
  # Fresh transformers init sets every LayerNorm to (1, 0) and every bias to 0, so a converter that swapped or
  # dropped them would still pass parity; random values make each of those tensors matter.
  import torch

  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if name.endswith('.bias') or 'layer_norm' in name or 'layernorm' in name or 'layrnorm' in name:
        tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))


def write_random_clip(
  path,
  *,
  vision_width: int = 64,
  vision_layers: int = 2,
  vision_heads: int = 4,
  patch_size: int = 8,
  image_size: int = 32,
  text_width: int = 48,
  text_layers: int = 2,
  text_heads: int = 4,
  projection_dim: int = 32,
  hidden_act: str = 'quick_gelu',
  eos_token_id: int = 2,
  vocab_path=None,
  seed: int = 0,
  mlp_ratio: int = 4,
  layer_norm_eps: float = 1e-5,
  vocab_size: int | None = None,
  overwrite: bool = False,
) -> str:
  """Writes a random CLIPModel folder at `path` and returns it. `vocab_path`: the real BPE gz (default: the copy
  the package ships).

  eos_token_id=2 gives an old-style config (text pooled at the largest id, as OpenAI's hub configs);
  49407 a new-style one (pooled at the first <|endoftext|>). `vocab_size` larger than the BPE's 49,408 leaves room
  for added tokens (ids above <|endoftext|>), the case where the two pooling rules differ.
  """
  import torch
  from transformers import CLIPConfig, CLIPModel

  if vocab_path is None:
    vocab_path = assets.path(assets.BPE_VOCAB)
  path = pathlib.Path(path)
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f'{path} exists and is not empty; pass overwrite=True to replace it')
  vocab, _ = read_bpe(vocab_path)
  if vocab_size is not None and vocab_size < len(vocab):
    raise ValueError(f'vocab_size {vocab_size} is smaller than the BPE vocabulary ({len(vocab)} tokens)')
  text_config = dict(
    vocab_size=vocab_size or len(vocab),
    hidden_size=text_width,
    intermediate_size=mlp_ratio * text_width,
    num_hidden_layers=text_layers,
    num_attention_heads=text_heads,
    max_position_embeddings=77,
    hidden_act=hidden_act,
    layer_norm_eps=layer_norm_eps,
    bos_token_id=vocab[START_OF_TEXT],
    eos_token_id=eos_token_id,
    pad_token_id=1,
    projection_dim=projection_dim,
  )
  vision_config = dict(
    hidden_size=vision_width,
    intermediate_size=mlp_ratio * vision_width,
    num_hidden_layers=vision_layers,
    num_attention_heads=vision_heads,
    patch_size=patch_size,
    image_size=image_size,
    hidden_act=hidden_act,
    layer_norm_eps=layer_norm_eps,
    projection_dim=projection_dim,
  )
  config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
  torch.manual_seed(seed)
  model = CLIPModel(config).eval()
  _perturb_norms_and_biases(model, seed)

  path.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{path.name}.', dir=path.parent))
  try:
    model.save_pretrained(str(staging), safe_serialization=True)
    write_tokenizer(staging, vocab_path)
    with open(staging / 'preprocessor_config.json', 'w', encoding='utf-8') as f:
      json.dump(preprocessor_config(image_size), f, indent=2)
    if path.exists():
      shutil.rmtree(path)
    os.replace(staging, path)  # the folder appears complete or not at all
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return str(path)


# SLIP ViT-B/16's shapes (slip_base_100ep.pt): the size CG3D trains against.
SLIP_VIT_B16 = dict(
  vision_width=768,
  vision_layers=12,
  vision_heads=12,
  patch_size=16,
  image_size=224,
  text_width=512,
  text_layers=12,
  embed_dim=512,
)


def slip_state_dict(
  *,
  vision_width: int = 128,
  vision_layers: int = 2,
  patch_size: int = 8,
  image_size: int = 32,
  text_width: int = 128,
  text_layers: int = 2,
  embed_dim: int = 32,
  vocab_size: int = 49408,
  context_length: int = 77,
  ssl_mlp_dim: int = 64,
  ssl_emb_dim: int = 32,
  seed: int = 0,
) -> dict:
  """A random SLIP state dict in SLIP's own names and order (timm ViT `visual.*`, OpenAI text tower, projections,
  `logit_scale`, the SSL head `image_mlp.*`), without the 'module.' prefix. LayerNorms and biases are random too, so
  that a converter that drops or swaps one cannot pass."""
  import collections

  import numpy as np
  import torch

  rng = np.random.default_rng(seed)
  state = collections.OrderedDict()

  def put(name, shape, std=0.02, mean=0.0):
    state[name] = torch.from_numpy((mean + std * rng.standard_normal(shape)).astype(np.float32))

  def linear(name, out_dim, in_dim):
    put(f'{name}.weight', (out_dim, in_dim), std=in_dim**-0.5)
    put(f'{name}.bias', (out_dim,), std=0.1)

  def norm(name, width):
    put(f'{name}.weight', (width,), std=0.1, mean=1.0)
    put(f'{name}.bias', (width,), std=0.1)

  grid = image_size // patch_size
  put('visual.cls_token', (1, 1, vision_width))
  put('visual.pos_embed', (1, grid * grid + 1, vision_width))
  put('visual.patch_embed.proj.weight', (vision_width, 3, patch_size, patch_size), std=(3 * patch_size**2) ** -0.5)
  put('visual.patch_embed.proj.bias', (vision_width,), std=0.1)
  for i in range(vision_layers):
    block = f'visual.blocks.{i}'
    norm(f'{block}.norm1', vision_width)
    linear(f'{block}.attn.qkv', 3 * vision_width, vision_width)
    linear(f'{block}.attn.proj', vision_width, vision_width)
    norm(f'{block}.norm2', vision_width)
    linear(f'{block}.mlp.fc1', 4 * vision_width, vision_width)
    linear(f'{block}.mlp.fc2', vision_width, 4 * vision_width)
  norm('visual.norm', vision_width)
  for i in range(text_layers):
    block = f'transformer.resblocks.{i}'
    put(f'{block}.attn.in_proj_weight', (3 * text_width, text_width), std=text_width**-0.5)
    put(f'{block}.attn.in_proj_bias', (3 * text_width,), std=0.1)
    linear(f'{block}.attn.out_proj', text_width, text_width)
    norm(f'{block}.ln_1', text_width)
    linear(f'{block}.mlp.c_fc', 4 * text_width, text_width)
    linear(f'{block}.mlp.c_proj', text_width, 4 * text_width)
    norm(f'{block}.ln_2', text_width)
  put('token_embedding.weight', (vocab_size, text_width))
  put('positional_embedding', (context_length, text_width), std=0.01)
  norm('ln_final', text_width)
  put('image_projection', (vision_width, embed_dim), std=vision_width**-0.5)
  put('text_projection', (text_width, embed_dim), std=text_width**-0.5)
  state['logit_scale'] = torch.tensor(float(np.log(1 / 0.07)))
  for layer, (out_dim, in_dim) in enumerate(
    [(ssl_mlp_dim, vision_width), (ssl_mlp_dim, ssl_mlp_dim), (ssl_emb_dim, ssl_mlp_dim)], start=1
  ):
    linear(f'image_mlp.layer{layer}', out_dim, in_dim)
    if layer < 3:
      norm(f'image_mlp.bn{layer}', out_dim)
      state[f'image_mlp.bn{layer}.running_mean'] = torch.zeros(out_dim)
      state[f'image_mlp.bn{layer}.running_var'] = torch.ones(out_dim)
      state[f'image_mlp.bn{layer}.num_batches_tracked'] = torch.tensor(0)
  return state


def write_slip_checkpoint(path, state_dict, *, model: str = 'SLIP_VITB16', epoch: int = 100) -> str:
  """Writes `state_dict` as SLIP's main.py saves a checkpoint: {'epoch', 'state_dict' ('module.' keys, as saved from
  DistributedDataParallel), 'optimizer' (omitted), 'args' (an argparse.Namespace), 'best_acc1'}; atomically."""
  import argparse
  import io

  import torch

  from cg3d_jax.atomic import atomic_write

  args = argparse.Namespace(
    model=model,
    ssl_mlp_dim=4096,
    ssl_emb_dim=256,
    ssl_temp=0.1,
    ssl_scale=1.0,
    epochs=epoch,
    lr=3e-3,
    wd=0.1,
    batch_size=64,
    output_dir='./',
  )
  container = {
    'epoch': epoch,
    'state_dict': {f'module.{k}': v for k, v in state_dict.items()},
    'args': args,
    'best_acc1': 0.0,
  }
  buffer = io.BytesIO()
  torch.save(container, buffer)
  atomic_write(path, lambda f: f.write(buffer.getvalue()))
  return str(path)


def write_random_slip(path, *, seed: int = 0, **sizes) -> str:
  """A random SLIP checkpoint file (small by default; `**SLIP_VIT_B16` for the real shapes)."""
  sizes.pop('vision_heads', None)  # implied by the width (clip.slip.VISION_HEADS)
  return write_slip_checkpoint(path, slip_state_dict(seed=seed, **sizes))
