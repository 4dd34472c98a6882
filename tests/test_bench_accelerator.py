"""bench/bench_accelerator.py runs on CPU at its small size: one table and JSON, every figure present and consistent
with XLA's cost analysis (the GPU/TPU figures come from the same code at the real size)."""

import json

import pytest

from bench import bench_accelerator


def test_the_device_benchmark_runs_small_on_cpu(tmp_path, capsys):
  out = tmp_path / 'accelerator.json'
  result = bench_accelerator.main(['--small', '--variants', 'fp32,bf16-remat', '--iters', '1', '--json', str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  jax_rows = [r for r in result['rows'] if r['implementation'].startswith('JAX')]
  assert [r['implementation'] for r in jax_rows] == ['JAX fp32', 'JAX bf16-remat']
  for row in jax_rows:
    assert row['gflop_per_device'] > 0 and row['compile_s'] > 0 and row['xla_peak_gib'] > 0
    # TFLOP/s = FLOPs per step x steps per second, the definition MFU divides by the peak.
    assert row['tflops_per_device'] == pytest.approx(row['gflop_per_device'] / row['s_per_step'] / 1e3)
    assert row['mfu'] is None  # a CPU has no entry in the peak table
  assert result['rows'][-1]['implementation'] == 'PyTorch fp32 + SDPA' and result['rows'][-1]['samples_per_s'] > 0
  assert result['fps_8192_to_1024_clouds_per_s'] > 0 and result['eval_objects_per_s'] > 0
  table = capsys.readouterr().out
  assert '| JAX bf16-remat |' in table and 'FPS 8192->1024' in table
