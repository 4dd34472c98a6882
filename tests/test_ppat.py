"""OpenShape's PPAT ("PointBERT"): the twin's state dict against the list taken from OpenShape's own code, parity of
the Flax model with the twin on real clouds (float64 and float32, the released size), exact round trips, the
sampling and ball-query rules against plain NumPy, and the released checkpoint reader's refusals."""

import ast
import collections
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cg3d_jax.models import ppat
from cg3d_jax.models.ppat import PPAT
from cg3d_jax.twins import ppat as twin_ppat
from cg3d_jax.weights import openshape_pt
from cg3d_jax.weights.cg3d_pth import CheckpointFormatError
from tests import conftest
from tests.conftest import FIXTURES, NEAR_TIE, modelnet_root

# Real objects whose grouping at the released settings (384 FPS centres from index 0, balls of radius 0.2 with 64
# samples) has no near-tie (checked by `selection_margins` below), so float32 comparisons group the same points on
# every machine; float64 comparisons need no margin.
OBJECTS = ('airplane/airplane_0628', 'airplane/airplane_0631')
# Each implementation's float32 expanded squared distance is within ~4e-7 of the exact one on unit-sphere clouds
# (measured: 3.7e-7 JAX, 3.9e-7 PyTorch; they differ from each other by up to 4.8e-7, 2 ulps at the terms' scale of
# 2). A point whose exact distance to the ball's boundary is larger than this is on the same side for both.
BALL_NEAR_TIE = 1e-6
SMALL = dict(depth=2)  # the released widths and grouping, two layers
KEYS_TSV = FIXTURES / 'reference' / 'openshape_ppat_keys.tsv'


def normalize_pc(xyz: np.ndarray) -> np.ndarray:
  """OpenShape's utils.data.normalize_pc: centred, scaled to the unit sphere."""
  xyz = xyz - xyz.mean(0)
  return (xyz / np.max(np.linalg.norm(xyz, axis=1))).astype(np.float32)


def load_xyz(name: str) -> np.ndarray:
  return normalize_pc(np.loadtxt(modelnet_root() / f'{name}.txt', delimiter=',', dtype=np.float32)[:, :3])


def load_owl() -> np.ndarray:
  """OpenShape's demo cloud with its real colours, as its loaders prepare it: y and z swapped, normalised, rgb/255."""
  rows = np.loadtxt(FIXTURES / 'openshape_owl' / 'owl.ply', skiprows=10, dtype=np.float64)
  xyz = rows[:, :3].astype(np.float32)[:, [0, 2, 1]]
  return np.concatenate([normalize_pc(xyz), (rows[:, 3:] / 255.0).astype(np.float32)], axis=1)


def fps_numpy(xyz: np.ndarray, num_samples: int, start: int = 0) -> np.ndarray:
  """DGL's farthest_point_sampler CPU kernel as written (geometry_op_impl.cc), one cloud, in the cloud's dtype."""
  n = len(xyz)
  out, sample, dist = [start], start, None
  for i in range(num_samples - 1):
    one = np.zeros(n, xyz.dtype)
    for d in range(xyz.shape[1]):
      tmp = xyz[:, d] - xyz[sample, d]
      one = one + tmp * tmp
    dist = one if i == 0 else np.where(dist > one, one, dist)
    dist_max, sample = xyz.dtype.type(-1), 0
    for j in range(n):  # the kernel's scan: strict '>' keeps the first index of the maximum
      if dist[j] > dist_max:
        dist_max, sample = dist[j], j
    out.append(sample)
  return np.array(out)


def ball_query_numpy(radius: float, nsample: int, xyz: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """OpenShape's query_ball_point written out per centre: the expanded squared distance, a point counts unless it
  is > radius^2 (the Python double cast to the points' dtype, as PyTorch compares), ascending indices, the first
  `nsample`, the lowest repeated when fewer."""
  dtype = xyz.dtype.type
  out = []
  for c in centres:
    sq = (dtype(-2) * (xyz @ c) + np.sum(c**2)) + np.sum(xyz**2, axis=1)
    inside = [j for j in range(len(xyz)) if not sq[j] > dtype(radius**2)][:nsample]
    out.append(inside + [inside[0]] * (nsample - len(inside)))
  return np.array(out)


def selection_margins(xyz, num_patches=384, radius=0.2, num_samples=64, start=0) -> tuple[float, float]:
  """Float64: (the smallest relative gap between an FPS step's pick and its runner-up, the smallest |d^2 - r^2| among
  the points whose ball membership decides a group: up to the num_samples-th point inside). Copies of a point tie
  exactly everywhere and do not count."""
  xyz = np.asarray(xyz, np.float64)
  min_sq, chosen, fps_gap = np.full(len(xyz), np.inf), [start], np.inf
  for _ in range(1, num_patches):
    min_sq = np.minimum(min_sq, np.sum((xyz - xyz[chosen[-1]]) ** 2, axis=1))
    best = int(np.argmax(min_sq))
    others = min_sq[np.any(xyz != xyz[best], axis=1)]
    if min_sq[best] > 0 and others.size:
      fps_gap = min(fps_gap, (min_sq[best] - others.max()) / min_sq[best])
    chosen.append(best)
  return fps_gap, ball_margin(xyz, xyz[chosen], radius, num_samples)


def ball_margin(xyz, centres, radius, num_samples) -> float:
  """Float64: the smallest |d^2 - r^2| among the points whose ball membership decides a group."""
  xyz, centres = np.asarray(xyz, np.float64), np.asarray(centres, np.float64)
  gap = np.inf
  for row in np.sum((centres[:, None] - xyz[None]) ** 2, axis=-1):
    inside = np.nonzero(row <= radius**2)[0]
    last = inside[num_samples - 1] if len(inside) >= num_samples else len(xyz) - 1
    gap = min(gap, np.abs(row[: last + 1] - radius**2).min())
  return gap


def reference_keys() -> dict[str, tuple[tuple[int, ...], str]]:
  out = {}
  for line in KEYS_TSV.read_text().splitlines():
    if line.startswith('#') or not line.strip():
      continue
    key, shape, dtype = line.split('\t')
    out[key] = (tuple(ast.literal_eval(shape)), dtype)
  return out


def randomise_running_stats(twin: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Non-trivial BatchNorm running statistics, so that eval-mode BatchNorm is really exercised."""
  gen = torch.Generator().manual_seed(seed)
  for module in twin.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) * 0.2 - 0.1)
      module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 1.5 + 0.5)
  return twin


def twin_and_variables(seed: int = 0, **make_kwargs):
  torch.manual_seed(seed)
  twin = randomise_running_stats(twin_ppat.make(**make_kwargs), seed).eval()
  params, batch_stats = openshape_pt.ppat_from_torch(twin.state_dict())
  return twin, {'params': params, 'batch_stats': batch_stats}


def to64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def twin_forward(twin, points: np.ndarray, dtype=torch.float32) -> np.ndarray:
  twin = copy.deepcopy(twin).to(dtype)
  with torch.no_grad():
    pts = torch.from_numpy(points).to(dtype)
    return twin(pts[..., :3], pts).numpy()


@pytest.fixture(scope='module')
def clouds() -> np.ndarray:
  """The fixture objects (B, 10000, 3), their grouping checked free of near-ties."""
  xyz = np.stack([load_xyz(name) for name in OBJECTS])
  for name, cloud in zip(OBJECTS, xyz):
    fps_gap, ball_gap = selection_margins(cloud)
    assert fps_gap > NEAR_TIE and ball_gap > BALL_NEAR_TIE, (name, fps_gap, ball_gap)
  return xyz


@pytest.fixture(scope='module')
def coloured(clouds) -> np.ndarray:
  rgb = np.random.default_rng(7).uniform(0, 1, clouds.shape).astype(np.float32)
  return np.concatenate([clouds, rgb], axis=-1)


@pytest.fixture(scope='module')
def released():
  """The twin at the released size (scaling 4, xyz + rgb, 1280) with random weights, and its Flax variables."""
  return twin_and_variables(seed=0)


# --- (3) names and shapes -------------------------------------------------------------------------------------------


def test_twin_and_export_match_openshapes_own_key_list():
  reference = reference_keys()
  assert len(reference) == 160
  twin = twin_ppat.make()
  assert {k: (tuple(v.shape), str(v.dtype)) for k, v in twin.state_dict().items()} == reference
  assert list(twin.state_dict()) == list(reference)  # OpenShape's registration order
  assert twin_ppat.num_parameters(twin) == 32_326_080
  # The Flax model's variables, exported, give the same list; the shapes the reader checks against too.
  model = PPAT()
  assert model == PPAT.from_scaling(4, in_channels=6, embed_dim=1280)
  shapes = openshape_pt.expected_variables(model)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  exported = openshape_pt.ppat_to_torch(zeros['params'], zeros['batch_stats'])
  assert list(exported) == list(reference)
  assert {k: (tuple(v.shape), str(v.dtype)) for k, v in exported.items()} == reference
  assert dict(openshape_pt.expected_torch_shapes()) == {k: s for k, (s, _) in reference.items()}
  twin.load_state_dict(exported, strict=True)
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes['params'])) == 32_326_080


@pytest.mark.parametrize('scaling', sorted(ppat.OPENSHAPE_SCALINGS))
def test_sizes_read_off_every_scaling(scaling):
  with torch.device('meta'):  # shapes only: no memory for the larger scalings
    state = twin_ppat.make(scaling, in_channel=3, out_channel=768).state_dict()
  kwargs = openshape_pt.ppat_kwargs_from_torch({f'module.{k}': v for k, v in state.items()})
  assert PPAT(**kwargs) == PPAT.from_scaling(scaling, in_channels=3, embed_dim=768)
  assert openshape_pt.openshape_scaling(kwargs) == scaling


# --- (1) parity -----------------------------------------------------------------------------------------------------


def test_released_size_matches_the_twin_in_float32(released, coloured, highest_precision):
  """512 wide, 12 layers, 384 centres x 64 samples on 10,000 real points with (synthetic) colours."""
  twin, variables = released
  apply = jax.jit(PPAT().apply, static_argnames=('train', 'return_features'))
  got = np.asarray(apply(variables, coloured, train=False))
  want = twin_forward(twin, coloured)
  assert got.shape == want.shape == (len(OBJECTS), 1280)
  assert np.abs(want).max() > 0.5  # a real signal
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  features = np.array(apply(variables, coloured, train=False, return_features=True))  # the cls token before `proj`
  with torch.no_grad():
    np.testing.assert_allclose(twin.proj(torch.from_numpy(features)).numpy(), want, atol=1e-4, rtol=0)


def test_released_size_matches_the_twin_in_float64(released, coloured):
  """The same model in float64 on both sides, on a ModelNet object and OpenShape's real coloured owl."""
  twin, variables = released
  points = np.stack([coloured[0], load_owl()]).astype(np.float64)
  want = twin_forward(twin, points, torch.float64)
  with jax.enable_x64(True):
    got = np.asarray(jax.jit(lambda v, p: PPAT(dtype=jnp.float64).apply(v, p, train=False))(to64(variables), points))
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize('precision', ['float32', 'float64'])
def test_xyz_only_encoder_matches_the_twin(clouds, precision, highest_precision):
  """in_channels=3 (OpenShape with use_color False: the set abstraction sees [xyz - centre, xyz])."""
  twin, variables = twin_and_variables(seed=1, in_channel=3, **SMALL)
  assert tuple(twin.state_dict()['ppat.sa.mlp_convs.0.weight'].shape) == (64, 6, 1, 1)
  model = PPAT(in_channels=3, **SMALL)
  if precision == 'float64':
    want = twin_forward(twin, clouds.astype(np.float64), torch.float64)
    with jax.enable_x64(True):
      got = jax.jit(lambda v: model.clone(dtype=jnp.float64).apply(v, clouds.astype(np.float64), train=False))(
        to64(variables)
      )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-9, rtol=0)
  else:
    got = jax.jit(lambda v: model.apply(v, clouds, train=False))(variables)
    np.testing.assert_allclose(np.asarray(got), twin_forward(twin, clouds), atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match=r'\(batch, num_points, 3\) \(xyz\), got shape \(2, 10000, 6\)'):
    model.apply(variables, np.concatenate([clouds, clouds], -1), train=False)


def test_train_mode_batch_statistics_match_the_twin(coloured, highest_precision):
  twin, variables = twin_and_variables(seed=2, depth=1)
  model = PPAT(depth=1)
  out, updates = jax.jit(lambda v: model.apply(v, coloured, train=True, mutable=['batch_stats']))(variables)
  trained = copy.deepcopy(twin).train()
  with torch.no_grad():
    pts = torch.from_numpy(coloured)
    want = trained(pts[..., :3], pts).numpy()
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=0)
  state = trained.state_dict()
  for i in range(3):
    for ours, theirs in (('mean', 'running_mean'), ('var', 'running_var')):
      np.testing.assert_allclose(
        np.asarray(updates['batch_stats']['sa'][f'bn_{i}'][ours]),
        state[f'ppat.sa.mlp_bns.{i}.{theirs}'].numpy(),
        rtol=1e-5,
        atol=1e-6,
      )
  before = twin.state_dict()['ppat.sa.mlp_bns.0.running_var'].numpy()
  assert not np.allclose(state['ppat.sa.mlp_bns.0.running_var'].numpy(), before)  # the statistics moved


def test_start_index_scan_and_remat(coloured, highest_precision):
  """The FPS start is an argument (model field or per call, one per cloud); unrolled and rematerialised layers give
  the scanned result."""
  twin, variables = twin_and_variables(seed=3, **SMALL)
  model = PPAT(**SMALL)
  plain = np.asarray(jax.jit(lambda v: model.apply(v, coloured, train=False))(variables))
  for kwargs in (dict(scan_layers=False), dict(remat='full')):
    other = jax.jit(lambda v, m=model.clone(**kwargs): m.apply(v, coloured, train=False))(variables)
    np.testing.assert_allclose(np.asarray(other), plain, atol=1e-6, err_msg=str(kwargs))
  starts = np.array([4321, 5000])
  for cloud, start in zip(coloured, starts):
    fps_gap, ball_gap = selection_margins(cloud[:, :3], start=int(start))
    assert fps_gap > NEAR_TIE and ball_gap > BALL_NEAR_TIE, (start, fps_gap, ball_gap)
  per_cloud = np.asarray(jax.jit(lambda v: model.apply(v, coloured, train=False, start_index=starts))(variables))
  twin = copy.deepcopy(twin)
  twin.fps_start = torch.from_numpy(starts)
  np.testing.assert_allclose(per_cloud, twin_forward(twin, coloured), atol=1e-4, rtol=0)
  assert np.abs(per_cloud - plain).max() > 1e-3  # another start, other centres
  with pytest.raises(ValueError, match=r'start_index must be in \[0, N=10000\)'):
    model.clone(fps_start_index=10000).apply(variables, coloured, train=False)


# --- (2) round trips ------------------------------------------------------------------------------------------------


def test_state_dicts_round_trip_bitwise(released):
  twin = copy.deepcopy(released[0])
  for module in twin.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.num_batches_tracked.fill_(7)
  original = twin.state_dict()
  params, batch_stats = openshape_pt.ppat_from_torch({f'module.{k}': v for k, v in original.items()})
  assert params['layers']['attn']['to_qkv']['kernel'].shape == (12, 512, 1536)  # stacked on depth
  back = openshape_pt.ppat_to_torch(params, batch_stats, num_batches_tracked=7)
  assert list(back) == list(original)
  for key, value in original.items():
    assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
  # OpenShape's project_out=False (one head as wide as the model: no to_out) round-trips too.
  small = twin_ppat.make(dim=64, heads=1, depth=1, mlp_dim=32, sa_dim=16, in_channel=3).state_dict()
  assert not any('to_out' in k for k in small)
  kwargs = openshape_pt.ppat_kwargs_from_torch(small)
  assert (kwargs['num_heads'], kwargs['head_dim'], kwargs['sa_channels']) == (1, 64, (64, 64, 16))
  back = openshape_pt.ppat_to_torch(*openshape_pt.ppat_from_torch(small))
  assert list(back) == list(small) and all(torch.equal(back[k], v) for k, v in small.items())


def test_conversion_errors_name_the_tensors(released):
  twin, variables = released
  state = dict(twin.state_dict())
  del state['ppat.transformer.layers.3.1.fn.net.3.bias']
  state['ppat.extra'] = torch.zeros(2)
  state['ppat.lift.0.weight'] = torch.zeros(512, 100, 1)
  with pytest.raises(ValueError) as err:
    openshape_pt.ppat_from_torch(state, PPAT())
  message = str(err.value)
  assert '1 missing tensor [ppat.transformer.layers.3.1.fn.net.3.bias]' in message
  assert '1 unexpected [ppat.extra]' in message
  assert 'ppat.lift.0.weight: got (512, 100, 1), expected (512, 259, 1)' in message
  with pytest.raises(ValueError, match=r'missing \[params/cls_token\]'):
    params = {k: v for k, v in variables['params'].items() if k != 'cls_token'}
    openshape_pt.ppat_to_torch(params, variables['batch_stats'])


# --- (4) sampling and ball query rules ------------------------------------------------------------------------------


def boundary_points() -> tuple[np.ndarray, np.ndarray]:
  """Points and centres whose squared distances (expanded form) are exact in binary: ties at the radius (0.5) are
  real ties on every machine."""
  points = np.array(
    [
      [1.0, 0, 0],  # 0
      [0.75, 0, 0],  # 1: 0.5 from centre 0, exactly on its sphere
      [0.25, 0.5, 0],  # 2: on the sphere too
      [0.75 + 2**-20, 0, 0],  # 3: just outside it
      [0.25, 0, 0.5],  # 4: on it
      [0.5, 0.25, 0],  # 5: inside, the nearest, yet after 1, 2 and 4 in index order
      [0.75, 0, 0],  # 6: a copy of point 1
    ],
    np.float32,
  )
  centres = np.array([[0.25, 0, 0], [1.0, 0, 0], [0.25, 0.5, 0]], np.float32)
  return points, centres


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_ball_query_boundary_order_and_fill(dtype):
  points, centres = boundary_points()
  points, centres = points.astype(dtype), centres.astype(dtype)
  want = np.array([[1, 2, 4, 5], [0, 1, 3, 6], [2, 5, 2, 2]])  # <= r^2 counts; ascending; fewer: the first again
  assert (ball_query_numpy(0.5, 4, points, centres) == want).all()
  twin = twin_ppat.query_ball_point(0.5, 4, torch.from_numpy(points[None]), torch.from_numpy(centres[None]))[0]
  assert (twin.numpy() == want).all()
  with jax.enable_x64(dtype == np.float64):
    got = np.asarray(ppat.ball_query(jnp.asarray(points[None]), jnp.asarray(centres[None]), 0.5, 4))[0]
  np.testing.assert_array_equal(got, want)


def test_ball_query_compares_in_the_points_precision():
  """radius^2 is a Python double; PyTorch compares the float32 distances with it cast to float32. A point whose
  float32 squared distance rounds up onto float32(radius^2), above the double radius^2, is inside."""
  a = np.float32(0.3)
  while not (float(np.float32(a * a)) > float(a) ** 2 and np.float32(float(a) ** 2) == np.float32(a * a)):
    a = np.nextafter(a, np.float32(1))
  points = np.array([[a, 0, 0], [0, 0, a], [np.nextafter(a, np.float32(1)), 0, 0], [0.5, 0.5, 0]], np.float32)
  centre = np.zeros((1, 3), np.float32)
  radius = float(a)  # float32 d^2 = float32(radius^2) > radius^2 in double
  want = np.array([[0, 1, 0, 0]])
  np.testing.assert_array_equal(ball_query_numpy(radius, 4, points, centre), want)
  twin = twin_ppat.query_ball_point(radius, 4, torch.from_numpy(points[None]), torch.from_numpy(centre[None]))
  np.testing.assert_array_equal(twin[0].numpy(), want)
  np.testing.assert_array_equal(np.asarray(ppat.ball_query(points[None], centre[None], radius, 4))[0], want)
  with jax.enable_x64(True):  # float64: exact squares of the same values, the same points on the sphere
    got = ppat.ball_query(jnp.asarray(points[None], jnp.float64), jnp.asarray(centre[None], jnp.float64), radius, 4)
  np.testing.assert_array_equal(np.asarray(got)[0], ball_query_numpy(radius, 4, points.astype(np.float64), centre))


def test_ball_query_on_a_real_cloud(clouds):
  """The whole object (every ball full) and every tenth point of it (sparse balls, filled with their first index)."""
  filled = 0
  for xyz in (clouds[0], clouds[0, ::10]):
    centres = xyz[fps_numpy(xyz[:3000], 32)]  # centres spread over the object
    assert ball_margin(xyz, centres, 0.2, 64) > BALL_NEAR_TIE
    want = ball_query_numpy(0.2, 64, xyz, centres)
    filled += int(np.sum(want[:, 0] == want[:, -1]))
    got = np.asarray(ppat.ball_query(xyz[None], centres[None], 0.2, 64))[0]
    np.testing.assert_array_equal(got, want)
    twin = twin_ppat.query_ball_point(0.2, 64, torch.from_numpy(xyz[None]), torch.from_numpy(centres[None]))[0]
    np.testing.assert_array_equal(twin.numpy(), want)
  assert 0 < filled < 32


def test_fps_ties_duplicates_start_and_no_origin_skip(clouds):
  """DGL's rules: the first index of the maximum on exact ties (copies of every point, a cube's corners), any start,
  and no skipping of points at the origin (pointnet2_ops' CUDA FPS never picks those)."""
  cube = np.array([[0, 0, 0]] + [[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float32)
  real = clouds[1, :1500]
  doubled = np.concatenate([real, real])  # each point's copy ties with it exactly
  cases = [(cube, 9, 0), (cube, 9, 5), (doubled, 48, 0), (doubled, 48, 1234), (real, 48, 0)]
  for xyz, num, start in cases:
    want = fps_numpy(xyz, num, start)
    got = np.asarray(ppat.farthest_point_sample(jnp.asarray(xyz[None]), num, start))[0]
    twin = twin_ppat.farthest_point_sample(torch.from_numpy(xyz[None]), num, start)[0].numpy()
    np.testing.assert_array_equal(got, want, err_msg=f'{len(xyz)} points from {start}')
    np.testing.assert_array_equal(twin, want, err_msg=f'{len(xyz)} points from {start}')
  assert fps_numpy(cube, 9, 5)[-1] == 0  # the origin is sampled
  assert fps_numpy(cube, 3, 0).tolist() == [0, 1, 2]  # the corners tie twice over: the lowest index each time
  assert fps_numpy(doubled, 48, 0).max() < len(real)  # the first copy always
  for start in (0, 1234, 7):
    assert selection_margins(real, 48, 0.2, 64, start)[0] > NEAR_TIE, start
  # float64 selects in float64
  with jax.enable_x64(True):
    got = ppat.farthest_point_sample(jnp.asarray(real[None], jnp.float64), 48, 7)
  np.testing.assert_array_equal(np.asarray(got)[0], fps_numpy(real.astype(np.float64), 48, 7))


def test_input_errors_and_default_colour(clouds):
  model = PPAT(**SMALL)
  xyz = clouds[:, :500]
  variables = jax.eval_shape(lambda p: model.init(jax.random.key(0), p, train=False), ppat.with_default_colour(xyz))
  assert variables['params']['sa']['conv_0']['kernel'].shape == (9, 64)
  np.testing.assert_array_equal(np.asarray(ppat.with_default_colour(xyz))[..., 3:], np.float32(0.4))
  with pytest.raises(ValueError, match=r'got shape \(2, 500, 3\); a cloud without colours .*with_default_colour'):
    model.init(jax.random.key(0), xyz, train=False)
  with pytest.raises(ValueError, match='at least 384 points'):
    model.init(jax.random.key(0), ppat.with_default_colour(clouds[:, :100]), train=False)
  bad = np.array(ppat.with_default_colour(xyz))
  bad[1, 3, 0] = np.nan
  with pytest.raises(ValueError, match=r'non-finite .* batch rows \[1\]'):
    model.init(jax.random.key(0), bad, train=False)


# --- (5) the released file ------------------------------------------------------------------------------------------


def released_file(path, twin: torch.nn.Module, **extra) -> dict:
  """What OpenShape's Trainer.save_model writes, with the model's state under DDP's `module.`: a real AdamW and
  StepLR state (over a small parameter list: the structure is what matters), a LogitScaleNetwork, best accuracies."""
  params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]
  optimizer = torch.optim.AdamW(params, lr=5e-4)
  scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10000, gamma=0.967)
  sum(p.sum() for p in params).backward()
  optimizer.step()
  scheduler.step()
  container = {
    'state_dict': collections.OrderedDict((f'module.{k}', v) for k, v in twin.state_dict().items()),
    'logit_scale': collections.OrderedDict({'module.logit_scale': torch.tensor(np.log(14.28), dtype=torch.float32)}),
    'text_proj': None,
    'image_proj': None,
    'optimizer': optimizer.state_dict(),
    'scheduler': scheduler.state_dict(),
    'epoch': 12,
    'step': 34567,
    'best_img_contras_acc': torch.tensor(0.5),
    'best_text_contras_acc': 0,
    'best_modelnet40_overall_acc': torch.tensor(0.84),
    'best_modelnet40_class_acc': torch.tensor(0.8),
    'best_lvis_acc': torch.tensor(0.46),
    **extra,
  }
  torch.save(container, path)
  return container


def test_a_released_layout_file_loads(tmp_path, released):
  twin, variables = released
  path = tmp_path / 'model.pt'
  released_file(path, twin)
  model, params, batch_stats, info = openshape_pt.read_openshape_checkpoint(path)
  assert model == PPAT()
  for a, b in zip(
    jax.tree.leaves((params, batch_stats)), jax.tree.leaves((variables['params'], variables['batch_stats']))
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert info['scaling'] == 4 and info['epoch'] == 12 and info['step'] == 34567
  assert info['logit_scale'] == pytest.approx(14.28, rel=1e-6)
  assert 'optimizer' in info['other_entries'] and 'scheduler' in info['other_entries']
  assert 'num_patches=384, radius=0.2, num_samples=64 (OpenShape scaling 4' in info['assumed'][0]


@pytest.fixture(scope='module')
def small_file(tmp_path_factory):
  """A small PPAT in the released file layout, and the loaded container, for the refusals."""
  torch.manual_seed(4)
  twin = twin_ppat.make(dim=128, heads=2, depth=2, mlp_dim=256, sa_dim=32)
  path = tmp_path_factory.mktemp('openshape') / 'small.pt'
  return path, released_file(path, twin)


def test_a_small_file_loads_with_sizes_read_off_the_weights(small_file):
  path, container = small_file
  model, params, _, info = openshape_pt.read_openshape_checkpoint(path)
  assert (model.width, model.depth, model.num_heads, model.mlp_dim, model.sa_channels) == (128, 2, 2, 256, (64, 64, 32))
  assert info['scaling'] is None and 'no OpenShape scaling has these sizes' in info['assumed'][0]
  np.testing.assert_array_equal(np.asarray(params['cls_token']), container['state_dict']['module.ppat.cls_token'])


def refusal(tmp_path, name: str, container) -> str:
  return conftest.refusal(tmp_path, name, container, openshape_pt.read_openshape_checkpoint)


def test_bad_files_are_refused_with_one_clear_message(tmp_path, small_file):
  path, container = small_file
  state = container['state_dict']

  missing = dict(container, state_dict={k: v for k, v in state.items() if 'layers.1.1.fn.net.3.bias' not in k})
  assert '1 missing tensor [ppat.transformer.layers.1.1.fn.net.3.bias]' in refusal(tmp_path, 'missing.pt', missing)

  wrong = dict(container, state_dict={**state, 'module.ppat.lift.0.weight': torch.zeros(128, 30, 1)})
  assert 'mis-shaped [ppat.lift.0.weight: got (128, 30, 1), expected (128, 35, 1)]' in refusal(
    tmp_path, 'wrong.pt', wrong
  )

  truncated = tmp_path / 'truncated.pt'
  truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(CheckpointFormatError, match=r'truncated.pt: truncated or damaged'):
    openshape_pt.read_openshape_checkpoint(truncated)

  code = refusal(tmp_path, 'code.pt', dict(container, args=conftest.NeedsCode()))  # a class outside the allow-list
  assert 'refused' in code and 'nothing in it was run' in code

  other_backbone = {'state_dict': {'module.conv0p1s1.kernel': torch.zeros(27, 6, 32)}, 'epoch': 1}
  assert "not an OpenShape PPAT ('PointBERT') checkpoint" in refusal(tmp_path, 'spconv.pt', other_backbone)
  cg3d = {'base_model': {'cls_token': torch.zeros(1, 1, 384)}, 'epoch': 1}
  assert "not an OpenShape checkpoint: it holds a 'base_model'" in refusal(tmp_path, 'cg3d.pth', cg3d)
  assert 'not an OpenShape checkpoint' in refusal(tmp_path, 'list.pt', [1, 2, 3])
  nan = dict(container, state_dict={**state, 'module.proj.bias': torch.full_like(state['module.proj.bias'], np.nan)})
  assert 'non-finite (NaN/Inf) weights' in refusal(tmp_path, 'nan.pt', nan)


def test_evaluate_scores_an_openshape_file_on_lvis_as_its_twin_does(tmp_path, released):
  """A released-layout OpenShape file (scaling 4, xyz + rgb, 1280: OpenCLIP ViT-bigG-14's space) scored on a
  procedural Objaverse-LVIS in OpenShape's layout by the evaluate command against the layout's precomputed class
  features, no CLIP loaded: top-1 and class mean equal those of the twin's features on the same clouds (OpenShape's
  preparation: y and z swapped, unit sphere, all 10,000 points), and results.json names the family."""
  import json

  from cg3d_jax import evaluate
  from cg3d_jax.data import openshape_eval
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout
  from tests.conftest import run_command

  layout = write_openshape_layout(
    tmp_path / 'openshape',
    classes=('sphere', 'box', 'torus'),
    train_per_class=1,
    lvis_per_class=2,
    num_points=10000,
    feature_dim=1280,
  )
  twin, _ = released
  released_file(tmp_path / 'model.pt', twin)
  argv = ['--config', 'zeroshot_objaverse_lvis', '--checkpoint', str(tmp_path / 'model.pt')]
  argv += [f'--config.eval.manual_dir={layout}', '--config.eval.batch_size=8', '--workdir', str(tmp_path / 'lvis')]
  assert run_command(evaluate.main, argv) == 0
  results = json.loads((tmp_path / 'lvis' / 'results.json').read_text())
  assert results['family'] == 'OpenShape (PointBERT / PPAT, scaling 4)' and results['num_points'] == 10000

  evalset = openshape_eval.lvis_openshape(layout)
  points = np.stack(
    [
      openshape_eval.eval_points(*evalset.cloud(i), 10000, np.random.default_rng(0), y_up=True, use_color=True)
      for i in range(len(evalset))
    ]
  )
  features = twin_forward(twin, points)
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  table = evalset.class_features / np.linalg.norm(evalset.class_features, axis=1, keepdims=True)
  predicted, labels = np.argmax(features @ table.T, axis=1), np.asarray(evalset.labels)
  assert results['top1_acc'] == pytest.approx(100 * np.mean(predicted == labels))
  class_mean = 100 * np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)])
  assert results['class_mean_acc'] == pytest.approx(class_mean)


def test_export_writes_openshapes_layout_and_verifies_it_in_the_twin(tmp_path, capsys):
  """`export` of an OpenShape file (two layers here) writes OpenShape's layout by default, `--verify` loads it into
  the twin strictly and compares in float64 on the four real ModelNet40 objects the package ships; it reads back to
  the same variables; asking for CG3D's layout is one line."""
  from cg3d_jax import export, trained
  from tests.conftest import run_command

  twin, variables = twin_and_variables(seed=3, depth=2)
  released_file(tmp_path / 'model.pt', twin)
  out = tmp_path / 'out' / 'openshape.pt'
  assert run_command(export.main, ['--checkpoint', str(tmp_path / 'model.pt'), '--out', str(out), '--verify']) == 0
  assert 'verify: OK' in capsys.readouterr().out
  again = trained.load_trained(out)
  for a, b in zip(jax.tree.leaves(again.encoder_vars), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  code = run_command(export.main, ['--checkpoint', str(out), '--out', str(tmp_path / 'x.pth'), '--format', 'cg3d'])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert code == 2 and len(err) == 1 and 'written in its own layout (--format openshape)' in err[0], err


def test_class_features_from_a_users_file_score_as_the_layouts_own(tmp_path, capsys, released):
  """config.eval.prompts='file': the same class features the layout precomputes, given as the user's own .npz (rows
  in another order, matched by name) and .npy (rows in the split's order), give the same results as
  prompts='precomputed'; a file whose width is not the encoder's, or that misses a class, is one line."""
  import json

  from cg3d_jax import evaluate
  from cg3d_jax.data import openshape_eval
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout
  from tests.conftest import run_command

  layout = write_openshape_layout(
    tmp_path / 'openshape',
    classes=('sphere', 'box', 'torus'),
    train_per_class=1,
    lvis_per_class=1,
    num_points=10000,
    feature_dim=1280,
  )
  twin, _ = released
  released_file(tmp_path / 'model.pt', twin)
  evalset = openshape_eval.lvis_openshape(layout)
  names, table = list(evalset.class_names), np.asarray(evalset.class_features)
  np.savez(tmp_path / 'mine.npz', names=np.array(names[::-1]), features=table[::-1])
  np.save(tmp_path / 'mine.npy', table)
  np.save(tmp_path / 'narrow.npy', table[:, :32])
  np.savez(tmp_path / 'short.npz', names=np.array(names[:2]), features=table[:2])

  def run(name, *extra):
    argv = ['--config', 'zeroshot_objaverse_lvis', '--checkpoint', str(tmp_path / 'model.pt'), *extra]
    argv += [
      f'--config.eval.manual_dir={layout}',
      '--config.eval.batch_size=8',
      '--workdir',
      str(tmp_path / 'runs' / name),
    ]
    return run_command(evaluate.main, argv)

  assert run('own') == 0
  own = json.loads((tmp_path / 'runs' / 'own' / 'results.json').read_text())
  for name in ('mine.npz', 'mine.npy'):
    assert run(name, '--config.eval.prompts=file', f'--config.eval.class_features={tmp_path / name}') == 0
    mine = json.loads((tmp_path / 'runs' / name / 'results.json').read_text())
    assert mine['prompts'] == 'file' and mine['class_features'] == str(tmp_path / name)
    for key in ('top1_acc', 'top3_acc', 'class_mean_acc'):
      assert mine[key] == own[key], (name, key)
  capsys.readouterr()
  for name, message in (
    ('narrow.npy', 'holds 32-dimensional features but the encoder projects to 1280'),
    ('short.npz', 'no features for 1 class(es) of the split'),
  ):
    assert run(name, '--config.eval.prompts=file', f'--config.eval.class_features={tmp_path / name}') == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


def test_pretraining_starts_from_an_openshape_file_learns_and_exports_back(tmp_path, capsys):
  """OpenShape's stored-feature recipe started from a random-weight OpenShape file (config.model.init): the run
  trains a PPAT with the file's architecture (64 wide, one layer, 32-dimensional `proj`) and the config's patch
  grouping (which no weight records), learns on procedural OpenShape-layout objects, and exports back to OpenShape's
  layout by default, strict-loadable by the twin, whose float64 features on real ModelNet40 objects it matches."""
  import json

  from cg3d_jax import checkpoints, export, train
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout
  from tests.conftest import run_command

  root = write_openshape_layout(tmp_path / 'data', train_per_class=4, lvis_per_class=1, num_points=1024, seed=1)
  torch.manual_seed(5)
  twin = twin_ppat.make(out_channel=32, dim=64, heads=2, depth=1, mlp_dim=128, sa_dim=32).eval()
  released_file(tmp_path / 'model.pt', twin)
  workdir = tmp_path / 'run'
  argv = ['--config', 'pretrain_openshape', '--workdir', str(workdir), f'--config.data.manual_dir={root}']
  argv += [f'--config.model.init={tmp_path / "model.pt"}', '--config.model.num_points=128']
  argv += ['--config.model.ppat.num_patches=32', '--config.model.ppat.radius=0.4', '--config.model.ppat.num_samples=16']
  argv += ['--config.data.num_stored_points=512', '--config.data.openshape.workers=4', '--config.train.batch_size=16']
  argv += ['--config.train.total_steps=24', '--config.train.log_every=12', '--config.train.encoder_optim.lr=0.002']
  argv += ['--config.eval.every_steps=0', '--config.train.encoder_optim.warmup_epochs=0']
  argv += [
    '--config.checkpoint.async_save=false',
    '--config.checkpoint.every_steps=12',
    '--config.logging.tensorboard=false',
  ]
  assert run_command(train.main, argv) == 0
  log = [json.loads(line) for line in (workdir / 'train.jsonl').read_text().splitlines()]
  assert log[-1]['loss'] < log[0]['loss']
  saved = checkpoints.read_step(workdir)
  p = saved.config.model.ppat
  assert saved.config.model.encoder == 'ppat' and saved.config.model.embed_dim == 32
  assert (p.width, p.depth, p.num_heads, p.mlp_dim, tuple(p.sa_channels), p.num_patches, p.num_samples) == (
    64,
    1,
    2,
    128,
    (64, 64, 32),
    32,
    16,
  )

  out = tmp_path / 'export' / 'model.pt'
  assert run_command(export.main, ['--checkpoint', str(workdir), '--out', str(out), '--verify']) == 0
  assert 'verify: OK' in capsys.readouterr().out
  moved = twin_ppat.make(
    out_channel=32, dim=64, heads=2, depth=1, mlp_dim=128, sa_dim=32, patches=32, prad=0.4, nsamp=16
  )
  state = torch.load(out, weights_only=True)['state_dict']
  moved.load_state_dict({k[len('module.') :]: v for k, v in state.items()}, strict=True)
  assert not torch.equal(moved.proj.weight, twin.proj.weight)  # trained from the file's values
