"""Writes a procedural dataset in the ShapeNet-55 layout, so the demo and the tests run the real builder code.

Layout written under `root` (the same names the `shapenet55_cg3d` builder reads from its manual folder):
  shapenet_pc/<synset>-<model>.npy      (num_points, 3) float32 surface samples
  img/<synset>/<model>/000.png ...      num_views shaded renders around the object
  train_img.txt, test_img.txt           one `<synset>-<model>.npy` a line
  taxonomy.json                         ShapeNet's synset dictionary format, with fake synset ids per family
  shape_names.txt                       class names in label order
  synthetic.json                        the settings, written last: its presence marks a complete folder

Every object is a function of (seed, family, index) only, so the folder is reproducible bit for bit.
"""

import dataclasses
import json
import pathlib

import numpy as np

from cg3d_jax.atomic import atomic_write_bytes, atomic_write_npy, atomic_write_png
from cg3d_jax.synthetic import render, shapes

MARKER = 'synthetic.json'
PALETTE = np.array(
  [
    [200, 80, 70],
    [70, 130, 200],
    [90, 170, 90],
    [210, 170, 60],
    [150, 100, 190],
    [80, 170, 170],
    [190, 120, 60],
    [150, 150, 150],
  ],
  float,
)


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
  seed: int = 0
  num_train_per_class: int = 8
  num_test_per_class: int = 2
  num_points: int = 8192
  image_size: int = 224
  num_views: int = 5
  families: tuple[str, ...] = tuple(shapes.FAMILIES)
  noise: float = 0.004  # sensor-like jitter on the stored cloud, in object units (clouds span about 2)


def synset_id(family_index: int) -> str:
  """Fake 8-digit WordNet-style ids in a range ShapeNet does not use."""
  return f'{90000000 + family_index:08d}'


def _random_pose(rng: np.random.Generator) -> np.ndarray:
  """Any turn about the up axis, a small tilt: objects stay upright, as ShapeNet's are."""
  yaw = rng.uniform(0, 2 * np.pi)
  tilt_x, tilt_z = rng.uniform(-0.25, 0.25, size=2)
  cy, sy, cx, sx, cz, sz = np.cos(yaw), np.sin(yaw), np.cos(tilt_x), np.sin(tilt_x), np.cos(tilt_z), np.sin(tilt_z)
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  return rz @ rx @ ry


def make_object(settings: SyntheticSettings, family: str, index: int):
  """One object: (cloud (num_points, 3) float32, list of num_views uint8 images)."""
  family_index = list(shapes.FAMILIES).index(family)
  rng = np.random.default_rng([settings.seed, family_index, index])
  primitives = shapes.FAMILIES[family](rng)
  pose = _random_pose(rng)
  scale = rng.uniform(0.8, 1.0)
  pts, nrm = shapes.sample_surface(rng, primitives, settings.num_points)
  centre = pts.mean(axis=0)
  radius = np.linalg.norm(pts - centre, axis=1).max()
  to_world = lambda p: ((p - centre) / radius * scale) @ pose.T  # noqa: E731
  cloud = to_world(pts) + rng.normal(0.0, settings.noise, size=pts.shape)
  # Renders use a denser sample of the same surface, so views have no holes at the chosen size.
  dense_n = int(1.3 * settings.image_size**2)
  dpts, dnrm = shapes.sample_surface(rng, primitives, dense_n)
  colour = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.85, 1.15)
  views = render.orbit_views(
    to_world(dpts),
    dnrm @ pose.T,
    colour,
    num_views=settings.num_views,
    image_size=settings.image_size,
    azimuth0=rng.uniform(0, 2 * np.pi / settings.num_views),
  )
  return cloud.astype(np.float32), views


def model_id(settings: SyntheticSettings, family: str, index: int) -> str:
  rng = np.random.default_rng([settings.seed, 7919, list(shapes.FAMILIES).index(family), index])
  return ''.join(f'{b:02x}' for b in rng.integers(0, 256, size=16))


def write_synthetic_shapenet(root, settings: SyntheticSettings = SyntheticSettings()) -> pathlib.Path:
  """Writes the whole folder (or finishes it: files from a previous interrupted run are rewritten identically)."""
  root = pathlib.Path(root)
  for f in settings.families:
    if f not in shapes.FAMILIES:
      raise ValueError(f'unknown shape family {f!r}; known: {sorted(shapes.FAMILIES)}')
  (root / MARKER).unlink(missing_ok=True)
  splits = {'train': [], 'test': []}
  per_split = {'train': settings.num_train_per_class, 'test': settings.num_test_per_class}
  for family in settings.families:
    synset = synset_id(list(shapes.FAMILIES).index(family))
    index = 0
    for split in ('train', 'test'):
      for _ in range(per_split[split]):
        mid = model_id(settings, family, index)
        cloud, views = make_object(settings, family, index)
        atomic_write_npy(root / 'shapenet_pc' / f'{synset}-{mid}.npy', cloud)
        for v, image in enumerate(views):
          atomic_write_png(root / 'img' / synset / mid / f'{v:03d}.png', image)
        splits[split].append(f'{synset}-{mid}.npy')
        index += 1
  for split, lines in splits.items():
    atomic_write_bytes(root / f'{split}_img.txt', ('\n'.join(lines) + '\n').encode())
  taxonomy = [
    {
      'synsetId': synset_id(list(shapes.FAMILIES).index(f)),
      'name': f,
      'children': [],
      'numInstances': settings.num_train_per_class + settings.num_test_per_class,
    }
    for f in settings.families
  ]
  atomic_write_bytes(root / 'taxonomy.json', json.dumps(taxonomy, indent=1).encode())
  atomic_write_bytes(root / 'shape_names.txt', ('\n'.join(settings.families) + '\n').encode())
  atomic_write_bytes(root / MARKER, json.dumps(dataclasses.asdict(settings), indent=1).encode())
  return root


def ensure_synthetic_shapenet(root, settings: SyntheticSettings = SyntheticSettings()) -> pathlib.Path:
  """Writes the folder unless a complete one with the same settings is already there."""
  root = pathlib.Path(root)
  marker = root / MARKER
  if marker.exists():
    found = json.loads(marker.read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))
    if found == wanted:
      return root
    raise ValueError(
      f'{root} holds a synthetic dataset with other settings ({found}); expected {wanted}. '
      'Choose another folder or delete this one.'
    )
  return write_synthetic_shapenet(root, settings)
