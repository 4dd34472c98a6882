"""Classification accuracy of a fine-tuned classifier on a labelled split, optionally with voting.

`ClassificationEvaluator.run(variables)` (evaluators/evaluator.py's interface) gives overall top-1 and class-mean
accuracy over one in-order pass of the split (padded last batch masked out). Single pass: FPS to the model's N
points. Voting (the original's test_vote): the mean logits of `votes` passes, each sampled and augmented as
fine-tuning trains (FPS to fps_points, a random N of those, per-cloud scale and translation) unless vote_augment is
False, in which case every pass is the single pass.
"""

from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cg3d_jax import sharding
from cg3d_jax.data.device_transforms import sample_training_points
from cg3d_jax.evaluators import evaluator, metrics
from cg3d_jax.models.classifiers import classifier_logits
from cg3d_jax.models.point_ops import sample_points


def make_predict(
  model: nn.Module, *, num_points: int, fps_points: int, votes: int = 1, vote_augment: bool = True, out_sharding=None
):
  """jit(variables, points, key) -> logits (B, C); with votes > 1, the mean logits of `votes` passes."""

  def predict(variables, points, key):
    if votes <= 1:
      return classifier_logits(model, variables, sample_points(points, num_points), train=False)[0]
    sampled = sample_points(points, fps_points if vote_augment else num_points)

    def one_pass(total, pass_key):
      view = sample_training_points(pass_key, sampled, num_points, augment=vote_augment)
      return total + classifier_logits(model, variables, view, train=False)[0].astype(jnp.float32), None

    zeros = jnp.zeros((points.shape[0], int(model.num_classes)), jnp.float32)
    total, _ = jax.lax.scan(one_pass, zeros, jax.random.split(key, votes))
    return total / votes

  return jax.jit(predict, out_shardings=out_sharding)


class ClassificationEvaluator:
  """Overall and class-mean accuracy (`prefix` + 'top1', 'class_mean', 'count'); `outputs` adds logits and labels."""

  def __init__(
    self,
    model: nn.Module,
    *,
    batches: Callable[[], Iterable[dict]],
    mesh: jax.sharding.Mesh,
    num_classes: int,
    num_points: int,
    fps_points: int,
    votes: int = 1,
    vote_augment: bool = True,
    seed: int = 0,
    prefix: str = 'val/',
  ):
    self.batches, self.num_classes, self.seed, self.prefix = batches, num_classes, seed, prefix
    self.predict = make_predict(
      model,
      num_points=num_points,
      fps_points=fps_points,
      votes=votes,
      vote_augment=vote_augment,
      out_sharding=sharding.replicated(mesh),
    )

  def outputs(self, variables: dict) -> dict[str, np.ndarray]:
    """{'logits' (N, C), 'label' (N,)} of every real example of the split, in order."""
    key = jax.random.key(self.seed)
    rows = [
      {
        'logits': self.predict(variables, batch['points'], jax.random.fold_in(key, i)),
        'label': batch['label'],
        'mask': batch['mask'],
      }
      for i, batch in enumerate(self.batches())
    ]
    return evaluator.real_rows(rows)

  def run(self, variables: dict) -> dict[str, float]:
    return self.metrics(self.outputs(variables))

  def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
    logits, labels = outputs['logits'], outputs['label']
    return {
      self.prefix + 'top1': metrics.topk_accuracy(logits, labels, ks=(1,))[1],
      self.prefix + 'class_mean': metrics.class_mean_accuracy(metrics.predictions(logits), labels, self.num_classes),
      self.prefix + 'count': int(labels.shape[0]),
    }
