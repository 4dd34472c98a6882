"""Point clouds from a user's files: PLY (ASCII, binary little/big endian), NPY, OFF and text; a coloured PLY writer.

Every reader returns a `PointCloud` with float32 (N, 3) xyz, uint8 (N, 3) colours when the file has them, and
normals when the file has them. Meshes (OFF, and PLY files with faces) are turned into points by sampling their
surface uniformly by area with a seeded generator, so the same file always gives the same points; vertex colours
are interpolated at the sampled points. Point files are returned as stored: choosing N points is the model's
farthest-point sampling, not the reader's job. `normalize_points` is the training normalisation.

Bad input raises `PointFileError` naming the file, and for text formats the 1-based line, with what was expected.
"""

import dataclasses
import io
import os
import re
from typing import Sequence

import numpy as np

from cg3d_jax.atomic import atomic_write_bytes

TEXT_EXTENSIONS = ('.txt', '.xyz', '.csv')
SUPPORTED_EXTENSIONS = ('.ply', '.npy', '.off') + TEXT_EXTENSIONS
DEFAULT_MESH_POINTS = 10_000  # as many as a ModelNet40 resampled file holds


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


def read_points(path, *, mesh_points: int = DEFAULT_MESH_POINTS, seed: int = 0,
                columns: str | Sequence[str] | None = None) -> PointCloud:
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
    raise PointFileError(path, f'unknown point-cloud extension {ext!r}; supported: {", ".join(SUPPORTED_EXTENSIONS)}')
  if mesh_points < 1:
    raise ValueError(f'mesh_points must be at least 1, got {mesh_points}')
  if columns is not None and ext not in ('.npy',) + TEXT_EXTENSIONS:
    raise ValueError(f'{path}: columns= applies to .npy and text files; {ext} files name their own properties')
  with open(path, 'rb') as f:
    data = f.read()
  if not data or data.isspace():
    raise PointFileError(path, 'file is empty')
  if ext == '.ply':
    cloud = _read_ply(path, data, mesh_points, seed)
  elif ext == '.off':
    cloud = _read_off(path, data, mesh_points, seed)
  elif ext == '.npy':
    cloud = _read_npy(path, data, columns)
  else:
    cloud = _read_text(path, data, columns)
  if cloud.xyz.shape[0] == 0:
    raise PointFileError(path, 'file holds no points')
  return cloud


def normalize_points(xyz) -> np.ndarray:
  """Centres on the mean and scales so that the farthest point lies on the unit sphere (as in training).

  Computed in float64 and returned as float32, so that the result depends only on the float32 input.
  """
  xyz = np.asarray(xyz)
  if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.shape[0] == 0:
    raise ValueError(f'normalize_points: expected a non-empty (N, 3) array, got shape {xyz.shape}')
  if not np.all(np.isfinite(xyz)):
    raise ValueError('normalize_points: points contain NaN or Inf')
  centred = xyz.astype(np.float64) - xyz.astype(np.float64).mean(axis=0)
  radius = np.sqrt((centred ** 2).sum(axis=1)).max()
  if radius == 0:
    raise ValueError('normalize_points: all points coincide; a single point has no scale to normalise')
  return (centred / radius).astype(np.float32)


def write_ply(path, xyz, rgb=None, *, binary: bool = True) -> None:
  """Writes float x y z (and uchar red green blue) vertices; binary little endian or ASCII. Atomic.

  ASCII coordinates are written with 9 significant digits, which round-trips float32 exactly.
  """
  path = os.fspath(path)
  xyz = np.asarray(xyz)
  if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.shape[0] == 0:
    raise ValueError(f'write_ply {path}: xyz must be a non-empty (N, 3) array, got shape {xyz.shape}')
  if not np.all(np.isfinite(xyz)):
    raise ValueError(f'write_ply {path}: xyz contains NaN or Inf')
  if rgb is not None:
    rgb = np.asarray(rgb)
    if rgb.shape != xyz.shape:
      raise ValueError(f'write_ply {path}: rgb must have shape {xyz.shape} like xyz, got {rgb.shape}')
    if not np.issubdtype(rgb.dtype, np.integer) or rgb.min() < 0 or rgb.max() > 255:
      raise ValueError(f'write_ply {path}: rgb must be integers in 0..255 (uint8), got dtype {rgb.dtype}')
  fields = [('x', '<f4'), ('y', '<f4'), ('z', '<f4')]
  if rgb is not None:
    fields += [('red', 'u1'), ('green', 'u1'), ('blue', 'u1')]
  header = ['ply', f'format {"binary_little_endian" if binary else "ascii"} 1.0', 'comment written by cg3d_jax',
            f'element vertex {xyz.shape[0]}', 'property float x', 'property float y', 'property float z']
  if rgb is not None:
    header += ['property uchar red', 'property uchar green', 'property uchar blue']
  header.append('end_header')
  body = io.BytesIO()
  body.write(('\n'.join(header) + '\n').encode('ascii'))
  xyz = xyz.astype(np.float32)
  if binary:
    rows = np.empty(xyz.shape[0], dtype=fields)
    for i, axis in enumerate('xyz'):
      rows[axis] = xyz[:, i]
    if rgb is not None:
      for i, channel in enumerate(('red', 'green', 'blue')):
        rows[channel] = rgb[:, i]
    body.write(rows.tobytes())
  else:
    # float32 -> float64 is exact, so '%.9g' prints each float32 coordinate with enough digits to read it back.
    table = xyz.astype(np.float64) if rgb is None else np.concatenate([xyz, rgb], axis=1).astype(np.float64)
    np.savetxt(body, table, fmt=['%.9g'] * 3 + (['%d'] * 3 if rgb is not None else []), delimiter=' ')
  atomic_write_bytes(path, body.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers: parsing numeric text, colours, finite checks, mesh sampling.

def _parse_rows(path, lines: Sequence[str], line_numbers: Sequence[int], what: str) -> np.ndarray:
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


def _check_finite(path, values: np.ndarray, what: str, line_numbers: Sequence[int] | None = None) -> None:
  bad = ~np.isfinite(values).all(axis=1)
  if bad.any():
    row = int(np.argmax(bad))
    line = line_numbers[row] if line_numbers is not None else None
    where = '' if line is not None else f' (row {row})'
    raise PointFileError(path, f'{what} contains NaN or Inf{where}', line)


def _colours_to_uint8(path, values: np.ndarray, integer_typed: bool) -> np.ndarray:
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


def _looks_like_normals(values: np.ndarray) -> bool:
  norms = np.sqrt((values ** 2).sum(axis=1))
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
        raise PointFileError(path, "cannot tell whether columns 4-6 are normals or colours; pass columns='xyz,normals'"
                                   " or columns='xyz,rgb'")
      groups = ['xyz', 'normals' if normals else 'rgb']
    elif num_cols == 9:
      first_normals = _looks_like_normals(values[:, 3:6]) and _looks_like_colours(values[:, 6:9])
      first_colours = _looks_like_colours(values[:, 3:6]) and _looks_like_normals(values[:, 6:9])
      if first_normals == first_colours:
        raise PointFileError(path, "cannot tell which of columns 4-6 and 7-9 are normals and which colours; pass "
                                   "columns='xyz,normals,rgb' or columns='xyz,rgb,normals'")
      groups = ['xyz', 'normals', 'rgb'] if first_normals else ['xyz', 'rgb', 'normals']
    else:
      raise PointFileError(path, f'{num_cols} columns per point; expected 3 (xyz), 6 (xyz + normals or colours) or 9 '
                                 "(xyz + both), or name them with columns=, e.g. 'xyz,skip,rgb'")
  else:
    groups = [g.strip() for g in columns.split(',')] if isinstance(columns, str) else list(columns)
  widths = {'xyz': 3, 'normals': 3, 'rgb': 3, 'skip': 1}
  unknown = [g for g in groups if g not in widths]
  if unknown or 'xyz' not in groups or any(groups.count(g) > 1 for g in ('xyz', 'normals', 'rgb')):
    raise ValueError(f"columns must name 'xyz' once and optionally 'normals', 'rgb' (3 columns each) and 'skip' "
                     f'(1 column), got {groups}')
  if sum(widths[g] for g in groups) != num_cols:
    raise PointFileError(path, f'columns {groups} describe {sum(widths[g] for g in groups)} columns, the file has '
                               f'{num_cols}')
  parts, start = {}, 0
  for group in groups:
    parts[group] = values[:, start:start + widths[group]]
    start += widths[group]
  rgb = _colours_to_uint8(path, parts['rgb'], False) if 'rgb' in parts else None
  normals = parts['normals'].astype(np.float32) if 'normals' in parts else None
  return parts['xyz'].astype(np.float32), rgb, normals


def sample_mesh_surface(vertices, triangles, num_points: int, seed: int = 0, vertex_rgb=None):
  """Points uniform on a triangle mesh's surface: triangles drawn by area, then uniform barycentric coordinates.

  Returns (xyz float32 (num_points, 3), rgb uint8 (num_points, 3) interpolated from vertex colours, or None).
  Raises ValueError when the mesh has no area.
  """
  vertices = np.asarray(vertices, dtype=np.float64)
  triangles = np.asarray(triangles, dtype=np.int64)
  a, b, c = (vertices[triangles[:, i]] for i in range(3))
  areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
  total = areas.sum()
  if not total > 0:
    raise ValueError('the mesh has no surface area (every face is degenerate)')
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(triangles), size=num_points, p=areas / total)
  r1, r2 = rng.random(num_points), rng.random(num_points)
  # sqrt(r1) makes the density uniform over the triangle instead of bunching at vertex a.
  s = np.sqrt(r1)
  weights = np.stack([1 - s, s * (1 - r2), s * r2], axis=1)
  corners = triangles[chosen]
  xyz = np.einsum('nk,nkd->nd', weights, vertices[corners])
  rgb = None
  if vertex_rgb is not None:
    colours = np.asarray(vertex_rgb, dtype=np.float64)[corners]
    rgb = np.clip(np.round(np.einsum('nk,nkd->nd', weights, colours)), 0, 255).astype(np.uint8)
  return xyz.astype(np.float32), rgb


def _triangulate(path, faces, num_vertices: int) -> np.ndarray:
  """(F', 3) triangles from polygons by fans around each polygon's first vertex.

  `faces` is an (F, n) array when every face has n vertices (fanned without a Python loop), else a list of lists.
  """
  if isinstance(faces, np.ndarray) and faces.ndim == 2:
    faces = faces.astype(np.int64)
    if faces.shape[1] < 3:
      raise PointFileError(path, f'faces have {faces.shape[1]} vertices; faces need at least 3')
    fans = [np.stack([faces[:, 0], faces[:, i], faces[:, i + 1]], axis=1) for i in range(1, faces.shape[1] - 1)]
    triangles = np.stack(fans, axis=1).reshape(-1, 3)
  else:
    fans = []
    for face in faces:
      if len(face) < 3:
        raise PointFileError(path, f'a face has {len(face)} vertices; faces need at least 3')
      fans.extend((face[0], face[i], face[i + 1]) for i in range(1, len(face) - 1))
    triangles = np.asarray(fans, dtype=np.int64).reshape(-1, 3)
  if triangles.min() < 0 or triangles.max() >= num_vertices:
    raise PointFileError(path, f'face vertex indices must lie in [0, {num_vertices}), got range '
                               f'[{triangles.min()}, {triangles.max()}]')
  return triangles


def _mesh_cloud(path, vertices, rgb, faces, mesh_points, seed) -> PointCloud:
  triangles = _triangulate(path, faces, vertices.shape[0])
  try:
    xyz, sampled_rgb = sample_mesh_surface(vertices, triangles, mesh_points, seed, rgb)
  except ValueError as e:
    raise PointFileError(path, str(e)) from None
  return PointCloud(xyz=xyz, rgb=sampled_rgb, normals=None, source=path, from_mesh=True)


# ---------------------------------------------------------------------------------------------------------------
# Text and NPY.

def _text_lines(path, data: bytes) -> tuple[list[str], Sequence[int]]:
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


def _read_text(path, data: bytes, columns) -> PointCloud:
  lines, numbers = _text_lines(path, data)
  if not lines:
    raise PointFileError(path, 'file holds no points (only blank or comment lines)')
  values = _parse_rows(path, lines, numbers, 'point row')
  _check_finite(path, values, 'point row', numbers)
  xyz, rgb, normals = _split_columns(path, values, columns)
  return PointCloud(xyz=xyz, rgb=rgb, normals=normals, source=path)


def _read_npy(path, data: bytes, columns) -> PointCloud:
  try:
    values = np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    raise PointFileError(path, f'not a readable .npy array (truncated or not NumPy format?): {e}') from None
  if not isinstance(values, np.ndarray) or values.dtype.names or not np.issubdtype(values.dtype, np.number):
    raise PointFileError(path, f'expected a numeric (N, C) array, got dtype {getattr(values, "dtype", None)}')
  if values.ndim != 2 or values.shape[1] < 3:
    raise PointFileError(path, f'expected an (N, C) array with C >= 3 (xyz first), got shape {values.shape}')
  if values.shape[0] == 0:
    raise PointFileError(path, 'array holds no points')
  _check_finite(path, values.astype(np.float64), 'array')
  # float32 -> float64 -> float32 is exact, so xyz comes out exactly as stored (float64 files are rounded once).
  xyz, rgb, normals = _split_columns(path, values.astype(np.float64), columns)
  return PointCloud(xyz=xyz, rgb=rgb, normals=normals, source=path)


# ---------------------------------------------------------------------------------------------------------------
# OFF (Princeton/ModelNet meshes; COFF with vertex colours, NOFF with vertex normals).

_OFF_HEADER = re.compile(r'^(C?N?OFF)(.*)$')


def _read_off(path, data: bytes, mesh_points: int, seed: int) -> PointCloud:
  lines, numbers = _text_lines(path, data)
  if not lines:
    raise PointFileError(path, 'file is empty')
  match = _OFF_HEADER.match(lines[0])
  if not match:
    raise PointFileError(path, f"expected an 'OFF' (or COFF/NOFF) header, found {lines[0][:40]!r}", numbers[0])
  kind, rest = match.group(1), match.group(2).strip()
  # Some ModelNet files glue the counts onto the header ('OFF490 518 0'); read them from there when present.
  if rest:
    counts_line, counts_number, body = rest, numbers[0], 1
  elif len(lines) > 1:
    counts_line, counts_number, body = lines[1], numbers[1], 2
  else:
    raise PointFileError(path, 'missing the vertex/face counts line', numbers[0])
  try:
    num_vertices, num_faces = (int(t) for t in counts_line.split()[:2])
  except ValueError:
    raise PointFileError(path, f"expected counts 'vertices faces edges', found {counts_line!r}",
                         counts_number) from None
  if num_vertices < 1:
    raise PointFileError(path, 'mesh has no vertices', counts_number)
  vertex_lines, vertex_numbers = lines[body:body + num_vertices], numbers[body:body + num_vertices]
  face_lines, face_numbers = (lines[body + num_vertices:body + num_vertices + num_faces],
                              numbers[body + num_vertices:body + num_vertices + num_faces])
  if len(vertex_lines) < num_vertices or len(face_lines) < num_faces:
    raise PointFileError(path, f'truncated: header promises {num_vertices} vertices and {num_faces} faces, the file '
                               f'holds {len(vertex_lines)} vertex and {len(face_lines)} face lines')
  vertices = _parse_rows(path, vertex_lines, vertex_numbers, 'vertex')
  needed = 3 + (3 if 'N' in kind else 0) + (3 if kind.startswith('C') else 0)
  if vertices.shape[1] < needed:
    raise PointFileError(path, f'{kind} vertices need at least {needed} numbers, found {vertices.shape[1]}',
                         vertex_numbers[0])
  _check_finite(path, vertices, 'vertex', vertex_numbers)
  colour_start = 6 if 'N' in kind else 3
  rgb = _colours_to_uint8(path, vertices[:, colour_start:colour_start + 3], False) if kind.startswith('C') else None
  if num_faces == 0:  # an OFF without faces is a point set
    return PointCloud(xyz=vertices[:, :3].astype(np.float32), rgb=rgb, normals=None, source=path)
  faces = []
  for line, number in zip(face_lines, face_numbers):
    tokens = line.split()
    try:
      count = int(tokens[0])
      face = [int(t) for t in tokens[1:1 + count]]
    except ValueError:
      raise PointFileError(path, f"expected a face 'n i1 .. in', found {line[:60]!r}", number) from None
    if len(face) != count:
      raise PointFileError(path, f'face promises {count} vertex indices, found {len(face)}', number)
    faces.append(face)
  return _mesh_cloud(path, vertices[:, :3], rgb, faces, mesh_points, seed)


# ---------------------------------------------------------------------------------------------------------------
# PLY.

_PLY_TYPES = {
    'char': 'i1', 'int8': 'i1', 'uchar': 'u1', 'uint8': 'u1', 'short': 'i2', 'int16': 'i2', 'ushort': 'u2',
    'uint16': 'u2', 'int': 'i4', 'int32': 'i4', 'uint': 'u4', 'uint32': 'u4', 'float': 'f4', 'float32': 'f4',
    'double': 'f8', 'float64': 'f8'}
_PLY_FORMATS = {'ascii': None, 'binary_little_endian': '<', 'binary_big_endian': '>'}
_COLOUR_NAMES = (('red', 'green', 'blue'), ('r', 'g', 'b'), ('diffuse_red', 'diffuse_green', 'diffuse_blue'))
_FACE_LIST_NAMES = ('vertex_indices', 'vertex_index')


@dataclasses.dataclass
class _PlyProperty:
  name: str
  dtype: str  # numpy type code without byte order; for lists, the item type
  count_dtype: str | None = None  # set for list properties


@dataclasses.dataclass
class _PlyElement:
  name: str
  count: int
  properties: list


def _parse_ply_header(path, data: bytes):
  end = re.search(rb'end_header[ \t]*\r?\n', data)
  if not data.startswith(b'ply') or end is None:
    raise PointFileError(path, "not a PLY file: expected 'ply' first and an 'end_header' line")
  header_lines = data[:end.start()].decode('ascii', errors='replace').splitlines()
  fmt, elements = None, []
  for number, line in enumerate(header_lines, start=1):
    tokens = line.split()
    if not tokens or tokens[0] in ('ply', 'comment', 'obj_info'):
      continue
    if tokens[0] == 'format':
      if len(tokens) < 2 or tokens[1] not in _PLY_FORMATS:
        raise PointFileError(path, f'unknown PLY format {line!r}; expected one of {", ".join(_PLY_FORMATS)}', number)
      fmt = tokens[1]
    elif tokens[0] == 'element' and len(tokens) == 3 and tokens[2].isdigit():
      elements.append(_PlyElement(tokens[1], int(tokens[2]), []))
    elif tokens[0] == 'property' and elements:
      if len(tokens) == 5 and tokens[1] == 'list' and tokens[2] in _PLY_TYPES and tokens[3] in _PLY_TYPES:
        elements[-1].properties.append(_PlyProperty(tokens[4], _PLY_TYPES[tokens[3]], _PLY_TYPES[tokens[2]]))
      elif len(tokens) == 3 and tokens[1] in _PLY_TYPES:
        elements[-1].properties.append(_PlyProperty(tokens[2], _PLY_TYPES[tokens[1]]))
      else:
        raise PointFileError(path, f'cannot read PLY property line {line!r}', number)
    else:
      raise PointFileError(path, f'cannot read PLY header line {line!r}', number)
  if fmt is None:
    raise PointFileError(path, "PLY header has no 'format' line")
  return fmt, elements, end.end()


def _read_ply(path, data: bytes, mesh_points: int, seed: int) -> PointCloud:
  fmt, elements, body_start = _parse_ply_header(path, data)
  names = [e.name for e in elements]
  if 'vertex' not in names:
    raise PointFileError(path, f"PLY has no 'vertex' element (elements: {names})")
  if fmt == 'ascii':
    tables = _read_ply_ascii(path, data, body_start, elements)
  else:
    tables = _read_ply_binary(path, data, body_start, elements, _PLY_FORMATS[fmt])
  vertex = elements[names.index('vertex')]
  columns = tables['vertex']
  props = {p.name: p for p in vertex.properties}
  missing = [a for a in 'xyz' if a not in props or props[a].count_dtype is not None]
  if missing:
    raise PointFileError(path, f"PLY vertices lack scalar properties {missing} (have {list(props)})")
  if vertex.count == 0:
    raise PointFileError(path, 'PLY holds no vertices')
  xyz = np.stack([np.asarray(columns[a]) for a in 'xyz'], axis=1)
  _check_finite(path, xyz.astype(np.float64), 'vertex coordinates')
  xyz = xyz.astype(np.float32)
  rgb = None
  for colour_names in _COLOUR_NAMES:
    if all(n in props for n in colour_names):
      values = np.stack([np.asarray(columns[n], dtype=np.float64) for n in colour_names], axis=1)
      integer_typed = not props[colour_names[0]].dtype.startswith('f')
      rgb = _colours_to_uint8(path, values, integer_typed)
      break
  normals = None
  if all(n in props for n in ('nx', 'ny', 'nz')):
    normals = np.stack([np.asarray(columns[n]) for n in ('nx', 'ny', 'nz')], axis=1).astype(np.float32)
  if 'face' in names and elements[names.index('face')].count > 0:
    face_props = tables['face']
    key = next((n for n in _FACE_LIST_NAMES if n in face_props), None)
    if key is None:
      raise PointFileError(path, f'PLY faces have no {" or ".join(_FACE_LIST_NAMES)} list')
    return _mesh_cloud(path, xyz, rgb, face_props[key], mesh_points, seed)
  return PointCloud(xyz=xyz, rgb=rgb, normals=normals, source=path)


def _read_ply_binary(path, data: bytes, offset: int, elements, byte_order: str) -> dict:
  """{element name: {property: values}}; scalars as arrays, lists as (rows, n) arrays or lists of lists."""
  tables = {}
  for element in elements:
    is_list = [p.count_dtype is not None for p in element.properties]
    if not any(is_list):
      dtype = np.dtype([(p.name, byte_order + p.dtype) for p in element.properties])
      end = offset + dtype.itemsize * element.count
      if end > len(data):
        raise PointFileError(path, f'truncated: {element.count} {element.name} rows need {end} bytes, file has '
                                   f'{len(data)}')
      rows = np.frombuffer(data, dtype=dtype, count=element.count, offset=offset)
      tables[element.name] = {p.name: rows[p.name] for p in element.properties}
      offset = end
      continue
    tables[element.name], offset = _read_ply_binary_lists(path, data, offset, element, byte_order)
  return tables


def _read_ply_binary_lists(path, data, offset, element, byte_order):
  """Elements with list properties (faces). Fast path: every list as long as the first one; else row by row."""
  def item(code):
    return np.dtype(byte_order + code)

  if element.count == 0:
    return {p.name: [] for p in element.properties}, offset
  # Fast path: build a fixed-size row dtype from the first row's list lengths, then verify every row agrees.
  fields, position, lengths = [], offset, {}
  for p in element.properties:
    if p.count_dtype is None:
      fields.append((p.name, item(p.dtype)))
      position += item(p.dtype).itemsize
      continue
    if position + item(p.count_dtype).itemsize > len(data):
      raise PointFileError(path, f'truncated inside the {element.name} element')
    n = int(np.frombuffer(data, item(p.count_dtype), 1, position)[0])
    lengths[p.name] = n
    fields += [(p.name + '#count', item(p.count_dtype)), (p.name, item(p.dtype), (n,))]
    position += item(p.count_dtype).itemsize + n * item(p.dtype).itemsize
  dtype = np.dtype(fields)
  end = offset + dtype.itemsize * element.count
  if end <= len(data):
    rows = np.frombuffer(data, dtype=dtype, count=element.count, offset=offset)
    if all(np.all(rows[name + '#count'] == n) for name, n in lengths.items()):
      return {p.name: rows[p.name] for p in element.properties}, end
  # Slow path: variable-length lists (mixed triangles and quads), read row by row.
  table = {p.name: [] for p in element.properties}
  for _ in range(element.count):
    for p in element.properties:
      if p.count_dtype is None:
        size = item(p.dtype).itemsize
        if offset + size > len(data):
          raise PointFileError(path, f'truncated inside the {element.name} element')
        table[p.name].append(np.frombuffer(data, item(p.dtype), 1, offset)[0])
        offset += size
      else:
        count_size = item(p.count_dtype).itemsize
        if offset + count_size > len(data):
          raise PointFileError(path, f'truncated inside the {element.name} element')
        n = int(np.frombuffer(data, item(p.count_dtype), 1, offset)[0])
        offset += count_size
        if offset + n * item(p.dtype).itemsize > len(data):
          raise PointFileError(path, f'truncated inside the {element.name} element')
        table[p.name].append(np.frombuffer(data, item(p.dtype), n, offset).tolist())
        offset += n * item(p.dtype).itemsize
  return table, offset


def _read_ply_ascii(path, data: bytes, body_start: int, elements) -> dict:
  header_line_count = data[:body_start].count(b'\n')
  lines, numbers = _text_lines(path, data[body_start:])
  numbers = (range(numbers.start + header_line_count, numbers.stop + header_line_count) if isinstance(numbers, range)
             else [n + header_line_count for n in numbers])
  tables, start = {}, 0
  for element in elements:
    rows, row_numbers = lines[start:start + element.count], numbers[start:start + element.count]
    if len(rows) < element.count:
      raise PointFileError(path, f'truncated: header promises {element.count} {element.name} lines, found '
                                 f'{len(rows)}')
    start += element.count
    if element.count == 0:
      tables[element.name] = {p.name: [] for p in element.properties}
      continue
    if any(p.count_dtype is not None for p in element.properties):
      tables[element.name] = _parse_ply_ascii_lists(path, rows, row_numbers, element)
      continue
    values = _parse_rows(path, rows, row_numbers, f'{element.name} row')
    if values.shape[1] != len(element.properties):
      raise PointFileError(path, f'{element.name} rows need {len(element.properties)} numbers '
                                 f'({", ".join(p.name for p in element.properties)}), found {values.shape[1]}',
                           row_numbers[0])
    if element.name == 'vertex':
      _check_finite(path, values, 'vertex row', row_numbers)
    tables[element.name] = {p.name: values[:, i] for i, p in enumerate(element.properties)}
  return tables


def _parse_ply_ascii_lists(path, rows, row_numbers, element):
  table = {p.name: [] for p in element.properties}
  for row, number in zip(rows, row_numbers):
    tokens, position = row.split(), 0
    try:
      for p in element.properties:
        if p.count_dtype is None:
          table[p.name].append(float(tokens[position]))
          position += 1
        else:
          n = int(tokens[position])
          values = [int(t) for t in tokens[position + 1:position + 1 + n]]
          if len(values) != n:
            raise PointFileError(path, f'{element.name} list {p.name} promises {n} values, found {len(values)}',
                                 number)
          table[p.name].append(values)
          position += 1 + n
    except (ValueError, IndexError):
      raise PointFileError(path, f'cannot read {element.name} row {row[:60]!r}', number) from None
    if position != len(tokens):
      raise PointFileError(path, f'{element.name} row has {len(tokens) - position} numbers more than its properties',
                           number)
  return table
