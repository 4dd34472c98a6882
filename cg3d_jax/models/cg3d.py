"""The CG3D composite: a trainable point encoder beside a frozen, prompt-tuned CLIP.

Parameters are kept as one tree `{'encoder': ..., 'clip': ...}` where `clip['prompts']` is the only trainable part
of CLIP. The functions here return L2-normalised features in CLIP's joint space; training and evaluation compose
them (see cg3d_jax/training/pretrain_step.py and cg3d_jax/evaluators/).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cg3d_jax.models.clip import CLIP
from cg3d_jax.models.layers import l2_normalize, stats_dtype
from cg3d_jax.models.point_transformer import PointTransformer
from cg3d_jax.models.pointmlp import PointMLP
from cg3d_jax.models.ppat import PPAT
from cg3d_jax.models.uni3d import Uni3D

ENCODERS = {'point_transformer': PointTransformer, 'pointmlp': PointMLP, 'ppat': PPAT, 'uni3d': Uni3D}


def build_encoder(model_config) -> nn.Module:
  """The point encoder named by `config.model.encoder`, sized from the config."""
  name = model_config.encoder
  if name not in ENCODERS:
    raise ValueError(f'config.model.encoder must be one of {sorted(ENCODERS)}, got {name!r}')
  return ENCODERS[name].from_config(model_config)


@dataclasses.dataclass(frozen=True)
class CG3D:
  """Both towers and how they are called; holds modules, not parameters."""

  encoder: nn.Module
  clip: CLIP
  num_points: int

  def point_features(self, encoder_vars: dict, points, *, train: bool = False, rngs: dict | None = None):
    """(B, N, 3 | 6) clouds at the encoder's input size -> (normalised features (B, D), updated batch_stats or None)."""
    if train:
      out, updates = self.encoder.apply(encoder_vars, points, train=True, rngs=rngs, mutable=['batch_stats'])
      return l2_normalize(out), updates.get('batch_stats')
    return l2_normalize(self.encoder.apply(encoder_vars, points, train=False)), None

  def image_features(self, clip_params: dict, pixels):
    return l2_normalize(self.clip.apply({'params': clip_params}, pixels, method=CLIP.encode_image))

  def text_features(self, clip_params: dict, input_ids):
    return l2_normalize(self.clip.apply({'params': clip_params}, input_ids, method=CLIP.encode_text))

  def caption_table(self, clip_params: dict, token_ids, batch_size: int = 256):
    """Normalised text features for captions laid out as (..., L) token ids -> (..., D), in jitted chunks.

    The text tower is frozen and has no prompts, so the table for every (template, class) caption is computed once
    and training looks rows up by index instead of running the text tower each step.
    """
    lead, length = token_ids.shape[:-1], token_ids.shape[-1]
    flat = jnp.asarray(token_ids).reshape(-1, length)
    encode = jax.jit(self.text_features)
    chunks = [encode(clip_params, flat[i : i + batch_size]) for i in range(0, flat.shape[0], batch_size)]
    return jnp.concatenate(chunks).reshape(*lead, -1)

  @staticmethod
  def logit_scale(clip_params: dict):
    """CLIP's temperature, frozen in CG3D: s = exp(logit_scale)."""
    return jnp.exp(clip_params['logit_scale'].astype(stats_dtype(clip_params['logit_scale'].dtype)))

  def init_encoder(self, rng, batch_size: int = 2) -> dict:
    """Fresh encoder variables ({'params', 'batch_stats'}) for clouds of `num_points`."""
    dummy = jnp.zeros((batch_size, self.num_points, 3), jnp.float32)
    # A non-degenerate dummy cloud: FPS skips points at the origin, so all-zero input would be a poor example.
    dummy = dummy + jnp.linspace(-1.0, 1.0, self.num_points)[None, :, None] * jnp.array([1.0, 0.5, 0.25])
    channels = getattr(self.encoder, 'in_channels', 3)
    if channels > 3:  # coloured clouds: a grey colour per point beside xyz
      dummy = jnp.concatenate([dummy, jnp.full(dummy.shape[:2] + (channels - 3,), 0.4, dummy.dtype)], axis=-1)
    params_rng, dropout_rng = jax.random.split(rng)
    # One compiled program instead of hundreds of eager op dispatches (tens of seconds at start-up on a CPU).
    init = jax.jit(lambda rngs, x: self.encoder.init(rngs, x, train=False))
    return dict(init({'params': params_rng, 'dropout': dropout_rng}, dummy))
