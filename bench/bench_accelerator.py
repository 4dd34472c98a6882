"""One device benchmark, on whatever backend JAX sees: the CG3D training step at the real configuration in float32 and
bfloat16, with and without rematerialisation (-remat: full; -dots: matmul outputs kept), against the same step in
PyTorch on the same device; FPS and grouping throughput; zero-shot evaluation objects/s. One table, and JSON.

  python bench/bench_accelerator.py [--batch 64] [--iters 5] [--json out.json] [--variants fp32,bf16,bf16-remat]
  python bench/bench_accelerator.py --small      # a tiny CLIP and encoder, batch 8: what the test suite runs on CPU

Real configuration: PointTransformer (22 M parameters) on 1024 points chosen by FPS from 8192, ViT-B/16 CLIP (random
weights, transformers layout) with 5 deep prompts, text features cached, three InfoNCE losses, AdamW + SGD, batch 64.
Per JAX variant: compile time, s/step (median of --iters after a warm-up), samples/s, TFLOP/s per device and MFU from
XLA's cost analysis (step_cost.py; MFU only on devices in its peak table), XLA's peak memory estimate, and the
device's own peak (memory_stats, where it reports one). PyTorch: transformers' CLIPModel (SDPA attention) with the
encoder's PyTorch twin, the same optimizers; bfloat16 autocast on CUDA, float32 elsewhere. A variant that does not
fit is reported as such, not as a crash.
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
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import load  # noqa: E402
from cg3d_jax import step_cost  # noqa: E402
from cg3d_jax.configs import pretrain_pointbert  # noqa: E402
from cg3d_jax.models import point_ops  # noqa: E402
from cg3d_jax.synthetic import random_clip  # noqa: E402
from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, jit_train_step  # noqa: E402
from cg3d_jax.training.recipes import cg3d  # noqa: E402

VARIANTS = {  # name -> (compute dtype, remat policy: models/layers.REMAT_POLICIES)
  'fp32': ('float32', 'none'),
  'fp32-remat': ('float32', 'full'),
  'fp32-dots': ('float32', 'dots'),
  'bf16': ('bfloat16', 'none'),
  'bf16-remat': ('bfloat16', 'full'),
  'bf16-dots': ('bfloat16', 'dots'),
}
SMALL_CLIP = dict(
  vision_width=64,
  vision_layers=2,
  vision_heads=4,
  patch_size=16,
  image_size=64,
  text_width=64,
  text_layers=1,
  text_heads=4,
  projection_dim=64,
)
SMALL_ENCODER = dict(width=64, depth=2, num_heads=4, num_groups=16, group_size=8, encoder_dim=64)


def _median_time(fn, iters: int) -> float:
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _config(args, clip_folder: str, dtype: str, remat: str):
  config = pretrain_pointbert.get_config()
  config.clip.path = clip_folder
  config.train.batch_size = args.batch
  config.eval.batch_size = args.batch
  config.model.dtype = config.clip.dtype = dtype
  config.model.remat = config.clip.remat = remat
  if args.small:
    config.model.embed_dim = SMALL_CLIP['projection_dim']
    config.model.num_points = 256
    config.model.point_transformer.update(SMALL_ENCODER)
  return config


def _batch(args, setup, num_stored: int):
  rng = np.random.default_rng(0)
  points = rng.normal(size=(args.batch, num_stored, 3)).astype(np.float32)
  points /= np.linalg.norm(points, axis=-1, keepdims=True)
  size = setup.clip.spec.image_size
  return {
    'points': points,
    'image': rng.normal(size=(args.batch, size, size, 3)).astype(np.float32),
    'label': np.zeros(args.batch, np.int32),
    'template_idx': rng.integers(0, setup.text_table.shape[0], args.batch).astype(np.int32),
  }


def bench_jax_step(args, clip_folder: str, name: str, devices) -> dict:
  dtype, remat = VARIANTS[name]
  config = _config(args, clip_folder, dtype, remat)
  setup = cg3d.build_setup(config, train_classes=['chair'], steps_per_epoch=1000, devices=devices)
  batch = jax.device_put(_batch(args, setup, 8192 if not args.small else 1024), setup.shardings['batch'])
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
  start = time.perf_counter()
  compiled, cost = step_cost.compile_and_analyse(
    step, (setup.state, setup.frozen, setup.text_table, batch), jnp.dtype(dtype), devices[0]
  )
  compile_s = time.perf_counter() - start
  row = {
    'implementation': f'JAX {name}',
    'compile_s': round(compile_s, 1),
    'gflop_per_device': cost.flops / 1e9,
    'xla_peak_gib': cost.peak_bytes / 2**30,
  }
  if cost.device_limit_bytes and cost.peak_bytes > cost.device_limit_bytes:
    return {
      **row,
      'note': f'does not fit: needs {cost.peak_bytes / 2**30:.1f} GiB of {cost.device_limit_bytes / 2**30:.1f}',
    }
  state = setup.state
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], setup.frozen, setup.text_table, batch)
    jax.block_until_ready(metrics)

  run()  # warm-up
  seconds = _median_time(run, args.iters)
  steps_per_s = 1 / seconds
  stats = devices[0].memory_stats() or {}
  row.update(
    {
      's_per_step': seconds,
      'samples_per_s': args.batch / seconds,
      'tflops_per_device': cost.tflops_per_device(steps_per_s),
      'mfu': cost.mfu(steps_per_s),
      'device_peak_gib': stats.get('peak_bytes_in_use', 0) / 2**30 or None,
    }
  )
  return row


def bench_torch_step(args, clip_folder: str, num_prompts_shape) -> dict:
  import torch
  from transformers import CLIPModel

  from bench.bench_train_step import make_torch_step
  from cg3d_jax.twins.point_transformer import PointTransformerProject

  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  clip_model = CLIPModel.from_pretrained(clip_folder, local_files_only=True, attn_implementation='sdpa').eval()
  clip_model.to(device)
  encoder_kwargs = dict(num_classes=55)
  if args.small:
    encoder_kwargs.update(SMALL_ENCODER, embed_dim=SMALL_CLIP['projection_dim'])
  encoder = PointTransformerProject(**encoder_kwargs).to(device)
  table = torch.nn.functional.normalize(torch.randn(20, 1, clip_model.config.projection_dim, device=device), dim=-1)
  prompts = torch.zeros(num_prompts_shape, device=device).uniform_(-0.05, 0.05)
  step = make_torch_step(clip_model, encoder, prompts, table, 256 if args.small else 1024)
  rng = np.random.default_rng(0)
  size = clip_model.config.vision_config.image_size
  points = rng.normal(size=(args.batch, 1024 if args.small else 8192, 3)).astype(np.float32)
  points /= np.linalg.norm(points, axis=-1, keepdims=True)
  inputs = (
    torch.tensor(points, device=device),
    torch.randn(args.batch, 3, size, size, device=device),
    torch.zeros(args.batch, dtype=torch.long, device=device),
    torch.zeros(args.batch, dtype=torch.long, device=device),
  )

  def run():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
      step(*inputs)
    if cuda:
      torch.cuda.synchronize()

  run()
  seconds = _median_time(run, args.iters)
  peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
  return {
    'implementation': f'PyTorch {"bf16 autocast" if cuda else "fp32"} + SDPA',
    's_per_step': seconds,
    'samples_per_s': args.batch / seconds,
    'device_peak_gib': peak,
  }


def bench_points(args, devices) -> dict:
  rng = np.random.default_rng(1)
  clouds = rng.normal(size=(args.batch, 8192, 3)).astype(np.float32)
  x = jax.device_put(jnp.asarray(clouds), devices[0])
  fps = jax.jit(point_ops.farthest_point_sample, static_argnums=1)
  jax.block_until_ready(fps(x, 1024))
  fps_s = _median_time(lambda: jax.block_until_ready(fps(x, 1024)), args.iters)
  group = jax.jit(point_ops.group, static_argnums=(1, 2))
  y = x[:, :1024]
  jax.block_until_ready(group(y, 64, 32))
  group_s = _median_time(lambda: jax.block_until_ready(group(y, 64, 32)), args.iters)
  return {'fps_8192_to_1024_clouds_per_s': args.batch / fps_s, 'grouping_1024_64x32_clouds_per_s': args.batch / group_s}


def bench_eval(args, clip_folder: str, devices) -> dict:
  """Zero-shot evaluation's per-object work: 8192 stored points -> FPS 1024 -> encoder features, jitted."""
  from cg3d_jax.models.cg3d import build_encoder

  config = _config(args, clip_folder, 'float32', 'none')
  encoder = build_encoder(config.model)
  n = config.model.num_points
  clouds = jnp.asarray(np.random.default_rng(2).normal(size=(args.batch, 8192, 3)).astype(np.float32))
  variables = jax.jit(encoder.init, static_argnames='train')(jax.random.key(0), clouds[:, :n], train=False)
  fn = jax.jit(lambda v, p: encoder.apply(v, point_ops.sample_points(p, n), train=False))
  jax.block_until_ready(fn(variables, clouds))
  seconds = _median_time(lambda: jax.block_until_ready(fn(variables, clouds)), args.iters)
  return {'eval_objects_per_s': args.batch / seconds}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=None, help='default 64 (8 with --small)')
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--variants', default='fp32,bf16,bf16-remat')
  parser.add_argument('--small', action='store_true', help='tiny CLIP and encoder (CPU, tests)')
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  args.batch = args.batch or (8 if args.small else 64)
  print(load.report(), flush=True)
  devices = jax.devices()[:1]
  device = devices[0]
  names = [v.strip() for v in args.variants.split(',') if v.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f'--variants {unknown}: expected some of {sorted(VARIANTS)}')
  result = {
    'device': device.device_kind,
    'platform': device.platform,
    'jax': jax.__version__,
    'batch': args.batch,
    'size': 'small' if args.small else 'real (ViT-B/16 + PointTransformer 22M, 1024 of 8192 points)',
    'machine': load.report(),
    'rows': [],
  }
  with tempfile.TemporaryDirectory() as tmp:
    clip_folder = random_clip.write_random_clip(
      os.path.join(tmp, 'clip'), seed=0, **(SMALL_CLIP if args.small else random_clip.VIT_B16)
    )
    prompts_shape = None
    for name in names:
      row = bench_jax_step(args, clip_folder, name, devices)
      result['rows'].append(row)
      print(json.dumps(row), flush=True)
    if not args.no_torch:
      config = _config(args, clip_folder, 'float32', 'none')
      spec_layers = (SMALL_CLIP if args.small else random_clip.VIT_B16)['vision_layers']
      width = (SMALL_CLIP if args.small else random_clip.VIT_B16)['vision_width']
      prompts_shape = (spec_layers, config.clip.prompt.num_tokens, width)
      row = bench_torch_step(args, clip_folder, prompts_shape)
      result['rows'].append(row)
      print(json.dumps(row), flush=True)
    result.update(bench_points(args, devices))
    result.update(bench_eval(args, clip_folder, devices))
  print()
  print(f'{result["device"]} ({result["platform"]}), jax {result["jax"]}, batch {args.batch}, {result["size"]}')
  print(
    '| implementation | compile s | s / step | samples / s | TFLOP/s / device | MFU | XLA peak GiB | '
    'device peak GiB | note |'
  )
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for r in result['rows']:
    cell = lambda key, fmt: fmt.format(r[key]) if r.get(key) is not None else ''  # noqa: E731
    print(
      f'| {r["implementation"]} | {cell("compile_s", "{:.1f}")} | {cell("s_per_step", "{:.3f}")} | '
      f'{cell("samples_per_s", "{:.1f}")} | {cell("tflops_per_device", "{:.3g}")} | {cell("mfu", "{:.1%}")} | '
      f'{cell("xla_peak_gib", "{:.2f}")} | {cell("device_peak_gib", "{:.2f}")} | {r.get("note", "")}'
    )
  print(
    f'FPS 8192->1024: {result["fps_8192_to_1024_clouds_per_s"]:.1f} clouds/s; grouping (64 x 32 of 1024): '
    f'{result["grouping_1024_64x32_clouds_per_s"]:.1f} clouds/s; zero-shot features: '
    f'{result["eval_objects_per_s"]:.1f} objects/s'
  )
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


if __name__ == '__main__':
  main()
