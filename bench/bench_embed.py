"""Library embedding rate: shapes/s of `cg3d-embed` with CG3D's real-size encoder (random weights).

  python bench/bench_embed.py [--shapes 512] [--points 8192] [--batch 64]

What is measured: cg3d_jax.embed.embed over --shapes procedural objects written as .npy files of --points points
(cg3d_jax/synthetic/shapes.py, 13 families), with the real-config PointTransformer (22.5 M parameters, 1024 points,
an exported CG3D .pth of random weights); each shape drawn to 2,048 points, FPS to 1,024 on device, batch --batch
over every local device; reading, preparing, thumbnails and writing the library included; model loading and the
first (compiling) chunk excluded by embedding a first run of --batch shapes before the timed one.
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import load  # noqa: E402
from cg3d_jax import embed  # noqa: E402
from cg3d_jax.configs import base  # noqa: E402
from cg3d_jax.models.point_transformer import PointTransformer  # noqa: E402
from cg3d_jax.synthetic import shapes  # noqa: E402
from cg3d_jax.weights import cg3d_pth  # noqa: E402


def write_checkpoint(path: pathlib.Path, encoder: dict | None = None, num_points: int | None = None) -> None:
  """An exported CG3D .pth of random weights: the real-config PointTransformer, or `encoder`'s sizes."""
  config = base.get_base_config()
  config.model.point_transformer.update(encoder or {})
  config.model.num_points = num_points or config.model.num_points
  model = PointTransformer.from_config(config.model)
  points = np.random.default_rng(0).uniform(-1, 1, (2, config.model.num_points, 3)).astype(np.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(points)
  container = cg3d_pth.build_container(
    'point_transformer',
    variables['params'],
    variables['batch_stats'],
    prompts=None,
    prompt_mode='none',
    step=0,
    epoch=0,
    metrics=None,
    config=config.to_dict(),
    num_batches_tracked=0,
    frozen_visual=None,
  )
  cg3d_pth.write_container(path, container, 'cg3d')


def write_shapes(folder: pathlib.Path, count: int, points: int, start: int = 0) -> None:
  rng = np.random.default_rng(start)
  families = list(shapes.FAMILIES)
  for i in range(start, start + count):
    family = families[i % len(families)]
    cloud, _ = shapes.sample_surface(rng, shapes.FAMILIES[family](rng), points)
    (folder / family).mkdir(parents=True, exist_ok=True)
    np.save(folder / family / f'{i:06d}.npy', cloud.astype(np.float32))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', type=int, default=512)
  parser.add_argument('--points', type=int, default=8192)
  parser.add_argument('--batch', type=int, default=64)
  args = parser.parse_args()
  print(load.report())
  print(f'devices: {jax.devices()}')
  work = pathlib.Path(tempfile.mkdtemp(prefix='bench_embed_'))
  write_checkpoint(work / 'cg3d.pth')
  write_shapes(work / 'shapes', args.batch, args.points)
  common = dict(points_per_shape=2048, batch_size=args.batch, chunk=1024, dtype='float16')
  warm = embed.embed(work / 'cg3d.pth', work / 'shapes', work / 'library', **common)
  write_shapes(work / 'shapes', args.shapes, args.points, start=args.batch)
  started = time.perf_counter()
  done = embed.embed(work / 'cg3d.pth', work / 'shapes', work / 'library', **common)
  wall = time.perf_counter() - started
  print(f'warm-up: {warm["added"]} shapes in {warm["seconds"]:.1f} s (compiles)')
  print(
    f'embedded {done["added"]} shapes of {args.points} points in {done["seconds"]:.1f} s: '
    f'{done["added"] / done["seconds"]:.1f} shapes/s ({done["added"] / wall:.1f} with model loading)'
  )


if __name__ == '__main__':
  main()
