"""Uni3D's point encoders: the twin's state dict against the list taken from Uni3D's own code (every size), parity of
the Flax model with the twin on real clouds (float64 and float32, every size), each EVA block kind against timm's own
EvaBlock, exact round trips, and the checkpoint reader on DeepSpeed-layout float16 files and on bad files."""

import ast
import collections
import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cg3d_jax.models import uni3d
from cg3d_jax.models.uni3d import UNI3D_SIZES, Uni3D
from cg3d_jax.twins import uni3d as twin_uni3d
from cg3d_jax.weights import openshape_pt, torch_io, uni3d_pt
from cg3d_jax.weights.cg3d_pth import CheckpointFormatError
from tests import conftest
from tests.conftest import FIXTURES, grouping_margin, modelnet_root

KEYS_TSV = FIXTURES / 'reference' / 'uni3d_state_dict_keys.tsv'
SIZES = tuple(UNI3D_SIZES)
OBJECTS = ('airplane/airplane_0628', 'bathtub/bathtub_0107')
# Float64 selections: the grouping's smallest relative gap on these clouds (~1e-7, grouping_margin) is far above
# float64 rounding, so both implementations group the same points.
F64_MARGIN = 1e-12
GRID = 2.0**-10  # see `on_grid`
# Every size at its real width with few blocks, and a grouping that keeps the mini-PointNet cheap (its 512 x 512
# convolutions over 512 x 64 points cost more than the blocks); the released grouping runs in the full-depth test.
PARITY = dict(num_groups=64, group_size=32)
PARITY_DEPTH = {'tiny': 2, 'small': 2, 'base': 2, 'large': 2, 'giant': 1}


def reference_sections() -> dict[str, list[tuple[str, tuple[int, ...], str]]]:
  sections, current = {}, None
  for line in KEYS_TSV.read_text().splitlines():
    if line.startswith('## '):
      current = sections.setdefault(line[3:].split('\t')[0], [])
    elif line.strip() and not line.startswith('#'):
      key, shape, dtype = line.split('\t')
      current.append((key, tuple(ast.literal_eval(shape)), dtype))
  return sections


def load_xyz(name: str) -> np.ndarray:
  """A real ModelNet40 object, all 10,000 points, centred and scaled to the unit sphere (Uni3D's pc_norm)."""
  xyz = np.loadtxt(modelnet_root() / f'{name}.txt', delimiter=',', dtype=np.float64)[:, :3]
  xyz = xyz - xyz.mean(0)
  return (xyz / np.max(np.linalg.norm(xyz, axis=1))).astype(np.float32)


def with_colours(xyz: np.ndarray, seed: int = 7) -> np.ndarray:
  rgb = np.random.default_rng(seed).uniform(0, 1, xyz.shape).astype(np.float32)
  return np.concatenate([xyz, rgb], axis=-1)


def randomise(twin: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Non-trivial values where timm and PyTorch start at constants (biases, q/v biases, norms, BatchNorm statistics),
  so that parity exercises every parameter."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in twin.named_parameters():
      if name.endswith('bias') or 'norm' in name or name.endswith('_conv.1.weight'):
        p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for module in twin.modules():
      if isinstance(module, torch.nn.BatchNorm1d):
        module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) * 0.2 - 0.1)
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 1.5 + 0.5)
  return twin


def twin_and_variables(size: str, seed: int = 0, **make_kwargs):
  torch.manual_seed(seed)
  twin = randomise(twin_uni3d.make(size, **make_kwargs), seed).eval()
  params, batch_stats = uni3d_pt.uni3d_from_torch(twin.state_dict())
  return twin, {'params': params, 'batch_stats': batch_stats}


def twin_forward(twin, points: np.ndarray, dtype=torch.float32) -> np.ndarray:
  twin = copy.deepcopy(twin).to(dtype)
  with torch.no_grad():
    return twin(torch.from_numpy(points).to(dtype)).numpy()


def to64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def jax_forward(model: Uni3D, variables, points: np.ndarray, precision: str) -> np.ndarray:
  if precision == 'float64':
    with jax.enable_x64(True):
      model = model.clone(dtype=jnp.float64)
      return np.asarray(jax.jit(lambda v, p: model.apply(v, p, train=False))(to64(variables), points))
  return np.asarray(jax.jit(lambda v, p: model.apply(v, p, train=False))(variables, points))


@pytest.fixture(scope='module')
def clouds() -> np.ndarray:
  """(2, 10000, 6): the fixture objects with (synthetic) colours, as Uni3D's data code prepares them; their released
  grouping (512 x 64) checked free of float64 near-ties."""
  points = with_colours(np.stack([load_xyz(name) for name in OBJECTS]))
  for cloud in points:
    assert grouping_margin(cloud[:, :3], [(512, 64)]) > F64_MARGIN
  return points


@pytest.fixture(scope='module')
def sparse_clouds(clouds) -> np.ndarray:
  """(2, 2000, 6): every fifth point of the objects (the whole shape, a fifth of the grouping's cost), the first with
  its colours, the second without (the 0.4 Uni3D gives a colourless cloud); their PARITY grouping checked free of
  float64 near-ties."""
  xyz = np.ascontiguousarray(clouds[:, ::5, :3])
  for cloud in xyz:
    assert grouping_margin(cloud, [(PARITY['num_groups'], PARITY['group_size'])]) > F64_MARGIN
  return np.stack([clouds[0, ::5], np.asarray(uni3d.with_default_colour(xyz[1:]))[0]])


# --- (1) names and shapes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize('size', SIZES)
def test_twin_and_export_match_uni3ds_own_key_list(size):
  reference = reference_sections()[size]
  with torch.device('meta'):  # shapes only: the giant has a billion parameters
    twin = twin_uni3d.make(size)
  state = twin.state_dict()
  assert [(k, tuple(v.shape), str(v.dtype)) for k, v in state.items()] == reference  # keys, shapes, order
  model = Uni3D.from_size(size)
  # The Flax model's variables, mapped, give the same list (the unused timm keys included)
  assert list(uni3d_pt.expected_torch_shapes(model).items()) == [(k, s) for k, s, _ in reference]
  # and the sizes are read back off the keys and shapes.
  kwargs = uni3d_pt.uni3d_kwargs_from_torch({f'module.{k}': v for k, v in state.items()})
  assert Uni3D(**kwargs) == model and uni3d.size_of(model) == size
  shapes = uni3d_pt.expected_variables(model)
  encoder_values = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes['params']))
  unused = sum(math.prod(s) for s in uni3d_pt.unused_shapes(model.width, model.mlp, model.qkv_fused).values())
  assert encoder_values + unused == twin_uni3d.num_parameters(twin)


def test_an_export_loads_strictly_into_the_twin():
  """Flax variables -> Uni3D's state dict with every key (logit_scale and the unused timm stem filled as Uni3D starts
  them), in the released order: Uni3D's strict load_state_dict takes it."""
  reference = reference_sections()['tiny']
  model = Uni3D.from_size('tiny')
  shapes = uni3d_pt.expected_variables(model)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  exported = uni3d_pt.uni3d_to_torch(zeros['params'], zeros['batch_stats'])
  assert [(k, tuple(v.shape), str(v.dtype)) for k, v in exported.items()] == reference
  assert exported['logit_scale'].item() == pytest.approx(math.log(1 / 0.07))
  twin_uni3d.make('tiny').load_state_dict(exported, strict=True)


# --- (2) parity -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('size', SIZES)
def test_every_size_matches_the_twin(size, sparse_clouds, highest_precision):
  """Real width and block kind, PARITY_DEPTH blocks, PARITY grouping, on the two real objects (2,000 points each):
  float64 within 1e-9, float32 within 1e-4."""
  depth = PARITY_DEPTH[size]
  twin, variables = twin_and_variables(size, seed=SIZES.index(size), depth=depth, **twin_grouping(PARITY))
  model = Uni3D.from_size(size, depth=depth, **PARITY)
  for precision, points in (('float64', sparse_clouds.astype(np.float64)), ('float32', on_grid(sparse_clouds))):
    want = twin_forward(twin, points, torch.float64 if precision == 'float64' else torch.float32)
    got = jax_forward(model, variables, points, precision)
    assert got.shape == want.shape == (2, 1024) and got.dtype == np.dtype(precision)
    assert np.abs(want).max() > 0.1  # a real signal
    np.testing.assert_allclose(got, want, atol=1e-9 if precision == 'float64' else 1e-4, rtol=0, err_msg=precision)


def twin_grouping(grouping: dict) -> dict:
  return dict(num_group=grouping['num_groups'], group_size=grouping['group_size'])


def on_grid(points: np.ndarray) -> np.ndarray:
  """xyz rounded to multiples of 2^-10 (the colours as they are): every squared distance the grouping computes,
  (-2 a.b + |a|^2) + |b|^2 or dx^2 + dy^2 + dz^2, is then a multiple of 2^-20 below 16, exact in float32 whatever
  the order of the sums or fused multiply-adds, so float32 groupings cannot differ between the implementations on
  any machine (dense real clouds have 64th-neighbour gaps far below float32 rounding). The ties that remain are exact
  and both implementations take the lowest index."""
  out = points.copy()
  out[..., :3] = np.round(out[..., :3] / GRID) * GRID
  assert np.all(np.abs(out[..., :3]) <= 1.0)
  return out


def test_tiny_at_full_depth_and_the_released_grouping_matches_the_twin(clouds, highest_precision):
  """Uni3D-Ti as released (12 blocks, 512 groups x 64 points of 10,000 points), float64, on a real object."""
  twin, variables = twin_and_variables('tiny', seed=11)
  points = clouds[:1].astype(np.float64)
  want = twin_forward(twin, points, torch.float64)
  got = jax_forward(Uni3D.from_size('tiny'), variables, points, 'float64')
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-9, rtol=0)


# --- (3) the EVA blocks against timm's own ----------------------------------------------------------------------


def timm_eva_block(kind: str):
  """timm's EvaBlock as timm's model functions build it for a size with this MLP kind (timm 1.0.31)."""
  from tests import slip_reference

  slip_reference._import_timm()
  from timm.models.eva import EvaBlock

  s = UNI3D_SIZES[{'glu': 'small', 'swiglu': 'base', 'gelu': 'giant'}[kind]]
  mlp_ratio = {'glu': 4 * 2 / 3, 'swiglu': 4 * 2 / 3, 'gelu': 6144 / 1408}[kind]
  return s, EvaBlock(
    dim=s['width'],
    num_heads=s['num_heads'],
    qkv_bias=True,
    qkv_fused=s['qkv_fused'],
    mlp_ratio=mlp_ratio,
    swiglu_mlp=kind != 'gelu',
    scale_mlp=kind == 'swiglu',
  )


@pytest.mark.parametrize('kind', uni3d.MLP_KINDS)
def test_each_block_kind_equals_timms_eva_block(kind):
  """timm's EvaBlock (the outside reference) with random weights: the twin's block loads its state dict strictly and
  the Flax block, through the name map, computes the same in float64. No rope: Uni3D calls blk(x)."""
  s, block = timm_eva_block(kind)
  torch.manual_seed(3)
  with torch.no_grad():
    for name, p in block.named_parameters():
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1 + 0.1 * torch.randn(p.shape))
      else:
        p.copy_(torch.randn(p.shape) * (0.05 if p.ndim == 2 else 0.1))
  block = block.double().eval()
  x = torch.randn(2, 65, s['width'], dtype=torch.float64)
  with torch.no_grad():
    want = block(x).numpy()  # rope=None, as Uni3D's loop calls it

  twin = twin_uni3d.EvaBlock(s['width'], s['num_heads'], s['mlp'], s['mlp_hidden'], s['qkv_fused']).double()
  twin.load_state_dict(block.state_dict(), strict=True)
  assert list(twin.state_dict()) == list(block.state_dict())
  with torch.no_grad():
    np.testing.assert_allclose(twin(x).numpy(), want, atol=1e-12, rtol=0)

  prefix = 'point_encoder.visual.blocks.0.'
  state = {prefix + k: v for k, v in block.state_dict().items()}
  entries = uni3d_pt._block_entries(0, s['mlp'], s['qkv_fused'])
  assert sorted(e.torch_key for e in entries) == sorted(state)
  params = torch_io.torch_to_flax(state, entries)['params']['blocks_0']
  flax_block = uni3d.EvaBlock(s['num_heads'], s['mlp'], s['mlp_hidden'], s['qkv_fused'], dtype=jnp.float64)
  with jax.enable_x64(True):
    got, _ = jax.jit(flax_block.apply)({'params': to64(params)}, x.numpy(), jnp.zeros((), jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-12, rtol=0)
  assert np.abs(want - x.numpy()).max() > 0.1  # the block changes its input


# --- (4) round trips ------------------------------------------------------------------------------------------------


def test_state_dicts_round_trip_bitwise():
  """The twin's state dict -> Flax -> state dict (the unused tensors passed through): the same keys in the same
  order, bitwise; Flax -> torch -> Flax likewise."""
  twin, variables = twin_and_variables('base', seed=5, depth=2)
  state = twin.state_dict()
  state['point_encoder.encoder.first_conv.1.num_batches_tracked'].fill_(77)
  state['point_encoder.encoder.second_conv.1.num_batches_tracked'].fill_(77)
  unused = {k: state[k] for k in uni3d_pt.UNUSED_KEYS}
  params, batch_stats = uni3d_pt.uni3d_from_torch(state)
  back = uni3d_pt.uni3d_to_torch(params, batch_stats, num_batches_tracked=77, unused=unused)
  assert list(back) == list(state)
  for key, value in state.items():
    assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
  again = uni3d_pt.uni3d_from_torch(back)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves((params, batch_stats))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert params['blocks']['attn']['q_proj']['kernel'].shape == (2, 768, 768)  # stacked for the scan


def test_conversion_errors_name_the_tensors():
  twin, variables = twin_and_variables('tiny', depth=2)
  state = dict(twin.state_dict())
  del state['point_encoder.visual.blocks.1.mlp.fc2.bias']
  state['point_encoder.extra'] = torch.zeros(2)
  state['point_encoder.encoder2trans.weight'] = torch.zeros(192, 256)
  with pytest.raises(ValueError) as err:
    uni3d_pt.uni3d_from_torch(state, Uni3D.from_size('tiny', depth=2))
  message = str(err.value)
  assert '1 missing tensor [point_encoder.visual.blocks.1.mlp.fc2.bias]' in message
  assert '1 unexpected [point_encoder.extra]' in message
  assert 'point_encoder.encoder2trans.weight: got (192, 256), expected (192, 512)' in message
  with pytest.raises(ValueError, match=r'missing \[params/fc_norm/bias'):
    params = {**variables['params'], 'fc_norm': {'scale': variables['params']['fc_norm']['scale']}}
    uni3d_pt.uni3d_to_torch(params, variables['batch_stats'])


def test_scan_remat_and_training_paths(sparse_clouds):
  """Unrolled and rematerialised blocks give the scanned result; train mode (batch statistics, drop path, patch
  dropout) runs and differs; a colourless cloud is refused with the fix in the message."""
  _, variables = twin_and_variables('tiny', depth=2, **twin_grouping(PARITY))
  model = Uni3D.from_size('tiny', depth=2, **PARITY)
  points = on_grid(sparse_clouds)
  plain = np.asarray(jax.jit(lambda v: model.apply(v, points, train=False))(variables))
  for kwargs in (dict(scan_layers=False), dict(remat='full')):
    other = jax.jit(lambda v, m=model.clone(**kwargs): m.apply(v, points, train=False))(variables)
    np.testing.assert_allclose(np.asarray(other), plain, atol=1e-5, err_msg=str(kwargs))
  trained = model.clone(drop_path_rate=0.2, patch_dropout=0.5)
  out, updates = jax.jit(
    lambda v: trained.apply(v, points, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
  )(variables)
  assert out.shape == (2, 1024) and np.all(np.isfinite(np.asarray(out)))
  assert np.abs(np.asarray(out) - plain).max() > 1e-3
  before = variables['batch_stats']['encoder']['first_bn']['mean']
  assert not np.allclose(updates['batch_stats']['encoder']['first_bn']['mean'], before)  # the statistics moved
  with pytest.raises(ValueError, match=r'\(batch, num_points, 6\) \(xyz \+ rgb\), got shape .*with_default_colour'):
    model.apply(variables, points[..., :3], train=False)


# --- (5) files ------------------------------------------------------------------------------------------------------


def deepspeed_file(path, twin: torch.nn.Module, *, prefix: str = '', **extra) -> dict:
  """What DeepSpeed 0.10.3's engine.save_checkpoint writes (mp_rank_00_model_states.pt) for Uni3D's run: the module
  in float16 (fp16 mode halves the whole module, BatchNorm statistics included), ZeRO-1's param_shapes (torch.Size),
  a set, the config path, Uni3D's client state."""
  half = copy.deepcopy(twin).half()
  module = collections.OrderedDict((prefix + k, v) for k, v in half.state_dict().items())
  buffers = [n for n, _ in half.named_buffers() if not n.endswith('k_bias')]
  container = {
    'module': module,
    'buffer_names': buffers,
    'optimizer': None,
    'param_shapes': [collections.OrderedDict((n, p.shape) for n, p in half.named_parameters())],
    'frozen_param_shapes': None,
    'shared_params': {},
    'frozen_param_fragments': None,
    'lr_scheduler': None,
    'data_sampler': None,
    'random_ltd': None,
    'sparse_tensor_module_names': set(),
    'skipped_steps': 3,
    'global_steps': 41200,
    'global_samples': 41200 * 48 * 8,
    'dp_world_size': 8,
    'mp_world_size': 1,
    'ds_config': '/work/Uni3D/dsconfig/uni3d-g/deepspeed_config.json',
    'ds_version': '0.10.3',
    'epoch': 12,
    'best_acc1': 53.5,
    **extra,
  }
  torch.save(container, path)
  return container


@pytest.fixture(scope='module')
def small_file(tmp_path_factory):
  twin, _ = twin_and_variables('tiny', seed=9, depth=2)
  path = tmp_path_factory.mktemp('uni3d') / 'model.pt'
  return path, twin, deepspeed_file(path, twin)


def test_a_float16_deepspeed_file_loads_as_its_float32_upcast(small_file, tmp_path):
  path, twin, container = small_file
  model, params, batch_stats, info = uni3d_pt.read_uni3d_checkpoint(path)
  assert model == Uni3D.from_size('tiny', depth=2)
  upcast = collections.OrderedDict(
    (k, v.float() if v.is_floating_point() else v) for k, v in container['module'].items()
  )
  assert all(v.dtype == torch.float16 for k, v in container['module'].items() if 'num_batches' not in k)
  want_params, want_stats = uni3d_pt.uni3d_from_torch(upcast)
  for a, b in zip(jax.tree.leaves((params, batch_stats)), jax.tree.leaves((want_params, want_stats))):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(  # the file's float16 values, exactly
    np.asarray(params['cls_pos']), container['module']['point_encoder.cls_pos'].numpy().astype(np.float32)
  )
  assert info['size'] is None and info['dtypes'] == ['float16'] and info['epoch'] == 12
  assert info['global_steps'] == 41200 and info['ds_version'] == '0.10.3'
  assert info['logit_scale'] == pytest.approx(1 / 0.07, rel=1e-3)
  assert info['ignored'] == ['logit_scale', *uni3d_pt.UNUSED_KEYS[1:5]]  # tiny's timm config has no head
  assert 'param_shapes' in info['other_entries'] and 'sparse_tensor_module_names' in info['other_entries']
  assert any('group_size=64' in a for a in info['assumed'])
  # The export of what was read, with the unused tensors passed back, is the file's module upcast.
  back = uni3d_pt.uni3d_to_torch(params, batch_stats, unused=info['unused'])
  assert list(back) == list(upcast)
  assert all(torch.equal(back[k].float(), upcast[k].float()) for k in upcast if 'num_batches' not in k)
  # DistributedDataParallel's `module.` in front of every key reads the same.
  prefixed = tmp_path / 'prefixed.pt'
  deepspeed_file(prefixed, twin, prefix='module.')
  _, params2, _, _ = uni3d_pt.read_uni3d_checkpoint(prefixed)
  np.testing.assert_array_equal(np.asarray(params2['fc_norm']['scale']), np.asarray(params['fc_norm']['scale']))
  loaded = torch.load(path, weights_only=True)  # no extra class needed (torch.Size and set are allowed)
  assert uni3d_pt.is_uni3d_container(loaded) and not openshape_pt.is_openshape_container(loaded)
  assert not uni3d_pt.is_uni3d_container({'state_dict': {'module.ppat.cls_token': torch.zeros(512)}})
  # Only {'module': ...}, or the bare state dict, read the same.
  for other in ({'module': container['module']}, container['module']):
    assert uni3d_pt.is_uni3d_container(other)
    _, params3, _, _ = uni3d_pt.read_uni3d_checkpoint(path, loaded=other)
    np.testing.assert_array_equal(np.asarray(params3['cls_pos']), np.asarray(params['cls_pos']))


def refusal(tmp_path, name: str, container) -> str:
  return conftest.refusal(tmp_path, name, container, uni3d_pt.read_uni3d_checkpoint)


def test_bad_files_are_refused_with_one_clear_message(tmp_path, small_file):
  path, _, container = small_file
  module = container['module']

  missing = dict(container, module={k: v for k, v in module.items() if 'blocks.1.mlp.fc2.bias' not in k})
  assert '1 missing tensor [point_encoder.visual.blocks.1.mlp.fc2.bias]' in refusal(tmp_path, 'missing.pt', missing)

  wrong = dict(container, module={**module, 'point_encoder.pos_embed.0.weight': torch.zeros(128, 4).half()})
  message = refusal(tmp_path, 'wrong.pt', wrong)
  assert 'mis-shaped [point_encoder.pos_embed.0.weight: got (128, 4), expected (128, 3)]' in message

  truncated = tmp_path / 'truncated.pt'
  truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(CheckpointFormatError, match=r'truncated.pt: truncated or damaged'):
    uni3d_pt.read_uni3d_checkpoint(truncated)

  code = refusal(tmp_path, 'code.pt', dict(container, ds_config=conftest.NeedsCode()))
  assert 'refused' in code and 'nothing in it was run' in code

  openshape = {'state_dict': {'module.ppat.cls_token': torch.zeros(512)}, 'epoch': 1}
  assert 'not a Uni3D checkpoint' in refusal(tmp_path, 'openshape.pt', openshape)
  other = dict(container, module={'module.conv.weight': torch.zeros(3, 3)})
  assert 'no known family' in refusal(tmp_path, 'other.pt', other)
  assert 'not a Uni3D checkpoint' in refusal(tmp_path, 'list.pt', [1, 2, 3])
  inf = dict(container, module={**module, 'point_encoder.trans2embed.bias': torch.full((1024,), 7e4).half()})
  assert 'non-finite (NaN/Inf) weights in' in refusal(tmp_path, 'inf.pt', inf)  # float16 overflows to inf
  ints = dict(container, module={**module, 'point_encoder.cls_pos': torch.zeros(1, 1, 192, dtype=torch.int32)})
  assert 'not floating point [point_encoder.cls_pos (int32)]' in refusal(tmp_path, 'ints.pt', ints)


def test_evaluate_scores_a_uni3d_file_with_the_users_class_features(tmp_path, small_file):
  """A Uni3D file (DeepSpeed's float16 model states, tiny at two blocks) scored by the evaluate command on Uni3D's
  Objaverse-LVIS list (the stored axes, xyz + rgb, 10,000 points) with the class features from the user's file, as
  EVA02-E-14-plus's text tower, which the package cannot run, would give them: top-1 and class mean equal those of
  the twin (the file's float16 weights upcast) on the same clouds; results.json names the family."""
  import json

  from cg3d_jax import evaluate
  from cg3d_jax.data import openshape_eval
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout
  from tests.conftest import run_command

  path, twin, _ = small_file
  layout = write_openshape_layout(
    tmp_path / 'openshape',
    classes=('sphere', 'box', 'torus'),
    train_per_class=1,
    lvis_per_class=2,
    num_points=10000,
    feature_dim=1024,
  )
  evalset = openshape_eval.lvis_uni3d(layout / 'lvis_testset.txt')
  table = np.random.default_rng(4).normal(size=(len(evalset.class_names), 1024)).astype(np.float32)
  np.savez(tmp_path / 'classes.npz', names=np.array(evalset.class_names), features=table)
  argv = ['--config', 'zeroshot_objaverse_lvis:uni3d', '--checkpoint', str(path), '--workdir', str(tmp_path / 'lvis')]
  argv += [f'--config.eval.manual_dir={layout}', '--config.eval.batch_size=8', '--config.eval.prompts=file']
  argv += [f'--config.eval.class_features={tmp_path / "classes.npz"}']
  assert run_command(evaluate.main, argv) == 0
  results = json.loads((tmp_path / 'lvis' / 'results.json').read_text())
  assert results['family'] == 'Uni3D (192 wide, 2 blocks)' and results['num_points'] == 10000
  assert results['prompts'] == 'file'

  points = np.stack(
    [
      openshape_eval.eval_points(*evalset.cloud(i), 10000, np.random.default_rng(0), y_up=False, use_color=True)
      for i in range(len(evalset))
    ]
  )
  features = twin_forward(copy.deepcopy(twin).half().float(), points)
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  predicted = np.argmax(features @ (table / np.linalg.norm(table, axis=1, keepdims=True)).T, axis=1)
  labels = np.asarray(evalset.labels)
  assert results['top1_acc'] == pytest.approx(100 * np.mean(predicted == labels))
  class_mean = 100 * np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)])
  assert results['class_mean_acc'] == pytest.approx(class_mean)


def test_pretraining_starts_from_a_uni3d_file_and_exports_back(tmp_path, capsys):
  """A run started from a Uni3D file (config.model.init; tiny at one block) trains a Uni3D encoder with the file's
  transformer and `trans2embed` and the config's grouping (which no weight records); its export is Uni3D's
  DeepSpeed layout by default, strict-loadable by the twin, and `--verify` matches the twin's float64 features on
  real ModelNet40 objects."""
  from cg3d_jax import checkpoints, export, train
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout
  from tests.conftest import run_command

  root = write_openshape_layout(tmp_path / 'data', train_per_class=2, lvis_per_class=1, num_points=1024, seed=2)
  twin, _ = twin_and_variables('tiny', seed=6, depth=1, embed_dim=32)
  deepspeed_file(tmp_path / 'model.pt', twin)
  workdir = tmp_path / 'run'
  argv = ['--config', 'pretrain_openshape', '--workdir', str(workdir), f'--config.data.manual_dir={root}']
  argv += [f'--config.model.init={tmp_path / "model.pt"}', '--config.model.num_points=128']
  argv += ['--config.model.uni3d.num_groups=16', '--config.model.uni3d.group_size=16']
  argv += ['--config.data.num_stored_points=512', '--config.data.openshape.workers=4', '--config.train.batch_size=8']
  argv += ['--config.train.total_steps=2', '--config.eval.every_steps=0', '--config.checkpoint.async_save=false']
  argv += ['--config.checkpoint.every_steps=1', '--config.logging.tensorboard=false']
  assert run_command(train.main, argv) == 0
  first = checkpoints.read_step(workdir, 1)
  assert first.config.model.encoder == 'uni3d' and first.config.model.embed_dim == 32
  u = first.config.model.uni3d
  assert (u.width, u.depth, u.mlp, u.num_groups) == (192, 1, 'glu', 16)

  out = tmp_path / 'export' / 'uni3d.pt'
  assert run_command(export.main, ['--checkpoint', str(workdir), '--out', str(out), '--verify']) == 0
  assert 'verify: OK' in capsys.readouterr().out
  moved = twin_uni3d.make('tiny', depth=1, embed_dim=32, num_group=16, group_size=16)
  moved.load_state_dict(torch.load(out, weights_only=True)['module'], strict=True)
  trained_projection = moved.state_dict()['point_encoder.trans2embed.weight']
  assert not torch.equal(
    trained_projection, twin.state_dict()['point_encoder.trans2embed.weight']
  )  # two steps from the file's
