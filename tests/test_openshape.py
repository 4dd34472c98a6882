"""OpenShape's layout (issue 20): the restricted pickled-dict reader, the split files, the per-sample target sampling
and augmentation against the rules of OpenShape_code @abe5aa4 src/data.py, on procedural objects written in that
layout (np.save of a dict, as OpenShape writes them)."""

import dataclasses
import json
import os
import shutil
import types

import numpy as np
import pytest
from PIL import Image

from cg3d_jax.data import openshape, openshape_eval, openshape_stream
from cg3d_jax.data.formats.pickled_npy import read_pickled_dict
from cg3d_jax.errors import BadInputError
from cg3d_jax.synthetic.openshape_objects import write_openshape_layout

CLASSES = ('sphere', 'box', 'torus')


@pytest.fixture(scope='module')
def layout(tmp_path_factory):
  return write_openshape_layout(
    tmp_path_factory.mktemp('openshape'),
    classes=CLASSES,
    train_per_class=4,
    lvis_per_class=2,
    num_points=512,
    feature_dim=16,
  )


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_pickled_dicts_read_as_numpy_does_and_a_malicious_pickle_is_refused(layout, tmp_path):
  path = layout / 'data' / 'Objaverse' / 'sphere_000.npy'
  ours = read_pickled_dict(path)
  reference = np.load(path, allow_pickle=True).item()  # our own procedural file: safe to load the unsafe way here
  assert sorted(ours) == sorted(reference)
  for key in ('xyz', 'rgb', 'image_feat', 'thumbnail_feat'):
    np.testing.assert_array_equal(ours[key], reference[key])
    assert ours[key].dtype == np.float32
  np.testing.assert_array_equal(ours['text_feat'][0]['prompt_avg'], reference['text_feat'][0]['prompt_avg'])
  assert ours['text'] == reference['text'] and ours['blip_caption'] == reference['blip_caption']

  marker = tmp_path / 'pwned'
  evil = tmp_path / 'evil.npy'
  np.save(evil, {'xyz': np.zeros((4, 3)), 'payload': _Exploit(marker)}, allow_pickle=True)
  with pytest.raises(BadInputError, match=r'evil\.npy: refused: it names (posix|os)\.system'):
    read_pickled_dict(evil)
  assert not marker.exists()  # nothing in the file ran

  truncated = tmp_path / 'truncated.npy'
  truncated.write_bytes(path.read_bytes()[:300])
  with pytest.raises(BadInputError, match='truncated.npy: is not a readable pickled-dict'):
    read_pickled_dict(truncated)
  plain = tmp_path / 'plain.npy'
  np.save(plain, np.zeros((3, 3), np.float32))
  with pytest.raises(BadInputError, match='plain float32 array, expected a pickled dict'):
    read_pickled_dict(plain)


def test_split_files_and_shapes_read_exactly(layout):
  train = openshape.read_split(layout / 'meta_data' / 'split' / 'train_all.json')
  assert len(train) == 4 * len(CLASSES)
  assert {s.dataset for s in train} == {'Objaverse', 'ShapeNet'} and all(s.path.is_file() for s in train)
  lvis = openshape.read_split(layout / 'meta_data' / 'split' / 'lvis.json', lvis=True)
  assert sorted({s.category for s in lvis}) == sorted(CLASSES) and len(lvis) == 2 * len(CLASSES)
  table = np.load(layout / 'meta_data' / 'lvis_cat_name_pt_feat.npy')
  assert table.shape == (len(CLASSES), 16)
  data = openshape.read_shape(lvis[0].path, objaverse=True)
  assert data['xyz'].shape == data['rgb'].shape == (512, 3) and data['image_feat'].shape == (12, 16)
  flags = openshape.read_text_filter(layout / 'meta_data' / 'gpt4_filtering.json')
  assert set(flags.values()) == {'Y', 'N'}

  broken = layout / 'meta_data' / 'split' / 'broken.json'
  broken.write_text(json.dumps([{'id': 'x', 'dataset': 'Objaverse'}]))
  with pytest.raises(BadInputError, match=r"broken.json: entry 0 .* expected the keys \['id', 'dataset', 'group'"):
    openshape.read_split(broken)


def test_points_swap_y_and_z_and_augment_as_openshape(layout):
  path = layout / 'data' / 'ShapeNet' / 'sphere_001.npy'
  data = openshape.read_shape(path, objaverse=False)
  plain = openshape.SampleConfig(num_points=256, normalize=False, augment=False, random_z_rotate=False)
  points = openshape.sample_points(data, plain, np.random.default_rng(3), train=True, path=path)
  chosen = np.random.default_rng(3).choice(512, 256, replace=False)  # the same draw, by hand
  np.testing.assert_array_equal(points[:, :3], data['xyz'][chosen][:, [0, 2, 1]])  # y-up -> z-up
  np.testing.assert_array_equal(
    openshape.sample_points(
      data,
      openshape.SampleConfig(num_points=256, normalize=False, augment=False, random_z_rotate=False, y_up=False),
      np.random.default_rng(3),
      train=True,
    )[:, :3],
    data['xyz'][chosen],
  )  # Uni3D / ULIP-2 convention: stored axes
  # A rotation about z keeps z and every point's distance from the z axis.
  turned = openshape.sample_points(
    data, openshape.SampleConfig(num_points=256, augment=False, use_color=False), np.random.default_rng(4), train=True
  )
  unturned = openshape.sample_points(
    data,
    openshape.SampleConfig(num_points=256, augment=False, use_color=False, random_z_rotate=False),
    np.random.default_rng(4),
    train=True,
  )
  np.testing.assert_allclose(turned[:, 2], unturned[:, 2], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(turned[:, :2], axis=1), np.linalg.norm(unturned[:, :2], axis=1), atol=1e-5)
  assert not np.allclose(turned, unturned, atol=1e-3)
  # Colour replaced by 0.4 in about half the training samples, never in evaluation.
  rng = np.random.default_rng(5)
  config = openshape.SampleConfig(num_points=64)
  dropped = [np.all(openshape.sample_points(data, config, rng, train=True)[:, 3:] == 0.4) for _ in range(400)]
  assert 0.42 < np.mean(dropped) < 0.58
  assert not np.all(openshape.sample_points(data, config, rng, train=False)[:, 3:] == 0.4)
  # Point dropout moves up to 87.5% of the points onto the first one.
  rng = np.random.default_rng(6)
  xyz = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
  fractions = []
  for _ in range(300):
    out = openshape.augment_pc(xyz, rng)
    fractions.append(np.mean(np.all(np.isclose(out, out[0], atol=1e-6), axis=1)))
  assert max(fractions) <= 0.875 + 0.05 and 0.38 < np.mean(fractions) < 0.50  # uniform ratio in [0, 0.875]


def _draws(shape, data, config, flags, n=3000, seed=0):
  rng = np.random.default_rng(seed)
  return [openshape.make_example(shape, data, config, rng, flags=flags) for _ in range(n)]


def test_targets_are_sampled_by_openshape_rules(layout):
  train = openshape.read_split(layout / 'meta_data' / 'split' / 'train_all.json')
  flags = openshape.read_text_filter(layout / 'meta_data' / 'gpt4_filtering.json')
  config = openshape.SampleConfig(num_points=32)
  by_id = {s.id: s for s in train}

  # Objaverse, name kept, both captions present: text[0], one caption, one retrieval text; 1/3 each.
  shape = by_id['box_002']
  assert shape.dataset == 'Objaverse' and flags[shape.id] == 'Y'
  data = openshape.read_shape(shape.path, objaverse=True)
  draws = _draws(shape, data, config, flags)
  texts = [d['text'] for d in draws]
  assert np.mean([t == 'a box' for t in texts]) == pytest.approx(1 / 3, abs=0.03)
  assert np.mean([t in ('a 3d model of a box', 'a box shape') for t in texts]) == pytest.approx(1 / 3, abs=0.03)
  assert np.mean([t == 'a 3d model of a box' for t in texts]) == pytest.approx(1 / 6, abs=0.03)
  # Objaverse image target: the thumbnail half the time, else one of the 12 views.
  thumb = [np.array_equal(d['image_feat'], data['thumbnail_feat']) for d in draws]
  assert np.mean(thumb) == pytest.approx(0.5, abs=0.03)
  assert all(any(np.array_equal(d['image_feat'], v) for v in data['image_feat']) for d, t in zip(draws, thumb) if not t)
  # The text feature is the chosen text's own: the name's prompt_avg, a retrieval text's 'original'.
  for d in draws[:50]:
    if d['text'] == 'a box':
      np.testing.assert_array_equal(d['text_feat'], data['text_feat'][0]['prompt_avg'])
    elif d['text'] in data['retrieval_text']:
      i = data['retrieval_text'].index(d['text'])
      np.testing.assert_array_equal(d['text_feat'], data['retrieval_text_feat'][i]['original'])

  # GPT-4 flag "N": the Objaverse name is never a target; an empty MSFT caption gives no caption that time.
  shape = by_id['box_000']
  assert shape.dataset == 'Objaverse' and flags[shape.id] == 'N'
  data = openshape.read_shape(shape.path, objaverse=True)
  assert data['msft_caption'] == ''
  texts = [d['text'] for d in _draws(shape, data, config, flags)]
  assert 'a box' not in texts
  # Half the draws have the BLIP caption and the retrieval text (1/2 each), half only the retrieval text.
  assert np.mean([t == 'a 3d model of a box' for t in texts]) == pytest.approx(0.25, abs=0.03)

  # Other datasets: no thumbnail, a random view.
  shape = by_id['box_001']
  assert shape.dataset == 'ShapeNet'
  data = openshape.read_shape(shape.path, objaverse=False)
  draws = _draws(shape, data, config, flags, n=300)
  assert all(any(np.array_equal(d['image_feat'], v) for v in data['image_feat']) for d in draws)
  assert all(d['has_text'] for d in draws)
  # No text source at all: no text target, a zero feature and has_text False.
  none = openshape.make_example(
    shape, data, openshape.SampleConfig(num_points=32, text_source=()), np.random.default_rng(0)
  )
  assert not none['has_text'] and not np.any(none['text_feat'])


# --- evaluation sets in both layouts ------------------------------------------------------------------------------


def test_evaluation_sets_read_in_each_layout(layout, tmp_path):
  """OpenShape's LVIS (sorted categories, precomputed table rows in that order), Uni3D's list (ids from the file,
  the same files, stored axes), OpenShape's ModelNet40 (classes in the feature dict's key order, rgb / 255) and
  ScanObjectNN (OpenShape's 15-name order, resampled with replacement, grey without rgb)."""
  lvis = openshape_eval.lvis_openshape(layout)
  entries = json.loads((layout / 'meta_data' / 'split' / 'lvis.json').read_text())
  assert lvis.class_names == sorted(CLASSES) and len(lvis) == len(entries) and lvis.y_up
  assert [lvis.class_names[i] for i in lvis.labels] == [e['category'] for e in entries]
  np.testing.assert_array_equal(lvis.class_features, np.load(layout / 'meta_data' / 'lvis_cat_name_pt_feat.npy'))

  uni3d = openshape_eval.lvis_uni3d(layout / 'lvis_testset.txt')
  lines = [line.split(',') for line in (layout / 'lvis_testset.txt').read_text().splitlines()]
  assert uni3d.class_names == list(CLASSES) and list(uni3d.labels) == [int(p[0]) for p in lines]
  assert uni3d.class_features is None and not uni3d.y_up
  xyz, rgb = uni3d.cloud(0)
  stored = np.load(layout / lines[0][3].lstrip('/'), allow_pickle=True).item()  # our own procedural file
  np.testing.assert_array_equal(xyz, stored['xyz'])
  np.testing.assert_array_equal(rgb, stored['rgb'])
  points = openshape_eval.eval_points(xyz, rgb, 512, np.random.default_rng(0), y_up=True, use_color=True)
  assert points.shape == (512, 6)  # every stored point, in order: the swap and the unit sphere by hand
  swapped = stored['xyz'][:, [0, 2, 1]].astype(np.float64)
  swapped -= swapped.mean(axis=0)
  np.testing.assert_allclose(points[:, :3], swapped / np.linalg.norm(swapped, axis=1).max(), atol=1e-6)

  modelnet = openshape_eval.modelnet40_openshape(layout)
  features = np.load(layout / 'meta_data' / 'modelnet40' / 'cat_name_pt_feat.npy', allow_pickle=True).item()
  assert modelnet.class_names == list(features) == list(reversed(CLASSES))
  split = json.loads((layout / 'meta_data' / 'modelnet40' / 'test_split.json').read_text())
  assert [modelnet.class_names[i] for i in modelnet.labels] == [e['category'] for e in split]
  np.testing.assert_allclose(modelnet.cloud(0)[1], 0.4)  # 102 / 255

  scan = openshape_eval.scanobjectnn_openshape(layout)
  assert scan.class_names == list(openshape_eval.SCANOBJECTNN_CLASSES) and scan.class_features.shape == (15, 16)
  assert scan.replace
  np.testing.assert_allclose(scan.cloud(0)[1], 0.4)  # no rgb stored: OpenShape's grey
  points = openshape_eval.eval_points(
    *scan.cloud(0), 600, np.random.default_rng(1), y_up=True, use_color=False, replace=True
  )
  assert points.shape == (600, 3)  # more than stored: drawn with replacement

  bad = tmp_path / 'lvis_testset.txt'
  bad.write_text('0,sphere,a,/x.npy\nseven,box,b,/y.npy\n')
  with pytest.raises(BadInputError, match=r"lvis_testset.txt: line 2 is 'seven,box,b,/y.npy', expected cate_id"):
    openshape_eval.lvis_uni3d(bad)
  bad.write_text('0,sphere,a,/x.npy\n2,box,b,/y.npy\n')
  with pytest.raises(BadInputError, match=r'class ids are not 0..1'):
    openshape_eval.lvis_uni3d(bad)


def test_eval_batches_are_padded_masked_and_split_over_processes(layout):
  evalset = openshape_eval.lvis_openshape(layout)
  n = len(evalset)
  single = list(
    openshape_stream.eval_local_batches(
      evalset, batch_size=4, num_points=128, use_color=True, process_index=0, process_count=1
    )
  )
  assert len(single) == -(-n // 4) and sum(int(b['mask'].sum()) for b in single) == n
  halves = [
    list(
      openshape_stream.eval_local_batches(
        evalset, batch_size=4, num_points=128, use_color=True, process_index=p, process_count=2
      )
    )
    for p in range(2)
  ]
  for whole, first, second in zip(single, *halves):
    for key in ('points', 'label', 'mask'):
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))
  labels = np.concatenate([b['label'][b['mask']] for b in single])
  np.testing.assert_array_equal(labels, evalset.labels)


# --- the training stream ------------------------------------------------------------------------------------------


def _source(layout, **overrides):
  from cg3d_jax.configs import pretrain_openshape

  config = pretrain_openshape.get_config()
  config.data.manual_dir = str(layout)
  config.data.num_stored_points = 128
  for key, value in overrides.items():
    config.data.openshape[key] = value
  return openshape_stream.open_train_source(config.data)


def test_training_stream_is_openshapes_draws_resumable_and_the_same_for_any_process_count(layout):
  source = _source(layout)
  assert source.feature_dim == 16 and len(source.shapes) == 4 * len(CLASSES)
  stream = openshape_stream.train_local_batches(source, global_batch_size=8, seed=3, process_index=0, process_count=1)
  batches = [next(stream) for _ in range(3)]  # 24 examples: two epochs of 12
  assert batches[0]['points'].shape == (8, 128, 6) and batches[0]['has_text'].dtype == bool
  # Each row is make_example of the epoch's permutation entry, with the generator seeded (seed, epoch, index).
  n = len(source.shapes)
  for position in (0, 13, 23):
    epoch, offset = divmod(position, n)
    index = np.random.default_rng((3, epoch, openshape_stream._PERMUTATION_TAG)).permutation(n)[offset]
    shape = source.shapes[index]
    expected = openshape.make_example(
      shape,
      openshape.read_shape(shape.path, objaverse=shape.dataset == 'Objaverse'),
      source.sample,
      np.random.default_rng((3, epoch, index)),
      flags=source.flags,
    )
    row = batches[position // 8]
    for key in ('points', 'text_feat', 'has_text', 'image_feat'):
      np.testing.assert_array_equal(row[key][position % 8], expected[key])
  # Every shape once per epoch.
  first_epoch = np.concatenate([batches[0]['image_feat'], batches[1]['image_feat'][:4]])
  assert len({tuple(np.round(f, 5)) for f in first_epoch}) == n

  resumed = next(
    openshape_stream.train_local_batches(
      source, global_batch_size=8, seed=3, start_step=2, process_index=0, process_count=1
    )
  )
  halves = [
    next(
      openshape_stream.train_local_batches(
        source, global_batch_size=8, seed=3, start_step=2, process_index=p, process_count=2
      )
    )
    for p in range(2)
  ]
  for key in batches[2]:
    np.testing.assert_array_equal(resumed[key], batches[2][key])
    np.testing.assert_array_equal(np.concatenate([halves[0][key], halves[1][key]]), batches[2][key])

  xyz_only = next(
    openshape_stream.train_local_batches(
      _source(layout, use_color=False), global_batch_size=4, seed=0, process_index=0, process_count=1
    )
  )
  assert xyz_only['points'].shape == (4, 128, 3)


def test_text_loss_over_the_samples_with_text_is_openshapes(layout):
  """contrastive_loss(valid=has_text) equals OpenShape's contras_loss on pred_feat[has_text_idx] vs the stacked text
  features (PyTorch, written as OpenShape_code @abe5aa4 src/train.py computes it on one GPU)."""
  import torch
  import torch.nn.functional as F

  from cg3d_jax.training.losses import contrastive_loss

  rng = np.random.default_rng(0)
  pred, text = rng.standard_normal((2, 10, 16))
  has_text = rng.random(10) < 0.6
  scale = 14.28

  def openshape_loss(feat1, feat2):
    logits = scale * F.normalize(feat1, dim=1) @ F.normalize(feat2, dim=1).T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

  idx = np.nonzero(has_text)[0]
  expected = openshape_loss(torch.tensor(pred)[idx], torch.tensor(text)[idx]).item()
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  ours = contrastive_loss(unit(pred), unit(text), scale, valid=has_text)
  assert float(ours) == pytest.approx(expected, rel=1e-5)
  assert float(contrastive_loss(unit(pred), unit(text), scale, valid=np.zeros(10, bool))) == 0.0


# --- a demo-sized run against stored features, evaluated as the peers report -----------------------------------

TINY_RUN = [
  '--config.data.num_stored_points=512',
  '--config.data.openshape.workers=4',
  '--config.model.embed_dim=32',
  '--config.model.num_points=128',
  '--config.model.point_transformer.width=32',
  '--config.model.point_transformer.depth=2',
  '--config.model.point_transformer.num_heads=2',
  '--config.model.point_transformer.num_groups=16',
  '--config.model.point_transformer.group_size=16',
  '--config.model.point_transformer.encoder_dim=32',
  '--config.train.batch_size=16',
  '--config.train.total_steps=80',
  '--config.train.log_every=40',
  '--config.train.encoder_optim.lr=0.002',
  '--config.train.encoder_optim.end_lr=0.0001',
  '--config.train.encoder_optim.warmup_epochs=0',
  '--config.eval.every_steps=0',
  '--config.checkpoint.async_save=false',
  '--config.logging.tensorboard=false',
]


# The stored-feature run's checkpoints: every 39 steps, so that steps 39 and 78 are kept beside the final 80th; the
# resume test goes on from 78 for the last two steps.
RESUMED_AT = 78


def _stored_feature_args(workdir, root) -> list[str]:
  """The one command the stored-feature run, its pod and its restart are started with (every step logged)."""
  return [
    '--config',
    'pretrain_openshape',
    '--workdir',
    str(workdir),
    f'--config.data.manual_dir={root}',
    *TINY_RUN,
    '--config.train.log_every=1',
    f'--config.checkpoint.every_steps={RESUMED_AT // 2}',
  ]


@pytest.fixture(scope='module')
def stored_feature_run(tmp_path_factory):
  """`train --config pretrain_openshape` (one process, 8 devices) on procedural objects in OpenShape's layout whose
  features are a small random CLIP's (no CLIP runs in training): root (the layout), clip (its folder), workdir (the
  run, checkpoints at 39, 78 and 80). Six classes: chance is 1/6. Trained once for the learning and the pod tests."""
  from cg3d_jax import train
  from cg3d_jax.synthetic.random_clip import write_random_clip
  from tests.conftest import run_command

  tmp_path = tmp_path_factory.mktemp('stored_feature_run')
  clip = write_random_clip(tmp_path / 'clip', projection_dim=32, image_size=32, patch_size=8)
  root = write_openshape_layout(
    tmp_path / 'data', train_per_class=8, lvis_per_class=4, num_points=1024, seed=1, render_size=32, clip_folder=clip
  )
  workdir = tmp_path / 'run'
  assert run_command(train.main, _stored_feature_args(workdir, root)) == 0
  return types.SimpleNamespace(root=root, clip=clip, workdir=workdir)


def test_a_stored_feature_run_learns_and_scores_on_each_layout(stored_feature_run, tmp_path, capsys):
  """The stored-feature run learned: its last five losses are below its first five; then `evaluate` with OpenShape's
  precomputed LVIS class features, with the bare class names through that CLIP, on its ModelNet40 files, and on
  Uni3D's list (which has no precomputed features: one clear error)."""
  from cg3d_jax import evaluate
  from tests.conftest import run_command

  def openshape_classes():
    return np.load(root / 'meta_data' / 'modelnet40' / 'cat_name_pt_feat.npy', allow_pickle=True).item()

  root, clip, workdir = stored_feature_run.root, stored_feature_run.clip, stored_feature_run.workdir
  log = [json.loads(line) for line in (workdir / 'train.jsonl').read_text().splitlines()]
  losses = [row['loss'] for row in log if 'loss' in row]
  assert len(losses) == 80 and np.mean(losses[-5:]) < np.mean(losses[:5]) and 0 < log[-1]['text_fraction'] <= 1

  results = {}
  for name, config, extra in (
    ('lvis', 'zeroshot_objaverse_lvis', []),
    ('lvis_names', 'zeroshot_objaverse_lvis:names', [f'--config.clip.path={clip}']),
    ('modelnet', 'zeroshot_openshape:modelnet40', []),
  ):
    assert (
      run_command(
        evaluate.main,
        [
          '--config',
          config,
          '--checkpoint',
          str(workdir),
          '--workdir',
          str(tmp_path / name),
          f'--config.eval.manual_dir={root}',
          '--config.eval.num_stored_points=512',
          '--config.eval.batch_size=8',
          *extra,
        ],
      )
      == 0
    )
    results[name] = json.loads((tmp_path / name / 'results.json').read_text())
  lvis = results['lvis']
  assert lvis['num_objects'] == 24 and lvis['prompts'] == 'precomputed' and lvis['y_up_swapped'] is True
  assert lvis['clip'] is None  # precomputed class features: no CLIP was loaded
  assert lvis['top1_acc'] >= 60 and lvis['top5_acc'] >= lvis['top3_acc'] >= lvis['top1_acc']
  names = results['lvis_names']  # the names' own features are not the prompt-averaged ones trained against
  assert names['prompts'] == 'names' and names['clip']['path'] and names['top1_acc'] >= 40
  # OpenShape's ModelNet40 clouds are grey, and 80 steps learn colour before shape: only the reading is checked.
  assert results['modelnet']['num_objects'] == 12 and results['modelnet']['num_classes'] == len(openshape_classes())

  # predict with the coloured encoder: an xyz + rgb text file's colours go in; an xyz-only file gets OpenShape's grey.
  from cg3d_jax import predict

  shape = np.load(root / 'data' / 'Objaverse' / 'torus_008.npy', allow_pickle=True).item()  # our own file
  np.savetxt(
    tmp_path / 'torus.txt',
    np.concatenate([shape['xyz'][:, [0, 2, 1]], np.round(shape['rgb'] * 255)], axis=1),
    fmt=['%.5f'] * 3 + ['%d'] * 3,
  )
  np.savetxt(tmp_path / 'grey.txt', shape['xyz'][:, [0, 2, 1]], fmt='%.5f')
  for name, colours in (('torus', 'from the file'), ('grey', 'none in the file: grey 0.4')):
    columns = 'xyz' if name == 'grey' else 'xyz,rgb'
    assert (
      run_command(
        predict.main,
        [
          '--checkpoint',
          str(workdir),
          f'--clip_path={clip}',
          '--points',
          str(tmp_path / f'{name}.txt'),
          '--columns',
          columns,
          '--labels',
          'torus,box',
          '--json',
          str(tmp_path / f'{name}.json'),
        ],
      )
      == 0
    )
    assert json.loads((tmp_path / f'{name}.json').read_text())['colours'] == colours

  # The coloured encoder exports in the original format and loads strictly into the 6-channel twin, same features.
  from cg3d_jax import export

  capsys.readouterr()
  assert (
    run_command(export.main, ['--checkpoint', str(workdir), '--out', str(tmp_path / 'coloured.pth'), '--verify']) == 0
  )
  printed = capsys.readouterr().out
  assert 'loads into the PyTorch twin with strict=True' in printed and 'verify: OK' in printed

  assert (
    run_command(
      evaluate.main,
      [
        '--config',
        'zeroshot_objaverse_lvis:uni3d',
        '--checkpoint',
        str(workdir),
        '--workdir',
        str(tmp_path / 'uni3d'),
        f'--config.eval.manual_dir={root}',
        '--config.eval.prompts=precomputed',
      ],
    )
    == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('error: ') and 'lvis_testset.txt stores no class-name features' in err[-1]


def test_renders_train_the_prompts_through_the_image_tower(tmp_path):
  """pretrain_openshape:renders (CG3D's method on OpenShape's data): a random one of the shape's 12 renders, through
  the CLIP's preprocessing, is the batch's image; the stored text features are the text targets; the prompts and the
  encoder both train; no stored image feature is used."""
  import jax

  from cg3d_jax.clip.loaded_clip import load_clip
  from cg3d_jax.configs import pretrain_openshape
  from cg3d_jax.synthetic.random_clip import write_random_clip
  from cg3d_jax.training import pretrain
  from cg3d_jax.training.recipes import cg3d
  from tests.conftest import apply_overrides

  root = write_openshape_layout(
    tmp_path / 'data',
    classes=CLASSES,
    train_per_class=4,
    lvis_per_class=1,
    num_points=512,
    feature_dim=32,
    render_size=32,
  )
  clip = write_random_clip(tmp_path / 'clip', projection_dim=32, image_size=32, patch_size=8)
  config = apply_overrides(
    pretrain_openshape.get_config('renders'),
    {
      'clip.path': clip,
      'data.manual_dir': str(root),
      'data.num_stored_points': 256,
      'model.embed_dim': 32,
      'model.num_points': 64,
      'train.batch_size': 8,
      'train.total_steps': 3,
      'train.log_every': 1,
      'eval.every_steps': 3,
      'eval.batch_size': 8,
      'eval.num_stored_points': 256,
      'checkpoint.async_save': False,
      'logging.tensorboard': False,
    },
  )
  config.model.point_transformer.update(
    dict(width=32, depth=2, num_heads=2, num_groups=16, group_size=8, encoder_dim=32)
  )

  source = dataclasses.replace(openshape_stream.open_train_source(config.data), preprocess=load_clip(clip).preprocess)
  batch = next(
    openshape_stream.train_local_batches(source, global_batch_size=4, seed=0, process_index=0, process_count=1)
  )
  assert 'image_feat' not in batch and batch['image'].shape == (4, 32, 32, 3)
  index = np.random.default_rng((0, 0, openshape_stream._PERMUTATION_TAG)).permutation(len(source.shapes))[0]
  shape, rng = source.shapes[index], np.random.default_rng((0, 0, index))
  openshape.make_example(
    shape,
    openshape.read_shape(shape.path, objaverse=shape.dataset == 'Objaverse'),
    source.sample,
    rng,
    flags=source.flags,
  )  # the draws before the view's
  render = root / 'rendered_images' / shape.id / f'colors_{rng.integers(12)}.png'
  np.testing.assert_array_equal(batch['image'][0], source.preprocess(Image.open(render)))

  initial = cg3d.build_setup(config, train_classes=None, steps_per_epoch=1).state['params']
  result = pretrain.train(config, str(tmp_path / 'run'))
  assert np.isfinite(result['loss']) and result['loss/image_text'] > 0 and result['val/count'] == len(CLASSES)
  from cg3d_jax import checkpoints

  trained = checkpoints.read_step(tmp_path / 'run').state['params']
  for part in ('encoder', 'clip'):
    moved = jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), trained[part], initial[part]
    )
    assert max(jax.tree.leaves(moved)) > 0, part

  missing = root / 'rendered_images' / shape.id / 'colors_3.png'
  missing.unlink()
  with pytest.raises(BadInputError, match=r'colors_3.png: is missing: with data.openshape.renders set'):
    openshape.read_render(missing, source.preprocess)


def test_openshape_settings_fail_before_a_model_is_built(layout, tmp_path):
  from cg3d_jax.configs import pretrain_openshape
  from cg3d_jax.errors import ConfigError
  from cg3d_jax.training import pretrain
  from tests.conftest import apply_overrides

  def train(**overrides):
    config = apply_overrides(
      pretrain_openshape.get_config(),
      {'data.manual_dir': str(layout), 'train.batch_size': 8, 'data.num_stored_points': 128, **overrides},
    )
    pretrain.train(config, str(tmp_path / 'run'))

  with pytest.raises(
    ConfigError,
    match=r'config.model.embed_dim=1280 but the stored CLIP features are '
    r'16-dimensional.*--config.model.embed_dim=16',
  ):
    train()
  with pytest.raises(
    ConfigError,
    match=r'config.model.in_channels=6 but the data gives 3 channels per point '
    r'\(config.data.openshape.use_color=False\)',
  ):
    train(**{'model.embed_dim': 16, 'data.openshape.use_color': False})
  with pytest.raises(ConfigError, match=r"data.openshape.renders='renders_here': .*renders_here is not a folder"):
    train(**{'data.openshape.renders': 'renders_here'})
  with pytest.raises(ConfigError, match=r'config.data.manual_dir is not set'):
    train(**{'data.manual_dir': None})
  with pytest.raises(ConfigError, match=r'has 12 shapes, fewer than one global batch of 16'):
    train(**{'train.batch_size': 16})
  assert not (tmp_path / 'run').exists()


def test_a_pod_of_two_processes_trains_as_one_process_on_the_same_global_batches(stored_feature_run, tmp_path):
  """launch/local_multihost.sh 2 4 on OpenShape's layout, from scratch, with the stored-feature run's own command
  stopped after two steps: each process reads only its rows of every global batch, and the losses of steps 1 and 2
  equal the one-process x 8-device run's (the same initial state, and the stream's global batch does not depend on
  the process count), to the last bits that gloo's reduction order changes. Two steps, so that the schedule gives
  the same first update whatever the total (cosine from the peak, no warm-up): step 2's loss is after one update.
  Shown to fail with process 1 reading the rows one before its own (step 1's loss) and with the stream restarted one
  step early (step 79's)."""
  import jax

  from cg3d_jax import train
  from tests.conftest import run_command
  from tests.test_multihost import _read_losses, launched_pod

  run = stored_feature_run
  launched_pod(
    tmp_path / 'logs',
    2,
    4,
    [*_stored_feature_args(tmp_path / 'pod', run.root), '--config.train.total_steps=2'],
    CG3D_HEARTBEAT_TIMEOUT_S='120',
  )
  got, want = _read_losses(tmp_path / 'pod'), _read_losses(run.workdir)
  assert sorted(got) == [1, 2]
  for step in got:
    for key in ('loss', 'loss/point_text', 'loss/point_image'):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-4, err_msg=f'step {step} {key}')
  assert len({round(got[s]['loss'], 6) for s in got}) > 1

  # Stopped after step 78 (the run's own checkpoint) and started again with the same command: steps 79-80 and the
  # final state are bitwise the uninterrupted run's (the stream restarts at the global step; the state, its RNG and
  # the temperature restore).
  from cg3d_jax import checkpoints

  resumed = tmp_path / 'resumed'
  shutil.copytree(run.workdir / 'checkpoints' / str(RESUMED_AT), resumed / 'checkpoints' / str(RESUMED_AT))
  assert run_command(train.main, _stored_feature_args(resumed, run.root)) == 0
  again = _read_losses(resumed)
  assert sorted(again) == [RESUMED_AT + 1, 80]
  assert [again[s]['loss'] for s in again] == [want[s]['loss'] for s in again]
  final = [checkpoints.read_step(path, 80).state for path in (run.workdir, resumed)]
  for a, b in zip(*(jax.tree.leaves(state) for state in final)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(final[0]['params']['logit_scale']) != pytest.approx(np.log(14.28))  # the temperature trained


def test_a_layout_with_a_clips_features_scores_through_that_clip(tmp_path):
  """Procedural objects whose every feature is a random CLIP's, computed by transformers' PyTorch model as OpenShape
  computes its OpenCLIP features: the precomputed LVIS table equals what the package's Flax CLIP gives for the
  'templates' prompt set (64 templates), the 'names' set is the bare names' features, and a shape's image features
  are its renders' through the package's CLIP preprocessing and image tower."""
  from cg3d_jax.clip.loaded_clip import load_clip
  from cg3d_jax.configs import zeroshot_objaverse_lvis
  from cg3d_jax.evaluators.zeroshot import class_weights
  from cg3d_jax.models.cg3d import CG3D
  from cg3d_jax.synthetic.openshape_objects import ClipFeatures
  from cg3d_jax.synthetic.random_clip import write_random_clip

  clip_dir = write_random_clip(tmp_path / 'clip', projection_dim=32, image_size=32, patch_size=8)
  root = write_openshape_layout(
    tmp_path / 'data',
    classes=CLASSES,
    train_per_class=2,
    lvis_per_class=1,
    num_points=256,
    render_size=32,
    clip_folder=clip_dir,
  )
  evalset = openshape_eval.lvis_openshape(root)
  clip = load_clip(clip_dir, prompt_mode='none')
  model = CG3D(encoder=None, clip=clip.model, num_points=64)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731

  ev = zeroshot_objaverse_lvis.get_config().eval
  precomputed = class_weights(evalset, ev)
  ev.prompts = 'templates'  # 'ulip': the writer's prompt engineering
  np.testing.assert_allclose(class_weights(evalset, ev, model, clip.params, clip.tokenizer), precomputed, atol=2e-5)
  ev.prompts = 'names'
  np.testing.assert_allclose(
    class_weights(evalset, ev, model, clip.params, clip.tokenizer),
    unit(ClipFeatures(clip_dir).text(evalset.class_names)),
    atol=2e-5,
  )

  shape = openshape.read_split(root / 'meta_data' / 'split' / 'lvis.json', lvis=True)[0]
  data = read_pickled_dict(shape.path)
  views = np.stack(
    [clip.preprocess(Image.open(root / 'rendered_images' / shape.id / f'colors_{k}.png')) for k in range(12)]
  )
  np.testing.assert_allclose(np.asarray(model.image_features(clip.params, views)), unit(data['image_feat']), atol=1e-4)
  np.testing.assert_array_equal(data['thumbnail_feat'], data['image_feat'][0])
