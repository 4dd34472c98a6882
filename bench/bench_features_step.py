"""Benchmark: the stored-feature pretraining step (OpenShape's layout, no CLIP tower) vs CG3D's image-tower step.

Both steps train the same PointTransformer (22 M parameters, 12 x 384) on 1024 points sampled by FPS from 8192, fp32,
at the same batch. The image-tower step runs CG3D's joint step: a ViT-B/16-shaped CLIP with 5 deep prompts, image
forward/backward to the prompts, three InfoNCE losses. The stored-feature step runs the encoder against 512-d
image and text features given with the batch (two InfoNCE losses, learned temperature). The two are interleaved,
median of --iters steps each. A third row is the stored-feature step at OpenShape's own size (6 input channels,
10,000 points, 512 groups of 32, 1280-d features), timed after the others.

  python bench/bench_features_step.py [--batch 8] [--iters 3]
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import load  # noqa: E402
from cg3d_jax.configs import pretrain_openshape, pretrain_pointbert  # noqa: E402
from cg3d_jax.synthetic import random_clip  # noqa: E402
from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, jit_features_train_step, jit_train_step  # noqa: E402
from cg3d_jax.training.recipes import cg3d, stored_features  # noqa: E402


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def feature_step(config, batch_size: int, feature_dim: int, channels: int, stored_points: int, rng):
  setup = stored_features.build_features_setup(
    config, feature_dim=feature_dim, steps_per_epoch=1000, devices=jax.devices()[:1]
  )
  step = jit_features_train_step(
    setup.model, setup.tx, state_shardings=setup.shardings['state'], batch_shardings=setup.shardings['batch']
  )
  points = rng.normal(size=(batch_size, stored_points, 3)).astype(np.float32)
  points /= np.linalg.norm(points, axis=-1, keepdims=True)
  if channels == 6:
    points = np.concatenate([points, rng.uniform(0, 1, points.shape).astype(np.float32)], axis=-1)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  batch = jax.device_put(
    {
      'points': points,
      'has_text': rng.random(batch_size) < 0.8,
      'text_feat': unit(rng.normal(size=(batch_size, feature_dim))).astype(np.float32),
      'image_feat': unit(rng.normal(size=(batch_size, feature_dim))).astype(np.float32),
    },
    setup.shardings['batch'],
  )
  start = time.perf_counter()
  compiled = step.lower(setup.state, batch).compile()
  compile_s = time.perf_counter() - start
  return compiled, setup.state, batch, compile_s


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--json', default=None, help='also write the figures to this file')
  args = parser.parse_args(argv)
  start_load = load.report()
  print(start_load)
  rng = np.random.default_rng(0)

  config = pretrain_pointbert.get_config()
  config.train.batch_size = args.batch
  config.mesh.data = 1
  with tempfile.TemporaryDirectory() as tmp:
    config.clip.path = random_clip.write_random_clip(os.path.join(tmp, 'clip_b16'), seed=0, **random_clip.VIT_B16)
    setup = cg3d.build_setup(config, train_classes=['chair'], steps_per_epoch=1000, devices=jax.devices()[:1])
  size = setup.clip.spec.image_size
  points = rng.normal(size=(args.batch, 8192, 3)).astype(np.float32)
  points /= np.linalg.norm(points, axis=-1, keepdims=True)
  image_batch = jax.device_put(
    {
      'points': points,
      'image': rng.normal(size=(args.batch, size, size, 3)).astype(np.float32),
      'label': np.zeros(args.batch, np.int32),
      'template_idx': np.zeros(args.batch, np.int32),
    },
    setup.shardings['batch'],
  )
  image_step = jit_train_step(
    setup.model,
    setup.tx,
    setup.labels_fn,
    active=(ENCODER, PROMPTS),
    state_shardings=setup.shardings['state'],
    frozen_shardings=setup.shardings['frozen'],
    table_sharding=setup.shardings['table'],
    batch_shardings=setup.shardings['batch'],
  )
  start = time.perf_counter()
  image_compiled = image_step.lower(setup.state, setup.frozen, setup.text_table, image_batch).compile()
  image_compile_s = time.perf_counter() - start
  image_state = setup.state

  features_config = pretrain_pointbert.get_config()
  features_config.train.batch_size = args.batch
  features_config.train.logit_scale_init = 14.28
  features_config.mesh.data = 1
  feat_compiled, feat_state, feat_batch, feat_compile_s = feature_step(features_config, args.batch, 512, 3, 8192, rng)

  (image_state, _), _ = _timed(lambda s: image_compiled(s, setup.frozen, setup.text_table, image_batch), image_state)
  (feat_state, _), _ = _timed(lambda s: feat_compiled(s, feat_batch), feat_state)
  image_times, feat_times = [], []
  for _ in range(args.iters):  # interleaved, so that a change in the machine's load hits both alike
    (image_state, _), t = _timed(lambda s: image_compiled(s, setup.frozen, setup.text_table, image_batch), image_state)
    image_times.append(t)
    (feat_state, _), t = _timed(lambda s: feat_compiled(s, feat_batch), feat_state)
    feat_times.append(t)

  openshape_config = pretrain_openshape.get_config()
  openshape_config.train.batch_size = args.batch
  openshape_config.mesh.data = 1
  os_compiled, os_state, os_batch, os_compile_s = feature_step(openshape_config, args.batch, 1280, 6, 10000, rng)
  (os_state, _), _ = _timed(lambda s: os_compiled(s, os_batch), os_state)
  os_times = []
  for _ in range(args.iters):
    (os_state, _), t = _timed(lambda s: os_compiled(s, os_batch), os_state)
    os_times.append(t)

  image_s, feat_s, os_s = (statistics.median(t) for t in (image_times, feat_times, os_times))
  print(
    f'batch {args.batch}, fp32, one device; machine: {load.cpu_model()}, '
    f'{os.cpu_count()} CPUs; jax {jax.__version__}; median of {args.iters} steps (the first two interleaved)'
  )
  print()
  print('| step | s / step | samples / s | vs image-tower step | compile s |')
  print('| --- | --- | --- | --- | --- |')
  rows = [
    ('CG3D image-tower step (PointTransformer 1024 pts + ViT-B/16, 5 deep prompts)', image_s, image_compile_s),
    ('stored-feature step, same encoder, 512-d features (no CLIP tower)', feat_s, feat_compile_s),
    ('stored-feature step, OpenShape size (6 ch, 10,000 pts, 512 x 32 groups, 1280-d)', os_s, os_compile_s),
  ]
  for name, s, compile_s in rows:
    print(f'| {name} | {s:.2f} | {args.batch / s:.2f} | {image_s / s:.2f}x | {compile_s:.1f} |')
  if args.json:
    pathlib.Path(args.json).write_text(
      json.dumps(
        {
          'batch': args.batch,
          'iters': args.iters,
          'load_at_start': start_load,
          'image_tower_s': image_times,
          'stored_features_s': feat_times,
          'openshape_size_s': os_times,
          'samples_per_s_ratio': image_s / feat_s,
        },
        indent=1,
      )
    )


if __name__ == '__main__':
  main()
