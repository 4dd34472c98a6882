"""Cross-modal retrieval on a split with clouds and renders (ShapeNet-55 test): text/image->3D, 3D->image/text.

Relevance, per direction (metrics.retrieval_metrics gives recall@k and mAP over the queries with a relevant item):
  * text->3D: one query per class (the class's text-classifier row: its template ensemble), gallery = every cloud;
    class-level relevance: every object of the named class counts (classes absent from the split are not queries);
  * 3D->text: one query per cloud, gallery = the class texts; class-level relevance (only its own class), so
    recall@1 equals zero-shot top-1 over the dataset's classes;
  * image->3D and 3D->image: query = view `view_index` of object i (through the prompt-tuned image tower) or the
    cloud of object i, gallery = the other modality of every object; instance-level relevance: only object i counts.
Every similarity is cosine (features L2-normalised), also when the classifier kept the original's raw text norms.
"""

import dataclasses
import os
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from cg3d_jax import sharding
from cg3d_jax.evaluators import metrics, reports, zeroshot
from cg3d_jax.models.cg3d import CG3D
from cg3d_jax.models.layers import l2_normalize

DIRECTIONS = ('text_to_3d', 'image_to_3d', '3d_to_image', '3d_to_text')
RESULTS_FILE = 'retrieval.json'
GRID_PNG = 'retrieval_grid.png'


@dataclasses.dataclass
class RetrievalFeatures:
  point_features: np.ndarray  # (N, D) normalised, one row per object in split order
  image_features: np.ndarray  # (N, D) normalised, the same objects' views
  labels: np.ndarray  # (N,) int
  text_features: np.ndarray  # (C, D) one query per class
  class_names: list[str]


def split_features(
  model: CG3D,
  encoder_vars: dict,
  clip_params: dict,
  batches,
  mesh: jax.sharding.Mesh,
  text_features,
  class_names: Sequence[str],
) -> RetrievalFeatures:
  """Point and image features of every real example of `batches` (which must carry 'image')."""
  replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  image_fn = jax.jit(
    lambda params, pixels: model.image_features(params, pixels),
    in_shardings=(replicated, batch_sharded),
    out_shardings=batch_sharded,
  )

  def images(params, batch):
    if 'image' not in batch:
      raise ValueError('retrieval needs images: build the eval iterator with image_size (ShapeNet-55 renders)')
    return {'image_features': image_fn(params, batch['image'])}

  split = zeroshot.split_point_features(
    model, encoder_vars, batches, mesh, extra_fn=images, extra_params=jax.device_put(clip_params, replicated)
  )
  return RetrievalFeatures(
    point_features=split['point_features'],
    image_features=split['image_features'],
    labels=split['label'].astype(np.int64),
    text_features=np.asarray(text_features),
    class_names=list(class_names),
  )


def retrieval_results(features: RetrievalFeatures, ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict]:
  """{direction: {'recall@k': ..., 'mAP': ..., 'num_queries': ..., ...}} as fractions, for the four directions."""
  n, num_classes = features.labels.shape[0], features.text_features.shape[0]
  classes, objects = np.arange(num_classes), np.arange(n)
  pts, img, txt = features.point_features, features.image_features, features.text_features
  return {
    'text_to_3d': metrics.retrieval_metrics(txt, pts, metrics.class_relevance(classes, features.labels), ks),
    'image_to_3d': metrics.retrieval_metrics(img, pts, metrics.instance_relevance(objects, objects), ks),
    '3d_to_image': metrics.retrieval_metrics(pts, img, metrics.instance_relevance(objects, objects), ks),
    '3d_to_text': metrics.retrieval_metrics(pts, txt, metrics.class_relevance(features.labels, classes), ks),
  }


class RetrievalEvaluator:
  """Recall@k and mAP in the four directions (evaluators/evaluator.py's interface); the text queries are the class
  rows of the zero-shot text classifier, built once. `batches` makes a fresh pass over a split with 'image'."""

  def __init__(
    self,
    model: CG3D,
    clip_params: dict,
    tokenizer,
    *,
    batches: Callable[[], Iterable[dict]],
    class_names: Sequence[str],
    mesh: jax.sharding.Mesh,
    templates='cg3d_zeroshot',
    normalize_text: bool = True,
    name_style: str = 'raw',
    ks: Sequence[int] = (1, 5, 10),
    prefix: str = 'retrieval/',
    read_view: Callable[[int], np.ndarray] | None = None,
    view_index: int = 0,
    grid_queries: int = 4,
    grid_matches: int = 5,
  ):
    self.model, self.mesh, self.batches, self.prefix, self.ks = model, mesh, batches, prefix, tuple(ks)
    self.read_view, self.view_index, self.grid = (
      read_view,
      view_index,
      dict(num_queries=grid_queries, num_matches=grid_matches),
    )
    self.class_names = list(class_names)
    self.text_features = zeroshot.text_classifier(
      model.clip, clip_params, tokenizer, class_names, templates, normalize=normalize_text, name_style=name_style
    )

  def features(self, variables: dict) -> RetrievalFeatures:
    return split_features(
      self.model,
      variables['encoder'],
      variables['clip'],
      self.batches(),
      self.mesh,
      self.text_features,
      self.class_names,
    )

  def run(self, variables: dict) -> dict[str, float]:
    results = retrieval_results(self.features(variables), self.ks)
    return {
      f'{self.prefix}{direction}/{name}': float(value)
      for direction, values in results.items()
      for name, value in values.items()
    }

  def report(self, variables: dict, workdir: str, dataset: str, info: dict) -> dict:
    """Recall@k and mAP in the four directions into retrieval.json, the best matches of a few queries into
    retrieval_grid.png (process 0), the table printed; returns the summary."""
    features = self.features(variables)
    results = retrieval_results(features, self.ks)
    summary = {
      'dataset': dataset,
      'num_objects': int(features.labels.shape[0]),
      **info,
      'view_index': self.view_index,
      'relevance': {'text_to_3d': 'class', '3d_to_text': 'class', 'image_to_3d': 'instance', '3d_to_image': 'instance'},
      **results,
    }
    if jax.process_index() == 0:
      reports.write_json(os.path.join(workdir, RESULTS_FILE), summary)
      write_grid(os.path.join(workdir, GRID_PNG), features, self.read_view, **self.grid)
      print(reports.format_table(results_table(results)))
      print(f'wrote {RESULTS_FILE}, {GRID_PNG} to {workdir}')
    return summary


def results_table(results: dict[str, dict]) -> list[dict]:
  """Rows for reports.format_table, in percent."""
  rows = []
  for direction in DIRECTIONS:
    r = results[direction]
    row = {'direction': direction, 'queries': r['num_queries']}
    row.update({k: 100 * v for k, v in r.items() if k.startswith('recall@') or k == 'mAP'})
    rows.append(row)
  return rows


def _top(query, gallery, k):
  scores = np.asarray(l2_normalize(gallery)) @ np.asarray(l2_normalize(query))
  return np.argsort(-scores, kind='stable')[:k]


def _spread(candidates: np.ndarray, count: int) -> np.ndarray:
  """`count` items evenly spaced over `candidates` (deterministic, covers the split rather than its start)."""
  if count >= candidates.size:
    return candidates
  return candidates[np.linspace(0, candidates.size - 1, count).round().astype(int)]


def write_grid(
  path,
  features: RetrievalFeatures,
  fetch_view: Callable[[int], np.ndarray],
  *,
  num_queries: int = 4,
  num_matches: int = 5,
  query_texts: Sequence[str] | None = None,
) -> None:
  """A PNG: `num_queries` text->3D rows, then `num_queries` image->3D rows; matches shown as rendered views.

  fetch_view(i) returns the uint8 (H, W, 3) render of object i; green frames mark relevant matches.
  query_texts[c] is the caption shown for class c's query (default: the class name).
  """
  present = np.unique(features.labels)
  queries, matches, captions, correct = [], [], [], []
  for c in _spread(present, num_queries):
    top = _top(features.text_features[c], features.point_features, num_matches)
    queries.append(query_texts[c] if query_texts is not None else features.class_names[c])
    matches.append([fetch_view(int(i)) for i in top])
    captions.append(['text query'] + [features.class_names[features.labels[i]] for i in top])
    correct.append([bool(features.labels[i] == c) for i in top])
  for q in _spread(np.arange(features.labels.shape[0]), num_queries):
    top = _top(features.image_features[q], features.point_features, num_matches)
    queries.append(fetch_view(int(q)))
    matches.append([fetch_view(int(i)) for i in top])
    captions.append([f'image of #{q}'] + [f'#{i} {features.class_names[features.labels[i]]}' for i in top])
    correct.append([bool(i == q) for i in top])
  reports.write_retrieval_grid(path, queries, matches, captions, correct)
