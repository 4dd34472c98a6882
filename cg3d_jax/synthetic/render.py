"""A small NumPy renderer: shaded views of a densely sampled oriented surface, drawn as depth-tested splats.

Good enough for CAD-like renders of procedural objects (white background, one colour, Lambert shading from a
head light plus a key light), and fast enough on a CPU: no mesh rasterisation, just points with normals.
"""

import numpy as np

BACKGROUND = 255


def look_at_rotation(azimuth: float, elevation: float) -> np.ndarray:
  """World-to-camera rotation (rows: camera right, up, towards the viewer) for a camera orbiting the y axis."""
  ca, sa, ce, se = np.cos(azimuth), np.sin(azimuth), np.cos(elevation), np.sin(elevation)
  forward = np.array([ce * sa, se, ce * ca])  # from the object towards the camera
  right = np.cross(np.array([0.0, 1.0, 0.0]), forward)
  right /= np.linalg.norm(right)
  up = np.cross(forward, right)
  return np.stack([right, up, forward])


def render_view(
  points: np.ndarray,
  normals: np.ndarray,
  colour: np.ndarray,
  *,
  azimuth: float,
  elevation: float,
  image_size: int,
  extent: float = 1.1,
) -> np.ndarray:
  """Orthographic render (image_size, image_size, 3) uint8 of oriented points; `extent` is the half-width shown."""
  rotation = look_at_rotation(azimuth, elevation)
  cam = points @ rotation.T
  nrm = normals @ rotation.T
  nrm = np.where(nrm[:, 2:3] < 0, -nrm, nrm)  # shade inner walls of open or overlapping parts as seen from here
  key = np.array([-0.4, 0.6, 0.7])
  key /= np.linalg.norm(key)
  shade = 0.25 + 0.45 * nrm[:, 2] + 0.35 * np.clip(nrm @ key, 0.0, None)
  rgb = np.clip(colour[None, :] * shade[:, None], 0, 255)

  scale = image_size / (2 * extent)
  u = np.floor(cam[:, 0] * scale + image_size / 2).astype(np.int64)
  v = np.floor(image_size / 2 - cam[:, 1] * scale).astype(np.int64)
  radius = max(1, image_size // 112)
  offsets = np.arange(-radius + 1, radius + 1) if radius > 1 else np.array([0, 1])
  du, dv = np.meshgrid(offsets, offsets)
  uu = (u[:, None] + du.reshape(1, -1)).reshape(-1)
  vv = (v[:, None] + dv.reshape(1, -1)).reshape(-1)
  depth = np.repeat(cam[:, 2], du.size)
  colours = np.repeat(rgb, du.size, axis=0)
  inside = (uu >= 0) & (uu < image_size) & (vv >= 0) & (vv < image_size)
  pixel = (vv * image_size + uu)[inside]
  depth, colours = depth[inside], colours[inside]
  # Nearest splat wins: sort by pixel, then by depth towards the viewer, and keep each pixel's first entry.
  order = np.lexsort((-depth, pixel))
  pixel, colours = pixel[order], colours[order]
  first = np.ones(len(pixel), bool)
  first[1:] = pixel[1:] != pixel[:-1]
  image = np.full((image_size * image_size, 3), BACKGROUND, np.uint8)
  image[pixel[first]] = np.round(colours[first]).astype(np.uint8)
  return image.reshape(image_size, image_size, 3)


def orbit_views(
  points: np.ndarray,
  normals: np.ndarray,
  colour: np.ndarray,
  *,
  num_views: int,
  image_size: int,
  elevation: float = np.deg2rad(25.0),
  azimuth0: float = np.deg2rad(30.0),
) -> list[np.ndarray]:
  """`num_views` renders evenly spaced around the object, as ShapeNet render sets are."""
  return [
    render_view(
      points, normals, colour, azimuth=azimuth0 + 2 * np.pi * i / num_views, elevation=elevation, image_size=image_size
    )
    for i in range(num_views)
  ]
