"""Point classifiers for fine-tuning: a CG3D point encoder with a classification head.

The classifier's variables are the encoder's own tree plus its head, at the top level:
  PointTransformer(num_classes=C): the pretraining tree; head cls_head_0 (2W -> 256), cls_head_1 (256 -> C), the
      original's cls_head_finetune = Linear, ReLU, Dropout(0.5), Linear. The module always builds its CLIP
      `projection`; fine-tuning never reads it (the logits path), so it stays as initialised, is frozen (no optimizer
      state, no decay) and is left out of exports.
  PointMLPClassifier (below): PointMLP's trunk tree without `projection`; head classifier_0 (1024 -> 512),
      classifier_1 (BN), classifier_4 (512 -> 256), classifier_5 (BN), classifier_8 (256 -> C): the original
      pointMLP classifier Sequential's indices.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cg3d_jax.models import pointmlp
from cg3d_jax.models.layers import TorchBatchNorm
from cg3d_jax.models.point_transformer import PointTransformer

ENCODERS = ('point_transformer', 'pointmlp')
# The head's leaves per encoder: what initialisation from pretraining must not copy.
HEAD_PREFIXES = {'point_transformer': ('cls_head_',), 'pointmlp': ('classifier_',)}


class PointMLPClassifier(pointmlp.PointMLP):
  """PointMLP's trunk with the original classifier head; __call__(points, train=...) -> (B, num_classes) logits.

  The trunk is PointMLP's, with the same submodule names (so pretrained leaves copy by name), but it stops at the
  global max pool: PointMLP.__call__ has no switch to return the pooled feature before its projection.
  """

  num_classes: int = 40
  head_dropout: float = 0.5

  @nn.compact
  def __call__(self, points, *, train: bool, return_logits: bool = True, return_features: bool = False):
    self._check_settings()
    pointmlp.check_points(points, self.k_neighbors, self.reducers)
    xyz = points
    counts = pointmlp.stage_point_counts(points.shape[1], self.reducers)
    x = pointmlp.ConvBNReLU(self.embed_dim, dtype=self.dtype, name='embedding')(xyz.astype(self.dtype), train=train)
    channels = self.embed_dim
    for i in range(len(self.reducers)):
      channels *= self.dim_expansion[i]
      xyz, grouped = pointmlp.LocalGrouper(
        counts[i + 1], self.k_neighbors[i], dtype=self.dtype, name=f'local_grouper_{i}'
      )(xyz, x)
      x = pointmlp.PreExtraction(
        channels, self.pre_blocks[i], self.res_expansion, dtype=self.dtype, name=f'pre_blocks_{i}'
      )(grouped, train=train)
      x = pointmlp.PosExtraction(self.pos_blocks[i], self.res_expansion, dtype=self.dtype, name=f'pos_blocks_{i}')(
        x, train=train
      )
    pooled = jnp.max(x, axis=1)
    if return_features:
      return pooled
    # torch.nn.Linear's default init: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

    def linear(features, fan_in, name):
      bound = 1.0 / math.sqrt(fan_in)
      return nn.Dense(
        features,
        dtype=self.dtype,
        kernel_init=kernel_init,
        name=name,
        bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound),
      )

    h = pooled
    for (fc, bn), (fan_in, width) in zip(
      (('classifier_0', 'classifier_1'), ('classifier_4', 'classifier_5')), ((channels, 512), (512, 256))
    ):
      h = nn.relu(TorchBatchNorm(dtype=self.dtype, name=bn)(linear(width, fan_in, fc)(h), train=train))
      h = nn.Dropout(self.head_dropout, deterministic=not train)(h)
    return linear(self.num_classes, 256, 'classifier_8')(h)


def build_classifier(model_config, num_classes: int) -> nn.Module:
  """The encoder named by config.model.encoder with a `num_classes` head; apply(..., return_logits=True) -> logits."""
  name = model_config.encoder
  if name == 'point_transformer':
    return PointTransformer.from_config(model_config).clone(num_classes=num_classes)
  if name == 'pointmlp':
    return PointMLPClassifier.from_config(model_config).clone(num_classes=num_classes)
  raise ValueError(f'config.model.encoder must be one of {ENCODERS}, got {name!r}')


def init_variables(model: nn.Module, rng: jax.Array, num_points: int) -> dict:
  """Fresh {'params', 'batch_stats'} for clouds of `num_points` points."""
  points = jnp.zeros((1, num_points, 3), jnp.float32)
  # Farthest-point sampling of an all-zero cloud is fine for shapes; values do not matter at init.
  variables = jax.jit(functools.partial(model.init, train=False, return_logits=True))(rng, points)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def classifier_logits(model: nn.Module, variables: dict, points: jax.Array, *, train: bool, rngs=None):
  """(logits (B, C), updated batch_stats in train mode, else None)."""
  if train:
    logits, updates = model.apply(variables, points, train=True, return_logits=True, rngs=rngs, mutable=['batch_stats'])
    return logits, updates['batch_stats']
  return model.apply(variables, points, train=False, return_logits=True), None
