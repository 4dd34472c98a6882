"""S3DIS reader on small rooms written here in the official layout; expected values are the ones written."""

import logging
import os

import numpy as np
import pytest

from cg3d_jax.errors import BadInputError
from cg3d_jax.scenes import s3dis

# Hand-chosen objects of Area_5/office_1 (exact in float32); the reader must concatenate them in file-name order.
OFFICE_1 = {
  'floor_1.txt': [(0.0, 0.0, 0.0, 10, 20, 30), (4.5, 0.0, 0.0, 11, 21, 31), (4.5, 3.25, 0.0, 12, 22, 32)],
  'chair_2.txt': [(2.0, 1.0, 0.5, 200, 0, 0), (2.125, 1.0, 0.75, 201, 1, 1)],
  'chair_1.txt': [(1.0, 1.0, 0.5, 0, 255, 0)],
  'board_1.txt': [(-0.5, 3.0, 1.5, 255, 255, 255), (-0.5, 3.0, 2.0, 254, 253, 252)],
}
# Independently: sorted names are board_1, chair_1, chair_2, floor_1; board=11, chair=8, floor=1 in PointNet's order.
OFFICE_1_ORDER = ['board_1.txt', 'chair_1.txt', 'chair_2.txt', 'floor_1.txt']
OFFICE_1_LABELS = [11, 11, 8, 8, 8, 1, 1, 1]
OFFICE_1_INSTANCES = [0, 0, 1, 2, 2, 3, 3, 3]

HALLWAY_2 = {
  'wall_1.txt': [(0.0, 0.0, 0.0, 1, 2, 3), (0.0, 5.0, 2.5, 4, 5, 6)],
  'stairs_1.txt': [(1.0, 2.0, 0.25, 7, 8, 9), (1.0, 2.5, 0.5, 7, 8, 9), (1.0, 3.0, 0.75, 7, 8, 9)],
}
CONFERENCE_1 = {'table_1.txt': [(3.0, 3.0, 0.75, 90, 60, 30)], 'ceiling_1.txt': [(3.0, 3.0, 3.0, 250, 250, 250)]}


def _lines(rows):
  return ''.join(' '.join(f'{v:.6f}' for v in row[:3]) + ' ' + ' '.join(str(c) for c in row[3:]) + '\n' for row in rows)


def _write_room(area_dir, name, objects, whole_rows=None):
  room = area_dir / name
  (room / 'Annotations').mkdir(parents=True)
  for file_name, rows in objects.items():
    (room / 'Annotations' / file_name).write_text(_lines(rows))
  if whole_rows is None:  # the official room file holds the same points, in no particular order
    whole_rows = [row for rows in reversed(list(objects.values())) for row in rows]
  (room / f'{name}.txt').write_text(_lines(whole_rows))
  return room


@pytest.fixture
def s3dis_root(tmp_path):
  aligned = tmp_path / 'data' / s3dis.ALIGNED
  _write_room(aligned / 'Area_5', 'office_1', OFFICE_1)
  _write_room(aligned / 'Area_5', 'hallway_2', HALLWAY_2)
  _write_room(aligned / 'Area_1', 'conferenceRoom_1', CONFERENCE_1)
  (aligned / 'Area_5' / '.DS_Store').write_text('not a room')
  return tmp_path / 'data'


def _office(root):
  return root / s3dis.ALIGNED / 'Area_5' / 'office_1'


def test_classes_are_pointnets_thirteen():
  assert len(s3dis.S3DIS_CLASSES) == 13 and s3dis.S3DIS_CLASSES[0] == 'ceiling'
  assert s3dis.S3DIS_CLASSES[8] == 'chair' and s3dis.S3DIS_CLASSES[12] == 'clutter'


def test_read_room_points_colours_labels_instances(s3dis_root):
  room = s3dis.read_room(_office(s3dis_root))
  rows = np.array([row for name in OFFICE_1_ORDER for row in OFFICE_1[name]], dtype=np.float64)
  assert (room.name, room.area, room.path) == ('office_1', 'Area_5', _office(s3dis_root))
  assert room.xyz.dtype == np.float32 and room.rgb.dtype == np.uint8
  assert room.labels.dtype == np.int32 and room.instances.dtype == np.int32
  np.testing.assert_array_equal(room.xyz, rows[:, :3].astype(np.float32))
  np.testing.assert_array_equal(room.rgb, rows[:, 3:].astype(np.uint8))
  np.testing.assert_array_equal(room.labels, OFFICE_1_LABELS)
  np.testing.assert_array_equal(room.instances, OFFICE_1_INSTANCES)
  assert room.instance_classes == ('board', 'chair', 'chair', 'floor')
  assert room.class_names == s3dis.S3DIS_CLASSES and room.remapped == {} and room.skipped_lines == {}
  assert room.present_classes() == ['board', 'chair', 'floor']


def test_read_room_with_own_class_list(s3dis_root):
  room = s3dis.read_room(_office(s3dis_root), class_names=('chair', 'other', 'board', 'floor'), unknown_class='other')
  np.testing.assert_array_equal(room.labels, [2, 2, 0, 0, 0, 3, 3, 3])
  with pytest.raises(ValueError, match='unknown_class'):
    s3dis.read_room(_office(s3dis_root), class_names=('chair', 'board', 'floor'), unknown_class='clutter')


def test_read_room_cloud_folder_and_file(s3dis_root):
  whole = [row for rows in reversed(list(OFFICE_1.values())) for row in rows]
  expected = np.array(whole, dtype=np.float64)
  for path in (_office(s3dis_root), _office(s3dis_root) / 'office_1.txt'):
    xyz, rgb = s3dis.read_room_cloud(path)
    np.testing.assert_array_equal(xyz, expected[:, :3].astype(np.float32))
    np.testing.assert_array_equal(rgb, expected[:, 3:].astype(np.uint8))
    assert xyz.dtype == np.float32 and rgb.dtype == np.uint8


def test_read_room_cloud_missing_file(tmp_path):
  (tmp_path / 'office_9' / 'Annotations').mkdir(parents=True)
  with pytest.raises(BadInputError, match=r'office_9.*office_9\.txt'):
    s3dis.read_room_cloud(tmp_path / 'office_9')


def test_list_rooms_both_root_forms(s3dis_root):
  aligned = s3dis_root / s3dis.ALIGNED
  expected = [aligned / 'Area_5' / 'hallway_2', aligned / 'Area_5' / 'office_1']
  assert s3dis.list_rooms(s3dis_root) == expected
  assert s3dis.list_rooms(aligned) == expected
  assert s3dis.list_rooms(aligned, areas=['Area_5']) == expected
  assert s3dis.list_rooms(s3dis_root, areas=(1, 5)) == [aligned / 'Area_1' / 'conferenceRoom_1'] + expected
  assert s3dis.list_rooms(s3dis_root, areas='5') == s3dis.list_rooms(s3dis_root, areas=5) == expected
  assert s3dis.list_rooms(s3dis_root, areas=None) == [aligned / 'Area_1' / 'conferenceRoom_1'] + expected
  assert s3dis.is_room_folder(expected[0]) and not s3dis.is_room_folder(aligned / 'Area_5')


def test_list_rooms_missing_area_names_existing(s3dis_root):
  with pytest.raises(BadInputError, match=r"Area_3.*existing areas: \['Area_1', 'Area_5'\]"):
    s3dis.list_rooms(s3dis_root, areas=(3,))


def test_list_rooms_missing_root_or_aligned_folder(tmp_path):
  with pytest.raises(BadInputError, match='root folder not found'):
    s3dis.list_rooms(tmp_path / 'nowhere')
  with pytest.raises(BadInputError, match=s3dis.ALIGNED):
    s3dis.list_rooms(tmp_path)
  with pytest.raises(ValueError, match='area'):
    s3dis.list_rooms(tmp_path, areas=('five',))


def test_unknown_class_goes_to_clutter_with_count_and_warning(s3dis_root, caplog):
  hallway = s3dis_root / s3dis.ALIGNED / 'Area_5' / 'hallway_2'
  with caplog.at_level(logging.WARNING):
    room = s3dis.read_room(hallway)
  assert room.remapped == {'stairs': 3}
  assert any("'stairs'" in r.getMessage() and '3 point' in r.getMessage() for r in caplog.records)
  # stairs_1.txt sorts before wall_1.txt
  np.testing.assert_array_equal(room.labels, [12, 12, 12, 2, 2])
  np.testing.assert_array_equal(room.instances, [0, 0, 0, 1, 1])
  assert room.instance_classes == ('stairs', 'wall') and room.present_classes() == ['clutter', 'wall']
  with pytest.raises(BadInputError, match=r"stairs_1\.txt.*'stairs'"):
    s3dis.read_room(hallway, unknown_class=None)


@pytest.mark.parametrize(
  'bad_line, shown',
  [
    ('1.0 2.0 3.0 4 5\n', '1.0 2.0 3.0 4 5'),  # a column short
    ('1.0 2.0 3.0 4 5 6 7\n', '1.0 2.0 3.0 4 5 6 7'),  # a column too many
    ('1.0 2.0 abc 4 5 6\n', 'abc'),  # not a number
    ('1.0 2.0 3.0 185\x00187 5 6\n', r'185\x00187'),  # a NUL byte, as in the real Area_5/hallway_6 ceiling_1.txt
    ('1.0 2.0-3.0 3.0 4 5 6\n', '2.0-3.0'),  # two numbers run together
  ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, shown):
  room = _write_room(tmp_path / 'Area_5', 'office_1', OFFICE_1)
  path = room / 'Annotations' / 'chair_2.txt'
  good = _lines(OFFICE_1['chair_2.txt'])
  path.write_text(good + '\n' + bad_line + good)  # the bad line is line 4 (line 3 is blank)
  with pytest.raises(BadInputError, match=r'chair_2\.txt:4: .*' + shown.replace('\\', '\\\\')):
    s3dis.read_room(room)


def test_skip_bad_lines_drops_and_counts(tmp_path, caplog):
  room = _write_room(tmp_path / 'Area_5', 'office_1', OFFICE_1)
  path = room / 'Annotations' / 'floor_1.txt'
  rows = OFFICE_1['floor_1.txt']
  path.write_text(_lines(rows[:1]) + '1 2 3\n' + _lines(rows[1:2]) + 'x y z r g b\n' + _lines(rows[2:]))
  with caplog.at_level(logging.WARNING):
    result = s3dis.read_room(room, skip_bad_lines=True)
  assert result.skipped_lines == {'floor_1.txt': 2}
  assert any(
    'dropped 2 malformed line(s)' in r.getMessage() and 'floor_1.txt' in r.getMessage() for r in caplog.records
  )
  np.testing.assert_array_equal(result.xyz[-3:], np.array(rows, np.float32)[:, :3])
  np.testing.assert_array_equal(result.instances, OFFICE_1_INSTANCES)


@pytest.mark.parametrize('block_lines', [2, 3, 4096])
def test_skip_bad_lines_across_blocks(tmp_path, monkeypatch, block_lines):
  monkeypatch.setattr(s3dis, '_BLOCK_LINES', block_lines)  # the slow path re-parses good blocks in bulk
  rng = np.random.default_rng(0)
  rows = [tuple(rng.integers(-4000, 4000, 3) / 8) + tuple(rng.integers(0, 256, 3)) for _ in range(11)]
  bad_at = {2, 3, 7, 12}  # 0-based positions of the bad lines in the written file
  text, good = [], iter(rows)
  for index in range(len(rows) + len(bad_at)):
    text.append('1 2 three 4 5 6\n' if index in bad_at else _lines([next(good)]))
  path = tmp_path / 'room_1.txt'
  path.write_text(''.join(text))
  xyz, rgb = s3dis.read_room_cloud(path, skip_bad_lines=True)
  expected = np.array(rows, np.float64)
  np.testing.assert_array_equal(xyz, expected[:, :3].astype(np.float32))
  np.testing.assert_array_equal(rgb, expected[:, 3:].astype(np.uint8))
  with pytest.raises(BadInputError, match=r'room_1\.txt:3: '):
    s3dis.read_room_cloud(path)


@pytest.mark.parametrize(
  'line, message',
  [
    ('1.0 2.0 3.0 256 0 0\n', 'colours must be integers in 0..255'),
    ('1.0 2.0 3.0 -1 0 0\n', 'colours must be integers in 0..255'),
    ('1.0 2.0 3.0 1.5 0 0\n', 'colours must be integers in 0..255'),
    ('1.0 nan 3.0 1 0 0\n', 'non-finite'),
    ('inf 2.0 3.0 1 0 0\n', 'non-finite'),
  ],
)
def test_bad_values_are_errors(tmp_path, line, message):
  path = tmp_path / 'office_1.txt'
  path.write_text('0 0 0 0 0 0\n' + line)
  with pytest.raises(BadInputError, match=r'office_1\.txt:2: ' + message):
    s3dis.read_room_cloud(path)
  with pytest.raises(BadInputError, match=message):  # skipping drops malformed lines, never bad values
    s3dis.read_room_cloud(path, skip_bad_lines=True)


def test_parser_accepts_whitespace_variants(tmp_path):
  path = tmp_path / 'office_1.txt'
  path.write_bytes(b'  1.5\t-2.25 3e-1 0 1 2\r\n\n\n-0.125 .5 7. 255 254 253')  # CRLF, tabs, no final newline
  xyz, rgb = s3dis.read_room_cloud(path)
  np.testing.assert_array_equal(xyz, np.array([[1.5, -2.25, 0.3], [-0.125, 0.5, 7.0]], np.float32))
  np.testing.assert_array_equal(rgb, [[0, 1, 2], [255, 254, 253]])


def test_copy_named_annotation_is_left_out_with_warning(s3dis_root, tmp_path, caplog):
  office = _office(s3dis_root)
  copy = office / 'Annotations' / 'chair_2 (1).txt'
  copy.write_text(_lines(OFFICE_1['chair_2.txt']))
  with caplog.at_level(logging.WARNING):
    room = s3dis.read_room(office)
  assert room.ignored_copies == ('chair_2 (1).txt',)
  assert any('chair_2 (1).txt' in r.getMessage() and 'copy of chair_2.txt' in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(room.instances, OFFICE_1_INSTANCES)
  cached = [s3dis.read_room(office, cache_dir=tmp_path / 'cache') for _ in range(2)][1]
  assert cached.ignored_copies == ('chair_2 (1).txt',)
  caplog.clear()
  s3dis.read_room(office, cache_dir=tmp_path / 'cache')
  assert len([r for r in caplog.records if 'chair_2 (1).txt' in r.getMessage()]) == 1  # said once per read
  (office / 'Annotations' / 'chair_2.txt').unlink()  # without its original, the copy is the instance
  room = s3dis.read_room(office, cache_dir=tmp_path / 'cache')
  assert room.ignored_copies == () and room.instance_classes == ('board', 'chair', 'chair', 'floor')
  np.testing.assert_array_equal(room.labels, OFFICE_1_LABELS)


def test_missing_or_empty_annotations_are_clear_errors(tmp_path):
  room = tmp_path / 'Area_5' / 'office_1'
  room.mkdir(parents=True)
  (room / 'office_1.txt').write_text(_lines(OFFICE_1['chair_1.txt']))
  with pytest.raises(BadInputError, match=r'office_1: no Annotations folder.*<class>_<k>\.txt'):
    s3dis.read_room(room)
  (room / 'Annotations').mkdir()
  with pytest.raises(BadInputError, match=r'Annotations: no <class>_<k>\.txt annotation files in room .*office_1'):
    s3dis.read_room(room)
  (room / 'Annotations' / 'chair_1.txt').write_text('\n')
  with pytest.raises(BadInputError, match=r'chair_1\.txt: no points'):
    s3dis.read_room(room)
  (room / 'Annotations' / 'chair_1.txt').write_text(_lines(OFFICE_1['chair_1.txt']))
  (room / 'Annotations' / 'chair.txt').write_text(_lines(OFFICE_1['chair_1.txt']))
  with pytest.raises(BadInputError, match=r'chair\.txt: expected an annotation file named <class>_<k>\.txt'):
    s3dis.read_room(room)


def test_cache_is_reused_and_rebuilt_when_a_source_changes(s3dis_root, tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  hallway = s3dis_root / s3dis.ALIGNED / 'Area_5' / 'hallway_2'
  fresh = s3dis.read_room(hallway, cache_dir=cache)
  assert (cache / 'Area_5' / 'hallway_2.npz').is_file()
  assert not [p for p in (cache / 'Area_5').iterdir() if p.suffix == '.tmp']

  parses = []
  real_parse = s3dis._room_from_files
  monkeypatch.setattr(s3dis, '_room_from_files', lambda *a: parses.append(a) or real_parse(*a))
  cached = s3dis.read_room(hallway, cache_dir=cache)
  assert parses == []  # served from the cache
  for field in ('xyz', 'rgb', 'labels', 'instances'):
    np.testing.assert_array_equal(getattr(cached, field), getattr(fresh, field))
    assert getattr(cached, field).dtype == getattr(fresh, field).dtype
  assert (cached.name, cached.area, cached.path) == (fresh.name, fresh.area, fresh.path)
  assert (cached.instance_classes, cached.remapped, cached.class_names) == (
    fresh.instance_classes,
    fresh.remapped,
    fresh.class_names,
  )

  wall = hallway / 'Annotations' / 'wall_1.txt'
  stat = wall.stat()
  os.utime(wall, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, content unchanged
  rebuilt = s3dis.read_room(hallway, cache_dir=cache)
  assert len(parses) == 1  # the stale cache was not trusted
  np.testing.assert_array_equal(rebuilt.xyz, fresh.xyz)
  s3dis.read_room(hallway, cache_dir=cache)
  assert len(parses) == 1  # the rebuilt cache is reused

  wall.write_text(_lines(HALLWAY_2['wall_1.txt'][:1]))  # changed content (and size)
  assert len(s3dis.read_room(hallway, cache_dir=cache).xyz) == 4 and len(parses) == 2
  remapped = s3dis.read_room(hallway, cache_dir=cache, unknown_class='wall')  # other settings, other labels
  assert len(parses) == 3
  np.testing.assert_array_equal(remapped.labels, [2, 2, 2, 2])


def test_damaged_cache_is_rebuilt(s3dis_root, tmp_path):
  cache = tmp_path / 'cache'
  office = _office(s3dis_root)
  fresh = s3dis.read_room(office, cache_dir=cache)
  (cache / 'Area_5' / 'office_1.npz').write_bytes(b'not an npz')
  again = s3dis.read_room(office, cache_dir=cache)
  np.testing.assert_array_equal(again.xyz, fresh.xyz)
  np.testing.assert_array_equal(s3dis.read_room(office, cache_dir=cache).labels, fresh.labels)
