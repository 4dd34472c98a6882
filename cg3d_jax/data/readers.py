"""Validated readers of raw files: what the dataset builders ingest, and what every point-file reader shares.

Every failure is an `errors.BadInputError` naming the file (and the line, for text). The builders call these while
writing a TFDS dataset: bad input stops the build, unless the builder was made with `skip_bad=True`, in which case
`BadInputLog` skips the example, counts it and logs it. The point-file readers (point_files, ply_files, off_files,
mesh_sampling) return a `PointCloud` and share the text, colour and finiteness parsing here.
"""

import dataclasses
import io
import logging
import pathlib
import re
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def read_modelnet_txt(path: pathlib.Path) -> np.ndarray:
  """A ModelNet resampled file: lines of `x,y,z,nx,ny,nz` -> (N, 6) float32."""
  if not path.is_file():
    raise BadInputError(f'{path}: file not found')
  try:
    values = np.loadtxt(path, delimiter=',', dtype=np.float64, ndmin=2)
  except ValueError:
    values = None
  if values is None or values.shape[1] != 6:
    # Find the first bad line, to name it.
    for number, text in read_lines(path):
      fields = text.split(',')
      if len(fields) != 6 or not all(_is_number(f) for f in fields):
        raise BadInputError(f'{path}:{number}: expected 6 comma-separated numbers `x,y,z,nx,ny,nz`, got {text!r}')
    raise BadInputError(f'{path}: expected lines of 6 comma-separated numbers')
  finite = np.isfinite(values).all(axis=1)
  if not finite.all():
    number = int(np.argmin(finite))
    raise BadInputError(f'{path}:{number + 1}: non-finite value (NaN or Inf): {values[number].tolist()}')
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


# --- what every point-file reader shares ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PointCloud:
  xyz: np.ndarray  # (N, 3) float32
  rgb: np.ndarray | None  # (N, 3) uint8, or None when the file has no colours
  normals: np.ndarray | None  # (N, 3) float32 as stored, or None
  source: str  # the file it came from
  from_mesh: bool = False  # True when the points were sampled on a mesh surface

  def __len__(self) -> int:
    return self.xyz.shape[0]


def parse_rows(path, lines: Sequence[str], line_numbers: Sequence[int], what: str) -> np.ndarray:
  """(rows, cols) float64 from text lines of numbers separated by spaces and/or commas; every row equally long.

  NumPy's C parser reads well-formed files; only when it refuses are the lines split one by one, which either
  names the bad line or accepts a file that merely mixes separators.
  """
  try:
    values = np.loadtxt(lines, delimiter=',' if ',' in lines[0] else None, comments=None, dtype=np.float64, ndmin=2)
    if values.shape[0] == len(lines):
      return values
  except ValueError:
    pass
  split = [line.replace(',', ' ').split() for line in lines]
  num_cols = len(split[0])
  for row, number in zip(split, line_numbers):
    if len(row) != num_cols:
      raise BadInputError(path, f'{what}: expected {num_cols} numbers (as on the first row), found {len(row)}', number)
    for token in row:
      try:
        float(token)
      except ValueError:
        raise BadInputError(path, f'{what}: {token!r} is not a number', number) from None
  return np.array(split, dtype=np.float64).reshape(len(split), num_cols)


def check_finite(path, values: np.ndarray, what: str, line_numbers: Sequence[int] | None = None) -> None:
  bad = ~np.isfinite(values).all(axis=1)
  if bad.any():
    row = int(np.argmax(bad))
    line = line_numbers[row] if line_numbers is not None else None
    where = '' if line is not None else f' (row {row})'
    raise BadInputError(path, f'{what} contains NaN or Inf{where}', line)


def colours_to_uint8(path, values: np.ndarray, integer_typed: bool) -> np.ndarray:
  """0..255 integers pass through; floats in [0, 1] are scaled by 255 (the PLY convention for float colours)."""
  values = np.asarray(values, dtype=np.float64)
  if integer_typed or np.all(values == np.round(values)):
    if values.min() < 0 or values.max() > 255:
      raise BadInputError(path, f'colours must lie in 0..255, got range [{values.min()}, {values.max()}]')
    return values.astype(np.uint8)
  if values.min() < 0 or values.max() > 1:
    raise BadInputError(
      path, f'float colours must lie in [0, 1] (or be integers 0..255), got range [{values.min()}, {values.max()}]'
    )
  return np.round(values * 255).astype(np.uint8)


def text_lines(path, data: bytes) -> tuple[list[str], Sequence[int]]:
  """Non-blank lines without '#' comments, with their 1-based line numbers."""
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise BadInputError(path, f'not a text file (byte {e.start} is not UTF-8)') from None
  raw = text.rstrip().splitlines()
  if '#' not in text:
    stripped = [line.strip() for line in raw]
    if all(stripped):  # the common case, without a Python-level loop per line
      return stripped, range(1, len(stripped) + 1)
  lines, numbers = [], []
  for number, line in enumerate(raw, start=1):
    line = line.split('#', 1)[0].strip()
    if line:
      lines.append(line)
      numbers.append(number)
  return lines, numbers


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
