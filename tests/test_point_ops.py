"""Point ops against straightforward NumPy implementations of the same rules, on real ModelNet40 objects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cg3d_jax.models import point_ops
from tests.conftest import modelnet_root

OBJECTS = ('airplane/airplane_0001', 'airplane/airplane_0630', 'bathtub/bathtub_0107', 'bathtub/bathtub_0112')


def load_modelnet_xyz(fixtures_dir, name: str) -> np.ndarray:
  rows = np.loadtxt(modelnet_root() / f'{name}.txt', delimiter=',', dtype=np.float32)
  assert rows.shape == (10000, 6)
  return rows[:, :3]


@pytest.fixture(scope='module')
def clouds(fixtures_dir) -> np.ndarray:
  return np.stack([load_modelnet_xyz(fixtures_dir, name) for name in OBJECTS])  # (4, 10000, 3)


# Rounding differs between machines (vector width, fused multiply-add): a float32 distance may move by a few ulps
# (~1e-7 relative). Where the best and the next-best running minimum of an FPS step are further apart than this, no
# machine can pick differently, so exact equality with the reference is a machine-independent check.
NEAR_TIE = 1e-5


def numpy_fps(xyz: np.ndarray, num_samples: int) -> np.ndarray:
  """The CUDA kernel's rules written out plainly for one cloud (lowest index on ties, float32 distances).

  Also asserts that no step has a near-tie (distinct running minima within NEAR_TIE of each other at the top), so
  that comparing a float32 implementation with it does not depend on the machine's rounding. Exact ties (copies of
  a point) are computed identically everywhere and are allowed.
  """
  xyz = xyz.astype(np.float32)
  n = len(xyz)
  sq_norm = xyz[:, 0] * xyz[:, 0] + xyz[:, 1] * xyz[:, 1] + xyz[:, 2] * xyz[:, 2]
  skipped = sq_norm.astype(np.float64) <= 1e-3  # CUDA compares the float with the double literal
  temp = np.full(n, 1e10, np.float32)
  out = [0]
  old = 0
  for step in range(1, num_samples):
    best, besti = np.float32(-1.0), 0
    d = (
      (xyz[:, 0] - xyz[old, 0]) * (xyz[:, 0] - xyz[old, 0])
      + (xyz[:, 1] - xyz[old, 1]) * (xyz[:, 1] - xyz[old, 1])
      + (xyz[:, 2] - xyz[old, 2]) * (xyz[:, 2] - xyz[old, 2])
    )
    for k in range(n):  # the kernel's per-thread scan, as one thread; strict '>' keeps the lowest index
      if skipped[k]:
        continue
      temp[k] = min(d[k], temp[k])
      if temp[k] > best:
        best, besti = temp[k], k
    runners_up = temp[~skipped & (temp < best)]
    if best > 0 and len(runners_up):
      gap = (best - runners_up.max()) / best
      assert gap > NEAR_TIE, f'fixture cloud has a near-tie at FPS step {step} (relative gap {gap:.1e})'
    old = besti
    out.append(old)
  return np.array(out, np.int32)


def test_fps_matches_numpy_on_modelnet(clouds):
  sub = clouds[:, :2000]  # the per-point Python loop of the reference is slow; 2,000 real points per object
  got = np.asarray(jax.jit(point_ops.farthest_point_sample, static_argnums=1)(jnp.asarray(sub), 64))
  assert got.dtype == np.int32 and got.shape == (4, 64)
  for b in range(len(sub)):
    np.testing.assert_array_equal(got[b], numpy_fps(sub[b], 64), err_msg=OBJECTS[b])
  assert all(len(set(row)) == 64 for row in got)  # no duplicates while enough distinct points remain


def test_fps_full_cloud_and_exact_ties(clouds):
  full = clouds[:1]  # one whole 10,000-point object
  got = np.asarray(point_ops.farthest_point_sample(jnp.asarray(full), 24))
  np.testing.assert_array_equal(got[0], numpy_fps(full[0], 24))
  # Every point twice: each distance ties with its copy's, and the lower index (the first copy) must win.
  doubled = np.concatenate([clouds[2, :500], clouds[2, :500]])[None]
  got = np.asarray(point_ops.farthest_point_sample(jnp.asarray(doubled), 40))
  np.testing.assert_array_equal(got[0], numpy_fps(doubled[0], 40))
  assert np.all(got < 500)


def test_fps_skips_points_at_origin(clouds):
  rng = np.random.default_rng(0)
  sub = clouds[:, :1500].copy()
  for b in range(len(sub)):
    sub[b, rng.choice(1500, 150, replace=False)] = 0.0  # the augmentation's dropped points
  sub[1, 0] = 0.0  # point 0 itself at the origin: still the first sample, then never again
  sub[2, 5] = [0.03, 0.0, 0.0]  # squared norm 9e-4 <= 1e-3: skipped although not exactly at the origin
  got = np.asarray(point_ops.farthest_point_sample(jnp.asarray(sub), 48))
  for b in range(len(sub)):
    np.testing.assert_array_equal(got[b], numpy_fps(sub[b], 48), err_msg=OBJECTS[b])
    sq_norm = np.sum(sub[b, got[b, 1:]] ** 2, axis=-1)
    assert np.all(sq_norm > 1e-3)
  assert got[1, 0] == 0 and 0 not in got[1, 1:]


def test_fps_more_samples_than_points(clouds):
  sub = clouds[:, :40].copy()
  sub[0, [3, 7]] = 0.0
  got = np.asarray(point_ops.farthest_point_sample(jnp.asarray(sub), 60))
  for b in range(len(sub)):
    np.testing.assert_array_equal(got[b], numpy_fps(sub[b], 60), err_msg=OBJECTS[b])
  # Every valid point is used once, then the lowest-index valid point repeats.
  assert sorted(set(got[1][:40])) == list(range(40))
  assert np.all(got[1][40:] == 0)
  assert set(got[0][:38]) == set(range(40)) - {3, 7}


def test_fps_all_points_at_origin():
  got = np.asarray(point_ops.farthest_point_sample(jnp.zeros((2, 30, 3)), 5))
  np.testing.assert_array_equal(got, np.zeros((2, 5), np.int32))


def test_fps_vmaps_like_batch(clouds):
  sub = jnp.asarray(clouds[:, :1024])
  batched = point_ops.farthest_point_sample(sub, 32)
  per_cloud = jax.vmap(lambda c: point_ops.farthest_point_sample(c[None], 32)[0])(sub)
  np.testing.assert_array_equal(np.asarray(batched), np.asarray(per_cloud))


def test_knn_matches_brute_force_sets(clouds):
  pts = clouds[:, :1024]
  queries = clouds[:, 5000:5064]  # real points that are not in the searched set
  got = np.asarray(point_ops.knn(jnp.asarray(queries), jnp.asarray(pts), 32))
  assert got.dtype == np.int32 and got.shape == (4, 64, 32)
  q64, p64 = queries.astype(np.float64), pts.astype(np.float64)
  near_ties = 0
  for b in range(len(pts)):
    for s in range(queries.shape[1]):
      dist = np.sum((p64[b] - q64[b, s]) ** 2, axis=-1)
      order = np.argsort(dist, kind='stable')
      assert len(set(got[b, s])) == 32
      # knn ranks float32 distances of the expanded form, whose rounding (~1e-7 of |q|^2 + |p|^2) differs between
      # machines. Away from near-ties at the k boundary the set is exact on every machine; at one, any point within
      # that rounding of the k-th distance is a right answer.
      bound = NEAR_TIE * (np.sum(q64[b, s] ** 2) + np.max(np.sum(p64[b] ** 2, axis=-1)))
      if dist[order[32]] - dist[order[31]] > bound:
        assert set(got[b, s]) == set(order[:32]), (OBJECTS[b], s)
      else:
        near_ties += 1
        assert dist[got[b, s]].max() <= dist[order[31]] + bound, (OBJECTS[b], s)
        assert set(order[:32]) - set(got[b, s]) <= set(np.nonzero(dist <= dist[order[31]] + bound)[0])
  assert near_ties < 10  # the exact check covers nearly every query


def test_group_centres_and_neighbourhoods(clouds):
  pts = jnp.asarray(clouds[:, :1024])
  neighbourhood, centres = jax.jit(point_ops.group, static_argnums=(1, 2))(pts, 64, 32)
  assert neighbourhood.shape == (4, 64, 32, 3) and centres.shape == (4, 64, 3)
  fps_idx = np.asarray(point_ops.farthest_point_sample(pts, 64))
  np.testing.assert_array_equal(np.asarray(centres), np.take_along_axis(clouds[:, :1024], fps_idx[..., None], 1))
  # Each centre is its own nearest neighbour, so every neighbourhood holds one point exactly at its centre.
  np.testing.assert_array_equal(np.asarray(neighbourhood)[:, :, 0], 0.0)
  # Neighbourhoods are the kNN points of the cloud minus their centre, bit for bit.
  knn_idx = np.asarray(point_ops.knn(centres, pts, 32))
  expected = np.stack([clouds[b, :1024][knn_idx[b]] for b in range(4)]) - np.asarray(centres)[:, :, None]
  np.testing.assert_array_equal(np.asarray(neighbourhood), expected)


def test_gather_points_shapes_and_gradient():
  pts = jnp.arange(2 * 5 * 4, dtype=jnp.float32).reshape(2, 5, 4)
  idx = jnp.array([[[0, 4], [1, 1]], [[2, 3], [4, 0]]])
  out = point_ops.gather_points(pts, idx)
  assert out.shape == (2, 2, 2, 4)
  np.testing.assert_array_equal(np.asarray(out[1, 0, 1]), np.asarray(pts[1, 3]))
  grad = jax.grad(lambda p: point_ops.gather_points(p, idx).sum())(pts)
  np.testing.assert_array_equal(np.asarray(grad[0, :, 0]), [1, 2, 0, 0, 1])


def test_bad_input_errors():
  with pytest.raises(ValueError, match=r'\(B, N, 3\)'):
    point_ops.farthest_point_sample(jnp.zeros((10, 3)), 4)
  with pytest.raises(ValueError, match='k must be'):
    point_ops.knn(jnp.zeros((1, 2, 3)), jnp.zeros((1, 5, 3)), 6)
  with pytest.raises(ValueError, match='group_size=32'):
    point_ops.group(jnp.ones((1, 20, 3)), 8, 32)
