"""TFDS builders on real fixture files (ModelNet40), on h5 files in ScanObjectNN's official names, and on tiny
hand-written ShapeNet-55 folders for every bad-input case (each must name the file, and the line for text)."""

import io
import json
import pathlib
import re
import shutil

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cg3d_jax import build_data
from cg3d_jax.data import builders, modelnet, scanobjectnn, shapenet55, shapenet55_names
from cg3d_jax.data.formats import readers
from tests.conftest import modelnet10_layout, modelnet_root, run_command, write_scanobjectnn_h5


def _prepare(builder, manual_dir):
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _read_all(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


# ------------------------------------------------------------------------------------------------ ModelNet


@pytest.fixture(scope='session')
def modelnet40(modelnet40_prepared):
  # The fixture folder holds 23 of the 12,311 listed objects: skip_bad skipped and counted the missing ones.
  builder = modelnet.Modelnet(data_dir=modelnet40_prepared, config='modelnet40')
  assert builder.is_prepared()
  return builder


def test_modelnet40_fixture_split_labels_and_points(modelnet40, fixtures_dir):
  root = modelnet_root()
  names = (root / 'modelnet40_shape_names.txt').read_text().split()
  assert builders.class_names(modelnet40) == names
  for split in ('train', 'test'):
    listed = (root / f'modelnet40_{split}.txt').read_text().split()
    present = [s for s in listed if (root / s.rsplit('_', 1)[0] / f'{s}.txt').is_file()]
    examples = _read_all(modelnet40, split)
    assert sorted(e['name'].decode() for e in examples) == sorted(present)
    assert len(modelnet40.info.metadata['skipped'][split]) == len(listed) - len(present)
    for e in examples:
      shape_id = e['name'].decode()
      class_name = shape_id.rsplit('_', 1)[0]
      assert e['label'] == names.index(class_name)
      values = np.loadtxt(root / class_name / f'{shape_id}.txt', delimiter=',')
      np.testing.assert_array_equal(e['points'], values[:, :3].astype(np.float32))
      np.testing.assert_array_equal(e['normals'], values[:, 3:].astype(np.float32))
  assert len(_read_all(modelnet40, 'test')) == 20 and len(_read_all(modelnet40, 'train')) == 3


def test_build_data_command_prepares_the_builder_and_names_a_missing_file(tmp_path, capsys):
  """The command in this process (its one cold `python -m` is test_foundation's --help)."""

  def build(data_dir, *extra):
    code = run_command(
      build_data.main,
      ['--dataset', 'modelnet40', '--manual_dir', str(modelnet_root()), '--data_dir', str(data_dir), *extra],
    )
    return code, *capsys.readouterr()

  code, out, err = build(tmp_path / 'skip', '--skip_bad')
  assert code == 0, err[-3000:]
  assert 'train 3 examples' in out and 'test 20 examples' in out
  prepared = modelnet.Modelnet(data_dir=str(tmp_path / 'skip'), config='modelnet40')
  assert prepared.is_prepared() and len(_read_all(prepared, 'test')) == 20
  # Without --skip_bad the first listed object the fixture lacks stops the build, named in one last line.
  code, out, err = build(tmp_path / 'strict')
  assert code == 2
  assert re.search(r'^error: .*airplane_\d{4}\.txt', err.strip().splitlines()[-1]), err[-2000:]
  assert 'Traceback' not in err


def test_modelnet10_labels_follow_its_own_shape_names(tmp_path, fixtures_dir):
  src = modelnet_root()
  modelnet10_layout(tmp_path / 'manual')
  builder = _prepare(
    modelnet.Modelnet(data_dir=str(tmp_path / 'out'), config='modelnet10', skip_bad=True), tmp_path / 'manual'
  )
  names = (src / 'modelnet10_shape_names.txt').read_text().split()
  assert builders.class_names(builder) == names
  assert [e['name'] for e in _read_all(builder, 'train')] == [b'bathtub_0001']
  examples = _read_all(builder, 'test')
  assert sorted(e['name'].decode() for e in examples) == [f'bathtub_{i:04d}' for i in range(107, 117)]
  assert {int(e['label']) for e in examples} == {names.index('bathtub')}


def _small_modelnet(tmp_path, fixtures_dir, test_ids):
  src = modelnet_root()
  root = tmp_path / 'modelnet40_normal_resampled'
  root.mkdir()
  shutil.copy(src / 'modelnet40_shape_names.txt', root)
  (root / 'modelnet40_train.txt').write_text('airplane_0001\n')
  (root / 'modelnet40_test.txt').write_text(''.join(f'{s}\n' for s in test_ids))
  (root / 'airplane').mkdir()
  shutil.copy(src / 'airplane' / 'airplane_0001.txt', root / 'airplane')
  return root


def test_modelnet_missing_file_names_the_list_line(tmp_path, fixtures_dir):
  root = _small_modelnet(tmp_path, fixtures_dir, ['airplane_0001', 'airplane_0627'])
  with pytest.raises(readers.BadInputError, match=r'modelnet40_test\.txt:2: .*airplane_0627\.txt is missing'):
    _prepare(modelnet.Modelnet(data_dir=str(tmp_path / 'out'), config='modelnet40'), root)


def test_modelnet_split_with_no_readable_example_is_an_error(tmp_path, fixtures_dir):
  root = _small_modelnet(tmp_path, fixtures_dir, ['airplane_0627'])
  with pytest.raises(readers.BadInputError, match=r"modelnet40_test\.txt: no readable example for split 'test'"):
    _prepare(modelnet.Modelnet(data_dir=str(tmp_path / 'out'), config='modelnet40', skip_bad=True), root)


def test_modelnet_malformed_txt_line_names_file_and_line(tmp_path, fixtures_dir):
  root = _small_modelnet(tmp_path, fixtures_dir, ['airplane_0002'])
  lines = (modelnet_root() / 'airplane/airplane_0002.txt').read_text().splitlines()
  lines[16] = '0.1,0.2,abc,0.0,1.0,0.0'
  (root / 'airplane' / 'airplane_0002.txt').write_text('\n'.join(lines) + '\n')
  with pytest.raises(readers.BadInputError, match=r'airplane_0002\.txt:17: expected 6 comma-separated numbers'):
    _prepare(modelnet.Modelnet(data_dir=str(tmp_path / 'out'), config='modelnet40'), root)


# ------------------------------------------------------------------------------------------------ ScanObjectNN


@pytest.mark.parametrize('variant', ['obj_only', 'obj_bg', 'pb_t50_rs'])
def test_scanobjectnn_variants_read_back_equal(tmp_path, fixtures_dir, variant):
  rng = np.random.default_rng(len(variant))
  folder, train_name, test_name = scanobjectnn.FILES[variant]
  written = {}
  for split, name, n in (('train', train_name, 6), ('test', test_name, 4)):
    data = rng.normal(size=(n, 2048, 3)).astype(np.float32)
    label = rng.integers(0, 15, size=n).astype(np.int64)
    write_scanobjectnn_h5(tmp_path / 'h5_files' / folder / name, data, label)
    written[split] = (data, label)
  builder = _prepare(scanobjectnn.Scanobjectnn(data_dir=str(tmp_path / 'out'), config=variant), tmp_path)
  assert builders.class_names(builder) == (fixtures_dir / 'prompts/scanobjectnn_shape_names.txt').read_text().split()
  for split, (data, label) in written.items():
    examples = sorted(_read_all(builder, split), key=lambda e: e['index'])
    assert len(examples) == len(data)
    for e in examples:
      np.testing.assert_array_equal(e['points'], data[e['index']])
      assert e['label'] == label[e['index']]


def test_scanobjectnn_nan_names_file_and_object(tmp_path):
  data = np.random.default_rng(0).normal(size=(3, 2048, 3)).astype(np.float32)
  data[2, 10, 1] = np.nan
  folder, train_name, test_name = scanobjectnn.FILES['obj_bg']
  write_scanobjectnn_h5(tmp_path / folder / train_name, data, np.zeros(3, np.int64))
  write_scanobjectnn_h5(tmp_path / folder / test_name, data[:2], np.zeros(2, np.int64))
  with pytest.raises(readers.BadInputError, match=r'training_objectdataset\.h5 \(object 2\): non-finite'):
    _prepare(scanobjectnn.Scanobjectnn(data_dir=str(tmp_path / 'out'), config='obj_bg'), tmp_path)


def test_scanobjectnn_labels_stored_as_a_column_read_as_a_vector(tmp_path):
  """Some official h5 files store `label` as (N, 1): the same labels, one per object."""
  data = np.random.default_rng(1).normal(size=(4, 2048, 3)).astype(np.float32)
  labels = np.array([[3], [14], [0], [7]], np.int64)
  path = tmp_path / 'column.h5'
  write_scanobjectnn_h5(path, data, labels)
  read_data, read_labels = scanobjectnn.read_h5(path, 15)
  np.testing.assert_array_equal(read_data, data)
  np.testing.assert_array_equal(read_labels, [3, 14, 0, 7])


@pytest.mark.parametrize(
  'edit, message',
  [
    (lambda f: f.__delitem__('label'), r'expected datasets `data` and `label`, found \['),
    (lambda f: f.__delitem__('data'), r'expected datasets `data` and `label`'),
    (
      lambda f: (f.__delitem__('label'), f.__setitem__('label', np.array([0, 15, 1], np.int64))),
      r'label 15 of object 1 is outside',
    ),
    (
      lambda f: (f.__delitem__('label'), f.__setitem__('label', np.array([0, -1, 1], np.int64))),
      r'label -1 of object 1 is outside',
    ),
    (lambda f: (f.__delitem__('label'), f.__setitem__('label', np.zeros((3, 2), np.int64))), r'`label` must be'),
  ],
)
def test_scanobjectnn_bad_files_name_the_problem(tmp_path, edit, message):
  path = tmp_path / 'bad.h5'
  write_scanobjectnn_h5(path, np.zeros((3, 2048, 3), np.float32), np.zeros(3, np.int64))
  with h5py.File(path, 'a') as f:
    edit(f)
  with pytest.raises(readers.BadInputError, match=r'bad\.h5: ' + message):
    scanobjectnn.read_h5(path, 15)


def test_scanobjectnn_missing_file_names_the_expected_path(tmp_path):
  with pytest.raises(readers.BadInputError, match=r'main_split_nobg/training_objectdataset\.h5: file not found'):
    _prepare(scanobjectnn.Scanobjectnn(data_dir=str(tmp_path / 'out'), config='obj_only'), tmp_path)


# ------------------------------------------------------------------------------------------------ ShapeNet-55

SYNSET_A, SYNSET_B = '03001627', '04530566'  # chair, vessel (-> ship)


def _png(size=8, value=128):
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def _tiny_shapenet(root: pathlib.Path, num_views=2):
  """Two train and one test object of real synsets, with the package's dictionary and shape names."""
  ids = {'train': [(SYNSET_A, 'aaa1'), (SYNSET_B, 'bbb1')], 'test': [(SYNSET_A, 'aaa2')]}
  rng = np.random.default_rng(0)
  for split, objs in ids.items():
    for synset, model in objs:
      (root / 'shapenet_pc').mkdir(parents=True, exist_ok=True)
      np.save(root / 'shapenet_pc' / f'{synset}-{model}.npy', rng.normal(size=(64, 3)).astype(np.float32))
      for v in range(num_views):
        (root / 'img' / synset / model).mkdir(parents=True, exist_ok=True)
        (root / 'img' / synset / model / f'{v:03d}.png').write_bytes(_png(value=40 * v))
    (root / f'{split}_img.txt').write_text(''.join(f'{s}-{m}.npy\n' for s, m in objs))
  return root


class _TwoViews(shapenet55.Shapenet55Cg3d):
  """The same builder with 2 views per object, as a config would give it."""

  BUILDER_CONFIGS = [shapenet55.Shapenet55Cg3dConfig(name='two_views', num_views=2)]


def _build_shapenet(tmp_path, **kwargs):
  builder = _TwoViews(data_dir=str(tmp_path / 'out'), **kwargs)
  return _prepare(builder, tmp_path / 'manual')


def test_shapenet_real_synsets_use_package_dictionary_and_cg3d_renames(tmp_path):
  _tiny_shapenet(tmp_path / 'manual')
  builder = _build_shapenet(tmp_path)
  names = builders.class_names(builder)
  assert len(names) == 55 and names[51] == 'ship' and names[53] == 'trashcan' and names[54] == 'monitor'
  train = {e['synset'].decode(): e for e in _read_all(builder, 'train')}
  assert train[SYNSET_B]['class_name'] == b'ship' and train[SYNSET_B]['label'] == names.index('ship')
  assert train[SYNSET_A]['class_name'] == b'chair' and train[SYNSET_A]['label'] == names.index('chair')
  np.testing.assert_array_equal(
    train[SYNSET_A]['points'], np.load(tmp_path / 'manual/shapenet_pc' / f'{SYNSET_A}-aaa1.npy')
  )


def test_package_synset_dictionary_matches_cg3d_shape_names(fixtures_dir):
  # The package's first names + CG3D's renames give exactly CG3D's 55 class names, for the 55 real synsets.
  synsets = shapenet55_names.read_synset_dictionary(None)
  reference = json.loads((fixtures_dir / 'shapenet55/shapenet_synset_dict.json').read_text())
  assert set(synsets) == set(reference)
  assert sorted(synsets.values()) == sorted((fixtures_dir / 'shapenet55/shape_names.txt').read_text().splitlines())
  names = (fixtures_dir / 'shapenet55/shape_names.txt').read_text().splitlines()
  assert shapenet55_names.read_shape_names(None) == names


def _expect_bad(tmp_path, pattern):
  with pytest.raises(readers.BadInputError, match=pattern):
    _build_shapenet(tmp_path)


def test_shapenet_missing_point_cloud(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  (root / 'shapenet_pc' / f'{SYNSET_B}-bbb1.npy').unlink()
  _expect_bad(tmp_path, rf'train_img\.txt:2: point cloud .*{SYNSET_B}-bbb1\.npy is missing')


def test_shapenet_truncated_npy(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  path = root / 'shapenet_pc' / f'{SYNSET_A}-aaa1.npy'
  path.write_bytes(path.read_bytes()[:200])
  _expect_bad(tmp_path, rf'{SYNSET_A}-aaa1\.npy: not a readable \.npy array')


def test_shapenet_non_float_npy(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  np.save(root / 'shapenet_pc' / f'{SYNSET_A}-aaa1.npy', np.ones((64, 3), np.int32))
  _expect_bad(tmp_path, rf'{SYNSET_A}-aaa1\.npy: expected floating-point points, got dtype int32')


def test_shapenet_nan_points(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  points = np.zeros((64, 3), np.float32)
  points[5, 2] = np.inf
  np.save(root / 'shapenet_pc' / f'{SYNSET_A}-aaa1.npy', points)
  _expect_bad(tmp_path, rf'{SYNSET_A}-aaa1\.npy: non-finite value \(NaN or Inf\) in point 5')


def test_shapenet_wrong_shape_points(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  np.save(root / 'shapenet_pc' / f'{SYNSET_A}-aaa1.npy', np.zeros((64, 4), np.float32))
  _expect_bad(tmp_path, rf'{SYNSET_A}-aaa1\.npy: expected points of shape \(N, 3\), got \(64, 4\)')


def test_shapenet_degenerate_cloud(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  np.save(root / 'shapenet_pc' / f'{SYNSET_A}-aaa1.npy', np.ones((64, 3), np.float32))
  _expect_bad(tmp_path, rf'{SYNSET_A}-aaa1\.npy: all 64 points are the same point')


def test_shapenet_cg3d_nested_layout_builds(tmp_path):
  # CG3D's own tree: <root>/shapenet_render/{split lists, img/} and <root>/ShapeNet55/shapenet_pc/.
  flat = _tiny_shapenet(tmp_path / 'flat')
  root = tmp_path / 'manual'
  (root / 'ShapeNet55').mkdir(parents=True)
  shutil.move(flat / 'shapenet_pc', root / 'ShapeNet55' / 'shapenet_pc')
  shutil.move(flat, root / 'shapenet_render')
  builder = _build_shapenet(tmp_path)
  assert builder.info.splits['train'].num_examples == 2 and builder.info.splits['test'].num_examples == 1


def test_shapenet_unreadable_png(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  path = root / 'img' / SYNSET_B / 'bbb1' / '001.png'
  path.write_bytes(path.read_bytes()[:40])
  _expect_bad(tmp_path, rf'img/{SYNSET_B}/bbb1/001\.png: unreadable PNG')


def test_shapenet_unknown_synset(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  (root / 'test_img.txt').write_text(f'{SYNSET_A}-aaa2.npy\n12345678-ccc.npy\n')
  _expect_bad(tmp_path, r"test_img\.txt:2: unknown synset '12345678'")


def test_shapenet_malformed_split_line(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  (root / 'train_img.txt').write_text(f'{SYNSET_A}-aaa1.npy\n\n{SYNSET_B}/bbb1.npy\n')
  _expect_bad(tmp_path, r"train_img\.txt:3: expected `<8-digit synset>-<model id>\.npy`, got '04530566/bbb1\.npy'")


def test_shapenet_skip_bad_skips_counts_and_keeps_the_rest(tmp_path):
  root = _tiny_shapenet(tmp_path / 'manual')
  np.save(root / 'shapenet_pc' / f'{SYNSET_A}-aaa1.npy', np.full((64, 3), np.nan, np.float32))
  (root / 'test_img.txt').write_text(f'{SYNSET_A}-aaa2.npy\nnot an id\n')
  builder = _build_shapenet(tmp_path, skip_bad=True)
  assert [e['synset'].decode() for e in _read_all(builder, 'train')] == [SYNSET_B]
  assert len(_read_all(builder, 'test')) == 1
  skipped = builder.info.metadata['skipped']
  assert len(skipped['train']) == 1 and re.search(r'aaa1\.npy: non-finite', skipped['train'][0])
  assert len(skipped['test']) == 1 and re.search(r'test_img\.txt:2', skipped['test'][0])
  # The counts are saved with the prepared dataset, for whoever loads it later.
  reloaded = _TwoViews(data_dir=str(tmp_path / 'out'))
  assert len(reloaded.info.metadata['skipped']['train']) == 1
