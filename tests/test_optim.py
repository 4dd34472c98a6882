"""Optimizer rules against NumPy re-implementations of torch's AdamW, SGD, clip_grad_norm_ and timm's cosine."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cg3d_jax.configs import base
from cg3d_jax.training import optim
from cg3d_jax.trees import path_to_str, stack_layers, unstack_layers

ENCODER = dict(
  name='adamw', lr=5e-3, end_lr=1e-6, weight_decay=0.05, schedule='constant', b1=0.9, b2=0.999, clip_norm=1e6
)
PROMPTS = dict(name='sgd', lr=2e-2, momentum=0.9, weight_decay=1e-2, schedule='constant', clip_norm=1e6)
RULES = [('^encoder/', ENCODER), ('^clip/prompts/', PROMPTS), ('^clip/', None)]


def _params(seed=0):
  """A miniature of the step's tree: {'encoder': point encoder, 'clip': frozen towers + prompts}."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  return {
    'encoder': {
      'cls_token': normal(1, 1, 6),
      'cls_pos': normal(1, 1, 6),
      'block_0': {
        'dense': {'kernel': normal(6, 6), 'bias': normal(6)},
        'norm': {'scale': normal(6), 'bias': normal(6)},
      },
      'conv': {'kernel': normal(1, 3, 6)},
    },
    'clip': {
      'vision': {'layer': {'kernel': normal(6, 8), 'bias': normal(8)}},
      'text': {'embedding': normal(10, 6)},
      'logit_scale': jnp.asarray(4.6, jnp.float32),
      'prompts': {'tokens': normal(2, 3, 6)},
    },
  }


def _grads_like(params, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=np.shape(p)), jnp.float32), params)


def _flat(tree):
  return {
    path_to_str(path): leaf if isinstance(leaf, (str, bool)) else np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _run(rules, params, grads_list, steps_per_epoch=10, total_steps=100):
  tx, _ = optim.make_optimizer(rules, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  state = tx.init(params)
  updates_list = []
  for grads in grads_list:
    updates, state = tx.update(grads, state, params)
    updates_list.append(updates)
    params = optax.apply_updates(params, updates)
  return params, state, updates_list


# --- labels, masks, errors -------------------------------------------------------------------------------------


def test_labels_first_matching_rule_wins():
  labels = _flat(optim.param_labels(_params(), RULES))
  assert labels['clip/prompts/tokens'] == 'clip_prompts'  # '^clip/' comes later, so it does not freeze the prompts
  assert labels['clip/vision/layer/kernel'] == 'frozen'
  assert labels['clip/logit_scale'] == 'frozen'
  assert labels['encoder/block_0/dense/kernel'] == 'encoder'
  assert optim.group_names(RULES) == ['encoder', 'clip_prompts']
  named = [('^encoder/', dict(ENCODER, group='point')), ('.*', None)]
  assert set(_flat(optim.param_labels(_params(), named)).values()) == {'point', 'frozen'}


def test_unmatched_leaf_is_an_error_naming_it():
  with pytest.raises(ValueError, match="'clip/text/embedding' matches no optimizer rule"):
    optim.make_optimizer(
      RULES[:2] + [('^clip/vision/', None), ('^clip/logit', None)], steps_per_epoch=1, total_steps=1
    )[0].init(_params())


@pytest.mark.parametrize(
  'bad,message',
  [
    (dict(ENCODER, lr_typo=1.0), 'unknown settings'),
    (dict(ENCODER, name='lamb'), 'name must be one of'),
    (dict(ENCODER, schedule='linear'), 'schedule must be one of'),
    ({'name': 'sgd'}, 'lr is required'),
  ],
)
def test_bad_settings_are_errors(bad, message):
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer([('^encoder/', bad), ('.*', None)], steps_per_epoch=1, total_steps=1)


def test_the_base_config_is_the_papers_recipe_and_updates_as_torch_does():
  """The shipped recipe (configs/base.py) holds CG3D's published settings (AdamW 5e-5, wd 0.05, cosine per epoch to
  1e-6, clipping at 10; prompts SGD 2e-3, momentum 0.9, wd 1e-4), and the optimizer built from its ConfigDicts takes
  three steps inside epoch 0 exactly as torch's AdamW and SGD do (NumPy re-implementations above). Shown to fail
  by changing a value in base.py or by dropping the ConfigDict-to-settings conversion in optim."""
  c = base.get_base_config()
  assert dict(c.train.encoder_optim) == dict(
    name='adamw',
    lr=5e-5,
    end_lr=1e-6,
    weight_decay=0.05,
    schedule='cosine_per_epoch',
    warmup_epochs=0,
    b1=0.9,
    b2=0.999,
    clip_norm=10.0,
  )
  assert dict(c.train.prompt_optim) == dict(
    name='sgd', lr=2e-3, momentum=0.9, weight_decay=1e-4, schedule='constant', clip_norm=10.0
  )
  rules = [('^encoder/', c.train.encoder_optim), ('^clip/prompts/', c.train.prompt_optim), ('^clip/', None)]
  params = _params()
  grads = [_grads_like(params, s, scale=0.1) for s in range(3)]  # global norms < 10: no clipping
  new_params, _, _ = _run(rules, params, grads, steps_per_epoch=5, total_steps=50)
  decays = _flat(optim.original_decay_mask(params))
  got, before = _flat(new_params), _flat(params)
  for name in got:
    history = [_flat(g)[name] for g in grads]
    if name.startswith('encoder/'):
      expected = _numpy_adamw(before[name], history, 5e-5, 0.05 if decays[name] else 0.0)
    elif name.startswith('clip/prompts/'):
      expected = _numpy_sgd(before[name], history, 2e-3, 0.9, 1e-4)
    else:
      expected = before[name]
    np.testing.assert_allclose(got[name], expected, rtol=2e-6, atol=1e-8, err_msg=name)


def test_original_decay_mask():
  mask = _flat(optim.original_decay_mask(_params()))
  decayed = {name for name, m in mask.items() if m}
  assert decayed == {
    'encoder/cls_pos',
    'encoder/block_0/dense/kernel',
    'encoder/conv/kernel',
    'clip/vision/layer/kernel',
    'clip/text/embedding',
  }
  # Not decayed: 1-D leaves (biases, norm scales), 0-D logit_scale, anything named *token* (cls_token, prompts).


def test_decay_mask_and_update_of_a_scanned_stack_match_its_layers_one_by_one():
  """A scanned stack's leaves carry a leading layer axis: a stacked norm scale (layers, C) is still a 1-D leaf for
  weight decay, and AdamW on the stack is AdamW on each layer."""
  rng = np.random.default_rng(3)
  layers = [
    {
      'norm': {'scale': rng.normal(size=6), 'bias': rng.normal(size=6)},
      'fc': {'kernel': rng.normal(size=(6, 4)), 'bias': rng.normal(size=4)},
    }
    for _ in range(3)
  ]
  unrolled = {'encoder': {f'blocks_{i}': jax.tree.map(jnp.float32, layer) for i, layer in enumerate(layers)}}
  stacked = stack_layers(unrolled)
  assert stacked['encoder']['blocks']['norm']['scale'].shape == (3, 6)
  mask = _flat(optim.original_decay_mask(stacked))
  assert {n for n, m in mask.items() if m} == {'encoder/blocks/fc/kernel'}
  assert _flat(optim.original_decay_mask(unrolled)) == {
    n: m for n, m in _flat(optim.original_decay_mask(unstack_layers(stacked))).items()
  }
  tx, _ = optim.make_optimizer([('^encoder/', ENCODER)], steps_per_epoch=10, total_steps=100)
  grads = _grads_like(unrolled, 4)
  updates_unrolled, _ = tx.update(grads, tx.init(unrolled), unrolled)
  updates_stacked, _ = tx.update(stack_layers(grads), tx.init(stacked), stacked)
  for name, value in _flat(unstack_layers(updates_stacked)).items():
    np.testing.assert_allclose(value, _flat(updates_unrolled)[name], rtol=1e-6, atol=1e-9, err_msg=name)


def test_partition_and_merge_round_trip():
  params = _params()
  trainable, frozen = optim.partition(params, RULES)
  assert set(_flat(trainable)) == {n for n in _flat(params) if n.startswith(('encoder/', 'clip/prompts/'))}
  assert set(_flat(frozen)) == {n for n in _flat(params) if not n.startswith(('encoder/', 'clip/prompts/'))}
  merged = optim.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for name, value in _flat(merged).items():
    np.testing.assert_array_equal(value, _flat(params)[name])
  assert _flat(optim.param_labels(params, RULES))['clip/prompts/tokens'] != optim.FROZEN


# --- frozen leaves ----------------------------------------------------------------------------------------------


def test_frozen_leaves_get_zero_updates_and_no_state():
  params = _params()
  grads = [_grads_like(params, s, scale=100.0) for s in range(3)]
  new_params, state, updates_list = _run(RULES, params, grads)
  for name, value in _flat(new_params).items():
    if name.startswith('clip/') and not name.startswith('clip/prompts/'):
      np.testing.assert_array_equal(value, _flat(params)[name])
      assert all(not _flat(u)[name].any() for u in updates_list)
    else:
      assert not np.array_equal(value, _flat(params)[name]), name

  # Every array in the optimizer state belongs to a trainable leaf (or is a step counter).
  state_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  for path, leaf in state_leaves:
    name = path_to_str(path)
    assert 'clip/vision' not in name and 'clip/text' not in name and 'logit_scale' not in name, name
  trainable_size = sum(v.size for n, v in _flat(params).items() if n.startswith('encoder/'))
  prompt_size = _flat(params)['clip/prompts/tokens'].size
  counters = sum(np.size(leaf) for path, leaf in state_leaves if np.ndim(leaf) == 0)
  assert sum(np.size(leaf) for _, leaf in state_leaves) == 2 * trainable_size + prompt_size + counters


def test_partitioned_tree_gives_the_same_updates_and_state():
  params = _params()
  grads = _grads_like(params, 7)
  tx, _ = optim.make_optimizer(RULES, steps_per_epoch=10, total_steps=100)
  full_updates, full_state = tx.update(grads, tx.init(params), params)
  trainable, frozen = optim.partition(params, RULES)
  trainable_grads, _ = optim.partition(grads, RULES)
  part_updates, part_state = tx.update(trainable_grads, tx.init(trainable), trainable)
  assert jax.tree.structure(full_state) == jax.tree.structure(part_state)
  for name, value in _flat(part_updates).items():
    np.testing.assert_array_equal(value, _flat(full_updates)[name])
  new = optim.merge(optax.apply_updates(trainable, part_updates), frozen)
  for name, value in _flat(new).items():
    np.testing.assert_array_equal(value, _flat(optax.apply_updates(params, full_updates))[name])


# --- AdamW and SGD against NumPy --------------------------------------------------------------------------------


def _numpy_adamw(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.AdamW: p *= 1 - lr*wd, then the bias-corrected Adam step."""
  p = p.astype(np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, g in enumerate(grads, start=1):
    g = g.astype(np.float64)
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return p


def _numpy_sgd(p, grads, lr, momentum, wd):
  """torch.optim.SGD with momentum (dampening 0): g += wd*p; buf = momentum*buf + g; p -= lr*buf."""
  p = p.astype(np.float64)
  buf = None
  for g in grads:
    g = g.astype(np.float64) + wd * p
    buf = g if buf is None else momentum * buf + g
    p = p - lr * buf
  return p


def test_adamw_and_sgd_three_steps_match_numpy_with_documented_decay_mask():
  params = _params()
  grads = [_grads_like(params, s) for s in range(3)]
  new_params, _, _ = _run(RULES, params, grads)
  decays = _flat(optim.original_decay_mask(params))
  got, before = _flat(new_params), _flat(params)
  for name in got:
    history = [_flat(g)[name] for g in grads]
    if name.startswith('encoder/'):
      wd = ENCODER['weight_decay'] if decays[name] else 0.0
      expected = _numpy_adamw(before[name], history, ENCODER['lr'], wd)
    elif name.startswith('clip/prompts/'):
      # torch's SGD decays every parameter it holds, 'token' in the name or not.
      expected = _numpy_sgd(before[name], history, PROMPTS['lr'], PROMPTS['momentum'], PROMPTS['weight_decay'])
    else:
      expected = before[name]
    np.testing.assert_allclose(got[name], expected, rtol=2e-6, atol=1e-7, err_msg=name)

  # And the decay mask matters: cls_pos decays, cls_token does not (same start, same gradients otherwise).
  assert decays['encoder/cls_pos'] and not decays['encoder/cls_token']


def test_adamw_group_matches_optax_adamw_with_explicit_mask():
  params = _params()
  grads = [_grads_like(params, s) for s in range(2)]
  enc_params = params['encoder']
  explicit_mask = jax.tree.map(lambda _: False, enc_params)
  explicit_mask['cls_pos'] = True
  explicit_mask['block_0']['dense']['kernel'] = True
  explicit_mask['conv']['kernel'] = True
  reference = optax.adamw(ENCODER['lr'], b1=0.9, b2=0.999, weight_decay=ENCODER['weight_decay'], mask=explicit_mask)
  state = reference.init(enc_params)
  expected = enc_params
  for g in grads:
    updates, state = reference.update(g['encoder'], state, expected)
    expected = optax.apply_updates(expected, updates)
  got, _, _ = _run(RULES, params, grads)
  for name, value in _flat(got['encoder']).items():
    np.testing.assert_allclose(value, _flat(expected)[name], rtol=1e-6, atol=1e-8, err_msg=name)


# --- clipping ---------------------------------------------------------------------------------------------------


def test_gradient_clipping_is_per_group_over_trainable_leaves():
  plain_sgd = dict(name='sgd', lr=1.0, schedule='constant')
  rules = [
    ('^encoder/', dict(plain_sgd, clip_norm=1.0)),
    ('^clip/prompts/', dict(plain_sgd, clip_norm=2.0)),
    ('^clip/', None),
  ]
  params = _params()
  grads = _grads_like(params, 3, scale=10.0)
  grads['clip']['vision']['layer']['kernel'] = grads['clip']['vision']['layer']['kernel'] * 1e6  # frozen: ignored
  _, _, (updates,) = _run(rules, params, [grads])
  flat_g, flat_u = _flat(grads), _flat(updates)

  def numpy_clipped(prefix, max_norm):
    names = [n for n in flat_g if n.startswith(prefix)]
    norm = math.sqrt(sum(float((flat_g[n].astype(np.float64) ** 2).sum()) for n in names))
    assert norm > max_norm  # the test only means something if clipping is active
    return {n: -flat_g[n] * (max_norm / norm) for n in names}

  for prefix, max_norm in (('encoder/', 1.0), ('clip/prompts/', 2.0)):
    expected = numpy_clipped(prefix, max_norm)
    for name, value in expected.items():
      np.testing.assert_allclose(flat_u[name], value, rtol=1e-5, err_msg=name)
    group_norm = math.sqrt(sum(float((flat_u[n].astype(np.float64) ** 2).sum()) for n in expected))
    np.testing.assert_allclose(group_norm, max_norm, rtol=1e-5)


def test_global_norms_per_group_match_numpy():
  params = _params()
  grads = _grads_like(params, 4)
  norms = optim.global_norms(grads, RULES)
  assert set(norms) == {'encoder', 'clip_prompts'}
  flat = _flat(grads)
  for group, prefix in (('encoder', 'encoder/'), ('clip_prompts', 'clip/prompts/')):
    expected = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for n, v in flat.items() if n.startswith(prefix)))
    np.testing.assert_allclose(float(norms[group]), expected, rtol=1e-6)
  trainable, _ = optim.partition(grads, RULES)
  np.testing.assert_allclose(float(optim.global_norms(trainable, RULES)['encoder']), float(norms['encoder']))


# --- schedules --------------------------------------------------------------------------------------------------


def _timm_cosine(epoch, lr, lr_min, t_initial, warmup_t=0, warmup_lr_init=0.0):
  """timm CosineLRScheduler._get_lr (cycle_limit=1, warmup_prefix=False), written out."""
  if epoch < warmup_t:
    return warmup_lr_init + epoch * (lr - warmup_lr_init) / warmup_t
  if epoch >= t_initial:
    return lr_min
  return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * epoch / t_initial))


def test_cosine_per_epoch_matches_timm_staircase():
  settings = dict(name='adamw', lr=5e-5, end_lr=1e-6, schedule='cosine_per_epoch')
  schedule = optim.make_schedule(settings, steps_per_epoch=10, total_steps=100)  # 10 epochs
  for step in (0, 9, 10, 11, 49, 50, 55, 99, 100, 150):
    expected = _timm_cosine(step // 10, 5e-5, 1e-6, 10)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, err_msg=f'step {step}')
  np.testing.assert_allclose(float(schedule(55)), (5e-5 + 1e-6) / 2, rtol=1e-6)  # epoch 5 of 10: half way


def test_cosine_per_epoch_with_warmup_and_explicit_epochs():
  settings = dict(
    name='adamw', lr=1e-3, end_lr=1e-6, warmup_lr=1e-6, warmup_epochs=2, epochs=8, schedule='cosine_per_epoch'
  )
  schedule = optim.make_schedule(settings, steps_per_epoch=4, total_steps=1000)
  for step in (0, 3, 4, 7, 8, 12, 31, 32):
    expected = _timm_cosine(step // 4, 1e-3, 1e-6, 8, warmup_t=2, warmup_lr_init=1e-6)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, err_msg=f'step {step}')


def test_schedule_drives_the_update_and_learning_rates_reports_it():
  rules = [('^encoder/', dict(name='sgd', lr=0.1, end_lr=0.001, schedule='cosine_per_epoch')), ('.*', None)]
  params = _params()
  grads = [jax.tree.map(jnp.ones_like, params)] * 7
  _, _, updates_list = _run(rules, params, grads, steps_per_epoch=2, total_steps=8)
  for step, updates in enumerate(updates_list):
    expected = _timm_cosine(step // 2, 0.1, 0.001, 4)
    np.testing.assert_allclose(-_flat(updates)['encoder/cls_pos'], expected, rtol=1e-6)
    lrs = optim.learning_rates(rules, step, steps_per_epoch=2, total_steps=8)
    np.testing.assert_allclose(float(lrs['encoder']), expected, rtol=1e-6)
  lrs = jax.jit(lambda s: optim.learning_rates(RULES, s, steps_per_epoch=10, total_steps=100))(3)
  np.testing.assert_allclose(float(lrs['clip_prompts']), PROMPTS['lr'], rtol=1e-7)


def test_per_step_cosine_endpoints():
  schedule = optim.make_schedule(
    dict(name='sgd', lr=1.0, end_lr=0.1, schedule='cosine'), steps_per_epoch=10, total_steps=100
  )
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 50, 100)], [1.0, 0.55, 0.1], rtol=1e-6)


# --- alternating updates ----------------------------------------------------------------------------------------


def test_select_groups_alternates_like_two_separate_optimizers():
  rules = [
    ('^encoder/', dict(name='sgd', lr=0.1, end_lr=0.001, schedule='cosine_per_epoch', steps_on='even')),
    ('^clip/prompts/', dict(name='sgd', lr=0.02, momentum=0.9, weight_decay=0.01, steps_on='odd')),
    ('^clip/', None),
  ]
  tx, labels_fn = optim.make_optimizer(rules, steps_per_epoch=2, total_steps=8)  # 4 epochs of 2 global steps
  params = _params()
  grads = [_grads_like(params, s) for s in range(8)]

  @jax.jit
  def step(i, params, state, grads):
    updates, new_state = tx.update(grads, state, params)
    updates, new_state = optim.select_groups(
      {'encoder': i % 2 == 0, 'clip_prompts': i % 2 == 1}, updates, new_state, state, labels_fn
    )
    return optax.apply_updates(params, updates), new_state, updates

  state = tx.init(params)
  current = params
  for i in range(8):
    before = _flat(current)
    current, state, updates = step(i, current, state, grads[i])
    flat_u = _flat(updates)
    if i % 2:  # odd: the encoder holds still
      assert not flat_u['encoder/cls_pos'].any()
    else:  # even: plain SGD at the global step's per-epoch cosine
      np.testing.assert_allclose(
        flat_u['encoder/cls_pos'],
        -_timm_cosine(i // 2, 0.1, 0.001, 4) * _flat(grads[i])['encoder/cls_pos'],
        rtol=1e-5,
        err_msg=f'step {i}',
      )
      assert not flat_u['clip/prompts/tokens'].any()
    np.testing.assert_array_equal(_flat(current)['clip/vision/layer/kernel'], before['clip/vision/layer/kernel'])

  odd_grads = [_flat(grads[i])['clip/prompts/tokens'] for i in (1, 3, 5, 7)]
  np.testing.assert_allclose(
    _flat(current)['clip/prompts/tokens'],
    _numpy_sgd(_flat(params)['clip/prompts/tokens'], odd_grads, 0.02, 0.9, 0.01),
    rtol=1e-5,
    atol=1e-7,
  )
  lrs = optim.learning_rates(rules, 6, steps_per_epoch=2, total_steps=8)
  np.testing.assert_allclose(float(lrs['encoder']), _timm_cosine(3, 0.1, 0.001, 4), rtol=1e-5)


def test_updates_on_in_epoch_parity_map_to_the_runners_global_steps_and_epochs():
  """steps_on 'even'/'odd' recover the global step of a group's n-th update when the runner alternates on the
  batch's index within its epoch: with 3 batches per epoch the encoder steps at 0, 2, 3, 5, 6, 8 and the prompts at
  1, 4, 7 (hand-listed); lr_stepping 'original' takes lr(e - 1) for a group whose scheduler the runner steps
  (the last index, 2, is even: the encoder's) and lr(0) for the other, against timm's per-epoch cosine."""
  assert [int(optim.update_step_fn('even', 3)(n)) for n in range(6)] == [0, 2, 3, 5, 6, 8]
  assert [int(optim.update_step_fn('odd', 3)(n)) for n in range(3)] == [1, 4, 7]
  assert [int(optim.update_step_fn('odd', 2)(n)) for n in range(3)] == [1, 3, 5]
  with pytest.raises(ValueError, match='never be updated'):
    optim.update_step_fn('odd', 1)
  settings = dict(name='sgd', lr=0.1, end_lr=0.001, schedule='cosine_per_epoch', epochs=4, lr_stepping='original')
  with jax.enable_x64(True):  # computed in the parameters' precision: float64 values to float64 rounding
    encoder = optim.make_schedule(dict(settings, scheduler_parity='even'), steps_per_epoch=3, total_steps=15)
    prompts = optim.make_schedule(dict(settings, scheduler_parity='odd'), steps_per_epoch=3, total_steps=15)
    per_epoch = optim.make_schedule(settings | {'lr_stepping': 'per_epoch'}, steps_per_epoch=3, total_steps=15)
    assert encoder(4).dtype == jnp.float64
    for step in range(15):
      epoch = step // 3
      np.testing.assert_allclose(float(encoder(step)), _timm_cosine(max(epoch - 1, 0), 0.1, 0.001, 4), rtol=1e-14)
      np.testing.assert_allclose(float(prompts(step)), 0.1, rtol=1e-14)
      np.testing.assert_allclose(float(per_epoch(step)), _timm_cosine(epoch, 0.1, 0.001, 4), rtol=1e-14)
  # With 2 batches per epoch the last index is odd: the prompts' scheduler steps, the encoder's never does.
  encoder = optim.make_schedule(dict(settings, scheduler_parity='even'), steps_per_epoch=2, total_steps=10)
  np.testing.assert_allclose([float(encoder(step)) for step in range(10)], 0.1, rtol=1e-7)


def test_the_runners_schedule_trains_one_epoch_more():
  """The original runner loops over range(start_epoch, max_epoch + 1): with lr_schedule 'original' a run of epochs E
  is E + 1 epochs of batches (its cosine still spans E: optimizer_rules sets the groups' epochs); 'per_epoch' runs E;
  an explicit total_steps wins either way. 655 = 41,969 // 64, the shipped recipe's batches per epoch."""
  from cg3d_jax.training import common

  config = base.get_base_config()
  assert common.total_steps(config, 655) == 100 * 655
  config.train.lr_schedule = 'original'
  assert common.total_steps(config, 655) == 101 * 655
  assert {settings['epochs'] for _, settings in optim.optimizer_rules(config) if settings} == {100}
  config.train.total_steps = 7
  assert common.total_steps(config, 655) == 7
