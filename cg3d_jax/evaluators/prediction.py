"""Zero-shot prediction for one object: candidate labels (and, optionally, photos) ranked against one point cloud.

The cloud is centred and scaled to the unit sphere as in training (a coloured encoder also gets the file's colours
in [0, 1], or OpenShape's grey 0.4 with a warning when it has none), then farthest-point sampling on device picks the
encoder's N points (clouds with fewer than N points are cycled, which FPS ignores). Labels are ranked by cosine
similarity to their text features (templates x label, as in zero-shot evaluation) with probabilities
softmax(CLIP's logit scale x similarity). Images are preprocessed as the CLIP's preprocessor says, go through the
prompt-tuned image tower, and are ranked against the cloud the same way.
"""

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cg3d_jax.data import host_transforms
from cg3d_jax.data.formats import point_files
from cg3d_jax.data.formats.readers import read_image
from cg3d_jax.data.openshape import RGB_DROP_VALUE
from cg3d_jax.errors import BadInputError, InputError
from cg3d_jax.evaluators import metrics, protocols, zeroshot
from cg3d_jax.models.point_ops import sample_points

# The fewest distinct points a cloud may have: one PointTransformer neighbourhood (32 points). Fewer cannot describe
# a shape, and cycling them up to N would hand the encoder copies of a handful of points.
MIN_POINTS = 32


def _normalised(xyz, source: str | None) -> np.ndarray:
  """Training's normalisation (centre, unit sphere), after refusing clouds of fewer than MIN_POINTS distinct points."""
  distinct = len(np.unique(np.asarray(xyz, np.float32), axis=0)) if len(xyz) else 0
  if distinct < MIN_POINTS:
    raise BadInputError(
      source or 'the cloud', f'{distinct} distinct point(s); a cloud needs at least {MIN_POINTS} to be classified'
    )
  try:
    return host_transforms.normalize_unit_sphere_np(xyz, source)
  except ValueError as err:
    raise BadInputError(str(err)) from None


def read_checked_cloud(path, columns: str | None = None) -> point_files.PointCloud:
  """The cloud in `path`, read and checked (as `prepare_points` will) before any model is loaded: a bad file costs
  no model."""
  cloud = point_files.read_points(path, columns=columns)
  _normalised(cloud.xyz, os.fspath(path))
  return cloud


GREY = RGB_DROP_VALUE  # OpenShape's colour for clouds without one (its dropped colours, ScanObjectNN without rgb)


def colour_channels(encoder, rgb, num_points: int, source: str | None = None) -> np.ndarray | None:
  """The colour channels a coloured encoder (in_channels 6) takes: the file's rgb (uint8 0-255) as [0, 1], or
  OpenShape's grey 0.4 with a warning when the file has none; None for an xyz-only encoder (colours unused)."""
  if getattr(encoder, 'in_channels', 3) == 3:
    return None
  if rgb is None:
    logging.warning(
      '%s has no colours but the encoder takes xyz + rgb: every point is given grey %.1f, as OpenShape '
      'does for uncoloured clouds',
      source or 'the cloud',
      GREY,
    )
    return np.full((num_points, 3), GREY, np.float32)
  rgb = np.asarray(rgb)
  if rgb.shape != (num_points, 3):
    raise BadInputError(source or 'the cloud', f'colours of shape {rgb.shape} for {num_points} points')
  return (rgb.astype(np.float32) / 255.0) if rgb.dtype == np.uint8 else rgb.astype(np.float32)


def prepare_points(
  xyz, num_points: int, source: str | None = None, colours=None, *, swap_y_z: bool = False
) -> np.ndarray:
  """Training's normalisation (centre, unit sphere), y and z swapped for an encoder that sees z-up
  (protocols.sees_z_up: files are stored y-up), `colours` (N, 3) in [0, 1] appended when given; clouds shorter than
  num_points are cycled up to it (with a warning), clouds of fewer than MIN_POINTS distinct points are refused."""
  where = source or 'the cloud'
  xyz = _normalised(xyz, source)
  if swap_y_z:
    xyz = xyz[:, [0, 2, 1]]
  if colours is not None:
    xyz = np.concatenate([xyz, np.asarray(colours, np.float32)], axis=1)
  if xyz.shape[0] < num_points:
    logging.warning(
      "%s: %d points, fewer than the encoder's %d: repeated to fill them (farthest-point sampling "
      'then sees each point once)',
      where,
      xyz.shape[0],
      num_points,
    )
    xyz = xyz[np.arange(num_points) % xyz.shape[0]]
  return xyz


def ranked(names: Sequence[str], similarities: np.ndarray, scale: float) -> list[dict]:
  """[{rank, name, probability, similarity}] best first; probabilities = softmax(scale x similarity)."""
  logits = scale * similarities.astype(np.float64)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-similarities, kind='stable')
  return [
    {'rank': r + 1, 'name': names[i], 'probability': float(probs[i]), 'similarity': float(similarities[i])}
    for r, i in enumerate(order)
  ]


def label_features(path, labels: Sequence[str], width: int) -> np.ndarray:
  """(L, D) normalised features of `labels` from a class-feature file (.npz of `names` and `features`, rows matched
  by name; or a .npy in the labels' order), for encoders whose text tower the package cannot run."""
  if not os.path.isfile(path):
    raise BadInputError(path, 'does not exist or is not a file (--class_features)')
  features = zeroshot.class_features_file(path, labels)
  if features.shape[1] != width:
    raise InputError(
      f'--class_features {path}: {features.shape[1]}-dimensional features but the encoder projects to {width}: '
      'not the joint space it was trained in'
    )
  return np.asarray(metrics.zero_shot_classifier(features))


def file_labels(path) -> list[str]:
  """The names a .npz class-feature file holds (the labels when none are given)."""
  if not os.path.isfile(path):
    raise BadInputError(path, 'does not exist or is not a file (--class_features)')
  try:
    with np.load(path, allow_pickle=False) as loaded:
      return [str(n) for n in loaded['names']]
  except (ValueError, OSError, KeyError, TypeError, AttributeError) as err:
    raise BadInputError(path, f"not a .npz with 'names' and 'features' (give --labels with a .npy): {err}") from None


def predict(
  model,
  points,
  labels: Sequence[str],
  images: Sequence[str] = (),
  *,
  templates='cg3d_zeroshot',
  normalize_text: bool = True,
  classifier: np.ndarray | None = None,
) -> dict:
  """{'points', 'num_points_read', 'labels': ranked, 'images': ranked} for a trained.ScoringModel `model`; `points`
  is a point-cloud file or what `read_checked_cloud` returned for one."""
  cloud = points if isinstance(points, point_files.PointCloud) else point_files.read_points(points)
  points_path = cloud.source
  colours = colour_channels(model.model.encoder, cloud.rgb, cloud.xyz.shape[0], os.fspath(points_path))
  swap = protocols.sees_z_up(model.trained.released)
  points = prepare_points(cloud.xyz, model.model.num_points, os.fspath(points_path), colours, swap_y_z=swap)
  encode = jax.jit(lambda v, p: model.model.point_features(v, sample_points(p, model.model.num_points))[0])
  feature = np.asarray(encode(model.encoder_vars, jnp.asarray(points)[None]))[0]
  if classifier is None:  # else the labels' features came from a file (label_features)
    classifier = zeroshot.text_classifier(
      model.clip.model, model.clip_params, model.clip.tokenizer, labels, templates, normalize=normalize_text
    )
  scale = model.logit_scale()
  result = {
    'points': os.fspath(points_path),
    'num_points_read': int(cloud.xyz.shape[0]),
    'from_mesh': cloud.from_mesh,
    'num_points_encoded': model.model.num_points,
    'y_up_swapped': swap,
    'logit_scale': scale,
    'colours': (
      None if colours is None else 'from the file' if cloud.rgb is not None else f'none in the file: grey {GREY}'
    ),
    'labels': ranked(list(labels), np.asarray(metrics.zero_shot_scores(feature[None], classifier))[0], scale),
  }
  if images:
    pixels = np.stack([read_image(path, model.clip.preprocess) for path in images])
    image_features = np.asarray(jax.jit(model.model.image_features)(model.clip_params, pixels))
    result['images'] = ranked([os.fspath(p) for p in images], image_features @ feature, scale)
  return result
