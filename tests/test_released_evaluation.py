"""One evaluation over every released family: a random-weight file of ULIP-2 (coloured Point-BERT), OpenShape (PPAT)
and Uni3D each scored by the evaluate command on ModelNet40 and ScanObjectNN in both layouts (CG3D's TFDS sets and
OpenShape's files) and on Objaverse-LVIS, with its family's published protocol by default
(evaluators/protocols.py): results.json records the family, the encoder's size, the protocol and where the class
features came from; a protocol that needs what is not given is one line. On the TFDS sets, which store neither
colour nor OpenShape's axes, OpenShape's file sees y and z swapped and grey 0.4: its scores equal the twin's on the
real ModelNet40 objects prepared with NumPy. predict and query_scene score a released file with label features from
a file, without a text tower."""

import json

import numpy as np
import pytest
import torch

from cg3d_jax.data import openshape_eval
from cg3d_jax.twins import ppat as twin_ppat
from tests.conftest import assert_no_near_ties, built_once, modelnet_root, run_command, write_scanobjectnn_h5

POINTS = 1024  # stored and encoded: the device's farthest-point sampling then keeps every point, as the twin sees them
CLASSES = ('sphere', 'box', 'torus')


@pytest.fixture(scope='module')
def layout(tmp_path_factory):
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout

  root = tmp_path_factory.mktemp('released_eval')
  return write_openshape_layout(
    root / 'openshape', classes=CLASSES, train_per_class=1, lvis_per_class=2, num_points=2048, feature_dim=1280
  )


@pytest.fixture(scope='session')
def scanobjectnn_prepared(tmp_path_factory) -> str:
  """data_dir of a procedural ScanObjectNN obj_bg (4 test objects of 2,048 points) prepared by the real builder."""
  from cg3d_jax.data import builders, scanobjectnn

  def build(root):
    rng = np.random.default_rng(5)
    folder, train_name, test_name = scanobjectnn.FILES['obj_bg']
    for name, n in ((train_name, 2), (test_name, 4)):
      write_scanobjectnn_h5(
        root / 'raw' / folder / name, rng.normal(size=(n, 2048, 3)).astype(np.float32), rng.integers(0, 15, n)
      )
    builders.get_builder('obj_bg', data_dir=str(root / 'tfds'), manual_dir=str(root / 'raw'))

  return str(built_once(tmp_path_factory, 'scanobjectnn_obj_bg_tfds', build) / 'tfds')


def _sets(layout, modelnet40_prepared, scanobjectnn_prepared) -> dict:
  """{name: evaluate arguments} of every set in both layouts, all at POINTS points (one compiled encoder)."""
  tfds = [f'--config.eval.num_stored_points={POINTS}']
  ours = [f'--config.eval.manual_dir={layout}', f'--config.eval.num_stored_points={POINTS}']
  return {
    'modelnet40': ['--config', 'zeroshot_modelnet40', f'--config.eval.data_dir={modelnet40_prepared}', *tfds],
    'obj_bg': ['--config', 'zeroshot_scanobjectnn:obj_bg', f'--config.eval.data_dir={scanobjectnn_prepared}', *tfds],
    'modelnet40_openshape': ['--config', 'zeroshot_openshape:modelnet40', *ours],
    'scanobjectnn_openshape': ['--config', 'zeroshot_openshape:scanobjectnn', *ours],
    'objaverse_lvis': ['--config', 'zeroshot_objaverse_lvis', *ours],
  }


def _evaluate(tmp_path, name: str, checkpoint, argv: list[str]) -> tuple[int, dict | None]:
  from cg3d_jax import evaluate

  workdir = tmp_path / name
  code = run_command(
    evaluate.main,
    [
      *argv,
      '--checkpoint',
      str(checkpoint),
      '--workdir',
      str(workdir),
      '--config.eval.batch_size=8',
      f'--config.eval.num_points={POINTS}',
    ],
  )
  results = workdir / 'results.json'
  return code, json.loads(results.read_text()) if results.exists() else None


def _class_names() -> list[str]:
  """Every class of every set here: ModelNet40's, ScanObjectNN's (CG3D's and OpenShape's spellings) and LVIS's."""
  from importlib import resources

  assets = resources.files('cg3d_jax.assets')
  names = [*assets.joinpath('modelnet40_shape_names.txt').read_text().split(), *CLASSES]
  names += assets.joinpath('scanobjectnn_shape_names.txt').read_text().split() + list(
    openshape_eval.SCANOBJECTNN_CLASSES
  )
  return sorted(set(names))


def _parameters(twin: torch.nn.Module, *inputs: np.ndarray) -> int:
  """The twin's parameters that its forward pass uses (timm's unused heads and embeddings of Uni3D do not count)."""
  twin.zero_grad(set_to_none=True)
  twin(*(torch.from_numpy(x) for x in inputs)).sum().backward()
  return sum(p.numel() for p in twin.parameters() if p.grad is not None)


CLOUD = np.random.default_rng(0).uniform(-1, 1, (1, POINTS, 6)).astype(np.float32)


def _modelnet40_test_objects(num_points: int) -> tuple[np.ndarray, np.ndarray]:
  """The fixture's ModelNet40 test objects as the TFDS sets give them, in NumPy: the first `num_points` points of
  each official file, centred on their mean and scaled to the unit sphere; labels by modelnet40_shape_names.txt."""
  root = modelnet_root()
  names = (root / 'modelnet40_shape_names.txt').read_text().split()
  test = (root / 'modelnet40_test.txt').read_text().split()
  clouds, labels = [], []
  for shape in sorted(test):
    path = root / shape.rsplit('_', 1)[0] / f'{shape}.txt'
    if path.exists():
      xyz = np.loadtxt(path, delimiter=',', dtype=np.float64)[:num_points, :3]
      xyz -= xyz.mean(axis=0)
      clouds.append(xyz / np.linalg.norm(xyz, axis=1).max())
      labels.append(names.index(shape.rsplit('_', 1)[0]))
  return np.stack(clouds).astype(np.float32), np.array(labels)


def _accuracies(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  predicted = np.argmax(scores, axis=1)
  assert_no_near_ties(scores, np.eye(scores.shape[1], dtype=bool)[predicted])
  top1 = 100 * np.mean(predicted == labels)
  return top1, 100 * np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)])


def test_an_openshape_file_in_both_layouts_with_its_published_protocol(
  tmp_path, layout, modelnet40_prepared, scanobjectnn_prepared
):
  """OpenShape's protocol: the layout's precomputed bigG features, y and z swapped, colour (or grey). On the TFDS
  sets, which store no features, the user's file gives them (without one: one line); the scores on the real
  ModelNet40 objects equal the twin's on NumPy's preparation of them, swapped and grey."""
  from tests.test_ppat import released_file

  torch.manual_seed(4)
  twin = twin_ppat.make(dim=128, heads=2, depth=2, mlp_dim=256, sa_dim=32).eval()
  path = tmp_path / 'model.pt'
  released_file(path, twin)
  sets = _sets(layout, modelnet40_prepared, scanobjectnn_prepared)

  code, _ = _evaluate(tmp_path, 'no_features', path, sets['modelnet40'])
  assert code == 2  # the one line names config.eval.class_features (tests/test_bad_inputs.py checks the line)

  # Class features that make the scores informative: airplane's and bathtub's rows are the twin's mean features of
  # three of their objects as OpenShape's protocol feeds them (the other rows random), so accuracy depends on it.
  clouds, labels = _modelnet40_test_objects(POINTS)
  fed = np.concatenate([clouds[..., [0, 2, 1]], np.full_like(clouds, 0.4)], axis=-1)
  with torch.no_grad():
    features = twin(torch.from_numpy(fed[..., :3]), torch.from_numpy(fed)).numpy()
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  table = np.random.default_rng(1).normal(size=(40, 1280)).astype(np.float32)
  for c in (0, 1):
    table[c] = features[labels == c][:3].mean(axis=0) * np.linalg.norm(table[c])
  np.save(tmp_path / 'modelnet40.npy', table)
  code, results = _evaluate(
    tmp_path, 'modelnet40', path, [*sets['modelnet40'], f'--config.eval.class_features={tmp_path / "modelnet40.npy"}']
  )
  assert code == 0
  assert results['published_protocol'] == {'family': 'OpenShape', 'y_up': True, 'use_color': True, 'prompts': 'file'}
  assert (results['y_up_swapped'], results['use_color']) == (True, True)
  assert results['class_features'] == str(tmp_path / 'modelnet40.npy')
  assert results['size']['parameters'] == _parameters(twin, CLOUD[..., :3], CLOUD) and results['size']['width'] == 128
  top1, class_mean = _accuracies(features @ (table / np.linalg.norm(table, axis=1, keepdims=True)).T, labels)
  assert results['num_objects'] == len(labels) and top1 > 0
  assert results['top1_acc'] == pytest.approx(top1) and results['class_mean_acc'] == pytest.approx(class_mean)

  np.save(tmp_path / 'sonn.npy', table[:15])
  code, results = _evaluate(
    tmp_path, 'obj_bg', path, [*sets['obj_bg'], f'--config.eval.class_features={tmp_path / "sonn.npy"}']
  )
  assert code == 0 and results['num_objects'] == 4 and results['y_up_swapped'] is True

  for name in ('modelnet40_openshape', 'scanobjectnn_openshape', 'objaverse_lvis'):
    code, results = _evaluate(tmp_path, name, path, sets[name])
    assert code == 0, name
    assert results['prompts'] == 'precomputed' and results['class_features'] == 'the layout'
    assert results['published_protocol']['family'] == 'OpenShape' and results['y_up_swapped'] is True
    assert results['family'] == 'OpenShape (PointBERT / PPAT)' and results['num_points'] == POINTS


def test_a_ulip2_file_in_both_layouts_with_its_published_protocol(
  tmp_path, layout, modelnet40_prepared, scanobjectnn_prepared, tiny_clip_dir
):
  """ULIP's protocol: its 64 templates over names as words, through the CLIP given (here a tiny random one in place
  of OpenCLIP ViT-bigG-14), the stored axes, colour or grey (ULIP-1, xyz only: none). Without a CLIP: one line."""
  from tests.conftest import TINY_CLIP
  from tests.test_ulip import _randomised_twin, _ulip_file

  width = TINY_CLIP['projection_dim']
  twin = _randomised_twin(3, width=64, depth=1, num_heads=1, encoder_dim=64, embed_dim=width, in_channels=6)
  path, _ = _ulip_file(tmp_path, twin)
  sets = _sets(layout, modelnet40_prepared, scanobjectnn_prepared)
  assert _evaluate(tmp_path, 'no_clip', path, sets['objaverse_lvis'])[0] == 2
  parameters = _parameters(twin, CLOUD)
  for name, argv in sets.items():
    code, results = _evaluate(tmp_path, name, path, [*argv, f'--config.clip.path={tiny_clip_dir}'])
    assert code == 0, name
    assert results['published_protocol'] == {
      'family': 'ULIP',
      'y_up': False,
      'use_color': True,
      'prompts': 'templates',
      'templates': 'ulip',
      'name_style': 'words',
      'normalize_text': True,
    }, name
    assert (results['templates'], results['class_features'], results['y_up_swapped']) == (
      'ulip',
      'the text tower',
      False,
    )
    assert results['size']['parameters'] == parameters and results['size']['depth'] == 1

  # ULIP-1 (xyz only) on OpenShape's layout: the protocol leaves the colours out.
  xyz_only = _randomised_twin(5, width=64, depth=1, num_heads=1, encoder_dim=64, embed_dim=width, in_channels=3)
  path, _ = _ulip_file(tmp_path, xyz_only, name='ulip1.pt')
  code, results = _evaluate(
    tmp_path, 'ulip1', path, [*sets['scanobjectnn_openshape'], f'--config.clip.path={tiny_clip_dir}']
  )
  assert code == 0 and results['use_color'] is False and results['published_protocol']['use_color'] is False
  assert results['size']['in_channels'] == 3 and results['y_up_swapped'] is False


def test_a_uni3d_file_in_both_layouts_with_the_users_class_features(
  tmp_path, layout, modelnet40_prepared, scanobjectnn_prepared
):
  """Uni3D's protocol: EVA02-E-14-plus's features of ULIP's templates, which the package cannot compute, from the
  user's file (rows matched by name, one file for every set); the stored axes; colour or grey. Without the file:
  one line naming the setting. Uni3D's own Objaverse-LVIS list is scored as well."""
  from tests.test_uni3d import deepspeed_file, twin_and_variables

  twin, _ = twin_and_variables('tiny', seed=9, depth=2)
  path = tmp_path / 'uni3d.pt'
  deepspeed_file(path, twin)
  names = _class_names()
  np.savez(
    tmp_path / 'classes.npz', names=np.array(names), features=np.random.default_rng(2).normal(size=(len(names), 1024))
  )
  sets = _sets(layout, modelnet40_prepared, scanobjectnn_prepared)
  sets['objaverse_lvis'] = ['--config', 'zeroshot_objaverse_lvis:uni3d', *sets['objaverse_lvis'][2:]]  # Uni3D's list
  assert _evaluate(tmp_path, 'no_features', path, sets['objaverse_lvis'])[0] == 2
  parameters = _parameters(twin, CLOUD)
  for name, argv in sets.items():
    code, results = _evaluate(tmp_path, name, path, [*argv, f'--config.eval.class_features={tmp_path / "classes.npz"}'])
    assert code == 0, name
    assert results['published_protocol'] == {'family': 'Uni3D', 'y_up': False, 'use_color': True, 'prompts': 'file'}
    assert results['y_up_swapped'] is False and results['family'] == 'Uni3D (192 wide, 2 blocks)'
    assert results['size']['parameters'] == parameters


def test_the_tfds_sets_as_a_released_protocol_feeds_them():
  """Hand-computed: y and z swapped, then OpenShape's grey 0.4 appended as rgb; labels and masks untouched."""
  from cg3d_jax.data.sources import tfds_layout

  batch = {'points': np.array([[[1.0, 2.0, 3.0]]], np.float32), 'label': np.array([7]), 'mask': np.array([True])}
  (out,) = tfds_layout._oriented([batch], y_up=True, use_color=True)
  np.testing.assert_array_equal(out['points'], np.array([[[1.0, 3.0, 2.0, 0.4, 0.4, 0.4]]], np.float32))
  assert out['label'] is batch['label'] and out['mask'] is batch['mask']
  (same,) = tfds_layout._oriented([batch], y_up=False, use_color=False)
  np.testing.assert_array_equal(same['points'], batch['points'])


def test_predict_and_query_scene_score_a_released_file_with_label_features_from_a_file(tmp_path, capsys):
  """A Uni3D file, whose text tower (EVA02-E-14-plus) the package cannot run, with --class_features: predict ranks
  the file's labels by the twin's features of the real ModelNet40 object (NumPy's normalisation, grey 0.4, all of its
  10,000 points), probabilities at CLIP's temperature 100; query_scene scores a scene against the same file; a query
  the file has no features for, and features of another width, are one line each."""
  from cg3d_jax import predict, query_scene
  from tests.test_uni3d import deepspeed_file, twin_and_variables

  twin, _ = twin_and_variables('tiny', seed=9, depth=2)
  deepspeed_file(tmp_path / 'uni3d.pt', twin)
  names = ['airplane', 'bathtub', 'chair', 'lamp']
  table = np.random.default_rng(3).normal(size=(len(names), 1024)).astype(np.float32)
  np.savez(tmp_path / 'labels.npz', names=np.array(names), features=table)
  xyz = np.loadtxt(modelnet_root() / 'airplane' / 'airplane_0627.txt', delimiter=',', dtype=np.float64)[:, :3]
  np.save(tmp_path / 'airplane.npy', xyz.astype(np.float32))

  argv = ['--checkpoint', str(tmp_path / 'uni3d.pt'), '--points', str(tmp_path / 'airplane.npy')]
  argv += [f'--class_features={tmp_path / "labels.npz"}', '--json', str(tmp_path / 'predict.json')]
  assert run_command(predict.main, argv) == 0
  result = json.loads((tmp_path / 'predict.json').read_text())
  centred = xyz - xyz.mean(axis=0)
  cloud = np.concatenate([centred / np.linalg.norm(centred, axis=1).max(), np.full_like(xyz, 0.4)], axis=1)
  with torch.no_grad():
    feature = twin(torch.from_numpy(cloud[None].astype(np.float32))).numpy()[0].astype(np.float64)
  want = (table / np.linalg.norm(table, axis=1, keepdims=True)) @ (feature / np.linalg.norm(feature))
  got = {row['name']: row for row in result['labels']}
  assert [row['name'] for row in result['labels']] == [names[i] for i in np.argsort(-want)]
  np.testing.assert_allclose([got[n]['similarity'] for n in names], want, atol=1e-4)
  probs = np.exp(100 * (want - want.max()))
  np.testing.assert_allclose([got[n]['probability'] for n in names], probs / probs.sum(), atol=1e-3)
  assert result['logit_scale'] == 100.0 and result['num_points_encoded'] == 10000

  scene = np.concatenate([xyz, xyz + [3.0, 0.0, 0.0]]).astype(np.float32)
  np.save(tmp_path / 'scene.npy', scene)
  argv = ['--checkpoint', str(tmp_path / 'uni3d.pt'), '--scene', str(tmp_path / 'scene.npy')]
  argv += [f'--class_features={tmp_path / "labels.npz"}', '--points_per_region=10000', '--max_regions=2']
  argv += ['--radius=1.2', '--batch_size=2', '--exclude_floor=false']
  capsys.readouterr()
  assert run_command(query_scene.main, [*argv, '--queries', 'airplane', '--out', str(tmp_path / 'query')]) == 0
  assert (tmp_path / 'query' / 'airplane.ply').exists()

  bad = run_command(query_scene.main, [*argv, '--queries', 'owl', '--out', str(tmp_path / 'owl')])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert bad == 2 and len(err) == 1 and "no features for 1 class(es) of the split, e.g. ['owl']" in err[0], err
  np.savez(tmp_path / 'narrow.npz', names=np.array(names), features=table[:, :32])
  argv = ['--checkpoint', str(tmp_path / 'uni3d.pt'), '--points', str(tmp_path / 'airplane.npy')]
  assert run_command(predict.main, [*argv, f'--class_features={tmp_path / "narrow.npz"}']) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and '32-dimensional features but the encoder projects to 1024' in err[0], err


def test_embed_a_tfds_split_and_an_openshape_split_into_one_library(tmp_path, layout, modelnet40_prepared, capsys):
  """cg3d-embed --config: the TFDS ModelNet40 test split (the real fixture objects) fed as OpenShape's protocol feeds
  its encoder (y and z swapped, grey 0.4): each row equals the twin's normalised features of NumPy's preparation of
  its object (found by its preview cloud, kept y-up as stored), named `<set>/<split>/<index>` with its class; the page
  shows a row's preview; a second run embeds nothing; OpenShape's own ModelNet40 files extend the same library in
  the set's order and classes. The object as a file gives the same row to search and predict (they swap too). Shown
  to fail without the swap (protocols.for_embedding keeping the stored axes: 87% of
  the row elements off by more than 1e-4)."""
  from cg3d_jax import embed, serve, shape_library
  from tests.test_ppat import released_file

  torch.manual_seed(4)
  twin = twin_ppat.make(dim=128, heads=2, depth=2, mlp_dim=256, sa_dim=32).eval()
  path = tmp_path / 'model.pt'
  released_file(path, twin)
  sets = _sets(layout, modelnet40_prepared, '')
  library = tmp_path / 'library'
  common = ['--checkpoint', str(path), '--library', str(library), '--batch_size=8', '--dtype=float32']
  common += ['--thumbnail=24', f'--config.eval.num_points={POINTS}']
  assert run_command(embed.main, [*sets['modelnet40'], *common]) == 0
  clouds, labels = _modelnet40_test_objects(POINTS)
  assert f'embedded {len(labels)} shapes' in capsys.readouterr().out
  manifest = json.loads((library / 'manifest.json').read_text())
  rows = np.load(library / 'embeddings.npy')
  assert [e['file'] for e in manifest] == [f'modelnet40/test/{i:06d}' for i in range(len(labels))]
  previews = np.stack([np.load(library / e['cloud']).astype(np.float32) for e in manifest])
  assert previews.shape == (len(labels), POINTS, 6) and np.all(previews[..., 3:] == np.float16(0.4))
  distance = np.abs(previews[:, None, :, :3] - clouds[None]).max(axis=(2, 3))  # (rows, objects)
  order = distance.argmin(axis=1)
  assert np.all(distance[np.arange(len(order)), order] < 2e-3) and sorted(order) == list(range(len(labels)))
  names = (modelnet_root() / 'modelnet40_shape_names.txt').read_text().split()
  assert [e['class'] for e in manifest] == [names[labels[i]] for i in order]
  fed = np.concatenate([clouds[order][..., [0, 2, 1]], np.full_like(clouds, 0.4)], axis=-1)
  with torch.no_grad():
    want = twin(torch.from_numpy(fed[..., :3]), torch.from_numpy(fed)).numpy()
  np.testing.assert_allclose(rows, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-4, rtol=0)
  assert all((library / e['thumbnail']).is_file() for e in manifest)

  np.savez(tmp_path / 'labels.npz', names=np.array(['airplane', 'bathtub']), features=rows[:2])
  page = serve.Page(str(path), library=str(library), class_features=str(tmp_path / 'labels.npz'))
  hits = shape_library.search(page.library, rows[3], 2)
  figure, message = page.show(hits, 0)
  assert message.startswith(manifest[3]['file']) and len(figure.data[0].x) == POINTS
  np.testing.assert_allclose(np.asarray(figure.data[0].x, np.float32), previews[3][:, 0])
  # The same object as a file (stored y-up): search by it and predict on it swap its axes as the split's road does.
  from cg3d_jax.evaluators import prediction

  np.save(tmp_path / 'object.npy', clouds[order[3]])
  query = shape_library.query_vector(page.loaded, page.library, points=tmp_path / 'object.npy')
  np.testing.assert_allclose(query, rows[3], atol=1e-4, rtol=0)
  from cg3d_jax import trained

  loaded = trained.load_trained(path)
  loaded.config.model.num_points = POINTS  # as embedded (config.eval.num_points)
  scoring = trained.without_clip(loaded)
  answer = prediction.predict(scoring, tmp_path / 'object.npy', ['it', 'other'], classifier=rows[[3, 0]])
  assert answer['y_up_swapped'] is True and answer['labels'][0]['name'] == 'it'
  assert answer['labels'][0]['similarity'] == pytest.approx(1.0, abs=1e-4)

  assert run_command(embed.main, [*sets['modelnet40'], *common]) == 0
  assert 'embedded 0 shapes' in capsys.readouterr().out
  np.testing.assert_array_equal(np.load(library / 'embeddings.npy'), rows)

  assert run_command(embed.main, [*sets['modelnet40_openshape'], *common]) == 0
  evalset = openshape_eval.modelnet40_openshape(layout)
  grown = json.loads((library / 'manifest.json').read_text())
  assert grown[: len(manifest)] == manifest
  assert [(e['file'], e['class']) for e in grown[len(manifest) :]] == [
    (f'{evalset.name}/test/{i:06d}', evalset.class_names[label]) for i, label in enumerate(evalset.labels)
  ]
  assert np.load(library / 'embeddings.npy').shape == (len(grown), 1280)
