"""Procedural shape families: oriented surface samples (points, normals) drawn by area from simple primitives.

Each family composes primitives with random proportions, so objects of one family vary but stay recognisable, and
families differ in geometry (not just size): a small point encoder can tell them apart.
"""

from typing import Callable

import numpy as np

Surface = tuple[np.ndarray, np.ndarray, float]  # sampler(n) -> (points, normals), plus the area
Primitive = tuple[Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]], float]


def _normalise(v):
  return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def triangles(vertices: np.ndarray, faces: np.ndarray, offset=(0.0, 0.0, 0.0)) -> Primitive:
  """A triangle mesh; outward normals follow the counter-clockwise winding of `faces`."""
  tri = vertices[faces] + np.asarray(offset)
  cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  areas = 0.5 * np.linalg.norm(cross, axis=1)

  def sample(rng, n):
    which = rng.choice(len(tri), size=n, p=areas / areas.sum())
    a, b = rng.uniform(size=(2, n))
    flip = a + b > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    t = tri[which]
    pts = t[:, 0] + a[:, None] * (t[:, 1] - t[:, 0]) + b[:, None] * (t[:, 2] - t[:, 0])
    return pts, _normalise(cross[which])

  return sample, float(areas.sum())


def box(size, offset=(0.0, 0.0, 0.0)) -> Primitive:
  sx, sy, sz = np.asarray(size) / 2
  v = np.array([[x, y, z] for x in (-sx, sx) for y in (-sy, sy) for z in (-sz, sz)])
  faces = np.array(
    [
      [0, 1, 3],
      [0, 3, 2],
      [4, 6, 7],
      [4, 7, 5],
      [0, 4, 5],
      [0, 5, 1],
      [2, 3, 7],
      [2, 7, 6],
      [0, 2, 6],
      [0, 6, 4],
      [1, 5, 7],
      [1, 7, 3],
    ]
  )
  return triangles(v, faces, offset)


def pyramid(base, height, offset=(0.0, 0.0, 0.0)) -> Primitive:
  b = base / 2
  v = np.array([[-b, 0, -b], [b, 0, -b], [b, 0, b], [-b, 0, b], [0, height, 0]])
  faces = np.array([[0, 1, 2], [0, 2, 3], [0, 4, 1], [1, 4, 2], [2, 4, 3], [3, 4, 0]])
  return triangles(v, faces, offset)


def prism(side, length, offset=(0.0, 0.0, 0.0)) -> Primitive:
  """A triangular prism lying along z."""
  h = side * np.sqrt(3) / 2
  tri = np.array([[-side / 2, -h / 3], [side / 2, -h / 3], [0, 2 * h / 3]])
  v = np.array([[x, y, z] for z in (-length / 2, length / 2) for x, y in tri])
  faces = np.array([[0, 2, 1], [3, 4, 5], [0, 1, 4], [0, 4, 3], [1, 2, 5], [1, 5, 4], [2, 0, 3], [2, 3, 5]])
  return triangles(v, faces, offset)


def ellipsoid(radii, offset=(0.0, 0.0, 0.0), y_range=(-1.0, 1.0)) -> Primitive:
  """An ellipsoid, or the band of it whose unit-sphere direction has y in `y_range` (hemispheres for capsules)."""
  radii = np.asarray(radii, float)
  p = 1.6075
  a, b, c = radii
  full_area = 4 * np.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)

  def sample(rng, n):
    # Uniform in y on the unit sphere is uniform in area (Archimedes); good enough for mildly stretched ellipsoids.
    y = rng.uniform(*y_range, size=n)
    phi = rng.uniform(0, 2 * np.pi, size=n)
    r = np.sqrt(np.clip(1 - y**2, 0, None))
    u = np.stack([r * np.cos(phi), y, r * np.sin(phi)], axis=1)
    return u * radii + np.asarray(offset), _normalise(u / radii)

  return sample, float(full_area * (y_range[1] - y_range[0]) / 2)


def frustum(r_bottom, r_top, height, offset=(0.0, 0.0, 0.0), caps=True) -> Primitive:
  """A truncated cone along y from y=0 to y=height (a cylinder when the radii match, a cone when r_top = 0)."""
  slant = np.hypot(height, r_bottom - r_top)
  side = np.pi * (r_bottom + r_top) * slant
  cap_b, cap_t = (np.pi * r_bottom**2, np.pi * r_top**2) if caps else (0.0, 0.0)
  total = side + cap_b + cap_t

  def sample(rng, n):
    part = rng.choice(3, size=n, p=np.array([side, cap_b, cap_t]) / total)
    phi = rng.uniform(0, 2 * np.pi, size=n)
    # Side: area density grows with the radius, so draw t with density proportional to r(t).
    s = rng.uniform(size=n)
    if abs(r_bottom - r_top) > 1e-9:
      t = (r_bottom - np.sqrt(r_bottom**2 - s * (r_bottom**2 - r_top**2))) / (r_bottom - r_top)
    else:
      t = s
    r = r_bottom + (r_top - r_bottom) * t
    y = t * height
    normal_side = np.stack([np.cos(phi) * height, np.full(n, r_bottom - r_top), np.sin(phi) * height], 1)
    rc = np.sqrt(rng.uniform(size=n))
    r = np.where(part == 0, r, rc * np.where(part == 1, r_bottom, r_top))
    y = np.where(part == 0, y, np.where(part == 1, 0.0, height))
    pts = np.stack([r * np.cos(phi), y, r * np.sin(phi)], 1) + np.asarray(offset)
    normals = np.where(
      (part == 0)[:, None], normal_side, np.where((part == 1)[:, None], [[0.0, -1.0, 0.0]], [[0.0, 1.0, 0.0]])
    )
    return pts, _normalise(normals)

  return sample, float(total)


def torus(major, minor, offset=(0.0, 0.0, 0.0), axis='y') -> Primitive:
  def sample(rng, n):
    # Area density is proportional to (major + minor cos v): rejection-sample v.
    v = np.empty(0)
    while len(v) < n:
      cand = rng.uniform(0, 2 * np.pi, size=2 * n)
      keep = rng.uniform(size=2 * n) < (major + minor * np.cos(cand)) / (major + minor)
      v = np.concatenate([v, cand[keep]])
    v = v[:n]
    u = rng.uniform(0, 2 * np.pi, size=n)
    ring = np.stack([np.cos(u), np.zeros(n), np.sin(u)], 1)
    normal = ring * np.cos(v)[:, None] + np.array([0.0, 1.0, 0.0]) * np.sin(v)[:, None]
    pts = ring * major + normal * minor
    if axis == 'z':  # stand the ring up
      pts, normal = pts[:, [0, 2, 1]], normal[:, [0, 2, 1]]
    return pts + np.asarray(offset), normal

  return sample, float(4 * np.pi**2 * major * minor)


def _u(rng, lo, hi):
  return float(rng.uniform(lo, hi))


def _sphere(rng):
  r = _u(rng, 0.6, 1.0)
  return [ellipsoid([r * _u(rng, 0.85, 1.15), r * _u(rng, 0.85, 1.15), r * _u(rng, 0.85, 1.15)])]


def _box(rng):
  return [box([_u(rng, 0.5, 1.6), _u(rng, 0.5, 1.6), _u(rng, 0.5, 1.6)])]


def _cylinder(rng):
  r, h = _u(rng, 0.25, 0.6), _u(rng, 1.0, 2.0)
  return [frustum(r, r, h, offset=(0, -h / 2, 0))]


def _cone(rng):
  r, h = _u(rng, 0.4, 0.8), _u(rng, 1.0, 2.0)
  return [frustum(r, 0.0, h, offset=(0, -h / 2, 0))]


def _torus(rng):
  return [torus(_u(rng, 0.6, 0.9), _u(rng, 0.12, 0.3))]


def _pyramid(rng):
  h = _u(rng, 0.8, 1.6)
  return [pyramid(_u(rng, 0.9, 1.6), h, offset=(0, -h / 2, 0))]


def _capsule(rng):
  r, h = _u(rng, 0.25, 0.45), _u(rng, 0.8, 1.5)
  return [
    frustum(r, r, h, offset=(0, -h / 2, 0), caps=False),
    ellipsoid([r] * 3, (0, h / 2, 0), (0.0, 1.0)),
    ellipsoid([r] * 3, (0, -h / 2, 0), (-1.0, 0.0)),
  ]


def _table(rng):
  w, d, h, t, leg = _u(rng, 1.2, 1.8), _u(rng, 0.7, 1.2), _u(rng, 0.6, 1.0), _u(rng, 0.05, 0.12), _u(rng, 0.05, 0.1)
  parts = [box([w, t, d], (0, h / 2, 0))]
  for sx in (-1, 1):
    for sz in (-1, 1):
      parts.append(box([leg, h, leg], (sx * (w / 2 - leg), 0, sz * (d / 2 - leg))))
  return parts


def _dumbbell(rng):
  r, length, rod = _u(rng, 0.25, 0.4), _u(rng, 1.0, 1.6), _u(rng, 0.06, 0.12)
  return [
    ellipsoid([r] * 3, (0, length / 2, 0)),
    ellipsoid([r] * 3, (0, -length / 2, 0)),
    frustum(rod, rod, length, offset=(0, -length / 2, 0), caps=False),
  ]


def _hourglass(rng):
  r, h, waist = _u(rng, 0.5, 0.8), _u(rng, 0.6, 0.9), _u(rng, 0.03, 0.15)
  return [frustum(r, waist, h, offset=(0, -h, 0)), frustum(waist, r, h, offset=(0, 0, 0))]


def _mug(rng):
  r, h = _u(rng, 0.4, 0.6), _u(rng, 0.8, 1.3)
  return [frustum(r, r, h, offset=(0, -h / 2, 0)), torus(_u(rng, 0.22, 0.32), _u(rng, 0.05, 0.08), (r, 0, 0), 'z')]


def _cross(rng):
  arm, t = _u(rng, 1.2, 1.9), _u(rng, 0.2, 0.4)
  return [box([arm, t, t]), box([t, arm, t]), box([t, t, arm])]


def _prism(rng):
  return [prism(_u(rng, 0.9, 1.5), _u(rng, 1.0, 2.0))]


FAMILIES = {
  'sphere': _sphere,
  'box': _box,
  'cylinder': _cylinder,
  'cone': _cone,
  'torus': _torus,
  'pyramid': _pyramid,
  'capsule': _capsule,
  'table': _table,
  'dumbbell': _dumbbell,
  'hourglass': _hourglass,
  'mug': _mug,
  'cross': _cross,
  'prism': _prism,
}


def sample_surface(rng: np.random.Generator, primitives: list[Primitive], n: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` area-uniform samples over the union of primitives, with unit normals."""
  areas = np.array([area for _, area in primitives])
  counts = rng.multinomial(n, areas / areas.sum())
  pts, nrm = zip(*(sampler(rng, k) for (sampler, _), k in zip(primitives, counts)))
  return np.concatenate(pts), np.concatenate(nrm)
