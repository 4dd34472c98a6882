"""OpenShape's data layout (Objaverse, ShapeNet, 3D-FUTURE, ABO; OpenShape_code @abe5aa4, src/data.py) and its
per-sample target sampling and augmentation, exactly as its `Four` training dataset does them.

Layout:
  meta_data/split/{train_all,train_no_lvis}.json, meta_data/split/ablation/train_shapenet_only.json
      lists of {"id", "dataset" ("Objaverse" | "ShapeNet" | "3D-FUTURE" | "ABO"), "group", "data_path"}
  meta_data/gpt4_filtering.json            {uid: {"flag": "Y" | "N", "name": ...}}
  meta_data/split/lvis.json                lists of {"uid", "category", "group", "data_path"} (1,156 categories)
  one .npy per shape (data_path): a pickled dict, read with data/formats/pickled_npy.py (never np.load(allow_pickle)):
      xyz (N, 3) in [-1, 1], stored y-up; rgb (N, 3) in [0, 1]; image_feat (12, D) views; thumbnail_feat (D,)
      (Objaverse); text [str]; text_feat [{'original': (D,), 'prompt_avg': (D,)}]; blip_caption str,
      blip_caption_feat {'original', 'prompt_avg'}; msft_caption, msft_caption_feat likewise; retrieval_text [str],
      retrieval_text_feat [{'original': ...}]. D = 1280 for OpenShape's OpenCLIP ViT-bigG-14.

Per sample (OpenShape's get_objaverse / get_others): `num_points` points drawn without replacement; y and z
swapped when the data is y-up (OpenShape: yes; Uni3D and ULIP-2 feed the stored axes: `y_up` records the
convention); centred and scaled to the unit sphere; in training, point dropout (up to 0.875 of the points replaced
by the first one), scale U[0.8, 1.25], shift U[-0.1, 0.1], a small rotation (angles N(0, 0.06) clipped at 0.18,
R = Rz Ry Rx), then a full rotation about z; rgb replaced by 0.4 with probability 0.5. Text target: the candidates
are the first `text` (Objaverse, unless GPT-4 flagged it "N") or a random `text` (the other datasets), one caption
(BLIP or MSFT with probability 0.5 each, none if the chosen one is empty), one random retrieval text (its 'original'
feature: OpenShape uses no prompt engineering there); one candidate is chosen uniformly; a shape with no candidate
has no text target. Image target: Objaverse: the thumbnail with probability 0.5, else a random view; others: a
random view.
"""

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import numpy as np

from cg3d_jax.data.formats.pickled_npy import read_pickled_dict
from cg3d_jax.data.formats.readers import read_image
from cg3d_jax.data.host_transforms import normalize_unit_sphere_np
from cg3d_jax.errors import BadInputError

OBJAVERSE = 'Objaverse'
SPLIT_KEYS = ('id', 'dataset', 'group', 'data_path')
LVIS_KEYS = ('uid', 'category', 'group', 'data_path')
RGB_DROP_VALUE = 0.4
RENDER_VIEWS = 12  # OpenShape's renders: rendered_images/<uid>/colors_{0..11}.png (336 px)


@dataclasses.dataclass(frozen=True)
class Shape:
  """One entry of a split file."""

  id: str
  dataset: str
  group: str
  path: pathlib.Path
  category: str | None = None  # LVIS entries only


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """OpenShape's train.yaml `dataset` block (defaults = its released configuration)."""

  num_points: int = 10000
  y_up: bool = True
  normalize: bool = True
  augment: bool = True
  random_z_rotate: bool = True
  use_color: bool = True
  rgb_random_drop_prob: float = 0.5
  text_source: tuple[str, ...] = ('text', 'caption', 'retrieval_text')
  use_text_filtering: bool = True
  text_version: str = 'prompt_avg'  # use_prompt_engineering=True


def read_json(path) -> Any:
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except FileNotFoundError:
    raise BadInputError(path, 'is missing') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise BadInputError(path, f'is not readable JSON ({err})') from None


def read_split(path, root=None, *, lvis: bool = False) -> list[Shape]:
  """A split file (training: id/dataset/group/data_path; `lvis`: uid/category/group/data_path) as Shapes, data paths
  resolved against `root` (default: the folder holding meta_data/, i.e. the split file's grandparent's parent)."""
  path = pathlib.Path(path)
  entries = read_json(path)
  keys = LVIS_KEYS if lvis else SPLIT_KEYS
  if not isinstance(entries, list):
    raise BadInputError(path, f'holds a {type(entries).__name__}, expected a list of {{{", ".join(keys)}}}')
  root = pathlib.Path(root) if root is not None else _layout_root(path)
  shapes = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, Mapping) or any(k not in entry for k in keys):
      raise BadInputError(path, f'entry {i} is {entry!r:.120}, expected the keys {list(keys)}')
    data_path = pathlib.Path(entry['data_path'])
    shapes.append(
      Shape(
        id=str(entry['uid' if lvis else 'id']),
        dataset=OBJAVERSE if lvis else str(entry['dataset']),
        group=str(entry['group']),
        path=data_path if data_path.is_absolute() else root / data_path,
        category=str(entry['category']) if lvis else None,
      )
    )
  return shapes


def _layout_root(split_path: pathlib.Path) -> pathlib.Path:
  """OpenShape's data paths are relative to the folder that holds meta_data/."""
  for parent in split_path.resolve().parents:
    if parent.name == 'meta_data':
      return parent.parent
  return split_path.resolve().parent


def read_text_filter(path) -> dict[str, str]:
  """gpt4_filtering.json -> {uid: flag}; a flag of "N" drops the Objaverse name as a text target."""
  table = read_json(path)
  if not isinstance(table, Mapping):
    raise BadInputError(path, 'expected {uid: {"flag": ..., "name": ...}}')
  try:
    return {str(uid): str(value['flag']) for uid, value in table.items()}
  except (TypeError, KeyError):
    raise BadInputError(path, 'an entry has no "flag"; expected {uid: {"flag": ..., "name": ...}}') from None


def _require(data: Mapping, keys, path) -> None:
  for key in keys:
    if key not in data:
      raise BadInputError(path, f'has no {key!r} (keys: {sorted(data)}); expected the OpenShape layout')


def checked_cloud(xyz, rgb, path) -> tuple[np.ndarray, np.ndarray]:
  """(xyz, rgb) as float32 (N, 3) arrays, both finite; rgb None -> OpenShape's grey 0.4."""
  xyz = np.asarray(xyz, np.float32)
  rgb = np.full_like(xyz, RGB_DROP_VALUE) if rgb is None else np.asarray(rgb, np.float32)
  if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
    raise BadInputError(path, f'xyz {xyz.shape} and rgb {rgb.shape}: expected two (N, 3) arrays')
  if not (np.all(np.isfinite(xyz)) and np.all(np.isfinite(rgb))):
    raise BadInputError(path, 'xyz or rgb holds NaN or infinity')
  return xyz, rgb


def read_shape(path, *, objaverse: bool) -> dict:
  """One shape's dict, its point arrays checked (shapes, finiteness); the feature fields are checked where used."""
  data = read_pickled_dict(path)
  _require(data, ('xyz', 'rgb', 'image_feat') + (('thumbnail_feat',) if objaverse else ()), path)
  checked_cloud(data['xyz'], data['rgb'], path)
  if np.asarray(data['image_feat']).ndim != 2:
    raise BadInputError(path, f'image_feat has shape {np.shape(data["image_feat"])}, expected (views, D)')
  return data


def read_shape_cloud(path) -> tuple[np.ndarray, np.ndarray]:
  """A shape's (xyz, rgb) alone, checked: what evaluation reads of the same files."""
  data = read_pickled_dict(path)
  _require(data, ('xyz', 'rgb'), path)
  return checked_cloud(data['xyz'], data['rgb'], path)


def oriented(xyz, *, y_up: bool, normalize: bool = True, path=None) -> np.ndarray:
  """A float32 copy of xyz as the model sees it: y and z swapped when stored y-up, centred and scaled to the unit
  sphere (a cloud whose points all coincide is an error here, not OpenShape's silent zeros)."""
  xyz = np.array(xyz, np.float32)
  if y_up:
    xyz[:, [1, 2]] = xyz[:, [2, 1]]
  if normalize:
    try:
      xyz = normalize_unit_sphere_np(xyz)
    except ValueError as err:
      raise BadInputError(path or 'shape', str(err)) from None
  return xyz


# --- per-sample sampling (OpenShape's Four dataset, with an explicit generator) ------------------------------------


def augment_pc(xyz: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Point dropout to the first point, scale, shift and a small rotation (OpenShape's utils/data.augment_pc)."""
  xyz = xyz.copy()
  ratio = rng.random() * 0.875
  dropped = np.nonzero(rng.random(len(xyz)) <= ratio)[0]
  xyz[dropped] = xyz[0]
  xyz = xyz * rng.uniform(0.8, 1.25) + rng.uniform(-0.1, 0.1, 3)
  ax, ay, az = np.clip(0.06 * rng.standard_normal(3), -0.18, 0.18)
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return (xyz @ (rz @ ry @ rx)).astype(np.float32)


def rotate_z(xyz: np.ndarray, theta: float) -> np.ndarray:
  rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
  return xyz @ rotation


def sample_points(
  data: Mapping[str, Any], config: SampleConfig, rng: np.random.Generator, *, train: bool, path=None
) -> np.ndarray:
  """(num_points, 6) float32 [xyz | rgb] (or (num_points, 3) without colour), z-up when the data is y-up."""
  xyz, rgb = np.asarray(data['xyz'], np.float32), np.asarray(data['rgb'], np.float32)
  if len(xyz) < config.num_points:
    raise BadInputError(path or 'shape', f'has {len(xyz)} points, fewer than num_points={config.num_points}')
  chosen = rng.choice(len(xyz), config.num_points, replace=False)
  xyz, rgb = oriented(xyz[chosen], y_up=config.y_up, normalize=config.normalize, path=path), rgb[chosen]
  if train and config.augment:
    xyz = augment_pc(xyz, rng)
  if train and config.random_z_rotate:
    xyz = rotate_z(xyz, rng.uniform(0, 2 * np.pi))
  if not config.use_color:
    return xyz.astype(np.float32)
  if train and rng.random() < config.rgb_random_drop_prob:
    rgb = np.full_like(rgb, RGB_DROP_VALUE)
  return np.concatenate([xyz, rgb], axis=1).astype(np.float32)


def _feature(value, path, what: str) -> np.ndarray:
  feature = np.asarray(value, np.float32).reshape(-1)
  if not np.all(np.isfinite(feature)):
    raise BadInputError(path or 'shape', f'{what} holds NaN or infinity')
  return feature


def text_candidates(
  data: Mapping[str, Any],
  shape: Shape,
  config: SampleConfig,
  rng: np.random.Generator,
  flags: Mapping[str, str] | None = None,
) -> list[tuple[str, np.ndarray]]:
  """The (text, feature) candidates OpenShape collects for one sample, in its order and with its random draws."""
  out = []
  version = config.text_version
  if 'text' in config.text_source and len(data.get('text', [])):
    if shape.dataset == OBJAVERSE:
      if not (config.use_text_filtering and (flags or {}).get(shape.id) == 'N'):
        out.append((data['text'][0], data['text_feat'][0][version]))
    else:
      i = rng.integers(len(data['text']))
      out.append((data['text'][i], data['text_feat'][i][version]))
  if 'caption' in config.text_source:
    kind = 'blip' if rng.random() < 0.5 else 'msft'
    if len(data.get(f'{kind}_caption', '')) > 0:
      out.append((data[f'{kind}_caption'], data[f'{kind}_caption_feat'][version]))
  if 'retrieval_text' in config.text_source and len(data.get('retrieval_text', [])) > 0:
    i = rng.integers(len(data['retrieval_text']))
    out.append((data['retrieval_text'][i], data['retrieval_text_feat'][i]['original']))
  return out


def make_example(
  shape: Shape,
  data: Mapping[str, Any],
  config: SampleConfig,
  rng: np.random.Generator,
  *,
  train: bool = True,
  flags: Mapping[str, str] | None = None,
) -> dict:
  """{'points' (num_points, 6|3), 'text_feat' (D,) (zeros when absent), 'has_text', 'text', 'image_feat' (D,)}."""
  points = sample_points(data, config, rng, train=train, path=shape.path)
  candidates = text_candidates(data, shape, config, rng, flags)
  if candidates:
    text, feature = candidates[rng.integers(len(candidates))]
    text_feat = _feature(feature, shape.path, 'a text feature')
  else:
    text, text_feat = '', None
  if shape.dataset == OBJAVERSE and rng.random() < 0.5:
    image_feat = _feature(data['thumbnail_feat'], shape.path, 'thumbnail_feat')
  else:
    views = np.asarray(data['image_feat'])
    image_feat = _feature(views[rng.integers(len(views))], shape.path, 'image_feat')
  return {
    'points': points,
    'text_feat': text_feat if text_feat is not None else np.zeros_like(image_feat),
    'has_text': text_feat is not None,
    'text': text,
    'image_feat': image_feat,
  }


def render_path(renders_root, uid: str, view: int) -> pathlib.Path:
  """One of OpenShape's raw renders of a shape: <renders_root>/<uid>/colors_<view>.png."""
  return pathlib.Path(renders_root) / uid / f'colors_{view}.png'


def read_render(path, preprocess) -> np.ndarray:
  """A render through the CLIP's image preprocessing."""
  return read_image(
    path,
    preprocess,
    missing='is missing: with data.openshape.renders set, every shape of the split needs its 12 renders',
  )
