"""OFF meshes (Princeton/ModelNet; COFF with vertex colours, NOFF with vertex normals) read as point clouds.

An OFF with faces is sampled on its surface (mesh_sampling); one without faces is its vertices.
"""

import re

import numpy as np

from cg3d_jax.data.formats import mesh_sampling
from cg3d_jax.data.formats.point_cloud import PointCloud, check_finite, colours_to_uint8
from cg3d_jax.data.formats.text_rows import parse_rows, text_lines
from cg3d_jax.errors import BadInputError

_OFF_HEADER = re.compile(r'^(C?N?OFF)(.*)$')


def read_off(path, data: bytes, mesh_points: int, seed: int) -> PointCloud:
  """The points of an OFF file's bytes `data` (read_points has checked it is not empty)."""
  lines, numbers = text_lines(path, data)
  if not lines:
    raise BadInputError(path, 'file is empty')
  match = _OFF_HEADER.match(lines[0])
  if not match:
    raise BadInputError(path, f"expected an 'OFF' (or COFF/NOFF) header, found {lines[0][:40]!r}", numbers[0])
  kind, rest = match.group(1), match.group(2).strip()
  # Some ModelNet files glue the counts onto the header ('OFF490 518 0'); read them from there when present.
  if rest:
    counts_line, counts_number, body = rest, numbers[0], 1
  elif len(lines) > 1:
    counts_line, counts_number, body = lines[1], numbers[1], 2
  else:
    raise BadInputError(path, 'missing the vertex/face counts line', numbers[0])
  try:
    num_vertices, num_faces = (int(t) for t in counts_line.split()[:2])
  except ValueError:
    raise BadInputError(path, f"expected counts 'vertices faces edges', found {counts_line!r}", counts_number) from None
  if num_vertices < 1:
    raise BadInputError(path, 'mesh has no vertices', counts_number)
  vertex_lines, vertex_numbers = lines[body : body + num_vertices], numbers[body : body + num_vertices]
  face_lines, face_numbers = (
    lines[body + num_vertices : body + num_vertices + num_faces],
    numbers[body + num_vertices : body + num_vertices + num_faces],
  )
  if len(vertex_lines) < num_vertices or len(face_lines) < num_faces:
    body_lines = len(lines) - body
    raise BadInputError(
      path,
      f'truncated: header promises {num_vertices} vertices and {num_faces} faces '
      f'({num_vertices + num_faces} lines), the file has {body_lines} line(s) after the '
      'header',
    )
  vertices = parse_rows(path, vertex_lines, vertex_numbers, 'vertex').values
  needed = 3 + (3 if 'N' in kind else 0) + (3 if kind.startswith('C') else 0)
  if vertices.shape[1] < needed:
    raise BadInputError(
      path, f'{kind} vertices need at least {needed} numbers, found {vertices.shape[1]}', vertex_numbers[0]
    )
  check_finite(path, vertices, 'vertex', vertex_numbers)
  colour_start = 6 if 'N' in kind else 3
  rgb = colours_to_uint8(path, vertices[:, colour_start : colour_start + 3], False) if kind.startswith('C') else None
  extra = len(lines) - (body + num_vertices + num_faces)
  if extra > 0:
    raise BadInputError(
      path,
      f'{extra} more line(s) after the {num_vertices} vertices and {num_faces} faces the '
      'header declares: its counts do not describe the body (a mesh read from it would be '
      'silently cut)',
      numbers[body + num_vertices + num_faces],
    )
  if num_faces == 0:  # an OFF without faces is a point set
    return PointCloud(xyz=vertices[:, :3].astype(np.float32), rgb=rgb, normals=None, source=path)
  faces = []
  for line, number in zip(face_lines, face_numbers):
    tokens = line.split()
    try:
      count = int(tokens[0])
      face = [int(t) for t in tokens[1 : 1 + count]]
    except ValueError:
      raise BadInputError(path, f"expected a face 'n i1 .. in', found {line[:60]!r}", number) from None
    if len(face) != count:
      raise BadInputError(path, f'face promises {count} vertex indices, found {len(face)}', number)
    faces.append(face)
  return mesh_sampling.mesh_cloud(path, vertices[:, :3], rgb, faces, mesh_points, seed)
