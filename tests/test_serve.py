"""The local page (cg3d_jax/serve.py): its handlers in-process against the functions the commands run, and the
running server through Gradio's client API, with bad inputs answered on the page while the server keeps serving."""

import numpy as np
import pytest

from tests.conftest import modelnet_root, run_command


@pytest.fixture(scope='module')
def served(tmp_path_factory, tiny_checkpoint):
  """The tiny run as the page loads it, with a library of five real ModelNet40 objects embedded by it."""
  from cg3d_jax import embed, serve

  root = tmp_path_factory.mktemp('serve')
  shapes = root / 'shapes'
  for name in ('airplane_0627', 'airplane_0628', 'bathtub_0107', 'bathtub_0108', 'bathtub_0109'):
    cls = name.rsplit('_', 1)[0]
    xyz = np.loadtxt(modelnet_root() / cls / f'{name}.txt', delimiter=',', dtype=np.float32)[:, :3]
    (shapes / cls).mkdir(parents=True, exist_ok=True)
    np.save(shapes / cls / f'{name}.npy', xyz)
  argv = ['--checkpoint', str(tiny_checkpoint), '--shapes', str(shapes), '--library', str(root / 'lib')]
  assert run_command(embed.main, [*argv, '--batch_size=8', '--dtype=float32', '--thumbnail=32']) == 0
  page = serve.Page(str(tiny_checkpoint), library=str(root / 'lib'))
  return page, shapes, root


def test_the_handlers_give_what_the_commands_compute(served):
  """Classify: the top 5 of prediction.predict on the same file and labels, the 3D view of the file's points, the
  checkpoint and CLIP named on the page; search: search.search's hits and their thumbnails; choosing a hit shows its
  shape; a broken file, no labels, an empty query: one line each on the page."""
  from cg3d_jax import serve, shape_library
  from cg3d_jax.evaluators import prediction

  page, shapes, root = served
  assert 'tiny_run' in page.describe and 'CLIP at' in page.describe and '5 shapes' in page.describe
  cloud = shapes / 'airplane' / 'airplane_0627.npy'
  labels = 'airplane, bathtub, chair, lamp, car, plant'
  figure, rows, message = page.classify(str(cloud), labels, None)
  want = prediction.predict(page.scoring, str(cloud), [s.strip() for s in labels.split(',')], templates=page.templates)
  assert [r[1] for r in rows] == [r['name'] for r in want['labels'][:5]]
  np.testing.assert_allclose([r[2] for r in rows], [round(r['probability'], 4) for r in want['labels'][:5]])
  assert len(figure.data[0].x) == 4096 and 'airplane_0627.npy' in message
  _, preset_rows, _ = page.classify(str(cloud), '', 'ModelNet40')
  assert len(preset_rows) == 5
  # Objaverse-LVIS: OpenShape's 1,156 categories (its paper's count), one per line as one holds a space, sorted as
  # OpenShape's evaluation orders them; the page ranks the cloud against all of them.
  lvis = serve.preset_labels('Objaverse-LVIS')
  assert len(lvis) == len(set(lvis)) == 1156 and lvis == sorted(lvis)
  assert lvis[:2] == ['Band_Aid', 'Bible'] and 'monitor_(computer_equipment) computer_monitor' in lvis
  _, preset_rows, _ = page.classify(str(cloud), '', 'Objaverse-LVIS')
  assert len(preset_rows) == 5 and {row[1] for row in preset_rows} <= set(lvis)

  (root / 'broken.ply').write_text('ply\nformat ascii 1.0\nelement vertex 5\n')
  for args, words in (
    ((str(root / 'broken.ply'), labels, None), 'broken.ply'),
    ((str(cloud), '', None), 'at least two labels'),
    ((None, labels, None), 'upload a point cloud'),
  ):
    figure, rows, message = page.classify(*args)
    assert figure is None and rows == [] and message.startswith('error: ') and words in message, message

  gallery, hits, message = page.search('an airplane', 3, None)
  query = shape_library.query_vector(page.scoring.trained, page.library, text='an airplane', templates=page.templates)
  assert hits == shape_library.search(page.library, query, 3)
  assert [caption for _, caption in gallery] == [f'{h["file"]} ({h["score"]:.3f})' for h in hits]
  from PIL import Image

  np.testing.assert_array_equal(gallery[0][0], np.asarray(Image.open(hits[0]['thumbnail']).convert('RGB')))
  figure, message = page.show(hits, 1)
  assert hits[1]['file'] in message and len(figure.data[0].x) == 4096
  assert page.search('  ', 3, None)[2] == 'error: give one query: a text, an image or a cloud (got none)'
  assert page.search('chair', 0, None)[2] == 'error: k 0: at least 1'

  # A library another encoder embedded (its record says so) is refused on the page; the loaded one stays.
  other = _other_encoders_library(root)
  message, described = page.load_library(str(other))
  assert message.startswith('error: library ') and 'was embedded with /elsewhere/model.pt' in message, message
  assert str(root / 'lib') in described and page.search('an airplane', 3, None)[1] == hits
  assert page.load_library(str(root / 'lib'))[0] == f'5 shapes from {root / "lib"}'


def _other_encoders_library(root):
  import json
  import shutil

  other = root / 'other_lib'
  if not other.exists():
    shutil.copytree(root / 'lib', other)
    record = json.loads((other / 'library.json').read_text())
    record['encoder']['source'] = '/elsewhere/model.pt'
    (other / 'library.json').write_text(json.dumps(record))
  return other


def test_the_running_server_answers_through_its_client_api(served):
  """The app served on 127.0.0.1: a classification through gradio_client equals the handler's; a broken upload, a
  library from another encoder and an empty label list are each answered with their one line, and the server
  answers the requests after them."""
  import gradio_client

  from cg3d_jax import serve

  page, shapes, root = served
  app = serve.build_app(page)
  app.launch(server_name='127.0.0.1', server_port=None, prevent_thread_lock=True, quiet=True)
  try:
    client = gradio_client.Client(app.local_url, verbose=False)
    cloud = str(shapes / 'bathtub' / 'bathtub_0107.npy')
    _, rows, message = client.predict(gradio_client.handle_file(cloud), 'airplane, bathtub', None, api_name='/classify')
    want = page.classify(cloud, 'airplane, bathtub', None)[1]
    assert [row[1] for row in rows['data']] == [row[1] for row in want] and 'bathtub_0107.npy' in message
    (root / 'empty.ply').write_text('')
    _, _, message = client.predict(
      gradio_client.handle_file(str(root / 'empty.ply')), 'a, b', None, api_name='/classify'
    )
    assert message.startswith('error: ') and 'empty' in message
    _, _, message = client.predict(gradio_client.handle_file(cloud), 'airplane, bathtub', None, api_name='/classify')
    assert 'bathtub_0107.npy' in message
    message, _ = client.predict(str(_other_encoders_library(root)), api_name='/load_library')
    assert message.startswith('error: library ') and 'was embedded with /elsewhere/model.pt' in message
    _, _, message = client.predict(gradio_client.handle_file(cloud), '', None, api_name='/classify')
    assert message == 'error: give at least two labels (comma-separated) or pick a preset'
  finally:
    app.close()


def test_the_scene_tab_and_image_and_cloud_queries(served):
  """Scene: the presence answers and per-point relevance of queries.query_scene (what cg3d-query-scene runs) on a
  scene of two real objects, its output files to download; search by a cloud finds that object first; one line for
  an empty query list, a broken scene and two queries at once."""
  from cg3d_jax.scenes import queries as scene_queries

  page, shapes, root = served
  airplane = np.load(shapes / 'airplane' / 'airplane_0627.npy')[:8000]
  bathtub = np.load(shapes / 'bathtub' / 'bathtub_0107.npy')[:8000]
  np.save(root / 'scene.npy', np.concatenate([airplane, bathtub + [3.0, 0.0, 0.0]]).astype(np.float32))
  figure, answers, files, message = page.scene(str(root / 'scene.npy'), 'airplane, bathtub')
  xyz, _ = scene_queries.read_scene(root / 'scene.npy')
  vocabulary = scene_queries.training_vocabulary(page.scoring)
  want = scene_queries.query_scene(page.scoring, xyz, ['airplane', 'bathtub'], vocabulary)
  for r in want.presence():
    assert f'**{r["query"]}**: {"present" if r["present"] else "absent"} (margin {r["score"]:.3f}' in answers
  np.testing.assert_allclose(np.asarray(figure.data[0].marker.color), want.point_scores[:, 0], rtol=0, atol=1e-6)
  assert any(f.endswith('summary.json') for f in files) and '16000 points' in message
  assert page.scene(str(root / 'scene.npy'), ' ')[3] == 'error: type at least one query (comma-separated)'
  assert 'broken.ply' in page.scene(str(root / 'broken.ply'), 'chair')[3]

  _, hits, message = page.search('', 2, None, cloud=str(shapes / 'bathtub' / 'bathtub_0108.npy'))
  assert hits[0]['file'] == 'bathtub/bathtub_0108.npy' and hits[0]['score'] == pytest.approx(1.0, abs=1e-4)
  assert page.search('a bathtub', 2, None, cloud=str(shapes / 'bathtub' / 'bathtub_0108.npy'))[2] == (
    'error: give one query: a text, an image or a cloud (got a text, a cloud)'
  )
