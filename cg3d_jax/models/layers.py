"""Layers and feature math the models share: the attention core, the scanned and rematerialised layer stack,
PyTorch-semantics BatchNorm, statistics dtypes, L2 normalisation."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """x / max(||x||, eps) along `axis`, as torch.nn.functional.normalize; eps only guards all-zero rows.

  Computed in at least float32, so that bfloat16 features still give unit vectors for contrastive logits and
  cosine scores (float64 stays float64).
  """
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


# 'auto': cuDNN's fused (flash) attention on a GPU where it applies (bfloat16/float16, head size a multiple of 8 up to
# 128), the written-out head-major form on CPU (measured faster there, bench/README_clip.md), XLA's
# jax.nn.dot_product_attention elsewhere (TPU, GPU in float32); 'xla', 'cudnn' and 'einsum' force one.
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'einsum')


def _use_cudnn(q) -> bool:
  head_dim = q.shape[-1]
  return (
    jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
  )


def attend(q, k, v, *, causal: bool = False, implementation: str = 'auto'):
  """softmax(q k^T / sqrt(d)) v for (B, L, H, d) queries, keys and values -> (B, L, H, d).

  Logits and softmax are computed in at least float32, the scale applied after the product as PyTorch does, so every
  implementation agrees with transformers and timm to float32 rounding. Float64 (the parity tests) always takes the
  written-out form: jax.nn.dot_product_attention computes its softmax in float32 whatever the input.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}')
  cpu = implementation == 'auto' and jax.default_backend() == 'cpu'
  # float64 (the parity tests) is always written out: jax.nn's softmax runs in float32 whatever the input.
  if implementation == 'einsum' or cpu or q.dtype == jnp.float64:
    length = q.shape[1]
    # Head-major (B, H, L, d) operands: on CPU, XLA runs these batched products without the per-call transposes
    # that (B, L, H, d) contractions cost (forward about 2x faster at ViT-B/16 sizes).
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k) * (q.shape[-1] ** -0.5)
    logits = logits.astype(stats_dtype(q.dtype))
    if causal:
      logits = jnp.where(jnp.tril(jnp.ones((length, length), dtype=bool)), logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', weights, v), 1, 2)
  if implementation == 'cudnn' or (implementation == 'auto' and _use_cudnn(q)):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation='cudnn')
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation='xla')


# What a rematerialised layer keeps for the backward pass: 'none' keeps every activation (fastest, most memory);
# 'full' keeps only each layer's input and recomputes the rest (activation memory ~ one layer); 'dots' keeps the
# matmul outputs that have no batch dimension and recomputes the cheap elementwise work between them
# (jax.checkpoint_policies.dots_with_no_batch_dims_saveable, the usual middle ground on accelerators).
REMAT_POLICIES = ('none', 'full', 'dots')


def remat_policy_name(value) -> str:
  """A config's remat setting -> one of REMAT_POLICIES; booleans (configs written before the policies) mean
  'none' / 'full'."""
  if isinstance(value, bool) or value is None:
    return 'full' if value else 'none'
  if value not in REMAT_POLICIES:
    raise ValueError(f'remat must be one of {REMAT_POLICIES} (or a boolean), got {value!r}')
  return value


def layer_stack(layer_cls, *, length: int, remat='none', scan: bool = True, in_axes=()):
  """`layer_cls` repeated `length` times as one module with parameters stacked on a leading layer axis (nn.scan).

  The layer's __call__ takes (carry, *inputs) and returns (carry, None); in_axes says per input whether it is
  scanned over the layer axis (0) or the same for every layer (nn.broadcast). 'params' and 'dropout' rngs are split
  per layer. scan=False unrolls the loop in the compiled program (same parameters and layout; compiles slower, a
  reference for the scanned form). remat: REMAT_POLICIES.
  """
  policy = remat_policy_name(remat)
  if policy != 'none':
    saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == 'dots' else None
    # prevent_cse only matters outside a scan; inside one it just blocks optimisations.
    layer_cls = nn.remat(layer_cls, policy=saveable, prevent_cse=not scan)
  return nn.scan(
    layer_cls,
    variable_axes={'params': 0},
    split_rngs={'params': True, 'dropout': True},
    in_axes=in_axes,
    length=length,
    unroll=1 if scan else length,
  )


def stats_dtype(dtype):
  """Statistics (BatchNorm, anchor std) in float32 at least: bfloat16 sums lose too much; float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)


class TorchBatchNorm(nn.Module):
  """BatchNorm over every axis but the last, with PyTorch's semantics.

  Flax's nn.BatchNorm feeds the biased batch variance into the running average; PyTorch feeds the unbiased one
  (n / (n - 1)), which is what CG3D's checkpoints hold. `momentum` is in Flax's convention: running = momentum *
  running + (1 - momentum) * batch, so 0.9 here is PyTorch's 0.1. Names match nn.BatchNorm (params scale/bias,
  batch_stats mean/var) so that code treating norms generically (weight-decay masks) sees the usual leaves.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    x32 = x.astype(stats_dtype(self.dtype))
    if train:
      axes = tuple(range(x.ndim - 1))
      count = int(np.prod([x.shape[a] for a in axes]))
      mean = jnp.mean(x32, axis=axes)
      # Two-pass variance: E[x^2] - E[x]^2 loses digits on post-ReLU activations with large means.
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        unbiased = var * (count / max(count - 1, 1))
        running_mean.value = self.momentum * running_mean.value + (1.0 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1.0 - self.momentum) * unbiased
    else:
      mean, var = running_mean.value, running_var.value
    y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


def compute_settings(model_config) -> dict:
  """The compute settings every point encoder takes from config.model, beside its own sizes: the compute dtype, the
  per-block rematerialisation, the attention kernel and whether the blocks run as one scanned layer."""
  return dict(
    dtype=jnp.dtype(model_config.dtype),
    remat=model_config.remat,
    attention=model_config.get('attention', 'auto'),
    scan_layers=model_config.get('scan_layers', True),
  )
