"""Step cost accounting: XLA's per-device FLOPs and memory against hand-computed values, the peak table, the memory
check's message, the rate metrics a training run logs, the profiler's trace, and Python's collector while a step
compiles."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cg3d_jax import sharding, step_cost
from cg3d_jax.errors import ConfigError
from cg3d_jax.metric_writer import read_jsonl


def test_flops_and_memory_are_per_device_and_match_hand_counts():
  """A (64 x 256) @ (256 x 512) matmul, rows split over 8 devices: 2*64*256*512/8 FLOPs per device; arguments are
  one device's row block plus the whole replicated matrix."""
  mesh = sharding.make_mesh({'data': -1})
  n = mesh.size
  a = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P('data')))
  b = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
  cost = step_cost.analyse(compiled, jnp.float32)
  assert cost.flops == 2 * 64 * 256 * 512 / n
  assert cost.argument_bytes == 4 * (64 * 256 // n + 256 * 512)
  assert cost.output_bytes == 4 * 64 * 512 // n
  assert cost.peak_bytes >= cost.argument_bytes + cost.output_bytes - cost.alias_bytes + cost.temp_bytes
  assert cost.device_kind == jax.devices()[0].device_kind and cost.peak_tflops is None  # a CPU: no MFU
  assert step_cost.rate_metrics([cost], samples_per_s=80.0, batch_size=8) == {
    'tflops_per_device': pytest.approx(cost.flops * 10 / 1e12)
  }


def test_peak_table_and_mfu():
  assert step_cost.peak_tflops('NVIDIA H100 80GB HBM3', jnp.bfloat16) == 989.4
  assert step_cost.peak_tflops('NVIDIA H200', 'float32') == 494.7
  assert step_cost.peak_tflops('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312.0
  assert step_cost.peak_tflops('TPU v5 lite', jnp.float32) == 197.0  # TPUs: the bfloat16 peak
  assert step_cost.peak_tflops('TPU v5p', jnp.bfloat16) == 459.0
  assert step_cost.peak_tflops('TPU v6 lite', jnp.bfloat16) == 918.0
  assert step_cost.peak_tflops('cpu', jnp.float32) is None
  cost = step_cost.StepCost(
    flops=5.6e12,
    argument_bytes=0,
    output_bytes=0,
    alias_bytes=0,
    temp_bytes=0,
    peak_bytes=0,
    device_kind='NVIDIA H100',
    device_limit_bytes=None,
    peak_tflops=989.4,
  )
  # 5.6 TFLOP per step at 2 steps/s (batch 64, 128 samples/s): 11.2 TFLOP/s, 1.13% of 989.4.
  metrics = step_cost.rate_metrics([cost], samples_per_s=128.0, batch_size=64)
  assert metrics['tflops_per_device'] == pytest.approx(11.2)
  assert metrics['mfu'] == pytest.approx(11.2 / 989.4)
  assert step_cost.format_rate(metrics) == '11.2 TFLOP/s/device  MFU 1.1%'


def test_a_step_that_cannot_fit_stops_with_the_numbers_and_the_knobs():
  gib = 2**30
  cost = step_cost.StepCost(
    flops=1.0,
    argument_bytes=30 * gib,
    output_bytes=0,
    alias_bytes=0,
    temp_bytes=60 * gib,
    peak_bytes=90 * gib,
    device_kind='NVIDIA H100 80GB HBM3',
    device_limit_bytes=80 * gib,
    peak_tflops=989.4,
  )
  with pytest.raises(
    ConfigError,
    match=r'needs 90.0 GiB per device \(arguments 30.0, temporaries 60.0\) but a '
    r'NVIDIA H100 80GB HBM3 holds 80.0 GiB: lower --config.train.batch_size.*remat'
    r'.*bfloat16.*fsdp',
  ):
    step_cost.check_fits(cost)
  step_cost.check_fits(step_cost.StepCost(**{**cost.__dict__, 'device_limit_bytes': None}))  # unknown: no check


def test_compiled_step_runs_what_jit_runs_and_records_its_cost():
  step = step_cost.CompiledStep(jax.jit(lambda x: (x @ x.T).sum()), jnp.float32, 'a test step')
  x = jnp.asarray(np.arange(12.0).reshape(3, 4), jnp.float32)
  assert float(step(x)) == float((np.arange(12.0).reshape(3, 4) @ np.arange(12.0).reshape(3, 4).T).sum())
  assert step.cost.flops == 2 * 3 * 4 * 3


def _layer_stack_loss(unroll: int):
  def loss(w, x):
    body = lambda carry, wi: (jnp.tanh(carry @ wi), None)  # noqa: E731
    return jax.lax.scan(body, x, w, unroll=unroll)[0].sum()

  return jax.grad(loss, argnums=(0, 1))


def test_the_step_traces_with_fewer_collections_and_the_thresholds_come_back():
  """Python runs the step's code while JAX traces it, so the step itself reads the collector's thresholds: they are
  COMPILE_GC_THRESHOLDS there and the process's own again afterwards, after a failed compile as well. Fails if
  compile_and_analyse stops setting them (the step sees the process's) or stops restoring them."""
  seen = []

  def step(x):
    seen.append(gc.get_threshold())
    return x * 2.0

  def bad_step(x):
    raise ValueError('a step that does not trace')

  before = gc.get_threshold()
  process = (700, 10, 10)  # Python's defaults; the test session itself runs at COMPILE_GC_THRESHOLDS (conftest)
  assert process != step_cost.COMPILE_GC_THRESHOLDS
  gc.set_threshold(*process)
  try:
    compiled, _ = step_cost.compile_and_analyse(jax.jit(step), (jnp.ones(3),), jnp.float32)
    assert seen == [step_cost.COMPILE_GC_THRESHOLDS] and gc.get_threshold() == process
    np.testing.assert_array_equal(compiled(jnp.ones(3)), 2.0)
    with pytest.raises(ValueError):
      step_cost.compile_and_analyse(jax.jit(bad_step), (jnp.ones(3),), jnp.float32)
    assert gc.get_threshold() == process
  finally:
    gc.set_threshold(*before)


def test_flops_count_every_layer_of_a_scan_where_xla_counts_one():
  """A stack of L (m x k) @ (k x k) layers under lax.scan, differentiated: per layer the forward product, the input
  gradient and the weight gradient, 3 x 2mk^2, times L. XLA's cost analysis counts a loop body once; on the same
  program unrolled it sees every layer (plus the elementwise work): the count lies just under it."""
  layers, m, k = 6, 16, 32
  w = jax.ShapeDtypeStruct((layers, k, k), jnp.float32)
  x = jax.ShapeDtypeStruct((m, k), jnp.float32)
  expected = 3 * layers * 2 * m * k * k
  assert step_cost.matmul_flops(jax.make_jaxpr(_layer_stack_loss(1))(w, x)) == expected
  _, scanned = step_cost.compile_and_analyse(jax.jit(_layer_stack_loss(1)), (w, x), jnp.float32)
  _, unrolled = step_cost.compile_and_analyse(jax.jit(_layer_stack_loss(layers)), (w, x), jnp.float32)
  assert scanned.flops == unrolled.flops == expected
  assert scanned.xla_flops < expected / 2  # one layer's worth, not six
  assert expected <= unrolled.xla_flops < 1.15 * expected
  # Shared over the devices the inputs are sharded on, as XLA's per-device figures are.
  mesh = sharding.make_mesh({'data': -1})
  xs = jax.ShapeDtypeStruct((8 * m, k), jnp.float32, sharding=NamedSharding(mesh, P('data')))
  ws = jax.ShapeDtypeStruct((layers, k, k), jnp.float32, sharding=NamedSharding(mesh, P()))
  _, sharded = step_cost.compile_and_analyse(jax.jit(_layer_stack_loss(1)), (ws, xs), jnp.float32)
  assert sharded.flops == 8 * expected / mesh.size


def test_profiler_writes_a_trace_of_the_chosen_steps(tmp_path):
  profiler = step_cost.Profiler((1, 3), str(tmp_path))
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  for step in range(4):
    profiler.before(step)
    out = f(jnp.ones((16, 16)))
    profiler.after(step, out)
  profiler.close()
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))
  with pytest.raises(ConfigError, match='profile_steps'):
    step_cost.Profiler((3, 1), str(tmp_path))


def test_training_logs_carry_the_achieved_rate(tiny_checkpoint):
  rows = [r for r in read_jsonl(str(tiny_checkpoint / 'train.jsonl')) if 'loss' in r]
  assert rows and all(r['tflops_per_device'] > 0 for r in rows)
  assert all('mfu' not in r for r in rows)  # this CPU has no peak in the table
