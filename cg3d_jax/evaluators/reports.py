"""Evaluation outputs: results JSON, per-class CSV and JSON, a confusion-matrix PNG, a retrieval grid, a text table.

Reports give accuracies in percent (as papers do), while `metrics` returns fractions. Every file is written
atomically (a temporary name in the same folder, then a rename), so a crash never leaves a half-written result
that a later script would trust. Figures use matplotlib's Agg canvas directly, never pyplot's global state, so
they work on headless machines and in threads.
"""

import csv
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cg3d_jax.atomic import atomic_write_bytes
from cg3d_jax.evaluators import metrics

RESULTS_FILE = 'results.json'
PER_CLASS_CSV = 'per_class.csv'
PER_CLASS_JSON = 'per_class.json'
CONFUSION_PNG = 'confusion.png'


def _json_value(value):
  """JSON has no NaN: an absent class's accuracy is written as null."""
  if isinstance(value, (float, np.floating)):
    return None if math.isnan(value) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.ndarray):
    return [_json_value(v) for v in value.tolist()]
  if isinstance(value, Mapping):
    return {str(k): _json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  return value


def write_json(path, obj) -> None:
  atomic_write_bytes(path, (json.dumps(_json_value(obj), indent=2, default=str) + '\n').encode('utf-8'))


def write_classification_report(
  outdir,
  *,
  dataset: str,
  class_names: Sequence[str],
  logits,
  labels,
  mask=None,
  ks: Sequence[int] = (1, 3, 5),
  extra: Mapping[str, Any] | None = None,
) -> dict:
  """Scores (N, C) logits against labels and writes results.json, per_class.csv/json and confusion.png.

  Rows where `mask` is False (padding of the last batch) are ignored. Returns the summary written to
  results.json: dataset, num_objects, num_classes, num_classes_present, top{k}_acc and class_mean_acc in percent,
  plus `extra` (checkpoint, template set, ...). class_mean_acc is the mean of the per-class accuracies of the
  classes present, i.e. of the non-empty `accuracy` cells of per_class.csv.
  """
  logits, labels = np.asarray(logits), np.asarray(labels)
  num_classes = len(class_names)
  if logits.ndim != 2 or logits.shape[1] != num_classes:
    raise ValueError(f'{dataset}: logits must be (N, {num_classes}) for {num_classes} class names, got {logits.shape}')
  valid = np.ones(logits.shape[0], bool) if mask is None else np.asarray(mask, dtype=bool)
  if valid.shape != (logits.shape[0],) or labels.shape != (logits.shape[0],):
    raise ValueError(f'{dataset}: labels {labels.shape} and mask {valid.shape} must be ({logits.shape[0]},)')
  logits, labels = logits[valid], labels[valid]
  topk = metrics.topk_accuracy(logits, labels, ks)
  preds = metrics.predictions(logits)
  confusion = metrics.confusion_matrix(preds, labels, num_classes)
  counts = confusion.sum(axis=1)
  per_class = metrics.per_class_accuracy(preds, labels, num_classes)
  summary = {
    'dataset': dataset,
    'num_objects': int(labels.shape[0]),
    'num_classes': num_classes,
    'num_classes_present': int((counts > 0).sum()),
  }
  summary.update({f'top{k}_acc': 100 * v for k, v in topk.items()})
  summary['class_mean_acc'] = 100 * float(np.nanmean(per_class))
  clashes = sorted(set(extra or {}) & set(summary))
  if clashes:
    raise ValueError(f'{dataset}: extra fields {clashes} would overwrite computed results')
  summary.update(extra or {})

  rows = [
    {
      'class_index': i,
      'class_name': name,
      'num_objects': int(counts[i]),
      'num_correct': int(confusion[i, i]),
      'accuracy': 100 * float(per_class[i]),
    }
    for i, name in enumerate(class_names)
  ]
  os.makedirs(outdir, exist_ok=True)
  write_json(os.path.join(outdir, RESULTS_FILE), summary)
  write_json(os.path.join(outdir, PER_CLASS_JSON), rows)
  _write_per_class_csv(os.path.join(outdir, PER_CLASS_CSV), rows)
  write_confusion_png(
    os.path.join(outdir, CONFUSION_PNG),
    confusion,
    class_names,
    title=f'{dataset}: top-1 {summary["top1_acc"]:.2f}%, class mean {summary["class_mean_acc"]:.2f}%'
    if 1 in topk
    else dataset,
  )
  return summary


def _write_per_class_csv(path, rows) -> None:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator='\n')
  writer.writeheader()
  for row in rows:
    # An absent class has no accuracy: an empty cell, not 0 (which would read as 'all wrong').
    writer.writerow({**row, 'accuracy': '' if math.isnan(row['accuracy']) else repr(row['accuracy'])})
  atomic_write_bytes(path, buffer.getvalue().encode('utf-8'))


def read_per_class_csv(path) -> list[dict]:
  """The rows of per_class.csv with numbers parsed back; accuracy is None for absent classes."""
  with open(path, encoding='utf-8', newline='') as f:
    return [
      {
        'class_index': int(r['class_index']),
        'class_name': r['class_name'],
        'num_objects': int(r['num_objects']),
        'num_correct': int(r['num_correct']),
        'accuracy': float(r['accuracy']) if r['accuracy'] else None,
      }
      for r in csv.DictReader(f)
    ]


def _save_figure(fig: Figure, path, dpi: int = 100) -> None:
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi)
  atomic_write_bytes(path, buffer.getvalue())


def write_confusion_png(path, confusion, class_names: Sequence[str], *, title: str = '') -> None:
  """Row-normalised confusion matrix (each true class sums to 1) so rare and common classes read alike."""
  confusion = np.asarray(confusion, dtype=np.float64)
  num_classes = len(class_names)
  rows = confusion.sum(axis=1, keepdims=True)
  normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
  side = min(4 + 0.22 * num_classes, 20)
  fig = Figure(figsize=(side + 1.5, side))
  ax = fig.add_subplot()
  image = ax.imshow(normalised, cmap='Blues', vmin=0, vmax=1, interpolation='nearest')
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
  fontsize = max(4, min(9, 300 // max(num_classes, 1)))
  ax.set_xticks(range(num_classes), labels=list(class_names), rotation=90, fontsize=fontsize)
  ax.set_yticks(range(num_classes), labels=list(class_names), fontsize=fontsize)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  if title:
    ax.set_title(title)
  fig.tight_layout()
  _save_figure(fig, path)


def format_table(
  rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, float_format: str = '{:.2f}'
) -> str:
  """A plain fixed-width text table; columns default to the keys of the first row, in order."""
  if not rows:
    return ''
  columns = list(columns or rows[0].keys())

  def cell(value):
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
      return '-'
    if isinstance(value, (float, np.floating)):
      return float_format.format(value)
    return str(value)

  cells = [[cell(row.get(c)) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  numeric = [all(isinstance(row.get(c), (int, float, np.number)) for row in rows) for c in columns]

  def line(values):
    return '  '.join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

  return '\n'.join([line(columns), line(['-' * w for w in widths])] + [line(r) for r in cells])


def write_retrieval_grid(
  path,
  queries: Sequence[Any],
  matches: Sequence[Sequence[Any]],
  captions: Sequence[Any] | None = None,
  correct: Sequence[Sequence[bool]] | None = None,
  *,
  cell_inches: float = 1.8,
) -> None:
  """A PNG with one row per query: the query, then its top matches left to right.

  Queries and matches may each be an image (H, W, 3) or (H, W) uint8, a text (str), or a point cloud drawn as a
  side view: an (N, 3) float array (coloured by depth) or a `point_files.PointCloud` (in its own colours).
  `captions[i]` is either one string under the query or a list with one caption per cell of row i (query first).
  `correct[i][j]` outlines match j green (relevant) or red.
  """
  if len(queries) != len(matches) or not queries:
    raise ValueError(
      f'write_retrieval_grid: {len(queries)} queries and {len(matches)} match lists; need the same non-zero number'
    )
  num_cols = 1 + max(len(m) for m in matches)
  fig = Figure(figsize=(cell_inches * num_cols, cell_inches * len(queries) * 1.15))
  for row, (query, row_matches) in enumerate(zip(queries, matches)):
    row_captions = _row_captions(captions, row, len(row_matches))
    for col, item in enumerate([query, *row_matches]):
      ax = fig.add_subplot(len(queries), num_cols, row * num_cols + col + 1)
      _draw_item(ax, item)
      ax.set_xticks([])
      ax.set_yticks([])
      if row_captions[col]:
        ax.set_xlabel(row_captions[col], fontsize=7)
      if col == 0:
        for spine in ax.spines.values():
          spine.set_linewidth(2.5)
      elif correct is not None:
        for spine in ax.spines.values():
          spine.set_edgecolor('tab:green' if correct[row][col - 1] else 'tab:red')
          spine.set_linewidth(2.5)
  fig.tight_layout()
  _save_figure(fig, path)


def _row_captions(captions, row: int, num_matches: int) -> list[str]:
  if captions is None:
    return [''] * (1 + num_matches)
  caption = captions[row]
  if isinstance(caption, str):
    return [caption] + [''] * num_matches
  caption = [str(c) for c in caption]
  return (caption + [''] * (1 + num_matches))[: 1 + num_matches]


def _draw_item(ax, item) -> None:
  if isinstance(item, str):
    ax.text(0.5, 0.5, item, ha='center', va='center', wrap=True, fontsize=8, transform=ax.transAxes)
    return
  colours = None
  if hasattr(item, 'xyz'):  # a point_files.PointCloud: draw it in its own colours when it has them
    item, colours = item.xyz, getattr(item, 'rgb', None)
  item = np.asarray(item)
  if item.ndim == 2 and item.shape[1] == 3 and (colours is not None or np.issubdtype(item.dtype, np.floating)):
    # A side view: x right, y up (the ShapeNet/ModelNet up axis), far points (small z) drawn first.
    order = np.argsort(item[:, 2])
    if colours is not None:
      ax.scatter(item[order, 0], item[order, 1], c=np.asarray(colours)[order] / 255.0, s=1, linewidths=0)
    else:
      ax.scatter(item[order, 0], item[order, 1], c=item[order, 2], cmap='viridis', s=1, linewidths=0)
    ax.set_aspect('equal', adjustable='datalim')
    return
  if item.ndim == 3 and item.shape[2] in (3, 4) or item.ndim == 2:
    ax.imshow(item, cmap='gray' if item.ndim == 2 else None)
    return
  raise ValueError(
    f'write_retrieval_grid: cannot draw an item of shape {item.shape} dtype {item.dtype}; expected '
    'an image (H, W[, 3]), a string, an (N, 3) float point cloud or a PointCloud'
  )
