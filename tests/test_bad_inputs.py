"""Bad inputs and faults, table-driven: each ends in one `error:` line naming the file or field, exit status 2, and
nothing written (the output folder stays absent), never in a result computed from the bad input or a traceback.

Commands run in this process as `python -m cg3d_jax.<command>` runs them (tests/conftest.run_command); settings that
only a config can carry go through the training and fine-tuning entry points, which check them before touching data.
"""

import collections
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cg3d_jax import (
  build_data,
  embed,
  evaluate,
  evaluate_scenes,
  export,
  finetune,
  predict,
  query_scene,
  train,
  trained,
)
from cg3d_jax.clip.loaded_clip import load_clip
from cg3d_jax.configs import finetune_modelnet40
from cg3d_jax.data.formats import ply_files
from cg3d_jax.errors import ConfigError, InputError
from cg3d_jax.models.point_transformer import PointTransformer
from cg3d_jax.synthetic import random_clip
from cg3d_jax.training import finetune as ft
from cg3d_jax.training import pretrain
from cg3d_jax.weights import cg3d_pth, torch_io
from tests.conftest import apply_overrides, run_command, tiny_config

TINY_PT = dict(width=48, depth=1, num_heads=6, encoder_dim=32, embed_dim=32, num_classes=55)


class _Payload:
  """Pickles as a call of os.system(touch <marker>): loading the file unsafely would create the marker."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Good and bad files, written once: checkpoints, clouds, CLIPs."""
  root = tmp_path_factory.mktemp('bad_inputs')
  encoder = PointTransformer(**TINY_PT)
  variables = encoder.init(jax.random.key(0), jnp.zeros((1, 64, 3)), train=False)
  state = torch_io.point_transformer_to_torch(variables['params'], variables['batch_stats'])
  good = root / 'good.pth'
  torch.save({'base_model': state, 'epoch': 1}, good)
  data = good.read_bytes()
  nan_state = collections.OrderedDict(state)
  nan_state['norm.weight'] = torch.full_like(state['norm.weight'], float('nan'))
  torch.save({'base_model': nan_state}, root / 'nan.pth')
  bad_shape = collections.OrderedDict(state)
  bad_shape['reduce_dim.weight'] = torch.zeros(48, 7)
  torch.save({'base_model': bad_shape}, root / 'bad_shape.pth')
  (root / 'truncated.pth').write_bytes(data[: len(data) // 2])
  (root / 'random.pth').write_bytes(np.random.default_rng(0).integers(128, 256, 4096, dtype=np.uint8).tobytes())
  (root / 'empty.pth').write_bytes(b'')
  (root / 'notes.pth').write_text('my notes\n')
  np.save(root / 'array.npy', np.zeros(3))
  os.replace(root / 'array.npy', root / 'array.pth')
  torch.save({'base_model': state, 'epoch': _Payload(root / 'pwned')}, root / 'evil.pth')
  (root / 'plain_pickle.pth').write_bytes(pickle.dumps({'base_model': 1}))

  xyz = np.random.default_rng(1).normal(size=(200, 3)).astype(np.float32)
  ply_files.write_ply(root / 'cloud.ply', xyz, binary=False)
  text = (root / 'cloud.ply').read_text()
  (root / 'ascii_trailing.ply').write_text(text.replace('element vertex 200', 'element vertex 20'))
  ply_files.write_ply(root / 'cloud_bin.ply', xyz, binary=True)
  (root / 'binary_trailing.ply').write_bytes(
    (root / 'cloud_bin.ply').read_bytes().replace(b'element vertex 200', b'element vertex 100')
  )
  np.savetxt(root / 'two_points.txt', xyz[:2])
  np.savetxt(root / 'same_point.txt', np.zeros((500, 3)))
  np.savetxt(root / 'nan_point.txt', np.r_[xyz[:50], [[np.nan, 0, 0]]])
  np.save(root / 'objects.npy', np.array([{'x': 1}], dtype=object), allow_pickle=True)
  (root / 'header_only.ply').write_text(
    'ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nproperty float y\nproperty float z\nend_header\n0 0 0\n'
  )

  square = '0 0 0\n1 0 0\n1 1 0\n0 1 0\n3 0 1 2\n3 0 2 3\n'
  (root / 'short.off').write_text('OFF\n6 2 0\n' + square)  # 4 vertices and 2 faces, declared 6 and 2
  (root / 'long.off').write_text('OFF\n4 1 0\n' + square)  # one face more than declared

  (root / 'empty_raw').mkdir()
  (root / 'raw_junk').mkdir()
  (root / 'raw_junk' / 'README').write_text('not a dataset\n')
  np.savetxt(root / 'six_columns.txt', np.c_[xyz, np.tile([0.0, 0.0, 1.0], (200, 1))])  # unit normals or blue?
  np.savetxt(root / 'seven_columns.txt', np.c_[xyz, xyz, xyz[:, :1]])

  slip = root / 'slip.pt'
  random_clip.write_random_slip(
    slip, vision_width=64, vision_layers=1, patch_size=16, image_size=32, text_width=64, text_layers=1, embed_dim=32
  )
  (root / 'junk_slip.pt').write_bytes(b'\x00' * 100)
  return root


def _run(main, argv, capsys):
  code = run_command(main, argv)
  err = capsys.readouterr().err.strip()
  return code, err


# (name, command, argv with {root} and {out}, text the one error line must hold)
COMMAND_CASES = [
  (
    'predict: missing cloud',
    predict,
    ['--checkpoint', '{root}/good.pth', '--points', '{root}/absent.ply', '--labels', 'a,b'],
    'absent.ply: does not exist',
  ),
  (
    'predict: two points',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/two_points.txt',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'two_points.txt: 2 distinct point(s)',
  ),
  (
    'predict: one point repeated',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/same_point.txt',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'same_point.txt: 1 distinct point(s)',
  ),
  (
    'predict: NaN coordinate',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/nan_point.txt',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'nan_point.txt',
  ),
  (
    'predict: ASCII PLY longer than its header',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/ascii_trailing.ply',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'ascii_trailing.ply, line 29: 180 more lines after the 20 vertex',
  ),
  (
    'predict: binary PLY longer than its header',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/binary_trailing.ply',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'binary_trailing.ply: 1200 bytes after the 100 vertex rows',
  ),
  (
    'predict: PLY shorter than its header',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/header_only.ply',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'header_only.ply: truncated: header promises 5 vertex lines',
  ),
  (
    'predict: OFF shorter than its counts',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/short.off',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'short.off: truncated: header promises 6 vertices and 2 faces (8 lines), the file has 6 line(s) after the header',
  ),
  (
    'predict: OFF longer than its counts',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/long.off',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'long.off, line 8: 1 more line(s) after the 4 vertices and 1 faces',
  ),
  (
    'predict: object .npy',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/objects.npy',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'objects.npy',
  ),
  (
    'predict: NaN weights',
    predict,
    [
      '--checkpoint',
      '{root}/nan.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--points',
      '{root}/cloud.ply',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'nan.pth: 1 weight tensor(s) hold NaN or infinity (e.g. encoder/params/norm/scale)',
  ),
  (
    'predict: truncated .pth',
    predict,
    ['--checkpoint', '{root}/truncated.pth', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'truncated.pth: truncated or damaged',
  ),
  (
    'predict: random bytes .pth',
    predict,
    ['--checkpoint', '{root}/random.pth', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'random.pth: not a PyTorch checkpoint: the file is neither a zip archive nor a pickle',
  ),
  (
    'predict: empty .pth',
    predict,
    ['--checkpoint', '{root}/empty.pth', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'empty.pth: not a PyTorch checkpoint: the file is empty',
  ),
  (
    'predict: text .pth',
    predict,
    ['--checkpoint', '{root}/notes.pth', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'notes.pth: not a PyTorch checkpoint: the file is text',
  ),
  (
    'predict: .npy named .pth',
    predict,
    ['--checkpoint', '{root}/array.pth', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'array.pth: not a PyTorch checkpoint: the file is a NumPy',
  ),
  (
    'predict: untrusted pickle',
    predict,
    ['--checkpoint', '{root}/evil.pth', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'evil.pth: refused',
  ),
  (
    'predict: plain pickle',
    predict,
    ['--checkpoint', '{root}/plain_pickle.pth', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'plain_pickle.pth: not a PyTorch checkpoint: a pickle',
  ),
  (
    'predict: mis-shaped tensor',
    predict,
    ['--checkpoint', '{root}/bad_shape.pth', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'bad_shape.pth: base_model does not fit the point_transformer: state dict has mis-shaped entries: '
    'reduce_dim.weight: got (48, 7), expected (48, 32)',
  ),
  (
    'predict: no CLIP for an original .pth',
    predict,
    ['--checkpoint', '{root}/good.pth', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'does not say which CLIP it was trained with',
  ),
  (
    'predict: damaged SLIP file',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/junk_slip.pt',
      '--points',
      '{root}/cloud.ply',
      '--labels',
      'a,b',
      '--num_points',
      '64',
    ],
    'junk_slip.pt: not a SLIP checkpoint',
  ),
  (
    'predict: hub name as CLIP',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      'openai/clip-vit-base-patch16',
      '--points',
      '{root}/cloud.ply',
      '--labels',
      'a,b',
    ],
    'looks like a Hugging Face hub name',
  ),
  (
    'predict: missing image',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--points',
      '{root}/cloud.ply',
      '--labels',
      'a,b',
      '--images',
      '{root}/absent.jpg',
    ],
    'absent.jpg',
  ),
  (
    'predict: missing checkpoint',
    predict,
    ['--checkpoint', '{root}/absent_run', '--points', '{root}/cloud.ply', '--labels', 'a,b'],
    'absent_run',
  ),
  ('export: --out is a folder', export, ['--checkpoint', '{root}/good.pth', '--out', '{root}'], 'is a directory'),
  (
    'export: random bytes .pth',
    export,
    ['--checkpoint', '{root}/random.pth', '--out', '{out}/x.pth'],
    'random.pth: not a PyTorch checkpoint',
  ),
  (
    'export: format does not match --out',
    export,
    ['--checkpoint', '{root}/good.pth', '--out', '{out}/x.pth', '--format', 'safetensors'],
    'does not match the extension',
  ),
  (
    'export: NaN weights',
    export,
    ['--checkpoint', '{root}/nan.pth', '--out', '{out}/x.pth'],
    'nan.pth: 1 weight tensor(s) hold NaN',
  ),
  (
    'query_scene: missing scene',
    query_scene,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--scene',
      '{root}/absent_room',
      '--queries',
      'chair',
      '--out',
      '{out}',
    ],
    'absent_room',
  ),
  (
    'query_scene: NaN weights',
    query_scene,
    [
      '--checkpoint',
      '{root}/nan.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--scene',
      '{root}/cloud.ply',
      '--queries',
      'chair',
      '--out',
      '{out}',
    ],
    'nan.pth: 1 weight tensor(s) hold NaN',
  ),
  (
    'query_scene: bad --radius',
    query_scene,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--scene',
      '{root}/cloud.ply',
      '--queries',
      'chair',
      '--radius',
      '-1',
      '--out',
      '{out}',
    ],
    'region radius (--radius) must be > 0',
  ),
  (
    'query_scene: empty query',
    query_scene,
    ['--checkpoint', '{root}/good.pth', '--scene', '{root}/cloud.ply', '--queries', 'chair,,table', '--out', '{out}'],
    "--queries 'chair,,table': expected comma-separated non-empty labels",
  ),
  (
    'query_scene: text .pth',
    query_scene,
    [
      '--checkpoint',
      '{root}/notes.pth',
      '--clip_path',
      '{root}/slip.pt',
      '--scene',
      '{root}/cloud.ply',
      '--queries',
      'chair',
      '--out',
      '{out}',
    ],
    'notes.pth: not a PyTorch checkpoint: the file is text',
  ),
  (
    'predict: ambiguous columns',
    predict,
    ['--checkpoint', '{root}/good.pth', '--points', '{root}/six_columns.txt', '--labels', 'a,b'],
    'six_columns.txt: cannot tell whether columns 4-6 are normals or colours; name them: --columns',
  ),
  (
    'predict: seven columns',
    predict,
    ['--checkpoint', '{root}/good.pth', '--points', '{root}/seven_columns.txt', '--labels', 'a,b'],
    'seven_columns.txt: 7 columns per point',
  ),
  (
    'predict: --columns that do not fit',
    predict,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--points',
      '{root}/seven_columns.txt',
      '--labels',
      'a,b',
      '--columns',
      'xyz,rgb',
    ],
    "columns ['xyz', 'rgb'] describe 6 columns",
  ),
  (
    'predict: repeated labels',
    predict,
    ['--checkpoint', '{root}/good.pth', '--points', '{root}/cloud.ply', '--labels', 'owl,owl'],
    "['owl'] appear more than once",
  ),
  (
    'evaluate: no --config',
    evaluate,
    ['--checkpoint', '{root}/good.pth', '--workdir', '{out}'],
    '--config is required',
  ),
  (
    'evaluate: unknown config name',
    evaluate,
    ['--config', 'zeroshot_modelnet4', '--checkpoint', '{root}/good.pth', '--workdir', '{out}'],
    "--config 'zeroshot_modelnet4': no such file, and 'zeroshot_modelnet4' is not a shipped config",
  ),
  (
    'evaluate: unknown dataset',
    evaluate,
    [
      '--config',
      'zeroshot_modelnet40',
      '--config.eval.dataset=modelnet7',
      '--checkpoint',
      '{root}/good.pth',
      '--workdir',
      '{out}',
    ],
    "config.eval.dataset='modelnet7': unknown dataset",
  ),
  (
    'evaluate: unknown dataset variant',
    evaluate,
    [
      '--config',
      'zeroshot_modelnet40',
      '--config.eval.dataset=scanobjectnn/pb_t25',
      '--checkpoint',
      '{root}/good.pth',
      '--workdir',
      '{out}',
    ],
    "scanobjectnn has no config 'pb_t25'",
  ),
  (
    'evaluate: missing raw folder',
    evaluate,
    [
      '--config',
      'zeroshot_modelnet40',
      '--config.eval.manual_dir',
      '{root}/absent_modelnet',
      '--config.eval.data_dir',
      '{out}/tfds',
      '--checkpoint',
      '{root}/good.pth',
      '--workdir',
      '{out}',
    ],
    "absent_modelnet': no such folder; expected the raw files of 'modelnet/modelnet40'",
  ),
  (
    'evaluate: batch not a multiple of the devices',
    evaluate,
    [
      '--config',
      'zeroshot_modelnet40',
      '--config.eval.batch_size=12',
      '--checkpoint',
      '{root}/good.pth',
      '--workdir',
      '{out}',
    ],
    'config.eval.batch_size=12 must be a positive multiple of the 8 devices',
  ),
  (
    'evaluate: missing checkpoint',
    evaluate,
    [
      '--config',
      'zeroshot_modelnet40',
      '--config.eval.manual_dir',
      '{root}/raw_junk',
      '--config.eval.data_dir',
      '{out}/tfds',
      '--checkpoint',
      '{root}/absent_run',
      '--workdir',
      '{out}',
    ],
    'absent_run',
  ),
  (
    'evaluate: NaN weights',
    evaluate,
    [
      '--config',
      'zeroshot_modelnet40',
      '--config.eval.manual_dir',
      '{root}/raw_junk',
      '--config.eval.data_dir',
      '{out}/tfds',
      '--config.clip.path',
      '{root}/slip.pt',
      '--checkpoint',
      '{root}/nan.pth',
      '--workdir',
      '{out}',
    ],
    'nan.pth: 1 weight tensor(s) hold NaN',
  ),
  (
    'evaluate: raw folder without ModelNet',
    evaluate,
    [
      '--config',
      'zeroshot_modelnet40',
      '--config.eval.manual_dir',
      '{root}/raw_junk',
      '--config.eval.data_dir',
      '{out}/tfds',
      '--config.clip.path',
      '{root}/slip.pt',
      '--config.model.num_points=64',
      '--checkpoint',
      '{root}/good.pth',
      '--workdir',
      '{out}',
    ],
    'raw_junk: no modelnet40_shape_names.txt',
  ),
  (
    'evaluate: --workdir is a file',
    evaluate,
    ['--config', 'zeroshot_modelnet40', '--checkpoint', '{root}/good.pth', '--workdir', '{root}/cloud.ply'],
    'cloud.ply is a file',
  ),
  (
    'evaluate_scenes: missing S3DIS folder',
    evaluate_scenes,
    ['--checkpoint', '{root}/good.pth', '--s3dis', '{root}/absent_s3dis', '--out', '{out}'],
    'absent_s3dis',
  ),
  (
    'evaluate_scenes: unknown class',
    evaluate_scenes,
    ['--checkpoint', '{root}/good.pth', '--s3dis', '{root}', '--classes', 'chair,sofaa', '--out', '{out}'],
    "--classes ['sofaa'] are not dataset classes",
  ),
  (
    'evaluate_scenes: bad --areas',
    evaluate_scenes,
    ['--checkpoint', '{root}/good.pth', '--s3dis', '{root}', '--areas', 'five', '--out', '{out}'],
    "--areas 'five': expected comma-separated area numbers",
  ),
  (
    'evaluate_scenes: bad --cover',
    evaluate_scenes,
    ['--checkpoint', '{root}/good.pth', '--s3dis', '{root}', '--cover', '1.5', '--out', '{out}'],
    'region cover (--cover) must be in (0, 1]',
  ),
  (
    'evaluate_scenes: no --out',
    evaluate_scenes,
    ['--checkpoint', '{root}/good.pth', '--s3dis', '{root}'],
    '--out is required',
  ),
  ('train: no --config', train, ['--workdir', '{out}'], '--config is required'),
  (
    'train: zero batch',
    train,
    ['--config', 'demo', '--config.train.batch_size=0', '--workdir', '{out}'],
    'config.train.batch_size=0 must be a positive multiple of the 8 devices',
  ),
  (
    'train: unknown encoder',
    train,
    ['--config', 'demo', '--config.model.encoder=pointnet', '--workdir', '{out}'],
    "config.model.encoder='pointnet'",
  ),
  (
    'train: missing raw folder',
    train,
    [
      '--config',
      'demo',
      '--config.data.manual_dir',
      '{root}/absent_shapenet',
      '--config.data.data_dir',
      '{out}/tfds',
      '--workdir',
      '{out}',
    ],
    "config.data.manual_dir='{root}/absent_shapenet': no such folder",
  ),
  (
    'train: raw folder without ShapeNet-55',
    train,
    [
      '--config',
      'demo',
      '--config.data.manual_dir',
      '{root}/raw_junk',
      '--config.data.data_dir',
      '{out}/tfds',
      '--workdir',
      '{out}',
    ],
    'raw_junk: no train_img.txt',
  ),
  ('train: --workdir is a file', train, ['--config', 'demo', '--workdir', '{root}/cloud.ply'], 'cloud.ply is a file'),
  (
    'finetune: not a fine-tuning config',
    finetune,
    ['--config', 'demo', '--workdir', '{out}'],
    'is not a fine-tuning config',
  ),
  (
    'finetune: missing --init',
    finetune,
    ['--config', 'finetune_modelnet40', '--init', '{root}/absent.pth', '--workdir', '{out}'],
    'absent.pth: no such pretraining run or .pth',
  ),
  (
    'finetune: random bytes --init',
    finetune,
    ['--config', 'finetune_modelnet40', '--init', '{root}/random.pth', '--workdir', '{out}'],
    'random.pth: not a PyTorch checkpoint',
  ),
  (
    'finetune: zero steps',
    finetune,
    ['--config', 'finetune_modelnet40', '--config.train.total_steps=-1', '--workdir', '{out}'],
    'config.train.total_steps=-1',
  ),
  (
    'embed: neither --shapes nor --config',
    embed,
    ['--checkpoint', '{root}/good.pth', '--library', '{out}'],
    'give one of --shapes FOLDER (point-cloud files) or --config zeroshot_<dataset>',
  ),
  (
    'embed: both --shapes and --config',
    embed,
    ['--checkpoint', '{root}/good.pth', '--shapes', '{root}', '--config', 'zeroshot_modelnet40', '--library', '{out}'],
    'give one of --shapes FOLDER (point-cloud files) or --config zeroshot_<dataset>',
  ),
  (
    'embed: a split not prepared',
    embed,
    [
      '--checkpoint',
      '{root}/good.pth',
      '--config',
      'zeroshot_modelnet40',
      '--config.eval.data_dir={out}/tfds',
      '--config.eval.manual_dir={root}/raw_junk',
      '--library',
      '{out}',
    ],
    'raw_junk: no modelnet40_shape_names.txt',
  ),
  ('build_data: no --dataset', build_data, ['--manual_dir', '{root}', '--data_dir', '{out}'], '--dataset is required'),
  (
    'build_data: unknown dataset',
    build_data,
    ['--dataset', 'modelnet7', '--manual_dir', '{root}/raw_junk', '--data_dir', '{out}'],
    '--dataset modelnet7: unknown dataset',
  ),
  (
    'build_data: missing raw folder',
    build_data,
    ['--dataset', 'modelnet40', '--manual_dir', '{root}/absent_raw', '--data_dir', '{out}'],
    '--manual_dir {root}/absent_raw: no such',
  ),
  (
    'build_data: empty raw folder',
    build_data,
    ['--dataset', 'obj_bg', '--manual_dir', '{root}/empty_raw', '--data_dir', '{out}'],
    '--manual_dir {root}/empty_raw: is empty',
  ),
  (
    'build_data: ModelNet40 without its lists',
    build_data,
    ['--dataset', 'modelnet40', '--manual_dir', '{root}/raw_junk', '--data_dir', '{out}'],
    'raw_junk: no modelnet40_shape_names.txt',
  ),
  (
    'build_data: ShapeNet-55 without its lists',
    build_data,
    ['--dataset', 'shapenet55_cg3d', '--manual_dir', '{root}/raw_junk', '--data_dir', '{out}'],
    'raw_junk: no train_img.txt',
  ),
  (
    'build_data: ScanObjectNN without its h5',
    build_data,
    ['--dataset', 'pb_t50_rs', '--manual_dir', '{root}/raw_junk', '--data_dir', '{out}'],
    'training_objectdataset_augmentedrot_scale75.h5: file not found',
  ),
]


def _with_output(name, argv):
  """predict writes its answer only where --json says: every predict case names one, so that 'nothing written'
  means something there too."""
  return [*argv, '--json', '{out}/prediction.json'] if name.startswith('predict') else argv


def _snapshot(folder: pathlib.Path) -> dict:
  return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*')}


@pytest.mark.parametrize('name,command,argv,message', COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_command_stops_with_one_clear_line(files, tmp_path, capsys, monkeypatch, name, command, argv, message):
  """Exit 2; stderr holds exactly one line, `error: ...` naming the file or setting, and no traceback; nothing is
  written: not the output (every case names one under {out}, or the command has none), not the working folder, not
  beside the inputs. Shown to fail by letting InputError escape cli.guard (a traceback and exit 1), and by
  cli.require_workdir creating --workdir before the settings were checked (an empty folder left behind: what the
  `python -m` sample below first found)."""
  out, cwd = tmp_path / 'out', tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  argv = [a.format(root=files, out=out) for a in _with_output(name, argv)]
  before = _snapshot(files)
  code, err = _run(command.main, argv, capsys)
  assert code == 2, (name, err)
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
  assert message.format(root=files) in lines[0], (message, lines[0])
  written = sorted(p for p in out.rglob('*') if not p.is_dir()) if out.exists() else []
  assert not written, f'{name}: wrote {written}'
  # Empty folders only where TFDS was pointed (--data_dir, config.*.data_dir): its builder creates them before it
  # reads the raw folder (still to be checked before, issue 32); any other folder left behind fails.
  data_dirs = [pathlib.Path(value) for flag, value in zip(argv, argv[1:]) if 'data_dir' in flag]
  folders = [p for p in ([out] if out.exists() else []) + sorted(out.rglob('*')) if p.is_dir()]
  assert all(any(d.is_relative_to(f) or f.is_relative_to(d) for d in data_dirs) for f in folders), (
    f'{name}: left {folders} behind'
  )
  assert not list(cwd.iterdir()), f'{name}: wrote {list(cwd.iterdir())} in the working folder'
  assert _snapshot(files) == before, f'{name}: changed the input folder'


def test_every_command_case_names_an_output_or_points_it_at_an_input():
  """The table itself: a case points its output under {out}, or points it at the inputs on purpose (a folder or a
  file where the output should go: the inputs' snapshot then shows that nothing was written), or omits it on
  purpose. A new case without an output fails here until it names one."""
  without = [name for name, _, argv, _ in COMMAND_CASES if not any('{out}' in a for a in _with_output(name, argv))]
  assert without == [
    'export: --out is a folder',
    'evaluate: --workdir is a file',
    'evaluate_scenes: no --out',
    'train: --workdir is a file',
  ]


# A sample of the cases above as a user meets them: `python -m cg3d_jax.<command>` in a fresh process, exit 2, one
# line on stderr, no traceback (absl's and ml_collections' own flag parsing included).
COLD_CASES = ['predict: truncated .pth', 'train: zero batch', 'evaluate: unknown dataset']


@pytest.mark.parametrize('name', COLD_CASES)
def test_command_stops_with_one_clear_line_as_a_user_runs_it(files, tmp_path, name):
  ((_, command, argv, message),) = [c for c in COMMAND_CASES if c[0] == name]
  out = tmp_path / 'out'
  argv = [a.format(root=files, out=out) for a in _with_output(name, argv)]
  done = subprocess.run(
    [sys.executable, '-m', command.__name__, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 2, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith('error: ') and 'Traceback' not in done.stderr, done.stderr[-3000:]
  assert message.format(root=files) in lines[-1]
  assert not out.exists()


# Settings a config carries: checked before any data is prepared or a model built.
CONFIG_CASES = [
  ('train.batch_size', 0, r'config.train.batch_size=0 must be a positive multiple of the 8 devices'),
  ('train.batch_size', 12, r'config.train.batch_size=12 must be a positive multiple of the 8 devices'),
  ('eval.batch_size', -8, r'config.eval.batch_size=-8'),
  ('train.total_steps', -1, r'config.train.total_steps=-1 must be a non-negative integer'),
  ('model.encoder', 'pointnet', r"config.model.encoder='pointnet'"),
  ('model.num_points', 0, r'config.model.num_points=0 must be a positive integer'),
  ('train.mode', 'both', r"config.train.mode='both': expected 'joint' or 'alternating'"),
  ('train.lr_schedule', 'timm', r"config.train.lr_schedule='timm': expected one of \('per_epoch', 'original'\)"),
  ('model.attention', 'flash', r"config.model.attention='flash': expected one of \['auto', 'xla', 'cudnn'"),
  ('clip.attention', 'sdpa', r"config.clip.attention='sdpa'"),
  (
    'model.remat',
    'True',  # what --config.model.remat=True gives now that the field is a policy name
    r"config.model.remat='True': expected one of \['none', 'full', 'dots'\] \(what was True is now 'full'\)",
  ),
  ('clip.remat', 'some', r"config.clip.remat='some'"),
  ('model.in_channels', 4, r'config.model.in_channels=4: expected 3 \(xyz\) or 6'),
  (
    'model.in_channels',
    6,
    r'config.model.in_channels=6: the TFDS datasets \(.*\) carry xyz only; coloured encoders '
    r"train on OpenShape's layout",
  ),
]


@pytest.mark.parametrize('field,value,message', CONFIG_CASES, ids=[f'{c[0]}={c[1]}' for c in CONFIG_CASES])
def test_bad_settings_stop_training_before_anything_runs(tmp_path, field, value, message):
  config = tiny_config('/nonexistent/clip', ('/nonexistent/manual', '/nonexistent/data'), **{field: value})
  with pytest.raises(ConfigError, match=message):
    pretrain.train(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_finetune_checks_init_and_settings_before_preparing_data(tmp_path):
  config = finetune_modelnet40.get_config()
  apply_overrides(config, {'data.manual_dir': '/nonexistent/modelnet', 'data.data_dir': str(tmp_path / 'tfds')})
  with pytest.raises(InputError, match='--init /nonexistent/run.pth: no such pretraining run or .pth file'):
    ft.finetune(config, str(tmp_path / 'run'), init='/nonexistent/run.pth')
  apply_overrides(config, {'train.batch_size': 0})
  with pytest.raises(ConfigError, match='config.train.batch_size=0'):
    ft.finetune(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'tfds').exists() and not (tmp_path / 'run').exists()


def test_clip_folders_with_bad_weights_name_the_file_or_tensor(tmp_path, tiny_clip_dir):
  import shutil

  from cg3d_jax.weights import safetensors_files

  folder = tmp_path / 'clip'
  shutil.copytree(tiny_clip_dir, folder)
  weights = folder / 'model.safetensors'
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  with pytest.raises(InputError, match=r'model.safetensors: not a readable safetensors file'):
    load_clip(folder)
  tensors = safetensors_files.read_tensors(pathlib.Path(tiny_clip_dir) / 'model.safetensors')
  tensors['text_model.final_layer_norm.weight'] = np.full_like(tensors['text_model.final_layer_norm.weight'], np.inf)
  from safetensors.numpy import save_file

  save_file(tensors, str(weights))
  with pytest.raises(InputError, match=r"NaN or infinity: \['text_model.final_layer_norm.weight'\]"):
    load_clip(folder)


def test_original_pth_with_its_frozen_tower_refuses_nan_prompts(files, tmp_path):
  """NaN in the trained prompts (not only the encoder) stops loading."""
  container = cg3d_pth.read_container(files / 'good.pth')
  container['visual_clip_model'] = {'prompt_embeddings': torch.full((1, 2, 64), float('nan'))}
  torch.save(container, tmp_path / 'nan_prompts.pth')
  with pytest.raises(InputError, match=r'prompts/tokens'):
    trained.load_trained(tmp_path / 'nan_prompts.pth', num_points=64)


def test_a_resumed_writer_drops_the_rows_of_steps_run_again(tmp_path, caplog):
  """A run killed after logging step 6 but checkpointing step 4 resumes at 4: rows 5 and 6 (and a line the kill
  cut short) go, with a warning, so that steps 5 and 6 are not in the file twice."""
  from cg3d_jax.metric_writer import MetricsWriter, read_jsonl

  with MetricsWriter(str(tmp_path), 'train', tensorboard=False, enabled=True) as writer:
    for step in (2, 4, 5, 6):
      writer.write_scalars(step, {'loss': 1.0 / step})
  with open(tmp_path / 'train.jsonl', 'a') as f:
    f.write('{"step": 7, "lo')  # killed mid-line
  with (
    caplog.at_level('WARNING'),
    MetricsWriter(str(tmp_path), 'train', tensorboard=False, enabled=True, resume_step=4) as writer,
  ):
    writer.write_scalars(6, {'loss': 0.5})
  assert [r['step'] for r in read_jsonl(str(tmp_path / 'train.jsonl'))] == [2, 4, 6]
  assert 'dropped 2 row(s) of later steps' in caplog.text and '1 unfinished line' in caplog.text
