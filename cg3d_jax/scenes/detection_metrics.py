"""Threshold-free ranking metrics for scene queries: average precision and the area under the ROC curve.

Both take real-valued scores and boolean targets of one query, rank by score and handle tied scores as one
threshold (the definitions scikit-learn uses), so a constant scorer gets AUROC 0.5 and AP = the positive rate.
Undefined cases (no positives, or for AUROC no negatives) give NaN; the callers leave those out of their means
and say how many they left out.
"""

from typing import Sequence

import numpy as np


def _check(name: str, scores, targets) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64)
  targets = np.asarray(targets)
  if scores.ndim != 1 or targets.shape != scores.shape:
    raise ValueError(
      f'{name}: scores and targets must be 1-D of the same length, got {scores.shape} and {targets.shape}'
    )
  if targets.dtype != bool:
    raise ValueError(f'{name}: targets must be boolean, got dtype {targets.dtype}')
  if not np.all(np.isfinite(scores)):
    raise ValueError(f'{name}: scores contain NaN or Inf')
  return scores, targets


def average_precision(scores, targets) -> float:
  """Sum over distinct thresholds t (descending) of (recall(t) - recall(previous t)) x precision(t)."""
  scores, targets = _check('average_precision', scores, targets)
  num_pos = int(targets.sum())
  if num_pos == 0:
    return float('nan')
  order = np.argsort(-scores, kind='stable')
  scores, targets = scores[order], targets[order]
  # The last index of each run of equal scores: a threshold admits the whole run at once.
  last = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
  true_pos = np.cumsum(targets)[last]
  precision = true_pos / (last + 1)
  recall_steps = np.diff(np.r_[0, true_pos]) / num_pos
  return float((recall_steps * precision).sum())


def roc_auc(scores, targets) -> float:
  """P(score of a random positive > score of a random negative), ties counting one half (Mann-Whitney U)."""
  scores, targets = _check('roc_auc', scores, targets)
  num_pos = int(targets.sum())
  num_neg = targets.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float('nan')
  order = np.argsort(scores, kind='stable')
  sorted_scores = scores[order]
  # Average 1-based ranks within runs of tied scores.
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], scores.size]
  run_rank = (starts + 1 + ends) / 2.0
  ranks = np.empty(scores.size)
  ranks[order] = np.repeat(run_rank, ends - starts)
  u = ranks[targets].sum() - num_pos * (num_pos + 1) / 2.0
  return float(u / (num_pos * num_neg))


def nan_mean(values: Sequence[float]) -> tuple[float, int]:
  """(mean of the defined values, how many were defined); NaN when none is."""
  values = np.asarray(values, np.float64)
  defined = values[~np.isnan(values)]
  return (float(defined.mean()) if defined.size else float('nan')), int(defined.size)
