"""Evaluation sets over OpenShape's files, as OpenShape and Uni3D read them: Objaverse-LVIS (OpenShape's
`meta_data/split/lvis.json` with its precomputed class features; Uni3D's `lvis_testset.txt` over the same per-shape
files), OpenShape's ModelNet40 (`meta_data/modelnet40/`) and ScanObjectNN (`meta_data/scanobjectnn/`) files
(OpenShape_code @abe5aa4 src/data.py ObjaverseLVIS / ModelNet40Test / ScanObjectNNTest; Uni3D @64e03c3
data/datasets.py Objaverse_lvis_openshape), and how each prepares a cloud (`eval_points`).
"""

import dataclasses
import pathlib
from typing import Any, Mapping

import numpy as np

from cg3d_jax.data.formats.pickled_npy import read_pickled, read_pickled_dict
from cg3d_jax.data.openshape import checked_cloud, oriented, read_json, read_shape_cloud, read_split
from cg3d_jax.errors import BadInputError

# OpenShape's ScanObjectNNTest class order (its labels index this list; cat_name_pt_feat.npy is keyed by these names).
SCANOBJECTNN_CLASSES = (
  'bag',
  'bin',
  'box',
  'cabinet',
  'chair',
  'desk',
  'display',
  'door',
  'shelf',
  'table',
  'bed',
  'pillow',
  'sink',
  'sofa',
  'toilet',
)


@dataclasses.dataclass
class EvalSet:
  """One evaluation split: labelled clouds and what the layout stores to score them with.

  `cloud(i)` -> (xyz (P, 3), rgb (P, 3) in [0, 1]) of example i, as stored (before sampling, axis swap, normalising);
  `class_features` (C, D) the layout's precomputed class-name text features (None where it has none); `y_up` the
  layout's axis convention as its own evaluation reads it; `replace` whether clouds are resampled with replacement
  (OpenShape's ScanObjectNN) or without (the others)."""

  name: str
  class_names: list[str]
  labels: np.ndarray
  cloud: Any
  class_features: np.ndarray | None
  y_up: bool
  replace: bool = False
  source: str = ''

  def __len__(self) -> int:
    return len(self.labels)


def _class_feature_dict(path, class_names=None) -> tuple[list[str], np.ndarray]:
  """cat_name_pt_feat.npy of ModelNet40 / ScanObjectNN: {category: {'open_clip_text_feat': (1, D)}} -> (names, (C, D))
  in the dict's order, or in `class_names`' order when given (every name must be present)."""
  table = read_pickled_dict(path)
  names = list(class_names) if class_names is not None else list(table)
  missing = [n for n in names if n not in table]
  if missing:
    raise BadInputError(path, f'has no features for {missing[:5]}; expected a key per class')
  try:
    rows = [np.asarray(table[n]['open_clip_text_feat'], np.float32).reshape(-1) for n in names]
  except (TypeError, KeyError, IndexError):
    raise BadInputError(path, "expected {category: {'open_clip_text_feat': (1, D) array}}") from None
  return names, _checked_features(np.stack(rows), path, len(names))


def _checked_features(table, path, num_classes: int) -> np.ndarray:
  table = np.asarray(table, np.float32)
  if table.ndim != 2 or table.shape[0] != num_classes:
    raise BadInputError(path, f'holds features of shape {table.shape}, expected ({num_classes}, D): one row per class')
  if not np.all(np.isfinite(table)):
    raise BadInputError(path, 'holds NaN or infinity')
  return table


def lvis_openshape(
  root, split: str = 'meta_data/split/lvis.json', features: str | None = 'meta_data/lvis_cat_name_pt_feat.npy'
) -> EvalSet:
  """Objaverse-LVIS as OpenShape evaluates it: lvis.json, categories = sorted unique names (1,156), the features of
  `features` (C, D) in that order; stored y-up (OpenShape swaps y and z)."""
  root = pathlib.Path(root)
  shapes = read_split(root / split, root, lvis=True)
  if not shapes:
    raise BadInputError(root / split, 'lists no shape')
  names = sorted({s.category for s in shapes})
  index = {n: i for i, n in enumerate(names)}
  table = None
  if features:
    table = _checked_features(np.load(root / features, allow_pickle=False), root / features, len(names))
  return EvalSet(
    name='objaverse_lvis',
    class_names=names,
    labels=np.array([index[s.category] for s in shapes]),
    cloud=lambda i: read_shape_cloud(shapes[i].path),
    class_features=table,
    y_up=True,
    source=str(root / split),
  )


def lvis_uni3d(list_file, root=None) -> EvalSet:
  """Objaverse-LVIS as Uni3D evaluates it: lvis_testset.txt lines `cate_id,cate_name,model_id,point_path` over the
  same pickled dicts (point_path under `root`, default the list's folder); classes by cate_id; no precomputed
  features (Uni3D prompts its CLIP with the 64 templates); stored axes fed as they are (Uni3D without
  --openshape_setting)."""
  list_file = pathlib.Path(list_file)
  root = pathlib.Path(root) if root is not None else list_file.parent
  try:
    lines = [line.strip() for line in list_file.read_text(encoding='utf-8').splitlines() if line.strip()]
  except FileNotFoundError:
    raise BadInputError(list_file, 'is missing') from None
  except (OSError, UnicodeDecodeError) as err:
    raise BadInputError(list_file, f'is not readable ({err})') from None
  names: dict[int, str] = {}
  labels, paths = [], []
  for n, line in enumerate(lines, 1):
    parts = line.split(',')
    if len(parts) != 4 or not parts[0].strip().isdigit():
      raise BadInputError(list_file, f'line {n} is {line!r:.120}, expected cate_id,cate_name,model_id,point_path')
    cate_id, name = int(parts[0]), parts[1]
    if names.setdefault(cate_id, name) != name:
      raise BadInputError(list_file, f'line {n}: class {cate_id} is {name!r} here and {names[cate_id]!r} before')
    labels.append(cate_id)
    paths.append(root / parts[3].strip().lstrip('/'))
  if not labels:
    raise BadInputError(list_file, 'lists no shape')
  if sorted(names) != list(range(len(names))):
    raise BadInputError(
      list_file,
      f'class ids are not 0..{len(names) - 1} (found {len(names)} ids up to {max(names)}); expected one id per class',
    )
  return EvalSet(
    name='objaverse_lvis',
    class_names=[names[i] for i in range(len(names))],
    labels=np.array(labels),
    cloud=lambda i: read_shape_cloud(paths[i]),
    class_features=None,
    y_up=False,
    source=str(list_file),
  )


def modelnet40_openshape(root) -> EvalSet:
  """OpenShape's ModelNet40: meta_data/modelnet40/test_pc.npy (an object array of {'xyz', 'rgb' (0-255)} dicts),
  test_split.json ([{'name', 'category'}]), cat_name_pt_feat.npy (classes in its key order); stored y-up."""
  folder = pathlib.Path(root) / 'meta_data' / 'modelnet40'
  split = read_json(folder / 'test_split.json')
  if not isinstance(split, list) or not all(isinstance(e, Mapping) and 'category' in e for e in split):
    raise BadInputError(folder / 'test_split.json', "expected a list of {'name', 'category'}")
  clouds = read_pickled(folder / 'test_pc.npy')
  if not isinstance(clouds, np.ndarray) or clouds.ndim != 1 or len(clouds) != len(split):
    count = len(clouds) if hasattr(clouds, '__len__') else '?'
    raise BadInputError(
      folder / 'test_pc.npy',
      f'holds a {type(clouds).__name__} of {count} items, expected one '
      f'dict per entry of test_split.json ({len(split)})',
    )
  names, table = _class_feature_dict(folder / 'cat_name_pt_feat.npy')
  index = {n: i for i, n in enumerate(names)}
  unknown = sorted({e['category'] for e in split} - set(index))
  if unknown:
    raise BadInputError(folder / 'test_split.json', f'names categories without features: {unknown[:5]}')

  def cloud(i):
    item = clouds[i]
    if not isinstance(item, Mapping) or 'xyz' not in item:
      raise BadInputError(folder / 'test_pc.npy', f'item {i} is not a dict with xyz')
    rgb = None if item.get('rgb') is None else np.asarray(item['rgb'], np.float32) / 255.0  # stored 0-255
    return checked_cloud(item['xyz'], rgb, f'{folder / "test_pc.npy"} item {i}')

  return EvalSet(
    name='modelnet40_openshape',
    class_names=names,
    labels=np.array([index[e['category']] for e in split]),
    cloud=cloud,
    class_features=table,
    y_up=True,
    source=str(folder),
  )


def scanobjectnn_openshape(root) -> EvalSet:
  """OpenShape's ScanObjectNN: meta_data/scanobjectnn/xyz_label.npy ({'xyz', 'label', optional 'rgb'}; no rgb ->
  0.4) and cat_name_pt_feat.npy, its 15 classes in OpenShape's order; resampled with replacement; y-up."""
  folder = pathlib.Path(root) / 'meta_data' / 'scanobjectnn'
  data = read_pickled_dict(folder / 'xyz_label.npy')
  if 'xyz' not in data or 'label' not in data or len(data['xyz']) != len(data['label']):
    raise BadInputError(folder / 'xyz_label.npy', "expected {'xyz': clouds, 'label': one per cloud[, 'rgb']}")
  labels = np.asarray(data['label']).astype(np.int64).reshape(-1)
  if labels.size and (labels.min() < 0 or labels.max() >= len(SCANOBJECTNN_CLASSES)):
    raise BadInputError(folder / 'xyz_label.npy', f'labels span {labels.min()}..{labels.max()}, expected 0..14')
  names, table = _class_feature_dict(folder / 'cat_name_pt_feat.npy', SCANOBJECTNN_CLASSES)
  rgb = data.get('rgb')
  return EvalSet(
    name='scanobjectnn_openshape',
    class_names=names,
    labels=labels,
    cloud=lambda i: checked_cloud(
      data['xyz'][i], None if rgb is None else rgb[i], f'{folder / "xyz_label.npy"} cloud {i}'
    ),
    class_features=table,
    y_up=True,
    replace=True,
    source=str(folder),
  )


def eval_points(
  xyz: np.ndarray,
  rgb: np.ndarray,
  num_points: int,
  rng: np.random.Generator,
  *,
  y_up: bool,
  use_color: bool,
  replace: bool = False,
  path=None,
) -> np.ndarray:
  """An evaluation cloud as OpenShape's test sets prepare it: `num_points` drawn (without replacement, or with it
  when `replace` and the count differs), y/z swapped when stored y-up, unit sphere; (num_points, 6 | 3) float32."""
  n = len(xyz)
  if replace:
    chosen = rng.choice(n, num_points) if n != num_points else np.arange(n)
  else:
    if n < num_points:
      raise BadInputError(path or 'cloud', f'has {n} points, fewer than num_points={num_points}')
    chosen = rng.choice(n, num_points, replace=False) if n != num_points else np.arange(n)
  xyz, rgb = oriented(xyz[chosen], y_up=y_up, path=path or 'cloud'), rgb[chosen]
  return np.concatenate([xyz, rgb], axis=1).astype(np.float32) if use_color else xyz.astype(np.float32)
