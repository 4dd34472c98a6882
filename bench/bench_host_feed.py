"""Can the host feed the device? Both host pipelines in samples per CPU-second, and the cores one GPU would need.

  python bench/bench_host_feed.py                    # writes /tmp/cg3d_host_feed once, then measures both
  python bench/bench_host_feed.py --only openshape --batches 20

Pipelines, at the real sizes, batch 64, after two warm-up batches:
  tfds       CG3D's pretraining stream (data/pipeline.py): 8192-point clouds normalised, resampled and augmented,
             one 224 px view of 5 decoded and CLIP-normalised, a caption template; procedural ShapeNet-55 folder
             (synthetic/objects.py) prepared by the real builder;
  openshape  OpenShape's training stream (data/openshape_stream.py): one pickled-dict shape file per sample
             (10,000 xyz+rgb points, 1280-d text/image features for 12 views and texts), read through the restricted
             unpickler, sampled, augmented, a text and a view feature drawn; procedural layout
             (synthetic/openshape_objects.py) at those sizes.
Each is measured as wall samples/s and as samples per CPU-second of the whole process (all its threads): the second
is what a host core delivers, so cores per GPU = device samples/s / samples per CPU-second. The device rate comes
from the step's FLOPs per sample (counted on its jaxpr, step_cost.matmul_flops) at 45% MFU of an H100's bf16 peak,
until the device check measures it.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import load  # noqa: E402
from cg3d_jax import step_cost  # noqa: E402

MFU = 0.45
H100_BF16_TFLOPS = dict(step_cost.PEAK_TFLOPS)['H100']['bfloat16']


def _measure(batches_iter, batch: int, batches: int) -> dict:
  for _ in range(2):
    next(batches_iter)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    out = next(batches_iter)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {'samples_per_s': batch * batches / wall, 'samples_per_cpu_s': batch * batches / cpu, 'last': out}


def tfds_stream(root: str, batch: int, batches: int) -> dict:
  from bench.bench_pipeline import pretrain_stream  # TFDS, with TensorFlow: imported where it is measured

  ds, _ = pretrain_stream(root, batch, per_class=2, folder='shapenet55')
  result = _measure(ds.as_numpy_iterator(), batch, batches)
  out = result.pop('last')
  assert out['points'].shape == (batch, 8192, 3) and out['image'].shape == (batch, 224, 224, 3)
  return result


def openshape_stream(root: str, batch: int, batches: int, workers: int | None) -> dict:
  from cg3d_jax.configs import pretrain_openshape
  from cg3d_jax.data import openshape_stream as stream
  from cg3d_jax.synthetic.openshape_objects import write_openshape_layout

  layout = os.path.join(root, 'openshape')
  if not os.path.isdir(os.path.join(layout, 'meta_data')):
    write_openshape_layout(layout, train_per_class=12, lvis_per_class=1, num_points=10_000, feature_dim=1280)
  config = pretrain_openshape.get_config()
  config.data.manual_dir = layout
  source = stream.open_train_source(config.data)
  batches_iter = stream.train_local_batches(
    source, global_batch_size=batch, seed=0, process_index=0, process_count=1, workers=workers
  )
  result = _measure(batches_iter, batch, batches)
  out = result.pop('last')
  assert out['points'].shape == (batch, config.data.num_stored_points, 6), out['points'].shape
  return result


def flops_per_sample(which: str) -> float:
  """Matmul FLOPs of one training step per sample, from its jaxpr at batch 2 (no compilation)."""
  import tempfile

  from cg3d_jax.configs import pretrain_openshape, pretrain_pointbert
  from cg3d_jax.synthetic import random_clip
  from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, jit_features_train_step, jit_train_step
  from cg3d_jax.training.recipes import cg3d, stored_features

  devices = jax.devices()[:1]
  rng = np.random.default_rng(0)
  if which == 'openshape':
    config = pretrain_openshape.get_config()
    config.train.batch_size, config.mesh.data = 2, 1
    setup = stored_features.build_features_setup(config, feature_dim=1280, steps_per_epoch=1000, devices=devices)
    step = jit_features_train_step(
      setup.model, setup.tx, state_shardings=setup.shardings['state'], batch_shardings=setup.shardings['batch']
    )
    batch = {
      'points': np.zeros((2, config.data.num_stored_points, 6), np.float32),
      'has_text': np.ones(2, bool),
      'text_feat': np.zeros((2, 1280), np.float32),
      'image_feat': np.zeros((2, 1280), np.float32),
    }
    jaxpr = step.trace(setup.state, batch).jaxpr
  else:
    config = pretrain_pointbert.get_config()
    config.train.batch_size, config.mesh.data = 2, 1
    with tempfile.TemporaryDirectory() as tmp:
      config.clip.path = random_clip.write_random_clip(os.path.join(tmp, 'clip'), seed=0, **random_clip.VIT_B16)
      setup = cg3d.build_setup(config, train_classes=['chair'], steps_per_epoch=1000, devices=devices)
    step = jit_train_step(
      setup.model,
      setup.tx,
      setup.labels_fn,
      active=(ENCODER, PROMPTS),
      state_shardings=setup.shardings['state'],
      frozen_shardings=setup.shardings['frozen'],
      table_sharding=setup.shardings['table'],
      batch_shardings=setup.shardings['batch'],
    )
    batch = {
      'points': rng.normal(size=(2, 8192, 3)).astype(np.float32),
      'image': np.zeros((2, 224, 224, 3), np.float32),
      'label': np.zeros(2, np.int32),
      'template_idx': np.zeros(2, np.int32),
    }
    jaxpr = step.trace(setup.state, setup.frozen, setup.text_table, batch).jaxpr
  return step_cost.matmul_flops(jaxpr) / 2


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='/tmp/cg3d_host_feed')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--batches', type=int, default=10)
  parser.add_argument('--workers', type=int, default=None, help='OpenShape stream threads (default: its own)')
  parser.add_argument('--only', choices=['tfds', 'openshape'])
  args = parser.parse_args(argv)
  print(load.report(), flush=True)
  results = {}
  for name in ('tfds', 'openshape'):
    if args.only and args.only != name:
      continue
    if name == 'tfds':
      measured = tfds_stream(args.root, args.batch, args.batches)
    else:
      measured = openshape_stream(args.root, args.batch, args.batches, args.workers)
    flops = flops_per_sample(name)
    device_rate = MFU * H100_BF16_TFLOPS * 1e12 / flops
    results[name] = {
      **measured,
      'gflop_per_sample': flops / 1e9,
      'h100_samples_per_s_at_45pct': device_rate,
      'cores_per_h100': device_rate / measured['samples_per_cpu_s'],
    }
    print(name, results[name], flush=True)
  print(f'\n{load.report()}; batch {args.batch}, {args.batches} batches after 2 warm-up\n')
  print(
    '| pipeline | samples/s (wall) | samples per CPU-second | GFLOP per sample | H100 samples/s at 45% MFU | '
    'cores per H100 |'
  )
  print('| --- | --- | --- | --- | --- | --- |')
  for name, r in results.items():
    print(
      f'| {name} | {r["samples_per_s"]:.1f} | {r["samples_per_cpu_s"]:.1f} | {r["gflop_per_sample"]:.1f} | '
      f'{r["h100_samples_per_s_at_45pct"]:,.0f} | {r["cores_per_h100"]:.1f} |'
    )
  return results


if __name__ == '__main__':
  main()
