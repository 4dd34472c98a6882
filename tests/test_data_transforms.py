"""Point transforms: TF against the NumPy reference (CG3D's formulas), hand-computed cases, and statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from cg3d_jax.data import device_transforms, host_transforms, tf_transforms
from tests import numpy_transforms


def _cloud(n=512, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def _tf_seed(i):
  return tf.constant([7, i], tf.int64)


def _augment_many(pts, prob, num_seeds):
  """(outputs, flags) for seeds 0..num_seeds-1, run as one graph (eager calls one by one are slow)."""
  ds = tf.data.Dataset.range(num_seeds).map(
    lambda i: tf_transforms.tf_augment(
      tf.stack([tf.constant(7, tf.int64), i]), tf.constant(pts), prob, return_flags=True
    )
  )
  outs, flags = zip(*ds.as_numpy_iterator())
  return np.stack(outs), np.stack(flags)


def test_rotation_matrices_match_numpy_and_cg3d_convention():
  for angle in (0.0, 0.3, np.pi / 2, 2.5):
    np.testing.assert_allclose(
      tf_transforms.tf_rotation_y(tf.constant(angle, tf.float32)).numpy(),
      numpy_transforms.rotation_y_np(angle),
      atol=1e-6,
    )
  # Hand-computed: CG3D's rotation about y is [[c, 0, s], [0, 1, 0], [-s, 0, c]] applied to rows as `p @ R`
  # (np.dot(data, R)), so a quarter turn sends x to +z and z to -x.
  quarter = numpy_transforms.rotation_y_np(np.pi / 2)
  np.testing.assert_allclose(np.array([1.0, 0, 0]) @ quarter, [0, 0, 1], atol=1e-12)
  np.testing.assert_allclose(np.array([0, 0, 1.0]) @ quarter, [-1, 0, 0], atol=1e-12)
  c, s = np.cos(0.3), np.sin(0.3)
  np.testing.assert_allclose(numpy_transforms.rotation_y_np(0.3), [[c, 0, s], [0, 1, 0], [-s, 0, c]], atol=1e-12)
  angles = np.array([0.1, -0.05, 0.17])
  np.testing.assert_allclose(
    tf_transforms.tf_perturbation_rotation(tf.constant(angles, tf.float32)).numpy(),
    numpy_transforms.perturbation_rotation_np(angles),
    atol=1e-6,
  )
  r = numpy_transforms.perturbation_rotation_np(angles)
  np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)


def test_normalize_unit_sphere_tf_matches_numpy():
  pts = _cloud() * 3 + 5
  ref = host_transforms.normalize_unit_sphere_np(pts)
  got = tf_transforms.tf_normalize_unit_sphere(tf.constant(pts)).numpy()
  np.testing.assert_allclose(got, ref, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ref, axis=1).max(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ref.mean(axis=0), 0.0, atol=1e-6)


def test_resample_draws_rows_of_the_input_with_replacement():
  pts = _cloud(64)
  out = tf_transforms.tf_resample(_tf_seed(0), tf.constant(pts), 500).numpy()
  assert out.shape == (500, 3)
  matches = (np.abs(out[:, None, :] - pts[None]) < 1e-7).all(-1)
  assert matches.any(axis=1).all()
  assert len(np.unique(matches.argmax(axis=1))) > 50  # nearly every input row appears at least once


def test_each_augmentation_runs_with_probability_prob():
  _, flags = _augment_many(_cloud(8), 0.3, 3000)
  rate = flags.mean(axis=0)
  # Binomial(3000, 0.3): sigma = 0.0084, so 0.035 is over 4 sigma.
  np.testing.assert_allclose(rate, 0.3, atol=0.035)
  # Independent draws: pairs co-occur at about 0.09.
  np.testing.assert_allclose((flags[:, 0] & flags[:, 3]).mean(), 0.09, atol=0.025)


def _with_flags(pts, wanted, prob=0.5):
  """The output of the first seed whose drawn flags equal `wanted`."""
  _, flags = _augment_many(pts[:8], prob, 200)
  hits = np.flatnonzero((flags == np.array(wanted, bool)).all(axis=1))
  assert len(hits), f'no seed gave flags {wanted}'
  return tf_transforms.tf_augment(_tf_seed(int(hits[0])), tf.constant(pts), prob).numpy()


def test_rotations_preserve_norms_and_quarter_turns_are_exact():
  pts = _cloud()
  norms = np.linalg.norm(pts, axis=1)
  for wanted in ([1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [1, 1, 1, 0, 0]):
    out = _with_flags(pts, wanted)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), norms, rtol=1e-5)
    if wanted[2] == 0:  # rotations about y keep y
      np.testing.assert_allclose(out[:, 1], pts[:, 1], atol=1e-5)
    else:  # the small perturbation tilts y too, by at most its three clipped angles
      moved = np.abs(out[:, 1] - pts[:, 1])
      assert moved.max() > 1e-4 and (moved <= 3 * host_transforms.ROTATION_CLIP * norms + 1e-5).all()
  out = _with_flags(pts, [1, 0, 0, 0, 0])
  candidates = [pts @ numpy_transforms.rotation_y_np(k * np.pi / 2) for k in range(4)]
  assert min(np.abs(out - c).max() for c in candidates) < 1e-5


def test_jitter_and_drop_follow_the_recipe():
  pts = _cloud(4000)
  jittered = _with_flags(pts, [0, 0, 0, 1, 0])
  noise = jittered - pts
  assert np.abs(noise).max() <= host_transforms.JITTER_CLIP + 1e-6
  np.testing.assert_allclose(noise.std(), host_transforms.JITTER_SIGMA, rtol=0.1)
  dropped = _with_flags(pts, [0, 0, 0, 0, 1])
  zero = (dropped == 0).all(axis=1)
  np.testing.assert_array_equal(dropped[~zero], pts[~zero])
  # 400 draws with replacement among 4000 points: 1 - (1 - 1/4000)**400 = 9.5% distinct points dropped.
  np.testing.assert_allclose(zero.mean(), 1 - (1 - 1 / 4000) ** 400, atol=0.012)
  unchanged = _with_flags(pts, [0, 0, 0, 0, 0])
  np.testing.assert_array_equal(unchanged, pts)


def test_same_seed_same_augmentation():
  pts = tf.constant(_cloud())
  a = tf_transforms.tf_augment(_tf_seed(3), pts, 1.0).numpy()
  b = tf_transforms.tf_augment(_tf_seed(3), pts, 1.0).numpy()
  c = tf_transforms.tf_augment(_tf_seed(4), pts, 1.0).numpy()
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3


def test_numpy_reference_augment_keeps_shape_and_norm_scale():
  pts = host_transforms.normalize_unit_sphere_np(_cloud())
  out = numpy_transforms.augment_np(np.random.default_rng(0), pts, prob=1.0)
  assert out.shape == pts.shape and out.dtype == np.float32
  assert np.linalg.norm(out, axis=1).max() < 1.1


def test_scale_and_translate_ranges_and_per_sample_draws():
  # Clouds of two points, 0 and (1, 1, 1): the output holds the translation and scale + translation directly.
  points = jnp.tile(jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), (512, 1, 1))
  out = np.asarray(jax.jit(device_transforms.scale_and_translate)(jax.random.key(0), points))
  shift, scale = out[:, 0], out[:, 1] - out[:, 0]
  assert (np.abs(shift) <= 0.2 + 1e-6).all() and np.abs(shift).max() > 0.18
  assert (scale >= 2 / 3 - 1e-6).all() and (scale <= 1.5 + 1e-6).all()
  assert scale.min() < 0.7 and scale.max() > 1.45
  assert len(np.unique(np.round(scale[:, 0], 6))) == 512  # every sample draws its own
  assert np.abs(scale[:, 0] - scale[:, 1]).max() > 0.3  # anisotropic
  np.testing.assert_allclose(scale.mean(), (2 / 3 + 1.5) / 2, atol=0.03)


def test_farthest_point_sample_np_hand_computed():
  # From index 0 at x=0: farthest is x=10 (index 3), then x=4 or 5 -> |5-0|=5 vs |5-10|=5 ... x=5 is min(5, 5)=5,
  # x=4 is min(4, 6)=4, so index 2 (x=5). The near-origin point (index 4) is never chosen.
  pts = np.array([[0, 0, 0], [4, 0, 0], [5, 0, 0], [10, 0, 0], [0.01, 0, 0]], np.float64)
  pts[0] = [0.5, 0, 0]  # the start point must not itself be near the origin for the example to be clear
  np.testing.assert_array_equal(numpy_transforms.farthest_point_sample_np(pts, 3), [0, 3, 2])


def _drawn_params(num_seeds: int, num_points: int = 16, prob: float = 1.0) -> dict[str, np.ndarray]:
  ds = tf.data.Dataset.range(num_seeds).map(
    lambda i: tf_transforms.tf_augment_params(tf.stack([tf.constant(7, tf.int64), i]), num_points, prob)
  )
  draws = list(ds.as_numpy_iterator())
  return {k: np.stack([d[k] for d in draws]) for k in draws[0]}


def test_augmentation_draws_follow_cg3ds_distributions():
  """Quarter turns uniform over 0..3, the free angle uniform over [0, 2 pi), the perturbation N(0, 0.06) clipped
  at 0.18 per axis, the jitter N(0, 0.01) clipped at 0.05, and N // 10 drop indices, over 4000 seeds."""
  d = _drawn_params(4000)
  turns = np.bincount(d['quarter_turns'], minlength=4)
  assert turns.shape == (4,) and (np.abs(turns - 1000) < 4 * np.sqrt(1000 * 0.75)).all(), turns
  angles = d['angle']
  assert angles.min() >= 0 and angles.max() < 2 * np.pi
  quarters = np.bincount((angles // (np.pi / 2)).astype(int), minlength=4)
  assert (np.abs(quarters - 1000) < 4 * np.sqrt(1000 * 0.75)).all(), quarters
  tilt = d['angles'].ravel()
  assert np.abs(tilt).max() <= host_transforms.ROTATION_CLIP + 1e-7
  # N(0, 0.06) beyond +-0.18 (3 sigma): 0.27% of 12,000 draws land on the clip; the rest has a 0.06 spread.
  clipped = np.isclose(np.abs(tilt), host_transforms.ROTATION_CLIP)
  assert 0.0005 < clipped.mean() < 0.006, clipped.mean()
  np.testing.assert_allclose(tilt.std(), host_transforms.ROTATION_SIGMA, rtol=0.05)
  noise = d['noise'].ravel()
  assert np.abs(noise).max() <= host_transforms.JITTER_CLIP + 1e-7
  np.testing.assert_allclose(noise.std(), host_transforms.JITTER_SIGMA, rtol=0.05)
  assert d['dropped'].shape == (4000, 16 // host_transforms.DROP_FRACTION)


def test_tf_and_numpy_augmentations_compose_in_the_same_order():
  """With every augmentation on, the TF pipeline's output equals the NumPy reference given the same draws. The
  steps do not commute (a perturbation after the rotation about y is not one before it; jitter rotated is not
  jitter), so a different order in either would show."""
  pts = _cloud(64)
  for i in range(5):
    params = tf_transforms.tf_augment_params(_tf_seed(i), 64, 1.0)
    got = tf_transforms.tf_apply_augment(tf.constant(pts), params).numpy()
    want = numpy_transforms.apply_augment_np(pts, {k: v.numpy() for k, v in params.items()})
    np.testing.assert_allclose(got, want, atol=2e-5)
    reordered = dict({k: v.numpy() for k, v in params.items()}, apply=np.array([0, 0, 1, 0, 0], bool))
    then_rotated = numpy_transforms.apply_augment_np(
      numpy_transforms.apply_augment_np(pts, reordered), dict(reordered, apply=np.array([1, 1, 0, 1, 1], bool))
    )
    assert np.abs(then_rotated - want).max() > 1e-3  # the order is observable
