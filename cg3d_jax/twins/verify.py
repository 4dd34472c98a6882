"""What `export --verify` checks an export against: the PyTorch twin (the original modules and names) loaded from
the written file with strict=True, and the two encoders' features compared in float64."""

import copy
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cg3d_jax import assets
from cg3d_jax.data.formats.point_files import read_points
from cg3d_jax.data.host_transforms import normalize_unit_sphere_np
from cg3d_jax.errors import BadInputError
from cg3d_jax.models.point_ops import sample_points
from cg3d_jax.twins.point_transformer import PointTransformerProject
from cg3d_jax.twins.pointmlp import PointMLPProject
from cg3d_jax.weights import cg3d_pth

# Two classes, train and test split (the package ships their xyz: assets.VERIFY_CLOUDS).
VERIFY_OBJECTS = ('airplane/airplane_0002', 'airplane/airplane_0633', 'bathtub/bathtub_0108', 'bathtub/bathtub_0115')


def twin_for(encoder: str, model, num_points: int) -> torch.nn.Module:
  """The PyTorch twin (the original's module and names) with the sizes of the Flax encoder `model`."""
  if encoder == cg3d_pth.POINT_TRANSFORMER:
    return PointTransformerProject(
      width=model.width,
      depth=model.depth,
      num_heads=model.num_heads,
      mlp_ratio=model.mlp_ratio,
      num_groups=model.num_groups,
      group_size=model.group_size,
      encoder_dim=model.encoder_dim,
      drop_path_rate=model.drop_path_rate,
      embed_dim=model.embed_dim,
      num_classes=model.num_classes,
      head_hidden=model.head_hidden,
      head_dropout=model.head_dropout,
      in_channels=model.in_channels,
    )
  if encoder == cg3d_pth.POINTMLP:
    return PointMLPProject(
      points=num_points,
      embed_dim=model.embed_dim,
      res_expansion=model.res_expansion,
      dim_expansion=tuple(model.dim_expansion),
      pre_blocks=tuple(model.pre_blocks),
      pos_blocks=tuple(model.pos_blocks),
      k_neighbors=tuple(model.k_neighbors),
      reducers=tuple(model.reducers),
      projection_dim=model.projection_dim,
      in_channels=model.in_channels,
    )
  raise ValueError(f'unknown encoder {encoder!r}; expected {cg3d_pth.POINT_TRANSFORMER!r} or {cg3d_pth.POINTMLP!r}')


def load_twin(path, encoder: str, model, num_points: int, *, allow_missing_projection: bool = False) -> torch.nn.Module:
  """The exported file's base_model, loaded into the twin with strict=True (every key, every shape), eval mode.

  allow_missing_projection: a fine-tuned classifier's export has no CLIP projection; only those keys may be absent.
  """
  container = cg3d_pth.read_container(path)
  twin = twin_for(encoder, model, num_points)
  state_dict = cg3d_pth.strip_module_prefix(path, container['base_model'])
  if allow_missing_projection:
    missing, unexpected = twin.load_state_dict(state_dict, strict=False)
    if unexpected or set(missing) != {'projection.weight', 'projection.bias'}:
      raise BadInputError(
        path, f'does not load into the twin: missing {sorted(missing)}, unexpected {sorted(unexpected)}'
      )
  else:
    twin.load_state_dict(state_dict, strict=True)
  return twin.eval()


def load_ulip_twin(path, model) -> torch.nn.Module:
  """A file in ULIP's layout, its point side loaded into ULIPPointBERT (sized as `model`) with strict=True."""
  from cg3d_jax.twins.point_transformer import ULIPPointBERT
  from cg3d_jax.weights import ulip

  loaded = cg3d_pth.load_file(path)
  if not ulip.is_ulip_container(loaded):
    raise BadInputError(path, "is not in ULIP's layout (a state_dict with point_encoder.* and pc_projection)")
  twin = ULIPPointBERT(
    depth=model.depth,
    embed_dim=model.embed_dim,
    in_channels=model.in_channels,
    width=model.width,
    num_heads=model.num_heads,
    num_groups=model.num_groups,
    group_size=model.group_size,
    encoder_dim=model.encoder_dim,
    mlp_ratio=model.mlp_ratio,
  )
  twin.load_state_dict(ulip.point_state(path, loaded), strict=True)
  return twin.eval()


class _PointsOnly(torch.nn.Module):
  """OpenShape's Projected takes (xyz, features); the comparison passes one (B, N, C) cloud, xyz first."""

  def __init__(self, projected: torch.nn.Module):
    super().__init__()
    self.projected = projected

  def forward(self, pts: torch.Tensor) -> torch.Tensor:
    return self.projected(pts[..., :3], pts)


def load_openshape_twin(path, model) -> torch.nn.Module:
  """A file in OpenShape's layout, loaded into the PPAT twin (sized as `model`, a PPAT) with strict=True."""
  from cg3d_jax.twins import ppat
  from cg3d_jax.weights import openshape_pt

  loaded = cg3d_pth.load_file(path)
  if not openshape_pt.is_openshape_container(loaded):
    raise BadInputError(path, "is not in OpenShape's layout (a state_dict with ppat.* and proj.*)")
  twin = ppat.make(
    in_channel=model.in_channels,
    out_channel=model.embed_dim,
    dim=model.width,
    depth=model.depth,
    heads=model.num_heads,
    dim_head=model.head_dim,
    mlp_dim=model.mlp_dim,
    sa_dim=model.sa_channels[-1],
    patches=model.num_patches,
    prad=model.radius,
    nsamp=model.num_samples,
  )
  twin.load_state_dict(cg3d_pth.strip_module_prefix(path, loaded['state_dict']), strict=True)
  return _PointsOnly(twin).eval()


def load_uni3d_twin(path, model) -> torch.nn.Module:
  """A file in Uni3D's layout (DeepSpeed's `module`), loaded into the Uni3D twin (sized as `model`, a Uni3D of a
  released width and block kind, any depth) with strict=True."""
  from cg3d_jax.models.uni3d import UNI3D_SIZES
  from cg3d_jax.twins import uni3d
  from cg3d_jax.weights import uni3d_pt

  loaded = cg3d_pth.load_file(path)
  if not uni3d_pt.is_uni3d_container(loaded):
    raise BadInputError(path, "is not in Uni3D's layout (DeepSpeed's `module` with point_encoder.*)")
  size = uni3d_pt.released_size(model.width, model.mlp, model.qkv_fused)
  if size is None or UNI3D_SIZES[size]['num_heads'] != model.num_heads:
    raise BadInputError(path, f'a {model.width}-wide Uni3D of no released size: the twin builds the released ones')
  twin = uni3d.make(
    size,
    depth=model.depth,
    embed_dim=model.embed_dim,
    num_group=model.num_groups,
    group_size=model.group_size,
    encoder_dim=model.encoder_dim,
    in_channels=model.in_channels,
  )
  twin.load_state_dict(cg3d_pth.strip_module_prefix(path, loaded['module']), strict=True)
  return twin.eval()


def compare_features(
  twin: torch.nn.Module, model, variables, clouds: np.ndarray, *, logits: bool = False
) -> tuple[float, np.ndarray, np.ndarray]:
  """Eval-mode outputs of JAX and of the twin on the same clouds -> (max |diff|, jax, torch): the (B, embed_dim)
  features, or with `logits` the classification head's (B, C) logits.

  Both sides run in float64, sampling and neighbour search included. In float32, real clouds hold near-ties among
  distances that the two libraries' rounding (which also varies between machines) can decide differently, and one
  neighbour chosen differently moves a feature far more than a conversion error would. In float64 a correct
  export agrees to ~1e-12, so a small tolerance catches even a slightly wrong weight.
  """
  clouds = np.asarray(clouds, dtype=np.float64)
  extra = {'return_logits': True} if logits else {}
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)
    model = model.clone(dtype=np.float64)
    got = np.asarray(jax.jit(lambda v, p: model.apply(v, p, train=False, **extra))(variables, clouds))
  with torch.no_grad():
    twin = copy.deepcopy(twin).double()
    want = (twin.forward_logits if logits else twin)(torch.from_numpy(clouds)).numpy()
  if got.shape != want.shape:
    raise ValueError(f'output shapes differ: JAX {got.shape}, PyTorch {want.shape}')
  return float(np.max(np.abs(got - want))), got, want


def verify_clouds(files, modelnet_dir, num_points: int, in_channels: int = 3) -> tuple[list[str], np.ndarray]:
  """(names, (B, num_points, in_channels)) clouds to compare on: point files, four ModelNet40 objects read from a
  modelnet40_normal_resampled folder, or (default) the same four objects' xyz that the package ships; each centred,
  scaled to the unit sphere and farthest-point sampled to num_points. For a coloured encoder (in_channels 6) each
  point also gets a colour: the file's, or (files without colours, the ModelNet objects) 0.5 + 0.5 xyz, which varies
  over the cloud so that a wrongly converted colour weight shows."""
  colours = {}
  if files:
    named = []
    for f in files:
      cloud = read_points(f)  # the reader tells the columns apart, or asks for them
      named.append((str(f), cloud.xyz))
      if cloud.rgb is not None:
        colours[str(f)] = cloud.rgb.astype(np.float32) / 255.0
  elif modelnet_dir:
    root = pathlib.Path(modelnet_dir)
    if not root.is_dir():
      raise BadInputError(root, 'is not a folder (--modelnet_dir: a modelnet40_normal_resampled folder)')
    # The official layout: x,y,z,nx,ny,nz lines.
    named = [
      (str(root / f'{n}.txt'), read_points(root / f'{n}.txt', columns='xyz,normals').xyz) for n in VERIFY_OBJECTS
    ]
  else:
    with np.load(assets.path(assets.VERIFY_CLOUDS)) as shipped:
      named = [(pathlib.Path(n).name, shipped[pathlib.Path(n).name]) for n in VERIFY_OBJECTS]
  clouds = []
  for name, xyz in named:
    xyz = normalize_unit_sphere_np(xyz, name)
    if len(xyz) < num_points:
      raise BadInputError(name, f'{len(xyz)} points, but the encoder takes {num_points} (config.model.num_points)')
    if in_channels == 6:
      xyz = np.concatenate([xyz, colours.get(name, 0.5 + 0.5 * xyz).astype(np.float32)], axis=1)
    clouds.append(np.asarray(sample_points(jnp.asarray(xyz)[None], num_points))[0])
  return [name for name, _ in named], np.stack(clouds)
