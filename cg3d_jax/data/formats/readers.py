"""Validated readers of the raw files the dataset builders ingest (list files, ModelNet40 text, ShapeNet-55 .npy
clouds, PNG renders) and of images for a CLIP.

Every failure is an `errors.BadInputError` naming the file (and the line, for text). The builders call these while
writing a TFDS dataset: bad input stops the build, unless the builder was made with `skip_bad=True`, in which case
`BadInputLog` skips the example, counts it and logs it. A user's point files are point_files' to read.
"""

import io
import logging
import pathlib
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from cg3d_jax.data.formats import text_rows
from cg3d_jax.errors import BadInputError

log = logging.getLogger(__name__)

SHAPENET_ID = re.compile(r'^(?P<synset>\d{8})-(?P<model>[0-9A-Za-z_]+)\.npy$')
_LOGGED_PER_SPLIT = 10


class BadInputLog:
  """Raises on bad input, or, with `skip_bad`, counts and logs it (each split's first few in full)."""

  def __init__(self, skip_bad: bool):
    self.skip_bad = skip_bad
    self.skipped: dict[str, list[str]] = {}

  def handle(self, split: str, error: BadInputError) -> None:
    if not self.skip_bad:
      raise error
    entries = self.skipped.setdefault(split, [])
    entries.append(str(error))
    if len(entries) <= _LOGGED_PER_SPLIT:
      log.warning('skip_bad: skipping an example of split %r: %s', split, error)

  def summarise(self, split: str, source, num_written: int) -> None:
    """Logs the split's skip count; a split left empty is an error (TFDS cannot write one, and it is no dataset)."""
    count = len(self.skipped.get(split, []))
    if not num_written:
      raise BadInputError(f'{source}: no readable example for split {split!r} ({count} skipped as bad)')
    if count:
      log.warning('skip_bad: skipped %d bad example(s) in split %r (first: %s)', count, split, self.skipped[split][0])


def read_lines(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line number from 1, stripped text) of the non-blank lines of a text file."""
  if not path.is_file():
    raise BadInputError(f'{path}: file not found')
  try:
    text = path.read_text(encoding='utf-8')
  except UnicodeDecodeError as e:
    raise BadInputError(f'{path}: not UTF-8 text ({e})') from e
  return [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]


def parse_shapenet_id(path: pathlib.Path, line_number: int, text: str) -> tuple[str, str]:
  """`<synset>-<model>.npy` -> (synset, model)."""
  match = SHAPENET_ID.match(text)
  if not match:
    raise BadInputError(f'{path}:{line_number}: expected `<8-digit synset>-<model id>.npy`, got {text!r}')
  return match['synset'], match['model']


def check_points(path, points: np.ndarray, *, columns: int = 3) -> np.ndarray:
  """Checks a float (N, columns) array of finite values with N >= 1; returns it as float32."""
  if points.dtype.kind != 'f':
    raise BadInputError(f'{path}: expected floating-point points, got dtype {points.dtype}')
  if points.ndim != 2 or points.shape[1] != columns or points.shape[0] < 1:
    raise BadInputError(f'{path}: expected points of shape (N, {columns}), got {points.shape}')
  finite = np.isfinite(points).all(axis=1)
  if not finite.all():
    row = int(np.argmin(finite))
    raise BadInputError(f'{path}: non-finite value (NaN or Inf) in point {row}: {points[row].tolist()}')
  if not (points.max(axis=0) > points.min(axis=0)).any():
    raise BadInputError(
      f'{path}: all {len(points)} points are the same point; a cloud needs extent to be scaled to the unit sphere'
    )
  return points.astype(np.float32)


def read_npy_points(path: pathlib.Path) -> np.ndarray:
  """A ShapeNet-55 `.npy` cloud (N, 3) of finite floats."""
  if not path.is_file():
    raise BadInputError(f'{path}: file not found')
  try:
    points = np.load(path, allow_pickle=False)
  except Exception as e:  # numpy raises ValueError, OSError or EOFError for damaged files
    raise BadInputError(f'{path}: not a readable .npy array ({type(e).__name__}: {e})') from e
  return check_points(path, points)


def read_modelnet_txt(path: pathlib.Path) -> np.ndarray:
  """A ModelNet resampled file: lines of `x,y,z,nx,ny,nz` -> (N, 6) float32."""
  if not path.is_file():
    raise BadInputError(f'{path}: file not found')
  # text_lines drops '#' comments, as np.loadtxt (this reader's parser before text_rows) did.
  lines, numbers = text_rows.text_lines(path, path.read_bytes())
  values, line_numbers = text_rows.parse_rows(
    path,
    lines,
    numbers,
    separator=text_rows.COMMAS,
    columns=6,
    error=lambda bad: BadInputError(
      f'{path}:{bad.line_number}: expected 6 comma-separated numbers `x,y,z,nx,ny,nz`, got {bad.line!r}'
    ),
  )
  if not len(values):
    raise BadInputError(f'{path}: expected lines of 6 comma-separated numbers')
  finite = np.isfinite(values).all(axis=1)
  if not finite.all():
    row = int(np.argmin(finite))
    raise BadInputError(f'{path}:{line_numbers[row]}: non-finite value (NaN or Inf): {values[row].tolist()}')
  return values.astype(np.float32)


def read_png(path: pathlib.Path) -> bytes:
  """The bytes of a PNG that decodes completely (so that a broken render fails the build, not training)."""
  if not path.is_file():
    raise BadInputError(f'{path}: file not found')
  data = path.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format != 'PNG':
        raise BadInputError(f'{path}: expected a PNG image, found {image.format}')
      image.load()
  except BadInputError:
    raise
  except Exception as e:  # PIL raises many types for damaged files
    raise BadInputError(f'{path}: unreadable PNG ({type(e).__name__}: {e})') from e
  return data


def read_image(path, preprocess, missing: str = 'image file not found') -> np.ndarray:
  """An image file through a CLIP's preprocessing (a callable on PIL images); one clear error when it is missing
  (`missing` says what that means here) or unreadable."""
  try:
    with Image.open(path) as image:
      return preprocess(image)
  except FileNotFoundError:
    raise BadInputError(path, missing) from None
  except (UnidentifiedImageError, OSError) as err:
    raise BadInputError(path, f'cannot be read as an image ({err})') from None
