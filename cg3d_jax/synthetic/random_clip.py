"""Writes a transformers CLIP folder with random weights and the real CLIP tokenizer, for tests, demos, benchmarks.

The folder has the same layout as a real one (config.json, model.safetensors from `CLIPModel.save_pretrained`,
tokenizer files, preprocessor_config.json), so everything downstream runs the real loading code path. The
tokenizer is built from OpenAI's BPE file (`bpe_simple_vocab_16e6.txt.gz`) exactly as OpenAI CLIP builds its
49,408-token vocabulary: the 256 byte symbols, the same with `</w>`, one token per merge for the first 48,894
merges, then <|startoftext|> and <|endoftext|>.
"""

import gzip
import json
import os
import pathlib
import shutil
import tempfile

from cg3d_jax import assets

# OpenAI CLIP's 49152 - 256 - 2 merges (lines 1..48894 of the gz, after the version header line).
NUM_MERGES = 49152 - 256 - 2
START_OF_TEXT, END_OF_TEXT = '<|startoftext|>', '<|endoftext|>'
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ViT-B/16-shaped CLIP (the size CG3D prompts): for benchmarks and the large parity test.
VIT_B16 = dict(vision_width=768, vision_layers=12, vision_heads=12, patch_size=16, image_size=224,
               text_width=512, text_layers=12, text_heads=8, projection_dim=512)


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP byte -> printable character table; its order fixes the ids of the 256 byte tokens."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  codes = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      codes.append(256 + extra)
      extra += 1
  return dict(zip(printable, (chr(c) for c in codes)))


def read_bpe(vocab_path) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """OpenAI's BPE gz -> (token -> id for all 49,408 tokens, the 48,894 merges in rank order)."""
  path = pathlib.Path(vocab_path)
  if not path.is_file():
    raise FileNotFoundError(f'CLIP BPE vocabulary {str(path)!r} not found (expected bpe_simple_vocab_16e6.txt.gz)')
  lines = gzip.open(path).read().decode('utf-8').split('\n')
  if len(lines) < NUM_MERGES + 1:
    raise ValueError(f'{path}: expected at least {NUM_MERGES + 1} lines, found {len(lines)}')
  merges = []
  for number, line in enumerate(lines[1:NUM_MERGES + 1], start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f'{path}: line {number} is not a merge of two symbols: {line!r}')
    merges.append((parts[0], parts[1]))
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + '</w>' for s in symbols] + [a + b for a, b in merges] + [START_OF_TEXT, END_OF_TEXT]
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f'{path}: merges produce duplicate tokens ({len(tokens) - len(vocab)} of them)')
  return vocab, merges


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
      'image_processor_type': 'CLIPImageProcessor', 'do_resize': True, 'size': {'shortest_edge': image_size},
      'resample': 3, 'do_center_crop': True, 'crop_size': {'height': image_size, 'width': image_size},
      'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True, 'image_mean': list(OPENAI_CLIP_MEAN),
      'image_std': list(OPENAI_CLIP_STD), 'do_convert_rgb': True,
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


def write_random_clip(path, *, vision_width: int = 64, vision_layers: int = 2, vision_heads: int = 4,
                      patch_size: int = 8, image_size: int = 32, text_width: int = 48, text_layers: int = 2,
                      text_heads: int = 4, projection_dim: int = 32, hidden_act: str = 'quick_gelu',
                      eos_token_id: int = 2, vocab_path=None, seed: int = 0, mlp_ratio: int = 4,
                      layer_norm_eps: float = 1e-5, vocab_size: int | None = None, overwrite: bool = False) -> str:
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
      vocab_size=vocab_size or len(vocab), hidden_size=text_width, intermediate_size=mlp_ratio * text_width,
      num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=77,
      hidden_act=hidden_act, layer_norm_eps=layer_norm_eps, bos_token_id=vocab[START_OF_TEXT],
      eos_token_id=eos_token_id, pad_token_id=1, projection_dim=projection_dim)
  vision_config = dict(
      hidden_size=vision_width, intermediate_size=mlp_ratio * vision_width, num_hidden_layers=vision_layers,
      num_attention_heads=vision_heads, patch_size=patch_size, image_size=image_size, hidden_act=hidden_act,
      layer_norm_eps=layer_norm_eps, projection_dim=projection_dim)
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
