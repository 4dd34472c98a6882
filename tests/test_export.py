"""Export to the original CG3D PyTorch container and import of original checkpoints.

Checked against things outside the code under test: the PyTorch twins (the original modules and names) loading with
strict=True and giving the JAX features on real ModelNet40 objects, the reference list of the original state-dict
keys, the tiny training checkpoint's own variables (bitwise round trips), and torch.load / safetensors themselves.
"""

import ast
import collections
import contextlib
import io
import json
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cg3d_jax import export, trees
from cg3d_jax.configs import base as base_config
from cg3d_jax.errors import BadInputError
from cg3d_jax.models.point_transformer import PointTransformer
from cg3d_jax.models.pointmlp import PointMLP
from cg3d_jax.trained import load_trained
from cg3d_jax.twins import verify
from cg3d_jax.twins.point_transformer import PointTransformerProject
from cg3d_jax.twins.pointmlp import PointMLPProject
from cg3d_jax.weights import cg3d_pth as ckpt
from tests.conftest import FIXTURES, modelnet_root, run_command

OBJECTS = ('airplane/airplane_0001', 'airplane/airplane_0627', 'bathtub/bathtub_0107', 'bathtub/bathtub_0111')


def tsv_section(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """{key: (shape, dtype)} of one model's section of the reference list, in its order."""
  out, inside = {}, False
  for line in (FIXTURES / 'reference' / 'cg3d_torch_state_dict_keys.tsv').read_text().splitlines():
    if line.startswith('# '):
      word = line.split()[1]
      inside = word == name if word in ('pointtransformer', 'pointmlp') else inside
    elif inside and line.strip():
      key, shape, dtype = line.split('\t')
      out[key] = (tuple(ast.literal_eval(shape)), dtype)
  return out


def modelnet_clouds(num_points: int) -> np.ndarray:
  """Real ModelNet40 objects, centred and scaled to the unit sphere, first `num_points` points (no FPS needed)."""
  clouds = []
  for name in OBJECTS:
    xyz = np.loadtxt(modelnet_root() / f'{name}.txt', delimiter=',')[:, :3]
    xyz = xyz - xyz.mean(0)
    clouds.append(xyz / np.linalg.norm(xyz, axis=1).max())
  rng = np.random.default_rng(0)
  return np.stack([c[rng.choice(len(c), num_points, replace=False)] for c in clouds]).astype(np.float32)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def random_like(shapes, seed: int):
  """Random float32 values for a tree of ShapeDtypeStructs; positive where a BatchNorm variance goes."""
  rng = np.random.default_rng(seed)
  return jax.tree.map_with_path(
    lambda path, s: (rng.uniform(0.5, 2.0, s.shape) if path[-1].key == 'var' else rng.normal(0, 0.1, s.shape)).astype(
      np.float32
    ),
    shapes,
  )


def tiny_twin(config) -> PointTransformerProject:
  pt = config.model.point_transformer
  return PointTransformerProject(
    width=pt.width,
    depth=pt.depth,
    num_heads=pt.num_heads,
    mlp_ratio=pt.mlp_ratio,
    num_groups=pt.num_groups,
    group_size=pt.group_size,
    encoder_dim=pt.encoder_dim,
    embed_dim=config.model.embed_dim,
    num_classes=config.model.num_classes,
  )


@pytest.fixture(scope='module')
def trained(tiny_checkpoint):
  return load_trained(tiny_checkpoint)


@pytest.fixture(scope='module')
def exported(tiny_checkpoint, tmp_path_factory):
  """The command itself, run once in this process (its cold `python -m` is the demo's, tests/test_standalone.py):
  export the tiny checkpoint with --verify on the real ModelNet40 fixtures."""
  out = tmp_path_factory.mktemp('export') / 'model.pth'
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    code = run_command(export.main, [f'--checkpoint={tiny_checkpoint}', f'--out={out}', '--verify'])
  return out, subprocess.CompletedProcess([], code, stdout.getvalue(), stderr.getvalue())


def test_export_command_verifies_and_loads_strictly(exported, trained):
  out, result = exported
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'loads into the PyTorch twin with strict=True' in result.stdout
  assert 'verify: OK' in result.stdout
  diff = float(re.search(r'of 4 clouds \(.*\), both in float64: (\S+) ', result.stdout).group(1))
  assert diff <= 1e-9  # float64 on both sides

  container = torch.load(out, weights_only=True)
  assert set(container) == {
    'base_model',
    'visual_clip_model',
    'epoch',
    'metrics',
    'best_metrics',
    'step',
    'encoder',
    'config',
  }
  assert (container['epoch'], container['step'], container['encoder']) == (-1, 4, 'point_transformer')
  assert container['config'] == json.loads(trained.config.to_json())  # the run's config as plain values
  base = container['base_model']
  assert base['cls_head_finetune.3.weight'].shape == (55, 256)  # the 55-class pre-training head is there
  assert int(base['encoder.first_conv.1.num_batches_tracked']) == 4  # joint mode: the encoder updated every step
  # Deep prompts of the one-layer tiny CLIP: layer 0 and an empty (layers - 1) block, as the original shapes them.
  visual = container['visual_clip_model']
  assert set(visual) == {'prompt_embeddings', 'deep_prompt_embeddings'}
  assert visual['prompt_embeddings'].shape == (1, 5, 32) and visual['deep_prompt_embeddings'].shape == (0, 5, 32)
  np.testing.assert_array_equal(visual['prompt_embeddings'].numpy(), trained.prompts[:1])

  # The twin takes the file strictly, and on real objects gives the JAX encoder's features.
  twin = tiny_twin(trained.config)
  twin.load_state_dict(base, strict=True)
  clouds = modelnet_clouds(trained.config.model.num_points)
  with torch.no_grad():
    want = twin.eval().double()(torch.from_numpy(clouds.astype(np.float64))).numpy()
  with jax.enable_x64(True):  # float64 on both sides: no grouping near-tie can go two ways (see compare_features)
    model = trained.encoder.clone(dtype=jnp.float64)
    got = np.asarray(
      model.apply(
        jax.tree.map(lambda x: np.asarray(x, np.float64), trained.encoder_vars), clouds.astype(np.float64), train=False
      )
    )
  assert got.shape == (4, 32) and np.abs(want).max() > 0.05
  np.testing.assert_allclose(got, want, atol=1e-9, rtol=0)


def test_export_import_round_trip_is_bitwise(exported, trained, tmp_path):
  out, _ = exported
  encoder, params, batch_stats, prompts, info = ckpt.load_cg3d_checkpoint(out)
  assert encoder == 'point_transformer'
  assert_trees_equal(params, jax.tree.map(np.asarray, trained.encoder_vars['params']))
  assert_trees_equal(batch_stats, jax.tree.map(np.asarray, trained.encoder_vars['batch_stats']))
  np.testing.assert_array_equal(prompts, trained.prompts)
  assert (info['prompt_mode'], info['step'], info['epoch'], info['assumed']) == ('deep', 4, -1, [])
  assert info['model'].num_heads == trained.config.model.point_transformer.num_heads  # built from the saved config

  # safetensors: the same tensors under flat names, the rest in the JSON sidecar, and the same round trip.
  container = ckpt.build_container(
    'point_transformer',
    trained.encoder_vars['params'],
    trained.encoder_vars['batch_stats'],
    prompts=trained.prompts,
    prompt_mode='deep',
    step=trained.step,
    config=trained.config.to_dict(),
    num_batches_tracked=4,
  )
  path, sidecar = ckpt.write_safetensors_checkpoint(tmp_path / 'model.safetensors', container)
  flat = load_file(str(path))
  reference = torch.load(out, weights_only=True)
  assert set(flat) == (
    {f'base_model.{k}' for k in reference['base_model']}
    | {f'visual_clip_model.{k}' for k in reference['visual_clip_model']}
  )
  for key, value in reference['base_model'].items():
    assert torch.equal(flat[f'base_model.{key}'], value), key
  assert json.loads(sidecar.read_text())['config'] == reference['config']
  encoder, params_st, stats_st, prompts_st, info_st = ckpt.load_cg3d_checkpoint(path)
  assert (encoder, info_st['format'], info_st['step']) == ('point_transformer', 'safetensors', 4)
  assert_trees_equal(params_st, params)
  assert_trees_equal(stats_st, batch_stats)
  np.testing.assert_array_equal(prompts_st, prompts)


def test_real_config_keys_match_the_original_and_round_trip(tmp_path):
  config = base_config.get_config()
  model = PointTransformer.from_config(config.model)
  shapes = jax.eval_shape(
    lambda p: model.init(jax.random.key(0), p, train=False), jax.ShapeDtypeStruct((1, 1024, 3), jnp.float32)
  )
  variables = random_like(shapes, seed=0)
  prompts = np.random.default_rng(1).uniform(-0.1, 0.1, (12, 5, 768)).astype(np.float32)
  container = ckpt.build_container(
    'point_transformer',
    variables['params'],
    variables['batch_stats'],
    prompts=prompts,
    prompt_mode='deep',
    step=1000,
    epoch=3,
    config=config.to_dict(),
    metrics={'acc': np.float32(41.5)},
  )
  path = ckpt.write_cg3d_checkpoint(tmp_path / 'real.pth', container)
  loaded = torch.load(path, weights_only=True)
  reference = tsv_section('pointtransformer')
  assert len(reference) == 166
  assert {k: (tuple(v.shape), str(v.dtype)) for k, v in loaded['base_model'].items()} == reference
  assert list(loaded['base_model']) == list(reference)  # the original's order too
  assert loaded['visual_clip_model']['deep_prompt_embeddings'].shape == (11, 5, 768)
  assert (loaded['epoch'], loaded['metrics'], loaded['best_metrics']) == (3, {'acc': 41.5}, {'acc': 41.5})
  PointTransformerProject().load_state_dict(loaded['base_model'], strict=True)

  _, params, batch_stats, back_prompts, _ = ckpt.load_cg3d_checkpoint(path)
  assert_trees_equal(params, variables['params'])
  assert_trees_equal(batch_stats, variables['batch_stats'])
  np.testing.assert_array_equal(back_prompts, prompts)

  # Without the saved config (as in an original file) the sizes come from the weights, CG3D's heads assumed.
  del loaded['config']
  torch.save(loaded, tmp_path / 'no_config.pth')
  _, params, _, _, info = ckpt.load_cg3d_checkpoint(tmp_path / 'no_config.pth')
  assert_trees_equal(params, variables['params'])
  assert (info['model'].num_heads, info['model'].depth, info['model'].num_classes) == (6, 12, 55)
  assert 'num_heads=6' in info['assumed'][0]

  # PointMLP at the real config: the same key list as the original's ModelProject.
  mlp_shapes = jax.eval_shape(
    lambda p: PointMLP().init(jax.random.key(0), p, train=False), jax.ShapeDtypeStruct((1, 1024, 3), jnp.float32)
  )
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), mlp_shapes)
  mlp = ckpt.build_container('pointmlp', zeros['params'], zeros['batch_stats'])
  assert {k: (tuple(v.shape), str(v.dtype)) for k, v in mlp['base_model'].items()} == tsv_section('pointmlp')
  assert 'visual_clip_model' not in mlp


def test_original_checkpoint_layout_is_imported(tmp_path, highest_precision):
  """A file as the original code saves it: DataParallel names, full visual state dict, optimizer, plain metrics."""
  torch.manual_seed(0)
  twin = PointTransformerProject(
    width=32, depth=2, num_heads=2, num_groups=16, group_size=8, encoder_dim=32, embed_dim=32
  ).eval()
  with torch.no_grad():
    for name, buf in twin.named_buffers():
      if name.endswith('running_mean'):
        buf.normal_(0, 0.1)
      elif name.endswith('running_var'):
        buf.uniform_(0.5, 2.0)
  deep = torch.randn(11, 5, 768)
  visual = collections.OrderedDict(
    [
      ('cls_token', torch.zeros(1, 1, 768)),
      ('prompt_embeddings', torch.randn(1, 5, 768)),
      ('deep_prompt_embeddings', deep),
      ('blocks.0.attn.qkv.weight', torch.zeros(8, 4)),
    ]
  )
  optimizer = torch.optim.AdamW(twin.parameters())
  torch.save(
    {
      'base_model': collections.OrderedDict((f'module.{k}', v) for k, v in twin.state_dict().items()),
      'visual_clip_model': visual,
      'optimizer': optimizer.state_dict(),
      'epoch': 7,
      'metrics': {'acc': 48.7},
      'best_metrics': {'acc': 49.0},
    },
    tmp_path / 'ckpt-best.pth',
  )

  model = PointTransformer(
    width=32,
    depth=2,
    num_heads=2,
    num_groups=16,
    group_size=8,
    encoder_dim=32,
    embed_dim=32,
    num_classes=55,
    drop_path_rate=0.0,
  )
  encoder, params, batch_stats, prompts, info = ckpt.load_cg3d_checkpoint(tmp_path / 'ckpt-best.pth', model)
  assert encoder == 'point_transformer'
  assert (info['epoch'], info['metrics'], info['best_metrics']) == (7, {'acc': 48.7}, {'acc': 49.0})
  assert info['ignored_visual_keys'] == ['blocks.0.attn.qkv.weight', 'cls_token']
  np.testing.assert_array_equal(prompts[1:], deep.numpy())
  np.testing.assert_array_equal(params['reduce_dim']['kernel'], twin.reduce_dim.weight.detach().numpy().T)
  np.testing.assert_array_equal(
    batch_stats['encoder']['first_bn']['var'], twin.encoder.first_conv[1].running_var.numpy()
  )
  diff, got, _ = verify.compare_features(
    twin, model, {'params': params, 'batch_stats': batch_stats}, modelnet_clouds(64)
  )
  assert diff <= 1e-9 and np.abs(got).max() > 0.05


class _CreatesAFile:
  """A pickle payload: unpickling it would call open(marker, 'w')."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_unsafe_and_broken_files_are_refused(exported, tmp_path):
  out, _ = exported
  marker = tmp_path / 'pwned'
  torch.save({'base_model': {'cls_token': torch.zeros(1)}, 'epoch': _CreatesAFile(marker)}, tmp_path / 'evil.pth')
  assert not marker.exists()
  with pytest.raises(ckpt.CheckpointFormatError, match=r'evil\.pth: refused: .*pickled objects.*open'):
    ckpt.load_cg3d_checkpoint(tmp_path / 'evil.pth')
  assert not marker.exists()  # the payload never ran

  (tmp_path / 'notes.pth').write_text('these are my notes, not a model\n')
  with pytest.raises(ckpt.CheckpointFormatError, match=r'notes\.pth: not a PyTorch checkpoint'):
    ckpt.load_cg3d_checkpoint(tmp_path / 'notes.pth')
  (tmp_path / 'empty.pth').write_bytes(b'')
  with pytest.raises(ckpt.CheckpointFormatError, match='file is empty'):
    ckpt.load_cg3d_checkpoint(tmp_path / 'empty.pth')
  torch.save([torch.zeros(3)], tmp_path / 'list.pth')
  with pytest.raises(ckpt.CheckpointFormatError, match=r"holds a list, expected a dict with a 'base_model'"):
    ckpt.load_cg3d_checkpoint(tmp_path / 'list.pth')
  torch.save({'epoch': 3, 'state': 'x'}, tmp_path / 'other.pth')
  with pytest.raises(ckpt.CheckpointFormatError, match=r"no.* known family: top-level keys are \['epoch', 'state'\]"):
    ckpt.load_cg3d_checkpoint(tmp_path / 'other.pth')
  torch.save({'state_dict': {'module.encoder.conv.weight': torch.zeros(2)}}, tmp_path / 'another.pth')
  with pytest.raises(ckpt.CheckpointFormatError, match=r"known family: its 'state_dict' starts \['module.encoder"):
    ckpt.load_cg3d_checkpoint(tmp_path / 'another.pth')
  (tmp_path / 'junk.safetensors').write_bytes(b'\x00' * 64)
  with pytest.raises(BadInputError, match='junk.safetensors: not a readable safetensors file'):
    ckpt.load_cg3d_checkpoint(tmp_path / 'junk.safetensors')
  with pytest.raises(FileNotFoundError, match='no such checkpoint file'):
    ckpt.load_cg3d_checkpoint(tmp_path / 'absent.pth')

  container = torch.load(out, weights_only=True)
  base = container['base_model']

  def save_with(base_model, name, **extra):
    torch.save(dict(container, base_model=base_model, **extra), tmp_path / name)
    return tmp_path / name

  missing = collections.OrderedDict((k, v) for k, v in base.items() if k != 'blocks.blocks.1.mlp.fc2.bias')
  with pytest.raises(ckpt.CheckpointFormatError, match=r'missing keys \[blocks\.blocks\.1\.mlp\.fc2\.bias\]'):
    ckpt.load_cg3d_checkpoint(save_with(missing, 'missing.pth'))
  extra = collections.OrderedDict(base, **{'blocks.blocks.0.attn.q_bias': torch.zeros(32)})
  with pytest.raises(ckpt.CheckpointFormatError, match=r'unexpected keys \[blocks\.blocks\.0\.attn\.q_bias\]'):
    ckpt.load_cg3d_checkpoint(save_with(extra, 'extra.pth'))
  wrong = collections.OrderedDict(base, **{'reduce_dim.weight': torch.zeros(32, 16)})
  with pytest.raises(ckpt.CheckpointFormatError, match=r'reduce_dim\.weight: got \(32, 16\), expected \(32, 32\)'):
    ckpt.load_cg3d_checkpoint(save_with(wrong, 'wrong.pth'))
  bad_prompts = {'prompt_embeddings': torch.zeros(1, 5, 32), 'deep_prompt_embeddings': torch.zeros(2, 4, 32)}
  with pytest.raises(ckpt.CheckpointFormatError, match=r'deep_prompt_embeddings: got shape \(2, 4, 32\)'):
    ckpt.load_cg3d_checkpoint(save_with(base, 'prompts.pth', visual_clip_model=bad_prompts))
  with pytest.raises(ckpt.CheckpointFormatError, match=r'cannot tell the point encoder'):
    ckpt.load_cg3d_checkpoint(save_with({'conv.weight': torch.zeros(2)}, 'unknown.pth'))


def test_interrupted_export_leaves_no_partial_file(trained, tmp_path, monkeypatch):
  container = ckpt.build_container(
    'point_transformer',
    trained.encoder_vars['params'],
    trained.encoder_vars['batch_stats'],
    prompts=trained.prompts,
    prompt_mode='deep',
  )

  def dies_midway(obj, f):
    f.write(b'PK\x03\x04 half of a zip archive')
    raise KeyboardInterrupt  # e.g. Ctrl-C, or a full disk raising OSError

  monkeypatch.setattr(ckpt.torch, 'save', dies_midway)
  with pytest.raises(KeyboardInterrupt):
    ckpt.write_cg3d_checkpoint(tmp_path / 'model.pth', container)
  assert os.listdir(tmp_path) == []  # neither model.pth nor a temporary file

  (tmp_path / 'model.pth').write_bytes(b'previous export')
  with pytest.raises(KeyboardInterrupt):
    ckpt.write_cg3d_checkpoint(tmp_path / 'model.pth', container)
  assert os.listdir(tmp_path) == ['model.pth']
  assert (tmp_path / 'model.pth').read_bytes() == b'previous export'  # untouched until a complete file replaces it
  monkeypatch.undo()

  real_atomic_write = ckpt.atomic_write

  def fails_on_tensors(path, write):
    if path.suffix == '.safetensors':
      raise OSError('No space left on device')
    real_atomic_write(path, write)

  monkeypatch.setattr(ckpt, 'atomic_write', fails_on_tensors)
  with pytest.raises(OSError, match='No space left'):
    ckpt.write_safetensors_checkpoint(tmp_path / 'model.safetensors', container)
  assert os.listdir(tmp_path) == ['model.pth']  # and no orphaned sidecar


def test_pointmlp_export_loads_strictly_matches_twin_and_round_trips(tmp_path, highest_precision):
  sizes = dict(
    embed_dim=8,
    res_expansion=1.0,
    dim_expansion=(2, 2),
    pre_blocks=(1, 2),
    pos_blocks=(2, 1),
    k_neighbors=(8, 8),
    reducers=(2, 2),
  )
  model = PointMLP(**sizes, projection_dim=16)
  clouds = modelnet_clouds(128)
  shapes = jax.eval_shape(
    lambda p: model.init(jax.random.key(0), p, train=False), jax.ShapeDtypeStruct(clouds.shape, jnp.float32)
  )
  variables = random_like(shapes, seed=2)
  container = ckpt.build_container(
    'pointmlp', variables['params'], variables['batch_stats'], step=10, num_batches_tracked=10
  )
  path = ckpt.write_cg3d_checkpoint(tmp_path / 'pointmlp.pth', container)

  twin = PointMLPProject(points=128, **sizes, projection_dim=16)
  twin.load_state_dict(torch.load(path, weights_only=True)['base_model'], strict=True)
  diff, got, _ = verify.compare_features(twin.eval(), model, variables, clouds)
  assert diff <= 1e-9 and np.abs(got).max() > 0.05
  twin = verify.load_twin(path, 'pointmlp', model, 128)
  diff, _, _ = verify.compare_features(twin, model, variables, clouds)
  assert diff <= 1e-9
  with torch.no_grad():  # what --verify exists to catch: one weight off by a little
    twin.projection.bias[3] += 1e-3
  diff, _, _ = verify.compare_features(twin, model, variables, clouds)
  assert diff == pytest.approx(1e-3, rel=0.05)

  encoder, params, batch_stats, prompts, info = ckpt.load_cg3d_checkpoint(path, model)
  assert (encoder, prompts, info['prompt_mode'], info['num_batches_tracked']) == ('pointmlp', None, 'none', 10)
  assert_trees_equal(params, variables['params'])
  assert_trees_equal(batch_stats, variables['batch_stats'])
  with pytest.raises(ckpt.CheckpointFormatError, match=r'does not fit the pointmlp: .*projection\.weight'):
    ckpt.load_cg3d_checkpoint(path, model.clone(projection_dim=32))
  assert trees.flatten(params).keys() == trees.flatten(variables['params']).keys()
