"""Input-pipeline benchmark at CG3D's real sizes, and where farthest-point sampling should run.

  python bench/bench_pipeline.py                       # writes /tmp/cg3d_bench_data once (a few minutes), then measures
  python bench/bench_pipeline.py --root /data/bench --batches 20

Cases:
  pipeline     pretraining host batches: 8192-point clouds (normalise, resample, 5 augmentations), one 224 px view
               drawn from 5 (PNG decode, CLIP normalisation), caption template index; batch 64; samples/s after
               two warm-up batches. The folder is procedural (objects.py) at real sizes, built by the real builder.
  fps_host     NumPy farthest-point sampling 8192 -> 1024 for one cloud (what a host-side FPS would cost per sample)
  fps_device   the model's jitted JAX FPS (cg3d_jax.models.point_ops) 8192 -> 1024 for the whole batch of 64, on
               whatever jax.devices() offers here
Timings are wall clock; medians over --repeats runs.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import load  # noqa: E402
from cg3d_jax.configs import base  # noqa: E402
from cg3d_jax.data import pipeline  # noqa: E402
from cg3d_jax.models import point_ops  # noqa: E402
from cg3d_jax.synthetic import objects  # noqa: E402
from tests import numpy_transforms  # noqa: E402

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def pretrain_stream(root: str, batch: int, per_class: int, folder: str = 'manual'):
  """(CG3D's pretraining stream at the real sizes, the seconds its folder took): a procedural ShapeNet-55 folder
  under root/folder (written once, then reused) prepared by the real builder into root/tfds."""
  settings = objects.SyntheticSettings(
    seed=0, num_train_per_class=per_class, num_test_per_class=1, num_points=8192, image_size=224, num_views=5
  )
  start = time.perf_counter()
  manual = objects.ensure_synthetic_shapenet(os.path.join(root, folder), settings)
  written = time.perf_counter() - start
  c = base.get_base_config().data
  c.manual_dir, c.data_dir = str(manual), os.path.join(root, 'tfds')
  ds = pipeline.pretrain_local_dataset(
    c,
    global_batch_size=batch,
    image_size=224,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
    num_templates=63,
    seed=0,
    process_index=0,
    process_count=1,
  )
  return ds, written


def bench_pipeline(root: str, batch: int, batches: int, per_class: int) -> dict:
  ds, written = pretrain_stream(root, batch, per_class)
  it = ds.as_numpy_iterator()
  for _ in range(2):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    out = next(it)
  elapsed = time.perf_counter() - start
  assert out['points'].shape == (batch, 8192, 3) and out['image'].shape == (batch, 224, 224, 3)
  return {'samples_per_s': batch * batches / elapsed, 'batch_s': elapsed / batches, 'folder_s': written}


def bench_fps(batch: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  clouds = rng.normal(size=(batch, 8192, 3)).astype(np.float32)
  clouds /= np.linalg.norm(clouds, axis=-1, keepdims=True)
  host = []
  for i in range(repeats):
    start = time.perf_counter()
    numpy_transforms.farthest_point_sample_np(clouds[i], 1024)
    host.append(time.perf_counter() - start)
  fps = jax.jit(point_ops.farthest_point_sample, static_argnums=1)
  x = jnp.asarray(clouds)
  start = time.perf_counter()
  fps(x, 1024).block_until_ready()
  compile_s = time.perf_counter() - start
  device = []
  for _ in range(repeats):
    start = time.perf_counter()
    fps(x, 1024).block_until_ready()
    device.append(time.perf_counter() - start)
  # The same indices both ways (random clouds have no exact ties), so the comparison is like for like.
  np.testing.assert_array_equal(
    np.asarray(fps(x[:1], 1024))[0], numpy_transforms.farthest_point_sample_np(clouds[0], 1024)
  )
  return {
    'host_ms_per_cloud': 1e3 * statistics.median(host),
    'device_ms_per_batch': 1e3 * statistics.median(device),
    'device_compile_s': compile_s,
    'device': str(jax.devices()[0].platform),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', default='/tmp/cg3d_bench_data')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--batches', type=int, default=10)
  parser.add_argument('--per_class', type=int, default=8, help='training objects per family (13 families)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--only', choices=['pipeline', 'fps'])
  args = parser.parse_args()
  print(load.report())  # a ratio taken under load can reverse on an idle machine
  print(f'cpu cores: {os.cpu_count()}, jax devices: {jax.devices()}')
  if args.only != 'fps':
    r = bench_pipeline(args.root, args.batch, args.batches, args.per_class)
    print(
      f'pipeline: {r["samples_per_s"]:.1f} samples/s ({r["batch_s"]:.2f} s per batch of {args.batch}); '
      f'folder ready in {r["folder_s"]:.0f} s'
    )
  if args.only != 'pipeline':
    r = bench_fps(args.batch, args.repeats)
    per_batch_host = r['host_ms_per_cloud'] * args.batch / 1e3
    print(
      f'fps_host: {r["host_ms_per_cloud"]:.1f} ms per cloud = {per_batch_host:.2f} s per batch of '
      f'{args.batch} on one core ({1e3 / r["host_ms_per_cloud"]:.1f} clouds/s/core)'
    )
    print(
      f'fps_device ({r["device"]}): {r["device_ms_per_batch"]:.1f} ms per batch of {args.batch} '
      f'(compile {r["device_compile_s"]:.1f} s)'
    )


if __name__ == '__main__':
  main()
