"""The procedural ShapeNet-55 folder, its builder and the per-host pipelines, on one tiny synthetic build.

Expected values come from the files on disk (npy clouds, PNG renders read with PIL) and NumPy re-computations.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from cg3d_jax.configs import base
from cg3d_jax.data import builders, host_transforms, pipeline
from cg3d_jax.synthetic import objects, shapes
from tests.conftest import modelnet_root

SETTINGS = objects.SyntheticSettings(
  seed=3, num_train_per_class=2, num_test_per_class=1, num_points=512, image_size=64, num_views=5
)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
IMAGE_KW = dict(image_size=64, image_mean=MEAN, image_std=STD)


@pytest.fixture(scope='session')
def synth(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic')
  manual = objects.ensure_synthetic_shapenet(root / 'manual', SETTINGS)
  data_dir = str(root / 'tfds')
  builder = builders.get_builder('shapenet55_cg3d', data_dir=data_dir, manual_dir=str(manual))
  return manual, data_dir, builder


def _data_config(synth, **overrides):
  manual, data_dir, _ = synth
  c = base.get_base_config().data
  c.update(dict(manual_dir=str(manual), data_dir=data_dir, num_stored_points=256, shuffle_buffer=8, **overrides))
  return c


def _files(manual):
  """key -> (label, normalised cloud, [view arrays]) from the raw files, in label order of shape_names.txt."""
  names = (manual / 'shape_names.txt').read_text().split()
  out = {}
  for split in ('train', 'test'):
    for line in (manual / f'{split}_img.txt').read_text().split():
      synset, model = line[:-4].split('-')
      label = int(synset) - 90000000
      cloud = np.load(manual / 'shapenet_pc' / line)
      views = [
        np.asarray(Image.open(manual / 'img' / synset / model / f'{v:03d}.png').convert('RGB'))
        for v in range(SETTINGS.num_views)
      ]
      out[line] = (names.index(list(shapes.FAMILIES)[label]), cloud, views, split)
  return out


def _identify(files, points):
  """Which stored object a resampled, un-augmented cloud came from (its rows are rows of that object)."""
  for key, (_, cloud, _, _) in files.items():
    ref = host_transforms.normalize_unit_sphere_np(cloud)
    if np.abs(ref - points[0]).max(axis=1).min() < 1e-5 and np.abs(ref - points[1]).max(axis=1).min() < 1e-5:
      return key
  raise AssertionError('cloud matches no stored object')


def _local(synth, steps, **kwargs):
  c = kwargs.pop('config', None) or _data_config(synth)
  kw = dict(global_batch_size=8, num_templates=63, seed=11, **IMAGE_KW)
  kw.update(kwargs)
  ds = pipeline.pretrain_local_dataset(c, **kw)
  return [b for _, b in zip(range(steps), ds.as_numpy_iterator())]


# ------------------------------------------------------------------------------------------------ synthetic data


def test_synthetic_objects_are_deterministic_from_the_seed(tmp_path):
  small = objects.SyntheticSettings(
    seed=5,
    num_train_per_class=1,
    num_test_per_class=1,
    num_points=128,
    image_size=24,
    num_views=2,
    families=('torus', 'mug'),
  )
  a = objects.write_synthetic_shapenet(tmp_path / 'a', small)
  b = objects.write_synthetic_shapenet(tmp_path / 'b', small)
  files_a = sorted(p.relative_to(a) for p in a.rglob('*') if p.is_file())
  assert files_a == sorted(p.relative_to(b) for p in b.rglob('*') if p.is_file())
  assert len(files_a) == 4 * 3 + 5  # 4 objects (npy + 2 views each), 5 metadata files
  for rel in files_a:
    assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
  other, _ = objects.make_object(objects.SyntheticSettings(seed=6, num_points=128, image_size=24), 'torus', 0)
  same, _ = objects.make_object(small, 'torus', 0)
  assert np.abs(other - same).max() > 0.05


def test_synthetic_families_differ_in_geometry(synth):
  # A fixed, rotation-invariant descriptor (histograms of pairwise distances and of radii) with 1-nearest-neighbour
  # from 2 training objects per family must beat chance (1/13) by far: the families are not just resized copies.
  files = _files(synth[0])
  assert len(shapes.FAMILIES) >= 10

  def describe(cloud):
    c = host_transforms.normalize_unit_sphere_np(cloud)
    d = np.linalg.norm(c[:, None] - c[None], axis=-1)[np.triu_indices(len(c), 1)]
    return np.concatenate(
      [
        np.histogram(d, 24, (0, 2), density=True)[0],
        np.histogram(np.linalg.norm(c, axis=1), 12, (0, 1), density=True)[0],
      ]
    )

  train = [(describe(c), label) for label, c, _, split in files.values() if split == 'train']
  test = [(describe(c), label) for label, c, _, split in files.values() if split == 'test']
  x = np.stack([d for d, _ in train])
  y = np.array([label for _, label in train])
  accuracy = np.mean([y[np.abs(x - d).sum(axis=1).argmin()] == label for d, label in test])
  assert accuracy >= 0.6, accuracy


def test_synthetic_renders_are_shaded_objects_on_white(synth):
  _, _, views, _ = next(iter(_files(synth[0]).values()))
  for view in views:
    background = (view == 255).all(axis=-1)
    assert 0.1 < 1 - background.mean() < 0.9  # an object fills part of the frame
    assert len(np.unique(view[~background].sum(axis=-1))) > 10  # shading, not a flat silhouette


# ------------------------------------------------------------------------------------------------ builder


def test_builder_counts_labels_points_and_views(synth):
  manual, _, builder = synth
  import tensorflow_datasets as tfds

  families = list(SETTINGS.families)
  assert builders.class_names(builder) == families
  assert builder.info.splits['train'].num_examples == 2 * len(families)
  assert builder.info.splits['test'].num_examples == len(families)
  files = _files(manual)
  for split in ('train', 'test'):
    for e in tfds.as_numpy(builder.as_dataset(split=split)):
      key = f'{e["synset"].decode()}-{e["model_id"].decode()}.npy'
      label, cloud, views, file_split = files[key]
      assert file_split == split and e['label'] == label and e['class_name'].decode() == families[label]
      np.testing.assert_array_equal(e['points'], cloud)
      assert e['views'].shape == (5, 64, 64, 3)
      for got, want in zip(e['views'], views):
        np.testing.assert_array_equal(got, want)


def test_builder_reads_the_synthetic_synset_dictionary(synth):
  import json

  taxonomy = json.loads((synth[0] / 'taxonomy.json').read_text())
  assert [t['name'] for t in taxonomy] == list(SETTINGS.families)
  assert all(t['synsetId'].startswith('9') and len(t['synsetId']) == 8 for t in taxonomy)
  # The names were set at build time; a fresh builder reads them back from the prepared data.
  fresh = builders.get_builder('shapenet55_cg3d', data_dir=synth[1], prepare=False)
  assert builders.class_names(fresh) == list(SETTINGS.families)


# ------------------------------------------------------------------------------------------------ pretraining


def test_pretrain_batches_fields_and_content(synth):
  batches = _local(synth, 4, config=_data_config(synth, augment=False))
  files = _files(synth[0])
  b = batches[0]
  assert b['points'].shape == (8, 256, 3) and b['points'].dtype == np.float32
  assert b['image'].shape == (8, 64, 64, 3) and b['image'].dtype == np.float32
  assert b['label'].dtype == np.int32 and b['template_idx'].dtype == np.int32
  views_used = set()
  for batch in batches:
    assert ((batch['template_idx'] >= 0) & (batch['template_idx'] < 63)).all()
    for points, image, label in zip(batch['points'], batch['image'], batch['label']):
      key = _identify(files, points)
      file_label, _, views, split = files[key]
      assert split == 'train' and label == file_label
      pixels = image * np.array(STD) + np.array(MEAN)
      errors = [np.abs(pixels - v / 255.0).max() for v in views]
      assert min(errors) < 1e-5  # exactly one of the object's renders, RGB, /255, normalised
      views_used.add(int(np.argmin(errors)))
  assert len(views_used) >= 3  # the view is drawn per sample
  templates = np.concatenate([x['template_idx'] for x in batches])
  assert len(np.unique(templates)) > 10


def test_pretrain_points_are_augmented_unit_sphere_clouds(synth):
  b = _local(synth, 2, config=_data_config(synth, augment_prob=1.0))[1]
  radii = np.linalg.norm(b['points'], axis=-1)
  assert radii.max() < 1.0 + 3 * 0.05 and radii.max() > 0.9  # unit sphere plus jitter, rotations keep norms
  assert (radii == 0).mean() > 0.05  # every cloud had ~9.5% of its points dropped to the origin


def test_same_seed_same_batches_other_seed_other_batches(synth):
  a, b, c = _local(synth, 3), _local(synth, 3), _local(synth, 3, seed=12)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]['points'], c[0]['points'])


def test_restart_at_step_k_yields_the_uninterrupted_batches(synth):
  # 26 examples, batch 8: step 5 starts 14 examples into epoch 1, so the restart crosses an epoch boundary too.
  full = _local(synth, 9)
  for k in (1, 5):
    resumed = _local(synth, 9 - k, start_step=k)
    for x, y in zip(full[k:], resumed):
      for name in x:
        np.testing.assert_array_equal(x[name], y[name])


def test_two_processes_read_disjoint_shards_that_cover_the_split(synth):
  files = _files(synth[0])
  c = _data_config(synth, augment=False)
  seen = []
  for p in range(2):
    # 13 examples per process, 4 per local batch: the first 13 stream positions are one epoch of the shard.
    batches = _local(synth, 4, config=c, process_index=p, process_count=2)
    points = np.concatenate([b['points'] for b in batches])[:13]
    keys = [_identify(files, x) for x in points]
    assert len(set(keys)) == 13  # an epoch visits each example of the shard once
    seen.append(set(keys))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {k for k, v in files.items() if v[3] == 'train'}


def test_global_iterator_gives_sharded_arrays_equal_to_host_batches(synth):
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  c = _data_config(synth)
  it = pipeline.make_pretrain_iterator(c, global_batch_size=8, sharding=sharding, num_templates=63, seed=11, **IMAGE_KW)
  first = next(it)
  local = _local(synth, 1)[0]
  for k, v in local.items():
    assert isinstance(first[k], jax.Array) and first[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(first[k]), v)
  assert pipeline.steps_per_epoch(c, 8) == 26 // 8


# ------------------------------------------------------------------------------------------------ evaluation


def test_the_training_streams_run_without_the_autotune_thread(synth):
  """tf.data's autotuning model thread made destroying an iterator wait up to its optimisation period (10-30 s
  seen: pipeline._without_autotune_thread); the streams training and fine-tuning iterate switch it off, and the
  batches stay those of the tests above. Fails with the option removed from either stream."""
  config = _data_config(synth)
  streams = [
    pipeline.pretrain_local_dataset(config, global_batch_size=8, num_templates=63, seed=11, **IMAGE_KW),
    pipeline.labelled_local_dataset(config, global_batch_size=8, seed=11),
  ]
  assert [ds.options().autotune.enabled for ds in streams] == [False, False]


def test_eval_pass_in_order_padded_with_mask(synth):
  manual, data_dir, builder = synth
  import tensorflow_datasets as tfds

  order = [e for e in tfds.as_numpy(builder.as_dataset(split='test', shuffle_files=False))]
  kw = dict(
    data_dir=data_dir, batch_size=8, num_points_stored=600, image_size=64, image_mean=MEAN, image_std=STD, view_index=2
  )
  batches = list(pipeline.eval_local_batches('shapenet55_cg3d', **kw))
  assert len(batches) == 2 and [b['mask'].sum() for b in batches] == [8, 5]
  rows = {k: np.concatenate([b[k] for b in batches])[:13] for k in ('points', 'label', 'image')}
  assert not batches[1]['mask'][5:].any() and (batches[1]['points'][5:] == 0).all()
  for i, e in enumerate(order):
    assert rows['label'][i] == e['label']
    # The first 600 points of a 512-point cloud: all 512, then the first 88 again; then centred + unit sphere.
    expected = host_transforms.normalize_unit_sphere_np(e['points'][np.arange(600) % 512])
    np.testing.assert_allclose(rows['points'][i], expected, atol=1e-6)
    np.testing.assert_allclose(rows['image'][i] * np.array(STD) + np.array(MEAN), e['views'][2] / 255.0, atol=1e-6)
  # Two processes: process p holds rows [t*8 + 4p, t*8 + 4p + 4) of global step t; together they give the same rows.
  parts = [
    list(pipeline.eval_local_batches('shapenet55_cg3d', process_index=p, process_count=2, **kw)) for p in range(2)
  ]
  assert [len(x) for x in parts] == [2, 2]
  for t in range(2):
    joined = np.concatenate([parts[0][t]['label'], parts[1][t]['label']])
    np.testing.assert_array_equal(joined, batches[t]['label'])
    np.testing.assert_array_equal(np.concatenate([parts[0][t]['mask'], parts[1][t]['mask']]), batches[t]['mask'])


def test_eval_of_a_dataset_without_images(tmp_path, fixtures_dir):
  it = pipeline.eval_local_batches(
    'modelnet40',
    data_dir=str(tmp_path),
    manual_dir=str(modelnet_root().parent),
    skip_bad=True,
    batch_size=16,
    num_points_stored=1024,
  )
  batches = list(it)
  assert [b['mask'].sum() for b in batches] == [16, 4] and set(batches[0]) == {'points', 'label', 'mask'}
  norms = np.linalg.norm(batches[0]['points'], axis=-1)
  np.testing.assert_allclose(norms.max(axis=1), 1.0, rtol=1e-5)
