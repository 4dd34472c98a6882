"""PyTorch reference of SLIP's CLIP (facebookresearch/SLIP `models.py`) and of CG3D's prompted image tower, for parity.

The image tower is timm's own `VisionTransformer` (timm from PyPI, tests/reference_requirements.txt) configured as
SLIP's `timm.create_model('vit_base_patch16_224', num_classes=0)` is: qkv bias, exact GELU, LayerNorm eps 1e-6,
class token, no pre-norm, final norm, class-token pooling. The text tower is written here after OpenAI CLIP's, as
SLIP's `Transformer` is (nn.MultiheadAttention with a fused in-projection, quick GELU, additive causal mask, LND
layout). The prompted forward follows CG3D's `VisionTransformerPromptDeep`: prompts after the class token once the
position embedding is added, overwritten before every later block in deep mode.

timm imports torchvision, whose PyPI wheel is a CUDA build: installed beside the CPU torch pin its operators do not
load, and torchvision's import fails on `torchvision::nms` missing. Both live in `.reference_libs` (installed with
--no-deps, README), which only this module puts on sys.path, after defining the two operator schemas torchvision's
import registers fake kernels for (`torchvision::nms`, `torchvision::qnms`); nothing calls them. The rest of the
environment never sees this torchvision (installed there, it would break transformers' import of CLIPModel).
"""

import collections
import pathlib
import sys

import torch
from torch import nn

REFERENCE_LIBS = pathlib.Path(__file__).resolve().parents[1] / '.reference_libs'
_SCHEMAS = None


def _import_timm():
  global _SCHEMAS
  if not (REFERENCE_LIBS / 'timm').is_dir():
    raise RuntimeError(
      f'{REFERENCE_LIBS} has no timm: install the reference libraries with `pip install --no-deps '
      f'--upgrade --target .reference_libs -r tests/reference_requirements.txt` (README, Install)'
    )
  if _SCHEMAS is None:
    _SCHEMAS = torch.library.Library('torchvision', 'DEF')  # kept alive: the schemas live as long as this object
    for op in ('nms', 'qnms'):
      _SCHEMAS.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  if str(REFERENCE_LIBS) not in sys.path:
    sys.path.append(str(REFERENCE_LIBS))
  from timm.models.vision_transformer import VisionTransformer

  return VisionTransformer


def vision_transformer(*, width: int, layers: int, heads: int, patch_size: int, image_size: int) -> nn.Module:
  """timm's VisionTransformer as SLIP builds its image tower (the vit_*_patch16_224 defaults, num_classes=0)."""
  VisionTransformer = _import_timm()
  return VisionTransformer(
    img_size=image_size,
    patch_size=patch_size,
    embed_dim=width,
    depth=layers,
    num_heads=heads,
    mlp_ratio=4.0,
    qkv_bias=True,
    num_classes=0,
  )


class QuickGELU(nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
  def __init__(self, width: int, heads: int, mask: torch.Tensor):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(
      collections.OrderedDict(
        [('c_fc', nn.Linear(width, 4 * width)), ('gelu', QuickGELU()), ('c_proj', nn.Linear(4 * width, width))]
      )
    )
    self.ln_2 = nn.LayerNorm(width)
    self.register_buffer('mask', mask, persistent=False)

  def forward(self, x):  # (L, N, D)
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.mask.to(x.dtype))[0]
    return x + self.mlp(self.ln_2(x))


class SLIPCLIP(nn.Module):
  """SLIP's CLIP with its SSL head, in SLIP's parameter names (`state_dict()` loads a SLIP file's, prefix stripped)."""

  def __init__(
    self,
    *,
    vision_width,
    vision_layers,
    vision_heads,
    patch_size,
    image_size,
    text_width,
    text_layers,
    embed_dim,
    vocab_size=49408,
    context_length=77,
    ssl_mlp_dim=64,
    ssl_emb_dim=32,
  ):
    super().__init__()
    self.visual = vision_transformer(
      width=vision_width, layers=vision_layers, heads=vision_heads, patch_size=patch_size, image_size=image_size
    )
    mask = torch.full((context_length, context_length), float('-inf')).triu_(1)
    self.transformer = nn.Module()
    self.transformer.resblocks = nn.Sequential(
      *[ResidualAttentionBlock(text_width, text_width // 64, mask) for _ in range(text_layers)]
    )
    self.token_embedding = nn.Embedding(vocab_size, text_width)
    self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
    self.ln_final = nn.LayerNorm(text_width)
    self.image_projection = nn.Parameter(torch.empty(vision_width, embed_dim))
    self.text_projection = nn.Parameter(torch.empty(text_width, embed_dim))
    self.logit_scale = nn.Parameter(torch.ones([]))
    self.image_mlp = nn.Sequential(
      collections.OrderedDict(
        [
          ('layer1', nn.Linear(vision_width, ssl_mlp_dim)),
          ('bn1', nn.BatchNorm1d(ssl_mlp_dim)),
          ('relu1', nn.ReLU()),
          ('layer2', nn.Linear(ssl_mlp_dim, ssl_mlp_dim)),
          ('bn2', nn.BatchNorm1d(ssl_mlp_dim)),
          ('relu2', nn.ReLU()),
          ('layer3', nn.Linear(ssl_mlp_dim, ssl_emb_dim)),
        ]
      )
    )

  def encode_image(self, image):  # NCHW
    return self.visual(image) @ self.image_projection

  def encode_text(self, text):
    x = self.token_embedding(text) + self.positional_embedding
    x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = self.ln_final(x)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def prompted_class_token(
  visual: nn.Module, pixels: torch.Tensor, prompts: torch.Tensor, deep: torch.Tensor | None
) -> torch.Tensor:
  """CG3D's VisionTransformerPromptDeep forward to the normed class token: prompts (1, n, D) after the class token
  (no position embedding), deep (layers - 1, n, D) overwriting the n prompt positions before blocks 1.."""
  x = visual._pos_embed(visual.patch_embed(pixels))
  x = visual.norm_pre(x)
  n = prompts.shape[1]
  batch = x.shape[0]
  x = torch.cat([x[:, :1], prompts.expand(batch, -1, -1), x[:, 1:]], dim=1)
  for i, block in enumerate(visual.blocks):
    if i > 0 and deep is not None:
      x = torch.cat([x[:, :1], deep[i - 1][None].expand(batch, -1, -1), x[:, 1 + n :]], dim=1)
    x = block(x)
  return visual.norm(x)[:, 0]
