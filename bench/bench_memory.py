"""Memory per device of the compiled training step, from XLA's memory analysis (no accelerator needed: the step is
compiled, never run, on 8 simulated CPU devices).

  python bench/bench_memory.py [--batch 64] [--json out.json] [--skip_towers]

Rows: the real CG3D step (ViT-B/16 CLIP with 5 deep prompts + PointTransformer 22 M on 1024 of 8192 points, batch
64) in float32 / bfloat16 x remat none / full / dots, on 1 device and on 8 devices with the state and the frozen CLIP
sharded fsdp=8 (batch split 8 ways); then the prompt step of larger frozen towers (ViT-L/14 at 224 px, ViT-bigG/14
at 224 px, deep prompts, batch 64) with fsdp=8, parameters abstract (never materialised).

What the figures are: XLA's buffer assignment for the CPU backend, per device: arguments (parameters, optimizer
state, batch), temporaries (activations kept for the backward pass and scratch) and XLA's peak estimate. A GPU or
TPU compiler fuses differently, so treat them as the size of the problem (what remat, bfloat16 and fsdp change), not
as a device's exact figure; `python bench/bench_accelerator.py` reports the device's own peak where it has one.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import load  # noqa: E402
from cg3d_jax import sharding, step_cost  # noqa: E402
from cg3d_jax.configs import pretrain_pointbert  # noqa: E402
from cg3d_jax.models.clip import CLIP, CLIPSpec  # noqa: E402
from cg3d_jax.synthetic import random_clip  # noqa: E402
from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, jit_train_step  # noqa: E402
from cg3d_jax.training.recipes import cg3d  # noqa: E402

GIB = 2.0**30
# OpenAI ViT-L/14 and OpenCLIP ViT-bigG/14 image towers (text towers are not in the step: text features are cached).
TOWERS = {
  'ViT-L/14': dict(
    vision_width=1024,
    vision_layers=24,
    vision_heads=16,
    vision_mlp_dim=4096,
    patch_size=14,
    image_size=224,
    projection_dim=768,
    vision_activation='quick_gelu',
  ),
  'ViT-bigG/14': dict(
    vision_width=1664,
    vision_layers=48,
    vision_heads=16,
    vision_mlp_dim=8192,
    patch_size=14,
    image_size=224,
    projection_dim=1280,
    vision_activation='gelu',
  ),
}
TEXT_STUB = dict(
  text_width=512,
  text_layers=1,
  text_heads=8,
  text_mlp_dim=2048,
  text_activation='gelu',
  text_layer_norm_eps=1e-5,
  vocab_size=49408,
  max_positions=77,
  eos_token_id=49407,
  eos_pooling='argmax_id',
  vision_layer_norm_eps=1e-5,
  num_channels=3,
)


def _row(name, cost, dtype, devices, **extra) -> dict:
  return {
    'step': name,
    'dtype': dtype,
    'devices': devices,
    **extra,
    'arguments_gib': cost.argument_bytes / GIB,
    'temporaries_gib': cost.temp_bytes / GIB,
    'peak_gib': cost.peak_bytes / GIB,
    'gflop_per_device': cost.flops / 1e9,
  }


def compile_cg3d_step(config, batch: int, devices: int, gc_thresholds=step_cost.COMPILE_GC_THRESHOLDS):
  """(StepCost of the joint training step of `config` compiled for the first `devices` devices, trace + lower +
  compile seconds); nothing runs, the batch is abstract. gc_thresholds: Python's collector during the compile
  (step_cost.compile_and_analyse's; None: the process's own)."""
  setup = cg3d.build_setup(config, train_classes=['chair'], steps_per_epoch=1000, devices=jax.devices()[:devices])
  size = setup.clip.spec.image_size
  shard = setup.shardings['batch']
  batch_shapes = {
    'points': jax.ShapeDtypeStruct((batch, 8192, 3), jnp.float32, sharding=shard),
    'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=shard),
    'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shard),
    'template_idx': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shard),
  }
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
  _, cost = step_cost.compile_and_analyse(
    step,
    (setup.state, setup.frozen, setup.text_table, batch_shapes),
    jnp.dtype(config.model.dtype),
    gc_thresholds=gc_thresholds,
  )
  return cost, time.perf_counter() - start


def real_config(
  folder: str,
  batch: int,
  *,
  dtype: str = 'float32',
  remat: str = 'none',
  scan_layers: bool = True,
  devices: int = 1,
  fsdp: int = 1,
):
  config = pretrain_pointbert.get_config()
  config.clip.path = folder
  config.train.batch_size = config.eval.batch_size = batch
  config.model.dtype = config.clip.dtype = dtype
  config.model.remat = config.clip.remat = remat
  config.model.scan_layers = config.clip.scan_layers = scan_layers
  config.mesh.data, config.mesh.fsdp = devices // fsdp, fsdp
  return config


def cg3d_rows(batch: int, folder: str) -> list[dict]:
  rows = []
  for devices, fsdp in ((1, 1), (8, 8)):
    for dtype in ('float32', 'bfloat16'):
      for remat in ('none', 'full', 'dots'):
        config = real_config(folder, batch, dtype=dtype, remat=remat, devices=devices, fsdp=fsdp)
        cost, seconds = compile_cg3d_step(config, batch, devices)
        rows.append(
          _row(
            'CG3D joint step (ViT-B/16 + PointTransformer)',
            cost,
            dtype,
            devices,
            fsdp=fsdp,
            remat=remat,
            compile_s=round(seconds, 1),
          )
        )
        print(json.dumps(rows[-1]), flush=True)
  return rows


def tower_rows(batch: int, devices: int = 8) -> list[dict]:
  """The prompt step of a large frozen image tower: gradient of the projected image features to the deep prompts,
  frozen parameters fsdp-sharded over `devices`, batch split over them."""
  rows = []
  mesh = sharding.make_mesh({'data': 1, 'fsdp': devices}, jax.devices()[:devices])
  for name, sizes in TOWERS.items():
    spec = CLIPSpec(**sizes, **TEXT_STUB)
    for dtype in ('bfloat16',):
      for remat in ('none', 'full', 'dots'):
        model = CLIP(spec, prompt_mode='deep', num_prompts=5, dtype=jnp.dtype(dtype), remat=remat)
        pixels = jax.ShapeDtypeStruct(
          (batch, spec.image_size, spec.image_size, 3), jnp.float32, sharding=sharding.batch_sharding(mesh)
        )
        ids = jnp.zeros((1, 8), jnp.int32)
        params = jax.eval_shape(
          lambda: model.init(jax.random.key(0), jnp.zeros((1, spec.image_size, spec.image_size, 3)), ids)
        )
        params = dict(params['params'])
        prompts = params.pop('prompts')
        frozen_sh = sharding.param_shardings(params, mesh)
        frozen = sharding.with_shardings(params, frozen_sh)
        prompts = sharding.with_shardings(prompts, sharding.param_shardings(prompts, mesh))

        def loss(p, frozen, pixels):
          feats = model.apply({'params': {**frozen, 'prompts': p}}, pixels, method=CLIP.encode_image)
          return jnp.sum(feats.astype(jnp.float32) ** 2)

        start = time.perf_counter()
        _, cost = step_cost.compile_and_analyse(jax.jit(jax.grad(loss)), (prompts, frozen, pixels), jnp.dtype(dtype))
        params_b = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
        rows.append(
          _row(
            f'{name} frozen tower, prompt step',
            cost,
            dtype,
            devices,
            fsdp=devices,
            remat=remat,
            frozen_params_m=round(params_b / 1e6, 1),
            compile_s=round(time.perf_counter() - start, 1),
          )
        )
        print(json.dumps(rows[-1]), flush=True)
  return rows


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--skip_towers', action='store_true')
  parser.add_argument('--skip_cg3d', action='store_true')
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  print(load.report(), flush=True)
  rows = []
  if not args.skip_cg3d:
    with tempfile.TemporaryDirectory() as tmp:
      folder = random_clip.write_random_clip(os.path.join(tmp, 'clip_b16'), seed=0, **random_clip.VIT_B16)
      rows += cg3d_rows(args.batch, folder)
  if not args.skip_towers:
    rows += tower_rows(args.batch)
  print()
  print(f'batch {args.batch}; per device; XLA CPU buffer assignment (see the docstring)')
  print('| step | dtype | remat | devices (fsdp) | arguments GiB | temporaries GiB | peak GiB | GFLOP / device |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  for r in rows:
    print(
      f'| {r["step"]} | {r["dtype"]} | {r["remat"]} | {r["devices"]} ({r["fsdp"]}) | '
      f'{r["arguments_gib"]:.2f} | {r["temporaries_gib"]:.2f} | {r["peak_gib"]:.2f} | '
      f'{r["gflop_per_device"]:.0f} |'
    )
  result = {'machine': load.report(), 'batch': args.batch, 'rows': rows}
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


if __name__ == '__main__':
  main()
