"""The checkpoint format of this project, its one owner: training saves and restores with `Checkpointer` (orbax,
async saves, keep the last K and the best, restore onto any mesh); everything downstream reads a step with
`read_step` (config, state on one device, extras with the metrics), through orbax's own API.

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

Layer stacks: states hold each tower's layers stacked on a leading axis (trees.stack_layers). Checkpoints written
before the layer scan hold them one subtree per layer (`blocks_0`, `layers_0`); both `Checkpointer.restore` and
`read_step` read those and return the stacked layout.

RNG keys travel in `rng` (typed `jax.random.key` or raw uint32 `PRNGKey`) and come back in the same form; the
state itself must hold numeric arrays only (store key data, not typed keys, if the state needs one).
"""

import dataclasses
import functools
import json
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from cg3d_jax.errors import InputError
from cg3d_jax.trees import in_numbered_layer, path_to_str, stack_layers, unstack_layers

_STATE, _EXTRAS, _CONFIG = 'state', 'extras', 'config'
CHECKPOINTS_DIR = 'checkpoints'  # <workdir>/checkpoints/<step>/


class CheckpointNotFoundError(InputError):
  """No (such) checkpoint where the user pointed."""


class CheckpointDamagedError(InputError):
  """A step folder whose files cannot be read back (deleted or truncated data files, a broken write)."""

  def __init__(self, step_dir, step: int, err: Exception, others: list[int], advice: str):
    self.step = step
    detail = ' '.join(str(err).split())
    file = re.search(r'(/[^\s"\']+/(?:ocdbt\.process_\d+/)?d/[0-9a-f]+)', detail)
    where = f'; damaged file: {file.group(1)}' if file else ''
    intact = f'other saved steps: {others}' if others else 'no other step is saved'
    super().__init__(
      f'{step_dir}: the checkpoint of step {step} cannot be read ({detail[:160]}...{where}): a file '
      f'of it is missing or truncated; {intact}. {advice}'
    )


def _silence_closed_loop_noise() -> None:
  """After a failed restore, TensorStore's threads keep calling back into orbax's closed event loop, each printing
  'RuntimeError: Event loop is closed' (dozens of tracebacks) and asyncio's 'Task exception was never retrieved':
  noise about the damage the error already names. Only that exact error and that logger are silenced."""
  import logging as std_logging
  import sys

  previous = sys.excepthook
  if getattr(previous, 'drops_closed_loop_noise', False):
    return

  def hook(kind, value, tb):
    if kind is RuntimeError and str(value) == 'Event loop is closed':
      return
    previous(kind, value, tb)

  def unraisable(info):
    if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == 'Event loop is closed':
      return
    previous_unraisable(info)

  previous_unraisable = sys.unraisablehook
  hook.drops_closed_loop_noise = True
  sys.excepthook, sys.unraisablehook = hook, unraisable
  std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)


def damaged_step_error(step_dir, step: int, err: Exception, others: list[int]) -> CheckpointDamagedError:
  advice = (
    f'Read an intact step with --step {max(s for s in others if s < step)}'
    if any(s < step for s in others)
    else 'Retrain, or restore the folder from a copy'
  )
  return CheckpointDamagedError(step_dir, step, err, others, advice)


class _OrbaxNoiseFilter:
  """Drops orbax's warnings that describe what this module asked for, not a fault: every read-only manager (each
  downstream command) announces that it is read-only, and a save between evaluations (no metrics to rank) says it
  got no metrics. Anything else orbax says still shows."""

  EXPECTED = (
    'Given directory is read only',
    'CheckpointManagerOptions.read_only=True, setting',
    'Requested `tracked_metric`; did not provide metrics',
  )

  def filter(self, record) -> bool:
    return not str(record.msg).startswith(self.EXPECTED)


def _drop_expected_orbax_warnings() -> None:
  import logging as std_logging

  absl_logger = std_logging.getLogger('absl')
  if not any(isinstance(f, _OrbaxNoiseFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxNoiseFilter())


@functools.cache
def _write_cpu_arrays_whole() -> None:
  """On CPU devices, save each replicated array from one replica instead of orbax's replica-parallel slices.

  Replica-parallel saving (orbax's default off GPU) has every replica copy a slice of a replicated array to the
  host, which spreads device-to-host transfers over TPU chips. CPU "devices" already live in host memory, so there
  it only adds one compiled slice per array and replica: the first save of the demo's 129 arrays over 8 simulated
  CPU devices took 10 s, and 0.3 s with whole arrays (2026-12-06, AMD EPYC, 2 cores; every test process and
  every launched test command pays it). The files are the same either way. This replaces orbax's process-wide
  jax.Array handler, with its other settings at their defaults, in processes whose devices are all CPUs.
  """
  if any(device.platform != 'cpu' for device in jax.devices()):
    return
  from orbax.checkpoint._src.metadata import array_metadata_store  # what orbax's default handler is built with

  ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()),
    override=True,
  )


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Which orbax handler saves and restores each item: also what lets a read-only manager read their metadata."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(_STATE, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
  registry.add(_STATE, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  for item in (_EXTRAS, _CONFIG):
    registry.add(item, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add(item, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return registry


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
      raise TypeError(
        f'checkpoint state leaf {jax.tree_util.keystr(path)} is a typed PRNG key; pass keys through '
        '`rng`, or store jax.random.key_data(key) in the state'
      )


class Checkpointer:
  """An orbax CheckpointManager for one run's directory (see the module docstring for the layout)."""

  def __init__(
    self,
    directory: str,
    *,
    keep: int = 3,
    keep_best: bool = True,
    best_metric: str = 'val/top1',
    best_mode: str = 'max',
    async_save: bool = True,
    every_steps: int = 1000,
    read_only: bool = False,
  ):
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
      preserve.append(
        policies.BestN(get_metric_fn=best_fn, reverse=best_mode == 'min', n=1, keep_checkpoints_without_metrics=False)
      )
    options = ocp.CheckpointManagerOptions(
      best_fn=best_fn,  # also what makes orbax record metrics and answer best_step()
      best_mode=best_mode,
      preservation_policy=policies.AnyPreservationPolicy(preserve),
      save_decision_policy=policies.AnySavePolicy(
        [policies.FixedIntervalPolicy(every_steps), policies.PreemptionCheckpointingPolicy()]
      ),
      enable_async_checkpointing=async_save,
      read_only=read_only,
      create=not read_only,
      cleanup_tmp_directories=not read_only,  # what a killed save left half-written goes when the run restarts
    )
    _drop_expected_orbax_warnings()
    _write_cpu_arrays_whole()
    self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handler_registry())

  def should_save(self, step: int) -> bool:
    """True at multiples of every_steps and when a preemption notice has arrived."""
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def save(
    self,
    step: int,
    state,
    *,
    data_step: int,
    rng,
    config,
    metrics: Mapping[str, Any] | None = None,
    force: bool = False,
  ) -> bool:
    """Starts saving (in the background when async) if `should_save(step)` or force; returns whether it did.

    The state's arrays are copied to host memory before this returns, so the caller may donate them to the
    next step right away.
    """
    _check_no_typed_keys(state)
    metrics = _metrics_to_json(metrics)
    extras = {
      'step': int(step),
      'data_step': _plain_json('data_step', data_step),
      'rng': _rng_to_json(rng),
      'metrics': metrics,
    }
    ranked = metrics if metrics is not None and self.best_metric in metrics else None
    return self._manager.save(
      int(step),
      args=ocp.args.Composite(
        **{
          _STATE: ocp.args.StandardSave(state),
          _EXTRAS: ocp.args.JsonSave(extras),
          _CONFIG: ocp.args.JsonSave(_config_to_json(config)),
        }
      ),
      metrics=ranked,
      force=force,
    )

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
    missing = [
      jax.tree_util.keystr(p)
      for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
      if getattr(leaf, 'sharding', None) is None
    ]
    if missing:
      raise ValueError(
        f'restore target leaves need a sharding (jax.ShapeDtypeStruct(..., sharding=...)); missing '
        f'on {missing[:5]}{"..." if len(missing) > 5 else ""}'
      )
    _silence_closed_loop_noise()  # before the attempt: the noise starts as soon as a read fails
    try:
      unrolled = _saved_unrolled(self._manager, step)
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          **{
            _STATE: ocp.args.StandardRestore(unstack_layers(target) if unrolled else target),
            _EXTRAS: ocp.args.JsonRestore(),
            _CONFIG: ocp.args.JsonRestore(),
          }
        ),
      )
    except Exception as err:  # TensorStore and orbax raise many types for missing or truncated files
      raise damaged_step_error(
        pathlib.Path(str(self.directory)) / str(step), step, err, [s for s in steps if s != step]
      ) from err
    if unrolled:  # written before the layer scan: one subtree per layer -> the stacked layout, on the target
      logging.info('checkpoint step %d holds layers one by one (written before scanned layers): stacking them', step)
      state = jax.jit(stack_layers, out_shardings=jax.tree.map(lambda t: t.sharding, target))(restored[_STATE])
    else:
      state = restored[_STATE]
    extras = dict(restored[_EXTRAS])
    extras['rng'] = _rng_from_json(extras['rng'])
    extras['config'] = ml_collections.ConfigDict(restored[_CONFIG])
    return state, extras

  def set_aside(self, step: int) -> pathlib.Path:
    """Renames a damaged step's folder to `<step>.damaged` (kept for inspection, no longer a step) so that training
    can write that step again."""
    source = pathlib.Path(str(self.directory)) / str(step)
    target = source.with_name(f'{step}.damaged')
    suffix = 1
    while target.exists():
      target, suffix = source.with_name(f'{step}.damaged{suffix}'), suffix + 1
    os.replace(source, target)
    self._manager.reload()
    return target

  def saved_config(self, step: int) -> ml_collections.ConfigDict | None:
    """The config a step was saved with (its JSON item alone), None when it cannot be read."""
    try:
      config = self._manager.restore(step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]
    except Exception:  # a damaged step: restore() says which file
      return None
    return ml_collections.ConfigDict(config) if config else None

  def wait(self) -> None:
    """Blocks until every background save has finished and old checkpoints are pruned."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# --- reading a saved step (evaluation, export, fine-tuning from a pretraining run) --------------------------------


def _saved_unrolled(manager, step: int) -> bool:
  """True when the step's state names its layers one by one (`blocks_0`, `layers_0`: before the layer scan)."""
  metadata = manager.item_metadata(step)[_STATE]
  found = []
  jax.tree_util.tree_map_with_path(lambda path, _: found.append(path_to_str(path)), dict(metadata))
  return any(in_numbered_layer(name) for name in found)


@dataclasses.dataclass
class SavedStep:
  """One saved step, read onto one device: what downstream commands build their models from."""

  path: pathlib.Path  # the step folder
  step: int
  config: ml_collections.ConfigDict  # the config the run was trained with
  state: dict  # the train state (params, opt_state, batch_stats, counters), jax arrays on one device
  metrics: dict | None  # the validation metrics saved with the step, when there were any


def find_step_dir(path, step: int | None = None) -> pathlib.Path:
  """A training workdir, its checkpoints/ folder, or one step folder -> the step folder (newest if not given)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointNotFoundError(f'checkpoint path {path} does not exist')
  if (path / _STATE).is_dir():
    if step is not None and path.name != str(step):
      raise CheckpointNotFoundError(f'{path} is the folder of step {path.name}, not of step {step}')
    return path
  root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / _STATE).is_dir())
  if not steps:
    raise CheckpointNotFoundError(
      f'no checkpoint under {root}: expected step folders such as {root}/1000/state '
      '(a training workdir, its checkpoints/ folder or one step folder)'
    )
  if step is None:
    return root / str(steps[-1])
  if step not in steps:
    raise CheckpointNotFoundError(f'no checkpoint for step {step} under {root}; available: {steps}')
  return root / str(step)


def _read_only_manager(step_dir: pathlib.Path) -> ocp.CheckpointManager:
  _drop_expected_orbax_warnings()
  return ocp.CheckpointManager(
    step_dir.parent,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    handler_registry=_handler_registry(),
  )


def read_config(path, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a saved step was trained with (its JSON item alone; no arrays are read)."""
  step_dir = find_step_dir(path, step)
  manager = _read_only_manager(step_dir)
  try:
    config = manager.restore(int(step_dir.name), args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]
  finally:
    manager.close()
  if not config:
    raise CheckpointNotFoundError(f'{step_dir} has no config item: not a cg3d-jax training checkpoint')
  return ml_collections.ConfigDict(config)


def read_step(path, step: int | None = None, device=None) -> SavedStep:
  """The step's config, state (every leaf on `device`, default the first local one) and metrics.

  The arrays are read straight from their saved shapes and dtypes (orbax's item metadata), so no model or mesh
  has to be rebuilt first, and a checkpoint written on any mesh opens on one device.
  """
  step_dir = find_step_dir(path, step)
  manager = _read_only_manager(step_dir)
  try:
    number = int(step_dir.name)
    _silence_closed_loop_noise()  # before the attempt: the noise starts as soon as a read fails
    try:
      metadata = manager.item_metadata(number)
      if metadata[_STATE] is None:
        raise CheckpointNotFoundError(f'{step_dir} is not a cg3d-jax training checkpoint (it has no state item)')
      sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), dict(metadata[_STATE]))
      restored = manager.restore(
        number,
        args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardRestore(target), _EXTRAS: ocp.args.JsonRestore(), _CONFIG: ocp.args.JsonRestore()}
        ),
      )
    except InputError:
      raise
    except Exception as err:  # TensorStore and orbax raise many types for missing or truncated files
      raise damaged_step_error(step_dir, number, err, [s for s in manager.all_steps() if s != number]) from None
  finally:
    manager.close()
  extras = dict(restored[_EXTRAS] or {})
  if not restored[_CONFIG]:
    raise CheckpointNotFoundError(f'{step_dir} has no config item: not a cg3d-jax training checkpoint')
  return SavedStep(
    path=step_dir,
    step=int(restored[_STATE]['step']),
    config=ml_collections.ConfigDict(restored[_CONFIG]),
    state=stack_layers(restored[_STATE]),
    metrics=extras.get('metrics'),
  )
