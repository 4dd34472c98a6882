"""The training step against a PyTorch reference of the original runner, and where its gradients go.

Reference (tests/torch_reference_step.py): the PointTransformer twin with the original names, transformers'
PyTorch CLIP with the deep-prompt insertion, text features of the batch's own captions from the text tower,
torch.optim.AdamW / SGD with Point-BERT's parameter groups, torch's clip_grad_norm_, timm's per-epoch cosine.
Both sides start from the same weights and take K steps on the same batch, in joint and alternating mode.

Precision. The full comparison runs in float64 on both sides: in float32, Adam divides each gradient by its own
root mean square, so a gradient that the two libraries' rounding puts at ±1e-9 (the three conv biases a BatchNorm
cancels have an exactly zero gradient) becomes a full-learning-rate step of either sign, and max-pool near-ties
move whole entries; neither says anything about the step. A float32 run checks the losses (continuous, and the
batch's clouds hold no grouping near-tie): the first exactly, the later ones within what those flips allow.

Checked by breaking it, once each: swapping the caption table's indices, dropping the stop-gradient on the image
features in point<->image, evaluating the odd-step prompts' schedule at step 2n instead of 2n + 1, and decaying the
classification head (which gets no gradient; torch skips it) each make this test fail.

Tolerances (float64): the first step's losses 1e-10 relative, later ones 1e-6 (they follow updates). Updates (value
after K steps minus the start) 1e-5 of each tensor's largest update: torch's clip_grad_norm_ scales by
max_norm / (norm + 1e-6) where optax scales by max_norm / norm, a 1e-6 relative difference that clipping (active
here) passes on; plus 1e-6 x lr absolute for the three biases whose gradient is zero up to rounding (~1e-16), which
Adam (eps 1e-8) turns into steps of ~1e-8 x lr, where every other Adam step is ~lr.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cg3d_jax.clip import templates
from cg3d_jax.clip.loaded_clip import tokenize
from cg3d_jax.data import builders
from cg3d_jax.models.cg3d import CG3D
from cg3d_jax.synthetic import random_clip
from cg3d_jax.training import optim
from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, merge_clip, train_step
from cg3d_jax.training.recipes import cg3d
from cg3d_jax.training.recipes import recipe as recipes
from cg3d_jax.trees import unstack_layers
from cg3d_jax.twins.point_transformer import PointTransformerProject
from cg3d_jax.twins.prompted_clip import torch_prompted_image_features
from cg3d_jax.weights import torch_io
from tests import numpy_transforms
from tests.conftest import NEAR_TIE, TINY_CLIP, grouping_margin, tiny_config
from tests.torch_reference_step import PARITY_ENCODER_OPTIM, PARITY_PROMPT_OPTIM, ReferenceStep

K = 3
BATCH = 8
# Template ids above the 13 classes: swapping the caption table's indices would clamp them into wrong rows.
TEMPLATE_IDS = np.array([0, 13, 20, 62, 5, 40, 14, 1], np.int32)


@pytest.fixture(scope='module')
def two_layer_clip(tmp_path_factory):
  """A random CLIP with two vision layers, so that deep prompts replace layer 1's prompt positions."""
  path = tmp_path_factory.mktemp('clip2') / 'clip'
  random_clip.write_random_clip(path, **{**TINY_CLIP, 'vision_layers': 2, 'seed': 3})
  return str(path)


def parity_config(clip_dir, shapenet, mode):
  c = tiny_config(clip_dir, shapenet)
  c.model.point_transformer.drop_path_rate = 0.0
  c.data.augment = False
  c.train.mode = mode
  c.train.batch_size = BATCH
  c.train.total_steps = K
  c.mesh.data = 1
  c.train.encoder_optim.update(PARITY_ENCODER_OPTIM)
  c.train.prompt_optim.update(PARITY_PROMPT_OPTIM)
  return c


@pytest.fixture(scope='module')
def batch(two_layer_clip, tiny_shapenet):
  """One real pipeline batch: clouds FPS-sampled (NumPy) to the encoder's 64 points, views, labels, templates."""
  from cg3d_jax.data import pipeline

  c = parity_config(two_layer_clip, tiny_shapenet, 'joint')
  host = next(
    pipeline.pretrain_local_dataset(
      c.data,
      global_batch_size=16,
      image_size=32,
      image_mean=(0.48145466, 0.4578275, 0.40821073),
      image_std=(0.26862954, 0.26130258, 0.27577711),
      num_templates=63,
      seed=0,
      process_index=0,
      process_count=1,
    ).as_numpy_iterator()
  )
  points = np.stack(
    [p[numpy_transforms.farthest_point_sample_np(p, c.model.num_points)] for p in host['points'][:BATCH]]
  )
  for cloud in points:  # float32 selections agree on every machine (the float32 test relies on it)
    assert (
      grouping_margin(cloud, [(c.model.point_transformer.num_groups, c.model.point_transformer.group_size)]) > NEAR_TIE
    )
  assert set(np.unique(host['label'][:BATCH])) != {0} and TEMPLATE_IDS.max() > 13
  return {
    'points': points.astype(np.float32),
    'image': host['image'][:BATCH],
    'label': host['label'][:BATCH],
    'template_idx': TEMPLATE_IDS,
  }


def _classes(config):
  return builders.class_names(
    builders.get_builder(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir)
  )


def run_jax(config, batch, dtype, steps_per_epoch=1):
  """config.train.total_steps steps of the project's train_step (unsharded, jitted) in `dtype`: (setup, first
  state, the state after each step, losses, learning rates of the groups each step updated)."""
  setup = cg3d.build_setup(
    config, train_classes=_classes(config), steps_per_epoch=steps_per_epoch, devices=jax.devices()[:1]
  )
  steps = config.train.total_steps
  with jax.enable_x64(dtype == jnp.float64):
    cast = lambda tree: jax.tree.map(
      lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x), tree
    )
    model = CG3D(
      encoder=setup.model.encoder.clone(dtype=dtype),
      clip=setup.model.clip.clone(dtype=dtype),
      num_points=setup.model.num_points,
    )
    # The optimizer again, inside the x64 scope, so that its schedules run in the parameters' precision.
    rules = optim.optimizer_rules(config)
    tx, _ = optim.make_optimizer(rules, steps_per_epoch=steps_per_epoch, total_steps=steps)
    start, frozen = cast(jax.device_get(setup.state)), cast(jax.device_get(setup.frozen))
    caption_templates = templates.get_templates(config.data.templates)
    ids = tokenize(setup.clip.tokenizer, [t.format(c) for t in caption_templates for c in setup.class_names])
    table = model.caption_table(
      merge_clip(frozen, start['params']), ids.reshape(len(caption_templates), len(setup.class_names), -1)
    )
    state, states, losses, lrs, compiled = start, [], [], [], {}
    for i in range(steps):
      groups = recipes.active_groups(config, state['params'], i, steps_per_epoch)
      if groups not in compiled:
        compiled[groups] = jax.jit(
          functools.partial(train_step, model=model, tx=tx, labels_fn=setup.labels_fn, active=groups, augment=False)
        )
      state, metrics = compiled[groups](state, frozen, table, cast(batch))
      states.append(jax.device_get(state))
      losses.append({k: float(v) for k, v in metrics.items() if k.startswith('loss')})
      rates = optim.learning_rates(rules, i, steps_per_epoch=steps_per_epoch, total_steps=steps)
      lrs.append({g: float(rates[g]) for g in groups})
    return setup, jax.device_get(start), states, losses, lrs


def run_torch(config, setup, start, batch, dtype, steps_per_epoch=1):
  """The same steps in the PyTorch reference: (reference, losses, a snapshot of its state after each step)."""
  from transformers import CLIPModel

  steps = config.train.total_steps
  pt = config.model.point_transformer
  twin = PointTransformerProject(
    width=pt.width,
    depth=pt.depth,
    num_heads=pt.num_heads,
    num_groups=pt.num_groups,
    group_size=pt.group_size,
    encoder_dim=pt.encoder_dim,
    drop_path_rate=0.0,
    embed_dim=config.model.embed_dim,
    num_classes=config.model.num_classes,
  )
  twin.load_state_dict(
    torch_io.point_transformer_to_torch(
      jax.tree.map(lambda x: np.asarray(x, np.float32), start['params']['encoder']),
      jax.tree.map(lambda x: np.asarray(x, np.float32), start['batch_stats']),
    ),
    strict=True,
  )
  clip = CLIPModel.from_pretrained(config.clip.path, local_files_only=True).eval()
  twin, clip = twin.to(dtype), clip.to(dtype)
  prompts = torch.from_numpy(np.array(start['params']['clip']['prompts']['tokens'])).to(dtype)
  epochs = config.train.epochs if config.train.lr_schedule == 'original' else -(-steps // steps_per_epoch)
  reference = ReferenceStep(
    twin,
    clip,
    prompts,
    encoder_optim=config.train.encoder_optim.to_dict(),
    prompt_optim=config.train.prompt_optim.to_dict(),
    steps_per_epoch=steps_per_epoch,
    epochs=epochs,
    mode=config.train.mode,
    lr_schedule=config.train.lr_schedule,
    prompted_image_features=torch_prompted_image_features,
  )
  caption_templates = templates.get_templates(config.data.templates)
  captions = [caption_templates[t].format(setup.class_names[c]) for t, c in zip(batch['template_idx'], batch['label'])]
  ids = torch.from_numpy(tokenize(setup.clip.tokenizer, captions).astype(np.int64))
  points = torch.from_numpy(np.asarray(batch['points'])).to(dtype)
  pixels = torch.from_numpy(np.asarray(batch['image']).transpose(0, 3, 1, 2).copy()).to(dtype)
  losses, snapshots = [], []
  for _ in range(steps):
    losses.append(reference(points, pixels, ids))
    snapshots.append(_snapshot(reference))
  return reference, losses, snapshots


def _snapshot(reference) -> dict:
  """The reference's state after a step, copied: parameters, buffers (BatchNorm statistics), AdamW's moments by
  parameter name, the prompts and SGD's momentum buffer."""
  named = dict(reference.encoder.named_parameters())
  adam = {
    name: {m: reference.adamw.state[p][m].clone().numpy() for m in ('exp_avg', 'exp_avg_sq')}
    for name, p in named.items()
    if p in reference.adamw.state
  }
  momentum = reference.sgd.state.get(reference.prompts, {}).get('momentum_buffer')
  return {
    'params': {k: v.detach().clone().numpy() for k, v in named.items()},
    'buffers': {k: v.clone().numpy() for k, v in reference.encoder.state_dict().items()},
    'adam': adam,
    'prompts': reference.prompts.detach().clone().numpy(),
    'momentum': None if momentum is None else momentum.clone().numpy(),
  }


def _assert_updates_close(name, before, after_jax, after_torch, lr):
  """after - before agrees within 1e-5 of the tensor's largest update, and 1e-6 x lr absolute (module docstring)."""
  want, have = after_torch - before, after_jax - before
  np.testing.assert_allclose(have, want, rtol=0, atol=1e-5 * np.abs(want).max() + 1e-6 * lr, err_msg=name)


@pytest.mark.parametrize(
  'mode, steps_per_epoch, lr_schedule',
  [('joint', 1, 'per_epoch'), ('alternating', 2, 'original'), ('alternating', 3, 'original')],
)
def test_steps_equal_the_pytorch_reference_in_float64(
  two_layer_clip, tiny_shapenet, batch, mode, steps_per_epoch, lr_schedule
):
  """Joint: K steps, one batch per epoch. Alternating with the runner's schedule stepping: across two epoch
  boundaries (2 x batches per epoch + 1 steps) with an even and an odd number of batches per epoch. At every step:
  the losses, each stepping group's learning rate, the encoder's parameters, BatchNorm statistics and AdamW moments,
  the prompts and SGD's momentum. Shown to fail, once each: with the alternation on the global step (the 3-batch
  case parts at step 3, the first of the second epoch), with the statistics kept on prompt steps (the running
  statistics), with lr(e) instead of the runner's stepping (the 3-batch case's encoder lr at step 3), and with
  the encoder's schedule evaluated at its own update count (the 3-batch case's parameters at step 6)."""
  config = parity_config(two_layer_clip, tiny_shapenet, mode)
  steps = K if mode == 'joint' else 2 * steps_per_epoch + 1
  config.train.total_steps = steps
  config.train.lr_schedule = lr_schedule
  config.train.epochs = 3  # the cosine's length under 'original' (t_initial): its lr moves at every epoch here
  setup, start, states, jax_losses, jax_lrs = run_jax(config, batch, jnp.float64, steps_per_epoch)
  reference, torch_losses, snapshots = run_torch(config, setup, start, batch, torch.float64, steps_per_epoch)
  assert len(states) == len(snapshots) == steps
  groups = {'encoder': ENCODER, 'prompts': PROMPTS}
  for step in range(steps):
    have, want = jax_losses[step], torch_losses[step]
    assert set(have) == set(want), (step, have, want)  # the same losses were computed (alternating: by index)
    for key in want:
      # Step 0 has no update behind it; later steps carry the 1e-6 clipping difference (module docstring).
      assert have[key] == pytest.approx(want[key], rel=1e-10 if step == 0 else 1e-6), (step, key)
    assert {groups[g]: lr for g, lr in reference.lrs[step].items()} == pytest.approx(jax_lrs[step], rel=1e-14), step
    _assert_state_matches(config, start, states[step], snapshots[step], step)
  if lr_schedule == 'original' and steps_per_epoch == 3:  # the last index is even: the encoder's scheduler steps
    lrs = [r.get('encoder') for r in reference.lrs]
    assert lrs[0] == lrs[3] > lrs[6]  # epochs 0 and 1 at lr(0), epoch 2 at lr(1)


def _assert_state_matches(config, start, final, snapshot, step):
  """The JAX state after `step` against the reference's snapshot, in the original names and layouts."""
  # Encoder parameters and AdamW's two moments.
  encoder_state = final['opt_state'].inner_states['encoder']
  adam = {m: optax.tree_utils.tree_get(encoder_state, m) for m in ('mu', 'nu')}
  lr = config.train.encoder_optim.lr
  largest = {
    m: max([float(np.abs(state[m]).max()) for state in snapshot['adam'].values()] or [0.0])
    for m in ('exp_avg', 'exp_avg_sq')
  }
  checked = 0
  for e in torch_io.point_transformer_entries(config.model.point_transformer.depth, with_head=True):
    if e.collection != torch_io.PARAMS or e.torch_key.startswith('cls_head'):
      continue  # the head is not on the embedding's path: neither side moves it (checked below)
    path = e.flax_path.split('/')  # the name map's layout: blocks one by one
    pick = lambda tree: functools.reduce(lambda t, k: t[k], path, unstack_layers(tree))
    layout = lambda x: np.asarray(torch_io._to_torch_layout(e.kind, np.asarray(x, np.float64)))
    _assert_updates_close(
      f'step {step} {e.torch_key}',
      layout(pick(start['params']['encoder'])),
      layout(pick(final['params']['encoder'])),
      snapshot['params'][e.torch_key],
      lr,
    )
    moments = snapshot['adam'].get(e.torch_key)
    for ours, theirs in (('mu', 'exp_avg'), ('nu', 'exp_avg_sq')):
      if moments is None:  # no encoder step yet: torch has no state, optax's moments are still zero
        assert not np.any(layout(pick(adam[ours]['encoder']))), (step, e.torch_key)
        continue
      # 2e-5: the clipping difference, squared for nu; the zero-gradient biases' moments are rounding noise, so no
      # tensor's scale is taken below 1e-6 of the largest moment of any tensor.
      want = moments[theirs]
      scale = max(np.abs(want).max(), 1e-6 * largest[theirs])
      np.testing.assert_allclose(
        layout(pick(adam[ours]['encoder'])),
        want,
        rtol=0,
        atol=2e-5 * scale,
        err_msg=f'step {step} {e.torch_key} {ours}',
      )
    checked += 1
  assert checked == len([n for n in snapshot['params'] if not n.startswith('cls_head')])
  np.testing.assert_array_equal(
    final['params']['encoder']['cls_head_1']['kernel'], start['params']['encoder']['cls_head_1']['kernel']
  )

  # BatchNorm running statistics: one update per batch, prompt steps too (the runner forwards the encoder in train
  # mode on every batch), from weights that carry the clipping difference.
  for stage in ('first', 'second'):
    for ours, theirs in (('mean', 'running_mean'), ('var', 'running_var')):
      want = snapshot['buffers'][f'encoder.{stage}_conv.1.{theirs}']
      np.testing.assert_allclose(
        final['batch_stats']['encoder'][f'{stage}_bn'][ours],
        want,
        rtol=0,
        atol=1e-5 * np.abs(want).max(),
        err_msg=f'step {step} {stage} {ours}',
      )
  assert int(snapshot['buffers']['encoder.first_conv.1.num_batches_tracked']) == step + 1

  # The prompts and SGD's momentum buffer.
  _assert_updates_close(
    f'step {step} prompts',
    np.asarray(start['params']['clip']['prompts']['tokens']),
    np.asarray(final['params']['clip']['prompts']['tokens']),
    snapshot['prompts'],
    config.train.prompt_optim.lr,
  )
  trace = optax.tree_utils.tree_get(final['opt_state'].inner_states['prompts'], 'trace')
  if snapshot['momentum'] is None:
    assert not np.any(trace['clip']['prompts']['tokens']), step
  else:
    np.testing.assert_allclose(
      trace['clip']['prompts']['tokens'],
      snapshot['momentum'],
      rtol=0,
      atol=2e-5 * np.abs(snapshot['momentum']).max(),
      err_msg=f'step {step} momentum',
    )


def test_losses_equal_the_pytorch_reference_in_float32(two_layer_clip, tiny_shapenet, batch):
  """float32 both sides: the first step's losses to float32 rounding; later steps within 1e-3, the room that
  Adam's sign flips of near-zero gradients leave (module docstring)."""
  config = parity_config(two_layer_clip, tiny_shapenet, 'joint')
  setup, start, _, jax_losses, _ = run_jax(config, batch, jnp.float32)
  _, torch_losses, _ = run_torch(config, setup, start, batch, torch.float32)
  for step, (have, want) in enumerate(zip(jax_losses, torch_losses)):
    for key in want:
      assert have[key] == pytest.approx(want[key], rel=1e-5 if step == 0 else 1e-3), (step, key)


def test_caption_table_rows_are_the_text_tower_on_template_by_class(two_layer_clip, tiny_shapenet):
  """Row [t, c] is the normalised text feature of template t filled with class c, by transformers' PyTorch CLIP.

  63 templates x 13 classes, checked at template ids above 13: a table laid out or indexed the other way round
  would give other captions there (JAX clamps out-of-range gathers, so swapped indices raise nothing); the step's
  lookup by (template_idx, label) is checked against the reference's own captions in the parity test above.
  """
  from transformers import CLIPModel

  config = parity_config(two_layer_clip, tiny_shapenet, 'joint')
  setup = cg3d.build_setup(config, train_classes=_classes(config), steps_per_epoch=1, devices=jax.devices()[:1])
  caption_templates = templates.get_templates(config.data.templates)
  table = np.asarray(setup.text_table)
  assert table.shape[:2] == (len(caption_templates), len(setup.class_names)) == (63, 13)
  pairs = [(0, 0), (13, 2), (40, 12), (62, 5)]
  ids = tokenize(setup.clip.tokenizer, [caption_templates[t].format(setup.class_names[c]) for t, c in pairs])
  clip = CLIPModel.from_pretrained(config.clip.path, local_files_only=True).eval()
  with torch.no_grad():
    out = clip.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
  want = torch.nn.functional.normalize(getattr(out, 'pooler_output', out), dim=-1).numpy()
  np.testing.assert_allclose(np.stack([table[t, c] for t, c in pairs]), want, atol=2e-6)
  # A swapped lookup of (13, 2) would read [2, 13], which JAX clamps to [2, 12]: another caption, another row.
  assert np.abs(table[13, 2] - table[2, 12]).max() > 1e-3
