"""Point clouds from a user's files: PLY (ASCII, binary little/big endian), NPY, OFF and text, chosen by extension.

Every reader returns a `PointCloud` with float32 (N, 3) xyz, uint8 (N, 3) colours when the file has them, and
normals when the file has them. Meshes (OFF, and PLY files with faces) are turned into points by sampling their
surface uniformly by area with a seeded generator, so the same file always gives the same points; vertex colours
are interpolated at the sampled points. Point files are returned as stored: choosing N points is the model's
farthest-point sampling, not the reader's job; host_transforms.normalize_unit_sphere_np is the training
normalisation.

Bad input raises `BadInputError` naming the file, and for text formats the 1-based line, with what was expected.

This module is the entry (read_points) and reads NPY and text tables itself; PLY reading and writing is ply_files,
OFF is off_files, mesh surfaces are mesh_sampling; what they all share is point_cloud (the result and its value
checks) and text_rows (text tables).
"""

import io
import os
from typing import Sequence

import numpy as np

from cg3d_jax.data.formats import off_files, ply_files

# PointCloud and BadInputError are read_points' result and error: importable from here with it.
from cg3d_jax.data.formats.point_cloud import PointCloud, check_finite, colours_to_uint8
from cg3d_jax.data.formats.text_rows import parse_rows, text_lines
from cg3d_jax.errors import BadInputError

TEXT_EXTENSIONS = ('.txt', '.xyz', '.csv')
SUPPORTED_EXTENSIONS = ('.ply', '.npy', '.off') + TEXT_EXTENSIONS
DEFAULT_MESH_POINTS = 10_000  # as many as a ModelNet40 resampled file holds


def read_points(
  path, *, mesh_points: int = DEFAULT_MESH_POINTS, seed: int = 0, columns: str | Sequence[str] | None = None
) -> PointCloud:
  """Reads a point cloud from .ply, .npy, .off, .txt/.xyz/.csv (chosen by extension).

  mesh_points, seed: how many points to sample on a mesh surface (OFF, PLY with faces), and the sampler's seed.
  columns: for NPY and text files, what the columns are, as groups 'xyz', 'normals', 'rgb' (three columns each)
    and 'skip' (one column), e.g. 'xyz,skip,rgb'. By default 3 columns are xyz, 6 are xyz plus normals or colours
    (told apart by their values: unit vectors are normals, non-negative 0..255 integers or 0..1 values are
    colours), 9 are xyz plus both; anything ambiguous is an error that asks for `columns`.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in SUPPORTED_EXTENSIONS:
    raise BadInputError(path, f'unknown point-cloud extension {ext!r}; supported: {", ".join(SUPPORTED_EXTENSIONS)}')
  if mesh_points < 1:
    raise ValueError(f'mesh_points must be at least 1, got {mesh_points}')
  if columns is not None and ext not in ('.npy',) + TEXT_EXTENSIONS:
    raise BadInputError(
      path, f'columns (--columns) apply to .npy and text files; {ext} files name their own properties'
    )
  with open(path, 'rb') as f:
    data = f.read()
  if not data or data.isspace():
    raise BadInputError(path, 'file is empty')
  if ext == '.ply':
    cloud = ply_files.read_ply(path, data, mesh_points, seed)
  elif ext == '.off':
    cloud = off_files.read_off(path, data, mesh_points, seed)
  elif ext == '.npy':
    cloud = _read_npy(path, data, columns)
  else:
    cloud = _read_text(path, data, columns)
  if cloud.xyz.shape[0] == 0:
    raise BadInputError(path, 'file holds no points')
  return cloud


def _looks_like_normals(values: np.ndarray) -> bool:
  norms = np.sqrt((values**2).sum(axis=1))
  return bool(np.all((np.abs(norms - 1) < 0.02) | (norms == 0)))


def _looks_like_colours(values: np.ndarray) -> bool:
  if values.min() < 0:
    return False
  return bool(values.max() <= 1 or (np.all(values == np.round(values)) and values.max() <= 255))


def _split_columns(path, values: np.ndarray, columns) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """(xyz, rgb, normals) from an (N, C) table according to `columns` or, when None, to the rules in read_points."""
  num_cols = values.shape[1]
  if columns is None:
    if num_cols == 3:
      groups = ['xyz']
    elif num_cols == 6:
      extra = values[:, 3:6]
      normals, colours = _looks_like_normals(extra), _looks_like_colours(extra)
      if normals == colours:
        raise BadInputError(
          path,
          'cannot tell whether columns 4-6 are normals or colours; name them: '
          '--columns xyz,normals or --columns xyz,rgb (columns= in read_points)',
        )
      groups = ['xyz', 'normals' if normals else 'rgb']
    elif num_cols == 9:
      first_normals = _looks_like_normals(values[:, 3:6]) and _looks_like_colours(values[:, 6:9])
      first_colours = _looks_like_colours(values[:, 3:6]) and _looks_like_normals(values[:, 6:9])
      if first_normals == first_colours:
        raise BadInputError(
          path,
          'cannot tell which of columns 4-6 and 7-9 are normals and which colours; name '
          'them: --columns xyz,normals,rgb or --columns xyz,rgb,normals (columns= in '
          'read_points)',
        )
      groups = ['xyz', 'normals', 'rgb'] if first_normals else ['xyz', 'rgb', 'normals']
    else:
      raise BadInputError(
        path,
        f'{num_cols} columns per point; expected 3 (xyz), 6 (xyz + normals or colours) or 9 '
        '(xyz + both), or name them with --columns (columns= in read_points), e.g. '
        'xyz,skip,rgb',
      )
  else:
    groups = [g.strip() for g in columns.split(',')] if isinstance(columns, str) else list(columns)
  widths = {'xyz': 3, 'normals': 3, 'rgb': 3, 'skip': 1}
  unknown = [g for g in groups if g not in widths]
  if unknown or 'xyz' not in groups or any(groups.count(g) > 1 for g in ('xyz', 'normals', 'rgb')):
    raise BadInputError(
      path,
      f"columns (--columns) must name 'xyz' once and optionally 'normals', 'rgb' (3 columns "
      f"each) and 'skip' (1 column), got {groups}",
    )
  if sum(widths[g] for g in groups) != num_cols:
    raise BadInputError(
      path, f'columns {groups} describe {sum(widths[g] for g in groups)} columns, the file has {num_cols}'
    )
  parts, start = {}, 0
  for group in groups:
    parts[group] = values[:, start : start + widths[group]]
    start += widths[group]
  rgb = colours_to_uint8(path, parts['rgb'], False) if 'rgb' in parts else None
  normals = parts['normals'].astype(np.float32) if 'normals' in parts else None
  return parts['xyz'].astype(np.float32), rgb, normals


def _read_text(path, data: bytes, columns) -> PointCloud:
  lines, numbers = text_lines(path, data)
  if not lines:
    raise BadInputError(path, 'file holds no points (only blank or comment lines)')
  values = parse_rows(path, lines, numbers, 'point row').values
  check_finite(path, values, 'point row', numbers)
  xyz, rgb, normals = _split_columns(path, values, columns)
  return PointCloud(xyz=xyz, rgb=rgb, normals=normals, source=path)


def _read_npy(path, data: bytes, columns) -> PointCloud:
  try:
    values = np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    raise BadInputError(path, f'not a readable .npy array (truncated or not NumPy format?): {e}') from None
  if not isinstance(values, np.ndarray) or values.dtype.names or not np.issubdtype(values.dtype, np.number):
    raise BadInputError(path, f'expected a numeric (N, C) array, got dtype {getattr(values, "dtype", None)}')
  if values.ndim != 2 or values.shape[1] < 3:
    raise BadInputError(path, f'expected an (N, C) array with C >= 3 (xyz first), got shape {values.shape}')
  if values.shape[0] == 0:
    raise BadInputError(path, 'array holds no points')
  check_finite(path, values.astype(np.float64), 'array')
  # float32 -> float64 -> float32 is exact, so xyz comes out exactly as stored (float64 files are rounded once).
  xyz, rgb, normals = _split_columns(path, values.astype(np.float64), columns)
  return PointCloud(xyz=xyz, rgb=rgb, normals=normals, source=path)
