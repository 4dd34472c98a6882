"""Uni3D's released point encoders (baaivision/Uni3D), in Flax, for all five released sizes.

Computes what Uni3D's `models/point_encoder.py` (`PointcloudEncoder`) and `models/uni3d.py` (`Uni3D.encode_pc`)
compute, read at the source (Uni3D commit 64e03c3c42c1), with the timm EVA blocks they use (timm 0.9.7, the
version Uni3D's README names; 1.0.31 builds the same blocks and the same state dict):

  points (B, N, 6): xyz + rgb (Uni3D's `encode_pc` splits pc[..., :3] and pc[..., 3:]; colours in [0, 1]).
  -> Point-BERT's `Group` (512 groups x 64 points in every released configuration, scripts/*.sh): farthest-point
     sampling of the centres on xyz with pointnet2_ops' CUDA rules (point_ops: start at index 0, ...), each
     centre's 64 nearest points by the expanded squared distance; per point [xyz - centre | rgb] (the colour is
     not centred);
  -> Point-BERT's mini-PointNet to 512 channels (`--pc-encoder-dim 512`; point_transformer.GroupEncoder), then
     `encoder2trans`: Linear(512, width);
  -> [cls_token | groups] + [cls_pos | pos_embed(centre)], pos_embed = Linear(3, 128), exact GELU, Linear(128,
     width). The position embedding is added ONCE, before the first block (CG3D's Point-BERT adds it before every
     block);
  -> patch dropout (training only here; see `patch_dropout`), then `depth` timm EVA blocks (`EvaBlock`), pre-norm:
       x = x + Attention(LN1(x)); x = x + MLP(LN2(x)),  LayerNorm eps 1e-6 (timm's LayerNorm default);
     attention: q and v biases, no k bias (a zero buffer in timm), scale head_dim^-0.5 after q.k, no norm inside,
     NO rotary embedding: timm builds a `rope` module for the EVA02 sizes, but Uni3D calls `blk(x)` with no `rope`
     argument, so the blocks never rotate q and k. No layer scale (init_values None), drop path
     linspace(0, drop_path_rate, depth) (0 at inference, 0.2 in Uni3D's pre-training script);
  -> the cls token, `visual.norm` (an Identity for these timm models: their global_pool is 'avg') then
     `visual.fc_norm` (a LayerNorm, eps 1e-6); the blocks' other tokens are discarded;
  -> `trans2embed`: Linear(width, embed_dim) into EVA02-E-14-plus's 1024-wide CLIP space (not normalised).

The sizes (scripts/inference.sh: timm model and `--pc-feat-dim`; shapes from timm's model definitions):

  size   timm model                 width depth heads  MLP                                     qkv
  tiny   eva02_tiny_patch14_224      192   12    3   'glu':    SiLU GLU, 512 hidden (fc1 1024)   fused
  small  eva02_small_patch14_224     384   12    6   'glu':    SiLU GLU, 1024 hidden (fc1 2048)  fused
  base   eva02_base_patch14_448      768   12   12   'swiglu': fc1_g, fc1_x 2048, LayerNorm     separate q/k/v
  large  eva02_large_patch14_448    1024   24   16   'swiglu': 2730 hidden, LayerNorm            separate q/k/v
  giant  eva_giant_patch14_560      1408   40   16   'gelu':   Linear 6144, exact GELU, Linear   fused

'glu' is timm's GluMlp(act SiLU, gate_last=False): fc1 to 2 x hidden, silu(first half) * second half, fc2.
'swiglu' is timm's SwiGLU with a LayerNorm (eps 1e-6) on the hidden units before fc2 (EVA02's scale_mlp).

Colourless clouds: Uni3D's encoder always takes 6 channels. Its data code gives a cloud without colours the colour
0.4 everywhere (ScanObjectNN without 'rgb'), and pre-training replaces an object's colours by 0.4 half of the time;
`with_default_colour` does the same. in_channels=3 builds a mini-PointNet on xyz alone: no released model has it.

Parameter tree (names follow Uni3D's state dict; weights/uni3d_pt.py maps them):
  params: cls_token (1,1,W), cls_pos (1,1,W)
          encoder/{first_conv_0, first_bn, first_conv_1, second_conv_0, second_bn, second_conv_1}  (GroupEncoder)
          encoder2trans (Dense 512 -> W), pos_embed_0 (Dense 3 -> 128), pos_embed_1 (Dense 128 -> W)
          blocks/norm1, blocks/norm2                        LayerNorm scale, bias
          blocks/attn/{qkv (no bias), q_bias, v_bias}       fused qkv (tiny, small, giant)
          blocks/attn/{q_proj, k_proj (no bias), v_proj}    separate q/k/v (base, large)
          blocks/attn/proj
          blocks/mlp/{fc1, fc2}                             'glu' (fc1 2 x hidden) and 'gelu'
          blocks/mlp/{fc1_g, fc1_x, norm, fc2}              'swiglu'
            (every blocks/* leaf has a leading depth axis: one scanned module; conversions name the blocks
            blocks_{i}, trees.stack_layers)
          fc_norm (LayerNorm), trans2embed (Dense W -> embed_dim)
  batch_stats: encoder/{first_bn, second_bn}/{mean, var}
Uni3D's file holds more than this (logit_scale, and the timm image stem and head that the point encoder never
calls: visual.cls_token, visual.pos_embed, visual.patch_embed.proj, visual.head); the reader lists them as ignored.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cg3d_jax.models import point_ops
from cg3d_jax.models.layers import attend, compute_settings, layer_stack, stats_dtype
from cg3d_jax.models.point_transformer import GroupEncoder, drop_path

# Uni3D's scripts/inference.sh per size, with the shapes timm's model functions give those models (timm 0.9.7 and
# 1.0.31 agree). image_size and num_classes size the unused timm stem and head that Uni3D's files hold: timm takes
# them from each model's default pretrained config (fixed_input_size), whose first tag for the EVA02 tiny/small is an
# MIM checkpoint without a head (num_classes 0).
UNI3D_SIZES = {
  'tiny': dict(
    timm_model='eva02_tiny_patch14_224',
    width=192,
    depth=12,
    num_heads=3,
    mlp='glu',
    mlp_hidden=512,
    qkv_fused=True,
    image_size=224,
    num_classes=0,
  ),
  'small': dict(
    timm_model='eva02_small_patch14_224',
    width=384,
    depth=12,
    num_heads=6,
    mlp='glu',
    mlp_hidden=1024,
    qkv_fused=True,
    image_size=224,
    num_classes=0,
  ),
  'base': dict(
    timm_model='eva02_base_patch14_448',
    width=768,
    depth=12,
    num_heads=12,
    mlp='swiglu',
    mlp_hidden=2048,
    qkv_fused=False,
    image_size=448,
    num_classes=1000,
  ),
  'large': dict(
    timm_model='eva02_large_patch14_448',
    width=1024,
    depth=24,
    num_heads=16,
    mlp='swiglu',
    mlp_hidden=2730,  # int(1024 * 4 * 2 / 3)
    qkv_fused=False,
    image_size=448,
    num_classes=1000,
  ),
  'giant': dict(
    timm_model='eva_giant_patch14_560',
    width=1408,
    depth=40,
    num_heads=16,
    mlp='gelu',
    mlp_hidden=6144,
    qkv_fused=True,
    image_size=560,
    num_classes=1000,
  ),
}
MLP_KINDS = ('glu', 'swiglu', 'gelu')
PATCH_SIZE = 14  # every size's timm model is patch14
# Uni3D's colour for clouds without one (data/datasets.py: np.ones_like(xyz) * 0.4).
DEFAULT_COLOUR = 0.4
EVA_NORM_EPS = 1e-6  # timm's LayerNorm, which Eva uses for norm1, norm2, the SwiGLU norm and fc_norm

# timm initialises every Linear of the EVA blocks with trunc_normal_(std=0.02) (absolute +-2 cut, i.e. a plain
# normal in effect) and zero biases; Uni3D's own layers (encoder2trans, pos_embed, trans2embed) keep PyTorch's
# default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). timm's extra per-depth division of attn.proj and mlp.fc2 is not
# reproduced: Uni3D starts its blocks from pretrained EVA weights, not from this init.
_STD = 0.02
_eva_init = nn.initializers.truncated_normal(stddev=_STD, lower=-2.0 / _STD, upper=2.0 / _STD)
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
exact_gelu = functools.partial(nn.gelu, approximate=False)


def _torch_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _torch_dense(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(fan_in), name=name)


def with_default_colour(xyz, value: float = DEFAULT_COLOUR):
  """(B, N, 3) xyz -> (B, N, 6) xyz + a uniform colour: how Uni3D feeds a cloud that has no colours."""
  xyz = jnp.asarray(xyz)
  return jnp.concatenate([xyz, jnp.full(xyz.shape[:-1] + (3,), value, xyz.dtype)], axis=-1)


def validate_points(points: Any, in_channels: int, group_size: int) -> None:
  """point_ops.check_points for Uni3D: its channels and the points its neighbourhoods need."""
  hint = ''
  if getattr(points, 'shape', (0,))[-1] == 3 and in_channels == 6:
    hint = '; a cloud without colours takes the colour Uni3D gives it: uni3d.with_default_colour(xyz)'
  point_ops.check_points(
    points,
    model='Uni3D',
    in_channels=in_channels,
    min_points=group_size,
    named=f'group_size={group_size}',
    why='to form its neighbourhoods',
    what=' (xyz + rgb)' if in_channels == 6 else ' (xyz)',
    hint=hint,
  )


# --- the EVA block ----------------------------------------------------------------------------------------------


class EvaAttention(nn.Module):
  """timm's EvaAttention without rope: q and v biases, no k bias; one fused qkv matrix or three projections."""

  num_heads: int
  qkv_fused: bool
  dtype: Any = jnp.float32
  implementation: str = 'auto'  # layers.ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_eva_init)
    if self.qkv_fused:
      # F.linear(x, qkv.weight, cat(q_bias, zeros, v_bias)), then reshape(B, N, 3, H, D): q | k | v, heads inside.
      qkv = dense(3 * width, use_bias=False, name='qkv')(x)
      q_bias = self.param('q_bias', nn.initializers.zeros, (width,), jnp.float32)
      v_bias = self.param('v_bias', nn.initializers.zeros, (width,), jnp.float32)
      bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
      q, k, v = jnp.moveaxis((qkv + bias).reshape(batch, length, 3, self.num_heads, head_dim), 2, 0)
    else:
      q = dense(width, name='q_proj')(x).reshape(batch, length, self.num_heads, head_dim)
      k = dense(width, use_bias=False, name='k_proj')(x).reshape(batch, length, self.num_heads, head_dim)
      v = dense(width, name='v_proj')(x).reshape(batch, length, self.num_heads, head_dim)
    out = attend(q, k, v, implementation=self.implementation).reshape(batch, length, width)
    return dense(width, name='proj')(out)


class EvaMlp(nn.Module):
  """The three MLPs of Uni3D's sizes (module docstring): 'glu' (tiny, small), 'swiglu' (base, large), 'gelu' (giant)."""

  kind: str
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_eva_init)
    if self.kind == 'glu':
      h = dense(2 * self.hidden, name='fc1')(x)
      h = nn.silu(h[..., : self.hidden]) * h[..., self.hidden :]  # gate_last=False: the first half is the gate
    elif self.kind == 'swiglu':
      h = nn.silu(dense(self.hidden, name='fc1_g')(x)) * dense(self.hidden, name='fc1_x')(x)
      h = nn.LayerNorm(epsilon=EVA_NORM_EPS, dtype=self.dtype, name='norm')(h)
    elif self.kind == 'gelu':
      h = exact_gelu(dense(self.hidden, name='fc1')(x))
    else:
      raise ValueError(f'EVA MLP kind must be one of {MLP_KINDS}, got {self.kind!r}')
    return dense(width, name='fc2')(h)


class EvaBlock(nn.Module):
  """timm's EvaBlock as Uni3D calls it (pre-norm, no rope, no layer scale); one step of the block scan."""

  num_heads: int
  mlp: str
  mlp_hidden: int
  qkv_fused: bool
  stochastic_depth: bool = False  # training with drop_path_rate > 0 (needs a 'dropout' rng)
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: jax.Array):
    norm = functools.partial(nn.LayerNorm, epsilon=EVA_NORM_EPS, dtype=self.dtype)
    drop = (lambda y: drop_path(self, y, drop_rate)) if self.stochastic_depth else (lambda y: y)
    attn = EvaAttention(self.num_heads, self.qkv_fused, self.dtype, self.attention, name='attn')
    x = x + drop(attn(norm(name='norm1')(x)))
    x = x + drop(EvaMlp(self.mlp, self.mlp_hidden, self.dtype, name='mlp')(norm(name='norm2')(x)))
    return x, None


# --- the encoder ------------------------------------------------------------------------------------------------


class Uni3D(nn.Module):
  """points (B, N, 6) xyz + rgb -> (B, embed_dim) Uni3D embedding (or the (B, width) normed cls feature).

  Defaults: the giant released model (Uni3D-g); `from_size` gives the others.
  """

  width: int = 1408
  depth: int = 40
  num_heads: int = 16
  mlp: str = 'gelu'  # MLP_KINDS
  mlp_hidden: int = 6144
  qkv_fused: bool = True
  num_groups: int = 512
  group_size: int = 64
  encoder_dim: int = 512
  in_channels: int = 6  # xyz + rgb, as every released model; 3 (xyz alone) has no Uni3D counterpart
  embed_dim: int = 1024  # EVA02-E-14-plus
  drop_path_rate: float = 0.0  # Uni3D's pre-training: 0.2
  # Uni3D's PatchDropout (pre-training: 0.5): keeps max(1, int(G * (1 - p))) random group tokens, the cls token
  # always. Uni3D's own module has its `if not self.training` test commented out, so a model built with p > 0 drops
  # tokens at evaluation too; its evaluation runs build p = 0. Here it acts only with train=True.
  patch_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = 'none'  # per-block rematerialisation policy, layers.REMAT_POLICIES
  attention: str = 'auto'  # layers.ATTENTION_IMPLEMENTATIONS
  scan_layers: bool = True  # False: the block loop unrolled in the compiled program (same parameters)

  @classmethod
  def from_config(cls, model_config) -> 'Uni3D':
    """From `config.model`: model.uni3d.* plus in_channels, embed_dim, dtype, remat, attention, scan_layers."""
    u = model_config.uni3d
    return cls(
      width=u.width,
      depth=u.depth,
      num_heads=u.num_heads,
      mlp=u.mlp,
      mlp_hidden=u.mlp_hidden,
      qkv_fused=bool(u.qkv_fused),
      num_groups=u.num_groups,
      group_size=u.group_size,
      encoder_dim=u.encoder_dim,
      drop_path_rate=float(u.drop_path_rate),
      in_channels=model_config.get('in_channels', 6),
      embed_dim=model_config.embed_dim,
      **compute_settings(model_config),
    )

  @classmethod
  def from_size(cls, size: str = 'giant', **overrides) -> 'Uni3D':
    """One of UNI3D_SIZES ('tiny', 'small', 'base', 'large', 'giant'); overrides: any other field (depth=2...)."""
    if size not in UNI3D_SIZES:
      raise ValueError(f'Uni3D size must be one of {list(UNI3D_SIZES)}, got {size!r}')
    fields = {k: v for k, v in UNI3D_SIZES[size].items() if k not in ('timm_model', 'image_size', 'num_classes')}
    return cls(**{**fields, **overrides})

  def _check_settings(self) -> None:
    if self.mlp not in MLP_KINDS:
      raise ValueError(f'Uni3D: mlp must be one of {MLP_KINDS}, got {self.mlp!r}')
    if self.width % self.num_heads:
      raise ValueError(f'Uni3D: width {self.width} is not divisible by num_heads {self.num_heads}')
    if self.in_channels not in (3, 6):
      raise ValueError(f'Uni3D: in_channels must be 6 (xyz + rgb) or 3 (xyz), got {self.in_channels}')
    if not 0.0 <= self.patch_dropout < 1.0:
      raise ValueError(f'Uni3D: patch_dropout must be in [0, 1), got {self.patch_dropout}')

  @nn.compact
  def __call__(self, points: jax.Array, *, train: bool, return_features: bool = False) -> jax.Array:
    """train: BatchNorm batch statistics (updating `batch_stats`), drop path and patch dropout ('dropout' rng).

    return_features: the (B, width) cls feature after fc_norm instead of its `trans2embed` projection.
    """
    self._check_settings()
    validate_points(points, self.in_channels, self.group_size)

    # Coordinates in at least float32 (the grouping's precision; float64 for a float64 model).
    neighbourhoods, centres = point_ops.group(points.astype(stats_dtype(self.dtype)), self.num_groups, self.group_size)
    tokens = GroupEncoder(self.encoder_dim, self.dtype, name='encoder')(neighbourhoods.astype(self.dtype), train=train)
    tokens = _torch_dense(self.width, self.encoder_dim, self.dtype, 'encoder2trans')(tokens)
    pos = _torch_dense(128, 3, self.dtype, 'pos_embed_0')(centres.astype(self.dtype))
    pos = _torch_dense(self.width, 128, self.dtype, 'pos_embed_1')(exact_gelu(pos))

    batch = points.shape[0]
    cls_token = self.param('cls_token', nn.initializers.zeros, (1, 1, self.width), jnp.float32)
    cls_pos = self.param('cls_pos', nn.initializers.normal(1.0), (1, 1, self.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, self.width)).astype(self.dtype), tokens], axis=1)
    pos = jnp.concatenate([jnp.broadcast_to(cls_pos, (batch, 1, self.width)).astype(self.dtype), pos], axis=1)
    x = x + pos  # once, before the first block

    if train and self.patch_dropout > 0:
      keep = max(1, int(self.num_groups * (1.0 - self.patch_dropout)))
      scores = jax.random.normal(self.make_rng('dropout'), (batch, self.num_groups))
      kept = jax.lax.top_k(scores, keep)[1]  # as Uni3D: the top-k of a normal draw per cloud
      x = jnp.concatenate([x[:, :1], point_ops.gather_points(x[:, 1:], kept)], axis=1)

    stack = layer_stack(EvaBlock, length=self.depth, remat=self.remat, scan=self.scan_layers, in_axes=(0,))
    blocks = stack(
      self.num_heads,
      self.mlp,
      self.mlp_hidden,
      self.qkv_fused,
      train and self.drop_path_rate > 0,
      self.dtype,
      self.attention,
      name='blocks',
    )
    drop_rates = np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)  # timm's linspace rule
    x, _ = blocks(x, jnp.asarray(drop_rates))
    features = nn.LayerNorm(epsilon=EVA_NORM_EPS, dtype=self.dtype, name='fc_norm')(x[:, 0])
    embedding = _torch_dense(self.embed_dim, self.width, self.dtype, 'trans2embed')(features)  # built always
    return features if return_features else embedding


def size_of(model: Uni3D) -> str | None:
  """The released size whose transformer `model` has (width, depth, heads, MLP, qkv layout), or None."""
  for name, s in UNI3D_SIZES.items():
    if (model.width, model.depth, model.num_heads, model.mlp, model.mlp_hidden, model.qkv_fused) == (
      s['width'],
      s['depth'],
      s['num_heads'],
      s['mlp'],
      s['mlp_hidden'],
      s['qkv_fused'],
    ):
      return name
  return None
