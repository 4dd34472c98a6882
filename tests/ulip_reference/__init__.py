"""ULIP's own point encoder code, for parity (salesforce/ULIP at commit f194ddbfc1219ee1030e866b8be62d77539a3642,
BSD-3-Clause): `point_encoder.py` and `dvae.py` are its `models/pointbert/` files, byte for byte.

What they import that cannot run here is stood in for, nothing else: `pointnet2_ops` (a CUDA extension) by the
twin's farthest-point sampling, which follows the CUDA kernel's rules (start at index 0, lowest index on ties; tests
/test_point_ops.py), and `gather_operation` by torch.gather; `knn_cuda` (imported, unused by the Point-BERT path);
`misc.fps` is ULIP's own two lines over them; `logger.print_log` and the `checkpoint` messages are used only when
loading a Point-BERT initialisation, which these tests do not do. timm (DropPath) comes from tests/slip_reference's
reference libraries.

  PointTransformer, PointTransformer_Colored = ulip_reference.encoders()
"""

import importlib.util
import pathlib
import sys
import types

HERE = pathlib.Path(__file__).resolve().parent


def _module(name: str, **attrs) -> types.ModuleType:
  module = types.ModuleType(name)
  module.__dict__.update(attrs)
  sys.modules[name] = module
  return module


def _stand_ins() -> None:
  import torch

  from cg3d_jax.twins.point_transformer import torch_farthest_point_sample

  def furthest_point_sample(xyz, number):
    return torch_farthest_point_sample(xyz, number).int()

  def gather_operation(features, idx):  # (B, C, N), (B, S) -> (B, C, S)
    return torch.gather(features, 2, idx.long()[:, None, :].expand(-1, features.shape[1], -1))

  utils = _module('pointnet2_ops.pointnet2_utils', furthest_point_sample=furthest_point_sample)
  utils.gather_operation = gather_operation
  _module('pointnet2_ops', pointnet2_utils=utils)
  _module('knn_cuda', KNN=lambda **kwargs: None)

  def fps(data, number):  # ULIP's models/pointbert/misc.py fps, verbatim
    fps_idx = utils.furthest_point_sample(data, number)
    return utils.gather_operation(data.transpose(1, 2).contiguous(), fps_idx).transpose(1, 2).contiguous()

  for name in ('models', 'models.pointbert'):
    _module(name, __path__=[])
  misc = _module('models.pointbert.misc', fps=fps)
  _module('models.pointbert.logger', print_log=lambda *args, **kwargs: None)
  _module(
    'models.pointbert.checkpoint',
    get_missing_parameters_message=lambda keys: str(keys),
    get_unexpected_parameters_message=lambda keys: str(keys),
  )
  sys.modules['models.pointbert'].misc = misc


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f'models.pointbert.{name}', HERE / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def encoders():
  """ULIP's PointTransformer and PointTransformer_Colored classes (build them with args.evaluate_3d=True: else they
  load a Point-BERT file from ./data)."""
  from tests import slip_reference

  slip_reference._import_timm()  # timm's DropPath
  if 'models.pointbert.point_encoder' not in sys.modules:
    _stand_ins()
    _load('dvae')
    _load('point_encoder')
  module = sys.modules['models.pointbert.point_encoder']
  return module.PointTransformer, module.PointTransformer_Colored
