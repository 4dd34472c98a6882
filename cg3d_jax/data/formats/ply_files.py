"""PLY files: the header, ASCII and binary (little/big endian) bodies read as point clouds, and a coloured writer.

A PLY with a non-empty face element is sampled on its surface (mesh_sampling); otherwise its vertices are the
points, with colours (red/green/blue, r/g/b or diffuse_*) and normals (nx/ny/nz) when it has them.
"""

import dataclasses
import io
import os
import re

import numpy as np

from cg3d_jax.atomic import atomic_write_bytes
from cg3d_jax.data.formats import mesh_sampling
from cg3d_jax.data.formats.point_cloud import PointCloud, check_finite, colours_to_uint8
from cg3d_jax.data.formats.text_rows import parse_rows, text_lines
from cg3d_jax.errors import BadInputError


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
  header = [
    'ply',
    f'format {"binary_little_endian" if binary else "ascii"} 1.0',
    'comment written by cg3d_jax',
    f'element vertex {xyz.shape[0]}',
    'property float x',
    'property float y',
    'property float z',
  ]
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


_PLY_TYPES = {
  'char': 'i1',
  'int8': 'i1',
  'uchar': 'u1',
  'uint8': 'u1',
  'short': 'i2',
  'int16': 'i2',
  'ushort': 'u2',
  'uint16': 'u2',
  'int': 'i4',
  'int32': 'i4',
  'uint': 'u4',
  'uint32': 'u4',
  'float': 'f4',
  'float32': 'f4',
  'double': 'f8',
  'float64': 'f8',
}
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
    raise BadInputError(path, "not a PLY file: expected 'ply' first and an 'end_header' line")
  header_lines = data[: end.start()].decode('ascii', errors='replace').splitlines()
  fmt, elements = None, []
  for number, line in enumerate(header_lines, start=1):
    tokens = line.split()
    if not tokens or tokens[0] in ('ply', 'comment', 'obj_info'):
      continue
    if tokens[0] == 'format':
      if len(tokens) < 2 or tokens[1] not in _PLY_FORMATS:
        raise BadInputError(path, f'unknown PLY format {line!r}; expected one of {", ".join(_PLY_FORMATS)}', number)
      fmt = tokens[1]
    elif tokens[0] == 'element' and len(tokens) == 3 and tokens[2].isdigit():
      elements.append(_PlyElement(tokens[1], int(tokens[2]), []))
    elif tokens[0] == 'property' and elements:
      if len(tokens) == 5 and tokens[1] == 'list' and tokens[2] in _PLY_TYPES and tokens[3] in _PLY_TYPES:
        elements[-1].properties.append(_PlyProperty(tokens[4], _PLY_TYPES[tokens[3]], _PLY_TYPES[tokens[2]]))
      elif len(tokens) == 3 and tokens[1] in _PLY_TYPES:
        elements[-1].properties.append(_PlyProperty(tokens[2], _PLY_TYPES[tokens[1]]))
      else:
        raise BadInputError(path, f'cannot read PLY property line {line!r}', number)
    else:
      raise BadInputError(path, f'cannot read PLY header line {line!r}', number)
  if fmt is None:
    raise BadInputError(path, "PLY header has no 'format' line")
  return fmt, elements, end.end()


def read_ply(path, data: bytes, mesh_points: int, seed: int) -> PointCloud:
  """The points of a PLY file's bytes `data` (read_points has checked it is not empty)."""
  fmt, elements, body_start = _parse_ply_header(path, data)
  names = [e.name for e in elements]
  if 'vertex' not in names:
    raise BadInputError(path, f"PLY has no 'vertex' element (elements: {names})")
  if fmt == 'ascii':
    tables = _read_ply_ascii(path, data, body_start, elements)
  else:
    tables = _read_ply_binary(path, data, body_start, elements, _PLY_FORMATS[fmt])
  vertex = elements[names.index('vertex')]
  columns = tables['vertex']
  props = {p.name: p for p in vertex.properties}
  missing = [a for a in 'xyz' if a not in props or props[a].count_dtype is not None]
  if missing:
    raise BadInputError(path, f'PLY vertices lack scalar properties {missing} (have {list(props)})')
  if vertex.count == 0:
    raise BadInputError(path, 'PLY holds no vertices')
  xyz = np.stack([np.asarray(columns[a]) for a in 'xyz'], axis=1)
  check_finite(path, xyz.astype(np.float64), 'vertex coordinates')
  xyz = xyz.astype(np.float32)
  rgb = None
  for colour_names in _COLOUR_NAMES:
    if all(n in props for n in colour_names):
      values = np.stack([np.asarray(columns[n], dtype=np.float64) for n in colour_names], axis=1)
      integer_typed = not props[colour_names[0]].dtype.startswith('f')
      rgb = colours_to_uint8(path, values, integer_typed)
      break
  normals = None
  if all(n in props for n in ('nx', 'ny', 'nz')):
    normals = np.stack([np.asarray(columns[n]) for n in ('nx', 'ny', 'nz')], axis=1).astype(np.float32)
  if 'face' in names and elements[names.index('face')].count > 0:
    face_props = tables['face']
    key = next((n for n in _FACE_LIST_NAMES if n in face_props), None)
    if key is None:
      raise BadInputError(path, f'PLY faces have no {" or ".join(_FACE_LIST_NAMES)} list')
    return mesh_sampling.mesh_cloud(path, xyz, rgb, face_props[key], mesh_points, seed)
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
        raise BadInputError(
          path, f'truncated: {element.count} {element.name} rows need {end} bytes, file has {len(data)}'
        )
      rows = np.frombuffer(data, dtype=dtype, count=element.count, offset=offset)
      tables[element.name] = {p.name: rows[p.name] for p in element.properties}
      offset = end
      continue
    tables[element.name], offset = _read_ply_binary_lists(path, data, offset, element, byte_order)
  extra = data[offset:]
  if extra.strip(b' \r\n\t\x00'):  # a writer's final newline or padding is harmless; data is not
    raise BadInputError(
      path,
      f'{len(extra)} bytes after the {_declared(elements)} the header declares: its element '
      'counts do not describe the body (a cloud read from it would be silently cut)',
    )
  return tables


def _declared(elements) -> str:
  return ' and '.join(f'{e.count} {e.name} rows' for e in elements)


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
      raise BadInputError(path, f'truncated inside the {element.name} element')
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
          raise BadInputError(path, f'truncated inside the {element.name} element')
        table[p.name].append(np.frombuffer(data, item(p.dtype), 1, offset)[0])
        offset += size
      else:
        count_size = item(p.count_dtype).itemsize
        if offset + count_size > len(data):
          raise BadInputError(path, f'truncated inside the {element.name} element')
        n = int(np.frombuffer(data, item(p.count_dtype), 1, offset)[0])
        offset += count_size
        if offset + n * item(p.dtype).itemsize > len(data):
          raise BadInputError(path, f'truncated inside the {element.name} element')
        table[p.name].append(np.frombuffer(data, item(p.dtype), n, offset).tolist())
        offset += n * item(p.dtype).itemsize
  return table, offset


def _read_ply_ascii(path, data: bytes, body_start: int, elements) -> dict:
  header_line_count = data[:body_start].count(b'\n')
  lines, numbers = text_lines(path, data[body_start:])
  numbers = (
    range(numbers.start + header_line_count, numbers.stop + header_line_count)
    if isinstance(numbers, range)
    else [n + header_line_count for n in numbers]
  )
  tables, start = {}, 0
  for element in elements:
    rows, row_numbers = lines[start : start + element.count], numbers[start : start + element.count]
    if len(rows) < element.count:
      raise BadInputError(path, f'truncated: header promises {element.count} {element.name} lines, found {len(rows)}')
    start += element.count
    if element.count == 0:
      tables[element.name] = {p.name: [] for p in element.properties}
      continue
    if any(p.count_dtype is not None for p in element.properties):
      tables[element.name] = _parse_ply_ascii_lists(path, rows, row_numbers, element)
      continue
    values = parse_rows(path, rows, row_numbers, f'{element.name} row').values
    if values.shape[1] != len(element.properties):
      raise BadInputError(
        path,
        f'{element.name} rows need {len(element.properties)} numbers '
        f'({", ".join(p.name for p in element.properties)}), found {values.shape[1]}',
        row_numbers[0],
      )
    if element.name == 'vertex':
      check_finite(path, values, 'vertex row', row_numbers)
    tables[element.name] = {p.name: values[:, i] for i, p in enumerate(element.properties)}
  if start < len(lines):
    raise BadInputError(
      path,
      f'{len(lines) - start} more lines after the {_declared(elements)} the header declares: '
      'its element counts do not describe the body (a cloud read from it would be silently '
      'cut)',
      numbers[start],
    )
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
          values = [int(t) for t in tokens[position + 1 : position + 1 + n]]
          if len(values) != n:
            raise BadInputError(path, f'{element.name} list {p.name} promises {n} values, found {len(values)}', number)
          table[p.name].append(values)
          position += 1 + n
    except (ValueError, IndexError):
      raise BadInputError(path, f'cannot read {element.name} row {row[:60]!r}', number) from None
    if position != len(tokens):
      raise BadInputError(
        path, f'{element.name} row has {len(tokens) - position} numbers more than its properties', number
      )
  return table
