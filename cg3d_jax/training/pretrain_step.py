"""One CG3D training step: contrastive losses, gradients of the trainable subtrees only, a non-finite guard.

The training state holds only what trains (`params` = point encoder + CLIP prompts, their optimizer state, the
encoder's BatchNorm statistics, the step counter, a base RNG key). Frozen CLIP is a separate, never-donated input
and the text features of every (template, class) caption come in as a precomputed table, so frozen weights are
neither differentiated nor given optimizer state.

Update modes:
- joint (default): one pass through the image tower; the encoder learns from point<->text + point<->image against
  stop-gradient image features, the prompts from image<->text; both groups step together.
- alternating: the original runner's schedule; batches at an even index within their epoch update the encoder
  (against the current prompted image features), odd ones the prompts (pretrain.active_groups). Each group's
  parameters and optimizer state stand still on the other's steps; the encoder runs in train mode on every batch,
  so its BatchNorm statistics move on every step, as in the runner.

Text targets are the caption table's rows (template_idx, label), or, when the batch carries 'text_feat' (OpenShape's
layout with its renders: CG3D's method on Objaverse), the stored per-sample text features, the text losses then over
the samples that have one ('has_text').

`features_train_step` is the step against precomputed CLIP features (OpenShape's layout): no CLIP tower in the
program at all; the encoder learns point<->text (over the samples that have a text) and point<->image InfoNCE over
the global batch against the stored features, with a learned temperature (`params['logit_scale']`, log of the
scale, OpenShape's LogitScaleNetwork initialised at 1/0.07).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cg3d_jax.data.device_transforms import scale_and_translate
from cg3d_jax.models.cg3d import CG3D
from cg3d_jax.models.layers import l2_normalize
from cg3d_jax.models.point_ops import sample_points
from cg3d_jax.training import optim
from cg3d_jax.training.losses import contrastive_loss
from cg3d_jax.training.optim import ENCODER, PROMPTS


def merge_clip(frozen: dict, params: dict) -> dict:
  """Frozen CLIP plus the trainable prompts (when the model has any) as one CLIP parameter tree."""
  clip = dict(frozen['clip'])
  if 'clip' in params:
    clip.update(params['clip'])
  return clip


def _group_tree(params: dict, group: str):
  return params['encoder'] if group == ENCODER else params['clip']


def _with_groups(params: dict, groups: dict) -> dict:
  out = dict(params)
  if ENCODER in groups:
    out['encoder'] = groups[ENCODER]
  if PROMPTS in groups:
    out['clip'] = groups[PROMPTS]
  return out


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def _finite_gradients(grads) -> jax.Array:
  """Whether every gradient is finite, read off their global norm (NaN and infinity carry through a sum of squares;
  a gradient too large to square in float32, |g| > 1.8e19, counts as non-finite too). One reduction instead of a
  test per leaf: XLA copied that chain of ~40 scalar `and`s into every optimizer-update fusion (the tests' tiny step:
  28.7k compiled HLO lines, ~10 s to compile on a 2-core CPU)."""
  return jnp.isfinite(optax.tree.norm(grads))


def _losses(
  model: CG3D,
  groups: dict,
  params: dict,
  frozen: dict,
  batch_stats,
  text_table,
  batch,
  key,
  *,
  active: tuple[str, ...],
  same_class_mask: bool,
  augment: bool,
):
  """The three InfoNCE losses; which of them are computed and which inputs carry gradient follow `active`."""
  params = _with_groups(params, groups)
  clip_params = merge_clip(frozen, params)
  scale = model.logit_scale(clip_params)
  labels = batch['label'] if same_class_mask else None
  if 'text_feat' in batch:  # OpenShape's layout with renders: a stored text feature per sample, some have none
    text, valid = l2_normalize(batch['text_feat']), batch['has_text']
  else:
    text, valid = text_table[batch['template_idx'], batch['label']], None
  image = model.image_features(clip_params, batch['image'])
  metrics, total = {}, 0.0
  # The encoder runs in train mode on every batch, also when only the prompts step (alternating mode), as the
  # original runner does (it forwards the point encoder before choosing which group steps): its BatchNorm running
  # statistics are updated by every batch. On a prompt step its features reach no loss and `groups` holds no
  # encoder parameter, so it gets no gradient.
  aug_key, drop_key = jax.random.split(key)
  points = sample_points(batch['points'], model.num_points)
  if augment:
    points = scale_and_translate(aug_key, points)
  feats, new_stats = model.point_features(
    {'params': params['encoder'], 'batch_stats': batch_stats}, points, train=True, rngs={'dropout': drop_key}
  )
  if ENCODER in active:
    # The encoder learns to reach CLIP's image features; it must not pull the prompts toward itself.
    metrics['loss/point_text'] = contrastive_loss(feats, text, scale, mask_same_class_labels=labels, valid=valid)
    metrics['loss/point_image'] = contrastive_loss(
      feats, jax.lax.stop_gradient(image), scale, mask_same_class_labels=labels
    )
    total = total + metrics['loss/point_text'] + metrics['loss/point_image']
  if PROMPTS in active:
    metrics['loss/image_text'] = contrastive_loss(image, text, scale, mask_same_class_labels=labels, valid=valid)
    total = total + metrics['loss/image_text']
  metrics['loss'] = total
  return total, (metrics, new_stats)


def trainable_groups(params: dict) -> tuple[str, ...]:
  return (ENCODER, PROMPTS) if 'clip' in params else (ENCODER,)


def train_step(
  state: dict,
  frozen: dict,
  text_table,
  batch: dict,
  *,
  model: CG3D,
  tx: optax.GradientTransformation,
  labels_fn,
  active: tuple[str, ...],
  same_class_mask: bool = False,
  augment: bool = True,
):
  """One update of the groups in `active`; returns (new state, metrics). Pure: jit it with shardings."""
  params = state['params']
  key = jax.random.fold_in(state['rng'], state['step'])
  groups = {g: _group_tree(params, g) for g in active}
  grad_fn = jax.value_and_grad(_losses, argnums=1, has_aux=True)
  (loss, (metrics, new_stats)), grads = grad_fn(
    model,
    groups,
    params,
    frozen,
    state['batch_stats'],
    text_table,
    batch,
    key,
    active=active,
    same_class_mask=same_class_mask,
    augment=augment,
  )

  # Groups that sit this step out (alternating mode) get zero gradients, zero updates and keep their optimizer
  # state, so that neither momentum nor weight decay moves them.
  full_grads = _with_groups(jax.tree.map(jnp.zeros_like, params), grads)
  updates, new_opt_state = tx.update(full_grads, state['opt_state'], params)
  if len(active) < len(trainable_groups(params)):
    activity = {g: g in active for g in trainable_groups(params)}
    updates, new_opt_state = optim.select_groups(activity, updates, new_opt_state, state['opt_state'], labels_fn)
  new_params = optax.apply_updates(params, updates)

  for g, tree in grads.items():
    metrics[f'grad_norm/{g}'] = optax.tree.norm(tree)
  # A NaN point need not reach the loss (farthest-point sampling can pass over it), so the inputs are checked too.
  ok = jnp.isfinite(loss) & _finite_gradients(grads) & _all_finite([batch['points'], batch['image']])
  new = dict(params=new_params, opt_state=new_opt_state, batch_stats=new_stats)
  return _apply_if_finite(state, ok, metrics, **new), metrics


def _apply_if_finite(state: dict, ok, metrics: dict, **new) -> dict:
  """The next state: `new` (params, optimizer state, BatchNorm statistics) where the step was finite, the old values
  where it was not; the step counter advances either way and bad_steps counts the non-finite steps in a row (both
  also reported in `metrics`)."""
  kept = {k: jax.tree.map(lambda n, o: jnp.where(ok, n, o), v, state[k]) for k, v in new.items()}
  next_state = dict(state, step=state['step'] + 1, bad_steps=jnp.where(ok, 0, state['bad_steps'] + 1), **kept)
  metrics['finite'] = ok.astype(jnp.float32)
  metrics['bad_steps'] = next_state['bad_steps']
  return next_state


def jit_train_step(
  model: CG3D,
  tx,
  labels_fn,
  *,
  active,
  state_shardings,
  frozen_shardings,
  table_sharding,
  batch_shardings,
  same_class_mask: bool = False,
  augment: bool = True,
) -> Callable[..., Any]:
  """`train_step` compiled with explicit in/out shardings and a donated state (the modern pjit)."""
  fn = functools.partial(
    train_step,
    model=model,
    tx=tx,
    labels_fn=labels_fn,
    active=tuple(active),
    same_class_mask=same_class_mask,
    augment=augment,
  )
  return jax.jit(
    fn,
    in_shardings=(state_shardings, frozen_shardings, table_sharding, batch_shardings),
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )


def _features_losses(
  encoder_params: dict, logit_scale, batch_stats, batch, key, *, model: CG3D, lambda_text: float, lambda_image: float
):
  points = sample_points(batch['points'], model.num_points)  # the host already augmented them, as OpenShape does
  feats, new_stats = model.point_features(
    {'params': encoder_params, 'batch_stats': batch_stats}, points, train=True, rngs={'dropout': key}
  )
  scale = jnp.exp(logit_scale.astype(jnp.float32))
  text, image = l2_normalize(batch['text_feat']), l2_normalize(batch['image_feat'])
  metrics = {
    'loss/point_text': contrastive_loss(feats, text, scale, valid=batch['has_text']),
    'loss/point_image': contrastive_loss(feats, image, scale),
  }
  total = lambda_text * metrics['loss/point_text'] + lambda_image * metrics['loss/point_image']
  metrics['loss'] = total
  metrics['logit_scale'] = scale
  metrics['text_fraction'] = jnp.mean(batch['has_text'].astype(jnp.float32))
  return total, (metrics, new_stats)


def features_train_step(
  state: dict,
  batch: dict,
  *,
  model: CG3D,
  tx: optax.GradientTransformation,
  lambda_text: float = 1.0,
  lambda_image: float = 1.0,
):
  """One update of the encoder and the temperature against stored features; returns (new state, metrics).

  batch: 'points' (B, S, C), 'text_feat' (B, D), 'has_text' (B,) bool, 'image_feat' (B, D)."""
  params = state['params']
  key = jax.random.fold_in(state['rng'], state['step'])

  def loss_fn(trainable):
    return _features_losses(
      trainable['encoder'],
      trainable['logit_scale'],
      state['batch_stats'],
      batch,
      key,
      model=model,
      lambda_text=lambda_text,
      lambda_image=lambda_image,
    )

  (loss, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, new_opt_state = tx.update(grads, state['opt_state'], params)
  new_params = optax.apply_updates(params, updates)
  metrics[f'grad_norm/{ENCODER}'] = optax.tree.norm(grads['encoder'])
  inputs = [batch['points'], batch['text_feat'], batch['image_feat']]
  ok = jnp.isfinite(loss) & _finite_gradients(grads) & _all_finite(inputs)
  return _apply_if_finite(
    state, ok, metrics, params=new_params, opt_state=new_opt_state, batch_stats=new_stats
  ), metrics


def jit_features_train_step(
  model: CG3D, tx, *, state_shardings, batch_shardings, lambda_text: float = 1.0, lambda_image: float = 1.0
) -> Callable[..., Any]:
  fn = functools.partial(features_train_step, model=model, tx=tx, lambda_text=lambda_text, lambda_image=lambda_image)
  return jax.jit(
    fn, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None), donate_argnums=(0,)
  )
