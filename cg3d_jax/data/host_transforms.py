"""Point-cloud transforms on the host, in NumPy: the unit-sphere normalisation of files read outside tf.data, and
the constants of CG3D's augmentations.

The same recipe runs in three places, one module each:
  * host_transforms (here): NumPy; the reference twins of the augmentations and of FPS, written after CG3D's
    `utils/augment.py` and its CUDA op, live with the tests (tests/numpy_transforms.py);
  * tf_transforms: what the tf.data pipeline runs per example, with stateless RNG so that an example's augmentation
    is a pure function of (seed, epoch, example index) and a restarted pipeline repeats itself; the only one that
    imports TensorFlow;
  * device_transforms: JAX, the last step, which the train step calls on device after its farthest-point sampling,
    as the original does `misc.fps` then `PointcloudScaleAndTranslate` on the GPU.

Conventions follow the original: clouds are rows of xyz and rotate as `points @ R`; the "up" axis is y.
"""

import numpy as np

ROTATION_SIGMA = 0.06  # rad, small perturbation of all three angles
ROTATION_CLIP = 0.18
JITTER_SIGMA = 0.01
JITTER_CLIP = 0.05
DROP_FRACTION = 10  # N // 10 indices are drawn with replacement and zeroed, about 9.5% of the points
AUGMENTATION_NAMES = ('rotate_90', 'rotate_y', 'rotate_perturb', 'jitter', 'drop')


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
