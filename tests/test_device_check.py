"""bench/device_check.py, the one command a lent GPU machine runs, rehearsed at its tiny size on this CPU so that it
cannot rot: every section runs, the correctness rows hold against their references (transformers' CLIP, the PyTorch
twins, the PyTorch reference of the original runner), the speed rows carry figures consistent with XLA's cost
analysis, and the folder holds the table and the JSON. It also covers bench/bench_accelerator.py's step benchmarks,
which the check calls."""

import json

import pytest

from bench import device_check, load


def test_the_device_check_rehearses_on_cpu(tmp_path, capsys):
  result = device_check.main([str(tmp_path / 'out'), '--cpu-rehearsal'])
  rows = result['rows']
  assert not [r for r in rows if r['section'] in ('error', 'skipped')], rows
  correctness = [r for r in rows if r['section'] == 'correctness']
  # 2 CLIP fp32 + 2 CLIP bf16, 2 encoders, 3 step losses: each compared, each within its target.
  assert len(correctness) == 9 and all(r['ok'] for r in correctness), correctness
  assert result['all_correct']
  steps = [r for r in rows if r['section'] == 'speed' and r['check'].startswith('CG3D step')]
  assert [r['check'].split(',')[1].strip() for r in steps] == ['JAX bf16', 'PyTorch fp32 + SDPA']
  for row in steps[:1]:
    assert row['gflop_per_device'] > 0 and row['compile_s'] > 0 and row['xla_peak_gib'] > 0
    # TFLOP/s = FLOPs per step x steps per second, the definition MFU divides by the peak.
    assert row['tflops_per_device'] == pytest.approx(row['gflop_per_device'] / row['s_per_step'] / 1e3)
    assert row['mfu'] is None  # a CPU has no entry in the peak table
  assert steps[1]['samples_per_s'] > 0
  losses = [r for r in correctness if 'joint step' in r['check']]
  assert all(1.0 < r['pytorch'] < 10.0 for r in losses)  # InfoNCE over 8 pairs: about log 8, not a degenerate 0
  zeroshot = next(r for r in rows if r['check'].startswith('zero-shot'))
  assert zeroshot['objects_per_s'] > 0 and '32 clouds' in zeroshot['check']
  library = next(r for r in rows if r['check'].startswith('library embedding'))
  assert library['shapes_per_s'] > 0 and '16 shape files of 1,024 points' in library['check']
  assert rows[-1]['section'] == 'on paper' and 'min' in rows[-1]['value']
  saved = json.loads((tmp_path / 'out' / 'device_check.json').read_text())
  assert saved['rows'] == json.loads(json.dumps(rows, default=str))
  table = (tmp_path / 'out' / 'device_check.md').read_text()
  assert table in capsys.readouterr().out
  assert load.cpu_model().split(' (')[0] in table  # the processor is named beside the figures
  assert table.count('| pass |') == 9 and '| FAIL |' not in table
