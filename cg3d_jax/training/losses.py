"""Contrastive losses of CG3D: symmetric InfoNCE between two sets of L2-normalised features.

The loss is over the *global* batch: under `jax.jit` with the batch sharded over the mesh, `a @ b.T` is the full
(B, B) matrix of every example against every other, and XLA inserts the gathers. Nothing here is per-device.
"""

import jax
import jax.numpy as jnp
import optax

from cg3d_jax.models.layers import stats_dtype


def same_class_negatives(labels: jax.Array) -> jax.Array:
  """(B, B) bool: True where an off-diagonal pair shares a label, i.e. a 'negative' that is not really one."""
  labels = jnp.asarray(labels)
  same = labels[:, None] == labels[None, :]
  return same & ~jnp.eye(labels.shape[0], dtype=bool)


def contrastive_loss(a: jax.Array, b: jax.Array, scale, *, mask_same_class_labels=None, valid=None) -> jax.Array:
  """Symmetric InfoNCE: (CE(s·a·bᵀ, arange) + CE(s·b·aᵀ, arange)) / 2, averaged over the batch.

  a, b: (B, D) L2-normalised features whose i-th rows are a positive pair; scale: CLIP's exp(logit_scale).
  mask_same_class_labels: optional (B,) integer labels; off-diagonal pairs with equal labels are dropped from
  the negatives (their logits become -inf in both directions). The original CG3D keeps them (None).
  Computed in at least float32 whatever the feature dtype, since a softmax over the batch is sensitive to rounding
  (float64 stays float64, for parity tests).
  valid: optional (B,) bool; the loss is then the InfoNCE of the valid rows alone, as if the batch held only them
  (OpenShape's text loss over the samples that have a text): other pairs leave the softmax, an invalid row keeps
  only its own diagonal (a loss of exactly 0 with no gradient), and the mean is over valid rows (0 when none is).
  """
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f'contrastive_loss expects two (B, D) feature arrays of equal shape, got {a.shape} and {b.shape}')
  dtype = stats_dtype(jnp.result_type(a, b))
  a = a.astype(dtype)
  b = b.astype(dtype)
  logits = jnp.asarray(scale, dtype) * (a @ b.T)
  if mask_same_class_labels is not None:
    if jnp.shape(mask_same_class_labels) != (a.shape[0],):
      raise ValueError(
        f'mask_same_class_labels must have shape ({a.shape[0]},), got {jnp.shape(mask_same_class_labels)}'
      )
    # The mask is symmetric, so the same entries leave the rows of logits and of logits.T.
    logits = jnp.where(same_class_negatives(mask_same_class_labels), -jnp.inf, logits)
  targets = jnp.arange(a.shape[0])
  if valid is not None:
    valid = jnp.asarray(valid, bool)
    keep = (valid[:, None] & valid[None, :]) | jnp.eye(a.shape[0], dtype=bool)
    logits = jnp.where(keep, logits, -jnp.inf)
  loss_ab = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  loss_ba = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
  if valid is None:
    return (jnp.mean(loss_ab) + jnp.mean(loss_ba)) / 2
  weights = valid.astype(dtype)
  return jnp.sum((loss_ab + loss_ba) * weights) / (2 * jnp.maximum(jnp.sum(weights), 1))
