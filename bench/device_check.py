"""The device check: one command that shows, on one GPU, that the package computes there what its references compute
and how fast it runs, with everything in one output folder and one markdown table.

  python bench/device_check.py OUT_DIR                  # on one H100 or H200: about 6 minutes, at most 8
  python bench/device_check.py OUT_DIR --cpu-rehearsal  # the same code at a tiny size on a CPU (the test suite)

Checks, in this order (a check that fails or raises becomes a row saying so; the next one still runs; once
--budget_s has passed, the remaining sections are listed as skipped, not run):
  1. correctness on the device, each against a reference on the same device:
     - the Flax CLIP (ViT-B/16 shapes, random weights) against transformers' PyTorch CLIPModel, float32 with TF32
       off on both sides (normalised features within 1e-4), and the Flax CLIP in bfloat16 with cuDNN attention
       (feature cosine to the float32 reference at least 0.999);
     - both point encoders (PointTransformer 22 M, PointMLP) against their PyTorch twins, float32, eval mode;
     - one CG3D training step (joint) against the PyTorch reference of the original runner
       (tests/torch_reference_step.py), float32: the three losses within 1e-4 relative;
  2. speed: the real CG3D step (batch 64, PointTransformer on 1024 of 8192 points + ViT-B/16 with 5 deep prompts) in
     bf16, fp32 and bf16 with remat, then the same step in PyTorch (bf16 autocast, SDPA); the stored-feature step at
     OpenShape's size (6 channels, 10,000 points, 512 x 32 groups, 1280-d features, batch 256); zero-shot feature
     throughput on 2,468 clouds (ModelNet40's test size) of 8,192 stored points, FPS to 1024 on the device;
  3. a scaling note on paper: what one epoch of Objaverse (800 k shapes) would take on 64 such GPUs at the
     measured bf16 rate, assuming perfect scaling (labelled as such).
Writes OUT_DIR/device_check.json (every figure), OUT_DIR/device_check.md (the table) and prints the table.

On the lent GPU machine (its image has Python 3.12, jax with the CUDA 13 plugin, flax, optax, orbax, transformers,
torch; no TensorFlow, which this check never imports, and no ml_collections), carry ml_collections as a wheel:
  here, once:  echo /.whl/ >> .git/info/exclude
               python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                   --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
  there (the device tool's run, carry ['.whl']):
               python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
                   .whl/*.whl && PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 bench/device_check.py $OUT
"""

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import bench_accelerator, load  # noqa: E402
from cg3d_jax import sharding, step_cost  # noqa: E402
from cg3d_jax.synthetic import random_clip  # noqa: E402

MODELNET40_TEST = 2468
OBJAVERSE_SHAPES = 800_000
PARITY_CLIP = dict(bench_accelerator.SMALL_CLIP, vision_layers=2, seed=3)  # the step parity's size, on every device


def _sizes(rehearsal: bool) -> dict:
  """Everything that differs between the GPU run and the CPU rehearsal."""
  if rehearsal:
    return dict(
      clip=dict(bench_accelerator.SMALL_CLIP, seed=0),
      clip_batch=2,
      encoder=bench_accelerator.SMALL_ENCODER,
      encoder_points=256,
      encoder_batch=2,
      pointmlp=dict(points=256, embed_dim=16, k_neighbors=(8,) * 4),
      step_batch=8,
      step_variants=('bf16',),
      iters=1,
      features_batch=8,
      features=dict(num_groups=32, group_size=8, width=64, depth=2, num_heads=4, encoder_dim=64),
      features_points=1024,
      features_dim=64,
      eval_objects=32,
      eval_stored=1024,
      eval_batch=16,
      library_shapes=16,
      library_points=1024,
      library_batch=8,
    )
  return dict(
    clip=dict(random_clip.VIT_B16, seed=0),
    clip_batch=8,
    encoder={},
    encoder_points=1024,
    encoder_batch=8,
    pointmlp=dict(points=1024),
    step_batch=64,
    step_variants=('bf16', 'fp32', 'bf16-remat'),
    iters=5,
    features_batch=256,
    features={},
    features_points=10_000,
    features_dim=1280,
    eval_objects=MODELNET40_TEST,
    eval_stored=8192,
    eval_batch=64,
    library_shapes=2048,
    library_points=8192,
    library_batch=64,
  )


@contextlib.contextmanager
def _exact_float32():
  """float32 products in float32 on both sides: XLA's and PyTorch's GPU defaults use TF32 (10-bit mantissas)."""
  import torch

  saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    with jax.default_matmul_precision('highest'):
      yield
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _torch_device():
  import torch

  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _row(section: str, check: str, value, target: str = '', ok: bool | None = None, **extra) -> dict:
  return {'section': section, 'check': check, 'value': value, 'target': target, 'ok': ok, **extra}


# ------------------------------------------------------------------------------------------------- correctness


def check_clip(sizes, clip_dir: str) -> list[dict]:
  import torch
  from transformers import CLIPModel

  from cg3d_jax.clip.hf_clip import load_transformers_clip
  from cg3d_jax.clip.loaded_clip import tokenize

  device = _torch_device()
  rng = np.random.default_rng(0)
  loaded = load_transformers_clip(clip_dir, prompt_mode='none')
  size = loaded.spec.image_size
  pixels = rng.normal(size=(sizes['clip_batch'], size, size, 3)).astype(np.float32)
  ids = tokenize(
    loaded.tokenizer,
    [f'a photo of a {name}.' for name in ('chair', 'lamp', 'car', 'plant', 'bed', 'sofa', 'cup', 'desk')][
      : sizes['clip_batch']
    ],
  )
  reference = CLIPModel.from_pretrained(clip_dir, local_files_only=True, attn_implementation='sdpa').eval().to(device)
  with _exact_float32(), torch.no_grad():
    out = reference(
      input_ids=torch.tensor(ids, dtype=torch.long, device=device),
      pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2), device=device),
    )
    want = {
      k: torch.nn.functional.normalize(getattr(out, k), dim=-1).cpu().numpy() for k in ('image_embeds', 'text_embeds')
    }
    ours = jax.jit(loaded.model.apply)({'params': loaded.params}, pixels, ids)
    got = {
      k: np.asarray(ours[k], np.float32) / np.linalg.norm(np.asarray(ours[k], np.float32), axis=-1, keepdims=True)
      for k in want
    }
  rows = []
  for key in ('image_embeds', 'text_embeds'):
    diff = float(np.abs(got[key] - want[key]).max())
    rows.append(_row('correctness', f'CLIP fp32 {key} vs transformers', diff, '<= 1e-4', diff <= 1e-4))
  attention = 'cudnn' if jax.default_backend() == 'gpu' else 'auto'
  low = load_transformers_clip(clip_dir, prompt_mode='none', dtype=jnp.bfloat16, attention=attention)
  fn = jax.jit(lambda p, x, t: low.model.apply({'params': p}, x, t))
  bf16 = fn(low.params, pixels, ids)
  for key in ('image_embeds', 'text_embeds'):
    a = np.asarray(bf16[key], np.float32)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    cosine = float(np.min(np.sum(a * want[key], axis=-1)))
    rows.append(
      _row(
        'correctness',
        f'CLIP bf16 ({attention} attention) {key}: min cosine to fp32',
        cosine,
        '>= 0.999',
        cosine >= 0.999,
      )
    )
  return rows


def _compare_encoder(name: str, model, twin, variables, clouds) -> dict:
  import torch

  device = _torch_device()
  with _exact_float32():
    got = np.asarray(jax.jit(lambda v, p: model.apply(v, p, train=False))(variables, clouds))
    with torch.no_grad():
      want = twin.to(device).eval()(torch.from_numpy(clouds).to(device)).cpu().numpy()
  scale = float(np.abs(want).max())
  diff = float(np.abs(got - want).max())
  return _row(
    'correctness',
    f'{name} fp32 features vs PyTorch twin (max |diff| / max |feature|)',
    diff / scale,
    '<= 1e-4',
    diff <= 1e-4 * scale and scale > 0,
  )


def check_encoders(sizes) -> list[dict]:
  import torch

  from cg3d_jax.models.point_transformer import PointTransformer
  from cg3d_jax.models.pointmlp import PointMLP
  from cg3d_jax.twins.point_transformer import PointTransformerProject
  from cg3d_jax.twins.pointmlp import PointMLPProject
  from cg3d_jax.weights.pointmlp_state_dict import pointmlp_from_torch
  from cg3d_jax.weights.torch_io import point_transformer_from_torch

  torch.manual_seed(0)
  rng = np.random.default_rng(1)
  n = sizes['encoder_points']
  clouds = rng.normal(size=(sizes['encoder_batch'], n, 3)).astype(np.float32)
  clouds /= np.abs(clouds).max(axis=(1, 2), keepdims=True)
  rows = []
  twin = PointTransformerProject(**sizes['encoder'])
  model = PointTransformer(**sizes['encoder'], num_classes=55)
  params, stats = point_transformer_from_torch(twin.state_dict(), model)
  rows.append(_compare_encoder('PointTransformer', model, twin, {'params': params, 'batch_stats': stats}, clouds))
  twin = PointMLPProject(**sizes['pointmlp'])
  params, stats = pointmlp_from_torch(twin.state_dict())
  kwargs = {k: v for k, v in sizes['pointmlp'].items() if k != 'points'}
  rows.append(
    _compare_encoder(
      'PointMLP',
      PointMLP(**kwargs),
      twin,
      {'params': params, 'batch_stats': stats},
      clouds[:, : sizes['pointmlp']['points']],
    )
  )
  return rows


def check_step(clip_dir: str) -> list[dict]:
  """One joint CG3D step at a small size, float32, against the PyTorch reference of the original runner."""
  import torch
  from transformers import CLIPModel

  from cg3d_jax.clip import templates
  from cg3d_jax.clip.loaded_clip import tokenize
  from cg3d_jax.configs import pretrain_pointbert
  from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, train_step
  from cg3d_jax.training.recipes import cg3d
  from cg3d_jax.twins import verify
  from cg3d_jax.twins.prompted_clip import torch_prompted_image_features
  from cg3d_jax.weights import cg3d_pth, torch_io
  from tests.torch_reference_step import PARITY_ENCODER_OPTIM, PARITY_PROMPT_OPTIM, ReferenceStep

  config = pretrain_pointbert.get_config()
  config.clip.path = clip_dir
  config.model.embed_dim = PARITY_CLIP['projection_dim']
  config.model.num_points = 64
  config.model.point_transformer.update(bench_accelerator.SMALL_ENCODER, drop_path_rate=0.0)
  config.data.augment = False
  config.train.batch_size, config.mesh.data = 8, 1
  # The reference's optimizers, as the parity tests set them; the losses compared precede any update.
  config.train.encoder_optim.update(PARITY_ENCODER_OPTIM)
  config.train.prompt_optim.update(PARITY_PROMPT_OPTIM)
  classes = ['airplane', 'bathtub', 'bed', 'bench', 'bookshelf', 'bottle', 'bowl', 'car']
  setup = cg3d.build_setup(config, train_classes=classes, steps_per_epoch=1, devices=jax.devices()[:1])
  rng = np.random.default_rng(2)
  size = setup.clip.spec.image_size
  points = rng.normal(size=(8, 64, 3)).astype(np.float32)
  points /= np.abs(points).max(axis=(1, 2), keepdims=True)
  batch = {
    'points': points,
    'image': rng.normal(size=(8, size, size, 3)).astype(np.float32),
    'label': np.arange(8, dtype=np.int32),
    'template_idx': np.array([0, 13, 20, 62, 5, 40, 14, 1], np.int32),
  }
  start = jax.device_get(setup.state)
  with _exact_float32():
    step = jax.jit(
      lambda s, f, t, b: train_step(
        s, f, t, b, model=setup.model, tx=setup.tx, labels_fn=setup.labels_fn, active=(ENCODER, PROMPTS), augment=False
      )
    )
    _, metrics = step(setup.state, setup.frozen, setup.text_table, batch)
    got = {k: float(v) for k, v in metrics.items() if k.startswith('loss/')}
    device = _torch_device()
    twin = verify.twin_for(cg3d_pth.POINT_TRANSFORMER, setup.model.encoder, config.model.num_points)
    twin.load_state_dict(torch_io.point_transformer_to_torch(start['params']['encoder'], start['batch_stats']))
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    caption_templates = templates.get_templates(config.data.templates)
    captions = [caption_templates[t].format(classes[c]) for t, c in zip(batch['template_idx'], batch['label'])]
    with torch.device(device):  # the reference makes its targets with torch.arange
      reference = ReferenceStep(
        twin.to(device),
        clip.to(device),
        torch.from_numpy(np.array(start['params']['clip']['prompts']['tokens'])).to(device),
        encoder_optim=config.train.encoder_optim.to_dict(),
        prompt_optim=config.train.prompt_optim.to_dict(),
        steps_per_epoch=1,
        epochs=1,
        mode='joint',
        prompted_image_features=torch_prompted_image_features,
      )
      want = reference(
        torch.from_numpy(points).to(device),
        torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).copy()).to(device),
        torch.from_numpy(tokenize(setup.clip.tokenizer, captions).astype(np.int64)).to(device),
      )
  rows = []
  for key in ('loss/point_text', 'loss/point_image', 'loss/image_text'):
    have, ref = got[key], float(want[key])
    rel = abs(have - ref) / abs(ref)
    rows.append(
      _row(
        'correctness',
        f'one joint step, {key} vs the PyTorch reference (relative)',
        rel,
        '<= 1e-4',
        rel <= 1e-4,
        jax=have,
        pytorch=ref,
      )
    )
  return rows


# ------------------------------------------------------------------------------------------------------- speed


def bench_steps(sizes, clip_dir: str) -> tuple[list[dict], list[dict]]:
  args = argparse.Namespace(batch=sizes['step_batch'], iters=sizes['iters'], small=sizes['step_batch'] != 64)
  devices = jax.devices()[:1]
  rows, raw = [], []
  for name in sizes['step_variants']:
    result = bench_accelerator.bench_jax_step(args, clip_dir, name, devices)
    raw.append(result)
    rows.append(_speed_row(f'CG3D step, {result["implementation"]}, batch {args.batch}', result))
  from cg3d_jax.configs import pretrain_pointbert

  num_tokens = pretrain_pointbert.get_config().clip.prompt.num_tokens
  spec = sizes['clip']
  result = bench_accelerator.bench_torch_step(args, clip_dir, (spec['vision_layers'], num_tokens, spec['vision_width']))
  raw.append(result)
  rows.append(_speed_row(f'CG3D step, {result["implementation"]}, batch {args.batch}', result))
  return rows, raw


def _speed_row(check: str, result: dict) -> dict:
  if 'note' in result:
    return _row('speed', check, result['note'], ok=False)
  value = f'{result["s_per_step"]:.3f} s/step, {result["samples_per_s"]:.1f} samples/s'
  if result.get('tflops_per_device') is not None:
    value += f', {result["tflops_per_device"]:.1f} TFLOP/s'
  if result.get('mfu') is not None:
    value += f', MFU {result["mfu"]:.1%}'
  peak = result.get('device_peak_gib') or result.get('xla_peak_gib')
  if peak:
    value += f', peak {peak:.1f} GiB'
  return _row('speed', check, value, **{k: v for k, v in result.items() if k != 'implementation'})


def bench_features_step(sizes) -> dict:
  from bench.bench_features_step import feature_step
  from cg3d_jax.configs import pretrain_openshape

  config = pretrain_openshape.get_config()
  config.train.batch_size, config.mesh.data = sizes['features_batch'], 1
  config.model.dtype = 'bfloat16'
  if sizes['features']:  # the rehearsal: a small encoder on fewer points
    config.model.point_transformer.update(sizes['features'])
    config.model.num_points = sizes['features_points'] // 2
    config.model.embed_dim = sizes['features_dim']
  compiled, state, batch, compile_s = feature_step(
    config, sizes['features_batch'], sizes['features_dim'], 6, sizes['features_points'], np.random.default_rng(3)
  )
  cost = step_cost.analyse(compiled, jnp.bfloat16, jax.devices()[0])
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready(metrics)

  run()
  seconds = bench_accelerator._median_time(run, sizes['iters'])
  result = {
    'implementation': 'JAX bf16',
    'compile_s': compile_s,
    's_per_step': seconds,
    'samples_per_s': sizes['features_batch'] / seconds,
    'gflop_per_device': cost.flops / 1e9,
    'tflops_per_device': cost.tflops_per_device(1 / seconds),
    'mfu': cost.mfu(1 / seconds),
    'xla_peak_gib': cost.peak_bytes / 2**30,
  }
  channels = (
    f'6 ch, {sizes["features_points"]:,} points, {config.model.point_transformer.num_groups} x '
    f'{config.model.point_transformer.group_size} groups, {sizes["features_dim"]}-d'
  )
  return _speed_row(f'stored-feature step, bf16, batch {sizes["features_batch"]} ({channels})', result)


def bench_zeroshot(sizes) -> dict:
  """Zero-shot features of ModelNet40's test size from stored clouds: FPS and the encoder on the device."""
  from bench.bench_eval import unit_sphere_clouds
  from cg3d_jax.evaluators import zeroshot
  from cg3d_jax.models.cg3d import CG3D
  from cg3d_jax.models.point_transformer import PointTransformer

  encoder = PointTransformer(**sizes['encoder'], num_classes=55)
  num_points = sizes['encoder_points']
  clouds = unit_sphere_clouds(sizes['eval_objects'], sizes['eval_stored'])
  start = time.perf_counter()
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1}, jax.local_devices()[:1])
  model = CG3D(encoder=encoder, clip=None, num_points=num_points)
  variables = jax.jit(encoder.init, static_argnames='train')(
    jax.random.key(0), jnp.asarray(clouds[:2, :num_points]), train=False
  )
  features_fn, replicated = zeroshot.point_feature_fn(model, mesh)
  variables = jax.device_put(variables, replicated)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = sizes['eval_batch']
  np.asarray(features_fn(variables, jax.device_put(clouds[:batch], batch_sharding)))  # compile
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(0, len(clouds) - batch + 1, batch):
    out = np.asarray(features_fn(variables, jax.device_put(clouds[i : i + batch], batch_sharding)))
  seconds = time.perf_counter() - start
  done = (len(clouds) // batch) * batch
  assert np.isfinite(out).all()
  return _row(
    'speed',
    f'zero-shot features: {done:,} clouds of {sizes["eval_stored"]:,} points, FPS to {num_points}, batch {batch}',
    f'{done / seconds:.0f} objects/s, {seconds:.1f} s after data load',
    objects_per_s=done / seconds,
    seconds=seconds,
    compile_s=compile_s,
  )


def bench_library(sizes, tmp: str) -> dict:
  """cg3d-embed's rate: shapes/s over procedural shape files, reading, preparing, thumbnails and writing included,
  after a first (compiling) chunk of one batch."""
  import pathlib

  from bench.bench_embed import write_checkpoint, write_shapes
  from cg3d_jax import embed

  work = pathlib.Path(tmp) / 'library'
  points, batch = sizes['encoder_points'], sizes['library_batch']
  write_checkpoint(work / 'cg3d.pth', sizes['encoder'], points)
  write_shapes(work / 'shapes', batch, sizes['library_points'])
  settings = dict(points_per_shape=2 * points, batch_size=batch, chunk=1024, dtype='float16', num_points=points)
  warm = embed.embed(work / 'cg3d.pth', work / 'shapes', work / 'out', **settings)
  write_shapes(work / 'shapes', sizes['library_shapes'], sizes['library_points'], start=batch)
  done = embed.embed(work / 'cg3d.pth', work / 'shapes', work / 'out', **settings)
  rate = done['added'] / done['seconds']
  return _row(
    'speed',
    f'library embedding (cg3d-embed): {done["added"]:,} shape files of {sizes["library_points"]:,} points, '
    f'{2 * points} drawn, FPS to {points}, batch {batch}',
    f'{rate:.1f} shapes/s',
    shapes_per_s=rate,
    seconds=done['seconds'],
    compile_s=warm['seconds'],
  )


def scaling_note(step_rows: list[dict]) -> dict:
  bf16 = [r for r in step_rows if r.get('samples_per_s') and 'JAX bf16' in r['check'] and 'remat' not in r['check']]
  if not bf16:
    return _row('on paper', 'Objaverse epoch on 64 GPUs', 'no bf16 step figure to scale')
  rate = bf16[0]['samples_per_s']
  hours = OBJAVERSE_SHAPES / (64 * rate) / 3600
  return _row(
    'on paper',
    f'one Objaverse epoch ({OBJAVERSE_SHAPES:,} shapes) on 64 of this device at the bf16 rate, perfect scaling assumed',
    f'{hours * 60:.1f} min ({64 * rate:,.0f} samples/s)',
  )


# -------------------------------------------------------------------------------------------------------- main


def _table(rows: list[dict]) -> str:
  lines = ['| section | check | value | target | result |', '| --- | --- | --- | --- | --- |']
  for r in rows:
    value = r['value'] if isinstance(r['value'], str) else f'{r["value"]:.3g}'
    verdict = {True: 'pass', False: 'FAIL', None: ''}[r['ok']]
    lines.append(f'| {r["section"]} | {r["check"]} | {value} | {r["target"]} | {verdict} |')
  return '\n'.join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('out_dir', help='folder for device_check.json and device_check.md (created)')
  parser.add_argument('--cpu-rehearsal', action='store_true', help='tiny sizes, for a CPU (the test suite)')
  parser.add_argument(
    '--budget_s',
    type=float,
    default=420.0,
    help='start no new section after this many seconds (default 420: the run ends within 8 min)',
  )
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  began = time.perf_counter()
  sizes = _sizes(args.cpu_rehearsal)
  device = jax.devices()[0]
  import torch

  header = {
    'device': device.device_kind,
    'platform': device.platform,
    'jax': jax.__version__,
    'torch': torch.__version__,
    'torch_device': str(_torch_device()),
    'host': load.report(),
    'mode': 'cpu rehearsal (tiny sizes)' if args.cpu_rehearsal else 'full',
  }
  print(json.dumps(header), flush=True)
  rows: list[dict] = []
  with tempfile.TemporaryDirectory() as tmp:
    clip_dir = random_clip.write_random_clip(os.path.join(tmp, 'clip'), **sizes['clip'])
    parity_dir = random_clip.write_random_clip(os.path.join(tmp, 'parity_clip'), **PARITY_CLIP)
    sections = [
      ('CLIP parity', lambda: check_clip(sizes, clip_dir)),
      ('encoder parity', lambda: check_encoders(sizes)),
      ('step parity', lambda: check_step(parity_dir)),
      ('CG3D step speed', lambda: bench_steps(sizes, clip_dir)[0]),
      ('stored-feature step speed', lambda: [bench_features_step(sizes)]),
      ('zero-shot throughput', lambda: [bench_zeroshot(sizes)]),
      ('library embedding', lambda: [bench_library(sizes, tmp)]),
    ]
    for name, run in sections:
      elapsed = time.perf_counter() - began
      if elapsed > args.budget_s:
        rows.append(_row('skipped', name, f'not run: {elapsed:.0f} s had passed (--budget_s {args.budget_s:.0f})'))
        continue
      start = time.perf_counter()
      try:
        new = run()
      except Exception as e:  # one broken section must not cost the others their device minutes
        (out / 'errors.log').open('a').write(f'--- {name}\n{traceback.format_exc()}\n')
        new = [_row('error', name, f'{type(e).__name__}: {str(e)[:200]}', ok=False)]
      for row in new:
        print(json.dumps(row, default=str), flush=True)
      print(f'# {name}: {time.perf_counter() - start:.1f} s', flush=True)
      rows.extend(new)
  rows.append(scaling_note(rows))
  result = {
    **header,
    'seconds': time.perf_counter() - began,
    'rows': rows,
    'all_correct': all(r['ok'] for r in rows if r['section'] == 'correctness'),
  }
  table = (
    f'{header["device"]} ({header["platform"]}), jax {header["jax"]}, torch {header["torch"]} on '
    f'{header["torch_device"]}; {header["mode"]}; {header["host"]}; {result["seconds"]:.0f} s\n\n' + _table(rows) + '\n'
  )
  for name, text in (('device_check.json', json.dumps(result, indent=1, default=str)), ('device_check.md', table)):
    partial = out / f'.{name}.partial'  # never a half-written result
    partial.write_text(text)
    partial.replace(out / name)
  print()
  print(table, flush=True)
  return result


if __name__ == '__main__':
  result = main()
  sys.exit(0 if result['all_correct'] else 1)
