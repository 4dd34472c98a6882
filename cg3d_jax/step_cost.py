"""What one compiled training step costs on the device it runs on: FLOPs and memory from XLA's own analyses, the
achieved rate (TFLOP/s per device) and model-FLOP utilisation (MFU) against the device's peak, and whether the step
fits in device memory before a run starts.

XLA's cost and memory analyses describe the SPMD-partitioned program, i.e. one device's share: FLOPs and bytes here
are per device. MFU = achieved FLOP/s per device / the peak dense matmul rate of the device in the step's compute
dtype (PEAK_TFLOPS, from the vendors' data sheets; float32 on NVIDIA GPUs counts TF32 tensor cores, which XLA uses for
float32 matmuls by default; TPUs list bfloat16 only, float32 runs as several bfloat16 passes). Unknown devices (this
CPU, say) report TFLOP/s without MFU.
"""

import dataclasses

import jax
import jax.numpy as jnp
from absl import logging

from cg3d_jax.errors import ConfigError

# device_kind substring -> {compute dtype: dense peak TFLOP/s per chip}; the first match wins (most specific first).
PEAK_TFLOPS = (
    ('H200', {'bfloat16': 989.4, 'float32': 494.7}),
    ('H100', {'bfloat16': 989.4, 'float32': 494.7}),  # SXM; PCIe parts are ~25% lower
    ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
    ('L4', {'bfloat16': 121.0, 'float32': 60.0}),
    ('TPU v6 lite', {'bfloat16': 918.0}),  # v6e (Trillium)
    ('TPU v5 lite', {'bfloat16': 197.0}),  # v5e
    ('TPU v5p', {'bfloat16': 459.0}),
    ('TPU v5', {'bfloat16': 459.0}),
    ('TPU v4', {'bfloat16': 275.0}),
)


def peak_tflops(device_kind: str, dtype) -> float | None:
  """The dense peak for `dtype` on `device_kind` (TPUs: bfloat16's for every dtype), None if unknown."""
  name = jnp.dtype(dtype).name
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peaks.get(name, peaks['bfloat16'] if device_kind.upper().startswith('TPU') else None)
  return None


@dataclasses.dataclass
class StepCost:
  """One compiled step, per device."""
  flops: float  # FLOPs per device per step (XLA cost analysis)
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written into donated arguments (counted once)
  temp_bytes: int
  peak_bytes: int  # max(XLA's peak estimate, arguments + outputs - aliases + temporaries)
  device_kind: str
  device_limit_bytes: int | None  # what the device says it can hold (None: it does not say, e.g. CPU)
  peak_tflops: float | None

  def tflops_per_device(self, steps_per_s: float) -> float:
    return self.flops * steps_per_s / 1e12

  def mfu(self, steps_per_s: float) -> float | None:
    return self.tflops_per_device(steps_per_s) / self.peak_tflops if self.peak_tflops else None

  def describe(self) -> str:
    gib = 2.0 ** 30
    limit = f' of {self.device_limit_bytes / gib:.1f} GiB' if self.device_limit_bytes else ''
    peak = f'; peak {self.peak_tflops:g} TFLOP/s' if self.peak_tflops else '; peak unknown (no MFU)'
    return (f'{self.flops / 1e9:.1f} GFLOP per device per step on {self.device_kind}{peak}; memory per device: '
            f'arguments {self.argument_bytes / gib:.2f} GiB, outputs {self.output_bytes / gib:.2f} GiB (aliased '
            f'{self.alias_bytes / gib:.2f}), temporaries {self.temp_bytes / gib:.2f} GiB, peak '
            f'{self.peak_bytes / gib:.2f} GiB{limit}')


def _device_limit(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # backends without memory statistics
    return None
  return int(stats['bytes_limit']) if stats and stats.get('bytes_limit') else None


def analyse(compiled, compute_dtype, device=None) -> StepCost:
  """The StepCost of a `jax.stages.Compiled` step."""
  device = device or jax.local_devices()[0]
  costs = compiled.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs
  memory = compiled.memory_analysis()
  args, outs = int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes)
  alias, temp = int(memory.alias_size_in_bytes), int(memory.temp_size_in_bytes)
  # XLA's own peak where it is larger; on CPU it reports about the arguments alone, so the sum (what MaxText prints
  # too) is the figure the fit check uses: an upper bound when temporaries could overlap the outputs.
  peak = max(int(getattr(memory, 'peak_memory_in_bytes', 0) or 0), args + outs - alias + temp)
  return StepCost(flops=float(costs.get('flops', 0.0)), argument_bytes=args, output_bytes=outs, alias_bytes=alias,
                  temp_bytes=temp, peak_bytes=peak, device_kind=device.device_kind,
                  device_limit_bytes=_device_limit(device), peak_tflops=peak_tflops(device.device_kind, compute_dtype))


def check_fits(cost: StepCost, what: str = 'the training step') -> None:
  """Stops before training when the device says the step cannot fit, with the numbers and the knobs."""
  if cost.device_limit_bytes is None or cost.peak_bytes <= cost.device_limit_bytes:
    return
  gib = 2.0 ** 30
  raise ConfigError(f'{what} needs {cost.peak_bytes / gib:.1f} GiB per device (arguments '
                    f'{cost.argument_bytes / gib:.1f}, temporaries {cost.temp_bytes / gib:.1f}) but a '
                    f'{cost.device_kind} holds {cost.device_limit_bytes / gib:.1f} GiB: lower '
                    '--config.train.batch_size, turn on --config.model.remat / --config.clip.remat, compute in '
                    "--config.model.dtype=bfloat16 / --config.clip.dtype=bfloat16, or shard the state with "
                    '--config.mesh.fsdp=<devices>')


class CompiledStep:
  """A jitted step compiled ahead of time on its first call (the same compilation jit would do), so that its cost
  is known and logged, and its memory checked, before the first step runs."""

  def __init__(self, jitted, compute_dtype, what: str = 'the training step'):
    self._jitted, self._dtype, self._what = jitted, compute_dtype, what
    self._compiled = None
    self.cost: StepCost | None = None

  def __call__(self, *args):
    if self._compiled is None:
      self._compiled = self._jitted.lower(*args).compile()
      self.cost = analyse(self._compiled, self._dtype)
      logging.info('%s: %s', self._what, self.cost.describe())
      check_fits(self.cost, self._what)
    return self._compiled(*args)


def rate_metrics(costs, samples_per_s: float, batch_size: int) -> dict:
  """{'tflops_per_device', 'mfu'} for the steps run at `samples_per_s`; the costs of several compiled steps (the
  alternating schedule has two) are averaged."""
  costs = [c for c in costs if c is not None]
  if not costs or not samples_per_s:
    return {}
  steps_per_s = samples_per_s / batch_size
  flops = sum(c.flops for c in costs) / len(costs)
  out = {'tflops_per_device': flops * steps_per_s / 1e12}
  if costs[0].peak_tflops:
    out['mfu'] = out['tflops_per_device'] / costs[0].peak_tflops
  return out


def format_rate(metrics: dict) -> str:
  """'12.3 TFLOP/s/device  MFU 41.2%' (MFU only where the peak is known) for a log line."""
  if 'tflops_per_device' not in metrics:
    return ''
  mfu = f"  MFU {100 * metrics['mfu']:.1f}%" if 'mfu' in metrics else ''
  return f"{metrics['tflops_per_device']:.3g} TFLOP/s/device{mfu}"


class Profiler:
  """A JAX trace of steps [start, stop) into `<workdir>/profile` (TensorBoard's profile plugin opens it), when
  config.logging.profile_steps = (start, stop); nothing otherwise."""

  def __init__(self, steps, workdir: str):
    self.start, self.stop = (int(steps[0]), int(steps[1])) if steps else (None, None)
    if steps and not 0 <= self.start < self.stop:
      raise ConfigError(f'config.logging.profile_steps={tuple(steps)!r}: expected (start, stop) with 0 <= start < '
                        'stop')
    self.directory = f'{workdir}/profile'
    self.active = False

  def before(self, step: int) -> None:
    if self.start is not None and step == self.start and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs=None) -> None:
    if self.active and step + 1 >= self.stop:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      logging.info('profile of steps %d-%d written to %s', self.start, self.stop - 1, self.directory)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
