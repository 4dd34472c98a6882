"""Compile time of the real CG3D training step: layers scanned (`nn.scan`, the default) against the same layers
unrolled in the compiled program (`--config.model.scan_layers=False --config.clip.scan_layers=False`); with `--gc`,
the scanned step with Python's collector at step_cost.COMPILE_GC_THRESHOLDS (what training does) against its default
thresholds, with the seconds the collector itself took (gc.callbacks).

The real configuration (ViT-B/16 CLIP with random weights and 5 deep prompts, PointTransformer 22 M, 1024 of 8192
points, text cached), lowered and compiled ahead of time for one device; nothing runs. Scanned and unrolled compiles
alternate, `--repeats` times each, in one process with JAX's compilation cache off, so that both see the same
machine state; medians are reported with the ratio. `--remat` compiles both with that rematerialisation policy.

  python bench/bench_compile.py [--batch 8] [--repeats 2] [--remat none|full|dots] [--gc] [--json out.json]
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import load  # noqa: E402
from bench.bench_memory import compile_cg3d_step, real_config  # noqa: E402
from cg3d_jax import step_cost  # noqa: E402
from cg3d_jax.synthetic import random_clip  # noqa: E402


class CollectorClock:
  """Seconds and passes of Python's cyclic collector since the last reset (gc.callbacks)."""

  def __init__(self):
    self.seconds, self.passes, self._start = 0.0, 0, 0.0
    gc.callbacks.append(self._callback)

  def _callback(self, phase, info):
    if phase == 'start':
      self._start = time.perf_counter()
    else:
      self.seconds += time.perf_counter() - self._start
      self.passes += 1

  def reset(self):
    self.seconds, self.passes = 0.0, 0


def compare_collectors(folder: str, args) -> dict:
  """The scanned step compiled with the collector as training sets it and as Python leaves it, alternating. The
  process first imports what a training command has imported by the time its step compiles (it builds its input
  pipeline first: TensorFlow and TFDS), as the collector's passes walk the whole heap."""
  import tensorflow_datasets  # noqa: F401

  clock, runs = CollectorClock(), {'training': [], 'default': []}
  for _ in range(args.repeats):
    for name, thresholds in (('default', None), ('training', step_cost.COMPILE_GC_THRESHOLDS)):
      config = real_config(folder, args.batch, remat=args.remat, scan_layers=True)
      gc.collect()
      clock.reset()
      _, took = compile_cg3d_step(config, args.batch, devices=1, gc_thresholds=thresholds)
      runs[name].append({'seconds': took, 'gc_seconds': clock.seconds, 'gc_passes': clock.passes})
      print(
        f'collector {name} {thresholds or gc.get_threshold()}: trace + lower + compile {took:.1f} s, of which the '
        f'collector {clock.seconds:.1f} s in {clock.passes} passes',
        flush=True,
      )
  medians = {name: statistics.median(r['seconds'] for r in rows) for name, rows in runs.items()}
  print(
    f'real CG3D step, batch {args.batch}, remat {args.remat}, one {jax.devices()[0].device_kind} device: collector '
    f"as training sets it {medians['training']:.1f} s, at Python's defaults {medians['default']:.1f} s "
    f'(median of {args.repeats})'
  )
  return {'runs': runs, 'median_s': medians}


def compare_layouts(folder: str, args) -> dict:
  """The scanned and the unrolled step, alternating, `args.repeats` times each."""
  seconds = {True: [], False: []}
  for _ in range(args.repeats):
    for scan in (True, False):
      config = real_config(folder, args.batch, remat=args.remat, scan_layers=scan)
      _, took = compile_cg3d_step(config, args.batch, devices=1)
      seconds[scan].append(took)
      print(f'{"scanned" if scan else "unrolled"}: lower + compile {took:.1f} s', flush=True)
  scanned, unrolled = statistics.median(seconds[True]), statistics.median(seconds[False])
  print(
    f'real CG3D step, batch {args.batch}, remat {args.remat}, one {jax.devices()[0].device_kind} device: '
    f'scanned {scanned:.1f} s, unrolled {unrolled:.1f} s, unrolled / scanned {unrolled / scanned:.2f}'
  )
  return {'scanned_s': seconds[True], 'unrolled_s': seconds[False], 'ratio': unrolled / scanned}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--remat', default='none')
  parser.add_argument('--gc', action='store_true', help="compare Python's collector settings, not scan/unroll")
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  jax.config.update('jax_enable_compilation_cache', False)  # every compile is a real one
  machine = load.report()  # at the start: the end would only show this script's own load
  print(machine, flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    folder = random_clip.write_random_clip(os.path.join(tmp, 'clip_b16'), seed=0, **random_clip.VIT_B16)
    compared = (compare_collectors if args.gc else compare_layouts)(folder, args)
  result = {'machine': machine, 'batch': args.batch, 'remat': args.remat, **compared}
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


if __name__ == '__main__':
  main()
