"""Benchmark: CG3D's PointMLP, train-mode forward + backward of a scalar loss, JAX (jit) vs the PyTorch twin.

Real configuration (13.1 M parameters, 1024 points, k = 24, four stages), fp32, BatchNorm in train mode (batch
statistics and running-average updates), gradient with respect to every parameter. Both sides start from the same
weights (the Flax init, exported with pointmlp_state_dict) and see the same points (random, on the unit sphere).
JAX and PyTorch iterations alternate so that a busy shared machine slows both alike; medians are reported, and the
JAX compile time separately. At batch 32 each side needs ~10 GB of activations; where the two do not fit in memory
together, run them one at a time with --framework.

  python bench/bench_pointmlp.py [--batch 32] [--points 1024] [--iters 3] [--warmup 1] [--framework both|jax|torch]
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import load  # noqa: E402
from cg3d_jax.models.pointmlp import PointMLP  # noqa: E402
from cg3d_jax.twins.pointmlp import PointMLPProject  # noqa: E402
from cg3d_jax.weights.pointmlp_state_dict import pointmlp_to_torch  # noqa: E402


def sphere_points(batch: int, n: int, seed: int = 0) -> np.ndarray:
  x = np.random.default_rng(seed).normal(size=(batch, n, 3)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_jax_step(model: PointMLP, direction: np.ndarray):
  def loss_fn(params, batch_stats, points):
    out, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, points, train=True, mutable=['batch_stats']
    )
    return jnp.sum(out * direction), updates['batch_stats']

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--points', type=int, default=1024)
  parser.add_argument('--iters', type=int, default=3, help='timed iterations per framework')
  parser.add_argument('--warmup', type=int, default=1, help='untimed iterations per framework first')
  parser.add_argument('--framework', choices=('both', 'jax', 'torch'), default='both')
  args = parser.parse_args()
  print(load.report())  # a ratio taken under load can reverse on an idle machine

  model = PointMLP()
  points = sphere_points(args.batch, args.points)
  direction = np.random.default_rng(1).normal(size=(args.batch, model.projection_dim)).astype(np.float32)
  variables = jax.jit(lambda p: model.init(jax.random.key(0), p, train=False))(points[:1])
  params, batch_stats = variables['params'], variables['batch_stats']

  frameworks = ('jax', 'torch') if args.framework == 'both' else (args.framework,)
  steps, compile_s = {}, None
  if 'jax' in frameworks:
    start = time.perf_counter()
    compiled = make_jax_step(model, direction).lower(params, batch_stats, points).compile()
    compile_s = time.perf_counter() - start
    steps['jax'] = lambda: jax.block_until_ready(compiled(params, batch_stats, points))
  if 'torch' in frameworks:
    twin = PointMLPProject(points=args.points)
    twin.load_state_dict(pointmlp_to_torch(params, batch_stats), strict=True)
    twin.train()
    xt, dt = torch.from_numpy(points), torch.from_numpy(direction)

    def torch_step():
      twin.zero_grad(set_to_none=True)
      torch.sum(twin(xt) * dt).backward()

    steps['torch'] = torch_step

  for _ in range(args.warmup):  # first-run allocation, torch's lazy init
    for fn in steps.values():
      fn()
  times = {name: [] for name in steps}
  for _ in range(args.iters):
    for name, fn in steps.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)

  print(f'PointMLP (CG3D config) train-mode forward+backward, batch {args.batch} x {args.points} points, fp32')
  print(
    f'machine: {load.cpu_model()}, {os.cpu_count()} CPUs; jax {jax.__version__} '
    f'({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)'
  )
  print(f'{"framework":10s} {"median s":>9s} {"all runs s":>24s}')
  for name, runs in times.items():
    print(f'{name:10s} {statistics.median(runs):9.2f} {" ".join(f"{t:.2f}" for t in runs):>24s}')
  if compile_s is not None:
    print(f'jax compile {compile_s:.1f} s')
  if len(times) == 2:
    print(f'torch / jax = {statistics.median(times["torch"]) / statistics.median(times["jax"]):.2f}')


if __name__ == '__main__':
  main()
