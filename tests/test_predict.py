"""`python -m cg3d_jax.predict`: the real owl fixture end to end, the same object in other formats, clear errors.

References: the owl's own ASCII PLY (the same points rewritten as NPY, TXT and binary PLY must give the same
normalised points and the same prediction), NumPy softmax and cosine re-computations, and the real photos.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from cg3d_jax import predict, trained
from cg3d_jax.clip.loaded_clip import tokenize
from cg3d_jax.data.formats import ply_files, point_files
from cg3d_jax.errors import BadInputError
from cg3d_jax.evaluators import prediction
from cg3d_jax.twins.prompted_clip import torch_prompted_image_features
from tests.conftest import point_features, run_command

LABELS = ['owl', 'chicken', 'penguin']


@pytest.fixture(scope='module')
def owl_dir(fixtures_dir):
  return fixtures_dir / 'openshape_owl'


@pytest.fixture(scope='module')
def eval_model(tiny_checkpoint):
  return trained.with_clip(trained.load_trained(tiny_checkpoint))


@pytest.fixture(scope='module')
def owl_copies(owl_dir, tmp_path_factory):
  """The owl's points in other formats: {'ply_ascii': fixture, 'ply_binary', 'npy', 'txt'}."""
  root = tmp_path_factory.mktemp('owl')
  cloud = point_files.read_points(owl_dir / 'owl.ply')
  paths = {
    'ply_ascii': owl_dir / 'owl.ply',
    'ply_binary': root / 'owl_binary.ply',
    'npy': root / 'owl.npy',
    'txt': root / 'owl.txt',
  }
  ply_files.write_ply(paths['ply_binary'], cloud.xyz, cloud.rgb, binary=True)
  np.save(paths['npy'], cloud.xyz)
  np.savetxt(paths['txt'], cloud.xyz, fmt='%.9g')  # 9 significant digits round-trip float32 exactly
  return paths


def test_every_format_gives_the_same_normalised_points(owl_copies):
  prepared = {
    name: prediction.prepare_points(point_files.read_points(path).xyz, 1024) for name, path in owl_copies.items()
  }
  reference = prepared['ply_ascii']
  assert reference.shape == (10_000, 3)
  assert np.max(np.linalg.norm(reference, axis=1)) == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(reference.mean(0), 0, atol=1e-6)
  for name, points in prepared.items():
    np.testing.assert_array_equal(points, reference, err_msg=name)


CUBE_VERTICES = np.array([[x, y, z] for x in (0, 2) for y in (0, 1) for z in (0, 1)], np.float32)
CUBE_QUADS = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]


def test_a_mesh_as_off_and_as_ply_gives_the_same_points(eval_model, tmp_path):
  vertices = '\n'.join(' '.join(f'{v:g}' for v in row) for row in CUBE_VERTICES)
  faces = '\n'.join('4 ' + ' '.join(map(str, q)) for q in CUBE_QUADS)
  (tmp_path / 'box.off').write_text(f'OFF\n8 6 0\n{vertices}\n{faces}\n')
  (tmp_path / 'box.ply').write_text(
    'ply\nformat ascii 1.0\nelement vertex 8\nproperty float x\nproperty float y\n'
    'property float z\nelement face 6\nproperty list uchar int vertex_indices\n'
    f'end_header\n{vertices}\n{faces}\n'
  )
  off, ply = (point_files.read_points(tmp_path / name) for name in ('box.off', 'box.ply'))
  assert off.from_mesh and ply.from_mesh and len(off) == point_files.DEFAULT_MESH_POINTS
  np.testing.assert_array_equal(prediction.prepare_points(off.xyz, 64), prediction.prepare_points(ply.xyz, 64))
  # Sampled on the surface of the 2 x 1 x 1 box: every point lies on one of its faces.
  on_face = np.isclose(off.xyz, 0, atol=1e-6) | np.isclose(off.xyz, [2, 1, 1], atol=1e-6)
  assert on_face.any(axis=1).all()
  result = prediction.predict(eval_model, tmp_path / 'box.off', LABELS)
  assert result['from_mesh'] and len(result['labels']) == 3


def test_short_clouds_are_cycled_up_to_the_encoder_size_and_tiny_ones_refused():
  xyz = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
  points = prediction.prepare_points(xyz, 100, 'c.ply')
  assert points.shape == (100, 3)
  np.testing.assert_array_equal(points[40:80], points[:40])
  # Fewer distinct points than one neighbourhood (32): refused with the file named, duplicates not counted.
  for cloud, distinct in ((xyz[:2], 2), (np.repeat(xyz[:5], 20, axis=0), 5), (np.zeros((1000, 3)), 1)):
    with pytest.raises(BadInputError, match=rf'^c\.ply: {distinct} distinct point\(s\); a cloud needs at least 32'):
      prediction.prepare_points(cloud, 64, 'c.ply')


def test_predict_ranks_labels_and_images(eval_model, owl_copies, owl_dir):
  images = [str(owl_dir / name) for name in ('a.jpg', 'b.jpg', 'c.jpg')]
  results = {
    name: prediction.predict(eval_model, path, LABELS, images if name == 'ply_ascii' else ())
    for name, path in owl_copies.items()
  }
  result = results['ply_ascii']
  assert result['num_points_read'] == 10_000 and not result['from_mesh']
  assert sorted(r['name'] for r in result['labels']) == sorted(LABELS)
  for other in results.values():  # the same object in another format gives the same prediction
    assert [r['name'] for r in other['labels']] == [r['name'] for r in result['labels']]
    np.testing.assert_allclose(
      [r['similarity'] for r in other['labels']], [r['similarity'] for r in result['labels']], atol=1e-6
    )
  for ranked in (result['labels'], result['images']):
    sims = np.array([r['similarity'] for r in ranked])
    probs = np.array([r['probability'] for r in ranked])
    assert np.all(np.diff(sims) <= 0)
    expected = np.exp(result['logit_scale'] * sims) / np.exp(result['logit_scale'] * sims).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
  assert sorted(r['name'] for r in result['images']) == sorted(images)
  # The similarities recomputed outside the prediction code: the owl's feature (normalised cloud, FPS, encoder)
  # against "This is a <label>" and the photos through transformers' PyTorch CLIP (prompts inserted as CG3D does).
  cloud = prediction.prepare_points(point_files.read_points(owl_copies['ply_ascii']).xyz, eval_model.model.num_points)
  feature = point_features(eval_model.model, eval_model.encoder_vars, cloud[None])[0]
  torch_clip = CLIPModel.from_pretrained(eval_model.config.clip.path, local_files_only=True).eval()
  ids = tokenize(eval_model.clip.tokenizer, [f'This is a {label}' for label in LABELS])
  pixels = np.stack([eval_model.clip.preprocess(Image.open(path)) for path in images]).transpose(0, 3, 1, 2)
  with torch.no_grad():
    text = torch_clip.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    text = torch.nn.functional.normalize(getattr(text, 'pooler_output', text), dim=-1).numpy()
    prompts = torch.from_numpy(np.array(eval_model.clip_params['prompts']['tokens']))
    photo = torch_prompted_image_features(torch_clip, torch.from_numpy(pixels.copy()), prompts)
    photo = torch.nn.functional.normalize(photo, dim=-1).numpy()
  for ranked, names, rows in ((result['labels'], LABELS, text), (result['images'], images, photo)):
    got = {r['name']: r['similarity'] for r in ranked}
    np.testing.assert_allclose([got[n] for n in names], rows @ feature, atol=2e-5)


def test_command_end_to_end_on_the_owl(tiny_checkpoint, owl_dir, tmp_path, capfd, caplog):
  """The command in this process (its one cold `python -m` run is tests/test_standalone.py's, from the lone copy)."""
  out = tmp_path / 'owl.json'
  caplog.set_level('WARNING')
  code = run_command(
    predict.main,
    [
      '--checkpoint',
      str(tiny_checkpoint),
      '--points',
      str(owl_dir / 'owl.ply'),
      '--labels',
      'owl, chicken,penguin',
      '--images',
      ','.join(str(owl_dir / f'{name}.jpg') for name in 'abc'),
      '--json',
      str(out),
    ],
  )
  stdout, stderr = capfd.readouterr()
  assert code == 0, stderr[-3000:]
  # A good checkpoint reads without orbax's warnings about what we asked for (read-only, no metadata).
  warned = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING' and 'checkpoint' in r.getMessage()]
  assert not warned, warned
  assert 'owl.ply: 10000 points' in stdout and 'images ranked against the cloud' in stdout
  result = json.loads(out.read_text())
  assert [r['rank'] for r in result['labels']] == [1, 2, 3]
  assert sum(r['probability'] for r in result['labels']) == pytest.approx(1.0)
  assert len(result['images']) == 3


def test_columns_name_the_columns_of_an_ambiguous_text_cloud(tiny_checkpoint, owl_copies, tmp_path, capsys):
  """Columns 4-6 that could be normals or colours stop predict with advice to pass --columns; passed, the cloud is
  read as xyz + normals and ranks the labels exactly as the same points with three columns do."""
  xyz = point_files.read_points(owl_copies['txt']).xyz
  np.savetxt(tmp_path / 'six.txt', np.c_[xyz, np.tile([0.0, 0.0, 1.0], (len(xyz), 1))], fmt='%.9g')
  np.savetxt(tmp_path / 'three.txt', xyz, fmt='%.9g')
  base = ['--checkpoint', str(tiny_checkpoint), '--labels', 'owl,chicken,penguin']
  assert run_command(predict.main, [*base, '--points', str(tmp_path / 'six.txt')]) == 2
  assert '--columns xyz,normals' in capsys.readouterr().err
  for name, extra in (('six', ['--columns', 'xyz,normals']), ('three', [])):
    assert (
      run_command(
        predict.main,
        [*base, '--points', str(tmp_path / f'{name}.txt'), '--json', str(tmp_path / f'{name}.json'), *extra],
      )
      == 0
    )
  six, three = (json.loads((tmp_path / f'{n}.json').read_text())['labels'] for n in ('six', 'three'))
  assert six == three


@pytest.mark.parametrize(
  'name, content, message',
  [
    ('empty.ply', b'', 'file is empty'),
    ('blank.txt', b'  \n\n', 'file is empty'),
    ('garbage.ply', b'not a ply file at all\n1 2 3\n', 'not a PLY file'),
    (
      'truncated.ply',
      b'ply\nformat binary_little_endian 1.0\nelement vertex 100\nproperty float x\n'
      b'property float y\nproperty float z\nend_header\n\x00\x00',
      'truncated',
    ),
    ('cloud.obj', b'v 0 0 0\n', 'unknown point-cloud extension'),
  ],
)
def test_unreadable_or_empty_files_are_clear_errors(tiny_checkpoint, tmp_path, capsys, name, content, message):
  path = tmp_path / name
  path.write_bytes(content)
  rc = run_command(predict.main, ['--checkpoint', str(tiny_checkpoint), '--points', str(path), '--labels', 'a,b'])
  err = capsys.readouterr().err
  assert rc == 2
  assert str(path) in err and message in err


@pytest.mark.parametrize(
  'args, message',
  [
    (['--points', 'missing.ply', '--labels', 'a,b'], 'missing.ply: does not exist'),
    (['--points', 'OWL', '--points', 'OWL', '--labels', 'a,b'], 'predict takes one point-cloud file, got 2'),
    (['--points', 'OWL', '--labels', 'a,,b'], 'comma-separated non-empty labels'),
    (['--points', 'OWL', '--labels', 'owl,owl'], "['owl'] appear more than once"),
    (['--points', 'OWL', '--labels', 'a,b', '--images', 'nope.jpg'], 'nope.jpg: does not exist'),
  ],
)
def test_bad_arguments_are_clear_errors(tiny_checkpoint, owl_dir, capsys, args, message):
  args = [str(owl_dir / 'owl.ply') if a == 'OWL' else a for a in args]
  rc = run_command(predict.main, ['--checkpoint', str(tiny_checkpoint), *args])
  assert rc == 2
  assert message in capsys.readouterr().err


def test_an_image_that_is_not_an_image_is_a_clear_error(eval_model, owl_dir, tmp_path):
  fake = tmp_path / 'fake.jpg'
  fake.write_bytes(b'definitely not a jpeg')
  with pytest.raises(ValueError, match='fake.jpg: cannot be read as an image'):
    prediction.predict(eval_model, owl_dir / 'owl.ply', LABELS, [str(fake)])
