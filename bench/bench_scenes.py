"""Open scene queries on a 1-million-point room: region splitting, regions/s through the encoder, one query command.

  python bench/bench_scenes.py --checkpoint /tmp/cg3d_demo            # the demo's workdir for the command timing
  python bench/bench_scenes.py --checkpoint /tmp/cg3d_demo --points_per_m2 8600 --floor 10 10 --radius 0.6

What is measured:
  scene     a procedural room (cg3d_jax/synthetic/rooms.py, all 13 families on a --floor metres floor at
            --points_per_m2) written in the S3DIS layout: ~1 M points at the defaults; reading its room .txt;
  regions   cg3d_jax.eval.regions.split_regions (--radius 0.6 m for these objects, recentred copies);
  encoder   regions/s of queries.RegionEmbedder (FPS stored -> 1024 on device, the real-config PointTransformer,
            22.46 M parameters, random weights, L2), batch 64, after one untimed warm-up batch, over --regions regions
            of --stored points each (8192, what pretraining stored per object);
  command   wall time of `python -m cg3d_jax.query_scene` on that room with --checkpoint (3 queries), process start
            to exit: imports, checkpoint and CLIP loading, reading, regions, encoder, text tower, all outputs.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import load  # noqa: E402
from cg3d_jax import sharding  # noqa: E402
from cg3d_jax.models.cg3d import CG3D  # noqa: E402
from cg3d_jax.models.point_transformer import PointTransformer  # noqa: E402
from cg3d_jax.scenes import queries, s3dis  # noqa: E402
from cg3d_jax.scenes import regions as scene_regions  # noqa: E402
from cg3d_jax.synthetic import rooms  # noqa: E402


def timed(fn, *args, **kwargs):
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', default=None, help='a training workdir for the command timing (e.g. the demo)')
  parser.add_argument('--floor', type=float, nargs=2, default=(10.0, 10.0))
  parser.add_argument('--points_per_m2', type=float, default=8600.0)
  parser.add_argument('--radius', type=float, default=0.6, help='ball radius (the procedural objects are 0.35-0.5 m)')
  parser.add_argument('--regions', type=int, default=128, help='regions pushed through the real-size encoder')
  parser.add_argument('--stored', type=int, default=8192)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--workdir', default=None)
  args = parser.parse_args()
  print(load.report())  # a ratio taken under load can reverse on an idle machine
  work = args.workdir or tempfile.mkdtemp(prefix='bench_scenes_')
  print(f'devices: {jax.devices()}')

  settings = rooms.SceneSettings(
    num_rooms=1, objects_per_room=13, floor_size=tuple(args.floor), points_per_m2=args.points_per_m2, min_gap=0.2
  )
  _, write_s = timed(rooms.ensure_synthetic_scenes, work, settings)
  room = s3dis.list_rooms(work, [settings.area])[0]
  (xyz, rgb), read_s = timed(s3dis.read_room_cloud, room)
  print(f'scene: {xyz.shape[0]:,} points ({room}); written in {write_s:.1f} s, read in {read_s:.1f} s')

  region_settings = scene_regions.RegionSettings(radius=args.radius, points_per_region=args.stored)
  regions, split_s = timed(scene_regions.split_regions, xyz, region_settings)
  print(
    f'regions: {len(regions)} (radius {region_settings.radius} m, {regions.sizes.mean():,.0f} points each on '
    f'average) in {split_s:.1f} s'
  )

  encoder = PointTransformer(num_classes=55)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  model = CG3D(encoder=encoder, clip=None, num_points=1024)
  variables = jax.jit(encoder.init, static_argnames='train')(
    jax.random.PRNGKey(0), jnp.zeros((2, 1024, 3)), train=False
  )
  embedder = queries.RegionEmbedder(model, variables, mesh, args.batch)
  sample = regions.encoder_points[: args.regions]
  if sample.shape[0] < args.regions:
    sample = sample[np.arange(args.regions) % sample.shape[0]]
  _, warm_s = timed(embedder, sample[: embedder.batch])
  features, embed_s = timed(embedder, sample)
  assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-4)
  print(
    f'encoder: {args.regions / embed_s:.1f} regions/s (real-config PointTransformer, {args.stored} -> 1024 '
    f"points, batch {embedder.batch}; warm-up incl. compile {warm_s:.1f} s); this scene's {len(regions)} regions "
    f'-> {len(regions) / (args.regions / embed_s):.1f} s'
  )

  if args.checkpoint:
    out = os.path.join(work, 'query')
    command = [
      sys.executable,
      '-m',
      'cg3d_jax.query_scene',
      '--checkpoint',
      args.checkpoint,
      '--scene',
      str(room),
      '--queries',
      'mug,table,torus',
      '--radius',
      str(args.radius),
      '--exclude_floor',
      '--out',
      out,
    ]
    done, command_s = timed(
      subprocess.run,
      command,
      capture_output=True,
      text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if done.returncode:
      sys.exit(f'query_scene failed:\n{done.stderr[-3000:]}')
    print(done.stdout.strip())
    print(f'command: python -m cg3d_jax.query_scene end to end in {command_s:.1f} s ({args.checkpoint})')


if __name__ == '__main__':
  main()
