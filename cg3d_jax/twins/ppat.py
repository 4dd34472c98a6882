"""PyTorch twin of OpenShape's PPAT ("PointBERT"): src/models/ppat.py and the parts of src/models/pointnet_util.py
it uses, written after OpenShape's code (commit abe5aa42b7c9) with its module names and registration order, so that
`make().state_dict()` has exactly the keys, shapes and order of a released checkpoint's `state_dict` once
DistributedDataParallel's `module.` is removed (tests/fixtures/reference/openshape_ppat_keys.tsv).

For parity tests and exports only. Differences from the original, none of which changes a parameter:
  * farthest-point sampling is DGL's `farthest_point_sampler` CPU kernel written in plain torch (DGL is not a
    dependency), starting at `fps_start` (default 0) instead of DGL's random start;
  * torch_redstone's `Lambda(permute)` in `lift` is a small `Permute` module (no parameters, same index) and its
    `supercat` a broadcast + cat;
  * einops' rearrange is a reshape; the unused relative-position branch (`rel_pe`, off in every config) is left out.
The ball query, grouping, set abstraction and transformer are OpenShape's code as written.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from cg3d_jax.models.ppat import OPENSHAPE_SCALINGS


def square_distance(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
  """(B, N, C), (B, M, C) -> (B, N, M): OpenShape's expanded (-2 a.b + |a|^2) + |b|^2."""
  b, n, _ = src.shape
  _, m, _ = dst.shape
  dist = -2 * torch.matmul(src, dst.permute(0, 2, 1))
  dist += torch.sum(src**2, -1).view(b, n, 1)
  dist += torch.sum(dst**2, -1).view(b, 1, m)
  return dist


def index_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
  """points (B, N, C), idx (B, S[, K]) -> (B, S[, K], C)."""
  b = points.shape[0]
  view_shape = [b] + [1] * (idx.dim() - 1)
  repeat_shape = [1] + list(idx.shape[1:])
  batch_indices = torch.arange(b, dtype=torch.long, device=points.device).view(view_shape).repeat(repeat_shape)
  return points[batch_indices, idx, :]


def farthest_point_sample(xyz: torch.Tensor, npoint: int, start_idx=0) -> torch.Tensor:
  """DGL's farthest_point_sampler, CPU kernel: (B, N, C) -> (B, npoint) int64, starting at `start_idx` (an int, or
  one per cloud).

  Each point's distance to the sample set is the minimum over the samples of its squared distance, summed
  dimension by dimension; each step takes the first index of the maximum (DGL's strict '>').
  """
  b, n, c = xyz.shape
  out = torch.zeros(b, npoint, dtype=torch.long, device=xyz.device)
  sample = torch.as_tensor(start_idx, dtype=torch.long, device=xyz.device).expand(b).clone()
  out[:, 0] = sample
  rows = torch.arange(b, device=xyz.device)
  dist = None
  for i in range(npoint - 1):
    one = torch.zeros(b, n, dtype=xyz.dtype, device=xyz.device)
    for d in range(c):
      tmp = xyz[..., d] - xyz[rows, sample, d][:, None]
      one = one + tmp * tmp
    dist = one if i == 0 else torch.where(dist > one, one, dist)
    sample = torch.argmax(dist, dim=1)  # the first index of the maximum
    out[:, i + 1] = sample
  return out


def query_ball_point(radius: float, nsample: int, xyz: torch.Tensor, new_xyz: torch.Tensor) -> torch.Tensor:
  """OpenShape's query_ball_point: the first `nsample` indices (ascending) with squared distance not > radius^2,
  the lowest one repeated when fewer are inside."""
  b, n, _ = xyz.shape
  _, s, _ = new_xyz.shape
  group_idx = torch.arange(n, dtype=torch.long, device=xyz.device).view(1, 1, n).repeat([b, s, 1])
  sqrdists = square_distance(new_xyz, xyz)
  group_idx[sqrdists > radius**2] = n
  group_idx = group_idx.sort(dim=-1)[0][:, :, :nsample]
  group_first = group_idx[..., :1].repeat([1, 1, nsample])
  mask = group_idx == n
  group_idx[mask] = group_first[mask]
  return group_idx


def sample_and_group(npoint, radius, nsample, xyz, points, start_idx=0):
  """xyz (B, N, 3), points (B, N, D) -> centres (B, S, 3), grouped [xyz - centre | points] (B, S, K, 3 + D)."""
  b, _, c = xyz.shape
  fps_idx = farthest_point_sample(xyz, npoint, start_idx)
  new_xyz = index_points(xyz, fps_idx)
  idx = query_ball_point(radius, nsample, xyz, new_xyz)
  grouped_xyz_norm = index_points(xyz, idx) - new_xyz.view(b, npoint, 1, c)
  if points is not None:
    return new_xyz, torch.cat([grouped_xyz_norm, index_points(points, idx)], dim=-1)
  return new_xyz, grouped_xyz_norm


class PointNetSetAbstraction(nn.Module):
  """OpenShape's PointNetSetAbstraction (group_all=False, the only form PPAT builds)."""

  def __init__(self, npoint: int, radius: float, nsample: int, in_channel: int, mlp: list[int]):
    super().__init__()
    self.npoint, self.radius, self.nsample = npoint, radius, nsample
    self.fps_start = 0
    self.mlp_convs = nn.ModuleList()
    self.mlp_bns = nn.ModuleList()
    last_channel = in_channel
    for out_channel in mlp:
      self.mlp_convs.append(nn.Conv2d(last_channel, out_channel, 1))
      self.mlp_bns.append(nn.BatchNorm2d(out_channel))
      last_channel = out_channel

  def forward(self, xyz: torch.Tensor, points: torch.Tensor | None):
    """xyz (B, 3, N), points (B, D, N) -> centres (B, 3, S), features (B, mlp[-1], S)."""
    xyz = xyz.permute(0, 2, 1)
    if points is not None:
      points = points.permute(0, 2, 1)
    new_xyz, new_points = sample_and_group(self.npoint, self.radius, self.nsample, xyz, points, self.fps_start)
    new_points = new_points.permute(0, 3, 2, 1)  # [B, C + D, nsample, npoint]
    for conv, bn in zip(self.mlp_convs, self.mlp_bns):
      new_points = F.relu(bn(conv(new_points)))
    return new_xyz.permute(0, 2, 1), torch.max(new_points, 2)[0]


class PreNorm(nn.Module):
  def __init__(self, dim: int, fn: nn.Module):
    super().__init__()
    self.norm = nn.LayerNorm(dim)
    self.fn = fn

  def forward(self, x, *extra_args, **kwargs):
    return self.fn(self.norm(x), *extra_args, **kwargs)


class FeedForward(nn.Module):
  def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
    super().__init__()
    self.net = nn.Sequential(
      nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim), nn.Dropout(dropout)
    )

  def forward(self, x):
    return self.net(x)


class Attention(nn.Module):
  def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
    super().__init__()
    inner_dim = dim_head * heads
    project_out = not (heads == 1 and dim_head == dim)
    self.heads = heads
    self.scale = dim_head**-0.5
    self.attend = nn.Softmax(dim=-1)
    self.dropout = nn.Dropout(dropout)
    self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
    self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

  def forward(self, x, centroid_delta=None):
    b, n, _ = x.shape
    q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
    dots = (torch.matmul(q, k.transpose(-1, -2)) + 0) * self.scale  # `+ pe`, 0 without rel_pe
    attn = self.dropout(self.attend(dots))
    out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, -1)
    return self.to_out(out)


class Transformer(nn.Module):
  def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
    super().__init__()
    self.layers = nn.ModuleList([])
    for _ in range(depth):
      self.layers.append(
        nn.ModuleList(
          [
            PreNorm(dim, Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)),
            PreNorm(dim, FeedForward(dim, mlp_dim, dropout=dropout)),
          ]
        )
      )

  def forward(self, x, centroid_delta=None):
    for attn, ff in self.layers:
      x = attn(x, centroid_delta) + x
      x = ff(x) + x
    return x


class Permute(nn.Module):
  """torch_redstone.Lambda(lambda x: torch.permute(x, [0, 2, 1])) in OpenShape's `lift`."""

  def forward(self, x):
    return torch.permute(x, [0, 2, 1])


class PointPatchTransformer(nn.Module):
  def __init__(
    self,
    dim: int,
    depth: int,
    heads: int,
    mlp_dim: int,
    sa_dim: int,
    patches: int,
    prad: float,
    nsamp: int,
    in_dim: int = 3,
    dim_head: int = 64,
    patch_dropout: int = 0,
  ):
    super().__init__()
    self.patches = patches
    self.patch_dropout = patch_dropout
    self.sa = PointNetSetAbstraction(
      npoint=patches, radius=prad, nsample=nsamp, in_channel=in_dim + 3, mlp=[64, 64, sa_dim]
    )
    self.lift = nn.Sequential(nn.Conv1d(sa_dim + 3, dim, 1), Permute(), nn.LayerNorm([dim]))
    self.cls_token = nn.Parameter(torch.randn(dim))
    self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, 0.0)

  def forward(self, xyz: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """xyz (B, 3, N), features (B, in_dim, N) -> the cls token (B, dim)."""
    self.sa.npoint = self.patches
    if self.training:
      self.sa.npoint -= self.patch_dropout
    centroids, feature = self.sa(xyz, features)
    x = self.lift(torch.cat([centroids, feature], dim=1))
    x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=-2)  # rst.supercat([cls_token, x], dim=-2)
    return self.transformer(x)[:, 0]


class Projected(nn.Module):
  """OpenShape's Projected(ppat, proj): forward(xyz (B, N, 3), features (B, N, in_dim)) -> (B, out_channel)."""

  def __init__(self, ppat: PointPatchTransformer, proj: nn.Module):
    super().__init__()
    self.ppat = ppat
    self.proj = proj

  @property
  def fps_start(self) -> int:
    return self.ppat.sa.fps_start

  @fps_start.setter
  def fps_start(self, value) -> None:
    self.ppat.sa.fps_start = value

  def forward(self, xyz: torch.Tensor, features: torch.Tensor, device=None, quantization_size=0.05) -> torch.Tensor:
    return self.proj(self.ppat(xyz.transpose(-1, -2).contiguous(), features.transpose(-1, -2).contiguous()))


def make(scaling: int = 4, in_channel: int = 6, out_channel: int = 1280, **overrides) -> Projected:
  """OpenShape's ppat.make(cfg) for cfg.model.{scaling, in_channel, out_channel}. overrides: PointPatchTransformer
  arguments (dim, depth, heads, mlp_dim, sa_dim, patches, prad, nsamp, dim_head, patch_dropout), for small test
  models of the same structure."""
  s = OPENSHAPE_SCALINGS[scaling]
  kwargs = dict(
    dim=s['width'],
    depth=s['depth'],
    heads=s['num_heads'],
    mlp_dim=s['mlp_dim'],
    sa_dim=s['sa_dim'],
    patches=s['num_patches'],
    prad=s['radius'],
    nsamp=s['num_samples'],
  )
  if 'in_dim' in overrides:
    raise TypeError('make: pass the input channels as in_channel, not in_dim')
  kwargs.update(overrides)
  return Projected(PointPatchTransformer(**kwargs, in_dim=in_channel), nn.Linear(kwargs['dim'], out_channel))


def num_parameters(module: nn.Module) -> int:
  return sum(math.prod(p.shape) for p in module.parameters())
