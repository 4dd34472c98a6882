"""Joining a multi-process JAX cluster (TPU pod, multi-node GPU, or several processes on one machine).

Single-process runs need nothing. A TPU pod or a SLURM job is detected by JAX itself. Elsewhere (several GPU nodes
without SLURM, or the simulated pod of `launch/local_multihost.sh`) the coordinator, the number of processes and
this process's id come from flags or from the environment variables CG3D_COORDINATOR, CG3D_NUM_PROCESSES and
CG3D_PROCESS_ID. A process that dies makes the others fail within the heartbeat timeout instead of hanging.
"""

import os

import jax
from absl import flags, logging

COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'host:port of process 0 for a multi-process run (env CG3D_COORDINATOR). Not needed on '
    'TPU pods or under SLURM, where JAX finds the cluster itself.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (env CG3D_NUM_PROCESSES).')
PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index (env CG3D_PROCESS_ID).")
HEARTBEAT_S = flags.DEFINE_integer(
    'heartbeat_timeout_s', 60, 'Seconds without a heartbeat after which the cluster declares a process dead and the '
    'others exit with an error.')


def _setting(flag, env: str, cast=str):
  if flag.value is not None:
    return flag.value
  value = os.environ.get(env)
  return cast(value) if value not in (None, '') else None


def _on_tpu_pod() -> bool:
  # Cloud TPU VMs of a multi-host slice list every worker here; a single-host TPU VM lists one.
  return len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1


def initialize() -> None:
  """Call once, before any other JAX use, from every process of the run."""
  coordinator = _setting(COORDINATOR, 'CG3D_COORDINATOR')
  num_processes = _setting(NUM_PROCESSES, 'CG3D_NUM_PROCESSES', int)
  process_id = _setting(PROCESS_ID, 'CG3D_PROCESS_ID', int)
  explicit = [coordinator, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError('a multi-process run needs all of --coordinator, --num_processes and --process_id (or '
                       f'CG3D_COORDINATOR, CG3D_NUM_PROCESSES, CG3D_PROCESS_ID); got coordinator={coordinator!r}, '
                       f'num_processes={num_processes!r}, process_id={process_id!r}')
    if jax.config.read('jax_platforms') in ('cpu',) or os.environ.get('JAX_PLATFORMS') == 'cpu':
      # CPU processes exchange collectives through gloo; the default CPU backend is single-process only.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=HEARTBEAT_S.value)
  elif _on_tpu_pod() or 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_S.value)
  log_topology()


def log_topology() -> None:
  logging.info('JAX process %d of %d; %d local devices, %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
