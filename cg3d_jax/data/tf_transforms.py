"""CG3D's normalisation, resampling and augmentations in TensorFlow, per example inside tf.data (data/pipeline.py).

The same recipe as the NumPy reference (its constants come from data/host_transforms.py, which says where each part
runs); kept apart so that only the TFDS pipeline imports TensorFlow. `seed` is a stateless seed: an int tensor of
shape (2,).
"""

import numpy as np
import tensorflow as tf

from cg3d_jax.data.host_transforms import DROP_FRACTION, JITTER_CLIP, JITTER_SIGMA, ROTATION_CLIP, ROTATION_SIGMA


def tf_normalize_unit_sphere(points: tf.Tensor) -> tf.Tensor:
  centred = points - tf.reduce_mean(points, axis=0, keepdims=True)
  radius = tf.reduce_max(tf.norm(centred, axis=1))
  return centred / radius


def tf_resample(seed: tf.Tensor, points: tf.Tensor, num_points: int) -> tf.Tensor:
  """Draws `num_points` points with replacement (the original's np.random.choice)."""
  n = tf.shape(points)[0]
  index = tf.random.stateless_uniform([num_points], seed, minval=0, maxval=n, dtype=tf.int32)
  return tf.gather(points, index)


def tf_rotation_y(angle: tf.Tensor) -> tf.Tensor:
  c, s = tf.cos(angle), tf.sin(angle)
  zero, one = tf.zeros_like(angle), tf.ones_like(angle)
  return tf.reshape(tf.stack([c, zero, s, zero, one, zero, -s, zero, c]), [3, 3])


def tf_perturbation_rotation(angles: tf.Tensor) -> tf.Tensor:
  ax, ay, az = angles[0], angles[1], angles[2]
  zero, one = tf.zeros_like(ax), tf.ones_like(ax)
  rx = tf.reshape(tf.stack([one, zero, zero, zero, tf.cos(ax), -tf.sin(ax), zero, tf.sin(ax), tf.cos(ax)]), [3, 3])
  rz = tf.reshape(tf.stack([tf.cos(az), -tf.sin(az), zero, tf.sin(az), tf.cos(az), zero, zero, zero, one]), [3, 3])
  return rz @ tf_rotation_y(ay) @ rx


def tf_augment_params(seed: tf.Tensor, num_points, prob: float = 0.3) -> dict[str, tf.Tensor]:
  """The random draws of CG3D's five augmentations for one cloud of `num_points` (what apply_augment_np takes)."""
  seeds = tf.random.experimental.stateless_split(seed, num=7)
  return {
    'apply': tf.random.stateless_uniform([5], seeds[0]) < prob,
    'quarter_turns': tf.random.stateless_uniform([], seeds[1], minval=0, maxval=4, dtype=tf.int32),
    'angle': tf.random.stateless_uniform([], seeds[2]) * 2 * tf.constant(np.pi, tf.float32),
    'angles': tf.clip_by_value(
      ROTATION_SIGMA * tf.random.stateless_normal([3], seeds[3]), -ROTATION_CLIP, ROTATION_CLIP
    ),
    'noise': tf.clip_by_value(
      JITTER_SIGMA * tf.random.stateless_normal([num_points, 3], seeds[4]), -JITTER_CLIP, JITTER_CLIP
    ),
    'dropped': tf.random.stateless_uniform(
      [num_points // DROP_FRACTION], seeds[5], minval=0, maxval=num_points, dtype=tf.int32
    ),
  }


def tf_apply_augment(points: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
  """The drawn augmentations applied in the original's order: quarter turn, rotation about y, perturbation,
  jitter, drop (the TF twin of apply_augment_np)."""
  apply = params['apply']
  pi = tf.constant(np.pi, tf.float32)
  rotated = points @ tf_rotation_y(tf.cast(params['quarter_turns'], tf.float32) * (pi / 2))
  points = tf.where(apply[0], rotated, points)
  points = tf.where(apply[1], points @ tf_rotation_y(params['angle']), points)
  points = tf.where(apply[2], points @ tf_perturbation_rotation(params['angles']), points)
  points = tf.where(apply[3], points + params['noise'], points)
  n = tf.shape(points)[0]
  dropped = params['dropped']
  keep = tf.tensor_scatter_nd_update(tf.ones([n], tf.bool), dropped[:, None], tf.zeros_like(dropped, tf.bool))
  return tf.where(tf.logical_and(apply[4], tf.logical_not(keep))[:, None], tf.zeros_like(points), points)


def tf_augment(seed: tf.Tensor, points: tf.Tensor, prob: float = 0.3, return_flags: bool = False):
  """CG3D's five augmentations on one float32 cloud (N, 3), each with probability `prob`.

  Returns the augmented cloud, and with `return_flags` also a bool (5,) of which augmentations ran
  (order: AUGMENTATION_NAMES), which is what the probability test counts.
  """
  params = tf_augment_params(seed, tf.shape(points)[0], prob)
  points = tf_apply_augment(points, params)
  return (points, params['apply']) if return_flags else points
