"""Zero-shot evaluation and retrieval wiring: text classifier, split features with padding, reports, commands.

References outside the code under test: transformers' PyTorch CLIP for the text classifier, NumPy re-computations
of top-k / class-mean accuracy, recall@k and AP on fixed features, an unsharded single-batch encoder pass for the
padded sharded one, and the real ModelNet40 fixture files through the real `python -m cg3d_jax.evaluate`.
"""

import csv
import functools
import json
import os

import flax.linen as nn
import numpy as np
import pytest
import torch
from PIL import Image

from cg3d_jax import evaluate, sharding, trained
from cg3d_jax.clip import templates as template_sets
from cg3d_jax.clip.hf_clip import load_transformers_clip
from cg3d_jax.clip.loaded_clip import tokenize
from cg3d_jax.configs import retrieval_shapenet55, zeroshot_modelnet40
from cg3d_jax.data import builders, host_batches, pipeline
from cg3d_jax.data.sources import source
from cg3d_jax.evaluators import metrics, retrieval, zeroshot
from cg3d_jax.models.cg3d import CG3D
from cg3d_jax.models.layers import l2_normalize
from tests.conftest import assert_no_near_ties, modelnet_root, point_features, run_command


class FlatEncoder(nn.Module):
  """A parameter-free 'encoder' whose feature is the first `dim` coordinates of the cloud: features set by hand."""

  dim: int

  def __call__(self, points, train: bool = False):
    return points.reshape(points.shape[0], -1)[:, : self.dim]


def clouds_from_features(features: np.ndarray, num_points: int) -> np.ndarray:
  """(N, D) -> (N, num_points, 3) clouds whose flattened first D coordinates are the features."""
  flat = np.zeros((features.shape[0], num_points * 3), np.float32)
  flat[:, : features.shape[1]] = features
  return flat.reshape(-1, num_points, 3)


def global_batches(points, labels, batch_size, mesh):
  """Padded, masked global batches as pipeline.make_eval_iterator yields; padding rows hold large garbage."""
  host = []
  for start in range(0, len(labels), batch_size):
    p, y = points[start : start + batch_size], labels[start : start + batch_size]
    pad = batch_size - len(y)
    host.append(
      {
        'points': np.concatenate([p, np.full((pad,) + p.shape[1:], 1e3, np.float32)]),
        'label': np.concatenate([y, np.full(pad, 7, np.int32)]).astype(np.int32),
        'mask': np.arange(batch_size) < len(y),
      }
    )
  return host_batches.to_global(host, sharding.batch_sharding(mesh))


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh({'data': -1, 'fsdp': 1})


@pytest.fixture(scope='module')
def tiny_clip(tiny_clip_dir):
  return load_transformers_clip(tiny_clip_dir, prompt_mode='deep', num_prompts=2)


@pytest.fixture(scope='module')
def eval_model(tiny_checkpoint):
  return trained.with_clip(trained.load_trained(tiny_checkpoint))


def numpy_topk_and_class_mean(features, classifier, labels, ks):
  f = features / np.linalg.norm(features, axis=1, keepdims=True)
  scores = f.astype(np.float64) @ classifier.astype(np.float64).T
  assert_no_near_ties(scores, np.arange(scores.shape[1]) == labels[:, None])
  order = np.argsort(-scores, axis=1, kind='stable')
  out = {f'top{k}': float(np.mean([labels[i] in order[i, :k] for i in range(len(labels))])) for k in ks}
  correct = order[:, 0] == labels
  out['class_mean'] = float(np.mean([correct[labels == c].mean() for c in np.unique(labels)]))
  return out


def test_text_classifier_matches_transformers_clip(tiny_clip, tiny_clip_dir):
  from transformers import CLIPModel

  names = ['chair', 'flower_pot', 'owl']
  templates = ('a photo of a {}.', 'This is a {}', 'a 3D model of {}, rendered')
  ids = tokenize(tiny_clip.tokenizer, [t.format(c) for t in templates for c in names])
  torch_model = CLIPModel.from_pretrained(tiny_clip_dir, local_files_only=True).eval()
  with torch.no_grad():
    out = torch_model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
  raw = getattr(out, 'pooler_output', out).numpy().astype(np.float64).reshape(len(templates), len(names), -1)
  unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
  expected = unit.mean(0) / np.linalg.norm(unit.mean(0), axis=-1, keepdims=True)
  got = zeroshot.text_classifier(tiny_clip.model, tiny_clip.params, tiny_clip.tokenizer, names, templates)
  np.testing.assert_allclose(got, expected, atol=2e-5)
  # The original quirk: the raw (un-normalised) mean over templates.
  quirk = zeroshot.text_classifier(
    tiny_clip.model, tiny_clip.params, tiny_clip.tokenizer, names, templates, normalize=False
  )
  np.testing.assert_allclose(quirk, raw.mean(0), rtol=1e-4, atol=1e-5)
  # Chunking (with a padded last chunk) changes nothing.
  chunked = zeroshot.encode_texts(
    tiny_clip.model, tiny_clip.params, ids.reshape(len(templates), len(names), -1), chunk=4
  )
  np.testing.assert_allclose(chunked, raw, rtol=1e-4, atol=1e-5)


def test_template_sets_are_the_published_lists(fixtures_dir):
  """CG3D's 63 caption templates and its zero-shot template, ULIP's two 64-template sets and its ModelNet40 names, as
  the projects published them (tests/fixtures/prompts, copied from their repositories), in their order."""
  cg3d = json.loads((fixtures_dir / 'prompts' / 'cg3d_templates.json').read_text())
  ulip = json.loads((fixtures_dir / 'prompts' / 'ulip_templates.json').read_text())
  published = {
    'cg3d': [t.replace('{category}', '{}') for t in cg3d['cg3d_pretrain_captions']],
    'cg3d_zeroshot': [t.replace('{category}', '{}') for t in cg3d['cg3d_zero_shot']],
    'ulip': ulip['modelnet40_64'],
    'ulip_shapenet': ulip['shapenet_64'],
  }
  assert [len(v) for v in published.values()] == [63, 1, 64, 64]
  for name, want in published.items():
    assert list(template_sets.get_templates(name)) == want, name
  assert template_sets.get_templates('cg3d_zeroshot') == ('This is a {}',)
  labels = json.loads((fixtures_dir / 'prompts' / 'ulip_labels.json').read_text())['modelnet40']
  assert list(template_sets.ulip_modelnet40_names()) == labels and len(labels) == 40


def test_templates_and_class_name_styles():
  assert zeroshot.resolve_templates('cg3d_zeroshot') == ('This is a {}',)
  assert len(zeroshot.resolve_templates('ulip')) == 64
  with pytest.raises(ValueError, match='exactly one'):
    zeroshot.resolve_templates(['no placeholder'])
  modelnet = builders.modelnet.package_shape_names('modelnet40')
  words = zeroshot.prompt_class_names(modelnet, 'words')
  assert words[modelnet.index('flower_pot')] == 'flower pot' and words[modelnet.index('tv_stand')] == 'tv stand'
  assert zeroshot.prompt_class_names(['night_stand'], 'raw') == ['night_stand']


@pytest.mark.parametrize('batch_size', [8, 24, 64])
def test_zero_shot_on_fixed_features_matches_numpy(mesh, batch_size):
  rng = np.random.default_rng(0)
  num_classes, dim, n = 7, 12, 45  # 45 is divisible by none of the batch sizes: the last batch is padded
  classifier = np.asarray(l2_normalize(rng.normal(size=(num_classes, dim))), np.float32)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  # Noisy copies of the class weights, so accuracies are strictly between 0 and 1.
  features = (classifier[labels] + 0.9 * rng.normal(size=(n, dim))).astype(np.float32)
  model = CG3D(encoder=FlatEncoder(dim), clip=None, num_points=5)
  split = zeroshot.split_point_features(
    model, {'params': {}}, global_batches(clouds_from_features(features, 5), labels, batch_size, mesh), mesh
  )
  np.testing.assert_array_equal(split['label'], labels)
  np.testing.assert_allclose(
    split['point_features'], features / np.linalg.norm(features, axis=1, keepdims=True), atol=1e-6
  )
  outputs = zeroshot.ZeroShotOutputs(
    scores=np.asarray(metrics.zero_shot_scores(split['point_features'], classifier)),
    labels=split['label'],
    class_names=[f'c{i}' for i in range(num_classes)],
    point_features=split['point_features'],
    classifier=classifier,
  )
  got = zeroshot.summarize(outputs)
  expected = numpy_topk_and_class_mean(features, classifier, labels, (1, 3, 5))
  assert got['count'] == n
  assert 0 < expected['top1'] < 1
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key


def test_features_equal_to_class_text_score_100_percent(mesh, tiny_clip):
  names = ['airplane', 'bathtub', 'chair', 'owl', 'penguin', 'table']
  classifier = zeroshot.text_classifier(tiny_clip.model, tiny_clip.params, tiny_clip.tokenizer, names)
  labels = np.repeat(np.arange(len(names)), 3).astype(np.int32)
  dim = classifier.shape[1]
  num_points = -(-dim // 3)
  model = CG3D(encoder=FlatEncoder(dim), clip=tiny_clip.model, num_points=num_points)
  outputs = zeroshot.run_zero_shot(
    model,
    {'params': {}},
    tiny_clip.params,
    tiny_clip.tokenizer,
    global_batches(clouds_from_features(classifier[labels], num_points), labels, 16, mesh),
    names,
    mesh,
  )
  summary = zeroshot.summarize(outputs)
  assert summary == {'top1': 1.0, 'top3': 1.0, 'top5': 1.0, 'class_mean': 1.0, 'count': len(labels)}
  # The evaluator the training loop validates with reports the same, under its prefix (classifier built once).
  evaluator = zeroshot.ZeroShotEvaluator(
    model,
    tiny_clip.params,
    tiny_clip.tokenizer,
    class_names=names,
    mesh=mesh,
    batches=lambda: global_batches(clouds_from_features(classifier[labels], num_points), labels, 8, mesh),
  )
  np.testing.assert_array_equal(evaluator.classifier, classifier)
  metrics_ = evaluator.run({'encoder': {'params': {}}, 'clip': tiny_clip.params})
  assert metrics_['val/top1'] == 1.0 and metrics_['val/count'] == len(labels)


def test_padded_sharded_split_equals_one_unpadded_batch(eval_model, tiny_shapenet, mesh):
  manual, data_dir = tiny_shapenet
  n = 26  # 13 classes x 2 test objects

  def features(batch_size):
    return zeroshot.split_point_features(
      eval_model.model,
      eval_model.encoder_vars,
      pipeline.make_eval_iterator(
        'shapenet55_cg3d',
        data_dir=data_dir,
        manual_dir=manual,
        batch_size=batch_size,
        sharding=sharding.batch_sharding(mesh),
        num_points_stored=256,
      ),
      mesh,
    )

  # The reference: every object in one unpadded batch on one device, no jit, no sharding.
  (whole,) = list(
    pipeline.eval_local_batches(
      'shapenet55_cg3d',
      data_dir=data_dir,
      manual_dir=manual,
      batch_size=n,
      num_points_stored=256,
      process_index=0,
      process_count=1,
    )
  )
  assert whole['mask'].all()
  ref = point_features(eval_model.model, eval_model.encoder_vars, whole['points'])
  for batch_size in (8, 32):  # 26 = 3 x 8 + 2 and 26 < 32: both pad the last batch
    split = features(batch_size)
    np.testing.assert_array_equal(split['label'], whole['label'])
    np.testing.assert_allclose(split['point_features'], ref, atol=2e-5)


def test_evaluate_command_on_modelnet40_fixture(tiny_checkpoint, modelnet40_prepared, tmp_path, capsys):
  """The command in this process (its cold `python -m` run is the demo's, tests/test_standalone.py)."""
  data_dir = modelnet40_prepared
  builder = builders.get_builder('modelnet40', data_dir=data_dir, manual_dir=str(modelnet_root()), skip_bad=True)
  num_test = builder.info.splits['test'].num_examples
  assert num_test == 20  # the fixture's 10 test airplanes and 10 bathtubs
  workdir = tmp_path / 'eval'
  code = run_command(
    evaluate.main,
    [
      '--config',
      'zeroshot_modelnet40',
      '--checkpoint',
      str(tiny_checkpoint),
      '--workdir',
      str(workdir),
      f'--config.eval.data_dir={data_dir}',
      '--config.eval.batch_size=8',
    ],
  )  # 20 = 2 x 8 + 4: the last batch is padded
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  assert 'class_mean_acc' in out and 'modelnet40' in out
  for name in ('results.json', 'per_class.csv', 'per_class.json', 'confusion.png'):
    assert (workdir / name).is_file(), name
  results = json.loads((workdir / 'results.json').read_text())
  with open(workdir / 'per_class.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 40
  present = [r for r in rows if r['accuracy']]
  assert sorted(r['class_name'] for r in present) == ['airplane', 'bathtub']
  assert results['num_objects'] == sum(int(r['num_objects']) for r in rows) == num_test
  assert results['class_mean_acc'] == pytest.approx(np.mean([float(r['accuracy']) for r in present]), abs=1e-9)
  assert results['top1_acc'] == pytest.approx(100 * sum(int(r['num_correct']) for r in rows) / num_test, abs=1e-9)
  assert results['templates'] == 'cg3d_zeroshot' and results['normalize_text'] is True
  with Image.open(workdir / 'confusion.png') as image:
    assert image.size[0] > 100


def _numpy_retrieval(queries, gallery, relevance, ks):
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  assert_no_near_ties(q @ g.T, relevance)
  order = np.argsort(-(q @ g.T), axis=1, kind='stable')
  recalls, aps = {k: [] for k in ks}, []
  for i in range(len(q)):
    rel = relevance[i][order[i]]
    if not rel.any():
      continue
    for k in ks:
      recalls[k].append(rel[:k].any())
    hits = np.flatnonzero(rel)
    aps.append(np.mean((np.arange(len(hits)) + 1) / (hits + 1)))
  out = {f'recall@{k}': float(np.mean(v)) for k, v in recalls.items()}
  out['mAP'] = float(np.mean(aps))
  return out


def test_retrieval_results_match_numpy():
  rng = np.random.default_rng(1)
  n, num_classes, dim = 40, 6, 8
  labels = rng.integers(0, num_classes - 1, n)  # the last class has no object: no text query for it
  text = rng.normal(size=(num_classes, dim))
  points = text[labels] + rng.normal(size=(n, dim))
  images = points + 0.8 * rng.normal(size=(n, dim))
  feats = retrieval.RetrievalFeatures(
    point_features=points,
    image_features=images,
    labels=labels,
    text_features=text,
    class_names=[str(i) for i in range(num_classes)],
  )
  results = retrieval.retrieval_results(feats, (1, 5, 10))
  same_object = np.eye(n, dtype=bool)
  expected = {
    'text_to_3d': _numpy_retrieval(text, points, np.arange(num_classes)[:, None] == labels[None], (1, 5, 10)),
    'image_to_3d': _numpy_retrieval(images, points, same_object, (1, 5, 10)),
    '3d_to_image': _numpy_retrieval(points, images, same_object, (1, 5, 10)),
    '3d_to_text': _numpy_retrieval(points, text, labels[:, None] == np.arange(num_classes)[None], (1, 5, 10)),
  }
  assert results['text_to_3d']['num_queries'] == len(np.unique(labels))
  for direction, values in expected.items():
    for key, value in values.items():
      assert results[direction][key] == pytest.approx(value, abs=1e-6), (direction, key)


def test_retrieval_and_zero_shot_on_tiny_shapenet(tiny_checkpoint, tiny_shapenet, tmp_path):
  manual, data_dir = tiny_shapenet
  config = retrieval_shapenet55.get_config()
  config.eval.update(dict(data_dir=data_dir, manual_dir=manual, num_stored_points=256, batch_size=16))
  summary = evaluate.evaluate(config, str(tiny_checkpoint), str(tmp_path / 'ret'))
  saved = json.loads((tmp_path / 'ret' / retrieval.RESULTS_FILE).read_text())
  for direction in retrieval.DIRECTIONS:
    for key in ('recall@1', 'recall@5', 'recall@10', 'mAP'):
      assert 0 <= saved[direction][key] <= 1, (direction, key)
    assert saved[direction]['recall@1'] <= saved[direction]['recall@5'] <= saved[direction]['recall@10']
  assert saved['text_to_3d']['num_queries'] == 13 and saved['image_to_3d']['num_queries'] == 26
  assert summary['3d_to_text'] == saved['3d_to_text']
  # Recall@k recomputed by brute force from the same features the command ranked (obtained as it obtains them; how
  # they agree with an unsharded pass is test_padded_sharded_split_equals_one_unpadded_batch's business, and these
  # 26 barely trained features hold near-ties that float rounding between two programs could reorder).
  model = trained.with_clip(trained.load_trained(tiny_checkpoint))
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  features = retrieval.RetrievalEvaluator(
    model.model,
    model.clip_params,
    model.clip.tokenizer,
    batches=functools.partial(
      source.eval_source(config.eval).batches, sharding.batch_sharding(mesh), model.clip.preprocess
    ),
    class_names=builders.class_names(builders.get_builder('shapenet55_cg3d', data_dir=data_dir)),
    mesh=mesh,
    templates=config.eval.templates,
  ).features({'encoder': model.encoder_vars, 'clip': model.clip_params})
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  points, images, texts = unit(features.point_features), unit(features.image_features), unit(features.text_features)
  labels = features.labels
  for direction, queries, gallery, relevant in (
    ('image_to_3d', images, points, lambda i: [i]),
    ('3d_to_image', points, images, lambda i: [i]),
    ('3d_to_text', points, texts, lambda i: [labels[i]]),
    ('text_to_3d', texts[np.unique(labels)], points, lambda q: np.flatnonzero(labels == np.unique(labels)[q])),
  ):
    best_rank = []
    for q, query in enumerate(queries):
      scores = gallery @ query
      order = np.argsort(-scores, kind='stable')
      best_rank.append(min(int(np.flatnonzero(order == r)[0]) for r in relevant(q)))
    for k in (1, 5, 10):
      assert saved[direction][f'recall@{k}'] == pytest.approx(np.mean(np.array(best_rank) < k), abs=1e-9), (
        direction,
        k,
      )
  with Image.open(tmp_path / 'ret' / retrieval.GRID_PNG) as image:
    assert image.size[1] > image.size[0]  # 8 query rows of 6 cells
  # 3D->text recall@1 is zero-shot top-1 over the same classes: the zero-shot task on the same split must agree.
  zs = zeroshot_modelnet40.zeroshot_config('shapenet55_cg3d', 256)
  zs.eval.update(dict(data_dir=data_dir, manual_dir=manual, batch_size=16))
  results = evaluate.evaluate(zs, str(tiny_checkpoint), str(tmp_path / 'zs'))
  assert results['top1_acc'] == pytest.approx(100 * saved['3d_to_text']['recall@1'], abs=1e-9)
  assert results['num_objects'] == 26


def test_evaluate_rejects_a_batch_size_the_devices_do_not_divide(tiny_checkpoint, tiny_shapenet, tmp_path):
  manual, data_dir = tiny_shapenet
  config = zeroshot_modelnet40.zeroshot_config('shapenet55_cg3d', 256)
  config.eval.update(dict(data_dir=data_dir, manual_dir=manual, batch_size=12))
  with pytest.raises(ValueError, match='multiple of the 8 devices'):
    evaluate.evaluate(config, str(tiny_checkpoint), str(tmp_path))
  assert not os.path.exists(tmp_path / 'results.json')


def test_original_pth_checkpoint_evaluates_like_the_training_checkpoint(
  eval_model, tiny_checkpoint, tiny_clip_dir, tiny_shapenet, tmp_path
):
  from cg3d_jax.weights import cg3d_pth

  config = eval_model.config
  # An exported container whose config lost its CLIP folder (as an original .pth, which records none): the CLIP
  # folder must come from the command line. (The tiny encoder's sizes are not CG3D's, so the config stays.)
  saved = config.to_dict()
  saved['clip']['path'] = None
  container = cg3d_pth.build_container(
    config.model.encoder,
    eval_model.encoder_vars['params'],
    eval_model.encoder_vars['batch_stats'],
    prompts=np.asarray(eval_model.clip_params['prompts']['tokens']),
    prompt_mode=config.clip.prompt.mode,
    config=saved,
  )
  path = cg3d_pth.write_cg3d_checkpoint(tmp_path / 'ckpt-last.pth', container)
  with pytest.raises(ValueError, match='--config.clip.path'):
    trained.with_clip(trained.load_trained(path))
  loaded = trained.with_clip(trained.load_trained(path), tiny_clip_dir)
  assert loaded.model.num_points == config.model.num_points
  np.testing.assert_array_equal(loaded.clip_params['prompts']['tokens'], eval_model.clip_params['prompts']['tokens'])
  clouds = np.random.default_rng(0).normal(size=(4, 128, 3)).astype(np.float32)
  features = [point_features(m.model, m.encoder_vars, clouds) for m in (eval_model, loaded)]
  np.testing.assert_allclose(features[1], features[0], atol=1e-6)

  manual, data_dir = tiny_shapenet
  results = []
  for i, checkpoint in enumerate((str(tiny_checkpoint), str(path))):
    zs = zeroshot_modelnet40.zeroshot_config('shapenet55_cg3d', 256)
    zs.eval.update(dict(data_dir=data_dir, manual_dir=manual, batch_size=16))
    zs.clip.path = tiny_clip_dir
    results.append(evaluate.evaluate(zs, checkpoint, str(tmp_path / f'eval{i}')))
  for key in ('top1_acc', 'top3_acc', 'top5_acc', 'class_mean_acc', 'num_objects'):
    assert results[1][key] == pytest.approx(results[0][key], abs=1e-9), key


def test_every_eval_config_names_a_known_dataset():
  from cg3d_jax.configs import zeroshot_modelnet10, zeroshot_scanobjectnn

  configs = [
    zeroshot_modelnet40.get_config(),
    zeroshot_modelnet40.get_config('ulip'),
    zeroshot_modelnet10.get_config(),
    retrieval_shapenet55.get_config(),
  ]
  configs += [zeroshot_scanobjectnn.get_config(v) for v in zeroshot_scanobjectnn.VARIANTS]
  for config in configs:
    assert config.eval.dataset in builders.SHORT_NAMES or config.eval.dataset in builders.BUILDER_CLASSES
    zeroshot.resolve_templates(config.eval.templates)
  assert zeroshot_modelnet40.get_config('ulip').eval.name_style == 'words'
  with pytest.raises(ValueError, match='variant'):
    zeroshot_scanobjectnn.get_config('pb_t50')


def test_scanobjectnn_variant_through_evaluate(tiny_checkpoint, tmp_path):
  import h5py

  from cg3d_jax.configs import zeroshot_scanobjectnn

  rng = np.random.default_rng(0)
  labels = np.arange(15).repeat(2)[:27]  # 27 objects (class 14 absent): batch 8 pads the last batch with 5 rows
  folder = tmp_path / 'h5_files' / 'main_split'
  folder.mkdir(parents=True)
  for name in ('training_objectdataset_augmentedrot_scale75.h5', 'test_objectdataset_augmentedrot_scale75.h5'):
    with h5py.File(folder / name, 'w') as f:
      f['data'] = rng.normal(size=(len(labels), 2048, 3)).astype(np.float32)
      f['label'] = labels.astype(np.int64)
  config = zeroshot_scanobjectnn.get_config('pb_t50_rs')
  config.eval.update(dict(data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'h5_files'), batch_size=8))
  summary = evaluate.evaluate(config, str(tiny_checkpoint), str(tmp_path / 'out'))
  rows = json.loads((tmp_path / 'out' / 'per_class.json').read_text())
  assert summary['dataset'] == 'pb_t50_rs' and summary['num_objects'] == 27 and summary['num_stored_points'] == 2048
  assert [r['num_objects'] for r in rows] == list(np.bincount(labels, minlength=15))
  assert rows[14]['accuracy'] is None and summary['num_classes_present'] == 14
  present = [r['accuracy'] for r in rows if r['accuracy'] is not None]
  assert summary['class_mean_acc'] == pytest.approx(np.mean(present), abs=1e-9)
