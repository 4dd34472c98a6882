"""Point-cloud normalisation, resampling and CG3D's augmentations, with explicit randomness.

Three flavours of the same recipe, each where it runs:
  * NumPy: the host-side normalisation here; the reference twins of the augmentations and of FPS, written after
    CG3D's `utils/augment.py` and its CUDA op, live with the tests (tests/numpy_transforms.py);
  * TensorFlow (`tf_*`, in data/tf_transforms.py, so that nothing else imports TensorFlow): what the tf.data
    pipeline runs per example, with stateless RNG so that an example's augmentation is a pure function of (seed,
    epoch, example index) and a restarted pipeline repeats itself;
  * JAX (`scale_and_translate`): the last step, which the train step calls on device after its farthest-point
    sampling, as the original does `misc.fps` then `PointcloudScaleAndTranslate` on the GPU.

Conventions follow the original: clouds are rows of xyz and rotate as `points @ R`; the "up" axis is y.
"""

import jax
import numpy as np

ROTATION_SIGMA = 0.06  # rad, small perturbation of all three angles
ROTATION_CLIP = 0.18
JITTER_SIGMA = 0.01
JITTER_CLIP = 0.05
DROP_FRACTION = 10  # N // 10 indices are drawn with replacement and zeroed, about 9.5% of the points
SCALE_RANGE = (2.0 / 3.0, 3.0 / 2.0)
TRANSLATE_RANGE = 0.2
AUGMENTATION_NAMES = ('rotate_90', 'rotate_y', 'rotate_perturb', 'jitter', 'drop')


# ----------------------------------------------------------------------------------------------------------------
# NumPy, on the host.


def normalize_unit_sphere_np(points, source: str | None = None) -> np.ndarray:
  """Centre on the mean and scale so that the farthest point lies on the unit sphere (CG3D's pc_norm), (N, 3).

  Computed in float64 and returned as float32, so that the result depends only on the float32 input. `source`
  (e.g. the file the points came from) is named in the errors.
  """
  where = f'{source}: ' if source else ''
  points = np.asarray(points)
  if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] == 0:
    raise ValueError(f'{where}expected a non-empty (N, 3) array of points, got shape {points.shape}')
  if not np.all(np.isfinite(points)):
    raise ValueError(f'{where}points contain NaN or Inf')
  centred = points.astype(np.float64) - points.astype(np.float64).mean(axis=0)
  radius = np.sqrt((centred**2).sum(axis=1)).max()
  if not radius > 0:
    raise ValueError(f'{where}all {len(points)} points coincide: there is no scale to normalise to the unit sphere')
  return (centred / radius).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# JAX, on device inside the step.


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
