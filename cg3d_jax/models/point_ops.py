"""Point-cloud operations shared by both point encoders: farthest-point sampling, kNN, gathers, grouping.

Pure JAX functions on batched arrays; they jit and vmap, and loop over nothing of size N in Python.

Selections (sampling, neighbour search) compare distances in float32, as the original CUDA code does, whatever the
compute dtype of the encoder (bfloat16 inputs are widened); float64 inputs (parity tests with x64 enabled) are
compared in float64, where two implementations' rounding cannot reorder near-equal distances.

Farthest-point sampling follows the original CUDA op (pointnet2_ops `furthest_point_sampling`):
  * the first sample is index 0, whatever that point is;
  * every point keeps a running minimum of its squared distance to the samples so far, initialised to 1e10;
  * candidates whose squared norm is <= 1e-3 (points at the origin, e.g. dropped points) are never picked
    (if every candidate is skipped, the CUDA kernel answers index 0, and so do we);
  * each step picks the argmax of the running minimum. On exact ties we take the LOWEST index; the CUDA kernel
    takes whatever its thread reduction meets first, so on clouds with exact ties the two sequences can differ.
  * asking for more samples than there are distinct valid points is allowed: once every valid point is picked,
    all running minima are 0 and each further step picks the lowest-index valid point again (CUDA: the first valid
    point seen by thread 0, i.e. also index 0 when point 0 is valid). The result then holds duplicates.

Formulation: a `lax.fori_loop` over the S samples whose body is a handful of fused elementwise ops and one argmax
over (B, N). It is sequential only where the algorithm is (in S) and parallel in B and N; memory is O(B * N)
(three (B, N) float arrays: 6 MiB at batch 64 x 8192 points) instead of the O(B * N^2) of a precomputed distance
matrix (17 GiB at that size). On accelerators each step is one small fused kernel, so the cost is S kernel steps.
"""

import jax
import jax.numpy as jnp
import numpy as np

# CUDA compares the float32 squared norm with the double literal 1e-3. float32(1e-3) is slightly above 1e-3, so the
# equivalent float32 test is `<=` against the largest float32 that is still <= 1e-3.
_ORIGIN_SQ_NORM = np.nextafter(np.float32(1e-3), np.float32(0.0))
_INITIAL_MIN_SQ_DIST = 1e10


def selection_dtype(dtype) -> jnp.dtype:
  """float32, or float64 for float64 inputs: the precision distances are compared in."""
  return jnp.promote_types(dtype, jnp.float32)


def _squared_distance_to(points: jax.Array, point: jax.Array) -> jax.Array:
  """(B, N, 3), (B, 3) -> (B, N), summed in the CUDA kernel's order so float32 results match it."""
  dx = points[..., 0] - point[:, None, 0]
  dy = points[..., 1] - point[:, None, 1]
  dz = points[..., 2] - point[:, None, 2]
  return dx * dx + dy * dy + dz * dz


def farthest_point_sample(points: jax.Array, num_samples: int) -> jax.Array:
  """Indices of `num_samples` farthest-point samples: (B, N, 3) float -> (B, num_samples) int32.

  See the module docstring for the exact rules (start at 0, 1e10 init, origin points skipped, lowest-index ties).
  """
  if points.ndim != 3 or points.shape[-1] != 3:
    raise ValueError(f'farthest_point_sample expects points of shape (B, N, 3), got {points.shape}')
  if num_samples < 1:
    raise ValueError(f'farthest_point_sample: num_samples must be >= 1, got {num_samples}')
  points = jax.lax.stop_gradient(points).astype(selection_dtype(points.dtype))
  batch = points.shape[0]
  x, y, z = points[..., 0], points[..., 1], points[..., 2]
  is_candidate = (x * x + y * y + z * z) > _ORIGIN_SQ_NORM

  def step(j, carry):
    min_sq_dist, indices, last = carry
    last_point = jnp.take_along_axis(points, last[:, None, None], axis=1)[:, 0]
    min_sq_dist = jnp.where(
      is_candidate, jnp.minimum(min_sq_dist, _squared_distance_to(points, last_point)), min_sq_dist
    )
    # Skipped points score -1, below every real distance; all-skipped clouds therefore give index 0, as in CUDA.
    score = jnp.where(is_candidate, min_sq_dist, -1.0)
    last = jnp.argmax(score, axis=1).astype(jnp.int32)  # argmax returns the first (lowest) index on ties
    return min_sq_dist, indices.at[:, j].set(last), last

  init = (
    jnp.full(points.shape[:2], _INITIAL_MIN_SQ_DIST, points.dtype),
    jnp.zeros((batch, num_samples), jnp.int32),
    jnp.zeros((batch,), jnp.int32),
  )
  _, indices, _ = jax.lax.fori_loop(1, num_samples, step, init)
  return indices


def gather_points(points: jax.Array, idx: jax.Array) -> jax.Array:
  """Per-batch gather: points (B, N, C), idx (B, ...) int -> (B, ..., C). Differentiable in `points`."""
  if points.ndim != 3:
    raise ValueError(f'gather_points expects points of shape (B, N, C), got {points.shape}')
  if idx.shape[0] != points.shape[0]:
    raise ValueError(f'gather_points: batch sizes differ: points {points.shape}, idx {idx.shape}')
  return jax.vmap(lambda p, i: p[i])(points, idx)


def pairwise_squared_distance(queries: jax.Array, points: jax.Array) -> jax.Array:
  """(B, S, C), (B, N, C) -> (B, S, N) as the originals compute it: (-2 a.b + |a|^2) + |b|^2.

  The expanded form (not sum((a - b)^2)) is kept so that near-ties resolve like the original kNN. The matmul runs
  at HIGHEST precision: default TPU/GPU precision would round inputs to bf16/tf32 and change neighbours. (Written
  out elementwise instead, XLA would contract the products into fused multiply-adds inside a fusion but not in an
  eager call, so the same function would rank near-ties differently jitted and not.)
  """
  cross = jnp.einsum('bsc,bnc->bsn', queries, points, precision=jax.lax.Precision.HIGHEST)
  dist = -2.0 * cross
  dist = dist + jnp.sum(queries**2, axis=-1)[:, :, None]
  return dist + jnp.sum(points**2, axis=-1)[:, None, :]


def knn(queries: jax.Array, points: jax.Array, k: int) -> jax.Array:
  """Indices of the k nearest `points` to each query: (B, S, 3), (B, N, 3) -> (B, S, k) int32, nearest first.

  Exact (brute force) on squared Euclidean distance; ties go to the lower index.
  """
  if queries.ndim != 3 or points.ndim != 3 or queries.shape[-1] != points.shape[-1]:
    raise ValueError(f'knn expects queries (B, S, C) and points (B, N, C), got {queries.shape} and {points.shape}')
  if not 1 <= k <= points.shape[1]:
    raise ValueError(f'knn: k must be in [1, N={points.shape[1]}], got {k}')
  dtype = selection_dtype(jnp.result_type(queries, points))
  queries = jax.lax.stop_gradient(queries).astype(dtype)
  points = jax.lax.stop_gradient(points).astype(dtype)
  _, idx = jax.lax.top_k(-pairwise_squared_distance(queries, points), k)
  return idx.astype(jnp.int32)


def sample_points(points: jax.Array, num_points: int) -> jax.Array:
  """FPS from stored clouds (B, S, C) down to (B, num_points, C), as the original does on device before encoding;
  distances on xyz (the first 3 channels), colours carried along."""
  if points.shape[1] == num_points:
    return points
  if points.shape[1] < num_points:
    raise ValueError(
      f'cannot sample {num_points} points from clouds of {points.shape[1]}: the stored clouds must '
      "hold at least the encoder's num_points"
    )
  return gather_points(points, farthest_point_sample(points[..., :3], num_points))


def group(points: jax.Array, num_groups: int, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Point-BERT grouping: FPS centres, then each centre's `group_size` nearest points, centred on the centre.

  points (B, N, 3) -> neighbourhood (B, G, K, 3), centres (B, G, 3). Coloured clouds (B, N, 3 + F), as ULIP-2's
  coloured Point-BERT: centres and neighbours from xyz alone, neighbourhood (B, G, K, 3 + F) = [xyz - centre |
  the neighbours' own F channels]. Gradients flow to `points` through the gathers; the index selection itself is
  not differentiable.
  """
  if points.ndim != 3 or points.shape[-1] < 3:
    raise ValueError(f'group expects points of shape (B, N, 3 + channels), got {points.shape}')
  if points.shape[1] < group_size:
    raise ValueError(f'group: need at least group_size={group_size} points per cloud, got N={points.shape[1]}')
  xyz = points[..., :3]
  centers = gather_points(xyz, farthest_point_sample(xyz, num_groups))
  neighbours = gather_points(points, knn(centers, xyz, group_size))
  centred = neighbours[..., :3] - centers[:, :, None, :]
  if points.shape[-1] == 3:
    return centred, centers
  return jnp.concatenate([centred, neighbours[..., 3:]], axis=-1), centers


def check_points(
  points, *, model: str, in_channels: int, min_points: int, why: str, named: str = '', what: str = '', hint: str = ''
):
  """Clear errors for unusable clouds, before any compute: `model`'s expected shape (with `what` said of the
  channels, and a `hint` for a near miss), at least `min_points` points (as `named`, for `why`), finite values.
  Shapes are checked always (static even under jit); values only on concrete arrays: under jit the points are
  tracers, so jitted callers validate their host batches first."""
  shape = getattr(points, 'shape', None)
  if shape is None or len(shape) != 3 or shape[-1] != in_channels:
    raise ValueError(
      f'{model} expects points of shape (batch, num_points, {in_channels}){what}, got shape {shape}{hint}'
    )
  if shape[1] < min_points:
    raise ValueError(
      f'{model} needs at least {named or min_points} points per cloud {why}, got {shape[1]} points '
      f'(shape {tuple(shape)})'
    )
  if not isinstance(points, jax.core.Tracer):
    finite = np.isfinite(np.asarray(points))
    if not finite.all():
      bad = sorted(set(np.nonzero(~finite)[0].tolist()))
      raise ValueError(
        f'{model} got non-finite (NaN/Inf) point values in batch rows {bad[:10]}{" ..." if len(bad) > 10 else ""}'
      )
