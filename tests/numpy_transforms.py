"""NumPy twins of the data transforms, written after CG3D's `utils/augment.py` and the original CUDA FPS op: the
references the TensorFlow augmentations (cg3d_jax/data/tf_transforms.py) and the JAX sampling (models/point_ops.py)
are checked against, and the host-side sampling bench/bench_pipeline.py measures. Conventions as the package's:
clouds are rows of xyz and rotate as `points @ R`; the "up" axis is y."""

import numpy as np

from cg3d_jax.data.host_transforms import DROP_FRACTION, JITTER_CLIP, JITTER_SIGMA, ROTATION_CLIP, ROTATION_SIGMA


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

  Also the host-side sampling bench/bench_pipeline.py measures against the device's.
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
