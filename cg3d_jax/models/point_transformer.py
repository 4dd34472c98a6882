"""CG3D's main 3D encoder: the Point-BERT-style point transformer, projected into CLIP's joint space.

points (B, N, 3) (or (B, N, 6) xyz + rgb with in_channels=6, ULIP-2's coloured Point-BERT) -> FPS + kNN groups
(G x K) -> mini-PointNet token per group -> Linear to the width -> [cls | groups]
-> `depth` pre-norm blocks with the position embedding added to every block's input -> LayerNorm
-> [cls | max over groups] (2 x width, "the pooled feature") -> Linear to `embed_dim` (CLIP space, not normalised;
without a bias for ULIP's released encoders, whose `pc_projection` is a plain matrix).
An optional head (2 x width -> head_hidden -> ReLU -> Dropout -> num_classes) is kept for fine-tuning and so that
exports load strictly into the original PyTorch code.

Parameter tree (names chosen to read like the original's state dict; see weights/torch_io.py for the map):
  params: cls_token (1,1,W), cls_pos (1,1,W),
          encoder/{first_conv_0, first_bn, first_conv_1, second_conv_0, second_bn, second_conv_1},
          reduce_dim, pos_embed_0, pos_embed_1,
          blocks/{norm1, attn/{qkv (no bias), proj}, norm2, mlp/{fc1, fc2}} (each with a leading depth axis: the
          blocks are one scanned module; conversions name them blocks_{i}, trees.stack_layers), norm, projection,
          [cls_head_0, cls_head_1]            (Dense: kernel (in, out), bias; norms: scale, bias)
  batch_stats: encoder/{first_bn, second_bn}/{mean, var}
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cg3d_jax.models import point_ops
from cg3d_jax.models.layers import TorchBatchNorm, attend, compute_settings, layer_stack, stats_dtype

# timm's trunc_normal_(std=0.02) used by the original truncates at +-2 in absolute units, i.e. at +-100 std: in effect
# a plain normal. We keep its distribution rather than the more common +-2 std truncation.
_INIT_STD = 0.02
weight_init = nn.initializers.truncated_normal(stddev=_INIT_STD, lower=-2.0 / _INIT_STD, upper=2.0 / _INIT_STD)
# Exact (erf) GELU as torch.nn.GELU, not the tanh approximation.
exact_gelu = functools.partial(nn.gelu, approximate=False)


def validate_points(points: Any, group_size: int, in_channels: int = 3) -> None:
  """point_ops.check_points for the PointTransformer: its channels and the points its neighbourhoods need."""
  what = '' if in_channels == 3 else f' (xyz + {in_channels - 3} colour channels: model in_channels={in_channels})'
  point_ops.check_points(
    points,
    model='PointTransformer',
    in_channels=in_channels,
    min_points=group_size,
    named=f'group_size={group_size}',
    why='to form its neighbourhoods',
    hint=what,
  )


class GroupEncoder(nn.Module):
  """Mini-PointNet turning each (K, 3) neighbourhood into one token: (B, G, K, 3) -> (B, G, out_dim)."""

  out_dim: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, groups: jax.Array, *, train: bool) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=weight_init)
    x = dense(128, name='first_conv_0')(groups)
    x = nn.relu(TorchBatchNorm(dtype=self.dtype, name='first_bn')(x, train=train))
    x = dense(256, name='first_conv_1')(x)
    global_feature = jnp.max(x, axis=2, keepdims=True)
    x = jnp.concatenate([jnp.broadcast_to(global_feature, x.shape), x], axis=-1)  # [global | local], as original
    x = dense(512, name='second_conv_0')(x)
    x = nn.relu(TorchBatchNorm(dtype=self.dtype, name='second_bn')(x, train=train))
    x = dense(self.out_dim, name='second_conv_1')(x)
    return jnp.max(x, axis=2)


def drop_path(module: nn.Module, x: jax.Array, rate: jax.Array) -> jax.Array:
  """Stochastic depth: zero a sample's residual branch with probability `rate`, rescale the kept ones.

  rate is traced (the block scan feeds each block its own); a rate of 0 keeps every sample exactly.
  """
  keep = 1.0 - rate.astype(jnp.float32)
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = 'auto'  # layers.ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    # One qkv matrix, split q|k|v then head-major, exactly as the original's reshape(B, N, 3, H, D).
    qkv = nn.Dense(3 * width, use_bias=False, dtype=self.dtype, kernel_init=weight_init, name='qkv')(x)
    q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, self.num_heads, head_dim), 2, 0)
    out = attend(q, k, v, implementation=self.implementation).reshape(batch, length, width)
    return nn.Dense(width, dtype=self.dtype, kernel_init=weight_init, name='proj')(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = exact_gelu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=weight_init, name='fc1')(x))
    return nn.Dense(width, dtype=self.dtype, kernel_init=weight_init, name='fc2')(x)


class Block(nn.Module):
  """Pre-norm transformer block on x + pos (the position embedding enters every block); one step of the scan."""

  num_heads: int
  mlp_hidden: int
  stochastic_depth: bool  # training with drop_path_rate > 0 (needs a 'dropout' rng)
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, pos: jax.Array, drop_rate: jax.Array):
    norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype)
    drop = (lambda y: drop_path(self, y, drop_rate)) if self.stochastic_depth else (lambda y: y)
    x = x + pos
    x = x + drop(Attention(self.num_heads, self.dtype, self.attention, name='attn')(norm(name='norm1')(x)))
    return x + drop(Mlp(self.mlp_hidden, self.dtype, name='mlp')(norm(name='norm2')(x))), None


class PointTransformer(nn.Module):
  """points (B, N, 3) -> (B, embed_dim) CLIP-space embedding (or head logits, or the 2 x width pooled feature)."""

  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_groups: int = 64
  group_size: int = 32
  encoder_dim: int = 256
  drop_path_rate: float = 0.1
  embed_dim: int = 512
  num_classes: int | None = None  # None: no head. 55: the pre-training head that exports keep.
  in_channels: int = 3  # 6: xyz + rgb, ULIP-2's coloured Point-BERT (grouping on xyz, colours into the PointNet)
  projection_bias: bool = True  # False: ULIP's `pc_projection`, a bias-free matrix on the pooled feature
  head_hidden: int = 256
  head_dropout: float = 0.5
  dtype: Any = jnp.float32
  remat: Any = 'none'  # per-block rematerialisation policy, layers.REMAT_POLICIES
  attention: str = 'auto'  # layers.ATTENTION_IMPLEMENTATIONS
  scan_layers: bool = True  # False: the block loop unrolled in the compiled program (same parameters)

  @classmethod
  def from_config(cls, model_config) -> 'PointTransformer':
    """From `config.model` (configs/base.py): model.point_transformer.* plus embed_dim, num_classes, dtype, remat,
    attention, scan_layers."""
    pt = model_config.point_transformer
    return cls(
      width=pt.width,
      depth=pt.depth,
      num_heads=pt.num_heads,
      mlp_ratio=pt.mlp_ratio,
      num_groups=pt.num_groups,
      group_size=pt.group_size,
      encoder_dim=pt.encoder_dim,
      drop_path_rate=pt.drop_path_rate,
      embed_dim=model_config.embed_dim,
      num_classes=model_config.num_classes or None,
      head_hidden=pt.head_hidden,
      head_dropout=pt.head_dropout,
      **compute_settings(model_config),
      in_channels=model_config.get('in_channels', 3),
      projection_bias=pt.get('projection_bias', True),
    )

  @nn.compact
  def __call__(
    self, points: jax.Array, *, train: bool, return_logits: bool = False, return_features: bool = False
  ) -> jax.Array:
    """train: BatchNorm batch statistics (updating `batch_stats`), stochastic depth and head dropout ('dropout' rng).

    return_logits: the classification head's logits (fine-tuning); return_features: the pooled 2 x width feature.
    """
    validate_points(points, self.group_size, self.in_channels)
    if return_logits and return_features:
      raise ValueError('PointTransformer: ask for return_logits or return_features, not both')
    if return_logits and self.num_classes is None:
      raise ValueError('PointTransformer: return_logits=True needs num_classes (the model was built without a head)')
    if self.width % self.num_heads:
      raise ValueError(f'PointTransformer: width {self.width} is not divisible by num_heads {self.num_heads}')

    # Neighbours are selected on float32 distances whatever the dtype (point_ops), but gathered in at least float32
    # so that a float64 model sees float64 coordinates.
    neighbourhoods, centres = point_ops.group(points.astype(stats_dtype(self.dtype)), self.num_groups, self.group_size)
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=weight_init)
    tokens = GroupEncoder(self.encoder_dim, self.dtype, name='encoder')(neighbourhoods.astype(self.dtype), train=train)
    tokens = dense(self.width, name='reduce_dim')(tokens)
    pos = dense(self.width, name='pos_embed_1')(exact_gelu(dense(128, name='pos_embed_0')(centres.astype(self.dtype))))

    batch = points.shape[0]
    cls_token = self.param('cls_token', nn.initializers.zeros, (1, 1, self.width), jnp.float32)
    cls_pos = self.param('cls_pos', weight_init, (1, 1, self.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, self.width)).astype(self.dtype), tokens], axis=1)
    pos = jnp.concatenate([jnp.broadcast_to(cls_pos, (batch, 1, self.width)).astype(self.dtype), pos], axis=1)

    stack = layer_stack(Block, length=self.depth, remat=self.remat, scan=self.scan_layers, in_axes=(nn.broadcast, 0))
    blocks = stack(
      self.num_heads,
      int(self.width * self.mlp_ratio),
      train and self.drop_path_rate > 0,
      self.dtype,
      self.attention,
      name='blocks',
    )
    drop_rates = np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)  # torch.linspace(0, rate, depth)
    x, _ = blocks(x, pos, jnp.asarray(drop_rates))
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm')(x)
    features = jnp.concatenate([x[:, 0], jnp.max(x[:, 1:], axis=1)], axis=-1)

    # Both heads are always built so that init creates every parameter a strict export needs.
    embedding = dense(self.embed_dim, use_bias=self.projection_bias, name='projection')(features)
    logits = None
    if self.num_classes is not None:
      h = nn.relu(dense(self.head_hidden, name='cls_head_0')(features))
      h = nn.Dropout(self.head_dropout, deterministic=not (train and return_logits))(h)
      logits = dense(self.num_classes, name='cls_head_1')(h)
    if return_logits:
      return logits
    if return_features:
      return features
    return embedding
