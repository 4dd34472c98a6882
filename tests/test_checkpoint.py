"""Checkpoints: save on one mesh, restore bitwise onto others; extras, pruning, best, async, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cg3d_jax import checkpoints, sharding, trees
from cg3d_jax.configs import base
from cg3d_jax.training import optim

RULES = [
  ('^encoder/', dict(name='adamw', lr=1e-3, weight_decay=0.05, clip_norm=1.0)),
  ('^clip/prompts/', dict(name='sgd', lr=1e-2, momentum=0.9)),
  ('^clip/', None),
]
MIN_FSDP = 1024  # small enough that the test matrices really are split over fsdp


def _train_state():
  """A small train state after one optimizer step, so that every optimizer-state leaf is non-trivial."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  params = {
    'encoder': {'dense': {'kernel': normal(64, 32), 'bias': normal(32)}, 'cls_token': normal(1, 1, 32)},
    'clip': {
      'vision': {'kernel': normal(32, 128)},
      'logit_scale': jnp.asarray(4.6, jnp.float32),
      'prompts': {'tokens': normal(2, 5, 32)},
    },
  }
  tx, _ = optim.make_optimizer(RULES, steps_per_epoch=10, total_steps=100)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {
    'params': params,
    'opt_state': opt_state,
    'batch_stats': {'bn': {'mean': normal(32), 'var': normal(32)}},
    'step': jnp.asarray(7, jnp.int32),
  }


def _on_mesh(state, mesh):
  return jax.device_put(state, sharding.state_shardings(state, mesh, min_fsdp_size=MIN_FSDP))


def _target(state, mesh):
  shapes = jax.eval_shape(lambda: state)
  return sharding.with_shardings(shapes, sharding.state_shardings(shapes, mesh, min_fsdp_size=MIN_FSDP))


def _assert_bitwise_equal(got, expected):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope='module')
def saved_on_4x2(tmp_path_factory):
  """One checkpoint written from a 4x2 data x fsdp mesh, plus the host copy of what was saved."""
  directory = tmp_path_factory.mktemp('ckpt_4x2')
  state = _train_state()
  mesh = sharding.make_mesh(dict(data=4, fsdp=2))
  sharded = _on_mesh(state, mesh)
  assert sharded['params']['clip']['vision']['kernel'].sharding.spec == P(None, 'fsdp')
  config = base.get_base_config()
  config.train.batch_size = 48
  with checkpoints.Checkpointer(str(directory), every_steps=1) as ckpt:
    assert ckpt.save(
      7,
      sharded,
      data_step=7 * 48,
      rng=jax.random.key(11),
      config=config,
      metrics={'val/top1': 0.25, 'train/loss': np.float32(1.5)},
    )
    ckpt.wait()
  return directory, jax.device_get(state), config


@pytest.mark.parametrize('target_mesh', ['one_device', '8x1', '2x4'])
def test_restore_onto_other_meshes_is_bitwise_equal(saved_on_4x2, target_mesh):
  directory, expected, _ = saved_on_4x2
  mesh = {
    'one_device': lambda: sharding.make_mesh(dict(data=1, fsdp=1), devices=jax.devices()[:1]),
    '8x1': lambda: sharding.make_mesh(dict(data=8, fsdp=1)),
    '2x4': lambda: sharding.make_mesh(dict(data=2, fsdp=4)),
  }[target_mesh]()
  target = _target(expected, mesh)
  with checkpoints.Checkpointer(str(directory)) as ckpt:
    assert ckpt.latest_step() == 7
    state, _ = ckpt.restore(target_state_shapes_with_shardings=target)
  _assert_bitwise_equal(state, expected)
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
    assert leaf.sharding == want.sharding
  kernel = state['params']['clip']['vision']['kernel']
  assert kernel.addressable_shards[0].data.shape == (32, 128 // mesh.shape['fsdp'])


def test_extras_round_trip(saved_on_4x2):
  directory, expected, config = saved_on_4x2
  with checkpoints.Checkpointer(str(directory)) as ckpt:
    _, extras = ckpt.restore(7, target_state_shapes_with_shardings=_target(expected, sharding.make_mesh(dict(data=-1))))
  assert extras['step'] == 7 and extras['data_step'] == 7 * 48
  assert jax.dtypes.issubdtype(extras['rng'].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(extras['rng']), jax.random.key_data(jax.random.key(11)))
  np.testing.assert_array_equal(jax.random.uniform(extras['rng'], (4,)), jax.random.uniform(jax.random.key(11), (4,)))
  assert extras['config'].train.batch_size == 48
  assert json.loads(extras['config'].to_json()) == json.loads(config.to_json_best_effort())
  assert extras['metrics'] == {'val/top1': 0.25, 'train/loss': 1.5}


def test_raw_uint32_rng_round_trips_as_raw(tmp_path):
  state = {'w': jnp.arange(4.0)}
  with checkpoints.Checkpointer(str(tmp_path), every_steps=1, async_save=False) as ckpt:
    ckpt.save(1, state, data_step=np.int64(5), rng=jax.random.PRNGKey(3), config={'note': 'plain dict'})
    _, extras = ckpt.restore(target_state_shapes_with_shardings=_target(state, sharding.make_mesh(dict(data=-1))))
  assert extras['rng'].dtype == jnp.uint32
  np.testing.assert_array_equal(extras['rng'], jax.random.PRNGKey(3))
  assert extras['config'].note == 'plain dict' and extras['metrics'] is None and extras['data_step'] == 5


def test_unserialisable_extras_fail_in_the_caller_not_in_the_save_thread(tmp_path):
  with checkpoints.Checkpointer(str(tmp_path), every_steps=1) as ckpt:
    with pytest.raises(TypeError, match='checkpoint data_step: object is not JSON-serialisable'):
      ckpt.save(1, {'w': jnp.arange(4.0)}, data_step=object(), rng=jax.random.key(0), config=None)
    assert ckpt.all_steps() == []


def test_keep_prunes_to_the_last_k(tmp_path):
  state = {'w': jnp.arange(4.0)}
  with checkpoints.Checkpointer(str(tmp_path), keep=2, keep_best=False, every_steps=1) as ckpt:
    for step in range(1, 7):
      ckpt.save(
        step,
        jax.tree.map(lambda x: x + step, state),
        data_step=step,
        rng=jax.random.key(0),
        config=None,
        metrics={'val/top1': float(step == 2)},
      )
    ckpt.wait()
    assert ckpt.all_steps() == [5, 6]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ['5', '6']


def test_best_is_kept_beside_the_last_k(tmp_path):
  state = {'w': jnp.arange(4.0)}
  accuracies = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: None, 6: 0.5}
  with checkpoints.Checkpointer(str(tmp_path), keep=2, every_steps=1) as ckpt:
    for step, accuracy in accuracies.items():
      metrics = None if accuracy is None else {'val/top1': accuracy, 'train/loss': 1.0}
      ckpt.save(step, state, data_step=step, rng=jax.random.key(0), config=None, metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]  # best (0.9 at step 2) plus the two latest
    assert ckpt.best_step() == 2
  with checkpoints.Checkpointer(str(tmp_path), keep=2, every_steps=1) as reopened:
    assert reopened.all_steps() == [2, 5, 6] and reopened.best_step() == 2 and reopened.latest_step() == 6


def test_a_save_cut_short_by_a_kill_is_cleared_when_the_run_restarts(tmp_path):
  """SIGKILL during an async save leaves orbax's temporary step folder (written under that name, renamed when
  complete); the restarted run's checkpointer removes it before its first save."""
  import shutil

  state = {'w': jnp.arange(4.0)}
  with checkpoints.Checkpointer(str(tmp_path), every_steps=1) as ckpt:
    ckpt.save(2, state, data_step=2, rng=jax.random.key(0), config=None)
  partial = tmp_path / '6.orbax-checkpoint-tmp'
  shutil.copytree(tmp_path / '2', partial)
  (partial / 'commit_success.txt').unlink(missing_ok=True)
  (partial / 'state' / 'manifest.ocdbt').unlink(missing_ok=True)
  with checkpoints.Checkpointer(str(tmp_path), every_steps=1) as reopened:
    assert reopened.all_steps() == [2]
    reopened.save(4, state, data_step=4, rng=jax.random.key(0), config=None)  # orbax clears before it saves
  assert sorted(p.name for p in tmp_path.iterdir()) == ['2', '4']


def test_async_save_survives_deleting_the_state_then_wait(tmp_path):
  mesh = sharding.make_mesh(dict(data=4, fsdp=2))
  state = _train_state()
  expected = jax.device_get(state)
  sharded = _on_mesh(state, mesh)
  ckpt = checkpoints.Checkpointer(str(tmp_path), every_steps=1, async_save=True)
  assert ckpt.save(3, sharded, data_step=3, rng=jax.random.key(1), config=None)
  for leaf in jax.tree.leaves(sharded):  # what a donated train step would do to the buffers
    leaf.delete()
  ckpt.wait()
  restored, extras = ckpt.restore(target_state_shapes_with_shardings=_target(expected, mesh))
  ckpt.close()
  _assert_bitwise_equal(restored, expected)
  assert extras['data_step'] == 3


def test_save_interval_and_force(tmp_path):
  state = {'w': jnp.arange(4.0)}
  with checkpoints.Checkpointer(str(tmp_path), every_steps=5, async_save=False) as ckpt:
    assert ckpt.should_save(5) and ckpt.should_save(10) and not ckpt.should_save(6)
    assert not ckpt.save(6, state, data_step=6, rng=jax.random.key(0), config=None)
    assert ckpt.save(10, state, data_step=10, rng=jax.random.key(0), config=None)
    assert ckpt.save(12, state, data_step=12, rng=jax.random.key(0), config=None, force=True)
    assert ckpt.all_steps() == [10, 12]


def test_missing_directory_and_missing_step_are_clear_errors(tmp_path):
  missing = tmp_path / 'no_such_run'
  with pytest.raises(FileNotFoundError, match='no_such_run does not exist'):
    checkpoints.Checkpointer(str(missing), read_only=True)
  target = _target({'w': jnp.arange(4.0)}, sharding.make_mesh(dict(data=-1)))
  with checkpoints.Checkpointer(str(tmp_path / 'empty')) as ckpt:
    with pytest.raises(FileNotFoundError, match='no checkpoint to restore in .*empty'):
      ckpt.restore(target_state_shapes_with_shardings=target)
    ckpt.save(2, {'w': jnp.arange(4.0)}, data_step=0, rng=jax.random.key(0), config=None, force=True)
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match=r'step 3 .*available steps: \[2\]'):
      ckpt.restore(3, target_state_shapes_with_shardings=target)
    with pytest.raises(ValueError, match='need a sharding'):
      ckpt.restore(2, target_state_shapes_with_shardings={'w': jax.ShapeDtypeStruct((4,), jnp.float32)})


def test_typed_keys_in_state_are_rejected(tmp_path):
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(TypeError, match=r"\['rng'\] is a typed PRNG key"):
      ckpt.save(1, {'rng': jax.random.key(0)}, data_step=0, rng=jax.random.key(0), config=None, force=True)


def test_checkpoint_written_before_the_layer_scan_restores_stacked(tmp_path):
  """A state saved with one subtree per layer (`blocks_0`, `blocks_1`: before the scan) resumes into the stacked
  layout on the target's shardings, and `read_step` gives the stacked layout too."""
  rng = np.random.default_rng(5)
  per_layer = [
    {'fc': {'kernel': rng.normal(size=(32, 64)).astype(np.float32), 'bias': rng.normal(size=64).astype(np.float32)}}
    for _ in range(3)
  ]
  stacked = {
    'encoder': {
      'blocks': {
        'fc': {
          'kernel': np.stack([p['fc']['kernel'] for p in per_layer]),
          'bias': np.stack([p['fc']['bias'] for p in per_layer]),
        }
      },
      'cls_token': rng.normal(size=(1, 1, 32)).astype(np.float32),
    }
  }
  tx, _ = optim.make_optimizer(
    [('^encoder/', dict(name='adamw', lr=1e-3, weight_decay=0.05))], steps_per_epoch=10, total_steps=100
  )
  _, opt_state = tx.update(jax.tree.map(jnp.ones_like, stacked), tx.init(stacked), stacked)
  state = {'params': stacked, 'opt_state': opt_state, 'step': jnp.asarray(3, jnp.int32)}
  old = trees.unstack_layers(jax.device_get(state))
  assert set(old['params']['encoder']) == {'blocks_0', 'blocks_1', 'blocks_2', 'cls_token'}
  with checkpoints.Checkpointer(str(tmp_path), every_steps=1, async_save=False) as ckpt:
    ckpt.save(3, old, data_step=3, rng=jax.random.key(0), config={'note': 'before the scan'})
  mesh = sharding.make_mesh(dict(data=2, fsdp=4))
  target = _target(state, mesh)
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    restored, _ = ckpt.restore(target_state_shapes_with_shardings=target)
  _assert_bitwise_equal(restored, jax.device_get(state))
  for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert leaf.sharding == want.sharding
  assert restored['params']['encoder']['blocks']['fc']['kernel'].sharding.spec == P(None, None, 'fsdp')
  saved = checkpoints.read_step(str(tmp_path))
  np.testing.assert_array_equal(
    saved.state['params']['encoder']['blocks']['fc']['kernel'], stacked['encoder']['blocks']['fc']['kernel']
  )
