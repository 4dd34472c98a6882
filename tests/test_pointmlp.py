"""PointMLP: layout against the original CG3D state dict, parity with the PyTorch twin on real ModelNet40 objects,
BatchNorm statistics and gradients in train mode, exact Flax <-> torch round trips, and clear errors."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cg3d_jax import trees
from cg3d_jax.configs import base, pretrain_pointmlp
from cg3d_jax.models.pointmlp import PointMLP, stage_point_counts
from cg3d_jax.twins.pointmlp import PointMLPProject
from cg3d_jax.weights import pointmlp_state_dict, torch_io
from cg3d_jax.weights.pointmlp_state_dict import pointmlp_from_torch, pointmlp_to_torch
from tests import numpy_transforms
from tests.conftest import FIXTURES, NEAR_TIE, grouping_margin, modelnet_root

OBJECTS = ('airplane/airplane_0627', 'bathtub/bathtub_0107')
SMALL = dict(embed_dim=16, k_neighbors=(8, 8, 8, 8))  # a reduced PointMLP for the train-mode tests
SMALL_POINTS = 256


def _reference_layout() -> list[tuple[str, tuple[int, ...]]]:
  lines = (FIXTURES / 'reference' / 'cg3d_torch_state_dict_keys.tsv').read_text().splitlines()
  start = lines.index('# pointmlp ModelProject')
  rows = []
  for line in lines[start + 1 :]:
    if line.startswith('#'):
      break
    if line:
      key, shape, _ = line.split('\t')
      rows.append((key, tuple(int(d) for d in shape.strip('()').split(',') if d.strip())))
  return rows


def _load_clouds(num_points: int, dtype=np.float32) -> np.ndarray:
  """Real ModelNet40 objects as the zero-shot pipeline prepares them: xyz, centred, unit sphere, FPS to N.

  A 1e-5 jitter (fixed seed) breaks the exact ties of these mirror-symmetric CAD models, so that the sampled
  anchors are unique and no result depends on how an implementation resolves ties. The FPS to N is NumPy's, the
  same on every machine.
  """
  clouds = []
  for name in OBJECTS:
    xyz = np.loadtxt(modelnet_root() / f'{name}.txt', delimiter=',')[:, :3]
    xyz = xyz - xyz.mean(axis=0)
    xyz = xyz / np.linalg.norm(xyz, axis=1).max()
    xyz = (xyz + 1e-5 * np.random.default_rng(0).standard_normal(xyz.shape)).astype(np.float32)
    clouds.append(xyz[numpy_transforms.farthest_point_sample_np(xyz, num_points)])
  return np.stack(clouds).astype(dtype)


def _stages(model: PointMLP, num_points: int) -> list[tuple[int, int]]:
  counts = stage_point_counts(num_points, model.reducers)
  return list(zip(counts[1:], model.k_neighbors))


def _in_float64(fn, *args):
  """fn(*args) with JAX's 64-bit types on and every float array argument (and tree leaf) as float64."""
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    return jax.tree.map(np.asarray, fn(*[to64(a) for a in args]))


def _randomize_twin(twin: torch.nn.Module, seed: int) -> None:
  """Non-trivial BatchNorm affines and running statistics and a non-identity grouper affine."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in twin.modules():
      if isinstance(module, torch.nn.BatchNorm1d):
        n = module.num_features
        module.weight.copy_(0.5 + torch.rand(n, generator=gen))
        module.bias.copy_(0.1 * torch.randn(n, generator=gen))
        module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    for name, p in twin.named_parameters():
      if 'affine' in name:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope='module')
def real_twin():
  torch.manual_seed(0)
  twin = PointMLPProject().eval()
  _randomize_twin(twin, seed=1)
  return twin


@pytest.fixture(scope='module')
def small_twin():
  torch.manual_seed(2)
  twin = PointMLPProject(points=SMALL_POINTS, **SMALL)
  _randomize_twin(twin, seed=3)
  return twin


def test_real_config_matches_the_original_layout(real_twin):
  reference = _reference_layout()
  assert len(reference) == 232
  variables = pointmlp_state_dict.expected_variables(PointMLP())
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params'])) == 13_095_360
  assert len(jax.tree.leaves(variables['batch_stats'])) == 2 * 37
  expected = pointmlp_state_dict.expected_torch_shapes(PointMLP())
  assert list(expected.items()) == reference
  assert [(k, tuple(v.shape)) for k, v in real_twin.state_dict().items()] == reference


def test_from_config_reads_the_model_settings():
  model = PointMLP.from_config(pretrain_pointmlp.get_config().model)
  assert model == PointMLP()
  config = base.get_config().model
  config.pointmlp.embed_dim, config.embed_dim, config.dtype = 32, 256, 'bfloat16'
  model = PointMLP.from_config(config)
  assert (model.embed_dim, model.projection_dim, model.dtype) == (32, 256, jnp.bfloat16)


def test_eval_parity_with_twin_on_modelnet40(real_twin):
  """Eval outputs of the real configuration, in float64 on both sides.

  Its four stages take 960 FPS decisions and 23,040 k-th-neighbour decisions per 1024-point cloud; on real objects
  some are near-ties (relative gaps ~1e-7) that float32 rounding, which differs between machines, can decide either
  way. Float64 on both sides (sampling and neighbour search included) decides them alike everywhere.
  """
  points = _load_clouds(1024, np.float64)
  with torch.no_grad():
    expected = copy.deepcopy(real_twin).double()(torch.from_numpy(points)).numpy()
  params, batch_stats = pointmlp_from_torch(real_twin.state_dict())
  model = PointMLP(dtype=jnp.float64)
  got = _in_float64(
    jax.jit(lambda v, p: model.apply(v, p, train=False)), {'params': params, 'batch_stats': batch_stats}, points
  )
  assert got.shape == (2, 512) and got.dtype == np.float64
  assert np.abs(expected).max() > 0.1  # a meaningful comparison, not two near-zero vectors
  np.testing.assert_allclose(got, expected, atol=1e-9 * np.abs(expected).max(), rtol=0)


def _train_step_twin(twin, points, weights):
  """One train-mode forward and backward of sum(output * weights); returns output and a state dict whose
  parameter entries hold the gradients and whose buffers hold the updated running statistics."""
  twin.train()
  twin.zero_grad()
  out = twin(torch.from_numpy(points))
  (out * torch.from_numpy(weights)).sum().backward()
  twin.eval()
  merged = dict(twin.state_dict())
  merged.update({k: p.grad for k, p in twin.named_parameters()})
  return out.detach().numpy(), merged


def _gradients_jax(model, params, batch_stats, points, weights):
  def loss(p):
    y, updates = model.apply({'params': p, 'batch_stats': batch_stats}, points, train=True, mutable=['batch_stats'])
    return jnp.sum(y * weights), (y, updates['batch_stats'])

  return jax.jit(jax.grad(loss, has_aux=True))(params)[0]


def _assert_trees_close(have, want, atol, rtol):
  assert jax.tree.structure(have) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(have)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


def test_train_mode_running_statistics_match_twin(small_twin):
  """Train-mode outputs and updated running statistics, in float64 on both sides (see the eval parity test)."""
  model = PointMLP(**SMALL, dtype=jnp.float64)
  points = _load_clouds(SMALL_POINTS, np.float64)
  weights = np.random.default_rng(4).standard_normal((2, 512))
  params, batch_stats = pointmlp_from_torch(small_twin.state_dict(), PointMLP(**SMALL))
  expected_out, merged = _train_step_twin(copy.deepcopy(small_twin).double(), points, weights)
  _, expected_stats = pointmlp_from_torch(merged, PointMLP(**SMALL))
  out, new_stats = _in_float64(
    jax.jit(lambda v, p: model.apply(v, p, train=True, mutable=['batch_stats'])),
    {'params': params, 'batch_stats': batch_stats},
    points,
  )
  new_stats = new_stats['batch_stats']
  np.testing.assert_allclose(out, expected_out, atol=1e-9 * np.abs(expected_out).max(), rtol=0)
  # The converter hands the twin's float64 statistics back as float32: compare at float32 resolution.
  _assert_trees_close(new_stats, expected_stats, atol=1e-9, rtol=1e-6)
  # One forward moves the statistics (momentum 0.1, unbiased variance), so the comparison above is not vacuous.
  assert not np.allclose(
    np.asarray(new_stats['embedding']['bn']['var']), np.asarray(batch_stats['embedding']['bn']['var']), rtol=1e-3
  )


def test_gradients_match_twin_in_float64(small_twin):
  """Every parameter's gradient in train mode, in float64 on both sides.

  In float32 the two implementations differ by rounding (~1e-5 relative after four stages), which is enough to
  flip a few max-pool argmaxes and ReLU signs among near-equal values; a flipped argmax routes that gradient to a
  different point, so float32 gradients agree only to about 1e-2. Float64 removes the near-ties and checks the
  backward pass itself: the points, weights and parameters are the same float32 values on both sides.
  """
  model = PointMLP(**SMALL, dtype=jnp.float64)
  points = _load_clouds(SMALL_POINTS, np.float64)
  weights = np.random.default_rng(4).standard_normal((2, 512))
  twin = copy.deepcopy(small_twin).double()
  _, merged = _train_step_twin(twin, points, weights)
  params, batch_stats = pointmlp_from_torch(small_twin.state_dict(), PointMLP(**SMALL))
  grads = trees.flatten(
    _in_float64(lambda p, s, x, w: _gradients_jax(model, p, s, x, w), params, batch_stats, points, weights)
  )
  checked = 0
  for e in pointmlp_state_dict.pointmlp_entries(model.pre_blocks, model.pos_blocks):
    if e.collection != torch_io.PARAMS:
      continue
    have, want = np.asarray(grads[e.flax_path]), merged[e.torch_key].numpy()
    have = have.T[:, :, None] if e.kind == 'conv1x1' else have  # Dense kernel (in, out) -> Conv1d (out, in, 1)
    assert have.dtype == want.dtype == np.float64
    assert np.abs(have - want).max() <= 1e-9 * np.abs(want).max() + 1e-12, e.torch_key
    checked += 1
  assert checked == len(grads) == len(list(twin.parameters()))


def _random_variables(model: PointMLP, seed: int) -> dict:
  shapes = pointmlp_state_dict.expected_variables(model)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)), shapes)


def test_round_trip_flax_torch_flax_is_exact():
  model = PointMLP()
  variables = _random_variables(model, seed=5)
  state_dict = pointmlp_to_torch(variables['params'], variables['batch_stats'])
  PointMLPProject().load_state_dict(state_dict, strict=True)
  params, batch_stats = pointmlp_from_torch(state_dict, model)
  for want, have in ((variables['params'], params), (variables['batch_stats'], batch_stats)):
    assert jax.tree.structure(want) == jax.tree.structure(have)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(have)):
      assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_sizes_are_read_off_a_state_dict_of_another_configuration(highest_precision):
  kwargs = dict(
    embed_dim=8,
    res_expansion=0.5,
    dim_expansion=(2, 1),
    pre_blocks=(1, 2),
    pos_blocks=(2, 0),
    k_neighbors=(24, 24),
    reducers=(2, 2),
    projection_dim=32,
  )
  torch.manual_seed(7)
  twin = PointMLPProject(points=128, **kwargs).eval()
  _randomize_twin(twin, seed=8)
  assert pointmlp_state_dict.pointmlp_kwargs_from_torch(twin.state_dict()) == dict(kwargs, in_channels=3)
  params, batch_stats = pointmlp_from_torch(twin.state_dict())
  model = PointMLP(**kwargs)
  points = _load_clouds(128)
  for cloud in points:  # two float32 stages on 128 points: no near-tie, the same groups on every machine
    assert grouping_margin(cloud, _stages(model, 128)) > NEAR_TIE
  with torch.no_grad():
    expected = twin(torch.from_numpy(points)).numpy()
  got = jax.jit(lambda v, p: model.apply(v, p, train=False))({'params': params, 'batch_stats': batch_stats}, points)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_coloured_pointmlp_matches_the_twin_and_converts_both_ways(highest_precision):
  """6 input channels (xyz + rgb), OpenShape's coloured PointMLP: the embedding sees every channel, sampling and
  neighbour search xyz alone; the Flax encoder gives the twin's features, and its state dict reads back exactly with
  in_channels found from the weights."""
  kwargs = dict(
    embed_dim=8,
    res_expansion=0.5,
    dim_expansion=(2, 1),
    pre_blocks=(1, 2),
    pos_blocks=(2, 0),
    k_neighbors=(24, 24),
    reducers=(2, 2),
    projection_dim=32,
    in_channels=6,
  )
  torch.manual_seed(9)
  twin = PointMLPProject(points=128, **kwargs).eval()
  _randomize_twin(twin, seed=10)
  state_dict = twin.state_dict()
  assert tuple(state_dict['embedding.net.0.weight'].shape) == (8, 6, 1)
  assert pointmlp_state_dict.pointmlp_kwargs_from_torch(state_dict) == kwargs
  params, batch_stats = pointmlp_from_torch(state_dict)
  model = PointMLP(**kwargs)
  xyz = _load_clouds(128)
  rgb = np.random.default_rng(11).uniform(0, 1, xyz.shape).astype(np.float32)
  coloured = np.concatenate([xyz, rgb], axis=-1)
  with torch.no_grad():
    expected = twin(torch.from_numpy(coloured)).numpy()
  apply = jax.jit(lambda v, p: model.apply(v, p, train=False))
  got = apply({'params': params, 'batch_stats': batch_stats}, coloured)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
  other = apply({'params': params, 'batch_stats': batch_stats}, np.concatenate([xyz, 1 - rgb], axis=-1))
  assert not np.allclose(np.asarray(other), expected, atol=1e-3)  # colour matters
  again = pointmlp_to_torch(params, batch_stats)
  for key, value in state_dict.items():
    if not key.endswith('num_batches_tracked'):
      assert torch.equal(again[key], value), key
  with pytest.raises(ValueError, match=r'\(batch, num_points, 6\), got shape \(2, 128, 3\) \(xyz \+ 3 colour'):
    model.apply({'params': params, 'batch_stats': batch_stats}, xyz, train=False)


def test_round_trip_torch_flax_torch_is_exact(small_twin):
  state_dict = small_twin.state_dict()
  again = pointmlp_to_torch(*pointmlp_from_torch(state_dict, PointMLP(**SMALL)))
  assert list(again) == list(state_dict)
  for key, value in state_dict.items():
    if not key.endswith('num_batches_tracked'):
      assert torch.equal(again[key], value), key


@pytest.mark.parametrize(
  'points, message',
  [
    (np.zeros((1024, 3), np.float32), r'shape \(batch, num_points, 3\)'),
    (np.zeros((2, 1024, 6), np.float32), r'shape \(batch, num_points, 3\)'),
    (np.zeros((2, 1024, 3), np.int32), 'floating-point'),
    (np.ones((2, 40, 3), np.float32), 'stage 1 needs at least 24 points'),
    (
      np.where(np.arange(2 * 1024 * 3).reshape(2, 1024, 3) == 3001, np.nan, 1.0).astype(np.float32),
      r'NaN or infinite coordinates in clouds \[0\]',
    ),
  ],
)
def test_bad_points_raise_clear_errors(points, message):
  model = PointMLP()
  variables = _random_variables(model, seed=6)
  with pytest.raises(ValueError, match=message):
    model.apply(variables, points, train=False)


def test_inconsistent_stage_settings_raise():
  with pytest.raises(ValueError, match='one entry per stage'):
    PointMLP(reducers=(2, 2, 2)).init(jax.random.key(0), np.zeros((1, 1024, 3), np.float32), train=False)


def test_bad_state_dicts_raise_clear_errors(small_twin):
  good = dict(small_twin.state_dict())
  model = PointMLP(**SMALL)
  missing = {k: v for k, v in good.items() if k != 'pos_blocks_list.1.operation.0.net2.1.running_var'}
  with pytest.raises(ValueError, match=r'missing keys \[pos_blocks_list.1.operation.0.net2.1.running_var\]'):
    pointmlp_from_torch(missing, model)
  with pytest.raises(ValueError, match=r'unexpected keys \[module.projection.bias\]'):
    pointmlp_from_torch({**good, 'module.projection.bias': good['projection.bias']}, model)
  with pytest.raises(ValueError, match=r'projection.weight: got \(512, 128, 1\), expected \(512, 256, 1\)'):
    pointmlp_from_torch({**good, 'projection.weight': good['projection.weight'][:, :128]}, model)
  with pytest.raises(ValueError, match=r'projection.weight: expected a kernel-size-1 convolution weight'):
    pointmlp_from_torch({**good, 'projection.weight': good['projection.weight'][:, :, 0]}, model)
  with pytest.raises(ValueError, match='not a PointMLP ModelProject state dict'):
    pointmlp_from_torch({k: v for k, v in good.items() if not k.startswith('embedding.')})
  with pytest.raises(ValueError, match='embedding.net.0.weight has dtype int64'):
    pointmlp_from_torch({**good, 'embedding.net.0.weight': good['embedding.net.0.weight'].long()}, model)


def test_bfloat16_compute_stays_close_to_float32(small_twin):
  """bf16 compute against the float32 JAX model: both select the same points (selection is float32 for both)."""
  points = _load_clouds(SMALL_POINTS)
  params, batch_stats = pointmlp_from_torch(small_twin.state_dict(), PointMLP(**SMALL))
  variables = {'params': params, 'batch_stats': batch_stats}
  run = lambda model: jax.jit(lambda v, p: model.apply(v, p, train=False))(variables, points)
  got, want = run(PointMLP(**SMALL, dtype=jnp.bfloat16)), np.asarray(run(PointMLP(**SMALL)))
  assert got.dtype == jnp.bfloat16
  assert np.abs(np.asarray(got.astype(jnp.float32)) - want).max() <= 0.05 * np.abs(want).max()
