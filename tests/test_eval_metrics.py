"""Evaluation metrics and reports against independent NumPy loops, hand-computed cases and the written files."""

import json

import numpy as np
import pytest
from PIL import Image

from cg3d_jax.data.formats import point_files
from cg3d_jax.evaluators import metrics, reports
from tests.conftest import assert_no_near_ties


def _reference_topk(scores, labels, k):
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return float(np.mean([labels[i] in order[i] for i in range(len(labels))]))


def _reference_per_class(preds, labels, num_classes):
  out = []
  for c in range(num_classes):
    rows = [i for i in range(len(labels)) if labels[i] == c]
    out.append(np.nan if not rows else sum(preds[i] == c for i in rows) / len(rows))
  return np.array(out)


def _reference_retrieval(queries, gallery, relevance, ks):
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  assert_no_near_ties(queries.astype(np.float64) @ gallery.T.astype(np.float64), relevance)
  recalls, aps = {k: [] for k in ks}, []
  for q in range(len(queries)):
    if not relevance[q].any():
      continue
    order = sorted(range(len(gallery)), key=lambda g: (-float(queries[q] @ gallery[g]), g))
    relevant = [bool(relevance[q, g]) for g in order]
    for k in ks:
      recalls[k].append(any(relevant[:k]))
    precisions = [sum(relevant[: i + 1]) / (i + 1) for i in range(len(relevant)) if relevant[i]]
    aps.append(sum(precisions) / len(precisions))
  return {**{f'recall@{k}': float(np.mean(recalls[k])) for k in ks}, 'mAP': float(np.mean(aps))}


@pytest.fixture(scope='module')
def random_case():
  rng = np.random.default_rng(7)
  num, num_classes = 300, 12
  labels = rng.integers(0, num_classes - 1, num)  # the last class never occurs
  # Rounded scores create exact ties, which the stable-sort convention must resolve like np.argsort.
  scores = np.round(rng.normal(size=(num, num_classes)) + 1.5 * np.eye(num_classes)[labels], 1).astype(np.float32)
  return scores, labels, num_classes


def test_topk_matches_numpy_reference(random_case):
  scores, labels, _ = random_case
  got = metrics.topk_accuracy(scores, labels, ks=(1, 3, 5, 12))
  for k in (1, 3, 5):
    assert got[k] == pytest.approx(_reference_topk(scores, labels, k), abs=1e-12)
  assert got[12] == 1.0


def test_per_class_class_mean_and_confusion_match_reference(random_case):
  scores, labels, num_classes = random_case
  preds = metrics.predictions(scores)
  np.testing.assert_array_equal(preds, np.argmax(scores, axis=1))
  per_class = metrics.per_class_accuracy(preds, labels, num_classes)
  np.testing.assert_allclose(per_class, _reference_per_class(preds, labels, num_classes), equal_nan=True)
  assert np.isnan(per_class[-1])
  assert metrics.class_mean_accuracy(preds, labels, num_classes) == pytest.approx(
    np.mean(_reference_per_class(preds, labels, num_classes)[:-1])
  )
  expected = np.zeros((num_classes, num_classes), np.int64)
  for t, p in zip(labels, preds):
    expected[t, p] += 1
  np.testing.assert_array_equal(metrics.confusion_matrix(preds, labels, num_classes), expected)


def test_hand_computed_case():
  scores = np.array(
    [
      [0.9, 0.05, 0.05],  # label 0: rank 0
      [0.5, 0.3, 0.2],  # label 1: rank 1
      [0.2, 0.2, 0.6],  # label 1: tie with class 0 at 0.2, lower index first -> rank 2
      [0.1, 0.7, 0.2],
    ]
  )  # label 1: rank 0
  labels = np.array([0, 1, 1, 1])
  np.testing.assert_array_equal(metrics.label_ranks(scores, labels), [0, 1, 2, 0])
  assert metrics.topk_accuracy(scores, labels, ks=(1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 1.0}
  preds = metrics.predictions(scores)  # [0, 0, 2, 1]
  np.testing.assert_allclose(metrics.per_class_accuracy(preds, labels, 3), [1.0, 1 / 3, np.nan])
  assert metrics.class_mean_accuracy(preds, labels, 3) == pytest.approx((1 + 1 / 3) / 2)
  np.testing.assert_array_equal(metrics.confusion_matrix(preds, labels, 3), [[1, 0, 0], [1, 1, 1], [0, 0, 0]])


def test_padded_rows_change_nothing(random_case, tmp_path):
  scores, labels, num_classes = random_case
  padded_scores = np.concatenate([scores, np.full((5, num_classes), np.nan, np.float32)])
  padded_labels = np.concatenate([labels, -np.ones(5, labels.dtype)])
  mask = np.arange(len(padded_labels)) < len(labels)
  assert metrics.topk_accuracy(padded_scores, padded_labels, mask=mask) == metrics.topk_accuracy(scores, labels)
  preds = metrics.predictions(scores)
  padded_preds = np.concatenate([preds, np.zeros(5, preds.dtype)])
  np.testing.assert_array_equal(
    metrics.confusion_matrix(padded_preds, padded_labels, num_classes, mask),
    metrics.confusion_matrix(preds, labels, num_classes),
  )
  names = [f'class{i}' for i in range(num_classes)]
  plain = reports.write_classification_report(
    tmp_path / 'plain', dataset='toy', class_names=names, logits=scores, labels=labels
  )
  masked = reports.write_classification_report(
    tmp_path / 'masked', dataset='toy', class_names=names, logits=padded_scores, labels=padded_labels, mask=mask
  )
  assert plain == masked
  for name in ('results.json', 'per_class.csv', 'per_class.json'):
    assert (tmp_path / 'plain' / name).read_bytes() == (tmp_path / 'masked' / name).read_bytes()


def test_point_features_equal_to_class_text_features_score_100_percent():
  rng = np.random.default_rng(0)
  num_templates, num_classes, dim = 4, 40, 32
  text = rng.normal(size=(num_templates, num_classes, dim)).astype(np.float32)
  classifier = np.asarray(metrics.zero_shot_classifier(text))
  # The ensemble rule, written out independently.
  unit = text / np.linalg.norm(text, axis=-1, keepdims=True)
  expected = unit.mean(0) / np.linalg.norm(unit.mean(0), axis=-1, keepdims=True)
  np.testing.assert_allclose(classifier, expected, rtol=1e-5, atol=1e-6)
  labels = rng.integers(0, num_classes, 200)
  points = 3.0 * expected[labels]  # any length: point features are normalised before scoring
  scores = np.asarray(metrics.zero_shot_scores(points, classifier))
  assert metrics.topk_accuracy(scores, labels, ks=(1,)) == {1: 1.0}
  preds = metrics.predictions(scores)
  assert metrics.class_mean_accuracy(preds, labels, num_classes) == 1.0


def test_unnormalised_text_features_reproduce_the_cg3d_quirk():
  text = np.array([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 1.0]]])  # (T=2, C=2, D=2)
  np.testing.assert_allclose(metrics.zero_shot_classifier(text, normalize=False), [[2.0, 0.0], [0.0, 1.0]])
  # A long class-0 text feature steals a point that is nearer (in angle) to class 1.
  point = np.array([[0.6, 0.8]])
  quirk = np.asarray(
    metrics.zero_shot_scores(point, metrics.zero_shot_classifier(text[:1] * [[[3.0], [1.0]]], normalize=False))
  )
  fair = np.asarray(metrics.zero_shot_scores(point, metrics.zero_shot_classifier(text[:1] * [[[3.0], [1.0]]])))
  assert metrics.predictions(quirk)[0] == 0 and metrics.predictions(fair)[0] == 1


def test_retrieval_matches_reference_for_class_and_instance_relevance():
  rng = np.random.default_rng(3)
  num_queries, num_gallery, dim = 40, 60, 8
  gallery = rng.normal(size=(num_gallery, dim)).astype(np.float32)
  gallery_labels = rng.integers(0, 6, num_gallery)
  gallery_ids = np.arange(num_gallery)
  query_ids = rng.permutation(num_gallery)[:num_queries]
  queries = (gallery[query_ids] + 0.8 * rng.normal(size=(num_queries, dim))).astype(np.float32)
  for relevance in (
    metrics.instance_relevance(query_ids, gallery_ids),
    metrics.class_relevance(gallery_labels[query_ids], gallery_labels),
  ):
    expected = _reference_retrieval(queries, gallery, relevance, (1, 5, 10))
    for chunk, method in ((1024, 'auto'), (7, 'sort'), (7, 'count')):
      got = metrics.retrieval_metrics(queries, gallery, relevance, (1, 5, 10), query_chunk=chunk, method=method)
      for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
      assert got['num_queries'] == num_queries


def test_retrieval_hand_computed_case():
  scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
  relevance = np.array(
    [[False, True, False, True], [False, False, False, True], [False, False, False, False]]
  )  # no relevant item: left out and counted
  for method in ('sort', 'count'):
    got = metrics.retrieval_metrics_from_scores(scores, relevance, ks=(1, 2), method=method)
    assert got['recall@1'] == 0.5 and got['recall@2'] == 1.0
    assert got['mAP'] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1.0) / 2)
    assert got['num_queries'] == 2 and got['num_queries_without_relevant'] == 1
  # Exact ties rank the lower gallery index first: item 2 (relevant) comes third behind items 0 and 1.
  for method in ('sort', 'count'):
    tied = metrics.retrieval_metrics_from_scores(
      np.full((1, 4), 0.5), np.array([[False, False, True, False]]), ks=(2, 3), method=method
    )
    assert (tied['recall@2'], tied['recall@3'], tied['mAP']) == (0.0, 1.0, pytest.approx(1 / 3))


def test_bad_metric_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match='NaN'):
    metrics.topk_accuracy(np.array([[np.nan, 1.0]]), np.array([0]))
  with pytest.raises(ValueError, match='labels must lie in'):
    metrics.topk_accuracy(np.zeros((2, 3)), np.array([0, 3]))
  with pytest.raises(ValueError, match='mask must have shape'):
    metrics.topk_accuracy(np.zeros((2, 3)), np.array([0, 1]), mask=np.ones(3, bool))
  with pytest.raises(ValueError, match='no query has a relevant'):
    metrics.retrieval_metrics_from_scores(np.zeros((2, 2)), np.zeros((2, 2), bool))


def test_classification_report_files(random_case, tmp_path):
  scores, labels, num_classes = random_case
  names = [f'class {i}' for i in range(num_classes)]
  summary = reports.write_classification_report(
    tmp_path, dataset='toy40', class_names=names, logits=scores, labels=labels, extra={'templates': 'cg3d'}
  )
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results == summary
  assert results['templates'] == 'cg3d' and results['num_objects'] == len(labels)
  assert results['top1_acc'] == pytest.approx(100 * _reference_topk(scores, labels, 1))
  assert results['top5_acc'] == pytest.approx(100 * _reference_topk(scores, labels, 5))
  csv_rows = reports.read_per_class_csv(tmp_path / 'per_class.csv')
  assert [r['class_name'] for r in csv_rows] == names
  assert csv_rows[-1]['accuracy'] is None and csv_rows[-1]['num_objects'] == 0
  present = [r['accuracy'] for r in csv_rows if r['accuracy'] is not None]
  assert results['class_mean_acc'] == pytest.approx(np.mean(present), abs=1e-9)
  assert results['num_classes_present'] == len(present) == num_classes - 1
  json_rows = json.loads((tmp_path / 'per_class.json').read_text())
  assert sum(r['num_correct'] for r in json_rows) == round(results['top1_acc'] * len(labels) / 100)
  with Image.open(tmp_path / 'confusion.png') as image:
    assert image.format == 'PNG' and min(image.size) > 200
  assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_format_table():
  table = reports.format_table(
    [
      {'dataset': 'modelnet40', 'top1_acc': 48.7, 'n': 2468},
      {'dataset': 'scanobjectnn', 'top1_acc': float('nan'), 'n': 581},
    ]
  )
  lines = table.splitlines()
  assert lines[0].split() == ['dataset', 'top1_acc', 'n']
  assert lines[2].split() == ['modelnet40', '48.70', '2468']
  assert lines[3].split() == ['scanobjectnn', '-', '581']
  assert len({len(line) for line in lines[:3]}) == 1


def test_retrieval_grid_png(tmp_path):
  rng = np.random.default_rng(0)
  image = lambda: rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)  # noqa: E731
  points = rng.normal(size=(500, 3)).astype(np.float32)
  coloured = point_files.PointCloud(
    xyz=points, rgb=rng.integers(0, 256, (500, 3), dtype=np.uint8), normals=None, source='memory'
  )
  path = tmp_path / 'grid.png'
  reports.write_retrieval_grid(
    path,
    ['a chair', image(), points],
    [[image(), image(), image()], [points, coloured], ['an owl', 'a penguin']],
    captions=['text→3D', ['image', 'obj 1', 'obj 2'], '3D→text'],
    correct=[[True, False, True], [True, False], [False, True]],
  )
  with Image.open(path) as png:
    assert png.format == 'PNG' and png.size[0] > png.size[1] > 100
  with pytest.raises(ValueError, match='same'):
    reports.write_retrieval_grid(tmp_path / 'bad.png', ['q'], [])
