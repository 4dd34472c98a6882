"""Writes procedural rooms in the S3DIS layout, so open-scene queries run and are tested offline.

Each room is a grey floor with a few procedural objects (the `shapes.FAMILIES` the demo model is trained on) standing
on it, one object per family, families drawn at random per room so that over rooms some classes are present and
others absent. Layout written under `root`, as in the official S3DIS release (z up, metres):
  Stanford3dDataset_v1.2_Aligned_Version/Area_<A>/room_<i>/room_<i>.txt            `x y z r g b` lines
  Stanford3dDataset_v1.2_Aligned_Version/Area_<A>/room_<i>/Annotations/<class>_<k>.txt   one file per instance
  synthetic_scenes.json     the settings and every room's objects; written last: its presence marks a complete folder
Coordinates are written with 6 decimals and colours as integers 0-255, like the real files. The room file is the
concatenation of its annotation files in sorted-name order (the same lines, byte for byte). Classes are the family
names plus `floor`; k counts from 1 per class within a room.

Point density: `points_per_m2` applies to the floor area and to each object's surface area (the primitives' areas
scaled to the object's size in metres), so a neighbourhood sees floor and objects at a similar density. The floor is
sampled everywhere, also under objects (the scans of real rooms miss it there; the difference does not matter here).

Everything is a function of the settings only, so a rewrite is bit-identical.
"""

import dataclasses
import io
import json
import pathlib

import numpy as np

from cg3d_jax.atomic import atomic_write_bytes
from cg3d_jax.synthetic import shapes
from cg3d_jax.synthetic.objects import PALETTE

MARKER = 'synthetic_scenes.json'
DATASET_FOLDER = 'Stanford3dDataset_v1.2_Aligned_Version'
FLOOR_CLASS = 'floor'
FLOOR_GREY = np.array([128.0, 128.0, 128.0])

# The procedural families are y-up; S3DIS is z-up. This proper rotation (det +1) takes object +y to scene +z:
# (x, y, z)_object -> (x, -z, y)_scene.
Z_UP_FROM_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclasses.dataclass(frozen=True)
class SceneSettings:
  seed: int = 0
  area: int = 5
  num_rooms: int = 4
  objects_per_room: int = 3  # distinct families per room
  families: tuple[str, ...] = tuple(shapes.FAMILIES)
  floor_size: tuple[float, float] = (4.0, 4.0)  # metres along x and y; the floor spans [0, fx] x [0, fy]
  object_radius: tuple[float, float] = (0.35, 0.5)  # metres: farthest surface point from the object's centroid
  points_per_m2: float = 2000.0  # floor and object surfaces alike
  noise: float = 0.004  # metres: Gaussian jitter on every coordinate (sensor noise)
  min_gap: float = 0.3  # metres between the bounding circles (in the floor plane) of any two objects
  max_tilt: float = 0.25  # radians: objects turn freely about z and lean by at most this about x and y


def area_dir(root, settings: SceneSettings) -> pathlib.Path:
  return pathlib.Path(root) / DATASET_FOLDER / f'Area_{settings.area}'


def room_names(settings: SceneSettings) -> list[str]:
  return [f'room_{i}' for i in range(1, settings.num_rooms + 1)]


def _upright_pose(rng: np.random.Generator, max_tilt: float) -> np.ndarray:
  """A z-up rotation: any yaw about z, a lean of at most `max_tilt` about x and y (as synthetic's poses, z-up)."""
  yaw = rng.uniform(0, 2 * np.pi)
  tilt_x, tilt_y = rng.uniform(-max_tilt, max_tilt, size=2)
  cz, sz, cx, sx, cy, sy = np.cos(yaw), np.sin(yaw), np.cos(tilt_x), np.sin(tilt_x), np.cos(tilt_y), np.sin(tilt_y)
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  return ry @ rx @ rz


def _colours(rng: np.random.Generator, base: np.ndarray, n: int) -> np.ndarray:
  """Per-point colours around `base`: a little shading noise, as a scanner's colours have."""
  return np.clip(np.rint(base + rng.normal(0.0, 6.0, size=(n, 3))), 0, 255).astype(np.int64)


def make_scene_object(settings: SceneSettings, family: str, rng: np.random.Generator):
  """One object standing on z = 0, centroid above the origin: (points (n, 3) metres, colours (n, 3) int)."""
  primitives = shapes.FAMILIES[family](rng)
  pose = _upright_pose(rng, settings.max_tilt) @ Z_UP_FROM_Y_UP
  radius_m = rng.uniform(*settings.object_radius)
  # Normalised as synthetic.make_object does (centroid, farthest point), then sized in metres. The point count
  # follows the surface area at that size, so the extent is measured first, on a dense probe of the surface (a
  # sparse one misses thin tips such as a cone's apex); the written points share the probe's scaling.
  probe, _ = shapes.sample_surface(rng, primitives, 8192)
  probe_centre = probe.mean(axis=0)
  metres_per_unit = radius_m / np.linalg.norm(probe - probe_centre, axis=1).max()
  area_m2 = sum(area for _, area in primitives) * metres_per_unit**2
  n = max(16, int(round(settings.points_per_m2 * area_m2)))
  pts, _ = shapes.sample_surface(rng, primitives, n)
  pts = ((pts - probe_centre) * metres_per_unit) @ pose.T
  pts[:, 2] -= pts[:, 2].min()  # the noiseless surface rests on the floor
  pts += rng.normal(0.0, settings.noise, size=pts.shape)
  pts[:, :2] -= pts[:, :2].mean(axis=0)  # centroid above the origin: the placement centre is the object's centre
  colour = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.85, 1.15)
  return pts, _colours(rng, colour, n)


def _floor(settings: SceneSettings, rng: np.random.Generator):
  fx, fy = settings.floor_size
  n = int(round(settings.points_per_m2 * fx * fy))
  pts = np.stack([rng.uniform(0, fx, n), rng.uniform(0, fy, n), np.zeros(n)], axis=1)
  pts += rng.normal(0.0, settings.noise, size=pts.shape)
  return pts, _colours(rng, FLOOR_GREY * rng.uniform(0.9, 1.1), n)


def _place(settings: SceneSettings, radii: list[float], rng: np.random.Generator, room: str) -> np.ndarray:
  """Centres (k, 2) in the floor plane: circles inside the floor, `min_gap` apart; rejection sampling with restarts."""
  fx, fy = settings.floor_size
  for _ in range(100):
    centres = []
    for r in radii:
      if 2 * r > min(fx, fy):
        break
      for _ in range(200):
        c = rng.uniform([r, r], [fx - r, fy - r])
        if all(np.linalg.norm(c - p) >= r + q + settings.min_gap for p, q in zip(centres, radii)):
          centres.append(c)
          break
      else:
        break
    if len(centres) == len(radii):
      return np.array(centres)
  raise ValueError(
    f'{room}: cannot place {len(radii)} objects with bounding radii {[round(r, 3) for r in radii]} m and '
    f'min_gap={settings.min_gap} m on a floor of floor_size={settings.floor_size} m (rejection sampling gave up); '
    'enlarge floor_size or reduce objects_per_room, object_radius or min_gap.'
  )


def _lines(points: np.ndarray, colours: np.ndarray) -> bytes:
  buf = io.StringIO()
  np.savetxt(buf, np.concatenate([points, colours], axis=1), fmt=['%.6f'] * 3 + ['%d'] * 3, delimiter=' ')
  return buf.getvalue().encode()


def make_room(settings: SceneSettings, room_index: int):
  """One room, room_index counting from 1: ({annotation file name: bytes}, object records, floor point count).

  An object record (as in the marker): class, file (relative to the Area folder), centre (the mean of its points,
  metres), radius (of its bounding circle in the floor plane about that centre, noise included), num_points.
  """
  room = f'room_{room_index}'
  rng = np.random.default_rng([settings.seed, settings.area, room_index])
  chosen = rng.choice(len(settings.families), size=settings.objects_per_room, replace=False)
  families = [settings.families[i] for i in chosen]
  objects = [
    make_scene_object(settings, f, np.random.default_rng([settings.seed, settings.area, room_index, 1 + k]))
    for k, f in enumerate(families)
  ]
  # Bounding circles from the points actually written (noise included), so no written point leaves its circle.
  radii = [float(np.linalg.norm(p[:, :2], axis=1).max()) for p, _ in objects]
  centres = _place(settings, radii, rng, room)
  files, records = {}, []
  for family, (pts, cols), c, r in zip(families, objects, centres, radii):
    pts = pts + np.array([c[0], c[1], 0.0])
    name = f'{family}_1.txt'  # families are distinct within a room
    files[name] = _lines(pts, cols)
    records.append(
      {
        'class': family,
        'file': f'{room}/Annotations/{name}',
        'centre': [float(v) for v in pts.mean(axis=0)],
        'radius': r,
        'num_points': len(pts),
      }
    )
  floor_pts, floor_cols = _floor(settings, np.random.default_rng([settings.seed, settings.area, room_index, 0]))
  files[f'{FLOOR_CLASS}_1.txt'] = _lines(floor_pts, floor_cols)
  return files, records, len(floor_pts)


def _check_settings(settings: SceneSettings) -> None:
  for f in settings.families:
    if f not in shapes.FAMILIES:
      raise ValueError(f'unknown shape family {f!r} in SceneSettings.families; known: {sorted(shapes.FAMILIES)}')
  if FLOOR_CLASS in settings.families:
    raise ValueError(f'SceneSettings.families may not contain {FLOOR_CLASS!r}: it is the floor class')
  if not 0 < settings.objects_per_room <= len(settings.families):
    raise ValueError(
      f'SceneSettings.objects_per_room={settings.objects_per_room} must be between 1 and the number '
      f'of families ({len(settings.families)}): each room holds distinct families'
    )
  if settings.num_rooms < 1:
    raise ValueError(f'SceneSettings.num_rooms={settings.num_rooms} must be at least 1')
  lo, hi = settings.object_radius
  if not 0 < lo <= hi:
    raise ValueError(f'SceneSettings.object_radius={settings.object_radius} must be (low, high) with 0 < low <= high')


def _refuse_foreign_files(area: pathlib.Path, settings: SceneSettings) -> None:
  """A reader would take stray rooms or annotation files (e.g. from an interrupted run with other settings) as data."""
  if not area.exists():
    return
  stray = sorted(p.name for p in area.iterdir() if p.name not in room_names(settings))
  if stray:
    raise ValueError(f'{area} holds entries this writer would not write: {stray}; choose another folder or delete it.')


def _refuse_foreign_annotations(room_dir: pathlib.Path, expected: set[str]) -> None:
  annotations = room_dir / 'Annotations'
  stray = sorted(p.name for p in annotations.iterdir() if p.name not in expected) if annotations.exists() else []
  if stray:
    raise ValueError(
      f'{annotations} holds files this writer would not write: {stray}; choose another folder or delete it.'
    )


def _settings_json(settings: SceneSettings):
  return json.loads(json.dumps(dataclasses.asdict(settings)))  # tuples as lists, as read back from the marker


def write_synthetic_scenes(root, settings: SceneSettings = SceneSettings()) -> pathlib.Path:
  """Writes every room (or finishes an interrupted run identically) and then the marker; returns the Area folder."""
  _check_settings(settings)
  root = pathlib.Path(root)
  area = area_dir(root, settings)
  (root / MARKER).unlink(missing_ok=True)
  _refuse_foreign_files(area, settings)
  rooms = {}
  for i, room in enumerate(room_names(settings), start=1):
    files, records, floor_points = make_room(settings, i)
    _refuse_foreign_annotations(area / room, set(files))
    for name, data in files.items():
      atomic_write_bytes(area / room / 'Annotations' / name, data)
    atomic_write_bytes(area / room / f'{room}.txt', b''.join(files[name] for name in sorted(files)))
    rooms[room] = {
      'objects': records,
      'floor': {'file': f'{room}/Annotations/{FLOOR_CLASS}_1.txt', 'num_points': floor_points},
    }
  marker = {'settings': _settings_json(settings), 'area_dir': str(area.relative_to(root)), 'rooms': rooms}
  atomic_write_bytes(root / MARKER, json.dumps(marker, indent=1).encode())
  return area


def ensure_synthetic_scenes(root, settings: SceneSettings = SceneSettings()) -> pathlib.Path:
  """The Area folder, written unless a complete one with the same settings is already there."""
  root = pathlib.Path(root)
  marker = root / MARKER
  if marker.exists():
    found = json.loads(marker.read_text())['settings']
    wanted = _settings_json(settings)
    if found == wanted:
      return area_dir(root, settings)
    raise ValueError(
      f'{root} holds synthetic scenes with other settings ({found}); expected {wanted}. '
      'Choose another folder or delete this one.'
    )
  return write_synthetic_scenes(root, settings)


def read_marker(root) -> dict:
  marker = pathlib.Path(root) / MARKER
  if not marker.exists():
    raise FileNotFoundError(
      f'{marker} not found: {root} is not a complete synthetic scene folder (write it with write_synthetic_scenes)'
    )
  return json.loads(marker.read_text())


def scene_classes(root) -> dict[str, list[str]]:
  """Ground truth: room name -> sorted classes of the objects in it (the floor, present everywhere, left out)."""
  return {room: sorted(o['class'] for o in info['objects']) for room, info in read_marker(root)['rooms'].items()}
