"""OpenShape's released point encoder, PPAT ("PointBERT" in OpenShape's configs), in Flax.

Computes what OpenShape's `src/models/ppat.py` (`Projected(PointPatchTransformer, Linear)`) and the helpers it uses
in `src/models/pointnet_util.py` compute, read at the source (OpenShape_code commit abe5aa42b7c9):

  points (B, N, C): xyz, or xyz + rgb with in_channels=6. OpenShape passes the model `xyz` and `features`, and its
    data pipeline always builds `features` from the same xyz: [xyz | rgb] with colour, plain xyz without. Here the
    one array is both: xyz = points[..., :3], features = points.
  -> set abstraction (PointNet++ `PointNetSetAbstraction`, group_all=False):
     * farthest-point sampling of `num_patches` centres with DGL's `farthest_point_sampler` rules (below);
     * ball query of radius `radius`, `num_samples` points per centre (`query_ball_point`, below);
     * per sample [xyz - centre | features] (3 + in_channels channels: [xyz - centre, xyz, rgb] for coloured
       clouds, [xyz - centre, xyz] for plain ones), then 1x1 conv + BatchNorm + ReLU for each of `sa_channels`
       (64, 64, sa_dim), max over the samples;
  -> `lift`: 1x1 conv of [centre xyz | pooled feature] (3 + sa_dim channels) to `width`, then LayerNorm;
  -> [cls_token | patch tokens] -> `depth` pre-norm layers (x + Attention(LN(x)), then x + FFN(LN(x)); attention
     of `num_heads` x `head_dim` with a bias-free qkv and scale head_dim^-0.5 applied after q.k; FFN Linear, exact
     GELU, Linear). No final norm, no position embedding (the relative-position branch `rel_pe` exists in the
     code but `make` never turns it on, so it is not implemented);
  -> the cls token (B, width), and `proj`: Linear(width, embed_dim) into the CLIP space (OpenCLIP ViT-bigG-14's
     1280 for the released models; not normalised).

Farthest-point sampling (DGL's `farthest_point_sampler`, CPU kernel `src/geometry/cpu/geometry_op_impl.cc`):
  * OpenShape never gives a start index, so DGL starts each cloud at a random point (torch.randint(0, N - 1), so
    never the last point). Here the start is an argument: `fps_start_index` (default 0), or per call `start_index`
    (an int or one index per cloud), so that results are deterministic and comparable;
  * each point keeps the minimum of its squared distance to the samples so far (((dx^2 + dy^2) + dz^2) in the
    coordinates' precision); each step takes the first index of the maximum. Unlike pointnet2_ops' CUDA FPS there
    is no 1e10 initialisation and no skipping of points near the origin. DGL's CUDA kernel (which OpenShape ran on)
    breaks exact ties by thread (the tied point with the smallest index modulo 1024 wins) and may fuse the
    multiply-adds; exact ties (copies of a point) and ulp-close maxima can therefore pick differently on a GPU.
Ball query (OpenShape's own `query_ball_point` in pure PyTorch, neither pointnet2_ops nor DGL):
  * squared distances in the expanded form (-2 c.p + |c|^2) + |p|^2 (`square_distance`), a point is in the ball
    unless that distance is > radius^2, i.e. d^2 <= r^2 counts, the boundary included (pointnet2's CUDA op uses a
    strict <). radius^2 is computed in Python (double) and compared in the coordinates' dtype, as PyTorch compares a
    tensor with a Python float;
  * the ball's indices in ascending index order (not by distance), the first `num_samples`; a ball with fewer fills
    the remaining slots with its lowest index. Each centre is a cloud point, so a ball is empty only for clouds far
    from unit scale (where a point's expanded distance to itself exceeds r^2); OpenShape's gather then fails, here
    the slots hold index N - 1.
Selections are made in float32, or float64 for a float64 model (bfloat16 compute selects in float32).

Colourless clouds: OpenShape's released encoders (in_channel 6, the `rgb` checkpoints) are trained with the colour
replaced by 0.4 everywhere for half of the objects (`rgb_random_drop_prob` 0.5); `with_default_colour` gives a
plain xyz cloud that colour. A model trained without colour (use_color False) is in_channels=3.

Parameter tree (names follow the state dict; weights/openshape_pt.py maps them):
  params: cls_token (W,)
          sa/{conv_0, conv_1, conv_2}   Dense, kernel (in, out) + bias: the 1x1 Conv2d `mlp_convs`
          sa/{bn_0, bn_1, bn_2}         scale, bias (TorchBatchNorm: `mlp_bns`)
          lift (Dense 3 + sa_dim -> W), lift_norm (LayerNorm)
          layers/{attn_norm, attn/{to_qkv (no bias), to_out}, ffn_norm, ffn/{fc1, fc2}}, each with a leading depth
            axis (one scanned module; conversions name them layers_{i}, trees.stack_layers). attn/to_out is absent
            when num_heads == 1 and head_dim == width (OpenShape's `project_out`).
          proj (Dense W -> embed_dim)
  batch_stats: sa/{bn_0, bn_1, bn_2}/{mean, var}
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cg3d_jax.models import point_ops
from cg3d_jax.models.layers import TorchBatchNorm, attend, compute_settings, layer_stack, stats_dtype

# ppat.make(cfg): the sizes of each `model.scaling`. The released models are scaling 4.
OPENSHAPE_SCALINGS = {
  1: dict(width=256, depth=6, num_heads=4, mlp_dim=1024, sa_dim=96, num_patches=64, radius=0.4, num_samples=256),
  2: dict(width=512, depth=6, num_heads=8, mlp_dim=1024, sa_dim=128, num_patches=64, radius=0.4, num_samples=256),
  3: dict(width=512, depth=12, num_heads=8, mlp_dim=1024, sa_dim=128, num_patches=128, radius=0.35, num_samples=128),
  4: dict(width=512, depth=12, num_heads=8, mlp_dim=1536, sa_dim=256, num_patches=384, radius=0.2, num_samples=64),
  5: dict(width=768, depth=12, num_heads=12, mlp_dim=2304, sa_dim=256, num_patches=512, radius=0.2, num_samples=64),
  6: dict(width=768, depth=24, num_heads=12, mlp_dim=3072, sa_dim=256, num_patches=512, radius=0.2, num_samples=64),
}
# The colour OpenShape's training substitutes when it drops an object's colours.
DEFAULT_COLOUR = 0.4

# PyTorch's default Linear/Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, so that training
# from scratch starts where OpenShape starts; the cls token is torch.randn.
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
exact_gelu = functools.partial(nn.gelu, approximate=False)


def _torch_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(features: int, fan_in: int, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=_torch_kernel_init,
    bias_init=_torch_bias_init(fan_in),
    name=name,
  )


def with_default_colour(xyz, value: float = DEFAULT_COLOUR):
  """(B, N, 3) xyz -> (B, N, 6) xyz + a uniform colour: how OpenShape's rgb encoders see a cloud without colours."""
  xyz = jnp.asarray(xyz)
  return jnp.concatenate([xyz, jnp.full(xyz.shape[:-1] + (3,), value, xyz.dtype)], axis=-1)


# --- sampling and grouping --------------------------------------------------------------------------------------


def farthest_point_sample(xyz: jax.Array, num_samples: int, start_index: Any = 0) -> jax.Array:
  """DGL's farthest_point_sampler (CPU rules, see the module docstring): (B, N, 3) -> (B, num_samples) int32.

  start_index: the first sample, one int for every cloud or (B,) ints. Distances are compared in float32 (float64
  for float64 input).
  """
  if xyz.ndim != 3 or xyz.shape[-1] != 3:
    raise ValueError(f'farthest_point_sample expects xyz of shape (B, N, 3), got {xyz.shape}')
  if num_samples < 1:
    raise ValueError(f'farthest_point_sample: num_samples must be >= 1, got {num_samples}')
  xyz = jax.lax.stop_gradient(xyz).astype(point_ops.selection_dtype(xyz.dtype))
  batch, n, _ = xyz.shape
  start = jnp.broadcast_to(jnp.asarray(start_index, jnp.int32), (batch,))

  def step(j, carry):
    min_sq_dist, indices, last = carry
    p = jnp.take_along_axis(xyz, last[:, None, None], axis=1)  # (B, 1, 3)
    d = xyz - p
    # DGL sums the squared differences dimension by dimension, in that order.
    sq_dist = (d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]) + d[..., 2] * d[..., 2]
    min_sq_dist = jnp.where(min_sq_dist > sq_dist, sq_dist, min_sq_dist)
    last = jnp.argmax(min_sq_dist, axis=1).astype(jnp.int32)  # the first index of the maximum, as DGL's strict '>'
    return min_sq_dist, indices.at[:, j].set(last), last

  # +inf: DGL's first step takes the distances to the start as they are.
  init = (
    jnp.full((batch, n), jnp.inf, xyz.dtype),
    jnp.zeros((batch, num_samples), jnp.int32).at[:, 0].set(start),
    start,
  )
  _, indices, _ = jax.lax.fori_loop(1, num_samples, step, init)
  return indices


def ball_query(xyz: jax.Array, centres: jax.Array, radius: float, num_samples: int) -> jax.Array:
  """OpenShape's query_ball_point: (B, N, 3) points, (B, S, 3) centres -> (B, S, num_samples) int32 indices.

  The first `num_samples` indices (ascending) whose expanded squared distance is not > radius^2, the lowest one
  repeated when fewer are inside (see the module docstring).
  """
  if xyz.ndim != 3 or centres.ndim != 3 or xyz.shape[-1] != 3 or centres.shape[-1] != 3:
    raise ValueError(f'ball_query expects xyz (B, N, 3) and centres (B, S, 3), got {xyz.shape} and {centres.shape}')
  n = xyz.shape[1]
  if not 1 <= num_samples <= n:
    raise ValueError(f'ball_query: num_samples must be in [1, N={n}], got {num_samples}')
  dtype = point_ops.selection_dtype(jnp.result_type(xyz, centres))
  xyz = jax.lax.stop_gradient(xyz).astype(dtype)
  centres = jax.lax.stop_gradient(centres).astype(dtype)
  sq_dist = point_ops.pairwise_squared_distance(centres, xyz)
  # `sqrdists > radius ** 2` in PyTorch: the Python double converted to the tensor's dtype, then compared.
  inside = ~(sq_dist > jnp.asarray(radius**2, dtype))
  # Index of the j-th point inside = the first position where the running count of inside points reaches j:
  # O(N) per row and parallel, where OpenShape sorts every row.
  counts = jnp.cumsum(inside, axis=-1, dtype=jnp.int32)
  wanted = jnp.arange(1, num_samples + 1, dtype=jnp.int32)
  idx = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, wanted, side='left')))(counts).astype(jnp.int32)
  idx = jnp.where(idx >= n, idx[..., :1], idx)  # fewer inside: the lowest inside index fills the rest
  return jnp.minimum(idx, n - 1)  # an empty ball (see the module docstring)


def validate_points(points: Any, in_channels: int, min_points: int) -> None:
  """point_ops.check_points for the PPAT: its channels and the points its patches and balls need."""
  hint = ''
  if getattr(points, 'shape', (0,))[-1] == 3 and in_channels == 6:
    hint = '; a cloud without colours takes the colour OpenShape trains with: ppat.with_default_colour(xyz)'
  what = ' (xyz)' if in_channels == 3 else f' (xyz + {in_channels - 3} colour channels)'
  point_ops.check_points(
    points,
    model='PPAT',
    in_channels=in_channels,
    min_points=min_points,
    why='(num_patches centres, num_samples per ball)',
    what=what,
    hint=hint,
  )


# --- modules ----------------------------------------------------------------------------------------------------


class SetAbstraction(nn.Module):
  """Grouped samples (B, S, K, 3 + C) -> (B, S, channels[-1]): per sample 1x1 conv, BatchNorm, ReLU; max over K."""

  channels: tuple[int, ...] = (64, 64, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grouped: jax.Array, *, train: bool) -> jax.Array:
    x = grouped.astype(self.dtype)
    for i, features in enumerate(self.channels):
      x = _dense(features, x.shape[-1], self.dtype, f'conv_{i}')(x)
      x = nn.relu(TorchBatchNorm(dtype=self.dtype, name=f'bn_{i}')(x, train=train))
    return jnp.max(x, axis=2)


class Attention(nn.Module):
  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  implementation: str = 'auto'  # layers.ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    inner = self.num_heads * self.head_dim
    # to_qkv(x).chunk(3) then 'b n (h d) -> b h n d': q | k | v, heads outer within each.
    qkv = _dense(3 * inner, width, self.dtype, 'to_qkv', use_bias=False)(x)
    q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, self.num_heads, self.head_dim), 2, 0)
    out = attend(q, k, v, implementation=self.implementation).reshape(batch, length, inner)
    if self.num_heads == 1 and self.head_dim == width:
      return out  # OpenShape's project_out=False: to_out is an Identity
    return _dense(width, inner, self.dtype, 'to_out')(out)


class FeedForward(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = exact_gelu(_dense(self.hidden, width, self.dtype, 'fc1')(x))
    return _dense(width, self.hidden, self.dtype, 'fc2')(x)


class Layer(nn.Module):
  """One pre-norm transformer layer (PreNorm(Attention), PreNorm(FeedForward)); one step of the scan."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array):
    norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype)
    attn = Attention(self.num_heads, self.head_dim, self.dtype, self.attention, name='attn')
    x = attn(norm(name='attn_norm')(x)) + x
    return FeedForward(self.mlp_dim, self.dtype, name='ffn')(norm(name='ffn_norm')(x)) + x, None


class PPAT(nn.Module):
  """points (B, N, in_channels) -> (B, embed_dim) OpenShape embedding (or the (B, width) cls feature before `proj`).

  Defaults: the released models (scaling 4, xyz + rgb, OpenCLIP ViT-bigG-14's 1280). `from_scaling` gives the
  other sizes of OpenShape's `make`.
  """

  width: int = 512
  depth: int = 12
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 1536
  sa_channels: tuple[int, ...] = (64, 64, 256)
  num_patches: int = 384
  radius: float = 0.2
  num_samples: int = 64
  in_channels: int = 6  # 6: xyz + rgb (the released models); 3: xyz (OpenShape with use_color False)
  embed_dim: int = 1280
  patch_dropout: int = 0  # training drops this many centres (OpenShape's patch_dropout; 0 in every config)
  fps_start_index: int = 0  # OpenShape (DGL) starts at a random point; see the module docstring
  dtype: Any = jnp.float32
  remat: Any = 'none'  # per-layer rematerialisation, layers.REMAT_POLICIES
  attention: str = 'auto'  # layers.ATTENTION_IMPLEMENTATIONS
  scan_layers: bool = True  # False: the layer loop unrolled in the compiled program (same parameters)

  @classmethod
  def from_config(cls, model_config) -> 'PPAT':
    """From `config.model`: model.ppat.* plus in_channels, embed_dim, dtype, remat, attention, scan_layers."""
    p = model_config.ppat
    return cls(
      width=p.width,
      depth=p.depth,
      num_heads=p.num_heads,
      head_dim=p.head_dim,
      mlp_dim=p.mlp_dim,
      sa_channels=tuple(p.sa_channels),
      num_patches=p.num_patches,
      radius=float(p.radius),
      num_samples=p.num_samples,
      in_channels=model_config.get('in_channels', 6),
      embed_dim=model_config.embed_dim,
      **compute_settings(model_config),
    )

  @classmethod
  def from_scaling(cls, scaling: int = 4, **overrides) -> 'PPAT':
    """The sizes of OpenShape's `ppat.make` for `model.scaling` (1-6); overrides: any other field."""
    if scaling not in OPENSHAPE_SCALINGS:
      raise ValueError(f'OpenShape scaling must be one of {sorted(OPENSHAPE_SCALINGS)}, got {scaling!r}')
    sizes = dict(OPENSHAPE_SCALINGS[scaling])
    sa_dim = sizes.pop('sa_dim')
    return cls(**{**sizes, 'sa_channels': (64, 64, sa_dim), **overrides})

  def _check_settings(self) -> None:
    if self.in_channels < 3:
      raise ValueError(f'PPAT: in_channels must be >= 3 (xyz first), got {self.in_channels}')
    if not self.sa_channels:
      raise ValueError('PPAT: sa_channels must name at least one layer')
    if not 0 <= self.patch_dropout < self.num_patches:
      raise ValueError(f'PPAT: patch_dropout must be in [0, num_patches={self.num_patches}), got {self.patch_dropout}')

  @nn.compact
  def __call__(
    self, points: jax.Array, *, train: bool, start_index: Any = None, return_features: bool = False
  ) -> jax.Array:
    """train: BatchNorm batch statistics (updating `batch_stats`) and patch dropout.

    start_index: the FPS start, an int or (B,) ints (default `fps_start_index`); return_features: the (B, width)
    cls feature instead of its projection.
    """
    self._check_settings()
    validate_points(points, self.in_channels, max(self.num_patches, self.num_samples))
    start = self.fps_start_index if start_index is None else start_index
    if not isinstance(start, jax.core.Tracer):
      start_values = np.asarray(start)
      if start_values.ndim > 1 or np.any(start_values < 0) or np.any(start_values >= points.shape[1]):
        raise ValueError(
          f'PPAT: start_index must be in [0, N={points.shape[1]}) (an int or one per cloud), got {start}'
        )

    # Coordinates in at least float32 (the selections' precision; float64 for a float64 model).
    points = points.astype(stats_dtype(self.dtype))
    xyz = points[..., :3]
    num_patches = self.num_patches - (self.patch_dropout if train else 0)
    centres = point_ops.gather_points(xyz, farthest_point_sample(xyz, num_patches, start))
    grouped = point_ops.gather_points(points, ball_query(xyz, centres, self.radius, self.num_samples))
    grouped = jnp.concatenate([grouped[..., :3] - centres[:, :, None, :], grouped], axis=-1)
    patches = SetAbstraction(tuple(self.sa_channels), self.dtype, name='sa')(grouped, train=train)

    tokens = jnp.concatenate([centres.astype(self.dtype), patches], axis=-1)
    tokens = _dense(self.width, tokens.shape[-1], self.dtype, 'lift')(tokens)
    tokens = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='lift_norm')(tokens)
    cls_token = self.param('cls_token', nn.initializers.normal(1.0), (self.width,), jnp.float32)
    batch = points.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, self.width)), tokens], axis=1)

    stack = layer_stack(Layer, length=self.depth, remat=self.remat, scan=self.scan_layers)
    x, _ = stack(self.num_heads, self.head_dim, self.mlp_dim, self.dtype, self.attention, name='layers')(x)
    features = x[:, 0]
    embedding = _dense(self.embed_dim, self.width, self.dtype, 'proj')(features)  # built always: init creates it
    return features if return_features else embedding
