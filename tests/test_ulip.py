"""ULIP's and ULIP-2's released Point-BERT encoders (weights/ulip.py): the twin has the keys and shapes ULIP's own code
gives its checkpoints (tests/fixtures/reference/ulip_state_dict_keys.tsv), the JAX encoder computes the twin's
features on real ModelNet40 clouds, a file in ULIP's layout loads, scores and converts back exactly, and bad files
are one line each."""

import argparse
import ast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cg3d_jax import trained
from cg3d_jax.errors import InputError
from cg3d_jax.models.point_transformer import PointTransformer
from cg3d_jax.twins.point_transformer import ULIPPointBERT
from cg3d_jax.weights import ulip
from tests.conftest import FIXTURES, NEAR_TIE, grouping_margin
from tests.test_point_transformer import load_objects

REFERENCE = FIXTURES / 'reference' / 'ulip_state_dict_keys.tsv'
# Real width, two blocks, fewer groups: parity at a size that compiles quickly (the real sizes are the key list's).
SMALL = dict(depth=2, num_groups=64, group_size=32)


def reference_sections() -> dict[str, dict[str, tuple]]:
  sections, current = {}, None
  for line in REFERENCE.read_text().splitlines():
    if line.startswith('# ulip'):
      current = sections.setdefault(line[2:].split()[0], {})
    elif current is not None and line.strip() and not line.startswith('#'):
      key, shape, dtype = line.split('\t')
      current[key] = (tuple(ast.literal_eval(shape)), dtype)
  return sections


def twin_keys(twin: torch.nn.Module) -> dict[str, tuple]:
  return {k: (tuple(v.shape), str(v.dtype)) for k, v in twin.state_dict().items()}


def test_the_twin_has_the_keys_shapes_and_order_of_ulips_released_files():
  """The reference was listed from ULIP's own modules (commit f194ddb) at both releases' configs."""
  sections = reference_sections()
  assert set(sections) == {'ulip', 'ulip2'}
  released = {'ulip': dict(depth=12, embed_dim=512), 'ulip2': dict(depth=18, embed_dim=1280, in_channels=6)}
  for name, sizes in released.items():
    got = twin_keys(ULIPPointBERT(**sizes))
    assert list(got) == list(sections[name]), name
    assert got == sections[name], name
    names = [e.torch_key for e in ulip.entries(sizes['depth'])]
    assert names == list(got), name  # the name map walks the state dict in its own order


@pytest.fixture(scope='module')
def points() -> np.ndarray:
  clouds = load_objects(FIXTURES, num_points=1024)
  for cloud in clouds:
    assert grouping_margin(cloud, [(SMALL['num_groups'], SMALL['group_size'])]) > NEAR_TIE
  return clouds


def _ulip_file(tmp_path, twin: ULIPPointBERT, *, extra=None, name='ulip.pt') -> tuple:
  """A checkpoint in ULIP main.py's layout around the twin's weights (module.-prefixed, args, optimizer state)."""
  state = {'module.' + k: v for k, v in twin.state_dict().items()}
  state.update(extra or {})
  path = tmp_path / name
  container = {
    'epoch': 7,
    'state_dict': state,
    'optimizer': {'state': {}, 'param_groups': [{'lr': 3e-3, 'params': [0, 1]}]},
    'scaler': {},
    'best_acc1': 61.5,
    'args': argparse.Namespace(model='ULIP_PointBERT', npoints=8192),
  }
  torch.save(container, path)
  return path, state


def _randomised_twin(seed: int, **sizes) -> ULIPPointBERT:
  torch.manual_seed(seed)
  twin = ULIPPointBERT(**sizes, drop_path_rate=0.0).eval()
  with torch.no_grad():
    twin.point_encoder.cls_token.normal_(0, 0.02)
    for module in twin.modules():
      if isinstance(module, torch.nn.BatchNorm1d):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
  return twin


@pytest.mark.parametrize('in_channels', [3, 6])
def test_features_equal_the_twin_on_real_clouds_in_float64_and_float32(tmp_path, points, in_channels):
  """ULIP-1 (xyz) and ULIP-2 (xyz + rgb): read from a file in ULIP's layout, the JAX encoder gives the twin's
  `encode_pc` (pooled feature @ pc_projection) within 1e-9 in float64 and 1e-4 in float32."""
  embed = 512 if in_channels == 3 else 1280
  twin = _randomised_twin(in_channels, **SMALL, embed_dim=embed, in_channels=in_channels)
  path, _ = _ulip_file(tmp_path, twin)
  clouds = points
  if in_channels == 6:
    rgb = np.random.default_rng(5).uniform(0, 1, points.shape[:2] + (3,)).astype(np.float32)
    clouds = np.concatenate([points, rgb], axis=-1)
  loaded = trained.load_trained(path)
  model = loaded.encoder.clone(num_groups=SMALL['num_groups'], drop_path_rate=0.0)  # the file does not record it
  assert (model.num_heads, model.in_channels, model.embed_dim, model.projection_bias) == (6, in_channels, embed, False)
  with torch.no_grad():
    want64 = twin.double()(torch.from_numpy(clouds.astype(np.float64))).numpy()
    want32 = twin.float()(torch.from_numpy(clouds)).numpy()
  got32 = np.asarray(model.apply(loaded.encoder_vars, clouds, train=False))
  np.testing.assert_allclose(got32, want32, atol=1e-4, rtol=0)
  _, state = _ulip_file(tmp_path, twin.double(), name='ulip64.pt')
  with jax.enable_x64(True):
    params, stats = _float64_variables(model, {k[len('module.') :]: v for k, v in state.items()})
    got64 = np.asarray(
      model.clone(dtype=jnp.float64).apply(
        {'params': params, 'batch_stats': stats}, clouds.astype(np.float64), train=False
      )
    )
  assert np.max(np.abs(got64 - want64)) <= 1e-9


def _float64_variables(model: PointTransformer, state: dict):
  """The state dict's float64 values in the Flax layout (ulip.from_torch converts to float32, the commands' dtype)."""
  from cg3d_jax.trees import stack_layers, unflatten
  from cg3d_jax.weights import torch_io

  flat: dict = {}
  for entry in ulip.entries(model.depth):
    if entry.collection:
      value = state[entry.torch_key].detach().numpy().astype(np.float64)
      flat.setdefault(entry.collection, {})[entry.flax_path] = torch_io._to_flax_layout(entry.kind, value)
  return stack_layers(unflatten(flat['params'])), unflatten(flat['batch_stats'])


def test_a_released_file_converts_back_to_the_same_state_dict_bitwise(tmp_path):
  twin = _randomised_twin(3, **SMALL, embed_dim=512)
  path, state = _ulip_file(tmp_path, twin, extra={'module.logit_scale': torch.tensor(2.6)})
  loaded = trained.load_trained(path)
  back = ulip.to_torch(loaded.encoder_vars['params'], loaded.encoder_vars['batch_stats'])
  original = twin.state_dict()
  assert list(back) == list(original)
  for key, value in original.items():
    assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
  strict = ULIPPointBERT(**SMALL, embed_dim=512)
  strict.load_state_dict(back, strict=True)
  assert loaded.config.family == 'ULIP (Point-BERT)' and loaded.step == 7 and loaded.metrics == {'best_acc1': 61.5}
  assert loaded.num_points == 8192 and loaded.config.clip.path is None  # no SLIP towers in this file


def test_bad_ulip_files_are_one_line_each(tmp_path):
  twin = _randomised_twin(0, **SMALL, embed_dim=512)
  good, state = _ulip_file(tmp_path, twin)
  missing = dict(state)
  del missing['module.point_encoder.blocks.blocks.1.mlp.fc2.weight']
  torch.save({'state_dict': missing, 'args': argparse.Namespace()}, tmp_path / 'missing.pt')
  wrong = dict(state, **{'module.pc_projection': torch.zeros(768, 300)})
  wrong['module.point_encoder.reduce_dim.weight'] = torch.zeros(384, 128)
  torch.save({'state_dict': wrong}, tmp_path / 'wrong.pt')
  (tmp_path / 'truncated.pt').write_bytes(good.read_bytes()[:5000])

  class Code:
    def __reduce__(self):
      return (print, ('ran',))

  torch.save({'state_dict': state, 'args': Code()}, tmp_path / 'code.pt')
  cases = {
    'missing.pt': r'missing keys \[point_encoder\.blocks\.blocks\.1\.mlp\.fc2\.weight\]',
    'wrong.pt': r'point_encoder\.reduce_dim\.weight: got \(384, 128\), expected \(384, 256\)',
    'truncated.pt': r'truncated\.pt: ',
    'code.pt': r'code\.pt: .*(refus|not allowed|unsafe|Unsupported)',
  }
  for name, message in cases.items():
    with pytest.raises(InputError, match=message) as caught:
      trained.load_trained(tmp_path / name)
    assert '\n' not in str(caught.value), (name, str(caught.value))


def test_a_ulip_file_with_its_slip_towers_is_its_own_clip(tmp_path, points):
  """ULIP-1's files hold the SLIP towers its points align to: the file scores by itself (with_clip reads the towers
  from it, the point side aside), equal to the same towers read from a SLIP file, in the projection's 512-wide space
  of this test's size (32 here)."""
  from cg3d_jax.clip.loaded_clip import load_clip
  from cg3d_jax.synthetic import random_clip

  towers = random_clip.slip_state_dict(seed=4, embed_dim=32)
  slip_path = random_clip.write_slip_checkpoint(tmp_path / 'slip.pt', towers)
  twin = _randomised_twin(1, **SMALL, embed_dim=32)
  path, _ = _ulip_file(tmp_path, twin, extra={'module.' + k: torch.as_tensor(v) for k, v in towers.items()})
  loaded = trained.load_trained(path)
  assert loaded.config.clip.path == str(path)
  scoring = trained.with_clip(loaded)
  assert scoring.clip.kind == 'slip' and scoring.clip.spec.projection_dim == 32
  alone = load_clip(slip_path, prompt_mode='none', num_prompts=0)
  for a, b in zip(jax.tree.leaves(scoring.clip.params), jax.tree.leaves(alone.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('colored', [False, True])
def test_features_equal_ulips_own_code_on_real_clouds(tmp_path, points, colored):
  """ULIP's own PointTransformer / PointTransformer_Colored (tests/ulip_reference: its files byte for byte, only the
  CUDA FPS stood in for by the CUDA rules) with random weights, real width, two blocks: saved in ULIP's layout and
  read by load_trained, the JAX encoder gives ULIP's `encode_pc` within 1e-9 in float64. (At the real sizes, 12
  blocks over 8,192 xyz points and 18 over 10,000 coloured ones, the difference measured 7e-15 on 2026-12-07.)"""
  import types

  from tests import ulip_reference

  plain, coloured = ulip_reference.encoders()
  torch.manual_seed(11)
  settings = types.SimpleNamespace(
    trans_dim=384, depth=2, drop_path_rate=0.1, cls_dim=40, num_heads=6, group_size=32, num_group=64, encoder_dims=256
  )
  encoder = (coloured if colored else plain)(settings, args=types.SimpleNamespace(evaluate_3d=True)).double().eval()
  with torch.no_grad():
    for module in encoder.modules():
      if isinstance(module, torch.nn.BatchNorm1d):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
  embed = 1280 if colored else 512
  projection = torch.randn(768, embed, dtype=torch.float64) * embed**-0.5
  clouds = points.astype(np.float64)
  if colored:
    clouds = np.concatenate([clouds, np.random.default_rng(5).uniform(0, 1, clouds.shape)], axis=-1)
  with torch.no_grad():
    want = (encoder(torch.from_numpy(clouds)) @ projection).numpy()
  state = {'pc_projection': projection, **{'point_encoder.' + k: v for k, v in encoder.state_dict().items()}}
  torch.save({'state_dict': {'module.' + k: v for k, v in state.items()}}, tmp_path / 'ulip.pt')
  model = trained.load_trained(tmp_path / 'ulip.pt').encoder.clone(num_groups=64, dtype=jnp.float64)
  with jax.enable_x64(True):
    params, stats = _float64_variables(model, state)
    got = np.asarray(model.apply({'params': params, 'batch_stats': stats}, clouds, train=False))
  assert np.max(np.abs(got - want)) <= 1e-9


def test_evaluate_scores_a_ulip2_file_on_lvis_with_openshapes_bigg_features(tmp_path):
  """A ULIP-2 file (xyz + rgb, 1280 wide: OpenCLIP ViT-bigG-14's space, the space of OpenShape's precomputed class
  features) scored on a procedural Objaverse-LVIS in OpenShape's layout by the evaluate command with the config's
  protocol (--config.eval.protocol=config: its published one needs bigG's text tower), no CLIP loaded: top-1 and
  class mean equal those of the twin's features on the same clouds (OpenShape's preparation), and
  results.json names the family and its 10,000 points. Fewer stored points than that is one line naming the
  setting."""
  import json

  from cg3d_jax import evaluate
  from cg3d_jax.data import openshape_eval
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout
  from tests.conftest import run_command

  classes = ('sphere', 'box', 'torus')
  layout = write_openshape_layout(
    tmp_path / 'openshape', classes=classes, train_per_class=1, lvis_per_class=2, num_points=10000, feature_dim=1280
  )
  twin = _randomised_twin(2, depth=2, embed_dim=1280, in_channels=6)  # ULIP's 512 groups of 32
  path, _ = _ulip_file(tmp_path, twin)
  argv = ['--config', 'zeroshot_objaverse_lvis', '--checkpoint', str(path), f'--config.eval.manual_dir={layout}']
  # ULIP-2's published protocol prompts its CLIP (bigG), which is not given: one line; the config's own protocol
  # (the layout's precomputed features, OpenShape's axes) scores it.
  assert run_command(evaluate.main, [*argv, '--workdir', str(tmp_path / 'no_clip')]) == 2
  argv += ['--config.eval.protocol=config']
  assert run_command(evaluate.main, [*argv, '--workdir', str(tmp_path / 'lvis'), '--config.eval.batch_size=8']) == 0
  results = json.loads((tmp_path / 'lvis' / 'results.json').read_text())
  assert results['family'] == 'ULIP-2 (Point-BERT)' and results['num_points'] == 10000
  assert results['published_protocol'] is None and results['class_features'] == 'the layout'

  evalset = openshape_eval.lvis_openshape(layout)
  clouds = np.stack(
    [
      openshape_eval.eval_points(*evalset.cloud(i), 10000, np.random.default_rng(0), y_up=True, use_color=True)
      for i in range(len(evalset))
    ]
  )
  with torch.no_grad():
    features = twin(torch.from_numpy(clouds)).numpy()
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  table = evalset.class_features / np.linalg.norm(evalset.class_features, axis=1, keepdims=True)
  predicted = np.argmax(features @ table.T, axis=1)
  labels = np.asarray(evalset.labels)
  top1 = 100 * np.mean(predicted == labels)
  class_mean = 100 * np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)])
  assert results['top1_acc'] == pytest.approx(top1) and results['class_mean_acc'] == pytest.approx(class_mean), results

  code = run_command(evaluate.main, [*argv, '--workdir', str(tmp_path / 'few'), '--config.eval.num_stored_points=2048'])
  assert code == 2 and not (tmp_path / 'few').exists()


def test_pretraining_starts_from_a_ulip2_file_learns_and_exports_back(tmp_path):
  """OpenShape's stored-feature recipe started from a random-weight ULIP-2 file (config.model.init): the run takes
  the file's architecture (bias-free projection, 64 wide, one block) over the config's, with the config's grouping
  (which the file does not record), learns on procedural OpenShape-layout objects, and its encoder exports back to
  ULIP's layout, strict-loadable by the twin, whose features it then computes."""
  import json

  from cg3d_jax import checkpoints, train
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout
  from tests.conftest import run_command

  root = write_openshape_layout(tmp_path / 'data', train_per_class=4, lvis_per_class=1, num_points=1024, seed=1)
  twin = _randomised_twin(9, width=64, depth=1, encoder_dim=64, embed_dim=32, in_channels=6)
  path, state = _ulip_file(tmp_path, twin)
  workdir = tmp_path / 'run'
  argv = ['--config', 'pretrain_openshape', '--workdir', str(workdir), f'--config.data.manual_dir={root}']
  argv += [f'--config.model.init={path}', '--config.model.num_points=128', '--config.data.num_stored_points=512']
  argv += ['--config.model.point_transformer.num_groups=16', '--config.model.point_transformer.group_size=16']
  argv += ['--config.data.openshape.workers=4', '--config.train.batch_size=16', '--config.train.total_steps=24']
  argv += ['--config.train.log_every=12', '--config.train.encoder_optim.lr=0.002', '--config.eval.every_steps=0']
  argv += ['--config.train.encoder_optim.warmup_epochs=0', '--config.checkpoint.async_save=false']
  argv += ['--config.checkpoint.every_steps=12', '--config.logging.tensorboard=false']
  assert run_command(train.main, argv) == 0
  log = [json.loads(line) for line in (workdir / 'train.jsonl').read_text().splitlines()]
  assert log[-1]['loss'] < log[0]['loss']
  saved = checkpoints.read_step(workdir)
  pt = saved.config.model.point_transformer
  assert (pt.width, pt.depth, pt.num_heads, pt.num_groups, pt.encoder_dim, pt.projection_bias) == (
    64,
    1,
    1,
    16,
    64,
    False,
  )
  assert saved.config.model.embed_dim == 32 and saved.config.model.in_channels == 6

  params, stats = saved.state['params']['encoder'], saved.state['batch_stats']
  back = ulip.to_torch(params, stats)
  moved = ULIPPointBERT(width=64, depth=1, num_heads=1, encoder_dim=64, embed_dim=32, in_channels=6)
  moved.load_state_dict(back, strict=True)
  assert not torch.equal(back['pc_projection'], state['module.pc_projection'])  # trained from the file's values
  moved.point_encoder.num_groups, moved.point_encoder.group_size = 16, 16
  clouds = np.random.default_rng(3).uniform(-1, 1, (2, 128, 6)).astype(np.float32)
  with torch.no_grad():
    want = moved.eval()(torch.from_numpy(clouds)).numpy()
  model = trained.load_trained(workdir).encoder
  got = np.asarray(model.apply({'params': params, 'batch_stats': stats}, clouds, train=False))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  # The export command writes ULIP's own layout and verifies it in the twin (float64, four real ModelNet40 objects).
  from cg3d_jax import export

  out = tmp_path / 'export' / 'ulip2_cg3d.pt'
  assert (
    run_command(export.main, ['--checkpoint', str(workdir), '--out', str(out), '--format', 'ulip', '--verify']) == 0
  )
  again = trained.load_trained(out)
  for a, b in zip(jax.tree.leaves(again.encoder_vars), jax.tree.leaves({'params': params, 'batch_stats': stats})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert torch.load(out, weights_only=False)['args'].model == 'ULIP2_PointBERT_Colored'


def test_the_first_state_holds_the_files_weights(tmp_path):
  """config.model.init puts the file's variables, converted by ulip.from_torch, into step 0's state unchanged."""
  from cg3d_jax.configs import pretrain_openshape
  from cg3d_jax.training.recipes import stored_features

  twin = _randomised_twin(4, width=64, depth=1, encoder_dim=64, embed_dim=32, in_channels=6)
  path, state = _ulip_file(tmp_path, twin)
  config = pretrain_openshape.get_config()
  config.model.init, config.model.num_points = str(path), 128
  config.model.point_transformer.update(num_groups=16, group_size=16)
  setup = stored_features.build_features_setup(config, feature_dim=32, steps_per_epoch=4, devices=jax.devices()[:1])
  _, params, stats, _ = ulip.from_torch(path, {k[len('module.') :]: v for k, v in state.items()})
  assert jax.tree.structure(setup.state['params']['encoder']) == jax.tree.structure(params)
  for got, want in zip(
    jax.tree.leaves((setup.state['params']['encoder'], setup.state['batch_stats'])), jax.tree.leaves((params, stats))
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_export_as_ulip_refuses_an_encoder_with_cg3ds_projection(tmp_path, capsys, tiny_checkpoint):
  from cg3d_jax import export
  from tests.conftest import run_command

  out = tmp_path / 'x.pt'
  code = run_command(export.main, ['--checkpoint', str(tiny_checkpoint), '--out', str(out), '--format', 'ulip'])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert code == 2 and len(err) == 1 and "not a Point-BERT with ULIP's bias-free projection" in err[0], err
  assert not out.exists()


def test_evaluate_scores_a_ulip_file_on_modelnet40_through_its_own_slip_towers(tmp_path, modelnet40_prepared):
  """The model zoo's ULIP-1 command on the real fixture objects: `evaluate --config zeroshot_modelnet40:ulip` with a
  ULIP file that holds its SLIP towers (random weights, this test's small sizes) and no --config.clip.path: the file
  is its own CLIP; ULIP's 8,192 points and 64 templates; results.json names the family and the file as the CLIP."""
  import json

  from cg3d_jax import evaluate
  from cg3d_jax.synthetic import random_clip
  from tests.conftest import run_command

  towers = random_clip.slip_state_dict(seed=6, embed_dim=32)
  twin = _randomised_twin(6, **SMALL, embed_dim=32)
  path, _ = _ulip_file(tmp_path, twin, extra={'module.' + k: torch.as_tensor(v) for k, v in towers.items()})
  argv = ['--config', 'zeroshot_modelnet40:ulip', '--checkpoint', str(path), '--workdir', str(tmp_path / 'mn40')]
  argv += [f'--config.eval.data_dir={modelnet40_prepared}', '--config.eval.batch_size=8']
  assert run_command(evaluate.main, argv) == 0
  results = json.loads((tmp_path / 'mn40' / 'results.json').read_text())
  assert results['family'] == 'ULIP (Point-BERT, 32-dimensional projection)' and results['num_points'] == 8192
  assert results['clip'] == {'kind': 'slip', 'path': str(path)} and results['templates'] == 'ulip'
  assert results['num_objects'] > 0


def test_ulip_at_its_released_size_equals_ulips_own_code(tmp_path):
  """ULIP-1 as released: 12 blocks, 512 groups of 32 over 8,192 points of a real ModelNet40 airplane, ULIP's own
  PointTransformer against the JAX encoder read from a file in ULIP's layout, float64 (measured 7e-15)."""
  import types

  from tests import ulip_reference
  from tests.conftest import modelnet_root

  plain, _ = ulip_reference.encoders()
  torch.manual_seed(12)
  settings = types.SimpleNamespace(
    trans_dim=384, depth=12, drop_path_rate=0.1, cls_dim=40, num_heads=6, group_size=32, num_group=512, encoder_dims=256
  )
  encoder = plain(settings, args=types.SimpleNamespace(evaluate_3d=True)).double().eval()
  with torch.no_grad():
    for module in encoder.modules():
      if isinstance(module, torch.nn.BatchNorm1d):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
  projection = torch.randn(768, 512, dtype=torch.float64) * 512**-0.5
  xyz = np.loadtxt(modelnet_root() / 'airplane' / 'airplane_0628.txt', delimiter=',')[:8192, :3]
  xyz = xyz - xyz.mean(0)
  cloud = (xyz / np.max(np.linalg.norm(xyz, axis=1)))[None]
  with torch.no_grad():
    want = (encoder(torch.from_numpy(cloud)) @ projection).numpy()
  state = {'pc_projection': projection, **{'point_encoder.' + k: v for k, v in encoder.state_dict().items()}}
  torch.save({'state_dict': {'module.' + k: v for k, v in state.items()}}, tmp_path / 'ulip.pt')
  loaded = trained.load_trained(tmp_path / 'ulip.pt')
  assert loaded.config.family == 'ULIP (Point-BERT)' and loaded.encoder.depth == 12
  model = loaded.encoder.clone(dtype=jnp.float64)
  with jax.enable_x64(True):
    params, stats = _float64_variables(model, state)
    got = np.asarray(model.apply({'params': params, 'batch_stats': stats}, cloud, train=False))
  assert np.max(np.abs(got - want)) <= 1e-9


def test_a_coloured_starting_file_on_xyz_only_data_is_one_line(tmp_path, capsys, tiny_clip_dir, tiny_shapenet):
  """The file's encoder is adopted before the data is opened: a ULIP-2 file (xyz + rgb) as the start of CG3D's
  image-tower recipe on the TFDS ShapeNet-55 (xyz only) is one line naming the file, before any model is built."""
  from cg3d_jax import train
  from tests.conftest import REPO_ROOT, run_command

  twin = _randomised_twin(4, width=64, depth=1, encoder_dim=64, embed_dim=32, in_channels=6)
  path, _ = _ulip_file(tmp_path, twin)
  manual, data = tiny_shapenet
  argv = ['--config', str(REPO_ROOT / 'tests' / 'configs' / 'tiny_test.py'), f'--config.clip.path={tiny_clip_dir}']
  argv += [f'--config.data.manual_dir={manual}', f'--config.data.data_dir={data}', f'--config.model.init={path}']
  assert run_command(train.main, [*argv, '--workdir', str(tmp_path / 'run')]) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and f'config.model.in_channels=6 (the encoder of config.model.init={str(path)!r})' in err[0]
  assert "coloured encoders train on OpenShape's layout" in err[0]
