"""Flax CLIP (ViT image tower + causal text tower) following transformers' `CLIPModel`, with CG3D's visual prompts.

The towers reproduce transformers' PyTorch CLIP operation by operation (pre-LayerNorm in the vision tower, the
activation the config names, causal text mask, end-of-text pooling by the rule the config implies, projections
without bias), so that a checkpoint converted by `cg3d_jax.clip.hf_clip` gives the same embeddings. The same
module is SLIP's CLIP (timm's ViT image tower, OpenAI's text tower; `cg3d_jax.clip.slip`) through the spec's
switches: no pre-LayerNorm, a patch bias, exact GELU and eps 1e-6 in the image tower.

Visual prompt tuning as CG3D does it (its timm `VisionTransformerPromptDeep`): `n` prompt tokens go right after the
class token once the position embedding has been added (prompts carry no position embedding) and before the
vision pre-LayerNorm; in deep mode, before every later layer `l` the `n` prompt positions are overwritten with that
layer's own prompts, so the sequence length stays 1 + n + patches. The prompts are the only trainable parameters and
live in their own subtree, `params['prompts']['tokens']`: (1, n, width) when shallow, (layers, n, width) when deep;
row 0 is CG3D's `prompt_embeddings`, rows 1.. its `deep_prompt_embeddings`.

Each tower's layers are one scanned module (layers.layer_stack): parameters `vision/layers/...` and `text/layers/...`
carry a leading layer axis; deep prompts enter the scan as a per-layer input. Conversions name layers one by one
(`layers_{i}`) and go through trees.stack_layers / unstack_layers.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cg3d_jax.models.layers import attend, l2_normalize, layer_stack, stats_dtype

PROMPT_MODES = ('none', 'shallow', 'deep')

# transformers picks the end-of-text pooling rule from the text config's eos_token_id (PR #24773): configs written
# before it carry eos_token_id == 2 and pool at the largest token id; newer ones pool at the first eos_token_id.
EOS_POOLING_ARGMAX = 'argmax_id'
EOS_POOLING_FIRST_EOS = 'first_eos'
_LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class TowerSpec:
  """The shape of one transformer tower."""

  width: int
  layers: int
  heads: int
  mlp_dim: int
  activation: str
  layer_norm_eps: float


@dataclasses.dataclass(frozen=True)
class CLIPSpec:
  """Everything the Flax modules need, read from a transformers `CLIPConfig`."""

  vision_width: int
  vision_layers: int
  vision_heads: int
  vision_mlp_dim: int
  vision_activation: str
  vision_layer_norm_eps: float
  patch_size: int
  image_size: int
  num_channels: int
  text_width: int
  text_layers: int
  text_heads: int
  text_mlp_dim: int
  text_activation: str
  text_layer_norm_eps: float
  vocab_size: int
  max_positions: int
  eos_token_id: int
  eos_pooling: str
  projection_dim: int
  # SLIP's timm ViT differs from transformers' CLIP in two places beyond activation and eps: no LayerNorm before the
  # blocks (a LayerNorm with weight 1 and bias 0 still normalises, so it must be absent, not neutral) and a patch
  # convolution with bias.
  vision_pre_norm: bool = True
  patch_bias: bool = False

  def __post_init__(self):
    for name in ('vision', 'text'):
      width, heads = getattr(self, f'{name}_width'), getattr(self, f'{name}_heads')
      if width % heads:
        raise ValueError(f'CLIP {name} width {width} is not divisible by its {heads} attention heads')
      activation_fn(getattr(self, f'{name}_activation'))  # fails early on an activation we do not implement
    if self.image_size % self.patch_size:
      raise ValueError(f'CLIP image_size {self.image_size} is not a multiple of patch_size {self.patch_size}')
    if self.eos_pooling not in (EOS_POOLING_ARGMAX, EOS_POOLING_FIRST_EOS):
      raise ValueError(f'unknown eos_pooling {self.eos_pooling!r}')

  @property
  def vision(self) -> TowerSpec:
    return TowerSpec(
      self.vision_width,
      self.vision_layers,
      self.vision_heads,
      self.vision_mlp_dim,
      self.vision_activation,
      self.vision_layer_norm_eps,
    )

  @property
  def text(self) -> TowerSpec:
    return TowerSpec(
      self.text_width,
      self.text_layers,
      self.text_heads,
      self.text_mlp_dim,
      self.text_activation,
      self.text_layer_norm_eps,
    )

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @classmethod
  def from_hf_config(cls, hf_config) -> 'CLIPSpec':
    """Builds the spec from a transformers `CLIPConfig` (or anything with its `vision_config`/`text_config`)."""
    v, t = hf_config.vision_config, hf_config.text_config
    image_size, patch_size = (
      _square(v.image_size, 'vision_config.image_size'),
      _square(v.patch_size, 'vision_config.patch_size'),
    )
    eos = t.eos_token_id
    if isinstance(eos, (list, tuple)):
      if len(eos) != 1:
        raise ValueError(f'text_config.eos_token_id must be one id, got {eos!r}')
      eos = eos[0]
    if eos is None:
      raise ValueError('text_config.eos_token_id is missing: CLIP pools the text at the end-of-text token')
    pooling = EOS_POOLING_ARGMAX if eos == _LEGACY_EOS_TOKEN_ID else EOS_POOLING_FIRST_EOS
    return cls(
      vision_width=v.hidden_size,
      vision_layers=v.num_hidden_layers,
      vision_heads=v.num_attention_heads,
      vision_mlp_dim=v.intermediate_size,
      vision_activation=v.hidden_act,
      vision_layer_norm_eps=float(v.layer_norm_eps),
      patch_size=patch_size,
      image_size=image_size,
      num_channels=getattr(v, 'num_channels', 3),
      text_width=t.hidden_size,
      text_layers=t.num_hidden_layers,
      text_heads=t.num_attention_heads,
      text_mlp_dim=t.intermediate_size,
      text_activation=t.hidden_act,
      text_layer_norm_eps=float(t.layer_norm_eps),
      vocab_size=t.vocab_size,
      max_positions=t.max_position_embeddings,
      eos_token_id=int(eos),
      eos_pooling=pooling,
      projection_dim=hf_config.projection_dim,
    )


def _square(value, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f'{name} must be square, got {value!r}')
    value = value[0]
  return int(value)


def quick_gelu(x):
  # OpenAI CLIP's sigmoid approximation of GELU; pretrained OpenAI weights depend on it.
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
  'quick_gelu': quick_gelu,
  'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # transformers' 'gelu' is the exact erf form
  'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
  'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  'relu': jax.nn.relu,
}


def activation_fn(name: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f'CLIP hidden_act {name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]


def prompt_init_bound(width: int) -> float:
  """CG3D's prompt init range: uniform(-v, v), v = sqrt(6 / (3 * 16 + width)) (as written in its ViT code)."""
  return math.sqrt(6.0 / (3 * 16 + width))


def prompt_shape(spec: CLIPSpec, prompt_mode: str, num_prompts: int) -> tuple[int, int, int] | None:
  """Shape of `params['prompts']['tokens']`, or None when the mode has no prompts."""
  if prompt_mode not in PROMPT_MODES:
    raise ValueError(f'prompt mode {prompt_mode!r} is not one of {PROMPT_MODES}')
  if prompt_mode == 'none':
    return None
  if num_prompts < 1:
    raise ValueError(f'prompt mode {prompt_mode!r} needs at least one prompt token, got num_prompts={num_prompts}')
  rows = spec.vision_layers if prompt_mode == 'deep' else 1
  return (rows, num_prompts, spec.vision_width)


def init_prompts(rng: jax.Array, spec: CLIPSpec, prompt_mode: str, num_prompts: int) -> dict | None:
  """Fresh prompt parameters `{'tokens': ...}` (None for mode 'none'), without initialising the frozen towers."""
  shape = prompt_shape(spec, prompt_mode, num_prompts)
  if shape is None:
    return None
  return {'tokens': _uniform_prompt_init(rng, shape)}


def _uniform_prompt_init(rng, shape, dtype=jnp.float32):
  bound = prompt_init_bound(shape[-1])
  return jax.random.uniform(rng, shape, dtype, minval=-bound, maxval=bound)


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2] like torch, not E[x^2] - mean^2, which loses digits in float32.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections, as transformers' `CLIPAttention`."""

  width: int
  heads: int
  dtype: Any = jnp.float32
  implementation: str = 'auto'  # layers.ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x, causal: bool = False):
    batch, length, _ = x.shape
    head_dim = self.width // self.heads
    split = lambda y: y.reshape(batch, length, self.heads, head_dim)
    q = split(nn.Dense(self.width, dtype=self.dtype, name='q_proj')(x))
    k = split(nn.Dense(self.width, dtype=self.dtype, name='k_proj')(x))
    v = split(nn.Dense(self.width, dtype=self.dtype, name='v_proj')(x))
    out = attend(q, k, v, causal=causal, implementation=self.implementation).reshape(batch, length, self.width)
    return nn.Dense(self.width, dtype=self.dtype, name='out_proj')(out)


class MLP(nn.Module):
  mlp_dim: int
  width: int
  activation: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc1')(x)
    x = activation_fn(self.activation)(x)
    return nn.Dense(self.width, dtype=self.dtype, name='fc2')(x)


class EncoderLayer(nn.Module):
  """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)); one step of the tower's layer scan.

  prompt, replace (deep prompts): this layer's (n, width) prompt tokens and whether they overwrite the n prompt
  positions before the layer (every layer but the first, CG3D's deep VPT).
  """

  tower: TowerSpec
  causal: bool = False
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x, prompt=None, replace=None):
    t = self.tower
    if prompt is not None:
      x = jnp.where(replace, replace_prompts(x, prompt), x)
    y = _layer_norm(t.layer_norm_eps, self.dtype, 'layer_norm1')(x)
    x = x + Attention(t.width, t.heads, self.dtype, self.attention, name='self_attn')(y, causal=self.causal)
    y = _layer_norm(t.layer_norm_eps, self.dtype, 'layer_norm2')(x)
    return x + MLP(t.mlp_dim, t.width, t.activation, self.dtype, name='mlp')(y), None


def insert_prompts(x, prompts):
  """[CLS, patches...] -> [CLS, P1..Pn, patches...]; prompts (n, width) are shared across the batch."""
  batch = x.shape[0]
  prompts = jnp.broadcast_to(prompts.astype(x.dtype)[None], (batch, *prompts.shape))
  return jnp.concatenate([x[:, :1], prompts, x[:, 1:]], axis=1)


def replace_prompts(x, prompts):
  """Overwrites the n prompt positions after CLS; the previous layer's outputs there are dropped (CG3D deep VPT)."""
  n = prompts.shape[0]
  batch = x.shape[0]
  prompts = jnp.broadcast_to(prompts.astype(x.dtype)[None], (batch, *prompts.shape))
  return jnp.concatenate([x[:, :1], prompts, x[:, 1 + n :]], axis=1)


class VisionTower(nn.Module):
  """ViT image tower; returns the post-LayerNorm class token (B, width), before the visual projection."""

  spec: CLIPSpec
  dtype: Any = jnp.float32
  remat: Any = 'none'  # layers.REMAT_POLICIES
  attention: str = 'auto'
  scan_layers: bool = True

  @nn.compact
  def __call__(self, pixels, prompts=None):
    s, t = self.spec, self.spec.vision
    if pixels.ndim != 4 or pixels.shape[1:] != (s.image_size, s.image_size, s.num_channels):
      raise ValueError(
        f'CLIP image tower expects pixels (B, {s.image_size}, {s.image_size}, {s.num_channels}) '
        f'NHWC, got {pixels.shape}'
      )
    x = nn.Conv(
      t.width,
      (s.patch_size, s.patch_size),
      strides=(s.patch_size, s.patch_size),
      padding='VALID',
      use_bias=s.patch_bias,
      dtype=self.dtype,
      name='patch_embedding',
    )(pixels.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, s.num_patches, t.width)
    class_embedding = self.param('class_embedding', nn.initializers.normal(t.width**-0.5), (t.width,))
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, t.width))
    x = jnp.concatenate([cls, x], axis=1)
    positions = nn.Embed(s.num_patches + 1, t.width, dtype=self.dtype, name='position_embedding')
    x = x + positions.embedding.astype(self.dtype)[None]
    if prompts is not None:
      x = insert_prompts(x, prompts[0])
    if s.vision_pre_norm:
      x = _layer_norm(t.layer_norm_eps, self.dtype, 'pre_layernorm')(x)
    deep = prompts is not None and prompts.shape[0] > 1
    if deep and prompts.shape[0] != t.layers:
      raise ValueError(f'deep prompts need one row per image-tower layer ({t.layers}), got {prompts.shape[0]}')
    stack = layer_stack(
      EncoderLayer, length=t.layers, remat=self.remat, scan=self.scan_layers, in_axes=(0, 0) if deep else ()
    )
    layers = stack(t, causal=False, dtype=self.dtype, attention=self.attention, name='layers')
    x, _ = layers(x, prompts, jnp.arange(t.layers) > 0) if deep else layers(x)
    return _layer_norm(t.layer_norm_eps, self.dtype, 'post_layernorm')(x[:, 0])


class TextTower(nn.Module):
  """Causal text transformer; returns the final-LayerNorm state at the end-of-text token (B, width)."""

  spec: CLIPSpec
  dtype: Any = jnp.float32
  remat: Any = 'none'  # layers.REMAT_POLICIES
  attention: str = 'auto'
  scan_layers: bool = True

  @nn.compact
  def __call__(self, input_ids):
    s, t = self.spec, self.spec.text
    if input_ids.ndim != 2 or input_ids.shape[1] > s.max_positions:
      raise ValueError(f'CLIP text tower expects token ids (B, L) with L <= {s.max_positions}, got {input_ids.shape}')
    length = input_ids.shape[1]
    x = nn.Embed(s.vocab_size, t.width, dtype=self.dtype, name='token_embedding')(input_ids)
    positions = nn.Embed(s.max_positions, t.width, dtype=self.dtype, name='position_embedding')
    x = x + positions.embedding[:length].astype(self.dtype)[None]
    stack = layer_stack(EncoderLayer, length=t.layers, remat=self.remat, scan=self.scan_layers)
    x, _ = stack(t, causal=True, dtype=self.dtype, attention=self.attention, name='layers')(x)
    x = _layer_norm(t.layer_norm_eps, self.dtype, 'final_layer_norm')(x)
    return x[jnp.arange(x.shape[0]), eos_positions(input_ids, s)]


def eos_positions(input_ids, spec: CLIPSpec):
  """Index of the token CLIP pools at, per sequence (first occurrence on ties, like torch.argmax)."""
  if spec.eos_pooling == EOS_POOLING_ARGMAX:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == spec.eos_token_id, axis=-1)


class VisualPrompts(nn.Module):
  shape: tuple[int, int, int]

  @nn.compact
  def __call__(self):
    return self.param('tokens', _uniform_prompt_init, self.shape)


class CLIP(nn.Module):
  """Both CLIP towers, projections, temperature, and optional visual prompts (the only trainable part)."""

  spec: CLIPSpec
  prompt_mode: str = 'none'  # 'none' | 'shallow' | 'deep'
  num_prompts: int = 5
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32
  remat: Any = 'none'  # per-layer rematerialisation policy, layers.REMAT_POLICIES
  attention: str = 'auto'  # layers.ATTENTION_IMPLEMENTATIONS
  scan_layers: bool = True  # False: the layer loop unrolled in the compiled program (same parameters)

  def setup(self):
    self.vision = VisionTower(self.spec, self.dtype, self.remat, self.attention, self.scan_layers)
    self.text = TextTower(self.spec, self.dtype, self.remat, self.attention, self.scan_layers)
    self.visual_projection = nn.Dense(self.spec.projection_dim, use_bias=False, dtype=self.dtype)
    self.text_projection = nn.Dense(self.spec.projection_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(2.6592), ())
    shape = prompt_shape(self.spec, self.prompt_mode, self.num_prompts)
    self.prompts = VisualPrompts(shape) if shape is not None else None

  def encode_image(self, pixels):
    """(B, H, W, C) normalised NHWC pixels -> (B, projection_dim) in at least float32, not L2-normalised."""
    prompts = self.prompts() if self.prompts is not None else None
    return self.visual_projection(self.vision(pixels, prompts)).astype(stats_dtype(self.dtype))

  def encode_text(self, input_ids):
    """(B, L) int token ids -> (B, projection_dim) in at least float32, not L2-normalised."""
    return self.text_projection(self.text(input_ids)).astype(stats_dtype(self.dtype))

  def __call__(self, pixels, input_ids):
    image_embeds = l2_normalize(self.encode_image(pixels))
    text_embeds = l2_normalize(self.encode_text(input_ids))
    logits_per_text = text_embeds @ image_embeds.T * jnp.exp(self.logit_scale)
    return dict(
      image_embeds=image_embeds,
      text_embeds=text_embeds,
      logits_per_image=logits_per_text.T,
      logits_per_text=logits_per_text,
    )
