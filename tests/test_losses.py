"""Contrastive loss against hand-computed values and an independent NumPy InfoNCE."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cg3d_jax.models.layers import l2_normalize
from cg3d_jax.training import losses


def _numpy_infonce(a, b, scale, excluded=None):
  """Symmetric InfoNCE by hand: log-softmax written out, excluded[i, j] pairs left out of the denominators."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  logits = scale * a @ b.T
  keep = np.ones_like(logits, bool) if excluded is None else ~excluded

  def one_direction(lg, kp):
    total = 0.0
    for i in range(lg.shape[0]):
      row = lg[i][kp[i]]
      log_denominator = row.max() + math.log(np.exp(row - row.max()).sum())
      total += log_denominator - lg[i, i]
    return total / lg.shape[0]

  return (one_direction(logits, keep) + one_direction(logits.T, keep.T)) / 2


def _random_features(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_two_by_two_by_hand():
  a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  b = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
  # logits = 2 * a @ b.T = [[2, 1.2], [0, 1.6]]; each CE is log(1 + exp(other - own)) for two classes.
  rows = (math.log1p(math.exp(1.2 - 2.0)) + math.log1p(math.exp(0.0 - 1.6))) / 2
  cols = (math.log1p(math.exp(0.0 - 2.0)) + math.log1p(math.exp(1.2 - 1.6))) / 2
  got = float(losses.contrastive_loss(jnp.asarray(a), jnp.asarray(b), 2.0))
  np.testing.assert_allclose(got, (rows + cols) / 2, rtol=1e-6)


def test_identity_pairs_by_hand():
  eye = jnp.eye(3)
  s = 5.0
  expected = math.log(1 + 2 * math.exp(-s))  # each row: own logit s, two others 0
  np.testing.assert_allclose(float(losses.contrastive_loss(eye, eye, s)), expected, atol=1e-6)


@pytest.mark.parametrize('n,d,scale', [(8, 16, 1.0), (16, 32, 100.0), (5, 512, 14.3)])
def test_matches_numpy_on_random_features(n, d, scale):
  rng = np.random.default_rng(n)
  a, b = _random_features(rng, n, d), _random_features(rng, n, d)
  got = float(losses.contrastive_loss(jnp.asarray(a), jnp.asarray(b), scale))
  np.testing.assert_allclose(got, _numpy_infonce(a, b, scale), rtol=1e-5)


def test_swapping_the_towers_leaves_the_loss_unchanged():
  # Swapping a and b swaps the two directions, so the symmetric loss must not change.
  rng = np.random.default_rng(1)
  a, b = _random_features(rng, 6, 8), _random_features(rng, 6, 8)
  np.testing.assert_allclose(
    float(losses.contrastive_loss(a, b, 3.0)), float(losses.contrastive_loss(b, a, 3.0)), rtol=1e-6
  )


def test_same_class_mask_removes_exactly_the_same_label_negatives():
  labels = np.array([0, 1, 0, 2, 1, 0])
  excluded = (labels[:, None] == labels[None, :]) & ~np.eye(6, dtype=bool)
  assert excluded.sum() == 8  # three 0s give 6 ordered pairs, two 1s give 2
  np.testing.assert_array_equal(np.asarray(losses.same_class_negatives(labels)), excluded)

  rng = np.random.default_rng(2)
  a, b = _random_features(rng, 6, 8), _random_features(rng, 6, 8)
  got = float(losses.contrastive_loss(a, b, 10.0, mask_same_class_labels=jnp.asarray(labels)))
  np.testing.assert_allclose(got, _numpy_infonce(a, b, 10.0, excluded), rtol=1e-5)
  assert not np.isclose(got, _numpy_infonce(a, b, 10.0), rtol=1e-3)

  # Distinct labels remove nothing.
  distinct = float(losses.contrastive_loss(a, b, 10.0, mask_same_class_labels=jnp.arange(6)))
  np.testing.assert_allclose(distinct, _numpy_infonce(a, b, 10.0), rtol=1e-5)


def test_masked_loss_has_finite_gradients():
  rng = np.random.default_rng(3)
  a, b = _random_features(rng, 4, 8), _random_features(rng, 4, 8)
  labels = jnp.array([0, 0, 1, 1])
  grads = jax.grad(lambda x, y: losses.contrastive_loss(x, y, 10.0, mask_same_class_labels=labels), argnums=(0, 1))(
    jnp.asarray(a), jnp.asarray(b)
  )
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_bfloat16_features_computed_in_float32():
  rng = np.random.default_rng(4)
  a, b = _random_features(rng, 8, 16), _random_features(rng, 8, 16)
  a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  got = losses.contrastive_loss(a16, b16, 20.0)
  assert got.dtype == jnp.float32
  expected = _numpy_infonce(np.asarray(a16, np.float32), np.asarray(b16, np.float32), 20.0)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_l2_normalize():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], np.float32)
  got = np.asarray(l2_normalize(jnp.asarray(x)))
  np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)


def test_shape_errors_are_clear():
  with pytest.raises(ValueError, match='equal shape'):
    losses.contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((3, 8)), 1.0)
  with pytest.raises(ValueError, match='mask_same_class_labels'):
    losses.contrastive_loss(jnp.zeros((4, 8)), jnp.zeros((4, 8)), 1.0, mask_same_class_labels=jnp.zeros(3))


def test_loss_over_a_sharded_batch_is_the_global_loss():
  from cg3d_jax import sharding  # the batch split over all 8 simulated devices, as in the train step

  mesh = sharding.make_mesh(dict(data=4, fsdp=2))
  rng = np.random.default_rng(5)
  a, b = _random_features(rng, 16, 32), _random_features(rng, 16, 32)
  batch = sharding.batch_sharding(mesh)
  loss_fn = jax.jit(
    lambda x, y: losses.contrastive_loss(x, y, 30.0),
    in_shardings=(batch, batch),
    out_shardings=sharding.replicated(mesh),
  )
  got = float(loss_fn(jax.device_put(a, batch), jax.device_put(b, batch)))
  np.testing.assert_allclose(got, _numpy_infonce(a, b, 30.0), rtol=1e-5)
