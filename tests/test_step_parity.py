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

from cg3d_jax.data import builders, templates, transforms
from cg3d_jax.models.cg3d import CG3D
from cg3d_jax.synthetic import random_clip
from cg3d_jax.training import pretrain
from cg3d_jax.training.pretrain_step import merge_clip, train_step
from cg3d_jax.trees import unstack_layers
from cg3d_jax.twins.point_transformer import PointTransformerProject
from cg3d_jax.twins.prompted_clip import torch_prompted_image_features
from cg3d_jax.weights import torch_io
from cg3d_jax.weights.hf_clip import tokenize
from tests.conftest import NEAR_TIE, TINY_CLIP, grouping_margin, tiny_config
from tests.torch_reference_step import ReferenceStep

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
  c.train.encoder_optim.update(dict(lr=2e-3, end_lr=1e-4, weight_decay=0.05, schedule='cosine_per_epoch',
                                    clip_norm=0.5))
  c.train.prompt_optim.update(dict(lr=5e-2, momentum=0.9, weight_decay=1e-4, schedule='cosine_per_epoch',
                                   clip_norm=0.05))
  c.train.prompt_optim.end_lr = 1e-3
  return c


@pytest.fixture(scope='module')
def batch(two_layer_clip, tiny_shapenet):
  """One real pipeline batch: clouds FPS-sampled (NumPy) to the encoder's 64 points, views, labels, templates."""
  from cg3d_jax.data import pipeline
  c = parity_config(two_layer_clip, tiny_shapenet, 'joint')
  host = next(pipeline.pretrain_local_dataset(
      c.data, global_batch_size=16, image_size=32, image_mean=(0.48145466, 0.4578275, 0.40821073),
      image_std=(0.26862954, 0.26130258, 0.27577711), num_templates=63, seed=0, process_index=0,
      process_count=1).as_numpy_iterator())
  points = np.stack([p[transforms.farthest_point_sample_np(p, c.model.num_points)] for p in host['points'][:BATCH]])
  for cloud in points:  # float32 selections agree on every machine (the float32 test relies on it)
    assert grouping_margin(cloud, [(c.model.point_transformer.num_groups, c.model.point_transformer.group_size)]) \
        > NEAR_TIE
  assert set(np.unique(host['label'][:BATCH])) != {0} and TEMPLATE_IDS.max() > 13
  return {'points': points.astype(np.float32), 'image': host['image'][:BATCH], 'label': host['label'][:BATCH],
          'template_idx': TEMPLATE_IDS}


def _classes(config):
  return builders.class_names(builders.get_builder(config.data.name, data_dir=config.data.data_dir,
                                                   manual_dir=config.data.manual_dir))


def run_jax(config, batch, dtype):
  """K steps of the project's train_step (unsharded, jitted) in `dtype`: (setup, first state, final state, losses)."""
  setup = pretrain.build_setup(config, train_classes=_classes(config), steps_per_epoch=1,
                               devices=jax.devices()[:1])
  with jax.enable_x64(dtype == jnp.float64):
    cast = lambda tree: jax.tree.map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x), tree)
    model = CG3D(encoder=setup.model.encoder.clone(dtype=dtype), clip=setup.model.clip.clone(dtype=dtype),
                 num_points=setup.model.num_points)
    start, frozen = cast(jax.device_get(setup.state)), cast(jax.device_get(setup.frozen))
    caption_templates = templates.get_templates(config.data.templates)
    ids = tokenize(setup.clip.tokenizer, [t.format(c) for t in caption_templates for c in setup.class_names])
    table = model.caption_table(merge_clip(frozen, start['params']), ids.reshape(len(caption_templates),
                                                                               len(setup.class_names), -1))
    state, losses, compiled = start, [], {}
    for i in range(K):
      groups = pretrain.active_groups(config, state['params'], i)
      if groups not in compiled:
        compiled[groups] = jax.jit(functools.partial(train_step, model=model, tx=setup.tx, labels_fn=setup.labels_fn,
                                                     active=groups, augment=False))
      state, metrics = compiled[groups](state, frozen, table, cast(batch))
      losses.append({k: float(v) for k, v in metrics.items() if k.startswith('loss')})
    return setup, jax.device_get(start), jax.device_get(state), losses


def run_torch(config, setup, start, batch, dtype):
  """The same K steps in the PyTorch reference: (reference, losses)."""
  from transformers import CLIPModel
  pt = config.model.point_transformer
  twin = PointTransformerProject(width=pt.width, depth=pt.depth, num_heads=pt.num_heads, num_groups=pt.num_groups,
                                 group_size=pt.group_size, encoder_dim=pt.encoder_dim, drop_path_rate=0.0,
                                 embed_dim=config.model.embed_dim, num_classes=config.model.num_classes)
  twin.load_state_dict(torch_io.point_transformer_to_torch(
      jax.tree.map(lambda x: np.asarray(x, np.float32), start['params']['encoder']),
      jax.tree.map(lambda x: np.asarray(x, np.float32), start['batch_stats'])), strict=True)
  clip = CLIPModel.from_pretrained(config.clip.path, local_files_only=True).eval()
  twin, clip = twin.to(dtype), clip.to(dtype)
  prompts = torch.from_numpy(np.array(start['params']['clip']['prompts']['tokens'])).to(dtype)
  reference = ReferenceStep(twin, clip, prompts, encoder_optim=config.train.encoder_optim.to_dict(),
                            prompt_optim=config.train.prompt_optim.to_dict(), steps_per_epoch=1, epochs=K,
                            mode=config.train.mode, prompted_image_features=torch_prompted_image_features)
  caption_templates = templates.get_templates(config.data.templates)
  captions = [caption_templates[t].format(setup.class_names[c]) for t, c in zip(batch['template_idx'], batch['label'])]
  ids = torch.from_numpy(tokenize(setup.clip.tokenizer, captions).astype(np.int64))
  points = torch.from_numpy(np.asarray(batch['points'])).to(dtype)
  pixels = torch.from_numpy(np.asarray(batch['image']).transpose(0, 3, 1, 2).copy()).to(dtype)
  return reference, [reference(points, pixels, ids) for _ in range(K)]


def _assert_updates_close(name, before, after_jax, after_torch, lr):
  """after - before agrees within 1e-5 of the tensor's largest update, and 1e-6 x lr absolute (module docstring)."""
  want, have = after_torch - before, after_jax - before
  np.testing.assert_allclose(have, want, rtol=0, atol=1e-5 * np.abs(want).max() + 1e-6 * lr, err_msg=name)


@pytest.mark.parametrize('mode', ['joint', 'alternating'])
def test_k_steps_equal_the_pytorch_reference_in_float64(two_layer_clip, tiny_shapenet, batch, mode):
  config = parity_config(two_layer_clip, tiny_shapenet, mode)
  setup, start, final, jax_losses = run_jax(config, batch, jnp.float64)
  reference, torch_losses = run_torch(config, setup, start, batch, torch.float64)
  for step, (have, want) in enumerate(zip(jax_losses, torch_losses)):
    assert set(have) == set(want), (step, have, want)  # the same losses were computed (alternating: by parity)
    for key in want:
      # Step 0 has no update behind it; later steps carry the 1e-6 clipping difference (module docstring).
      assert have[key] == pytest.approx(want[key], rel=1e-10 if step == 0 else 1e-6), (step, key)

  # Encoder parameters and AdamW's two moments, in the original names and layouts.
  encoder_state = final['opt_state'].inner_states['encoder']
  adam = {m: optax.tree_utils.tree_get(encoder_state, m) for m in ('mu', 'nu')}
  lr = config.train.encoder_optim.lr
  named = dict(reference.encoder.named_parameters())
  largest = {m: max(float(state[m].abs().max()) for state in reference.adamw.state.values())
             for m in ('exp_avg', 'exp_avg_sq')}
  checked = 0
  for e in torch_io.point_transformer_entries(config.model.point_transformer.depth, with_head=True):
    if e.collection != torch_io.PARAMS or e.torch_key.startswith('cls_head'):
      continue  # the head is not on the embedding's path: neither side moves it (checked below)
    path = e.flax_path.split('/')  # the name map's layout: blocks one by one
    pick = lambda tree: functools.reduce(lambda t, k: t[k], path, unstack_layers(tree))
    layout = lambda x: np.asarray(torch_io._to_torch_layout(e.kind, np.asarray(x, np.float64)))
    param = named[e.torch_key]
    _assert_updates_close(e.torch_key, layout(pick(start['params']['encoder'])),
                          layout(pick(final['params']['encoder'])), param.detach().numpy(), lr)
    moments = reference.adamw.state[param]
    for ours, theirs in (('mu', 'exp_avg'), ('nu', 'exp_avg_sq')):
      # 2e-5: the clipping difference, squared for nu; the zero-gradient biases' moments are rounding noise, so no
      # tensor's scale is taken below 1e-6 of the largest moment of any tensor.
      want = moments[theirs].numpy()
      scale = max(np.abs(want).max(), 1e-6 * largest[theirs])
      np.testing.assert_allclose(layout(pick(adam[ours]['encoder'])), want, rtol=0, atol=2e-5 * scale,
                                 err_msg=f'{e.torch_key} {ours}')
    checked += 1
  assert checked == len([n for n in named if not n.startswith('cls_head')])
  np.testing.assert_array_equal(final['params']['encoder']['cls_head_1']['kernel'],
                                start['params']['encoder']['cls_head_1']['kernel'])

  # BatchNorm running statistics: one update per step, prompt steps too (the runner forwards the encoder in train
  # mode on every batch), from weights that carry the clipping difference. Shown to fail with the statistics kept on
  # prompt steps (alternating: the running statistics and num_batches_tracked, 2 of 3).
  state_dict = reference.encoder.state_dict()
  for stage in ('first', 'second'):
    for ours, theirs in (('mean', 'running_mean'), ('var', 'running_var')):
      want = state_dict[f'encoder.{stage}_conv.1.{theirs}'].numpy()
      np.testing.assert_allclose(final['batch_stats']['encoder'][f'{stage}_bn'][ours], want, rtol=0,
                                 atol=1e-5 * np.abs(want).max())
  assert int(state_dict['encoder.first_conv.1.num_batches_tracked']) == K

  # The prompts and SGD's momentum buffer.
  _assert_updates_close('prompts', np.asarray(start['params']['clip']['prompts']['tokens']),
                        np.asarray(final['params']['clip']['prompts']['tokens']), reference.prompts.detach().numpy(),
                        config.train.prompt_optim.lr)
  trace = optax.tree_utils.tree_get(final['opt_state'].inner_states['prompts'], 'trace')
  want = reference.sgd.state[reference.prompts]['momentum_buffer'].numpy()
  np.testing.assert_allclose(trace['clip']['prompts']['tokens'], want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_losses_equal_the_pytorch_reference_in_float32(two_layer_clip, tiny_shapenet, batch):
  """float32 both sides: the first step's losses to float32 rounding; later steps within 1e-3, the room that
  Adam's sign flips of near-zero gradients leave (module docstring)."""
  config = parity_config(two_layer_clip, tiny_shapenet, 'joint')
  setup, start, _, jax_losses = run_jax(config, batch, jnp.float32)
  _, torch_losses = run_torch(config, setup, start, batch, torch.float32)
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
  setup = pretrain.build_setup(config, train_classes=_classes(config), steps_per_epoch=1,
                               devices=jax.devices()[:1])
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
