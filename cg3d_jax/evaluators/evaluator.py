"""What every evaluator shares. An evaluator is built once (from a config, a model and a mesh) and then
`run(variables)` returns its metrics as {name: number}; the training loops call it for validation, the eval-only
command calls it (and its `outputs`, for reports) on a checkpoint. big_vision's evaluators work the same way.

Variables: {'encoder': encoder variables, 'clip': CLIP parameters with the prompts} for the zero-shot and retrieval
evaluators of a pretrained CG3D model; the classifier's {'params', 'batch_stats'} for the classification evaluator.
"""

from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils


class Evaluator(Protocol):
  def run(self, variables: Any) -> dict[str, float]:
    """Metrics of `variables` on the evaluator's split."""


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array as a full NumPy array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:  # every process holds all of it
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def real_rows(outputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Per-batch outputs (each with a bool 'mask' of real rows) -> their real rows, concatenated, on this host."""
  if not outputs:
    raise ValueError('the evaluation split yielded no batches (is it empty?)')
  host = [{k: to_host(v) for k, v in out.items()} for out in outputs]
  masks = [h.pop('mask').astype(bool) for h in host]
  result = {k: np.concatenate([h[k][m] for h, m in zip(host, masks)]) for k in host[0]}
  if not any(m.any() for m in masks):
    raise ValueError('every row of the evaluation split was padding: the split has no examples')
  return result
