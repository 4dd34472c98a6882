"""Joining a multi-process JAX cluster (TPU pod, multi-node GPU, or several processes on one machine).

Single-process runs need nothing. On a TPU pod slice and in a SLURM job with several tasks JAX finds the cluster
itself (`jax.distributed.initialize()` without arguments). Elsewhere (GPU nodes without SLURM, or the simulated pod
of `launch/local_multihost.sh`) the coordinator address, the number of processes and this process's id come from
flags or from the environment variables CG3D_COORDINATOR, CG3D_NUM_PROCESSES and CG3D_PROCESS_ID (flags win).

Failure behaviour: a process that dies stops sending heartbeats; after --heartbeat_timeout_s the coordination service
declares it dead and every other process exits with an error instead of waiting forever in a collective. A process
that never shows up makes the others give up after --init_timeout_s.
"""

import os
import socket

import jax
from absl import flags, logging

COORDINATOR = flags.DEFINE_string(
  'coordinator',
  None,
  'host:port of process 0 for a multi-process run (env CG3D_COORDINATOR). Not needed on '
  'TPU pods or under SLURM, where JAX finds the cluster itself.',
)
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (env CG3D_NUM_PROCESSES).')
PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index, 0..num_processes-1 (env CG3D_PROCESS_ID).")
HEARTBEAT_S = flags.DEFINE_integer(
  'heartbeat_timeout_s',
  100,
  'Seconds without a heartbeat after which the cluster declares a process dead and the '
  'others exit with an error (env CG3D_HEARTBEAT_TIMEOUT_S).',
)
INIT_TIMEOUT_S = flags.DEFINE_integer(
  'init_timeout_s', 300, 'Seconds to wait for every process to join the cluster (env CG3D_INIT_TIMEOUT_S).'
)

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = 'CG3D_COORDINATOR', 'CG3D_NUM_PROCESSES', 'CG3D_PROCESS_ID'


def _setting(flag, env: str, cast=str):
  """The flag's value if given on the command line, else the environment's (cast), else the flag's default."""
  if flag.present:
    return flag.value
  value = os.environ.get(env)
  if value in (None, ''):
    return flag.value
  try:
    return cast(value)
  except ValueError:
    raise ValueError(f'environment variable {env}={value!r} is not a valid {cast.__name__}') from None


def on_tpu_pod() -> bool:
  """True on a worker of a multi-host Cloud TPU slice (which lists every worker's hostname)."""
  return len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def in_slurm_job() -> bool:
  """True inside a SLURM step with several tasks (srun), where JAX reads the layout from SLURM's variables."""
  return 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_NPROCS', '1'))) > 1


def explicit_settings() -> tuple[str, int, int] | None:
  """(coordinator, num_processes, process_id) from flags/environment, None when none is given; checked."""
  coordinator = _setting(COORDINATOR, ENV_COORDINATOR)
  num_processes = _setting(NUM_PROCESSES, ENV_NUM_PROCESSES, int)
  process_id = _setting(PROCESS_ID, ENV_PROCESS_ID, int)
  given = [coordinator, num_processes, process_id]
  if all(v is None for v in given):
    return None
  if any(v is None for v in given):
    raise ValueError(
      'a multi-process run needs all of --coordinator, --num_processes and --process_id (or '
      f'{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got coordinator={coordinator!r}, '
      f'num_processes={num_processes!r}, process_id={process_id!r}'
    )
  host, _, port = coordinator.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(
      f'--coordinator / {ENV_COORDINATOR} must be host:port (process 0 listens there), got {coordinator!r}'
    )
  if num_processes < 1:
    raise ValueError(f'--num_processes / {ENV_NUM_PROCESSES} must be >= 1, got {num_processes}')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id / {ENV_PROCESS_ID} must be in [0, {num_processes}), got {process_id}')
  return coordinator, num_processes, process_id


def initialize() -> None:
  """Joins the cluster when this run has several processes; call once, before any other JAX use, everywhere."""
  heartbeat = _setting(HEARTBEAT_S, 'CG3D_HEARTBEAT_TIMEOUT_S', int)
  init_timeout = _setting(INIT_TIMEOUT_S, 'CG3D_INIT_TIMEOUT_S', int)
  timeouts = dict(heartbeat_timeout_seconds=heartbeat, initialization_timeout=init_timeout)
  explicit = explicit_settings()
  if explicit is not None:
    coordinator, num_processes, process_id = explicit
    if num_processes > 1:
      # CPU processes need a cross-process collectives backend (gloo; the default in recent JAX, not in all).
      if jax.config.jax_cpu_collectives_implementation in (None, 'none'):
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      logging.info(
        'joining a %d-process JAX cluster as process %d (coordinator %s)', num_processes, process_id, coordinator
      )
      jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
      if jax.devices()[0].platform == 'cpu':
        warm_cpu_collectives()
  elif on_tpu_pod() or in_slurm_job():
    logging.info('joining the JAX cluster found by auto-detection (%s)', 'TPU pod' if on_tpu_pod() else 'SLURM')
    jax.distributed.initialize(**timeouts)
  log_topology()


def warm_cpu_collectives() -> None:
  """One collective over all devices, while the processes are still in step (just after joining).

  Gloo builds the communicator of a device set at its first collective and gives every process only 30 s (fixed
  in XLA) to arrive; a process that compiles or loads more slowly than the others (a loaded machine) would fail
  there. Built now, the all-device communicator is reused by the training step, whose collectives wait as long as
  needed.
  """
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  devices = sorted(jax.devices(), key=lambda d: d.id)
  mesh = jax.make_mesh((len(devices),), ('all',), devices=devices)
  ones = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P('all')), np.ones((jax.local_device_count(),), np.int32)
  )
  total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(ones)
  if int(total.addressable_data(0)) != len(devices):
    raise RuntimeError(f'the CPU collectives check summed {int(total.addressable_data(0))} over {len(devices)} devices')


def topology() -> dict:
  """What this process sees of the cluster (for logs)."""
  return dict(
    host=socket.gethostname(),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    local_devices=jax.local_device_count(),
    global_devices=jax.device_count(),
    platform=jax.devices()[0].platform,
    device_kind=jax.devices()[0].device_kind,
  )


def log_topology() -> None:
  t = topology()
  logging.info(
    'JAX process %d of %d on %s: %d local devices, %d global devices (%s, %s)',
    t['process_index'],
    t['process_count'],
    t['host'],
    t['local_devices'],
    t['global_devices'],
    t['platform'],
    t['device_kind'],
  )
