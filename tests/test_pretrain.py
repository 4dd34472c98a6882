"""Pretraining: frozen CLIP stays frozen, sharding equivalence, exact resume, both update modes learn, NaN guard."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cg3d_jax import sharding
from cg3d_jax.checkpoints import Checkpointer
from cg3d_jax.clip.hf_clip import load_transformers_clip
from cg3d_jax.data import builders, pipeline
from cg3d_jax.training import pretrain
from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, jit_train_step
from cg3d_jax.training.recipes import cg3d
from cg3d_jax.training.recipes import recipe as recipes
from tests.conftest import tiny_config


def host_batches(config, n):
  ds = pipeline.pretrain_local_dataset(
    config.data,
    global_batch_size=config.train.batch_size,
    image_size=32,
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
    num_templates=63,
    seed=config.seed,
    process_index=0,
    process_count=1,
  )
  return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def make_setup(config, devices=None):
  builder = builders.get_builder(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir)
  return cg3d.build_setup(config, train_classes=builders.class_names(builder), steps_per_epoch=4, devices=devices)


def run_steps(setup, batches, mode='joint'):
  """Runs the jitted steps over host batches; returns (final state on host, losses)."""
  state, losses, cache = setup.state, [], {}
  config = setup.config.copy_and_resolve_references()
  config.train.mode = mode
  for i, host in enumerate(batches):
    groups = recipes.active_groups(config, state['params'], i, setup.steps_per_epoch)
    if groups not in cache:
      cache[groups] = jit_train_step(
        setup.model,
        setup.tx,
        setup.labels_fn,
        active=groups,
        state_shardings=setup.shardings['state'],
        frozen_shardings=setup.shardings['frozen'],
        table_sharding=setup.shardings['table'],
        batch_shardings=setup.shardings['batch'],
      )
    batch = jax.device_put(host, setup.shardings['batch'])
    state, metrics = cache[groups](state, setup.frozen, setup.text_table, batch)
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses


@pytest.fixture(scope='module')
def config(tiny_clip_dir, tiny_shapenet):
  return tiny_config(tiny_clip_dir, tiny_shapenet)


@pytest.fixture(scope='module')
def batches(config):
  return host_batches(config, 4)


def test_frozen_clip_unchanged_trainables_move_and_no_state_for_frozen(config, batches, tiny_clip_dir):
  setup = make_setup(config)
  before = jax.device_get(setup.state)
  after, _ = run_steps(setup, batches[:2])
  # Frozen CLIP: everything but the prompts, compared with a fresh load of the folder, bitwise.
  fresh = load_transformers_clip(tiny_clip_dir, prompt_mode='deep', num_prompts=5).params
  fresh.pop('prompts')
  frozen = jax.device_get(setup.frozen['clip'])
  assert jax.tree.structure(frozen) == jax.tree.structure(fresh)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(a, b)
  # Only the encoder and the prompts are trainable, and both moved.
  assert set(after['params']) == {'encoder', 'clip'} and set(after['params']['clip']) == {'prompts'}
  assert not np.array_equal(before['params']['clip']['prompts']['tokens'], after['params']['clip']['prompts']['tokens'])
  before_leaves = jax.tree_util.tree_leaves_with_path(before['params']['encoder'])
  pairs = zip(before_leaves, jax.tree.leaves(after['params']['encoder']))
  still = [jax.tree_util.keystr(p) for (p, a), b in pairs if np.array_equal(a, b)]
  # Two kinds stay put. The classification head: no pretraining loss reaches it, and torch.optim skips a parameter
  # without a gradient (no weight decay either). A conv bias right before a BatchNorm: an exactly-zero gradient (the
  # norm subtracts it again), not decayed. Everything else must move.
  head = [name for name in still if 'cls_head_' in name]
  rest = [name for name in still if 'cls_head_' not in name]
  assert len(head) == 4, still  # kernel and bias of both head layers
  assert all('bias' in name for name in rest) and len(rest) <= 2, still
  # Optimizer state: AdamW's two moments per encoder leaf, SGD's momentum per prompt leaf, nothing more.
  n_enc = sum(x.size for x in jax.tree.leaves(before['params']['encoder']))
  n_prompt = before['params']['clip']['prompts']['tokens'].size
  n_state = sum(np.size(x) for x in jax.tree.leaves(after['opt_state']) if np.ndim(x) > 0)
  assert n_state == 2 * n_enc + n_prompt


def _relative_close(a, b, rtol):
  """||a - b|| / ||b|| over the whole tree (single leaves of tiny scale would only measure float rounding)."""
  x = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(a)])
  y = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(b)])
  worst = sorted(
    (
      (np.linalg.norm(np.asarray(u, np.float64) - np.asarray(v, np.float64)), jax.tree_util.keystr(p))
      for (p, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))
    )
  )[-4:]
  assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), worst


def test_sharding_equivalence_one_device_data_and_fsdp(config, batches):
  runs = {}
  for name, mesh, devices in [
    ('1', dict(data=1, fsdp=1), jax.devices()[:1]),
    ('8x1', dict(data=8, fsdp=1), None),
    ('4x2', dict(data=4, fsdp=2), None),
  ]:
    c = config.copy_and_resolve_references()
    c.mesh.update(mesh)
    c.mesh.min_fsdp_size = 256  # so that the tiny model's matrices really are split over fsdp
    # SGD rather than AdamW here: conv biases right before a BatchNorm have a gradient that is zero up to float
    # rounding, and Adam's normalisation turns that rounding into full-lr steps, which would compare noise.
    c.train.encoder_optim = dict(
      name='sgd', lr=0.05, momentum=0.9, weight_decay=0.05, schedule='constant', clip_norm=10.0
    )
    setup = make_setup(c, devices)
    if name == '4x2':
      specs = [s.spec for s in jax.tree.leaves(setup.shardings['state'])]
      assert any('fsdp' in str(spec) for spec in specs)
    runs[name] = run_steps(setup, batches[:3])
  ref_state, ref_losses = runs['1']
  for name in ('8x1', '4x2'):
    state, losses = runs[name]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _relative_close(state['params'], ref_state['params'], 1e-5)


def test_interrupt_resume_and_a_damaged_newest_checkpoint(config, tiny_checkpoint, tmp_path, caplog):
  """4 steps straight (the session's tiny_checkpoint: this config run to 4) equal its step-2 checkpoint resumed to 4
  (bitwise), and the metrics read as one run (the rows past step 2 that the stopped run left are dropped). Then the
  straight run's newest step (4) loses its data files: reading it names the step and suggests --step 2; training
  resumes from step 2 with a warning, sets step 4 aside and ends where the undamaged run ended (bitwise). A resume
  under other model settings names them instead of failing inside orbax."""
  from cg3d_jax import checkpoints
  from cg3d_jax.errors import ConfigError
  from cg3d_jax.metric_writer import read_jsonl

  straight = config.copy_and_resolve_references()
  straight.train.total_steps = 4  # checkpoints at 2 and 4 (tiny_test saves every 2 steps)
  shutil.copytree(tiny_checkpoint, tmp_path / 'straight')  # a copy: this test damages it
  assert checkpoints.read_config(tmp_path / 'straight', 4).to_json_best_effort() == straight.to_json_best_effort()
  # Stopped after step 2: the straight run's step-2 checkpoint and its whole metrics file (its step-4 row included, as
  # a run stopped after a later log and before its next checkpoint leaves it); the resume drops the rows past step 2.
  (tmp_path / 'resumed' / 'checkpoints').mkdir(parents=True)
  shutil.copytree(tiny_checkpoint / 'checkpoints' / '2', tmp_path / 'resumed' / 'checkpoints' / '2')
  shutil.copy(tiny_checkpoint / 'train.jsonl', tmp_path / 'resumed' / 'train.jsonl')
  pretrain.train(straight, str(tmp_path / 'resumed'))  # same command: resumes at step 2

  setup = make_setup(straight)
  target = sharding.with_shardings(jax.eval_shape(lambda s: s, setup.state), setup.shardings['state'])

  def final_params(workdir):
    ckpt = Checkpointer(str(workdir / 'checkpoints'), read_only=True)
    state, extras = ckpt.restore(target_state_shapes_with_shardings=target)
    assert extras['step'] == 4 and extras['data_step'] == 4
    return jax.device_get(state)

  a, b = final_params(tmp_path / 'straight'), final_params(tmp_path / 'resumed')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  steps = {
    name: [r['step'] for r in read_jsonl(str(tmp_path / name / 'train.jsonl')) if 'loss' in r]
    for name in ('straight', 'resumed')
  }
  assert steps['resumed'] == steps['straight'] == sorted(set(steps['straight'])), steps

  workdir = tmp_path / 'straight'
  files = [f for f in (workdir / 'checkpoints' / '4' / 'state').rglob('*') if f.is_file() and f.parent.name == 'd']
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:8])
  with pytest.raises(
    checkpoints.CheckpointDamagedError,
    match=r'the checkpoint of step 4 cannot be read.*'
    r'Read an intact step with --step 2',
  ):
    checkpoints.read_step(workdir)
  with caplog.at_level('WARNING'):
    pretrain.train(straight, str(workdir))
  assert 'RESUMING FROM STEP 2, NOT THE NEWEST SAVED STEP 4, WHICH IS DAMAGED' in caplog.text
  assert (workdir / 'checkpoints' / '4.damaged').is_dir()  # kept for inspection
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(final_params(workdir))):
    np.testing.assert_array_equal(x, y)

  wider = straight.copy_and_resolve_references()
  wider.model.point_transformer.width = 64
  with pytest.raises(ConfigError, match=r'model.point_transformer.width: saved 32, now 64.*new --workdir'):
    pretrain.train(wider, str(workdir))


def _alternating(config):
  """Alternating mode with learning rates that overfit two batches quickly; both alternating tests use it, so the
  second finds the two compiled steps in the compilation cache."""
  c = config.copy_and_resolve_references()
  c.train.mode = 'alternating'
  c.train.encoder_optim.lr = 2e-3
  c.train.prompt_optim.lr = 0.1
  return c


# Joint mode's learning is test_demo's (the demo trains jointly); its step is test_step_parity's in both modes.
def test_alternating_mode_lowers_the_losses(config, batches):
  setup = make_setup(_alternating(config))
  # Overfit two fixed batches: the same batch's loss must fall. Even steps (batch 0) report the encoder's two
  # losses, odd steps (batch 1) the prompts' image-text loss.
  _, losses = run_steps(setup, [batches[0], batches[1]] * 8, mode='alternating')
  assert losses[-2] < losses[0] - 0.2, losses
  assert losses[-1] < losses[1] - 0.01, losses


def test_alternating_mode_moves_one_group_per_step(config, batches):
  """Even steps move the encoder (parameters, AdamW's moments and count) and leave the prompts and SGD's momentum
  bitwise as they were; odd steps the reverse. The encoder's BatchNorm statistics move on every step, prompt steps
  too, as the original runner forwards the encoder in train mode on every batch (shown to fail with the statistics
  kept on prompt steps, this project's earlier rule)."""
  c = _alternating(config)
  setup = make_setup(c)
  states = [jax.device_get(setup.state)]
  for i in range(3):
    states.append(
      run_steps(setup, batches[:1], mode='alternating')[0] if i == 0 else _continue(setup, states[-1], batches[i], c, i)
    )

  def parts(s):
    inner = s['opt_state'].inner_states
    return {
      'encoder': (s['params']['encoder'], inner[ENCODER]),
      'prompts': (s['params']['clip']['prompts'], inner[PROMPTS]),
    }

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  for step in range(3):
    before, after = parts(states[step]), parts(states[step + 1])
    moving, still = ('encoder', 'prompts') if step % 2 == 0 else ('prompts', 'encoder')
    assert same(before[still], after[still]), (step, still)
    assert not np.array_equal(jax.tree.leaves(before[moving][0])[0], jax.tree.leaves(after[moving][0])[0]), step
    assert not same(states[step]['batch_stats'], states[step + 1]['batch_stats']), step
  assert recipes.active_groups(c, states[1]['params'], 1, 4) == (PROMPTS,)
  assert recipes.active_groups(c, states[1]['params'], 2, 4) == (ENCODER,)
  # By batch index within the epoch (the original's idx % 2): with 3 batches per epoch, steps 2 and 3 (an epoch's
  # last batch and the next one's first) both train the encoder.
  assert [recipes.active_groups(c, states[1]['params'], i, 3) for i in range(6)] == [
    (ENCODER,),
    (PROMPTS,),
    (ENCODER,),
    (ENCODER,),
    (PROMPTS,),
    (ENCODER,),
  ]


def test_alternating_mode_refuses_one_batch_per_epoch(config):
  """With one batch per epoch every batch index is 0, so the runner's alternation would never train the prompts:
  one clear error instead of a run that silently trains the encoder alone."""
  from cg3d_jax.errors import ConfigError

  with pytest.raises(ConfigError, match=r"mode='alternating' with 1 batch per epoch: the prompts train on odd"):
    cg3d.build_setup(_alternating(config), train_classes=['chair', 'lamp'], steps_per_epoch=1)


def _continue(setup, host_state, batch, config, step):
  groups = recipes.active_groups(config, host_state['params'], step, setup.steps_per_epoch)
  fn = jit_train_step(
    setup.model,
    setup.tx,
    setup.labels_fn,
    active=groups,
    state_shardings=setup.shardings['state'],
    frozen_shardings=setup.shardings['frozen'],
    table_sharding=setup.shardings['table'],
    batch_shardings=setup.shardings['batch'],
  )
  state = jax.device_put(host_state, setup.shardings['state'])
  return jax.device_get(fn(state, setup.frozen, setup.text_table, jax.device_put(batch, setup.shardings['batch']))[0])


def test_each_loss_reaches_only_its_group(config, batches):
  """point<->text and point<->image train the encoder only (the image features are a stop-gradient target),
  image<->text trains the prompts only. Checked by breaking it: without the stop-gradient the prompts get a
  non-zero point<->image gradient and this test fails."""
  from cg3d_jax.training.pretrain_step import _losses

  setup = make_setup(config)
  state = jax.device_get(setup.state)
  params, batch = state['params'], batches[0]
  groups = {ENCODER: params['encoder'], PROMPTS: params['clip']}
  names = ('loss/point_text', 'loss/point_image', 'loss/image_text')

  def losses(g):
    parts = _losses(
      setup.model,
      g,
      params,
      jax.device_get(setup.frozen),
      state['batch_stats'],
      setup.text_table,
      batch,
      jax.random.key(0),
      active=(ENCODER, PROMPTS),
      same_class_mask=False,
      augment=False,
    )[1][0]
    return jnp.stack([parts[name] for name in names])

  grads = jax.jit(jax.jacrev(losses))(groups)  # each leaf gains a leading axis: one row per loss, one program
  norms = {
    name: {g: float(optax.tree.norm(jax.tree.map(lambda x, i=i: x[i], grads[g]))) for g in groups}
    for i, name in enumerate(names)
  }
  assert norms['loss/point_text'][ENCODER] > 0 and norms['loss/point_text'][PROMPTS] == 0, norms
  assert norms['loss/point_image'][ENCODER] > 0 and norms['loss/point_image'][PROMPTS] == 0, norms
  assert norms['loss/image_text'][ENCODER] == 0 and norms['loss/image_text'][PROMPTS] > 0, norms
  # Frozen CLIP is an input the step never differentiates: of CLIP, the gradient tree holds the prompts alone.
  assert set(grads) == {ENCODER, PROMPTS} and set(grads[PROMPTS]) == {'prompts'}


def test_non_finite_batch_is_rejected_and_state_unchanged(config, batches):
  setup = make_setup(config)
  bad = dict(batches[0])
  bad['points'] = bad['points'].copy()
  bad['points'][3, 10] = np.nan
  before = jax.device_get(setup.state)
  after, _ = run_steps(setup, [bad])
  assert int(after['bad_steps']) == 1 and int(after['step']) == 1
  for key in ('params', 'opt_state', 'batch_stats'):
    for x, y in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key])):
      np.testing.assert_array_equal(x, y)


def test_run_stops_after_repeated_non_finite_steps():
  metrics = {'bad_steps': jnp.array(5), 'step': 9, 'loss': jnp.array(np.nan)}

  class Ckpt:
    def latest_step(self):
      return 8

  with pytest.raises(pretrain.NonFiniteError, match='5 consecutive steps.*last good checkpoint is step 8'):
    pretrain._check_finite(metrics, 5, Ckpt())
  pretrain._check_finite(metrics | {'bad_steps': jnp.array(2)}, 5, Ckpt())  # a few are tolerated


def test_a_step_with_a_non_finite_gradient_anywhere_is_refused():
  """The step's gradient check (the finiteness of the global norm) against NumPy's test of every element: a NaN or
  an infinity in any one leaf of a tree like the step's refuses the step; finite gradients pass; a gradient whose
  square overflows float32 (documented as refused) is refused too."""
  from cg3d_jax.training.pretrain_step import _finite_gradients

  rng = np.random.default_rng(0)
  tree = {'encoder': {f'w{i}': rng.normal(size=(3, 4)).astype(np.float32) for i in range(40)}, 'prompts': np.ones(5)}
  assert bool(_finite_gradients(tree)) and all(np.isfinite(x).all() for x in jax.tree.leaves(tree))
  for leaf in ('w0', 'w17', 'w39'):
    for bad in (np.nan, np.inf, -np.inf):
      broken = jax.tree.map(np.copy, tree)
      broken['encoder'][leaf][1, 2] = bad
      assert not all(np.isfinite(x).all() for x in jax.tree.leaves(broken))
      assert not bool(_finite_gradients(broken)), (leaf, bad)
  huge = jax.tree.map(np.copy, tree)
  huge['prompts'][0] = 1e30
  assert not bool(_finite_gradients(huge))
