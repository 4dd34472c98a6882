"""Benchmark: export to the original CG3D container and import back, at the real encoder sizes.

For each encoder (random Flax weights at CG3D's sizes, deep prompts 12 x 5 x 768) and each format (.pth,
.safetensors): convert (Flax tree -> the original's state dict, weights/cg3d_pth.build_container), write (atomic
torch.save / safetensors + JSON sidecar), import (weights/cg3d_pth.load_cg3d_checkpoint: read, name and shape checks,
-> Flax variables); medians of `--iters` runs, the file size, and a check that the import gives back the same
arrays. Then what `export --verify` adds for the .pth (once): the strict load into the PyTorch twin, and the JAX and
PyTorch features of the four shipped ModelNet40 objects in float64 (compile included), with their max difference.

  python bench/bench_export.py [--iters 5] [--dir /tmp]
"""

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import load  # noqa: E402
from cg3d_jax.models.point_transformer import PointTransformer  # noqa: E402
from cg3d_jax.models.pointmlp import PointMLP  # noqa: E402
from cg3d_jax.trees import flatten  # noqa: E402
from cg3d_jax.twins import verify  # noqa: E402
from cg3d_jax.weights import cg3d_pth  # noqa: E402

# The pretraining models as exports hold them (the PointTransformer with its 55-class head).
ENCODERS = {'point_transformer': lambda: PointTransformer(num_classes=55), 'pointmlp': PointMLP}
WRITERS = {'.pth': cg3d_pth.write_cg3d_checkpoint, '.safetensors': cg3d_pth.write_safetensors_checkpoint}


def median_seconds(fn, iters: int):
  times, result = [], None
  for _ in range(iters):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--dir', default=None, help='where the files are written (default: a temporary folder)')
  args = parser.parse_args()
  print(load.report())
  prompts = np.random.default_rng(0).normal(size=(12, 5, 768)).astype(np.float32)
  verifications = []
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    print('| encoder | format | convert | write | import (incl. shape checks) | file |')
    print('| --- | --- | --- | --- | --- | --- |')
    for name, cls in ENCODERS.items():
      model = cls()
      points = np.zeros((1, 1024, 3), np.float32)
      variables = jax.jit(lambda p, m=model: m.init(jax.random.key(0), p, train=False))(points)
      params = jax.tree.map(np.asarray, variables['params'])
      stats = jax.tree.map(np.asarray, variables.get('batch_stats', {}))
      count = sum(x.size for x in jax.tree.leaves(params))
      for suffix, write in WRITERS.items():
        convert_s, container = median_seconds(
          lambda: cg3d_pth.build_container(name, params, stats, prompts=prompts, prompt_mode='deep'), args.iters
        )
        path = pathlib.Path(tmp) / f'{name}{suffix}'
        write_s, _ = median_seconds(lambda: write(path, container), args.iters)
        import_s, loaded = median_seconds(lambda: cg3d_pth.load_cg3d_checkpoint(path), args.iters)
        back = flatten(loaded[1])
        same = all(np.array_equal(back[k], v) for k, v in flatten(params).items() if k in back)
        size = path.stat().st_size / 2**20
        print(
          f'| {name} ({count / 1e6:.2f} M) | {suffix} | {convert_s:.2f} s | {write_s:.2f} s | {import_s:.2f} s '
          f'| {size:.1f} MiB |' + ('' if same else '  MISMATCH after import'),
          flush=True,
        )
      verifications.append(
        _verify_timing(name, model, {'params': params, 'batch_stats': stats}, pathlib.Path(tmp) / f'{name}.pth')
      )
  for line in verifications:
    print(line)


def _verify_timing(name: str, model, variables, path: pathlib.Path) -> str:
  _, clouds = verify.verify_clouds(None, None, 1024)
  start = time.perf_counter()
  twin = verify.load_twin(path, name, model, 1024)
  load_s = time.perf_counter() - start
  start = time.perf_counter()
  diff, got, _ = verify.compare_features(twin, model, variables, clouds)
  compare_s = time.perf_counter() - start
  return (
    f'--verify {name}: strict load into the twin {load_s:.2f} s; float64 features of {len(clouds)} objects, '
    f'JAX (compile + run) and PyTorch, {compare_s:.2f} s; max |difference| {diff:.2g} (largest |feature| '
    f'{np.abs(got).max():.2g})'
  )


if __name__ == '__main__':
  main()
