"""Point-cloud normalisation, resampling and CG3D's augmentations, with explicit randomness.

Three flavours of the same recipe, each where it runs:
  * NumPy (`*_np`): the reference, written after CG3D's `utils/augment.py`, used by tests and host-side tools;
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
# NumPy reference.


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


def rotation_y_np(angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def perturbation_rotation_np(angles: np.ndarray) -> np.ndarray:
  """Rz @ Ry @ Rx for the three small angles, as CG3D's rotate_perturbation_point_cloud builds it."""
  ax, ay, az = angles
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = rotation_y_np(ay)
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def apply_augment_np(points: np.ndarray, params: dict) -> np.ndarray:
  """CG3D's five augmentations in the original's order, with drawn parameters: params['apply'] (5,) bool, and
  'quarter_turns', 'angle', 'angles' (3,), 'noise' (N, 3) (already clipped), 'dropped' (indices)."""
  points = np.asarray(points, np.float64)
  apply = np.asarray(params['apply'], bool)
  if apply[0]:
    points = points @ rotation_y_np(int(params['quarter_turns']) * np.pi / 2)
  if apply[1]:
    points = points @ rotation_y_np(float(params['angle']))
  if apply[2]:
    points = points @ perturbation_rotation_np(np.asarray(params['angles'], np.float64))
  if apply[3]:
    points = points + np.asarray(params['noise'], np.float64)
  if apply[4]:
    points = points.copy()
    points[np.asarray(params['dropped'])] = 0.0
  return points.astype(np.float32)


def augment_np(rng: np.random.Generator, points: np.ndarray, prob: float = 0.3) -> np.ndarray:
  """CG3D's five augmentations, each applied with probability `prob`, in the original's order."""
  n = len(points)
  params = {
    'apply': rng.uniform(size=5) < prob,
    'quarter_turns': rng.integers(0, 4),
    'angle': rng.uniform() * 2 * np.pi,
    'angles': np.clip(ROTATION_SIGMA * rng.standard_normal(3), -ROTATION_CLIP, ROTATION_CLIP),
    'noise': np.clip(JITTER_SIGMA * rng.standard_normal((n, 3)), -JITTER_CLIP, JITTER_CLIP),
    'dropped': rng.integers(0, n, size=n // DROP_FRACTION),
  }
  return apply_augment_np(points, params)


def farthest_point_sample_np(points: np.ndarray, num_samples: int) -> np.ndarray:
  """Indices chosen by the original CUDA op's rule: start at 0, skip near-origin points, lowest index on ties.

  The host-side variant used to measure host against device sampling (bench/bench_pipeline.py).
  """
  valid = (points**2).sum(axis=1) > 1e-3
  min_dist = np.full(len(points), 1e10)
  chosen = np.zeros(num_samples, np.int64)
  last = 0
  for i in range(1, num_samples):
    d = ((points - points[last]) ** 2).sum(axis=1)
    np.minimum(min_dist, d, out=min_dist)
    last = int(np.argmax(np.where(valid, min_dist, -1.0)))
    chosen[i] = last
  return chosen


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
