"""The shape library (cg3d_jax/shape_library.py) and the embed command (cg3d_jax/embed.py): exact top-k equals NumPy's
full sort on 10^5 random unit vectors; a folder of real ModelNet40 objects embeds to the twin's features; a second
run embeds only what is new; a library from another encoder, a bad file and a folder that is not a library are one
line each."""

import json
import pathlib

import numpy as np
import pytest
import torch

from cg3d_jax import shape_library
from tests.conftest import modelnet_root, run_command


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize('chunk', [7919, 100000])
def test_exact_search_equals_a_full_sort_on_a_hundred_thousand_unit_vectors(chunk):
  """Against np.argsort of every score (no near-ties at the k-th place in this fixture): the same rows in the same
  order and the same scores, whether the rows fit one chunk or 13 (a prime size, so chunks end mid-way)."""
  rng = np.random.default_rng(0)
  rows = _unit(rng.normal(size=(100_000, 64))).astype(np.float32)
  queries = _unit(rng.normal(size=(6, 64))).astype(np.float32)
  scores, found = shape_library.top_k(queries, rows, 10, chunk=chunk)
  full = queries @ rows.T
  want = np.argsort(-full, axis=1, kind='stable')[:, :10]
  ranked = np.sort(full, axis=1)[:, ::-1]
  assert np.min(ranked[:, 9] - ranked[:, 10]) > 1e-6  # the cut is no near-tie
  np.testing.assert_array_equal(found, want)
  np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=0, atol=1e-6)
  few_scores, few = shape_library.top_k(queries, rows[:4], 10)
  np.testing.assert_array_equal(few, np.argsort(-(queries @ rows[:4].T), axis=1, kind='stable'))
  assert few_scores.shape == (6, 4)


def test_a_query_of_another_width_is_one_line():
  with pytest.raises(shape_library.InputError, match='queries of width 3 against a library of width 64'):
    shape_library.top_k(np.ones((1, 3)), np.ones((5, 64)), 2)


def _shape_folder(root, names):
  """Real ModelNet40 objects (all 10,000 points, xyz) as .npy files filed by class."""
  for name in names:
    cls = name.rsplit('_', 1)[0]
    xyz = np.loadtxt(modelnet_root() / cls / f'{name}.txt', delimiter=',', dtype=np.float32)[:, :3]
    (root / cls).mkdir(parents=True, exist_ok=True)
    np.save(root / cls / f'{name}.npy', xyz)
  return root


def test_embed_a_folder_as_the_twin_does_then_only_what_is_new(tmp_path, capsys):
  """A Uni3D file (tiny, two blocks: its 10,000 points are each object's whole cloud, so farthest-point sampling
  keeps them all) embeds real objects to the twin's L2-normalised features of NumPy's preparation (centred, unit
  sphere, grey 0.4); the manifest names files, classes, point counts and thumbnails; a second run over a folder
  with one more object embeds that one only and leaves the rows there bitwise; another encoder's run into the same
  library, a broken file and a folder of other things are one line each; --skip_bad names and counts the file."""
  from cg3d_jax import embed
  from cg3d_jax.twins import ppat as twin_ppat
  from tests.test_ppat import released_file
  from tests.test_uni3d import deepspeed_file, twin_and_variables

  twin, _ = twin_and_variables('tiny', seed=9, depth=2)
  deepspeed_file(tmp_path / 'uni3d.pt', twin)
  shapes = _shape_folder(tmp_path / 'shapes', ['airplane_0627', 'bathtub_0107'])
  library = tmp_path / 'library'
  argv = ['--checkpoint', str(tmp_path / 'uni3d.pt'), '--shapes', str(shapes), '--library', str(library)]
  argv += ['--points_per_shape=10000', '--batch_size=8', '--dtype=float32', '--thumbnail=32']
  assert run_command(embed.main, argv) == 0
  assert 'embedded 2 shapes' in capsys.readouterr().out
  manifest = json.loads((library / 'manifest.json').read_text())
  assert [(e['file'], e['class'], e['points']) for e in manifest] == [
    ('airplane/airplane_0627.npy', 'airplane', 10000),
    ('bathtub/bathtub_0107.npy', 'bathtub', 10000),
  ]
  assert all((library / e['thumbnail']).is_file() for e in manifest)
  rows = np.load(library / 'embeddings.npy')

  clouds = []
  for entry in manifest:
    xyz = np.load(shapes / entry['file']).astype(np.float64)
    xyz -= xyz.mean(axis=0)
    clouds.append(np.concatenate([xyz / np.linalg.norm(xyz, axis=1).max(), np.full_like(xyz, 0.4)], axis=1))
  with torch.no_grad():
    want = _unit(twin(torch.from_numpy(np.stack(clouds).astype(np.float32))).numpy())
  np.testing.assert_allclose(rows, want, atol=1e-4, rtol=0)

  _shape_folder(shapes, ['airplane_0628'])
  assert run_command(embed.main, argv) == 0
  out = capsys.readouterr().out
  assert 'embedded 1 shapes' in out and 'holds 3' in out
  again = np.load(library / 'embeddings.npy')
  assert again.shape == (3, 1024)
  np.testing.assert_array_equal(again[:2], rows)
  assert json.loads((library / 'library.json').read_text())['count'] == 3

  torch.manual_seed(0)
  released_file(tmp_path / 'ppat.pt', twin_ppat.make(out_channel=32, dim=64, heads=2, depth=1, mlp_dim=128, sa_dim=32))
  other = ['--checkpoint', str(tmp_path / 'ppat.pt'), *argv[2:]]
  assert run_command(embed.main, other) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and f'was embedded with {tmp_path / "uni3d.pt"}' in err[0] and 'another space' in err[0], err

  (shapes / 'broken.ply').write_text('ply\nformat ascii 1.0\nelement vertex 5\n')
  assert run_command(embed.main, argv) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and 'broken.ply' in err[0], err
  assert run_command(embed.main, [*argv, '--skip_bad']) == 0
  assert '1 skipped' in capsys.readouterr().out
  assert json.loads((library / 'library.json').read_text())['count'] == 3

  (tmp_path / 'elsewhere').mkdir()
  (tmp_path / 'elsewhere' / 'notes.txt').write_text('mine')
  mixed = [*argv[:4], '--library', str(tmp_path / 'elsewhere'), *argv[6:]]
  assert run_command(embed.main, mixed) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and 'is not a shape library' in err[0], err

  # Search: a shape query finds itself first, a text query's row of a class-feature file ranks as NumPy does, the
  # JSON lists files, classes and thumbnails; another encoder's query is one line.
  from cg3d_jax import search

  rows = np.load(library / 'embeddings.npy')
  query = ['--library', str(library), '--checkpoint', str(tmp_path / 'uni3d.pt'), '--json', str(tmp_path / 'q.json')]
  assert run_command(search.main, [*query, '--points', str(shapes / 'airplane' / 'airplane_0628.npy'), '--k=2']) == 0
  found = json.loads((tmp_path / 'q.json').read_text())['results']
  assert found[0]['file'] == 'airplane/airplane_0628.npy' and found[0]['score'] == pytest.approx(1.0, abs=1e-4)
  assert len(found) == 2 and pathlib.Path(found[0]['thumbnail']).is_file()
  approximate = [*query, '--points', str(shapes / 'airplane' / 'airplane_0628.npy'), '--k=2', '--approximate']
  assert run_command(search.main, approximate) == 0 and (library / 'index.faiss').is_file()
  graph = json.loads((tmp_path / 'q.json').read_text())['results']  # 3 rows: the graph visits them all
  assert [h['file'] for h in graph] == [h['file'] for h in found]
  np.testing.assert_allclose([h['score'] for h in graph], [h['score'] for h in found], atol=1e-5)
  table = np.random.default_rng(5).normal(size=(2, 1024)).astype(np.float32)
  np.savez(tmp_path / 'labels.npz', names=np.array(['airplane', 'bathtub']), features=table)
  text = [*query, '--text', 'bathtub', f'--class_features={tmp_path / "labels.npz"}', '--k=3']
  assert run_command(search.main, text) == 0
  found = json.loads((tmp_path / 'q.json').read_text())['results']
  scores = rows @ _unit(table[1])
  manifest = json.loads((library / 'manifest.json').read_text())
  assert [f['file'] for f in found] == [manifest[i]['file'] for i in np.argsort(-scores, kind='stable')]
  np.testing.assert_allclose([f['score'] for f in found], np.sort(scores)[::-1], atol=1e-5)
  capsys.readouterr()
  other = ['--library', str(library), '--checkpoint', str(tmp_path / 'ppat.pt'), '--text', 'bathtub']
  assert run_command(search.main, [*other, f'--class_features={tmp_path / "labels.npz"}']) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and 'a query must come from the encoder that embedded the rows' in err[0], err


def test_the_approximate_index_is_exact_when_it_searches_deep_enough(tmp_path):
  """The HNSW index (faiss) against the exact scan on 20,000 random unit vectors: searched as deep as the library,
  its top 10 equals the exact one; at the default depth its recall@10 is measured (bench/bench_search.py reports it
  at 10^5 and 10^6 rows); written beside the rows in faiss's own format and read back to the same answers."""
  rng = np.random.default_rng(1)
  rows = _unit(rng.normal(size=(20_000, 32))).astype(np.float32)
  queries = _unit(rng.normal(size=(20, 32))).astype(np.float32)
  _, exact = shape_library.top_k(queries, rows, 10)
  index = shape_library.ApproximateIndex(rows)
  _, deep = index.top_k(queries, 10, search_depth=20_000)
  assert shape_library.recall_at_k(deep, exact) == 1.0
  _, default = index.top_k(queries, 10)
  assert 0.5 < shape_library.recall_at_k(default, exact) <= 1.0
  index.write(tmp_path / 'index.faiss')
  again = shape_library.ApproximateIndex.read(tmp_path / 'index.faiss')
  np.testing.assert_array_equal(again.top_k(queries, 10)[1], default)
  assert shape_library.recall_at_k(exact[:, ::-1], exact) == 1.0 and shape_library.recall_at_k(exact + 1, exact) < 1.0


def test_two_hosts_embed_what_one_host_embeds(tmp_path, tiny_checkpoint):
  """launch/local_multihost.sh 2 2 running cg3d-embed (CG3D_MODULE): five real objects at a global batch of 4, so each
  host reads only its two rows of the first batch and the second host holds padding alone in the last; process 0
  writes. The library equals one process's with 8 devices: the same manifest, thumbnails byte for byte (drawn from
  the gathered points), rows to float32 rounding. Shown to fail when every host reads the first host's rows (files 0
  and 1 twice, then 4 twice: 'holds 6')."""
  from cg3d_jax import embed
  from tests.test_multihost import _tail, launched_pod

  shapes = _shape_folder(tmp_path / 'shapes', ['airplane_0627', 'airplane_0628', 'bathtub_0107', 'bathtub_0108'])
  _shape_folder(shapes, ['bathtub_0109'])
  argv = ['--checkpoint', str(tiny_checkpoint), '--shapes', str(shapes), '--batch_size=4', '--dtype=float32']
  argv += ['--thumbnail=24', '--chunk=2']
  launched_pod(tmp_path / 'logs', 2, 2, [*argv, '--library', str(tmp_path / 'pod')], CG3D_MODULE='cg3d_jax.embed')
  assert 'holds 5' in _tail(tmp_path / 'logs' / 'process_1.log')  # every host counted every row
  assert run_command(embed.main, [*argv, '--library', str(tmp_path / 'one')]) == 0
  got, want = (json.loads((tmp_path / name / 'manifest.json').read_text()) for name in ('pod', 'one'))
  assert got == want and len(got) == 5
  for entry in got:
    assert (tmp_path / 'pod' / entry['thumbnail']).read_bytes() == (tmp_path / 'one' / entry['thumbnail']).read_bytes()
  pod_rows, one_rows = (np.load(tmp_path / name / 'embeddings.npy') for name in ('pod', 'one'))
  np.testing.assert_allclose(pod_rows, one_rows, atol=1e-5, rtol=0)
  assert json.loads((tmp_path / 'pod' / 'library.json').read_text())['shards'] == ['000000.npy', '000001.npy']
