"""The procedural S3DIS-layout rooms: names, file format, placement, orientation, density, determinism, reuse.

Files are parsed here with NumPy and regular expressions only (not the project's S3DIS reader), and geometry is
checked against hand-derivable facts (an upright cylinder's side lies on one vertical circle, its caps at z = 0 and
z = height; its surface area is 2 pi R H + 2 pi R^2).
"""

import itertools
import re

import numpy as np
import pytest

from cg3d_jax.synthetic import rooms as ss

SMALL = ss.SceneSettings(
  seed=1,
  area=3,
  num_rooms=3,
  objects_per_room=2,
  families=('sphere', 'box', 'cylinder', 'cone', 'mug'),
  floor_size=(2.5, 2.0),
  object_radius=(0.3, 0.4),
  points_per_m2=300.0,
  min_gap=0.2,
)
# Noise-free and without lean: the shapes can be checked exactly.
EXACT = ss.SceneSettings(
  seed=2,
  area=1,
  num_rooms=1,
  objects_per_room=2,
  families=('cylinder', 'cone'),
  floor_size=(3.0, 3.0),
  points_per_m2=800.0,
  noise=0.0,
  max_tilt=0.0,
)
LINE = re.compile(rb'^-?\d+\.\d{6} -?\d+\.\d{6} -?\d+\.\d{6} \d{1,3} \d{1,3} \d{1,3}$')


@pytest.fixture(scope='session')
def small_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('scenes')
  ss.write_synthetic_scenes(root, SMALL)
  return root


@pytest.fixture(scope='session')
def exact_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('exact_scenes')
  ss.write_synthetic_scenes(root, EXACT)
  return root


def _load(path) -> np.ndarray:
  data = np.loadtxt(path, ndmin=2)
  assert data.shape[1] == 6, path
  return data


def _objects(root, settings):
  """(record, points (n, 6)) for every object of every room, from the marker and the annotation files."""
  area = ss.area_dir(root, settings)
  marker = ss.read_marker(root)
  return [(room, o, _load(area / o['file'])) for room, info in marker['rooms'].items() for o in info['objects']]


def test_rotation_takes_object_up_to_scene_up():
  r = ss.Z_UP_FROM_Y_UP
  np.testing.assert_array_equal(r @ [0, 1, 0], [0, 0, 1])
  np.testing.assert_array_equal(r @ r.T, np.eye(3))
  assert np.linalg.det(r) == pytest.approx(1.0)


def test_layout_and_file_format_are_s3dis(small_root):
  area = small_root / 'Stanford3dDataset_v1.2_Aligned_Version' / 'Area_3'
  assert sorted(p.name for p in area.iterdir()) == ['room_1', 'room_2', 'room_3']
  classes = ss.scene_classes(small_root)
  assert list(classes) == ['room_1', 'room_2', 'room_3']
  for room, present in classes.items():
    assert len(present) == len(set(present)) == SMALL.objects_per_room and set(present) <= set(SMALL.families)
    assert sorted(p.name for p in (area / room).iterdir()) == ['Annotations', f'{room}.txt']
    names = sorted(p.name for p in (area / room / 'Annotations').iterdir())
    assert names == sorted([f'{c}_1.txt' for c in present] + ['floor_1.txt'])
    for path in [area / room / f'{room}.txt'] + [area / room / 'Annotations' / n for n in names]:
      lines = path.read_bytes().splitlines()
      assert lines and all(LINE.match(line) for line in lines), path
      colours = _load(path)[:, 3:]
      assert colours.min() >= 0 and colours.max() <= 255
  # Over rooms, some families appear and others do not: presence is informative.
  assert len(set(itertools.chain(*classes.values()))) > SMALL.objects_per_room


def test_room_file_is_the_sorted_concatenation_of_its_annotations(small_root):
  area = ss.area_dir(small_root, SMALL)
  for room in ss.room_names(SMALL):
    parts = sorted((area / room / 'Annotations').iterdir(), key=lambda p: p.name)
    assert (area / room / f'{room}.txt').read_bytes() == b''.join(p.read_bytes() for p in parts)


def test_objects_stand_on_the_floor_inside_their_circles_without_overlap(small_root):
  fx, fy = SMALL.floor_size
  tol = 5 * SMALL.noise
  by_room = {}
  for room, o, pts in _objects(small_root, SMALL):
    assert len(pts) == o['num_points']
    assert -tol < pts[:, 2].min() < tol, o  # resting on z = 0
    np.testing.assert_allclose(o['centre'], pts[:, :3].mean(0), atol=1e-6)
    cx, cy, _ = o['centre']
    assert np.hypot(pts[:, 0] - cx, pts[:, 1] - cy).max() <= o['radius'] + 1e-5
    assert o['radius'] <= cx <= fx - o['radius'] and o['radius'] <= cy <= fy - o['radius']
    by_room.setdefault(room, []).append(o)
  for objects in by_room.values():
    for a, b in itertools.combinations(objects, 2):
      gap = np.hypot(a['centre'][0] - b['centre'][0], a['centre'][1] - b['centre'][1]) - a['radius'] - b['radius']
      assert gap >= SMALL.min_gap
  area = ss.area_dir(small_root, SMALL)
  for room in ss.room_names(SMALL):
    floor = _load(area / room / 'Annotations' / 'floor_1.txt')
    assert len(floor) == round(SMALL.points_per_m2 * fx * fy)
    assert np.abs(floor[:, 2]).max() < tol
    assert floor[:, 0].min() > -tol and floor[:, 0].max() < fx + tol
    assert floor[:, 1].min() > -tol and floor[:, 1].max() < fy + tol


def _circle_fit(xy):
  """Least-squares circle through points (Kasa): exact for points on a circle."""
  a = np.c_[2 * xy, np.ones(len(xy))]
  (cx, cy, c), *_ = np.linalg.lstsq(a, (xy**2).sum(1), rcond=None)
  return np.array([cx, cy]), np.sqrt(c + cx**2 + cy**2)


def test_objects_are_upright_and_sampled_at_the_set_density(exact_root):
  ((_, cylinder, pts),) = [x for x in _objects(exact_root, EXACT) if x[1]['class'] == 'cylinder']
  z = pts[:, 2]
  height = z.max()
  caps = (z < 1e-5) | (z > height - 1e-5)
  assert z.min() == 0.0 and 0 < caps.sum() < len(z)
  centre, radius = _circle_fit(pts[~caps, :2])
  # Side points on one vertical circle, cap points within it: the axis is vertical (object +y is scene +z).
  np.testing.assert_allclose(np.linalg.norm(pts[~caps, :2] - centre, axis=1), radius, atol=2e-5)
  assert np.linalg.norm(pts[caps, :2] - centre, axis=1).max() <= radius + 2e-5
  # Area from the measured shape: the point count follows points_per_m2.
  area_m2 = 2 * np.pi * radius * height + 2 * np.pi * radius**2
  assert len(pts) == pytest.approx(EXACT.points_per_m2 * area_m2, rel=0.002)
  ((_, cone, pts),) = [x for x in _objects(exact_root, EXACT) if x[1]['class'] == 'cone']
  base = pts[pts[:, 2] < 1e-5]
  assert len(base) > 20  # the flat base lies on the floor
  apex = pts[np.argmax(pts[:, 2]), :2]
  base_radius = np.linalg.norm(base[:, :2] - base[:, :2].mean(0), axis=1).max()
  assert np.linalg.norm(apex - base[:, :2].mean(0)) < 0.15 * base_radius  # the apex stands above the base


def test_rewrite_is_bit_identical(small_root, tmp_path):
  ss.write_synthetic_scenes(tmp_path, SMALL)
  area = ss.write_synthetic_scenes(tmp_path, SMALL)  # over its own files
  assert area == tmp_path / 'Stanford3dDataset_v1.2_Aligned_Version' / 'Area_3'
  first = {p.relative_to(small_root): p.read_bytes() for p in small_root.rglob('*') if p.is_file()}
  second = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
  assert first.keys() == second.keys() and first == second


def test_ensure_reuses_a_matching_folder_and_refuses_other_settings(tmp_path):
  tiny = ss.SceneSettings(
    num_rooms=1, objects_per_room=1, families=('box',), floor_size=(1.5, 1.5), points_per_m2=100.0
  )
  area = ss.ensure_synthetic_scenes(tmp_path, tiny)
  room_file = area / 'room_1' / 'room_1.txt'
  room_file.write_bytes(b'sentinel')  # a reuse leaves it alone
  assert ss.ensure_synthetic_scenes(tmp_path, tiny) == area and room_file.read_bytes() == b'sentinel'
  with pytest.raises(ValueError, match='other settings'):
    ss.ensure_synthetic_scenes(tmp_path, ss.SceneSettings(**{**tiny.__dict__, 'seed': 9}))


def test_stray_files_are_refused(tmp_path):
  tiny = ss.SceneSettings(
    num_rooms=1, objects_per_room=1, families=('box',), floor_size=(1.5, 1.5), points_per_m2=100.0
  )
  area = ss.write_synthetic_scenes(tmp_path, tiny)
  (area / 'room_1' / 'Annotations' / 'cone_1.txt').write_text('0 0 0 1 1 1\n')
  with pytest.raises(ValueError, match='cone_1.txt'):
    ss.write_synthetic_scenes(tmp_path, tiny)


def test_clear_errors_for_impossible_settings(tmp_path):
  crowded = ss.SceneSettings(num_rooms=1, objects_per_room=4, floor_size=(1.5, 1.5), points_per_m2=50.0)
  with pytest.raises(ValueError, match='cannot place 4 objects.*floor_size'):
    ss.write_synthetic_scenes(tmp_path / 'a', crowded)
  with pytest.raises(ValueError, match='objects_per_room'):
    ss.write_synthetic_scenes(tmp_path / 'b', ss.SceneSettings(objects_per_room=3, families=('box', 'cone')))
  with pytest.raises(ValueError, match='unknown shape family'):
    ss.write_synthetic_scenes(tmp_path / 'c', ss.SceneSettings(families=('chair',)))
