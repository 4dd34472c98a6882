"""Mesh construction and sharding rules on the 8 simulated CPU devices, checked against unsharded NumPy math."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cg3d_jax import sharding


def test_eight_simulated_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize(
  'config,shape',
  [
    (dict(data=-1, fsdp=1), (8, 1)),
    (dict(data=-1, fsdp=2), (4, 2)),
    (dict(data=2, fsdp=-1), (2, 4)),
    (dict(data=4, fsdp=2), (4, 2)),
    (dict(data=-1), (8, 1)),
    (ml_collections.ConfigDict(dict(data=1, fsdp=-1)), (1, 8)),
  ],
)
def test_make_mesh_sizes(config, shape):
  mesh = sharding.make_mesh(config)
  assert mesh.axis_names == ('data', 'fsdp')
  assert tuple(mesh.devices.shape) == shape
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_given_devices():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1), devices=jax.devices()[:1])
  assert tuple(mesh.devices.shape) == (1, 1)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2), devices=jax.devices()[4:])
  assert sorted(d.id for d in mesh.devices.flat) == [4, 5, 6, 7]


@pytest.mark.parametrize(
  'config,message',
  [
    (dict(data=3, fsdp=-1), 'do not divide'),
    (dict(data=4, fsdp=4), 'needs 16 devices, but 8'),
    (dict(data=-1, fsdp=-1), 'at most one axis'),
    (dict(data=-1, model=2), 'unknown axes'),
    (dict(data=0, fsdp=-1), 'positive or -1'),
  ],
)
def test_make_mesh_errors(config, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(config)


@pytest.mark.parametrize(
  'shape,fsdp,spec',
  [
    ((1024, 512), 2, P('fsdp', None)),  # largest dimension
    ((512, 1024), 2, P(None, 'fsdp')),
    ((768, 768), 2, P(None, 'fsdp')),  # ties: the last dimension
    ((1002, 300), 4, P(None, 'fsdp')),  # 1002 is not divisible by 4, 300 is
    ((1001, 263), 2, P()),  # big but nothing divides
    ((262144,), 2, P('fsdp')),  # the size threshold is inclusive
    ((262143,), 2, P()),
    ((512,), 2, P()),  # a bias
    ((), 2, P()),  # a scalar (logit_scale, step counter)
    ((1024, 512), 1, P()),  # fsdp of size 1: plain data parallelism
  ],
)
def test_fsdp_rule(shape, fsdp, spec):
  assert sharding.fsdp_spec(shape, fsdp) == spec


def _mlp_params(rng):
  return {
    'big': {
      'kernel': rng.normal(size=(512, 1024)).astype(np.float32) / 30,
      'bias': rng.normal(size=(1024,)).astype(np.float32),
    },
    'head': {'kernel': rng.normal(size=(1024, 16)).astype(np.float32) / 30},
    'logit_scale': np.float32(2.0),
  }


def test_param_shardings_of_shapes_and_arrays_agree():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2))
  params = _mlp_params(np.random.default_rng(0))
  from_arrays = sharding.param_shardings(params, mesh)
  from_shapes = sharding.param_shardings(jax.eval_shape(lambda: params), mesh)
  assert from_arrays == from_shapes
  assert from_arrays['big']['kernel'] == NamedSharding(mesh, P(None, 'fsdp'))
  assert from_arrays['big']['bias'] == NamedSharding(mesh, P())
  assert from_arrays['head']['kernel'] == NamedSharding(mesh, P())  # 16k elements: under the threshold
  assert from_arrays['logit_scale'] == sharding.replicated(mesh)
  small = sharding.param_shardings(params, mesh, min_fsdp_size=1024)
  assert small['head']['kernel'] == NamedSharding(mesh, P('fsdp', None))


def test_a_scanned_stack_is_sharded_layer_by_layer():
  """The layer axis of a stacked leaf is never split (the scan slices it) and the size threshold is per layer."""
  mesh = sharding.make_mesh(dict(data=1, fsdp=8))
  shapes = {
    'blocks': {
      'fc': {
        'kernel': jax.ShapeDtypeStruct((12, 384, 1536), jnp.float32),
        'bias': jax.ShapeDtypeStruct((16, 8), jnp.float32),
      }
    },
    'layers_wide': jax.ShapeDtypeStruct((16, 8), jnp.float32),
  }  # not a stack: the plain rule
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(shapes, mesh, min_fsdp_size=64))
  assert specs['blocks']['fc']['kernel'] == P(None, None, 'fsdp')
  assert specs['blocks']['fc']['bias'] == P(None)  # 8 elements per layer: replicated, as the bias of one layer
  assert specs['layers_wide'] == P('fsdp', None)


def test_optimizer_state_follows_its_parameter():
  mesh = sharding.make_mesh(dict(data=2, fsdp=4))
  params = jax.eval_shape(lambda: _mlp_params(np.random.default_rng(0)))
  state = {
    'params': params,
    'opt_state': jax.eval_shape(optax.adamw(1e-3).init, params),
    'step': jax.ShapeDtypeStruct((), jnp.int32),
    'rng': jax.eval_shape(lambda: jax.random.key(0)),
  }
  shardings = sharding.state_shardings(state, mesh)
  adam = shardings['opt_state'][0]
  for moments in (adam.mu, adam.nu):
    assert jax.tree.map(lambda s: s.spec, moments) == jax.tree.map(lambda s: s.spec, shardings['params'])
  assert adam.mu['big']['kernel'].spec == P(None, 'fsdp')
  assert adam.count.spec == P() and shardings['step'].spec == P() and shardings['rng'].spec == P()


@pytest.mark.parametrize('config', [dict(data=-1, fsdp=1), dict(data=4, fsdp=2), dict(data=2, fsdp=4)])
def test_jitted_step_with_these_shardings_matches_numpy(config):
  mesh = sharding.make_mesh(config)
  rng = np.random.default_rng(1)
  params = _mlp_params(rng)
  x = rng.normal(size=(16, 512)).astype(np.float32)
  y = rng.integers(0, 16, size=16)
  param_sh = sharding.param_shardings(params, mesh, min_fsdp_size=1024)
  batch_sh = sharding.batch_sharding(mesh)

  def loss_fn(p, x, y):
    h = jax.nn.relu(x @ p['big']['kernel'] + p['big']['bias'])
    logits = p['logit_scale'] * (h @ p['head']['kernel'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def sgd_step(p, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    return loss, jax.tree.map(lambda w, g: w - 0.1 * g, p, grads)

  step = jax.jit(
    sgd_step,
    in_shardings=(param_sh, batch_sh, batch_sh),
    out_shardings=(sharding.replicated(mesh), param_sh),
    donate_argnums=0,
  )
  sharded_params = jax.device_put(params, param_sh)
  xs, ys = jax.device_put(x, batch_sh), jax.device_put(y, batch_sh)
  assert xs.addressable_shards[0].data.shape == (16 // mesh.size, 512)
  if mesh.shape['fsdp'] > 1:
    assert sharded_params['big']['kernel'].addressable_shards[0].data.shape == (512, 1024 // mesh.shape['fsdp'])
  loss, new_params = step(sharded_params, xs, ys)
  assert new_params['big']['kernel'].sharding == param_sh['big']['kernel']

  # Reference: the same step in float64 NumPy on one "device", gradients by hand.
  h_pre = x.astype(np.float64) @ params['big']['kernel'] + params['big']['bias']
  h = np.maximum(h_pre, 0)
  logits = 2.0 * h @ params['head']['kernel']
  logits -= logits.max(axis=1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  expected_loss = -np.log(probs[np.arange(16), y]).mean()
  dlogits = (probs - np.eye(16)[y]) / 16
  d_head = 2.0 * h.T @ dlogits
  dh = 2.0 * dlogits @ params['head']['kernel'].T * (h_pre > 0)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(new_params['head']['kernel']), params['head']['kernel'] - 0.1 * d_head, rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(new_params['big']['kernel']),
    params['big']['kernel'] - 0.1 * x.astype(np.float64).T @ dh,
    rtol=1e-4,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    np.asarray(new_params['big']['bias']), params['big']['bias'] - 0.1 * dh.sum(0), rtol=1e-4, atol=1e-6
  )


def test_with_shardings_builds_abstract_targets():
  mesh = sharding.make_mesh(dict(data=4, fsdp=2))
  shapes = jax.eval_shape(lambda: _mlp_params(np.random.default_rng(0)))
  targets = sharding.with_shardings(shapes, sharding.param_shardings(shapes, mesh))
  assert targets['big']['kernel'].sharding.spec == P(None, 'fsdp')
  assert targets['big']['kernel'].shape == (512, 1024) and targets['big']['kernel'].dtype == jnp.float32
