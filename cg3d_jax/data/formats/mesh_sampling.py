"""Meshes to points: polygons fanned into triangles, then points uniform on the surface (triangles drawn by area)
with a seeded generator, so the same mesh always gives the same points; vertex colours are interpolated."""

import numpy as np

from cg3d_jax.data.formats.point_cloud import PointCloud
from cg3d_jax.errors import BadInputError


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


def triangulate(path, faces, num_vertices: int) -> np.ndarray:
  """(F', 3) triangles from polygons by fans around each polygon's first vertex.

  `faces` is an (F, n) array when every face has n vertices (fanned without a Python loop), else a list of lists.
  """
  if isinstance(faces, np.ndarray) and faces.ndim == 2:
    faces = faces.astype(np.int64)
    if faces.shape[1] < 3:
      raise BadInputError(path, f'faces have {faces.shape[1]} vertices; faces need at least 3')
    fans = [np.stack([faces[:, 0], faces[:, i], faces[:, i + 1]], axis=1) for i in range(1, faces.shape[1] - 1)]
    triangles = np.stack(fans, axis=1).reshape(-1, 3)
  else:
    fans = []
    for face in faces:
      if len(face) < 3:
        raise BadInputError(path, f'a face has {len(face)} vertices; faces need at least 3')
      fans.extend((face[0], face[i], face[i + 1]) for i in range(1, len(face) - 1))
    triangles = np.asarray(fans, dtype=np.int64).reshape(-1, 3)
  if triangles.min() < 0 or triangles.max() >= num_vertices:
    raise BadInputError(
      path, f'face vertex indices must lie in [0, {num_vertices}), got range [{triangles.min()}, {triangles.max()}]'
    )
  return triangles


def mesh_cloud(path, vertices, rgb, faces, mesh_points, seed) -> PointCloud:
  """The PointCloud of `mesh_points` surface samples of a file's mesh; a bad mesh is a BadInputError naming it."""
  triangles = triangulate(path, faces, vertices.shape[0])
  try:
    xyz, sampled_rgb = sample_mesh_surface(vertices, triangles, mesh_points, seed, rgb)
  except ValueError as e:
    raise BadInputError(path, str(e)) from None
  return PointCloud(xyz=xyz, rgb=sampled_rgb, normals=None, source=path, from_mesh=True)
