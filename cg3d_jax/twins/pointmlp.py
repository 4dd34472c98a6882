"""PyTorch twin of CG3D's PointMLP `ModelProject` (models/PointMLP.py at CG3D commit 839be55), for parity and export.

Module and parameter names are exactly the original's, so `PointMLPProject().state_dict()` has the 232 entries a
strict `load_state_dict` into CG3D's `pointMLPProject()` needs. Only the configuration CG3D uses is mirrored:
groups=1, bias=False convs, ReLU, use_xyz=False, normalize="anchor". Farthest-point sampling and kNN come from the
shared twins (the CUDA op's rules and the original's squared-distance formula).

Differences from the original that do not change results: the input is (B, N, 3) (the original takes (B, 3, N) and
transposes back), ReLUs are not in-place, and the final squeeze keeps the batch axis when B == 1.
"""

import torch
from torch import nn

from cg3d_jax.twins.point_transformer import torch_farthest_point_sample, torch_knn


def _index_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
  """points (B, N, C), idx (B, ...) -> (B, ..., C)."""
  batch = torch.arange(points.shape[0], device=points.device).view(-1, *([1] * (idx.dim() - 1)))
  return points[batch, idx.long()]


class ConvBNReLU1D(nn.Module):
  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.net = nn.Sequential(
      nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm1d(out_channels), nn.ReLU()
    )

  def forward(self, x):
    return self.net(x)


class ConvBNReLURes1D(nn.Module):
  def __init__(self, channel: int, res_expansion: float = 1.0):
    super().__init__()
    hidden = int(channel * res_expansion)
    self.act = nn.ReLU()
    self.net1 = nn.Sequential(nn.Conv1d(channel, hidden, kernel_size=1, bias=False), nn.BatchNorm1d(hidden), nn.ReLU())
    self.net2 = nn.Sequential(nn.Conv1d(hidden, channel, kernel_size=1, bias=False), nn.BatchNorm1d(channel))

  def forward(self, x):
    return self.act(self.net2(self.net1(x)) + x)


class LocalGrouper(nn.Module):
  """FPS anchors, kNN groups, "anchor" normalisation with one unbiased std per cloud, anchor features appended."""

  def __init__(self, channel: int, groups: int, kneighbors: int):
    super().__init__()
    self.groups = groups
    self.kneighbors = kneighbors
    self.affine_alpha = nn.Parameter(torch.ones([1, 1, 1, channel]))
    self.affine_beta = nn.Parameter(torch.zeros([1, 1, 1, channel]))

  def forward(self, xyz, points):
    b = xyz.shape[0]
    fps_idx = torch_farthest_point_sample(xyz.contiguous(), self.groups).long()
    new_xyz = _index_points(xyz, fps_idx)
    new_points = _index_points(points, fps_idx)
    idx = torch_knn(new_xyz, xyz, self.kneighbors)
    grouped = _index_points(points, idx)
    mean = new_points.unsqueeze(-2)
    std = torch.std((grouped - mean).reshape(b, -1), dim=-1, keepdim=True).unsqueeze(-1).unsqueeze(-1)
    grouped = (grouped - mean) / (std + 1e-5)
    grouped = self.affine_alpha * grouped + self.affine_beta
    repeated = new_points.view(b, self.groups, 1, -1).repeat(1, 1, self.kneighbors, 1)
    return new_xyz, torch.cat([grouped, repeated], dim=-1)


class PreExtraction(nn.Module):
  def __init__(self, channels: int, out_channels: int, blocks: int, res_expansion: float = 1.0):
    super().__init__()
    self.transfer = ConvBNReLU1D(2 * channels, out_channels)
    self.operation = nn.Sequential(*[ConvBNReLURes1D(out_channels, res_expansion) for _ in range(blocks)])

  def forward(self, x):  # (b, n, s, d) -> (b, d', n)
    b, n, s, d = x.shape
    x = x.permute(0, 1, 3, 2).reshape(-1, d, s)
    x = self.operation(self.transfer(x))
    x = torch.amax(x, dim=-1)
    return x.reshape(b, n, -1).permute(0, 2, 1)


class PosExtraction(nn.Module):
  def __init__(self, channels: int, blocks: int, res_expansion: float = 1.0):
    super().__init__()
    self.operation = nn.Sequential(*[ConvBNReLURes1D(channels, res_expansion) for _ in range(blocks)])

  def forward(self, x):  # (b, d, g)
    return self.operation(x)


class PointMLPProject(nn.Module):
  """CG3D's `pointMLPProject()`: forward(points (B, N, 3)) -> (B, projection_dim).

  As in the original, anchor counts are fixed at construction from `points` (1024 // 2, // 4, ...).
  """

  def __init__(
    self,
    points: int = 1024,
    embed_dim: int = 64,
    res_expansion: float = 1.0,
    dim_expansion=(2, 2, 2, 2),
    pre_blocks=(2, 2, 2, 2),
    pos_blocks=(2, 2, 2, 2),
    k_neighbors=(24, 24, 24, 24),
    reducers=(2, 2, 2, 2),
    projection_dim: int = 512,
    in_channels: int = 3,
  ):
    super().__init__()
    self.stages = len(pre_blocks)
    self.points = points
    self.embedding = ConvBNReLU1D(in_channels, embed_dim)  # 6: OpenShape's coloured PointMLP (xyz + rgb)
    self.local_grouper_list = nn.ModuleList()
    self.pre_blocks_list = nn.ModuleList()
    self.pos_blocks_list = nn.ModuleList()
    last_channel, anchor_points = embed_dim, points
    for i in range(self.stages):
      out_channel = last_channel * dim_expansion[i]
      anchor_points = anchor_points // reducers[i]
      self.local_grouper_list.append(LocalGrouper(last_channel, anchor_points, k_neighbors[i]))
      self.pre_blocks_list.append(PreExtraction(last_channel, out_channel, pre_blocks[i], res_expansion))
      self.pos_blocks_list.append(PosExtraction(out_channel, pos_blocks[i], res_expansion))
      last_channel = out_channel
    # The original hard-codes Conv1d(1024, 512, 1); last_channel is 1024 in CG3D's configuration.
    self.projection = nn.Conv1d(last_channel, projection_dim, kernel_size=1)

  def forward(self, pts):
    xyz = pts[..., :3].contiguous()
    x = self.embedding(pts.permute(0, 2, 1))
    for i in range(self.stages):
      xyz, x = self.local_grouper_list[i](xyz, x.permute(0, 2, 1))
      x = self.pre_blocks_list[i](x)
      x = self.pos_blocks_list[i](x)
    x = torch.amax(x, dim=-1)
    return self.projection(x.unsqueeze(-1)).squeeze(-1)
