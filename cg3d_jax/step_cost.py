"""What one compiled training step costs on the device it runs on: FLOPs, memory from XLA's own analysis, the
achieved rate (TFLOP/s per device) and model-FLOP utilisation (MFU) against the device's peak, and whether the step
fits in device memory before a run starts.

FLOPs are the step program's matmul and convolution FLOPs, counted on its jaxpr (`matmul_flops`) with every loop
body multiplied by its trip count, divided evenly over the devices. XLA's cost analysis counts a loop body once
whatever its trip count, which undercounts a scanned layer stack by its depth (798 GFLOP for the real batch-64 step
with scanned layers against 5,611 unrolled); it is kept beside (`xla_flops`). Rematerialised layers are counted
as the program runs them, recomputation included. XLA's memory analysis describes the SPMD-partitioned program,
i.e. one device's share: bytes here are per device.

MFU = achieved FLOP/s per device / the peak dense matmul rate of the device in the step's compute dtype
(PEAK_TFLOPS, from the vendors' data sheets; float32 on NVIDIA GPUs counts TF32 tensor cores, which XLA uses for
float32 matmuls by default; TPUs list bfloat16 only, float32 runs as several bfloat16 passes). Unknown devices (this
CPU, say) report TFLOP/s without MFU.
"""

import contextlib
import dataclasses
import gc

import jax
import jax.extend
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


def _product(values) -> int:
  out = 1
  for v in values:
    out *= int(v)
  return out


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params['dimension_numbers']
  lhs_free = [d for i, d in enumerate(lhs) if i not in lhs_contract and i not in lhs_batch]
  rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  return (
    2
    * _product(lhs[i] for i in lhs_batch)
    * _product(lhs[i] for i in lhs_contract)
    * _product(lhs_free)
    * _product(rhs_free)
  )


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out features, in features per group, spatial...)
  per_output = rhs[rhs_spec[1]] * _product(rhs[i] for i in rhs_spec[2:])
  return 2 * _product(eqn.outvars[0].aval.shape) * per_output


def _sub_jaxprs(value):
  for item in value if isinstance(value, (list, tuple)) else [value]:
    if isinstance(item, jax.extend.core.ClosedJaxpr):
      yield item.jaxpr
    elif isinstance(item, jax.extend.core.Jaxpr):
      yield item


def matmul_flops(jaxpr) -> int:
  """Matmul and convolution FLOPs of a jaxpr (2 per multiply-add), nested jaxprs included: a scan's body times its
  length, the costlier branch of a cond, a while loop's body once (its trip count is not static)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'scan':
      total += int(eqn.params['length']) * matmul_flops(eqn.params['jaxpr'])
    elif name == 'cond':
      total += max(matmul_flops(branch) for branch in eqn.params['branches'])
    else:
      total += sum(matmul_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value))
  return total


def _device_count(args) -> int:
  """How many devices the step's inputs are spread over (its SPMD program runs once on each)."""
  counts = [
    len(leaf.sharding.device_set) for leaf in jax.tree.leaves(args) if getattr(leaf, 'sharding', None) is not None
  ]
  return max(counts, default=1)


@dataclasses.dataclass
class StepCost:
  """One compiled step, per device."""

  flops: float  # FLOPs per device per step: matmul_flops of the step's jaxpr / devices (XLA's where no jaxpr)
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written into donated arguments (counted once)
  temp_bytes: int
  peak_bytes: int  # max(XLA's peak estimate, arguments + outputs - aliases + temporaries)
  device_kind: str
  device_limit_bytes: int | None  # what the device says it can hold (None: it does not say, e.g. CPU)
  peak_tflops: float | None
  xla_flops: float | None = None  # XLA's cost analysis per device (loop bodies counted once)

  def tflops_per_device(self, steps_per_s: float) -> float:
    return self.flops * steps_per_s / 1e12

  def mfu(self, steps_per_s: float) -> float | None:
    return self.tflops_per_device(steps_per_s) / self.peak_tflops if self.peak_tflops else None

  def describe(self) -> str:
    gib = 2.0**30
    limit = f' of {self.device_limit_bytes / gib:.1f} GiB' if self.device_limit_bytes else ''
    peak = f'; peak {self.peak_tflops:g} TFLOP/s' if self.peak_tflops else '; peak unknown (no MFU)'
    return (
      f'{self.flops / 1e9:.1f} GFLOP per device per step on {self.device_kind}{peak}; memory per device: '
      f'arguments {self.argument_bytes / gib:.2f} GiB, outputs {self.output_bytes / gib:.2f} GiB (aliased '
      f'{self.alias_bytes / gib:.2f}), temporaries {self.temp_bytes / gib:.2f} GiB, peak '
      f'{self.peak_bytes / gib:.2f} GiB{limit}'
    )


def _device_limit(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # backends without memory statistics
    return None
  return int(stats['bytes_limit']) if stats and stats.get('bytes_limit') else None


def analyse(compiled, compute_dtype, device=None, *, jaxpr=None, num_devices: int = 1) -> StepCost:
  """The StepCost of a `jax.stages.Compiled` step; with its `jaxpr` (jitted.trace(...).jaxpr), FLOPs are counted
  on it and shared over `num_devices`, else XLA's cost analysis is all there is."""
  device = device or jax.local_devices()[0]
  costs = compiled.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs
  xla_flops = float(costs.get('flops', 0.0))
  flops = matmul_flops(jaxpr) / num_devices if jaxpr is not None else xla_flops
  memory = compiled.memory_analysis()
  args, outs = int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes)
  alias, temp = int(memory.alias_size_in_bytes), int(memory.temp_size_in_bytes)
  # XLA's own peak where it is larger; on CPU it reports about the arguments alone, so the sum (what MaxText prints
  # too) is the figure the fit check uses: an upper bound when temporaries could overlap the outputs.
  peak = max(int(getattr(memory, 'peak_memory_in_bytes', 0) or 0), args + outs - alias + temp)
  return StepCost(
    flops=flops,
    argument_bytes=args,
    output_bytes=outs,
    alias_bytes=alias,
    temp_bytes=temp,
    peak_bytes=peak,
    device_kind=device.device_kind,
    device_limit_bytes=_device_limit(device),
    peak_tflops=peak_tflops(device.device_kind, compute_dtype),
    xla_flops=xla_flops,
  )


# Python's cyclic collector while a step is traced, lowered and compiled: a pass every 50,000 net allocations instead
# of every 700, the whole heap after 1,000 middle passes instead of 10. Tracing allocates objects that all live until
# it ends, so the passes find nothing to free and walk them again and again (bench/README_train.md, "Python's
# collector during the compile"); PyTorch's compiler defers full collections for the same reason. The process's own
# thresholds come back afterwards, and reference counting frees whatever is not in a cycle at once either way.
COMPILE_GC_THRESHOLDS = (50_000, 50, 1000)


@contextlib.contextmanager
def _collector_at(thresholds=COMPILE_GC_THRESHOLDS):
  """Python's collector at `thresholds` inside the block (None: as it is), its own thresholds restored after."""
  before = gc.get_threshold()
  if thresholds is not None:
    gc.set_threshold(*thresholds)
  try:
    yield
  finally:
    gc.set_threshold(*before)


def compile_and_analyse(jitted, args, compute_dtype, device=None, *, gc_thresholds=COMPILE_GC_THRESHOLDS):
  """(compiled step, its StepCost): trace once, count FLOPs on the jaxpr, lower and compile (with Python's collector
  at `gc_thresholds`, see COMPILE_GC_THRESHOLDS)."""
  with _collector_at(gc_thresholds):
    traced = jitted.trace(*args)
    compiled = traced.lower().compile()
  return compiled, analyse(compiled, compute_dtype, device, jaxpr=traced.jaxpr, num_devices=_device_count(args))


def check_fits(cost: StepCost, what: str = 'the training step') -> None:
  """Stops before training when the device says the step cannot fit, with the numbers and the knobs."""
  if cost.device_limit_bytes is None or cost.peak_bytes <= cost.device_limit_bytes:
    return
  gib = 2.0**30
  raise ConfigError(
    f'{what} needs {cost.peak_bytes / gib:.1f} GiB per device (arguments '
    f'{cost.argument_bytes / gib:.1f}, temporaries {cost.temp_bytes / gib:.1f}) but a '
    f'{cost.device_kind} holds {cost.device_limit_bytes / gib:.1f} GiB: lower '
    '--config.train.batch_size, turn on --config.model.remat / --config.clip.remat, compute in '
    '--config.model.dtype=bfloat16 / --config.clip.dtype=bfloat16, or shard the state with '
    '--config.mesh.fsdp=<devices>'
  )


class CompiledStep:
  """A jitted step compiled ahead of time on its first call (the same compilation jit would do), so that its cost
  is known and logged, and its memory checked, before the first step runs."""

  def __init__(self, jitted, compute_dtype, what: str = 'the training step'):
    self._jitted, self._dtype, self._what = jitted, compute_dtype, what
    self._compiled = None
    self.cost: StepCost | None = None

  def __call__(self, *args):
    if self._compiled is None:
      self._compiled, self.cost = compile_and_analyse(self._jitted, args, self._dtype)
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
  mfu = f'  MFU {100 * metrics["mfu"]:.1f}%' if 'mfu' in metrics else ''
  return f'{metrics["tflops_per_device"]:.3g} TFLOP/s/device{mfu}'


class Profiler:
  """A JAX trace of steps [start, stop) into `<workdir>/profile` (TensorBoard's profile plugin opens it), when
  config.logging.profile_steps = (start, stop); nothing otherwise."""

  def __init__(self, steps, workdir: str):
    self.start, self.stop = (int(steps[0]), int(steps[1])) if steps else (None, None)
    if steps and not 0 <= self.start < self.stop:
      raise ConfigError(f'config.logging.profile_steps={tuple(steps)!r}: expected (start, stop) with 0 <= start < stop')
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
