"""Point-encoder benchmarks: JAX (jit) against the PyTorch twins on the same machine.

  python bench/bench_point_encoders.py                 # grouping + PointTransformer fwd+bwd, batch 64 x 1024
  python bench/bench_point_encoders.py --only grouping --batch 8

Cases:
  grouping            FPS 1024 -> 64 centres + kNN 32 (Point-BERT's Group), batch B
  fps_8192            FPS 8192 -> 1024 (the data pipeline's subsampling), batch B
  point_transformer   real-config PointTransformer, train mode, forward + backward of a scalar loss, batch B x 1024

Timings are wall-clock medians over --repeats runs after one warm-up run (JAX compile time is reported apart).
Inputs are random points on the unit sphere's surface, the same arrays for both frameworks.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import load  # noqa: E402
from cg3d_jax.models import point_ops  # noqa: E402
from cg3d_jax.models.point_transformer import PointTransformer  # noqa: E402
from cg3d_jax.twins import point_transformer as torch_twin  # noqa: E402
from cg3d_jax.weights import torch_io  # noqa: E402


def sphere_points(batch: int, n: int, seed: int = 0) -> np.ndarray:
  x = np.random.default_rng(seed).normal(size=(batch, n, 3)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def time_runs(fn, repeats: int) -> tuple[float, float]:
  """(first-call seconds, median of `repeats` later calls)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def bench_grouping(batch: int, repeats: int, n: int = 1024, groups: int = 64, k: int = 32):
  pts = sphere_points(batch, n)
  jitted = jax.jit(point_ops.group, static_argnums=(1, 2))
  x = jnp.asarray(pts)
  jax_first, jax_s = time_runs(lambda: jax.block_until_ready(jitted(x, groups, k)), repeats)
  xt = torch.from_numpy(pts)
  _, torch_s = time_runs(lambda: torch_twin.torch_group(xt, groups, k), repeats)
  return jax_s, torch_s, jax_first


def bench_fps(batch: int, repeats: int, n: int = 8192, samples: int = 1024):
  pts = sphere_points(batch, n)
  jitted = jax.jit(point_ops.farthest_point_sample, static_argnums=1)
  x = jnp.asarray(pts)
  jax_first, jax_s = time_runs(lambda: jax.block_until_ready(jitted(x, samples)), repeats)
  xt = torch.from_numpy(pts)
  _, torch_s = time_runs(lambda: torch_twin.torch_farthest_point_sample(xt, samples), repeats)
  return jax_s, torch_s, jax_first


def bench_point_transformer(batch: int, repeats: int, n: int = 1024):
  pts = sphere_points(batch, n)
  model = PointTransformer(num_classes=55)
  variables = jax.jit(model.init, static_argnames='train')(jax.random.key(0), jnp.asarray(pts), train=False)
  direction = np.random.default_rng(1).normal(size=(batch, model.embed_dim)).astype(np.float32)

  def loss_fn(params, batch_stats, points, key):
    out, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, points, train=True, mutable=['batch_stats'], rngs={'dropout': key}
    )
    return jnp.sum(out * direction), updates['batch_stats']

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  x, key = jnp.asarray(pts), jax.random.key(2)
  jax_first, jax_s = time_runs(
    lambda: jax.block_until_ready(step(variables['params'], variables['batch_stats'], x, key)), repeats
  )

  twin = torch_twin.PointTransformerProject()
  twin.load_state_dict(torch_io.point_transformer_to_torch(variables['params'], variables['batch_stats']))
  twin.train()
  xt, dt = torch.from_numpy(pts), torch.from_numpy(direction)

  def torch_step():
    twin.zero_grad(set_to_none=True)
    torch.sum(twin(xt) * dt).backward()

  _, torch_s = time_runs(torch_step, repeats)
  return jax_s, torch_s, jax_first


CASES = {'grouping': bench_grouping, 'fps_8192': bench_fps, 'point_transformer': bench_point_transformer}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--only', choices=sorted(CASES), action='append', help='run only these cases (repeatable)')
  args = parser.parse_args()
  print(load.report())  # a ratio taken under load can reverse on an idle machine
  print(
    f'jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs seen), torch {torch.__version__} '
    f'with {torch.get_num_threads()} threads; batch {args.batch}, median of {args.repeats} after a warm-up'
  )
  print(f'{"case":20s} {"jax s":>9s} {"torch s":>9s} {"torch/jax":>9s} {"jax 1st call s":>15s}')
  for name in args.only or list(CASES):
    jax_s, torch_s, jax_first = CASES[name](args.batch, args.repeats)
    print(f'{name:20s} {jax_s:9.3f} {torch_s:9.3f} {torch_s / jax_s:9.2f} {jax_first:15.1f}', flush=True)


if __name__ == '__main__':
  main()
