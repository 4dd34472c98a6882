"""What every point-file reader returns (`PointCloud`) and the value checks they share.

The readers (point_files, ply_files, off_files, mesh_sampling) each parse their own layout; a cloud's finiteness and
colour ranges mean the same in every format, so they are checked here.
"""

import dataclasses
from typing import Sequence

import numpy as np

from cg3d_jax.errors import BadInputError


@dataclasses.dataclass(frozen=True)
class PointCloud:
  xyz: np.ndarray  # (N, 3) float32
  rgb: np.ndarray | None  # (N, 3) uint8, or None when the file has no colours
  normals: np.ndarray | None  # (N, 3) float32 as stored, or None
  source: str  # the file it came from
  from_mesh: bool = False  # True when the points were sampled on a mesh surface

  def __len__(self) -> int:
    return self.xyz.shape[0]


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
