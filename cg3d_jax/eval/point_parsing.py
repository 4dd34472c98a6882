"""What every point-file reader shares: the `PointCloud` it returns, the `PointFileError` it raises, and the
parsing of numeric text, colours and finite values.

Kept apart from the format readers (point_files, ply_files, off_files, mesh_sampling) so that each of them imports
these from one place without importing the others.
"""

import dataclasses
import os
from typing import Sequence

import numpy as np


class PointFileError(ValueError):
  """A point-cloud file that cannot be read as what its extension says."""

  def __init__(self, path, message: str, line: int | None = None):
    where = f'{os.fspath(path)}, line {line}' if line is not None else os.fspath(path)
    super().__init__(f'{where}: {message}')


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
    values = np.loadtxt(lines, delimiter=',' if ',' in lines[0] else None, comments=None, dtype=np.float64,
                        ndmin=2)
    if values.shape[0] == len(lines):
      return values
  except ValueError:
    pass
  split = [line.replace(',', ' ').split() for line in lines]
  num_cols = len(split[0])
  for row, number in zip(split, line_numbers):
    if len(row) != num_cols:
      raise PointFileError(path, f'{what}: expected {num_cols} numbers (as on the first row), found {len(row)}',
                           number)
    for token in row:
      try:
        float(token)
      except ValueError:
        raise PointFileError(path, f'{what}: {token!r} is not a number', number) from None
  return np.array(split, dtype=np.float64).reshape(len(split), num_cols)


def check_finite(path, values: np.ndarray, what: str, line_numbers: Sequence[int] | None = None) -> None:
  bad = ~np.isfinite(values).all(axis=1)
  if bad.any():
    row = int(np.argmax(bad))
    line = line_numbers[row] if line_numbers is not None else None
    where = '' if line is not None else f' (row {row})'
    raise PointFileError(path, f'{what} contains NaN or Inf{where}', line)


def colours_to_uint8(path, values: np.ndarray, integer_typed: bool) -> np.ndarray:
  """0..255 integers pass through; floats in [0, 1] are scaled by 255 (the PLY convention for float colours)."""
  values = np.asarray(values, dtype=np.float64)
  if integer_typed or np.all(values == np.round(values)):
    if values.min() < 0 or values.max() > 255:
      raise PointFileError(path, f'colours must lie in 0..255, got range [{values.min()}, {values.max()}]')
    return values.astype(np.uint8)
  if values.min() < 0 or values.max() > 1:
    raise PointFileError(path, f'float colours must lie in [0, 1] (or be integers 0..255), got range '
                               f'[{values.min()}, {values.max()}]')
  return np.round(values * 255).astype(np.uint8)


def text_lines(path, data: bytes) -> tuple[list[str], Sequence[int]]:
  """Non-blank lines without '#' comments, with their 1-based line numbers."""
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise PointFileError(path, f'not a text file (byte {e.start} is not UTF-8)') from None
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
