"""PointTransformer: sizes and names against the original's state-dict list, parity with the PyTorch twin on real
ModelNet40 objects (eval outputs, train-mode BatchNorm statistics, gradients), exact round trips, input errors."""

import ast
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cg3d_jax import trees
from cg3d_jax.configs import base as base_config
from cg3d_jax.models import point_ops
from cg3d_jax.models.point_transformer import PointTransformer
from cg3d_jax.twins import point_transformer as torch_twin
from cg3d_jax.weights import torch_io
from tests.conftest import FIXTURES, NEAR_TIE, grouping_margin, modelnet_root

# Real objects, each a 1024-row window of its file chosen so that no grouping decision (FPS argmax, 32nd neighbour)
# is a near-tie: float32 comparisons with the twin then group the same points on every machine (conftest.NEAR_TIE).
OBJECTS = (
  ('airplane/airplane_0001', 5),
  ('airplane/airplane_0628', 0),
  ('bathtub/bathtub_0107', 3),
  ('bathtub/bathtub_0115', 8),
)
SMALL = dict(depth=2, num_classes=55)  # real widths, two blocks: parity at a size that compiles quickly


def tsv_section(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """{key: (shape, dtype)} of one model's section of the reference tsv."""
  lines = (FIXTURES / 'reference' / 'cg3d_torch_state_dict_keys.tsv').read_text().splitlines()
  out, inside = {}, False
  for line in lines:
    if line.startswith('# '):
      inside = line.split()[1] == name if line.split()[1] in ('pointtransformer', 'pointmlp') else inside
      continue
    if inside and line.strip():
      key, shape, dtype = line.split('\t')
      out[key] = (tuple(ast.literal_eval(shape)), dtype)
  return out


def load_objects(fixtures_dir, num_points: int = 1024) -> np.ndarray:
  """Real ModelNet40 objects, centred and scaled to the unit sphere as the zero-shot pipeline does."""
  clouds = []
  for name, window in OBJECTS:
    xyz = np.loadtxt(modelnet_root() / f'{name}.txt', delimiter=',', dtype=np.float32)[
      window * num_points : (window + 1) * num_points, :3
    ]
    xyz = xyz - xyz.mean(0)
    clouds.append(xyz / np.max(np.linalg.norm(xyz, axis=1)))
  return np.stack(clouds).astype(np.float32)


@pytest.fixture(scope='module')
def points(fixtures_dir) -> np.ndarray:
  clouds = load_objects(fixtures_dir)
  for cloud in clouds:
    assert grouping_margin(cloud, [(64, 32)]) > NEAR_TIE
  return clouds


def randomised_batch_stats(batch_stats, seed=1):
  """Non-trivial running statistics so that eval-mode BatchNorm is really exercised."""
  rng = np.random.default_rng(seed)
  return jax.tree.map_with_path(
    lambda path, x: jnp.asarray(
      rng.uniform(0.5, 2.0, x.shape) if path[-1].key == 'var' else rng.normal(0.0, 0.1, x.shape), jnp.float32
    ),
    batch_stats,
  )


@pytest.fixture(scope='module')
def small_pair(points):
  """A depth-2 JAX model with random weights, and the twin loaded from its export."""
  model = PointTransformer(**SMALL, drop_path_rate=0.0)
  variables = jax.jit(model.init, static_argnames='train')(jax.random.key(0), jnp.asarray(points), train=False)
  params = variables['params']
  params = {**params, 'cls_token': jax.random.normal(jax.random.key(1), params['cls_token'].shape) * 0.02}
  batch_stats = randomised_batch_stats(variables['batch_stats'])
  twin = torch_twin.PointTransformerProject(**SMALL, drop_path_rate=0.0)
  twin.load_state_dict(torch_io.point_transformer_to_torch(params, batch_stats), strict=True)
  return model, params, batch_stats, twin


def test_real_config_sizes_and_state_dict_layout():
  reference = tsv_section('pointtransformer')
  assert len(reference) == 166
  model = PointTransformer.from_config(base_config.get_config().model)
  assert (model.width, model.depth, model.num_heads, model.num_classes) == (384, 12, 6, 55)
  dummy = jax.ShapeDtypeStruct((2, 1024, 3), jnp.float32)
  shapes = jax.eval_shape(lambda p: model.init(jax.random.key(0), p, train=False), dummy)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert count(shapes['params']) == 22_463_543
  headless = jax.eval_shape(lambda p: model.clone(num_classes=None).init(jax.random.key(0), p, train=False), dummy)
  assert count(headless['params']) == 22_252_544

  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  exported = torch_io.point_transformer_to_torch(zeros['params'], zeros['batch_stats'])
  assert list(exported) == list(reference)  # same keys, same order
  assert {k: (tuple(v.shape), str(v.dtype)) for k, v in exported.items()} == reference
  twin = torch_twin.PointTransformerProject()
  assert {k: (tuple(v.shape), str(v.dtype)) for k, v in twin.state_dict().items()} == reference
  assert torch_twin.num_parameters(twin) == 22_463_543
  twin.load_state_dict(exported, strict=True)


def test_twin_groups_like_point_ops(points):
  nb_j, c_j = point_ops.group(jnp.asarray(points), 64, 32)
  nb_t, c_t = torch_twin.torch_group(torch.from_numpy(points), 64, 32)
  np.testing.assert_array_equal(np.asarray(c_j), c_t.numpy())
  np.testing.assert_array_equal(np.sort(np.asarray(nb_j), axis=2), np.sort(nb_t.numpy(), axis=2))


def test_eval_parity_with_twin(small_pair, points, highest_precision):
  model, params, batch_stats, twin = small_pair
  variables = {'params': params, 'batch_stats': batch_stats}
  apply = jax.jit(model.apply, static_argnames=('train', 'return_logits', 'return_features'))
  twin.eval()
  with torch.no_grad():
    pts = torch.from_numpy(points)
    want = twin(pts).numpy(), twin.forward_logits(pts).numpy(), twin.pooled_features(pts).numpy()
  got = (
    apply(variables, points, train=False),
    apply(variables, points, train=False, return_logits=True),
    apply(variables, points, train=False, return_features=True),
  )
  for g, w, width in zip(got, want, (512, 55, 768)):
    assert g.shape == (len(OBJECTS), width)
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=0)
  assert np.abs(want[0]).max() > 0.1  # a real signal, not two zero vectors


def test_coloured_encoder_matches_the_twin_and_converts_both_ways(points, highest_precision):
  """6 input channels (xyz + rgb), ULIP-2's coloured Point-BERT: grouping on xyz, each neighbour's colour beside its
  centred xyz; the export loads strictly into the twin built with in_channels=6, gives its features, and reads
  back into the same Flax variables with in_channels found from the weights."""
  rgb = np.random.default_rng(7).uniform(0, 1, points.shape[:2] + (3,)).astype(np.float32)
  coloured = np.concatenate([points, rgb], axis=-1)
  model = PointTransformer(**SMALL, drop_path_rate=0.0, in_channels=6)
  variables = jax.jit(model.init, static_argnames='train')(jax.random.key(2), jnp.asarray(coloured), train=False)
  params, stats = variables['params'], randomised_batch_stats(variables['batch_stats'])
  assert params['encoder']['first_conv_0']['kernel'].shape == (6, 128)
  state_dict = torch_io.point_transformer_to_torch(params, stats)
  assert tuple(state_dict['encoder.first_conv.0.weight'].shape) == (128, 6, 1)
  twin = torch_twin.PointTransformerProject(**SMALL, drop_path_rate=0.0, in_channels=6)
  twin.load_state_dict(state_dict, strict=True)
  with torch.no_grad():
    want = twin.eval()(torch.from_numpy(coloured)).numpy()
  got = np.asarray(jax.jit(lambda v: model.apply(v, coloured, train=False))({'params': params, 'batch_stats': stats}))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # Colour matters: the same xyz in other colours gives other features.
  other = np.concatenate([points, 1 - rgb], axis=-1)
  assert not np.allclose(
    np.asarray(model.apply({'params': params, 'batch_stats': stats}, other, train=False)), got, atol=1e-3
  )
  assert torch_io.point_transformer_kwargs_from_torch(state_dict)['in_channels'] == 6
  back, back_stats = torch_io.point_transformer_from_torch(state_dict)
  for a, b in zip(jax.tree.leaves((back, back_stats)), jax.tree.leaves((params, stats))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match=r'\(batch, num_points, 6\), got shape \(4, 1024, 3\) \(xyz \+ 3 colour'):
    model.apply({'params': params, 'batch_stats': stats}, points, train=False)


def test_attention_implementations_give_the_same_features(small_pair, points, highest_precision):
  """The default kernel (jax.nn.dot_product_attention, XLA on CPU) and the written-out einsum form, on real objects."""
  model, params, batch_stats, _ = small_pair
  variables = {'params': params, 'batch_stats': batch_stats}
  features = {
    impl: np.asarray(
      jax.jit(model.clone(attention=impl).apply, static_argnames='train')(variables, points, train=False)
    )
    for impl in ('einsum', 'auto', 'xla')
  }
  np.testing.assert_array_equal(features['auto'], features['einsum'])  # on CPU, auto is the head-major einsum
  # float32 rounding apart: the two layouts sum the products in different orders (measured max 1.6e-6 on features
  # up to ~1 after two blocks; the twin agrees with either to 1e-4)
  np.testing.assert_allclose(features['xla'], features['einsum'], atol=3e-6, rtol=0)


def test_train_mode_batch_stats_match_twin(small_pair, points, highest_precision):
  model, params, batch_stats, twin = small_pair
  direction = np.random.default_rng(3).normal(size=(len(OBJECTS), 512)).astype(np.float32)

  def loss_fn(p):
    out, updates = model.apply({'params': p, 'batch_stats': batch_stats}, points, train=True, mutable=['batch_stats'])
    return jnp.sum(out * direction), updates['batch_stats']

  loss, new_stats = jax.jit(loss_fn)(params)

  twin = copy.deepcopy(twin).train()  # a train-mode forward moves the running statistics: keep the fixture's
  with torch.no_grad():
    torch_loss = torch.sum(twin(torch.from_numpy(points)) * torch.from_numpy(direction))
  np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-4)

  state = twin.state_dict()
  for stage in ('first', 'second'):
    for ours, theirs in (('mean', 'running_mean'), ('var', 'running_var')):
      np.testing.assert_allclose(
        np.asarray(new_stats['encoder'][f'{stage}_bn'][ours]),
        state[f'encoder.{stage}_conv.1.{theirs}'].numpy(),
        rtol=1e-5,
        atol=1e-6,
      )
    assert int(state[f'encoder.{stage}_conv.1.num_batches_tracked']) == 1
  # The running variance moved toward the unbiased batch variance, not stayed put.
  assert not np.allclose(
    np.asarray(new_stats['encoder']['first_bn']['var']), np.asarray(batch_stats['encoder']['first_bn']['var'])
  )


def test_gradients_match_twin_in_float64(small_pair, points):
  """Every parameter's gradient in train mode, in float64 on both sides.

  Gradients of the mini-PointNet pass through 2 x 65,536 max-pools and ~4 M ReLUs. In float32, a near-tie that the
  two sides' rounding resolves differently routes a whole gradient entry elsewhere, and how often that happens
  depends on the CPU (vector width, fused multiply-add, library kernels): a float32 comparison passed on one machine
  and failed on another. Float64 on both sides removes the near-ties, so this checks the backward pass itself, on
  every machine: points, direction and parameters are the same float32 values on both sides, only the arithmetic
  is wider. Grouping still selects its points in float32 on both sides (the original's rule), so the groups agree.
  """
  model, params, batch_stats, twin = small_pair
  direction = np.random.default_rng(3).normal(size=(len(OBJECTS), 512))
  twin = copy.deepcopy(twin).double().train()
  torch.sum(twin(torch.from_numpy(points.astype(np.float64))) * torch.from_numpy(direction)).backward()
  want = {name: p.grad.numpy() for name, p in twin.named_parameters() if p.grad is not None}

  model64 = model.clone(dtype=jnp.float64)
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    stats64 = to64(batch_stats)

    def loss_fn(p):
      out, _ = model64.apply(
        {'params': p, 'batch_stats': stats64}, points.astype(np.float64), train=True, mutable=['batch_stats']
      )
      return jnp.sum(out * direction)

    grads = trees.flatten(trees.unstack_layers(jax.jit(jax.grad(loss_fn))(to64(params))))
  # Three conv biases only shift every input of a BatchNorm by the same amount per channel (the third reaches
  # second_conv's norm through the max-pool, which passes the shift on), and the norm subtracts it again: their
  # gradient is exactly zero, both sides hold rounding noise there, so they are checked against zero on the scale
  # of all gradients instead.
  before_norm = {'encoder.first_conv.0.bias', 'encoder.first_conv.3.bias', 'encoder.second_conv.0.bias'}
  overall = max(np.abs(g).max() for g in want.values())
  checked = 0
  for e in torch_io.point_transformer_entries(SMALL['depth'], with_head=True):
    if e.collection != torch_io.PARAMS or e.torch_key.startswith('cls_head'):
      continue  # the head is not on the embedding's path: both sides give it no gradient
    have = np.asarray(grads[e.flax_path])
    have = have.T if e.kind == 'linear' else have.T[:, :, None] if e.kind == 'conv1x1' else have
    theirs = want[e.torch_key]
    assert have.dtype == theirs.dtype == np.float64
    if e.torch_key in before_norm:
      assert max(np.abs(have).max(), np.abs(theirs).max()) < 1e-9 * overall, e.torch_key
    else:
      # float64 rounding accumulated over a depth-2 model is ~1e-14 of the scale (measured); 1e-9 leaves room, yet a
      # wrong gradient (a missed term, a transposed layout) is off by O(1) of the scale.
      scale = np.abs(theirs).max()
      assert scale > 1e-6 * overall, e.torch_key
      np.testing.assert_allclose(have, theirs, atol=1e-9 * scale, rtol=0, err_msg=e.torch_key)
    checked += 1
  assert checked == len(want) == sum(1 for name, _ in twin.named_parameters() if not name.startswith('cls_head'))


def test_round_trip_is_exact(small_pair):
  _, params, batch_stats, _ = small_pair
  exported = torch_io.point_transformer_to_torch(params, batch_stats, num_batches_tracked=7)
  assert int(exported['encoder.first_conv.1.num_batches_tracked']) == 7
  back_params, back_stats = torch_io.point_transformer_from_torch(exported, PointTransformer(**SMALL))
  for original, restored in ((params, back_params), (batch_stats, back_stats)):
    assert jax.tree.structure(original) == jax.tree.structure(restored)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(restored)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Sizes read off the state dict itself give the same tree.
  inferred, _ = torch_io.point_transformer_from_torch(exported)
  assert jax.tree.structure(inferred) == jax.tree.structure(params)


def test_conversion_errors_name_the_keys(small_pair):
  _, params, batch_stats, _ = small_pair
  exported = torch_io.point_transformer_to_torch(params, batch_stats)
  model = PointTransformer(**SMALL)
  broken = dict(exported)
  del broken['blocks.blocks.1.mlp.fc2.bias']
  broken['module.extra'] = torch.zeros(3)
  with pytest.raises(ValueError, match=r'missing keys \[blocks\.blocks\.1\.mlp\.fc2\.bias\].*module\.extra'):
    torch_io.point_transformer_from_torch(broken, model)
  broken = dict(exported, **{'reduce_dim.weight': torch.zeros(384, 128)})
  with pytest.raises(ValueError, match=r'reduce_dim\.weight: got \(384, 128\), expected \(384, 256\)'):
    torch_io.point_transformer_from_torch(broken, model)
  with pytest.raises(ValueError, match=r'missing \[params/cls_pos\]'):
    torch_io.point_transformer_to_torch({k: v for k, v in params.items() if k != 'cls_pos'}, batch_stats)


def test_bad_input_is_refused_at_entry(small_pair, points):
  model, params, batch_stats, _ = small_pair
  variables = {'params': params, 'batch_stats': batch_stats}
  with pytest.raises(ValueError, match=r'\(batch, num_points, 3\), got shape \(1024, 3\)'):
    model.apply(variables, points[0], train=False)
  with pytest.raises(ValueError, match=r'\(batch, num_points, 3\), got shape \(4, 1024, 6\)'):
    model.apply(variables, np.concatenate([points, points], -1), train=False)
  with pytest.raises(ValueError, match='at least group_size=32 points'):
    model.apply(variables, points[:, :20], train=False)
  bad = points.copy()
  bad[2, 17, 1] = np.nan
  with pytest.raises(ValueError, match=r'non-finite .* batch rows \[2\]'):
    model.apply(variables, bad, train=False)
  with pytest.raises(ValueError, match='at least group_size'):  # shapes are checked under jit too
    jax.jit(lambda v, p: model.apply(v, p, train=False))(variables, points[:, :20])
  with pytest.raises(ValueError, match='built without a head'):
    model.clone(num_classes=None).apply(variables, points, train=False, return_logits=True)


def test_remat_unrolled_blocks_and_stochastic_depth(small_pair, points):
  model, params, batch_stats, _ = small_pair
  assert params['blocks']['attn']['qkv']['kernel'].shape == (SMALL['depth'], 384, 3 * 384)  # stacked on depth
  variables = {'params': params, 'batch_stats': batch_stats}
  plain = jax.jit(lambda v: model.apply(v, points, train=False))(variables)  # the twin checks this one
  for kwargs in (dict(remat='full'), dict(remat='dots'), dict(remat=True), dict(scan_layers=False)):
    other = jax.jit(lambda v, m=model.clone(**kwargs): m.apply(v, points, train=False))(variables)
    np.testing.assert_allclose(np.asarray(other), np.asarray(plain), atol=1e-6, err_msg=str(kwargs))
  # Stochastic depth draws from the 'dropout' stream: different keys, different outputs; same key, same output,
  # scanned or unrolled (the scan splits the stream per block either way). Rate 0.5 in the last block: 8 draws per
  # key, so four keys giving one mask pattern has probability 2^-24.
  dropping = model.clone(drop_path_rate=0.5)

  def run(key, m=dropping):
    return np.asarray(
      jax.jit(lambda k: m.apply(variables, points, train=True, mutable=['batch_stats'], rngs={'dropout': k})[0])(key)
    )

  outputs = [run(jax.random.key(seed)) for seed in range(4)]
  np.testing.assert_array_equal(run(jax.random.key(0)), outputs[0])
  assert any(not np.allclose(outputs[0], other) for other in outputs[1:])
  np.testing.assert_allclose(run(jax.random.key(0), dropping.clone(scan_layers=False)), outputs[0], atol=1e-6)


def test_bfloat16_compute_keeps_float32_state(points):
  """Compute dtype bf16: parameters and BatchNorm statistics stay float32, outputs are close to fp32's."""
  model = PointTransformer(
    width=64, depth=1, num_heads=2, num_groups=16, group_size=8, encoder_dim=32, num_classes=5, dtype=jnp.bfloat16
  )
  variables = jax.jit(model.init, static_argnames='train')(jax.random.key(0), points, train=False)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out, updates = jax.jit(
    lambda v: model.apply(v, points, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
  )(variables)
  assert out.dtype == jnp.bfloat16 and out.shape == (len(OBJECTS), 512)
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  fp32 = jax.jit(lambda v: model.clone(dtype=jnp.float32).apply(v, points, train=False))(variables)
  bf16 = jax.jit(lambda v: model.apply(v, points, train=False))(variables)
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(fp32), atol=0.05 * np.abs(fp32).max())
