"""Open scene understanding: text queries over a whole scene, and their evaluation on labelled rooms (S3DIS).

A scene is split into object-sized regions (regions.py says how and why), every region is embedded by the
point encoder in batch-sharded jitted calls, and each region is classified zero-shot over a label set: the
queries plus a background vocabulary (by default the classes the checkpoint was trained on, or S3DIS's 13). A
query's relevance in a region is its softmax probability over that set, with CLIP's logit scale: without the
vocabulary a lone query would win every region. Then, per query:
  * per-point relevance: the regions' relevances spread to their points (scene_regions.point_scores);
  * top regions: the regions where it is most probable;
  * presence: score = the best margin over regions of its probability over the strongest other label's, in
    [-1, 1]; "present" when the score exceeds `threshold` (0 by default: the query is the most probable label of
    at least one region). A margin, unlike a probability, needs no calibration to the vocabulary's size.

Evaluation over rooms with per-point labels: presence as a multi-label problem per room (AP per class over rooms,
mAP over classes), and per-point relevance against the class's ground-truth points (AUROC per room and class,
averaged per class, then over classes).
"""

import dataclasses
import pathlib
from typing import Iterable, Sequence

import jax
import numpy as np

from cg3d_jax import sharding
from cg3d_jax.data import shapenet55_names
from cg3d_jax.data.formats import point_files
from cg3d_jax.errors import BadInputError, InputError
from cg3d_jax.evaluators import prediction, zeroshot
from cg3d_jax.models.cg3d import CG3D
from cg3d_jax.scenes import detection_metrics, s3dis
from cg3d_jax.scenes import regions as scene_regions
from cg3d_jax.trained import ScoringModel


@dataclasses.dataclass(frozen=True)
class QuerySettings:
  regions: scene_regions.RegionSettings = scene_regions.RegionSettings()
  threshold: float = 0.0  # presence: best-region margin above this (0: the query wins at least one region)
  top_regions: int = 5
  batch_size: int = 64  # regions per device call (rounded up to a multiple of the device count)
  templates: str | tuple[str, ...] | None = None  # None: the checkpoint's eval.templates (what it was validated with)


@dataclasses.dataclass
class SceneQuery:
  """Everything one query run produced; `summary()` is its JSON."""

  queries: list[str]
  labels: list[str]  # queries first, then the vocabulary words that are not queries
  regions: scene_regions.Regions
  region_similarity: np.ndarray  # (M, L) cosine similarity of each region to each label
  region_probability: np.ndarray  # (M, L) softmax over labels with the logit scale
  point_scores: np.ndarray  # (N, Q) per-point relevance of each query
  logit_scale: float
  settings: QuerySettings

  def margins(self) -> np.ndarray:
    """(M, Q): each query's probability minus the best other label's, per region (> 0 where the query wins)."""
    probs = self.region_probability
    out = np.empty((probs.shape[0], len(self.queries)))
    for q in range(len(self.queries)):
      out[:, q] = probs[:, q] - np.delete(probs, q, axis=1).max(axis=1)
    return out

  def presence(self) -> list[dict]:
    out = []
    margins = self.margins()
    best_label = self.region_probability.argmax(axis=1)
    for q, query in enumerate(self.queries):
      relevance = self.region_probability[:, q]
      order = np.argsort(-relevance, kind='stable')[: self.settings.top_regions]
      score = float(margins[:, q].max())
      out.append(
        {
          'query': query,
          'present': bool(score > self.settings.threshold),
          'score': score,
          'threshold': self.settings.threshold,
          'best_probability': float(relevance.max()),
          'regions_won': int((best_label == q).sum()),
          'top_regions': [
            {
              'region': int(m),
              'centre': [round(float(c), 4) for c in self.regions.centres[m]],
              'radius': self.settings.regions.radius,
              'points': int(self.regions.sizes[m]),
              'probability': float(relevance[m]),
              'margin': float(margins[m, q]),
              'similarity': float(self.region_similarity[m, q]),
              'top_label': self.labels[int(best_label[m])],
            }
            for m in order
          ],
        }
      )
    return out

  def summary(self) -> dict:
    r = self.regions
    return {
      'queries': self.queries,
      'labels': self.labels,
      'logit_scale': self.logit_scale,
      'scene_points': r.num_scene_points,
      'regions': len(r),
      'region_settings': dataclasses.asdict(self.settings.regions),
      'points_in_no_region': int((~r.covered()).sum()),
      'points_excluded_as_floor': int(r.excluded.sum()),
      'mean_points_per_region': float(r.sizes.mean()),
      'results': self.presence(),
    }


def _padded_batches(points: np.ndarray, batch: int):
  for start in range(0, points.shape[0], batch):
    chunk = points[start : start + batch]
    real = chunk.shape[0]
    if real < batch:  # copies of a real region: the same compiled shape, results dropped below
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - real, axis=0)])
    yield chunk, real


def local_mesh() -> jax.sharding.Mesh:
  """This process's devices: a scene query is a one-host job (one GPU, or the CPU)."""
  return sharding.make_mesh({'data': -1, 'fsdp': 1}, jax.local_devices())


class RegionEmbedder:
  """(M, S, 3) normalised regions -> (M, D) L2-normalised point features, batch-sharded over the mesh.

  Built once per model and reused across scenes: batches have one fixed shape (the last is padded with copies of
  a real region), so the encoder compiles once.
  """

  def __init__(self, model: CG3D, encoder_vars: dict, mesh: jax.sharding.Mesh, batch_size: int = 64):
    self.encode = zeroshot.PointEncoder(model, encoder_vars, mesh, batch_size)

  def __call__(self, encoder_points: np.ndarray) -> np.ndarray:
    pending = [
      (self.encode(jax.device_put(chunk, self.encode.sharding)), real)
      for chunk, real in _padded_batches(encoder_points, self.encode.batch_size)
    ]  # all dispatched, then fetched
    return np.concatenate([np.asarray(f)[:real] for f, real in pending])


def resolve_settings(settings: QuerySettings, model: ScoringModel) -> QuerySettings:
  """Fills what defaults to the checkpoint: caption templates, and points per region = its stored cloud size
  (the encoder's FPS saw num_stored_points -> num_points in training)."""
  if settings.templates is None:
    settings = dataclasses.replace(settings, templates=model.config.get('eval', {}).get('templates', 'cg3d_zeroshot'))
  if settings.regions.points_per_region is None:
    stored = model.config.get('data', {}).get('num_stored_points') or 4 * model.model.num_points
    settings = dataclasses.replace(settings, regions=dataclasses.replace(settings.regions, points_per_region=stored))
  return settings


def label_classifier(model: ScoringModel, labels: Sequence[str], settings: QuerySettings) -> np.ndarray:
  return zeroshot.text_classifier(
    model.clip.model, model.clip_params, model.clip.tokenizer, labels, resolve_settings(settings, model).templates
  )


def label_set(queries: Sequence[str], vocabulary: Sequence[str]) -> list[str]:
  """Queries first (their order), then vocabulary words that are not queries; no repeats."""
  labels = list(queries)
  labels += [v for v in dict.fromkeys(vocabulary) if v not in labels]
  if len(labels) < 2:
    raise InputError(
      f'a scene query needs at least two labels to compare (--queries {list(queries)} plus the '
      f'--vocabulary); got {labels}'
    )
  return labels


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(axis=1, keepdims=True))
  return z / z.sum(axis=1, keepdims=True)


def query_scene(
  model: ScoringModel,
  xyz,
  queries: Sequence[str],
  vocabulary: Sequence[str],
  *,
  settings: QuerySettings = QuerySettings(),
  mesh: jax.sharding.Mesh | None = None,
  classifier: np.ndarray | None = None,
  embedder: RegionEmbedder | None = None,
  rgb=None,
) -> SceneQuery:
  """Scores every query over the scene (N, 3). `classifier` (L, D) and `embedder` let a caller that queries many
  scenes encode the label texts and compile the encoder once. `rgb` (N, 3) uint8: the scene's colours, which a
  coloured encoder (in_channels 6) sees (without them: OpenShape's grey, with a warning); others ignore them."""
  if not queries:
    raise ValueError('query_scene: no queries')
  labels = label_set(queries, vocabulary)
  settings = resolve_settings(settings, model)
  colours = prediction.colour_channels(model.model.encoder, rgb, len(xyz), 'the scene')
  regions = scene_regions.split_regions(xyz, settings.regions, colours)
  if embedder is None:
    embedder = RegionEmbedder(model.model, model.encoder_vars, mesh or local_mesh(), settings.batch_size)
  features = embedder(regions.encoder_points)
  if classifier is None:
    classifier = label_classifier(model, labels, settings)
  if classifier.shape[0] != len(labels):
    raise ValueError(f'query_scene: classifier has {classifier.shape[0]} rows for {len(labels)} labels')
  similarity = features.astype(np.float64) @ np.asarray(classifier, np.float64).T
  scale = model.logit_scale()
  probability = softmax(scale * similarity)
  scores = scene_regions.point_scores(regions, probability[:, : len(queries)], settings.regions.aggregate)
  return SceneQuery(
    queries=list(queries),
    labels=labels,
    regions=regions,
    region_similarity=similarity,
    region_probability=probability,
    point_scores=scores,
    logit_scale=scale,
    settings=settings,
  )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation over labelled rooms.


@dataclasses.dataclass
class LabelledScene:
  name: str
  xyz: np.ndarray  # (N, 3)
  labels: np.ndarray  # (N,) int indices into class_names
  class_names: Sequence[str]
  rgb: np.ndarray | None = None  # (N, 3) uint8: what a coloured encoder sees


def evaluate_scenes(
  model: ScoringModel,
  scenes: Iterable[LabelledScene],
  query_classes: Sequence[str],
  vocabulary: Sequence[str] = (),
  *,
  settings: QuerySettings = QuerySettings(),
  mesh: jax.sharding.Mesh | None = None,
  min_points: int = 1,
  log=print,
) -> dict:
  """Presence mAP over classes and per-point AUROC, with per-class and per-room detail (a JSON-ready dict).

  A class is present in a room when at least `min_points` of its points are there. Query words are the class
  names with '_' read as a space.
  """
  query_classes = list(query_classes)
  words = [c.replace('_', ' ') for c in query_classes]
  labels = label_set(words, [v.replace('_', ' ') for v in vocabulary])
  settings = resolve_settings(settings, model)
  classifier = label_classifier(model, labels, settings)
  embedder = RegionEmbedder(model.model, model.encoder_vars, mesh or local_mesh(), settings.batch_size)
  presence_scores, presence_truth, aurocs, rooms = [], [], [], []
  for scene in scenes:
    missing = [c for c in query_classes if c not in scene.class_names]
    if missing:
      raise ValueError(f'{scene.name}: query classes {missing} are not among its classes {list(scene.class_names)}')
    result = query_scene(
      model, scene.xyz, words, labels, settings=settings, classifier=classifier, embedder=embedder, rgb=scene.rgb
    )
    presence = result.presence()
    room = {'scene': scene.name, 'points': int(scene.xyz.shape[0]), 'regions': len(result.regions), 'classes': {}}
    truth_row, auroc_row = [], []
    for q, name in enumerate(query_classes):
      truth = scene.labels == list(scene.class_names).index(name)
      present = int(truth.sum()) >= min_points
      auroc = detection_metrics.roc_auc(result.point_scores[:, q], truth) if present else float('nan')
      truth_row.append(present)
      auroc_row.append(auroc)
      room['classes'][name] = {
        'present': present,
        'points': int(truth.sum()),
        'score': presence[q]['score'],
        'predicted_present': presence[q]['present'],
        'auroc': auroc,
      }
    presence_scores.append([p['score'] for p in presence])
    presence_truth.append(truth_row)
    aurocs.append(auroc_row)
    rooms.append(room)
    log(f'{scene.name}: {len(result.regions)} regions; present {[c for c, t in zip(query_classes, truth_row) if t]}')
  if not rooms:
    raise ValueError('evaluate_scenes: no scenes to evaluate')
  return summarize(
    query_classes, np.array(presence_scores), np.array(presence_truth), np.array(aurocs), rooms, settings
  )


def summarize(
  class_names: Sequence[str],
  presence_scores: np.ndarray,
  presence_truth: np.ndarray,
  aurocs: np.ndarray,
  rooms: list[dict],
  settings: QuerySettings,
) -> dict:
  """Per-class AP (presence over rooms) and mean AUROC (over rooms holding the class), and their means."""
  per_class = {}
  for c, name in enumerate(class_names):
    truth = presence_truth[:, c].astype(bool)
    predicted = presence_scores[:, c] > settings.threshold
    auroc, auroc_rooms = detection_metrics.nan_mean(aurocs[:, c])
    per_class[name] = {
      'ap': detection_metrics.average_precision(presence_scores[:, c], truth),
      'auroc': auroc,
      'rooms_present': int(truth.sum()),
      'rooms_with_auroc': auroc_rooms,
      'presence_accuracy': float((predicted == truth).mean()),
    }
  m_ap, ap_classes = detection_metrics.nan_mean([v['ap'] for v in per_class.values()])
  m_auroc, auroc_classes = detection_metrics.nan_mean([v['auroc'] for v in per_class.values()])
  return {
    'mAP': m_ap,
    'classes_in_mAP': ap_classes,
    'mean_auroc': m_auroc,
    'classes_in_auroc': auroc_classes,
    'presence_accuracy': float(((presence_scores > settings.threshold) == presence_truth).mean()),
    'num_rooms': len(rooms),
    'threshold': settings.threshold,
    'region_settings': dataclasses.asdict(settings.regions),
    'per_class': per_class,
    'rooms': rooms,
  }


# --- what the scene commands read ---------------------------------------------------------------------------------


def read_scene(path) -> tuple[np.ndarray, np.ndarray | None]:
  """(xyz float32 (N, 3), rgb uint8 (N, 3) or None) from an S3DIS room folder / room .txt or a point file."""
  path = pathlib.Path(path)
  if path.is_dir():
    if not s3dis.is_room_folder(path):
      raise BadInputError(path, f'a folder but not an S3DIS room (expected {path.name}/{path.name}.txt)')
    return s3dis.read_room_cloud(path)
  if not path.is_file():
    raise BadInputError(path, 'scene does not exist')
  if path.suffix == '.txt' and path.parent.name == path.stem:  # an S3DIS room file
    return s3dis.read_room_cloud(path)
  cloud = point_files.read_points(path)
  return cloud.xyz, cloud.rgb


def training_vocabulary(model: ScoringModel) -> list[str]:
  """The class names the checkpoint's encoder was trained on (ShapeNet-55's, or the demo's procedural ones)."""
  data = model.config.get('data', {})
  if data.get('name', 'shapenet55_cg3d') != 'shapenet55_cg3d':
    raise InputError(
      f'--vocabulary training: the checkpoint was trained on {data.get("name")!r}, whose class '
      'names this tool does not know; pass --vocabulary "word1,word2,..."'
    )
  manual = data.get('manual_dir')
  names_file = pathlib.Path(manual) / 'shape_names.txt' if manual else None
  names = shapenet55_names.read_shape_names(names_file if names_file and names_file.is_file() else None)
  return [n.replace('_', ' ') for n in names]


def labelled_rooms(rooms, class_names, *, cache=None, skip_bad_lines=False) -> Iterable[LabelledScene]:
  """S3DIS rooms read one at a time (a whole area does not fit in memory as text). Classes outside the list go to
  'clutter' (with a warning) when the list has it, as for S3DIS's few 'stairs' files, and are errors otherwise."""
  unknown_class = 'clutter' if 'clutter' in class_names else None
  for room_dir in rooms:
    room = s3dis.read_room(
      room_dir, class_names=class_names, unknown_class=unknown_class, cache_dir=cache, skip_bad_lines=skip_bad_lines
    )
    yield LabelledScene(
      name=f'{room.area}/{room.name}', xyz=room.xyz, labels=room.labels, class_names=room.class_names, rgb=room.rgb
    )
