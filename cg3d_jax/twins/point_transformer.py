"""PyTorch twins of the point encoders, with exactly the original CG3D parameter names and shapes.

They exist for parity tests and exports only (torch is never on the training path). The point ops here follow
the same rules as cg3d_jax/models/point_ops.py (CUDA FPS rules with lowest-index ties; kNN ranked by the expanded
squared distance), written in plain torch so that they run on CPU without the original CUDA extensions.
"""

import math

import numpy as np
import torch
from torch import nn

_ORIGIN_SQ_NORM = float(np.nextafter(np.float32(1e-3), np.float32(0.0)))  # see point_ops: CUDA's `mag <= 1e-3`


def _selection(x: torch.Tensor) -> torch.Tensor:
  """Distances are compared in float32, or float64 for float64 input, as point_ops.selection_dtype."""
  return x.detach().double() if x.dtype == torch.float64 else x.detach().float()


def torch_farthest_point_sample(xyz: torch.Tensor, num_samples: int) -> torch.Tensor:
  """(B, N, 3) -> (B, num_samples) int64 indices; rules of point_ops.farthest_point_sample."""
  xyz = _selection(xyz)
  batch, n, _ = xyz.shape
  x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
  is_candidate = (x * x + y * y + z * z) > _ORIGIN_SQ_NORM
  min_sq_dist = torch.full((batch, n), 1e10, dtype=xyz.dtype, device=xyz.device)
  out = torch.zeros(batch, num_samples, dtype=torch.int64, device=xyz.device)
  last = torch.zeros(batch, dtype=torch.int64, device=xyz.device)
  rows = torch.arange(batch, device=xyz.device)
  for j in range(1, num_samples):
    p = xyz[rows, last]
    dx, dy, dz = x - p[:, 0:1], y - p[:, 1:2], z - p[:, 2:3]
    d = dx * dx + dy * dy + dz * dz
    min_sq_dist = torch.where(is_candidate, torch.minimum(min_sq_dist, d), min_sq_dist)
    last = torch.argmax(torch.where(is_candidate, min_sq_dist, torch.full_like(d, -1.0)), dim=1)  # first max
    out[:, j] = last
  return out


def torch_pairwise_squared_distance(queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
  """(B, S, C), (B, N, C) -> (B, S, N): (-2 a.b + |a|^2) + |b|^2, the originals' square_distance."""
  dist = -2 * torch.matmul(queries, points.transpose(1, 2))
  dist = dist + torch.sum(queries**2, -1)[:, :, None]
  return dist + torch.sum(points**2, -1)[:, None, :]


def torch_knn(queries: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
  """(B, S, C), (B, N, C) -> (B, S, k) int64, nearest first, ties to the lower index (stable sort)."""
  dist = torch_pairwise_squared_distance(_selection(queries), _selection(points))
  return torch.sort(dist, dim=-1, stable=True).indices[..., :k]


def torch_gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
  """points (B, N, C), idx (B, ...) -> (B, ..., C)."""
  batch = points.shape[0]
  flat = idx.reshape(batch, -1)
  out = torch.gather(points, 1, flat[..., None].expand(-1, -1, points.shape[-1]))
  return out.reshape(*idx.shape, points.shape[-1])


def torch_group(pts: torch.Tensor, num_groups: int, group_size: int):
  """Point-BERT's Group: (B, N, 3) -> neighbourhood (B, G, K, 3) centred, centres (B, G, 3); with colours
  (B, N, 3 + F), ULIP-2's: grouped on xyz, the neighbours' colours appended after the centred xyz."""
  xyz = pts[..., :3]
  centres = torch_gather_points(xyz, torch_farthest_point_sample(xyz, num_groups))
  idx = torch_knn(centres, xyz, group_size)
  neighbourhood = torch_gather_points(xyz, idx) - centres[:, :, None, :]
  if pts.shape[-1] > 3:
    neighbourhood = torch.cat([neighbourhood, torch_gather_points(pts[..., 3:].contiguous(), idx)], dim=-1)
  return neighbourhood, centres


class Encoder(nn.Module):
  """Point-BERT's mini-PointNet (Conv1d 1x1 stacks over each group's points)."""

  def __init__(self, encoder_channel: int, input_dim: int = 3):
    super().__init__()
    self.encoder_channel = encoder_channel
    self.first_conv = nn.Sequential(
      nn.Conv1d(input_dim, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
    )
    self.second_conv = nn.Sequential(
      nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, encoder_channel, 1)
    )

  def forward(self, point_groups: torch.Tensor) -> torch.Tensor:
    bs, g, n, c = point_groups.shape
    feature = self.first_conv(point_groups.reshape(bs * g, n, c).transpose(2, 1))
    feature_global = torch.max(feature, dim=2, keepdim=True)[0]
    feature = torch.cat([feature_global.expand(-1, -1, n), feature], dim=1)
    feature = self.second_conv(feature)
    return torch.max(feature, dim=2)[0].reshape(bs, g, self.encoder_channel)


class DropPath(nn.Module):
  def __init__(self, drop_prob: float):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.drop_prob == 0.0 or not self.training:
      return x
    keep = 1 - self.drop_prob
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype)).floor_()
    return x.div(keep) * mask


class Mlp(nn.Module):
  def __init__(self, in_features: int, hidden_features: int):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=False)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
    super().__init__()
    # Registration order norm1, norm2, mlp, attn: the original's, which fixes the state-dict key order.
    self.norm1 = nn.LayerNorm(dim)
    self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.attn = Attention(dim, num_heads)

  def forward(self, x):
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
  def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: list[float]):
    super().__init__()
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, drop_path_rate[i]) for i in range(depth)])

  def forward(self, x, pos):
    for block in self.blocks:
      x = block(x + pos)  # the position embedding enters every block
    return x


class PointTransformerProject(nn.Module):
  """CG3D's PointTransformerProject: state-dict names/shapes as the original (166 entries at the real config)."""

  def __init__(
    self,
    width: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    num_groups: int = 64,
    group_size: int = 32,
    encoder_dim: int = 256,
    drop_path_rate: float = 0.1,
    embed_dim: int = 512,
    num_classes: int | None = 55,
    head_hidden: int = 256,
    head_dropout: float = 0.5,
    in_channels: int = 3,
    projection: bool = True,
  ):
    super().__init__()
    self.num_groups, self.group_size = num_groups, group_size
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.cls_pos = nn.Parameter(torch.randn(1, 1, width))
    self.encoder = Encoder(encoder_dim, input_dim=in_channels)  # 6: ULIP-2's PointTransformer_Colored
    self.reduce_dim = nn.Linear(encoder_dim, width)
    if projection:  # ULIP's point encoders have none: the model around them holds pc_projection
      self.projection = nn.Linear(2 * width, embed_dim)
    self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
    dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
    self.blocks = TransformerEncoder(width, depth, num_heads, mlp_ratio, dpr)
    self.norm = nn.LayerNorm(width)
    if num_classes is not None:
      self.cls_head_finetune = nn.Sequential(
        nn.Linear(2 * width, head_hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(head_dropout),
        nn.Linear(head_hidden, num_classes),
      )
    self.apply(self._init_weights)
    nn.init.trunc_normal_(self.cls_pos, std=0.02)

  @staticmethod
  def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Conv1d)):
      nn.init.trunc_normal_(m.weight, std=0.02)
      if m.bias is not None:
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)

  def pooled_features(self, pts: torch.Tensor) -> torch.Tensor:
    """(B, N, 3 or 6) -> (B, 2 * width): [cls | max over group tokens] after the final LayerNorm."""
    neighborhood, center = torch_group(pts, self.num_groups, self.group_size)
    tokens = self.reduce_dim(self.encoder(neighborhood))
    b = tokens.shape[0]
    x = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
    pos = torch.cat((self.cls_pos.expand(b, -1, -1), self.pos_embed(center)), dim=1)
    x = self.norm(self.blocks(x, pos))
    return torch.cat([x[:, 0], x[:, 1:].max(1)[0]], dim=-1)

  def forward(self, pts: torch.Tensor) -> torch.Tensor:
    return self.projection(self.pooled_features(pts))

  def forward_logits(self, pts: torch.Tensor) -> torch.Tensor:
    return self.cls_head_finetune(self.pooled_features(pts))


class ULIPPointBERT(nn.Module):
  """ULIP's point side (salesforce/ULIP models/ULIP_models.py): `point_encoder` (models/pointbert/point_encoder.py
  PointTransformer, or PointTransformer_Colored with in_channels=6: CG3D's blocks without projection or head) and the
  bias-free `pc_projection` [2 x width, embed_dim] its encode_pc multiplies with; the keys of the released files'
  `state_dict` after `module.`, the CLIP towers aside. ULIP-1: 512 wide to SLIP's 512; ULIP-2: 18 blocks, xyz + rgb,
  to OpenCLIP ViT-bigG-14's 1280."""

  def __init__(
    self,
    *,
    depth: int = 12,
    embed_dim: int = 512,
    in_channels: int = 3,
    width: int = 384,
    num_heads: int = 6,
    num_groups: int = 512,
    group_size: int = 32,
    encoder_dim: int = 256,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.1,
  ):
    super().__init__()
    self.point_encoder = PointTransformerProject(
      width=width,
      depth=depth,
      num_heads=num_heads,
      mlp_ratio=mlp_ratio,
      num_groups=num_groups,
      group_size=group_size,
      encoder_dim=encoder_dim,
      drop_path_rate=drop_path_rate,
      num_classes=None,
      in_channels=in_channels,
      projection=False,
    )
    self.pc_projection = nn.Parameter(torch.empty(2 * width, embed_dim))
    nn.init.normal_(self.pc_projection, std=embed_dim**-0.5)

  def forward(self, pts: torch.Tensor) -> torch.Tensor:
    """ULIP's encode_pc: the pooled feature times pc_projection (not normalised)."""
    return self.point_encoder.pooled_features(pts) @ self.pc_projection


def num_parameters(module: nn.Module) -> int:
  return sum(math.prod(p.shape) for p in module.parameters())
