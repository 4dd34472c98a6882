"""PointMLP, CG3D's second 3D encoder (Ma et al., ICLR 2022), with CG3D's projection into CLIP space.

Data flow for (B, N, 3) points (or (B, N, 6) xyz + rgb with in_channels=6) with CG3D's settings: a per-point 1x1
conv embeds the input channels into 64; four stages each pick N_i // 2 anchors by farthest-point sampling (on xyz),
gather the 24 nearest neighbours of every anchor, normalise the neighbourhood relative to its anchor ("anchor"
normalisation, one std per cloud, learnable affine), run residual point-wise MLPs over each neighbourhood
(PreExtraction, max over the neighbours) and then over the anchors (PosExtraction). Channels double every stage
(128, 256, 512, 1024). A global max pool and a 1x1 conv with bias (1024 -> 512) give the CLIP-space feature.

Layout is channels-last throughout: a 1x1 Conv1d is a Dense over the last axis. Every conv has no bias except the
projection (the original sets bias=False). BatchNorm follows PyTorch exactly (see `layers.TorchBatchNorm`). Sampling and
neighbour search compare float32 distances whatever the compute dtype, so that every dtype picks the same points
(float64 clouds are compared in float64: see point_ops).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cg3d_jax.models import point_ops
from cg3d_jax.models.layers import TorchBatchNorm, stats_dtype

# The original adds this to the std before dividing (LocalGrouper, normalize="anchor").
_STD_EPS = 1e-5

# PyTorch's Conv1d default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so that training from scratch starts where
# the original starts (Flax's lecun_normal has three times the variance).
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _torch_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv1x1(features: int, dtype, name: str, use_bias: bool = False, fan_in: int | None = None) -> nn.Dense:
  bias_init = _torch_bias_init(fan_in) if use_bias else nn.initializers.zeros
  return nn.Dense(
    features, use_bias=use_bias, dtype=dtype, kernel_init=_torch_kernel_init, bias_init=bias_init, name=name
  )


class ConvBNReLU(nn.Module):
  """1x1 conv (no bias), BatchNorm, ReLU: the original's ConvBNReLU1D."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = _conv1x1(self.features, self.dtype, 'conv')(x)
    x = TorchBatchNorm(dtype=self.dtype, name='bn')(x, train=train)
    return nn.relu(x)


class ResidualBlock(nn.Module):
  """conv-bn-relu, conv-bn, add the input, relu: the original's ConvBNReLURes1D (groups=1)."""

  res_expansion: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    channels = x.shape[-1]
    y = _conv1x1(int(channels * self.res_expansion), self.dtype, 'conv1')(x)
    y = nn.relu(TorchBatchNorm(dtype=self.dtype, name='bn1')(y, train=train))
    y = _conv1x1(channels, self.dtype, 'conv2')(y)
    y = TorchBatchNorm(dtype=self.dtype, name='bn2')(y, train=train)
    return nn.relu(y + x)


def anchor_normalize(grouped, anchors, dtype=jnp.float32):
  """Neighbourhoods relative to their anchor, divided by one std per cloud.

  grouped (B, S, K, C), anchors (B, S, C). The std is PyTorch's unbiased std over all S*K*C values of each cloud
  (CG3D's LocalGrouper; the upstream PointMLP repo took one std over the whole batch instead).
  """
  compute = stats_dtype(dtype)
  diff = grouped.astype(compute) - anchors.astype(compute)[:, :, None, :]
  flat = diff.reshape(diff.shape[0], -1)
  std = jnp.std(flat, axis=-1, ddof=1)
  return diff / (std[:, None, None, None] + _STD_EPS)


class LocalGrouper(nn.Module):
  """FPS anchors, kNN neighbourhoods, anchor normalisation with a learnable affine, anchor features appended.

  Returns the anchors' xyz (B, S, 3) and the grouped features (B, S, K, 2C).
  """

  num_anchors: int
  num_neighbors: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xyz, features):
    # Stored (1, 1, 1, C) as in the original: the shape is what its weight-decay rule (ndim >= 2 decays) sees.
    shape = (1, 1, 1, features.shape[-1])
    alpha = self.param('affine_alpha', nn.initializers.ones, shape, jnp.float32)
    beta = self.param('affine_beta', nn.initializers.zeros, shape, jnp.float32)
    anchor_idx = point_ops.farthest_point_sample(xyz, self.num_anchors)
    anchor_xyz = point_ops.gather_points(xyz, anchor_idx)
    anchor_features = point_ops.gather_points(features, anchor_idx)
    neighbor_idx = point_ops.knn(anchor_xyz, xyz, self.num_neighbors)
    grouped = point_ops.gather_points(features, neighbor_idx)
    grouped = (alpha * anchor_normalize(grouped, anchor_features, self.dtype) + beta).astype(self.dtype)
    repeated = jnp.broadcast_to(anchor_features[:, :, None, :], grouped.shape).astype(self.dtype)
    return anchor_xyz, jnp.concatenate([grouped, repeated], axis=-1)


class PreExtraction(nn.Module):
  """Per-neighbourhood MLP: transfer conv to the stage width, residual blocks, max over the neighbours."""

  features: int
  num_blocks: int
  res_expansion: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grouped, *, train: bool):
    x = ConvBNReLU(self.features, dtype=self.dtype, name='transfer')(grouped, train=train)
    for j in range(self.num_blocks):
      x = ResidualBlock(self.res_expansion, dtype=self.dtype, name=f'block_{j}')(x, train=train)
    return jnp.max(x, axis=2)


class PosExtraction(nn.Module):
  """Per-anchor residual blocks."""

  num_blocks: int
  res_expansion: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for j in range(self.num_blocks):
      x = ResidualBlock(self.res_expansion, dtype=self.dtype, name=f'block_{j}')(x, train=train)
    return x


def stage_point_counts(num_points: int, reducers: Sequence[int]) -> list[int]:
  """Points entering each stage: N, N // r0, N // r0 // r1, ... (anchors of stage i = entry of stage i + 1)."""
  counts = [num_points]
  for r in reducers:
    counts.append(counts[-1] // r)
  return counts


def check_points(points, k_neighbors: Sequence[int], reducers: Sequence[int], in_channels: int = 3) -> None:
  """Clear errors for input the network cannot process; runs on shapes, and on values when they are concrete."""
  shape = getattr(points, 'shape', None)
  if shape is None or len(shape) != 3 or shape[-1] != in_channels:
    what = '' if in_channels == 3 else f' (xyz + {in_channels - 3} colour channels: model in_channels={in_channels})'
    raise ValueError(f'PointMLP expects points of shape (batch, num_points, {in_channels}), got shape {shape}{what}')
  if not jnp.issubdtype(points.dtype, jnp.floating):
    raise ValueError(f'PointMLP expects floating-point points, got dtype {points.dtype}')
  counts = stage_point_counts(shape[1], reducers)
  for i, k in enumerate(k_neighbors):
    if counts[i + 1] < 1 or counts[i] < k:
      raise ValueError(
        f'PointMLP stage {i} needs at least {k} points for its {k}-neighbourhoods and at least one anchor, '
        f'but {shape[1]} input points leave {counts[i]} points and {counts[i + 1]} anchors there '
        f'(reducers={tuple(reducers)}, k_neighbors={tuple(k_neighbors)})'
      )
  # Under jit the values are abstract (and a multi-host array is not all here); the data pipeline is then the
  # place that rejects non-finite clouds.
  if not isinstance(points, jax.core.Tracer) and getattr(points, 'is_fully_addressable', True):
    finite = np.isfinite(np.asarray(points)).all(axis=(1, 2))
    if not finite.all():
      raise ValueError(f'PointMLP input has NaN or infinite coordinates in clouds {np.flatnonzero(~finite).tolist()}')


class PointMLP(nn.Module):
  """PointMLP encoder with CG3D's projection; __call__(points (B, N, in_channels), train=...) -> (B, projection_dim).

  in_channels=6 (xyz + rgb) is OpenShape's coloured PointMLP (openpoints' PointMLPEncoder with in_channels 6): the
  embedding conv sees every channel, sampling and neighbour search use xyz alone.

  Anchor counts follow the input: N // 2, N // 4, ... The original fixes them at construction from `points=1024`
  (CG3D always feeds 1024 points), which is the same network for N = 1024.
  """

  embed_dim: int = 64
  res_expansion: float = 1.0
  dim_expansion: Sequence[int] = (2, 2, 2, 2)
  pre_blocks: Sequence[int] = (2, 2, 2, 2)
  pos_blocks: Sequence[int] = (2, 2, 2, 2)
  k_neighbors: Sequence[int] = (24, 24, 24, 24)
  reducers: Sequence[int] = (2, 2, 2, 2)
  projection_dim: int = 512
  dtype: Any = jnp.float32
  in_channels: int = 3

  @classmethod
  def from_config(cls, model_config) -> 'PointMLP':
    """Builds from `config.model` (configs/base.py): model.pointmlp.* sizes, model.embed_dim, model.dtype."""
    p = model_config.pointmlp
    return cls(
      embed_dim=p.embed_dim,
      res_expansion=p.res_expansion,
      dim_expansion=tuple(p.dim_expansion),
      pre_blocks=tuple(p.pre_blocks),
      pos_blocks=tuple(p.pos_blocks),
      k_neighbors=tuple(p.k_neighbors),
      reducers=tuple(p.reducers),
      projection_dim=model_config.embed_dim,
      dtype=jnp.dtype(model_config.dtype),
      in_channels=model_config.get('in_channels', 3),
    )

  def _check_settings(self) -> None:
    lengths = {
      name: len(getattr(self, name))
      for name in ('dim_expansion', 'pre_blocks', 'pos_blocks', 'k_neighbors', 'reducers')
    }
    if len(set(lengths.values())) != 1:
      raise ValueError(f'PointMLP per-stage settings must all have one entry per stage, got lengths {lengths}')

  @nn.compact
  def __call__(self, points, *, train: bool):
    self._check_settings()
    check_points(points, self.k_neighbors, self.reducers, self.in_channels)
    xyz = points[..., :3]  # point_ops samples and searches in float32 (float64 for float64 clouds) whatever the dtype
    counts = stage_point_counts(points.shape[1], self.reducers)
    x = ConvBNReLU(self.embed_dim, dtype=self.dtype, name='embedding')(points.astype(self.dtype), train=train)
    channels = self.embed_dim
    for i in range(len(self.reducers)):
      channels *= self.dim_expansion[i]
      xyz, grouped = LocalGrouper(counts[i + 1], self.k_neighbors[i], dtype=self.dtype, name=f'local_grouper_{i}')(
        xyz, x
      )
      x = PreExtraction(channels, self.pre_blocks[i], self.res_expansion, dtype=self.dtype, name=f'pre_blocks_{i}')(
        grouped, train=train
      )
      x = PosExtraction(self.pos_blocks[i], self.res_expansion, dtype=self.dtype, name=f'pos_blocks_{i}')(
        x, train=train
      )
    pooled = jnp.max(x, axis=1)
    return _conv1x1(self.projection_dim, self.dtype, 'projection', use_bias=True, fan_in=channels)(pooled)
