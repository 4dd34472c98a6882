"""PyTorch twin of Uni3D's point encoder: `models/uni3d.py` (`Uni3D`) and `models/point_encoder.py`
(`PointcloudEncoder`, `Group`, `Encoder`) of baaivision/Uni3D (commit 64e03c3c42c1), with the timm `Eva` trunk
that `timm.create_model(pc_model)` builds for it written out here (timm's EvaBlock, EvaAttention, GluMlp, SwiGLU and
Mlp, as timm 0.9.7 and 1.0.31 define them), with their module names and registration order, so that
`make(size).state_dict()` has exactly the keys, shapes and order of a released file's `checkpoint['module']` (with
`module.` stripped where a file has it): tests/fixtures/reference/uni3d_state_dict_keys.tsv.

For parity tests and exports only. Differences from the original, none of which changes a parameter:
  * the grouping is twins.point_transformer.torch_group: pointnet2_ops' CUDA farthest-point sampling written in
    plain torch (start at index 0, lowest index on exact ties), and the k nearest points by the same expanded
    squared distance Uni3D's `knn_point` ranks (a stable sort instead of `topk(sorted=False)`: the same set of
    neighbours, which the max-pooling mini-PointNet sees in any order);
  * timm's `Eva` keeps only what Uni3D reads or what its state dict holds: the image stem (cls_token, pos_embed,
    patch_embed.proj) and the head are built, with their shapes, but never called; the rotary embedding (non-
    persistent buffers, not in the state dict) is left out, as Uni3D never passes it to the blocks;
  * PatchDropout is built as Uni3D builds it (an Identity for patch_dropout 0, every evaluation); with p > 0 it drops
    tokens whether training or not, as Uni3D's does.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cg3d_jax.models.uni3d import EVA_NORM_EPS, PATCH_SIZE, UNI3D_SIZES
from cg3d_jax.twins.point_transformer import DropPath, Encoder, torch_group


def _layer_norm(dim: int) -> nn.LayerNorm:
  return nn.LayerNorm(dim, eps=EVA_NORM_EPS)  # timm's LayerNorm: nn.LayerNorm with eps 1e-6


class EvaAttention(nn.Module):
  """timm's EvaAttention (no rope argument given, no inner norm): q and v biases, a zero k bias buffer."""

  def __init__(self, dim: int, num_heads: int, qkv_fused: bool = True):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    if qkv_fused:
      self.qkv = nn.Linear(dim, dim * 3, bias=False)
      self.q_proj = self.k_proj = self.v_proj = None
      self.q_bias = nn.Parameter(torch.zeros(dim))
      self.register_buffer('k_bias', torch.zeros(dim), persistent=False)
      self.v_bias = nn.Parameter(torch.zeros(dim))
    else:
      self.q_proj = nn.Linear(dim, dim)
      self.k_proj = nn.Linear(dim, dim, bias=False)
      self.v_proj = nn.Linear(dim, dim)
      self.qkv = None
      self.q_bias = self.k_bias = self.v_bias = None
    self.norm = nn.Identity()
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    if self.qkv is not None:
      qkv = F.linear(x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))
      q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
      q = self.q_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
      k = self.k_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
      v = self.v_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # timm's unfused path
    x = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return self.proj(self.norm(x))


class GluMlp(nn.Module):
  """timm's GluMlp(act_layer=SiLU, gate_last=False): fc1 to 2 x hidden, silu(first half) * second half, fc2."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, 2 * hidden)
    self.act = nn.SiLU()
    self.norm = nn.Identity()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    x1, x2 = self.fc1(x).chunk(2, dim=-1)
    return self.fc2(self.norm(self.act(x1) * x2))


class SwiGLU(nn.Module):
  """timm's SwiGLU with EVA02's scale_mlp LayerNorm on the hidden units."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1_g = nn.Linear(dim, hidden)
    self.fc1_x = nn.Linear(dim, hidden)
    self.act = nn.SiLU()
    self.norm = _layer_norm(hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))


class Mlp(nn.Module):
  """timm's Mlp: fc1, exact GELU, fc2 (EVA-g)."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.norm = nn.Identity()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.norm(self.act(self.fc1(x))))


_MLPS = {'glu': GluMlp, 'swiglu': SwiGLU, 'gelu': Mlp}


class EvaBlock(nn.Module):
  """timm's EvaBlock, pre-norm, without layer scale (init_values None); Uni3D calls it as blk(x)."""

  def __init__(self, dim: int, num_heads: int, mlp: str, mlp_hidden: int, qkv_fused: bool, drop_path: float = 0.0):
    super().__init__()
    self.norm1 = _layer_norm(dim)
    self.attn = EvaAttention(dim, num_heads, qkv_fused)
    self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
    self.norm2 = _layer_norm(dim)
    self.mlp = _MLPS[mlp](dim, mlp_hidden)
    self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

  def forward(self, x):
    x = x + self.drop_path1(self.attn(self.norm1(x)))
    return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
  """timm's PatchEmbed parameters (a Conv2d 3 -> width, patch 14); Uni3D never calls it."""

  def __init__(self, width: int):
    super().__init__()
    self.proj = nn.Conv2d(3, width, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)


class EvaTrunk(nn.Module):
  """What Uni3D keeps of timm's `Eva` (`point_encoder.visual`), in its registration order: cls_token and pos_embed
  (own parameters first in the state dict), patch_embed, pos_drop, blocks, norm (Identity: global_pool 'avg'),
  fc_norm, head_drop, head (a Linear when the timm config has classes, else an Identity)."""

  def __init__(
    self,
    width: int,
    depth: int,
    num_heads: int,
    mlp: str,
    mlp_hidden: int,
    qkv_fused: bool,
    image_size: int,
    num_classes: int,
    drop_path_rate: float = 0.0,
  ):
    super().__init__()
    self.patch_embed = PatchEmbed(width)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // PATCH_SIZE) ** 2 + 1, width))
    self.pos_drop = nn.Dropout(p=0.0)
    dpr = np.linspace(0.0, drop_path_rate, depth).tolist()  # timm's linspace rule, without .item() (meta tensors)
    self.blocks = nn.ModuleList([EvaBlock(width, num_heads, mlp, mlp_hidden, qkv_fused, dpr[i]) for i in range(depth)])
    self.norm = nn.Identity()
    self.fc_norm = _layer_norm(width)
    self.head_drop = nn.Dropout(0.0)
    self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
    for m in self.modules():  # timm: trunc_normal_(std=.02) Linear weights, zero biases
      if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    nn.init.trunc_normal_(self.cls_token, std=0.02)


class PatchDropout(nn.Module):
  """Uni3D's PatchDropout, its training test commented out as in the original: it drops tokens in eval mode too."""

  def __init__(self, prob: float, exclude_first_token: bool = True):
    super().__init__()
    assert 0 <= prob < 1.0
    self.prob = prob
    self.exclude_first_token = exclude_first_token

  def forward(self, x):
    if self.exclude_first_token:
      cls_tokens, x = x[:, :1], x[:, 1:]
    else:
      cls_tokens = x[:, :1]
    batch, num_tokens = x.shape[:2]
    batch_indices = torch.arange(batch)[..., None]
    num_keep = max(1, int(num_tokens * (1 - self.prob)))
    keep = torch.randn(batch, num_tokens).topk(num_keep, dim=-1).indices
    x = x[batch_indices, keep]
    return torch.cat((cls_tokens, x), dim=1) if self.exclude_first_token else x


class Group(nn.Module):
  """Uni3D's Group: forward(xyz (B, N, 3), color (B, N, C)) -> (neighbourhood [xyz - centre | color] (B, G, K,
  3 + C), centres (B, G, 3)), with the grouping rules of twins.point_transformer.torch_group."""

  def __init__(self, num_group: int, group_size: int):
    super().__init__()
    self.num_group, self.group_size = num_group, group_size

  def forward(self, xyz: torch.Tensor, color: torch.Tensor | None):
    cloud = xyz if color is None or not color.shape[-1] else torch.cat([xyz, color], dim=-1)
    return torch_group(cloud, self.num_group, self.group_size)


class PointcloudEncoder(nn.Module):
  """Uni3D's PointcloudEncoder; forward(pts (B, N, 3), colors (B, N, C)) -> (B, embed_dim)."""

  def __init__(
    self,
    visual: EvaTrunk,
    width: int,
    embed_dim: int = 1024,
    group_size: int = 64,
    num_group: int = 512,
    encoder_dim: int = 512,
    patch_dropout: float = 0.0,
    in_channels: int = 6,
  ):
    super().__init__()
    self.trans_dim, self.embed_dim = width, embed_dim
    self.group_size, self.num_group = group_size, num_group
    self.group_divider = Group(num_group=num_group, group_size=group_size)
    self.encoder_dim = encoder_dim
    self.encoder = Encoder(encoder_dim, input_dim=in_channels)  # Uni3D's Encoder is Conv1d(6, ...): in_channels 6
    self.encoder2trans = nn.Linear(encoder_dim, width)
    self.trans2embed = nn.Linear(width, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.cls_pos = nn.Parameter(torch.randn(1, 1, width))
    self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
    self.patch_dropout = PatchDropout(patch_dropout) if patch_dropout > 0.0 else nn.Identity()
    self.visual = visual

  def features(self, pts: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """(B, width): the cls token after the blocks, visual.norm and visual.fc_norm."""
    features, center = self.group_divider(pts, colors)
    group_input_tokens = self.encoder2trans(self.encoder(features))
    b = group_input_tokens.size(0)
    x = torch.cat((self.cls_token.expand(b, -1, -1), group_input_tokens), dim=1)
    pos = torch.cat((self.cls_pos.expand(b, -1, -1), self.pos_embed(center)), dim=1)
    x = self.visual.pos_drop(self.patch_dropout(x + pos))
    for blk in self.visual.blocks:
      x = blk(x)
    return self.visual.fc_norm(self.visual.norm(x[:, 0, :]))

  def forward(self, pts: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    return self.trans2embed(self.features(pts, colors))


class Uni3D(nn.Module):
  """Uni3D's model without its CLIP teacher: logit_scale (log(1 / 0.07)) and the point encoder."""

  def __init__(self, point_encoder: PointcloudEncoder):
    super().__init__()
    self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
    self.point_encoder = point_encoder

  def encode_pc(self, pc: torch.Tensor) -> torch.Tensor:
    """(B, N, 6) xyz + rgb -> (B, embed_dim), not normalised."""
    return self.point_encoder(pc[:, :, :3].contiguous(), pc[:, :, 3:].contiguous())

  def forward(self, pc: torch.Tensor) -> torch.Tensor:
    return self.encode_pc(pc)


def make(
  size: str = 'giant',
  *,
  depth: int | None = None,
  embed_dim: int = 1024,
  num_group: int = 512,
  group_size: int = 64,
  encoder_dim: int = 512,
  in_channels: int = 6,
  drop_path_rate: float = 0.0,
  patch_dropout: float = 0.0,
) -> Uni3D:
  """Uni3D's create_uni3d(args) for scripts/inference.sh's `size` (timm model, --pc-feat-dim) with its other
  arguments (--num-group 512 --group-size 64 --pc-encoder-dim 512 --embed-dim 1024); depth: fewer blocks (tests)."""
  s = UNI3D_SIZES[size]
  visual = EvaTrunk(
    s['width'],
    s['depth'] if depth is None else depth,
    s['num_heads'],
    s['mlp'],
    s['mlp_hidden'],
    s['qkv_fused'],
    s['image_size'],
    s['num_classes'],
    drop_path_rate,
  )
  encoder = PointcloudEncoder(
    visual,
    s['width'],
    embed_dim=embed_dim,
    group_size=group_size,
    num_group=num_group,
    encoder_dim=encoder_dim,
    patch_dropout=patch_dropout,
    in_channels=in_channels,
  )
  return Uni3D(encoder)


def num_parameters(module: nn.Module) -> int:
  return sum(math.prod(p.shape) for p in module.parameters())
