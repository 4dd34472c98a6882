"""S3DIS (Stanford 3D Indoor Scenes) rooms in the official layout, read with per-point class and instance labels.

    <root>/Stanford3dDataset_v1.2_Aligned_Version/Area_N/<room>/<room>.txt                 whole room, `x y z r g b`
    <root>/Stanford3dDataset_v1.2_Aligned_Version/Area_N/<room>/Annotations/<class>_<k>.txt one object instance each

A labelled room is the concatenation of its annotation files in file-name order, as every S3DIS pipeline builds it
(PointNet's collect_indoor3d_data.py); the `<room>.txt` file holds the same points without labels and is what
`read_room_cloud` reads. Every failure is a `BadInputError` (a ValueError) naming the file, and the line for text.

Parsing is vectorised (a room has up to ~2 M lines): numpy parses the whole file at once and a byte-level token
count proves every non-empty line held exactly six numbers. A file that fails that proof is parsed again in blocks
of lines, and only a failing block goes line by line through the shared text-row parser
(data/formats/text_rows.py), to name its first bad line (or, with `skip_bad_lines`, to drop the bad lines and say
how many). Measured on this project's 2-core CPU box: ~0.4-0.7 M lines/s.
"""

import dataclasses
import io
import json
import logging
import pathlib
import re

import numpy as np

from cg3d_jax import atomic
from cg3d_jax.data.formats import text_rows
from cg3d_jax.errors import BadInputError

log = logging.getLogger(__name__)

# The official 13 classes in PointNet's g_classes order (indoor3d_util.py); label i is S3DIS_CLASSES[i].
S3DIS_CLASSES = (
  'ceiling',
  'floor',
  'wall',
  'beam',
  'column',
  'window',
  'door',
  'table',
  'chair',
  'sofa',
  'bookcase',
  'board',
  'clutter',
)
ALIGNED = 'Stanford3dDataset_v1.2_Aligned_Version'
ANNOTATIONS = 'Annotations'

_COLUMNS = 6
_ANNOTATION_NAME = re.compile(r'^(?P<cls>.+)_(?P<k>\d+)( \(\d+\))?\.txt$')
# A file manager's copy name, `wall_3 (1).txt`: the real Area_5/office_36 holds one beside wall_3.txt.
_COPY_NAME = re.compile(r'^(?P<original>.+_\d+) \(\d+\)\.txt$')
_AREA_NAME = re.compile(r'^Area_(?P<n>\d+)$')
_CACHE_VERSION = 1
_SHOWN_LINE_CHARS = 200
_BLOCK_LINES = 4096  # slow path: lines re-parsed together before a block is scanned line by line

# Bytes that separate numbers; everything else is part of a token (a NUL byte too, as in the real
# Area_5/hallway_6/Annotations/ceiling_1.txt, so that such a line is found and reported).
_IS_SPACE = np.zeros(256, dtype=bool)
_IS_SPACE[list(b' \t\n\r\v\f')] = True


@dataclasses.dataclass
class Room:
  """One labelled room; labels index `class_names`, instances number the annotation files in file-name order."""

  name: str
  area: str
  path: pathlib.Path
  xyz: np.ndarray  # (N, 3) float32
  rgb: np.ndarray  # (N, 3) uint8
  labels: np.ndarray  # (N,) int32
  instances: np.ndarray  # (N,) int32
  class_names: tuple[str, ...]
  instance_classes: tuple[str, ...]
  remapped: dict[str, int]  # annotation class not in class_names -> points given the fallback class
  skipped_lines: dict[str, int] = dataclasses.field(default_factory=dict)  # file name -> bad lines dropped
  ignored_copies: tuple[str, ...] = ()  # `<class>_<k> (n).txt` files left out because `<class>_<k>.txt` exists

  def present_classes(self) -> list[str]:
    """Sorted names of the classes that have at least one point in this room."""
    counts = np.bincount(self.labels, minlength=len(self.class_names))
    return sorted(name for name, count in zip(self.class_names, counts) if count > 0)


# ---------------------------------------------------------------------------------------------------- parsing


def _show_line(line: bytes) -> str:
  text = line.decode('latin-1').rstrip('\r')
  if len(text) > _SHOWN_LINE_CHARS:
    text = text[:_SHOWN_LINE_CHARS] + '...'
  return repr(text)


def _parse_fast(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
  """(values (n, 6), 0-based line index of each row), or None when some non-empty line is not six numbers."""
  buffer = np.frombuffer(data, dtype=np.uint8)
  space = _IS_SPACE[buffer]
  token_starts = np.flatnonzero(~space & np.concatenate([[True], space[:-1]]))
  if not token_starts.size:
    return np.zeros((0, _COLUMNS)), np.zeros((0,), np.int64)
  if token_starts.size % _COLUMNS:
    return None
  line_of_token = np.searchsorted(np.flatnonzero(buffer == ord('\n')), token_starts).reshape(-1, _COLUMNS)
  # Six tokens per non-empty line: each row of six tokens sits on one line, and consecutive rows on different lines.
  if (line_of_token != line_of_token[:, :1]).any() or (np.diff(line_of_token[:, 0]) <= 0).any():
    return None
  try:
    values = np.fromstring(data, dtype=np.float64, sep=' ')  # raises on any token that is not a number
  except ValueError:
    return None
  # numpy requires whitespace between numbers (so `2.0-3.0` raises); equal counts make one number per token a fact
  # checked here rather than a property of numpy's separator matching assumed.
  if values.size != token_starts.size:
    return None
  return values.reshape(-1, _COLUMNS), line_of_token[:, 0]


def _parse_by_line(path: pathlib.Path, data: bytes, skip_bad_lines: bool) -> tuple[np.ndarray, np.ndarray, int]:
  """The slow path: (values (n, 6), line indices, bad lines dropped); raises at the first bad line unless skipping.

  Blocks of lines go through the fast parser; only a block that fails it goes line by line through the shared text-row
  parser (text_rows.parse_rows).
  """
  lines = data.split(b'\n')
  values, line_indices, bad = [], [], []
  for first in range(0, len(lines), _BLOCK_LINES):
    block = lines[first : first + _BLOCK_LINES]
    parsed = _parse_fast(b'\n'.join(block))
    if parsed is not None:
      values.append(parsed[0])
      line_indices.append(parsed[1] + first)
      continue
    rows = text_rows.parse_rows(
      path,
      block,
      range(first + 1, first + len(block) + 1),
      separator=text_rows.SPACES,
      columns=_COLUMNS,
      error=lambda row: BadInputError(
        f'{path}:{row.line_number}: expected 6 numbers `x y z r g b`, got {_show_line(row.line)}'
      ),
      skipped=bad if skip_bad_lines else None,
      numpy_first=False,  # _parse_fast, faster on bytes, has refused this block
    )
    values.append(rows.values)
    line_indices.append(rows.line_numbers - 1)
  if bad:
    log.warning(
      '%s: skip_bad_lines: dropped %d malformed line(s); first at line %d: %s',
      path,
      len(bad),
      bad[0].line_number,
      _show_line(bad[0].line),
    )
  if not values:
    return np.zeros((0, _COLUMNS)), np.zeros((0,), np.int64), len(bad)
  return np.concatenate(values), np.concatenate(line_indices), len(bad)


def parse_xyzrgb(path, data: bytes, *, skip_bad_lines: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
  """Text of `x y z r g b` lines -> (xyz (N, 3) float32, rgb (N, 3) uint8, number of bad lines dropped)."""
  path = pathlib.Path(path)
  parsed = _parse_fast(data)
  dropped = 0
  if parsed is None:
    values, line_indices, dropped = _parse_by_line(path, data, skip_bad_lines)
  else:
    values, line_indices = parsed
  if not len(values):
    raise BadInputError(f'{path}: no points (expected lines of `x y z r g b`)')
  finite = np.isfinite(values).all(axis=1)
  if not finite.all():
    row = int(np.argmin(finite))
    raise BadInputError(f'{path}:{line_indices[row] + 1}: non-finite value (NaN or Inf): {values[row].tolist()}')
  colours = values[:, 3:]
  colour_ok = ((colours >= 0) & (colours <= 255) & (colours == np.round(colours))).all(axis=1)
  if not colour_ok.all():
    row = int(np.argmin(colour_ok))
    raise BadInputError(
      f'{path}:{line_indices[row] + 1}: colours must be integers in 0..255, got {colours[row].tolist()}'
    )
  return values[:, :3].astype(np.float32), colours.astype(np.uint8), dropped


def _read_points_file(path: pathlib.Path, skip_bad_lines: bool) -> tuple[np.ndarray, np.ndarray, int]:
  if not path.is_file():
    raise BadInputError(f'{path}: file not found')
  return parse_xyzrgb(path, path.read_bytes(), skip_bad_lines=skip_bad_lines)


# ---------------------------------------------------------------------------------------------------- layout


def _whole_room_file(room_dir: pathlib.Path) -> pathlib.Path | None:
  """`<room>/<room>.txt`; else the folder's only .txt (the real Area_6/copyRoom_1 holds copy_Room_1.txt)."""
  expected = room_dir / f'{room_dir.name}.txt'
  if expected.is_file():
    return expected
  candidates = sorted(p for p in room_dir.glob('*.txt') if p.is_file())
  return candidates[0] if len(candidates) == 1 else None


def is_room_folder(path) -> bool:
  """A folder holding `<name>.txt` (or a single .txt) or an Annotations folder."""
  path = pathlib.Path(path)
  return path.is_dir() and ((path / ANNOTATIONS).is_dir() or _whole_room_file(path) is not None)


def read_room_cloud(path, *, skip_bad_lines: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """The unlabelled room: xyz (N, 3) float32 and rgb (N, 3) uint8 of `<room>.txt` (a room folder or the file)."""
  path = pathlib.Path(path)
  if path.is_dir():
    room_file = _whole_room_file(path)
    if room_file is None:
      raise BadInputError(f'{path}: expected the room file {path.name}.txt (lines `x y z r g b`) in this folder')
    path = room_file
  xyz, rgb, _ = _read_points_file(path, skip_bad_lines)
  return xyz, rgb


def _aligned_folder(root) -> pathlib.Path:
  root = pathlib.Path(root)
  if not root.is_dir():
    raise BadInputError(f'{root}: S3DIS root folder not found')
  if (root / ALIGNED).is_dir():
    return root / ALIGNED
  if root.name == ALIGNED:
    return root
  raise BadInputError(
    f'{root}: expected the folder {ALIGNED} here, or this to be that folder; found '
    f'{sorted(p.name for p in root.iterdir())[:20]}'
  )


def _area_name(area) -> str:
  if isinstance(area, (int, np.integer)) and not isinstance(area, bool):
    return f'Area_{int(area)}'
  if isinstance(area, str):
    if _AREA_NAME.match(area):
      return area
    if area.isdigit():
      return f'Area_{area}'
  raise ValueError(f'area {area!r}: expected an area number such as 5 or a name such as "Area_5"')


def list_rooms(root, areas=(5,)) -> list[pathlib.Path]:
  """Sorted room folders of `areas` (numbers or 'Area_N' names; None for every area) under an S3DIS root."""
  if isinstance(areas, (str, int)):
    areas = (areas,)
  names = None if areas is None else [_area_name(a) for a in areas]
  aligned = _aligned_folder(root)
  existing = sorted(
    (p.name for p in aligned.iterdir() if p.is_dir() and _AREA_NAME.match(p.name)),
    key=lambda name: int(name.split('_')[1]),
  )
  names = existing if names is None else names
  rooms = []
  for name in names:
    area_dir = aligned / name
    if name not in existing:
      raise BadInputError(f'{area_dir}: area folder not found; existing areas: {existing or "none"}')
    area_rooms = sorted(p for p in area_dir.iterdir() if is_room_folder(p))
    if not area_rooms:
      raise BadInputError(f'{area_dir}: no room folders (expected <room>/<room>.txt or <room>/{ANNOTATIONS}/)')
    rooms.extend(area_rooms)
  return rooms


def _annotation_files(room_dir: pathlib.Path) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """(instance files sorted by name, copies left out): a copy-named file whose original exists is not an instance.

  Counting such a copy would give the object's points twice, as two instances; the pipelines that noticed the real
  one (torch-points3d, superpoint_transformer) drop it, and so does this reader, with a warning.
  """
  folder = room_dir / ANNOTATIONS
  if not folder.is_dir():
    raise BadInputError(
      f'{room_dir}: no {ANNOTATIONS} folder; a labelled S3DIS room needs '
      f'{ANNOTATIONS}/<class>_<k>.txt files (one per object instance)'
    )
  files = sorted((p for p in folder.iterdir() if p.suffix == '.txt' and p.is_file()), key=lambda p: p.name)
  if not files:
    raise BadInputError(f'{folder}: no <class>_<k>.txt annotation files in room {room_dir}')
  names = {p.name for p in files}
  copies = [p for p in files if (m := _COPY_NAME.match(p.name)) and f'{m["original"]}.txt' in names]
  return [p for p in files if p not in copies], copies


# ---------------------------------------------------------------------------------------------------- rooms


def _room_from_files(room_dir, area, files, copies, class_names, unknown_class, skip_bad_lines) -> Room:
  for copy in copies:
    log.warning(
      '%s: left out as a copy of %s.txt (its points would count twice)', copy, _COPY_NAME.match(copy.name)['original']
    )
  class_index = {name: i for i, name in enumerate(class_names)}
  xyz_parts, rgb_parts, label_parts, instance_parts = [], [], [], []
  instance_classes, remapped, skipped = [], {}, {}
  for instance, path in enumerate(files):
    match = _ANNOTATION_NAME.match(path.name)
    if not match:
      raise BadInputError(f'{path}: expected an annotation file named <class>_<k>.txt')
    cls = match['cls']
    xyz, rgb, dropped = _read_points_file(path, skip_bad_lines)
    if cls not in class_index:
      if unknown_class is None:
        raise BadInputError(f'{path}: class {cls!r} is not one of {list(class_names)}')
      remapped[cls] = remapped.get(cls, 0) + len(xyz)
      label = class_index[unknown_class]
    else:
      label = class_index[cls]
    if dropped:
      skipped[path.name] = dropped
    xyz_parts.append(xyz)
    rgb_parts.append(rgb)
    label_parts.append(np.full(len(xyz), label, np.int32))
    instance_parts.append(np.full(len(xyz), instance, np.int32))
    instance_classes.append(cls)
  for cls, count in remapped.items():
    log.warning(
      '%s: class %r is not in the class list; its %d point(s) are labelled %r', room_dir, cls, count, unknown_class
    )
  return Room(
    name=room_dir.name,
    area=area,
    path=room_dir,
    xyz=np.concatenate(xyz_parts),
    rgb=np.concatenate(rgb_parts),
    labels=np.concatenate(label_parts),
    instances=np.concatenate(instance_parts),
    class_names=tuple(class_names),
    instance_classes=tuple(instance_classes),
    remapped=remapped,
    skipped_lines=skipped,
    ignored_copies=tuple(p.name for p in copies),
  )


def _cache_key(area, room_dir, files, class_names, unknown_class, skip_bad_lines) -> str:
  sources = []
  for path in files:
    stat = path.stat()
    sources.append([path.name, stat.st_size, stat.st_mtime_ns])
  return json.dumps(
    {
      'version': _CACHE_VERSION,
      'area': area,
      'room': room_dir.name,
      'folder': str(room_dir.resolve()),
      'sources': sources,
      'class_names': list(class_names),
      'unknown_class': unknown_class,
      'skip_bad_lines': bool(skip_bad_lines),
    },
    sort_keys=True,
  )


def _load_cached(cache_path: pathlib.Path, key: str, room_dir: pathlib.Path, class_names) -> Room | None:
  if not cache_path.is_file():
    return None
  try:
    with np.load(cache_path, allow_pickle=False) as stored:
      if str(stored['key']) != key:
        log.info('%s: cache is stale (sources or settings changed); rebuilding', cache_path)
        return None
      meta = json.loads(str(stored['meta']))
      arrays = {name: stored[name] for name in ('xyz', 'rgb', 'labels', 'instances')}
  except Exception as e:  # a damaged cache file is rebuilt, never trusted
    log.warning('%s: unreadable cache (%s: %s); rebuilding', cache_path, type(e).__name__, e)
    return None
  room = Room(
    name=room_dir.name,
    area=meta['area'],
    path=room_dir,
    class_names=tuple(class_names),
    instance_classes=tuple(meta['instance_classes']),
    remapped=meta['remapped'],
    skipped_lines=meta['skipped_lines'],
    ignored_copies=tuple(meta['ignored_copies']),
    **arrays,
  )
  # The warnings of the first read are repeated, so that a cached read is no quieter than a fresh one.
  for cls, count in room.remapped.items():
    log.warning(
      '%s: class %r is not in the class list; its %d point(s) are labelled %r (cached)',
      room_dir,
      cls,
      count,
      meta['unknown_class'],
    )
  for name, count in room.skipped_lines.items():
    log.warning('%s: skip_bad_lines: dropped %d malformed line(s) (cached)', room_dir / ANNOTATIONS / name, count)
  for name in room.ignored_copies:
    log.warning('%s: left out as a copy of another annotation file (cached)', room_dir / ANNOTATIONS / name)
  return room


def _store_cached(cache_path: pathlib.Path, key: str, room: Room, unknown_class) -> None:
  meta = {
    'area': room.area,
    'instance_classes': list(room.instance_classes),
    'remapped': room.remapped,
    'skipped_lines': room.skipped_lines,
    'ignored_copies': list(room.ignored_copies),
    'unknown_class': unknown_class,
  }
  buffer = io.BytesIO()
  np.savez(
    buffer,
    key=np.array(key),
    meta=np.array(json.dumps(meta)),
    xyz=room.xyz,
    rgb=room.rgb,
    labels=room.labels,
    instances=room.instances,
  )
  atomic.atomic_write_bytes(cache_path, buffer.getvalue())


def read_room(
  room_dir,
  *,
  class_names=S3DIS_CLASSES,
  unknown_class: str | None = 'clutter',
  skip_bad_lines: bool = False,
  cache_dir=None,
) -> Room:
  """A labelled room from its Annotations/<class>_<k>.txt files (concatenated in file-name order).

  An annotation class missing from `class_names` (the real data has a few `stairs`) is labelled `unknown_class`,
  with a warning and a count in `Room.remapped`; `unknown_class=None` makes it an error. A copy-named file
  (`wall_3 (1).txt` beside `wall_3.txt`, as in the real Area_5/office_36) is left out with a warning and listed in
  `Room.ignored_copies`. With `cache_dir`, the parsed
  room is kept as `<cache_dir>/<area>/<room>.npz`, keyed by the room folder, the sources' names, sizes and mtimes and
  the settings; a cache whose key differs is rebuilt.
  """
  room_dir = pathlib.Path(room_dir)
  if not room_dir.is_dir():
    raise BadInputError(f'{room_dir}: room folder not found')
  class_names = tuple(class_names)
  if unknown_class is not None and unknown_class not in class_names:
    raise ValueError(f'unknown_class={unknown_class!r} is not one of class_names {list(class_names)}')
  area = room_dir.parent.name
  files, copies = _annotation_files(room_dir)
  if cache_dir is None:
    return _room_from_files(room_dir, area, files, copies, class_names, unknown_class, skip_bad_lines)
  cache_path = pathlib.Path(cache_dir) / area / f'{room_dir.name}.npz'
  key = _cache_key(area, room_dir, sorted(files + copies), class_names, unknown_class, skip_bad_lines)
  room = _load_cached(cache_path, key, room_dir, class_names)
  if room is None:
    room = _room_from_files(room_dir, area, files, copies, class_names, unknown_class, skip_bad_lines)
    _store_cached(cache_path, key, room, unknown_class)
  return room
