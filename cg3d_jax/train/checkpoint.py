"""Training checkpoints with orbax: async saves, keep the last K and the best, restore onto any mesh.

One checkpoint is the folder `<directory>/<step>/` holding four orbax items:
  state    the train state pytree of jax.Arrays (params, opt_state, batch_stats, counters), written shard by shard;
  extras   JSON: {'step', 'data_step', 'rng': {'data': [...uint32], 'impl': name or None}, 'metrics'};
  config   JSON: the ConfigDict the run was trained with;
  metrics  JSON, written by orbax when `metrics` hold `best_metric`; it ranks checkpoints for keep_best.
Orbax writes each step into a temporary folder and renames it when complete, so a preempted save leaves no
half-written checkpoint behind; `latest_step` only ever sees finished ones.

Restoring reads the arrays straight onto the shardings of the given target (jax.ShapeDtypeStruct leaves with
`.sharding`, e.g. from `sharding.with_shardings`), so a checkpoint written on a 4x2 mesh restores onto 8x1 or onto
one device without ever gathering the full state on one host.

RNG keys travel in `rng` (typed `jax.random.key` or raw uint32 `PRNGKey`) and come back in the same form; the
state itself must hold numeric arrays only (store key data, not typed keys, if the state needs one).
"""

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

_STATE, _EXTRAS, _CONFIG = 'state', 'extras', 'config'


def _rng_to_json(rng) -> dict:
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  data = jax.random.key_data(rng) if typed else rng
  if isinstance(data, jax.Array) and not data.is_fully_addressable:
    data = data.addressable_data(0)  # a replicated key: every process holds the same value
  data = np.asarray(data)
  if data.dtype != np.uint32:
    raise TypeError(f'rng must be a jax.random.key or a uint32 PRNGKey array, got dtype {data.dtype}')
  return {'data': data.tolist(), 'shape': list(data.shape), 'impl': str(jax.random.key_impl(rng)) if typed else None}


def _rng_from_json(saved: Mapping[str, Any]):
  data = jax.numpy.asarray(np.asarray(saved['data'], np.uint32).reshape(saved['shape']))
  return data if saved['impl'] is None else jax.random.wrap_key_data(data, impl=saved['impl'])


def _plain_json(name: str, value):
  """value as plain JSON types, checked now: a bad value would otherwise fail later, in orbax's save thread."""
  def convert(obj):
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
      return np.asarray(obj).tolist()
    raise TypeError(f'checkpoint {name}: {type(obj).__name__} is not JSON-serialisable: {obj!r}')

  return json.loads(json.dumps(value, default=convert))


def _config_to_json(config) -> dict:
  if config is None:
    return {}
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return _plain_json('config', config)


def _metrics_to_json(metrics) -> dict | None:
  if metrics is None:
    return None
  return {str(k): float(np.asarray(v)) for k, v in metrics.items()}


def _check_no_typed_keys(state) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if hasattr(leaf, 'dtype') and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      raise TypeError(f'checkpoint state leaf {jax.tree_util.keystr(path)} is a typed PRNG key; pass keys through '
                      '`rng`, or store jax.random.key_data(key) in the state')


class Checkpointer:
  """An orbax CheckpointManager for one run's directory (see the module docstring for the layout)."""

  def __init__(self, directory: str, *, keep: int = 3, keep_best: bool = True, best_metric: str = 'val/top1',
               best_mode: str = 'max', async_save: bool = True, every_steps: int = 1000, read_only: bool = False):
    if keep < 1:
      raise ValueError(f'checkpoint keep must be >= 1, got {keep}')
    if every_steps < 1:
      raise ValueError(f'checkpoint every_steps must be >= 1, got {every_steps}')
    self.directory = directory if '://' in str(directory) else os.path.abspath(directory)
    if read_only and not epath.Path(self.directory).exists():
      raise FileNotFoundError(f'checkpoint directory {self.directory} does not exist')
    self.best_metric = best_metric
    preserve = [policies.LatestN(n=keep)]
    best_fn = None
    if keep_best:
      best_fn = lambda metrics: metrics[best_metric]  # noqa: E731  (only metrics holding it are passed on)
      preserve.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == 'min', n=1,
                                     keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn,  # also what makes orbax record metrics and answer best_step()
        best_mode=best_mode,
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(every_steps),
                                                     policies.PreemptionCheckpointingPolicy()]),
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _EXTRAS, _CONFIG))

  def should_save(self, step: int) -> bool:
    """True at multiples of every_steps and when a preemption notice has arrived."""
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def save(self, step: int, state, *, data_step: int, rng, config, metrics: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Starts saving (in the background when async) if `should_save(step)` or force; returns whether it did.

    The state's arrays are copied to host memory before this returns, so the caller may donate them to the
    next step right away.
    """
    _check_no_typed_keys(state)
    metrics = _metrics_to_json(metrics)
    extras = {'step': int(step), 'data_step': _plain_json('data_step', data_step), 'rng': _rng_to_json(rng),
              'metrics': metrics}
    ranked = metrics if metrics is not None and self.best_metric in metrics else None
    return self._manager.save(
        int(step),
        args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _EXTRAS: ocp.args.JsonSave(extras),
                                   _CONFIG: ocp.args.JsonSave(_config_to_json(config))}),
        metrics=ranked, force=force)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None if no checkpoint recorded it)."""
    if self._manager.best_step() is None or self._manager.metrics(self._manager.best_step()) is None:
      return None
    return self._manager.best_step()

  def restore(self, step: int | None = None, *, target_state_shapes_with_shardings) -> tuple[Any, dict]:
    """(state on the target's shardings, {'step', 'data_step', 'rng', 'config', 'metrics'}); step None = latest."""
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f'no checkpoint to restore in {self.directory}')
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; available steps: {steps}')
    target = target_state_shapes_with_shardings
    _check_no_typed_keys(target)
    missing = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
               if getattr(leaf, 'sharding', None) is None]
    if missing:
      raise ValueError(f'restore target leaves need a sharding (jax.ShapeDtypeStruct(..., sharding=...)); missing '
                       f'on {missing[:5]}{"..." if len(missing) > 5 else ""}')
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target), _EXTRAS: ocp.args.JsonRestore(),
        _CONFIG: ocp.args.JsonRestore()}))
    extras = dict(restored[_EXTRAS])
    extras['rng'] = _rng_from_json(extras['rng'])
    extras['config'] = ml_collections.ConfigDict(restored[_CONFIG])
    return restored[_STATE], extras

  def wait(self) -> None:
    """Blocks until every background save has finished and old checkpoints are pruned."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
