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

from cg3d_jax.errors import ConfigError


class Evaluator(Protocol):
  def run(self, variables: Any) -> dict[str, float]:
    """Metrics of `variables` on the evaluator's split."""

  def report(self, variables: Any, workdir: str, dataset: str, info: dict) -> dict:
    """Scores the split, writes the report files into `workdir` and prints a table; returns the summary."""


TASKS = ('zeroshot', 'retrieval')


def from_config(ev, data, *, model, clip_params, tokenizer, preprocess=None, mesh, sharding) -> Evaluator:
  """The evaluator config.eval.task names ('zeroshot' where a config names none) over `data` (a data source's
  EvalData), as big_vision builds evaluators from their config; the class weights come from config.eval's prompts
  (zeroshot.class_weights). `preprocess`: the CLIP's image preprocessing (retrieval's image queries)."""
  import functools

  from cg3d_jax.evaluators import retrieval, zeroshot

  task = ev.get('task', 'zeroshot')
  if task == 'zeroshot':
    return zeroshot.ZeroShotEvaluator(
      model,
      clip_params,
      tokenizer,
      batches=functools.partial(data.batches, sharding),
      class_names=data.class_names,
      mesh=mesh,
      classifier=zeroshot.class_weights(data, ev, model, clip_params, tokenizer),
      ks=tuple(ev.ks),
    )
  if task == 'retrieval':
    return retrieval.RetrievalEvaluator(
      model,
      clip_params,
      tokenizer,
      batches=functools.partial(data.batches, sharding, preprocess),
      class_names=data.class_names,
      mesh=mesh,
      templates=ev.templates,
      normalize_text=ev.normalize_text,
      name_style=ev.name_style,
      ks=tuple(ev.ks),
      read_view=data.read_view,
      view_index=ev.view_index,
      grid_queries=ev.grid_queries,
      grid_matches=ev.grid_matches,
    )
  raise ConfigError(f'config.eval.task must be one of {TASKS}, got {task!r}')


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
