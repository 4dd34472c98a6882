"""Zero-shot evaluation throughput (objects/s): the real eval feature path in JAX against the PyTorch twin.

  python bench/bench_eval.py                          # 256 objects, batch 32, 1024 points, real-config encoder
  python bench/bench_eval.py --objects 2468 --stored 8192   # the full ModelNet40 test size, FPS 8192 -> 1024 first

What is timed, per batch of clouds (B, stored, 3), after one untimed warm-up batch:
  JAX    cg3d_jax.eval.zeroshot.point_feature_fn: FPS to 1024 on device (a no-op at --stored 1024), the real-config
         PointTransformer (22.46 M parameters, random weights) in eval mode, L2 normalisation; jitted, batch-sharded
         over the local devices (one on a plain CPU run), results fetched to the host;
  torch  the twin (cg3d_jax.weights.torch_twin.PointTransformerProject) with the same weights, eval mode,
         torch.no_grad(), the twin's FPS when stored > 1024, L2 normalisation.
Data reading and the text classifier (computed once per dataset) are not timed. Throughput over --objects objects
is extrapolated to ModelNet40's 2,468 test objects. The two frameworks' features are compared as a sanity check.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import load  # noqa: E402
from cg3d_jax import sharding  # noqa: E402
from cg3d_jax.evaluators import zeroshot  # noqa: E402
from cg3d_jax.models.cg3d import CG3D  # noqa: E402
from cg3d_jax.models.point_transformer import PointTransformer  # noqa: E402
from cg3d_jax.twins import point_transformer as torch_twin  # noqa: E402
from cg3d_jax.weights import torch_io  # noqa: E402

MODELNET40_TEST = 2468


def unit_sphere_clouds(num: int, n: int, seed: int = 0) -> np.ndarray:
  """Random clouds centred and scaled into the unit ball, as the eval pipeline delivers them."""
  x = np.random.default_rng(seed).normal(size=(num, n, 3)).astype(np.float32)
  x -= x.mean(axis=1, keepdims=True)
  return x / np.linalg.norm(x, axis=-1).max(axis=1)[:, None, None]


def bench_jax(clouds, batch, variables, mesh):
  model = CG3D(encoder=PointTransformer(num_classes=55), clip=None, num_points=1024)
  features_fn, replicated = zeroshot.point_feature_fn(model, mesh)
  variables = jax.device_put(variables, replicated)
  batch_sharding = sharding.batch_sharding(mesh)

  def run(chunk):
    return np.asarray(features_fn(variables, jax.device_put(chunk, batch_sharding)))

  start = time.perf_counter()
  run(clouds[:batch])
  first = time.perf_counter() - start
  start = time.perf_counter()
  out = [run(clouds[i : i + batch]) for i in range(0, len(clouds), batch)]
  return time.perf_counter() - start, first, np.concatenate(out)


def bench_torch(clouds, batch, variables):
  twin = torch_twin.PointTransformerProject()
  twin.load_state_dict(torch_io.point_transformer_to_torch(variables['params'], variables['batch_stats']))
  twin.eval()

  def run(chunk):
    with torch.no_grad():
      x = torch.from_numpy(chunk)
      if x.shape[1] != 1024:
        x = torch_twin.torch_gather_points(x, torch_twin.torch_farthest_point_sample(x, 1024))
      return torch.nn.functional.normalize(twin(x), dim=-1).numpy()

  run(clouds[:batch])
  start = time.perf_counter()
  out = [run(clouds[i : i + batch]) for i in range(0, len(clouds), batch)]
  return time.perf_counter() - start, np.concatenate(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--objects', type=int, default=256)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--stored', type=int, default=1024, help='points per stored cloud (FPS to 1024 when larger)')
  parser.add_argument('--skip_torch', action='store_true')
  args = parser.parse_args()
  print(load.report())  # a ratio taken under load can reverse on an idle machine
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1}, jax.local_devices())
  if args.batch % mesh.size:
    parser.error(f'--batch {args.batch} must be a multiple of the {mesh.size} devices')
  objects = -(-args.objects // args.batch) * args.batch  # whole batches
  clouds = unit_sphere_clouds(objects, args.stored)
  variables = jax.jit(PointTransformer(num_classes=55).init, static_argnames='train')(
    jax.random.key(0), jnp.asarray(clouds[:2, :1024]), train=False
  )
  print(
    f'jax {jax.__version__} on {mesh.size} {jax.devices()[0].platform} device(s) ({os.cpu_count()} CPUs seen), '
    f'torch {torch.__version__} with {torch.get_num_threads()} threads; {objects} objects of {args.stored} '
    f'points -> 1024, batch {args.batch}'
  )
  jax_s, jax_first, jax_out = bench_jax(clouds, args.batch, variables, mesh)
  rows = [('jax', jax_s)]
  if not args.skip_torch:
    torch_s, torch_out = bench_torch(clouds, args.batch, variables)
    rows.append(('torch', torch_s))
    print(f'max |feature difference| jax vs torch: {np.abs(jax_out - torch_out).max():.2e}')
  print(f'jax first batch (compile + run): {jax_first:.1f} s')
  print(f'{"framework":10s} {"seconds":>9s} {"objects/s":>10s} {"ModelNet40 test (2,468) s":>26s}')
  for name, seconds in rows:
    rate = objects / seconds
    print(f'{name:10s} {seconds:9.1f} {rate:10.2f} {MODELNET40_TEST / rate:26.0f}', flush=True)


if __name__ == '__main__':
  main()
