"""Point-cloud transforms on device, in JAX, inside the training and evaluation steps: fine-tuning's sampling from
farthest-point-sampled clouds and CG3D's per-cloud scale and translation (host_transforms says where the rest of
the recipe runs)."""

import jax

SCALE_RANGE = (2.0 / 3.0, 3.0 / 2.0)
TRANSLATE_RANGE = 0.2


def scale_and_translate(rng: jax.Array, points: jax.Array) -> jax.Array:
  """Per-sample anisotropic scale U[2/3, 3/2] and translation U[-0.2, 0.2] of clouds (..., N, 3).

  Each cloud (every index of the leading dims) draws its own 3 scales and 3 offsets.
  """
  batch_shape = points.shape[:-2] + (1, 3)
  scale_rng, shift_rng = jax.random.split(rng)
  scale = jax.random.uniform(scale_rng, batch_shape, points.dtype, *SCALE_RANGE)
  shift = jax.random.uniform(shift_rng, batch_shape, points.dtype, -TRANSLATE_RANGE, TRANSLATE_RANGE)
  return points * scale + shift


def sample_training_points(key: jax.Array, sampled: jax.Array, num_points: int, *, augment: bool) -> jax.Array:
  """Fine-tuning's sampling from FPS-sampled clouds (B, F, 3): one random subset of num_points for the whole batch
  (the original's np.random.choice(point_all, npoints, False)), then per-cloud scale and translation."""
  subset_key, aug_key = jax.random.split(key)
  if sampled.shape[1] > num_points:
    sampled = sampled[:, jax.random.choice(subset_key, sampled.shape[1], (num_points,), replace=False)]
  return scale_and_translate(aug_key, sampled) if augment else sampled


def fps_count(num_points: int, stored: int, fps_points: int | None) -> int:
  """Points farthest-point sampled before fine-tuning's random subset: finetune.fps_points, else the original's
  table (1024 -> 1200, 2048 -> 2400, 4096 -> 4800, 8192 -> 8192); never more than the stored cloud holds."""
  if not fps_points:
    fps_points = {1024: 1200, 2048: 2400, 4096: 4800}.get(num_points, num_points)
  if fps_points < num_points:
    raise ValueError(f'finetune.fps_points={fps_points} is below config.model.num_points={num_points}')
  return min(fps_points, stored)
