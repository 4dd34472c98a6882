"""Classification and retrieval metrics: pure functions on features, scores and labels.

Counting metrics run in NumPy on the host: evaluation gathers the features of a whole split first, and exact
integer counts are easier to trust there than on an accelerator. The feature maps that may run inside jitted code
(`zero_shot_classifier`, `zero_shot_scores`) are written in jax.numpy and accept NumPy arrays too.

Conventions shared by every function here:
- Accuracies are fractions in [0, 1]; reports turn them into percent.
- `mask` (N,) bool marks the real rows of a padded batch; rows where it is False are ignored, so padding the last
  partial batch changes nothing.
- Ties in a ranking go to the lower index (a stable descending sort), so results are deterministic on every
  backend and match `np.argsort(-scores, kind='stable')`.
"""

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from cg3d_jax.models.layers import l2_normalize


def _valid_rows(name: str, num_rows: int, mask) -> np.ndarray:
  """The boolean row selector for `mask` (all rows when None), checked against the number of rows."""
  if mask is None:
    return np.ones(num_rows, dtype=bool)
  mask = np.asarray(mask)
  if mask.shape != (num_rows,):
    raise ValueError(f'{name}: mask must have shape ({num_rows},), got {mask.shape}')
  if mask.dtype != bool:
    raise ValueError(f'{name}: mask must be boolean, got dtype {mask.dtype}')
  return mask


def _check_labels(name: str, labels, num_classes: int, num_rows: int | None = None) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{name}: labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}')
  if num_rows is not None and labels.shape[0] != num_rows:
    raise ValueError(f'{name}: {labels.shape[0]} labels for {num_rows} rows')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{name}: labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]')
  return labels


def _check_scores(name: str, scores) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f'{name}: scores must be 2-D (rows, classes), got shape {scores.shape}')
  if not np.all(np.isfinite(scores)):
    raise ValueError(f'{name}: scores contain NaN or Inf (a diverged model or uninitialised padding?)')
  return scores


def label_ranks(scores, labels) -> np.ndarray:
  """0-based rank of each row's true label under a stable descending sort of that row's scores.

  Counting (higher scores, plus equal scores at lower indices) equals the position in
  `np.argsort(-scores, kind='stable')` without sorting, which keeps this O(N·C) for any k.
  """
  scores = _check_scores('label_ranks', scores)
  labels = _check_labels('label_ranks', labels, scores.shape[1], scores.shape[0])
  true_scores = scores[np.arange(scores.shape[0]), labels][:, None]
  lower_index = np.arange(scores.shape[1])[None, :] < labels[:, None]
  return np.sum((scores > true_scores) | ((scores == true_scores) & lower_index), axis=1)


def topk_accuracy(scores, labels, ks: Sequence[int] = (1, 3, 5), mask=None) -> dict[int, float]:
  """Fraction of rows whose true label is among the k highest scores, for each k.

  `scores` (N, C) are logits or similarities (any monotone map gives the same result). A k at or above C
  counts every row as correct, so one set of ks serves datasets with few classes too.
  """
  scores = np.asarray(scores)
  valid = _valid_rows('topk_accuracy', scores.shape[0], mask)  # before any check: padding may hold anything
  if not valid.any():
    raise ValueError('topk_accuracy: no rows to score (empty input or an all-False mask)')
  if any(int(k) < 1 for k in ks):
    raise ValueError(f'topk_accuracy: every k must be at least 1, got {tuple(ks)}')
  ranks = label_ranks(scores[valid], np.asarray(labels)[valid])
  return {int(k): float(np.mean(ranks < int(k))) for k in ks}


def predictions(scores) -> np.ndarray:
  """Top-1 class per row; ties go to the lower class index (as `np.argmax`)."""
  return np.argmax(_check_scores('predictions', scores), axis=1)


def confusion_matrix(preds, labels, num_classes: int, mask=None) -> np.ndarray:
  """(C, C) int64 counts; row = true class, column = predicted class."""
  preds, labels = np.asarray(preds), np.asarray(labels)
  if preds.shape != labels.shape:
    raise ValueError(f'confusion_matrix: preds {preds.shape} and labels {labels.shape} differ in shape')
  valid = _valid_rows('confusion_matrix', preds.shape[0], mask)  # before any check: padding may hold anything
  preds = _check_labels('confusion_matrix (preds)', preds[valid], num_classes)
  labels = _check_labels('confusion_matrix', labels[valid], num_classes)
  flat = labels.astype(np.int64) * num_classes + preds
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(preds, labels, num_classes: int, mask=None) -> np.ndarray:
  """(C,) float64 top-1 accuracy of each class; NaN for classes with no rows (absent is not 0% correct)."""
  confusion = confusion_matrix(preds, labels, num_classes, mask)
  counts = confusion.sum(axis=1)
  return np.where(counts > 0, np.diag(confusion) / np.maximum(counts, 1), np.nan)


def class_mean_accuracy(preds, labels, num_classes: int, mask=None) -> float:
  """Mean of the per-class accuracies over the classes present in `labels` (the usual 'mAcc')."""
  accuracies = per_class_accuracy(preds, labels, num_classes, mask)
  if np.all(np.isnan(accuracies)):
    raise ValueError('class_mean_accuracy: no rows to score (empty input or an all-False mask)')
  return float(np.nanmean(accuracies))


def zero_shot_classifier(text_features, normalize: bool = True):
  """The (C, D) class weights of a zero-shot classifier from text features of C classes.

  `text_features` is (C, D) for one template or (T, C, D) for T templates per class.

  normalize=True (the default) is the usual prompt-ensemble rule (CLIP, ULIP, OpenShape): L2-normalise the
  feature of every template, average over templates, L2-normalise the mean. Scores are then cosine similarities.

  normalize=False reproduces the original CG3D evaluation quirk: its text features were never L2-normalised, so
  the raw mean over templates (with CG3D's one template, the raw feature itself) is returned. Classes whose text
  feature happens to be longer then get larger scores, which changes the ranking; keep it only for reproducing
  the published CG3D numbers.
  """
  text_features = jnp.asarray(text_features)
  if text_features.ndim == 2:
    text_features = text_features[None]
  if text_features.ndim != 3:
    raise ValueError(f'zero_shot_classifier: text features must be (C, D) or (T, C, D), got {text_features.shape}')
  if not normalize:
    return jnp.mean(text_features, axis=0)
  return l2_normalize(jnp.mean(l2_normalize(text_features), axis=0))


def zero_shot_scores(point_features, classifier):
  """(N, C) scores: L2-normalised point features against the classifier's class weights.

  Point features are normalised in both classifier modes; only the text side differs (see zero_shot_classifier).
  The product runs at full fp32 precision: accelerators' default (TF32/bf16 passes) can swap near-tied classes.
  """
  return jnp.matmul(l2_normalize(point_features), jnp.asarray(classifier).T, precision='highest')


def class_relevance(query_labels, gallery_labels) -> np.ndarray:
  """(Q, G) bool: a gallery item is relevant when it has the query's class (text queries: 'a chair' → chairs)."""
  query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
  if query_labels.ndim != 1 or gallery_labels.ndim != 1:
    raise ValueError('class_relevance: labels must be 1-D')
  return query_labels[:, None] == gallery_labels[None, :]


def instance_relevance(query_ids, gallery_ids) -> np.ndarray:
  """(Q, G) bool: only the same object is relevant (image↔3D pairs); ids are any comparable 1-D values."""
  return class_relevance(query_ids, gallery_ids)


def retrieval_metrics(
  query_features,
  gallery_features,
  relevance,
  ks: Sequence[int] = (1, 5, 10),
  *,
  normalize: bool = True,
  query_chunk: int = 1024,
  method: str = 'auto',
) -> dict[str, float | int]:
  """Recall@k and mAP of ranking the gallery by cosine similarity to each query.

  Definitions (each over queries with at least one relevant gallery item; `num_queries` says how many):
  - recall@k: fraction of queries with at least one relevant item among their k best-scored gallery items (the
    usual cross-modal "R@k"; with one relevant item per query it is the fraction whose match is in the top k).
  - mAP: mean over queries of average precision, AP = (1/R) Σ_{i: item i relevant} precision@rank(i), where R is
    the number of relevant items and the whole gallery is ranked (no cut-off).
  Relevance is the caller's choice: `class_relevance` for text queries (every object of the named class counts),
  `instance_relevance` for image↔3D pairs (only the same object counts).

  normalize=False ranks by the raw dot product. Queries run in chunks of `query_chunk` rows so that a
  10k × 10k evaluation never holds the full score matrix; `method` is explained in retrieval_metrics_from_scores.
  """
  query_features = np.asarray(query_features, dtype=np.float32)
  gallery_features = np.asarray(gallery_features, dtype=np.float32)
  if query_features.ndim != 2 or gallery_features.ndim != 2 or query_features.shape[1] != gallery_features.shape[1]:
    raise ValueError(
      f'retrieval_metrics: features must be (Q, D) and (G, D), got {query_features.shape} and {gallery_features.shape}'
    )
  if normalize:
    query_features = np.asarray(l2_normalize(query_features))
    gallery_features = np.asarray(l2_normalize(gallery_features))
  relevance = np.asarray(relevance)
  expected = (query_features.shape[0], gallery_features.shape[0])
  if relevance.shape != expected or relevance.dtype != bool:
    raise ValueError(
      f'retrieval_metrics: relevance must be bool of shape {expected}, got {relevance.dtype} {relevance.shape}'
    )
  return retrieval_metrics_from_scores(
    _chunked_scores(query_features, gallery_features, query_chunk),
    relevance,
    ks,
    query_chunk=query_chunk,
    method=method,
  )


def _chunked_scores(query_features, gallery_features, query_chunk):
  for start in range(0, query_features.shape[0], query_chunk):
    yield query_features[start : start + query_chunk] @ gallery_features.T


def _row_chunks(array, chunk):
  for start in range(0, array.shape[0], chunk):
    yield array[start : start + chunk]


def retrieval_metrics_from_scores(
  scores, relevance, ks: Sequence[int] = (1, 5, 10), *, query_chunk: int = 1024, method: str = 'auto'
) -> dict[str, float | int]:
  """`retrieval_metrics` on precomputed (Q, G) scores (or an iterable of row chunks of them).

  method picks how the ranks of the relevant items are found; every method gives the same numbers. 'sort' sorts
  each query's whole gallery (O(G log G) per query); 'count' counts, for each relevant item, the items ranked
  before it (O(G) per relevant item), which is far faster when queries have few relevant items (instance
  relevance has one); 'auto' counts when queries average at most 32 relevant items.
  """
  relevance = np.asarray(relevance)
  if relevance.ndim != 2 or relevance.dtype != bool:
    raise ValueError(f'retrieval_metrics: relevance must be a 2-D bool array, got {relevance.dtype} {relevance.shape}')
  if method not in ('auto', 'sort', 'count'):
    raise ValueError(f"retrieval_metrics: method must be 'auto', 'sort' or 'count', got {method!r}")
  if isinstance(scores, np.ndarray) or hasattr(scores, 'shape'):
    scores = np.asarray(scores)
    if scores.shape != relevance.shape:
      raise ValueError(f'retrieval_metrics: scores {scores.shape} and relevance {relevance.shape} differ in shape')
    scores = _row_chunks(scores, query_chunk)
  ks = tuple(int(k) for k in ks)
  if any(k < 1 for k in ks):
    raise ValueError(f'retrieval_metrics: every k must be at least 1, got {ks}')
  hits = {k: 0 for k in ks}
  ap_sum, num_scored, start = 0.0, 0, 0
  for chunk in scores:
    chunk = _check_scores('retrieval_metrics', chunk)
    rel = relevance[start : start + chunk.shape[0]]
    if rel.shape != chunk.shape:
      raise ValueError(f'retrieval_metrics: score rows {start}.. have shape {chunk.shape}, relevance {rel.shape}')
    start += chunk.shape[0]
    use_count = method == 'count' or (method == 'auto' and rel.sum() <= 32 * rel.shape[0])
    rows, ranks = (_relevant_ranks_by_counting if use_count else _relevant_ranks_by_sorting)(chunk, rel)
    # rows ascending, ranks ascending within a row: the i-th relevant item of a query (0-based) sits at rank r,
    # so precision at its rank is (i + 1) / (r + 1).
    num_relevant = np.bincount(rows, minlength=rel.shape[0])
    first = np.cumsum(num_relevant) - num_relevant
    precision = (np.arange(rows.size) - first[rows] + 1) / (ranks + 1)
    scored = num_relevant > 0
    num_scored += int(scored.sum())
    ap_sum += float(np.sum(np.bincount(rows, weights=precision, minlength=rel.shape[0])[scored] / num_relevant[scored]))
    for k in ks:
      hits[k] += int(np.sum(np.bincount(rows, weights=ranks < k, minlength=rel.shape[0]) > 0))
  if start != relevance.shape[0]:
    raise ValueError(f'retrieval_metrics: scores cover {start} queries, relevance {relevance.shape[0]}')
  if num_scored == 0:
    raise ValueError('retrieval_metrics: no query has a relevant gallery item')
  results = {f'recall@{k}': hits[k] / num_scored for k in ks}
  results['mAP'] = ap_sum / num_scored
  results['num_queries'] = num_scored
  results['num_queries_without_relevant'] = relevance.shape[0] - num_scored
  return results


def _relevant_ranks_by_sorting(scores, relevance):
  """(rows, ranks) of every relevant item, ordered by row then rank, from a stable sort of each row."""
  order = np.argsort(-scores, axis=1, kind='stable')
  return np.nonzero(np.take_along_axis(relevance, order, axis=1))


def _relevant_ranks_by_counting(scores, relevance, max_elements: int = 1 << 22):
  """(rows, ranks) as `_relevant_ranks_by_sorting`, counting the items before each relevant one instead.

  An item comes before relevant item j when it scores higher, or equal at a lower index (the stable-sort rule).
  """
  rows, cols = np.nonzero(relevance)
  ranks = np.empty(rows.size, dtype=np.int64)
  gallery_index = np.arange(scores.shape[1])
  step = max(1, max_elements // max(scores.shape[1], 1))
  for i in range(0, rows.size, step):
    r, c = rows[i : i + step], cols[i : i + step]
    row_scores = scores[r]
    target = row_scores[np.arange(r.size), c][:, None]
    before = (row_scores > target) | ((row_scores == target) & (gallery_index[None, :] < c[:, None]))
    ranks[i : i + step] = before.sum(axis=1)
  order = np.lexsort((ranks, rows))
  return rows[order], ranks[order]
