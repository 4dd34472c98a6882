"""Benchmark: one CG3D joint training step at the real configuration, JAX (jit) vs the same computation in PyTorch.

Real configuration: PointTransformer (22 M parameters, 12 blocks, 384 wide) on 1024 points sampled by FPS from
8192, a ViT-B/16-shaped CLIP with random weights and 5 deep prompts per layer, text features cached (a table
looked up by index, as in training), fp32. One step = FPS + scale/translate, encoder forward/backward, prompted
image tower forward/backward to the prompts, the three InfoNCE losses, AdamW on the encoder and SGD on the prompts
with per-group clipping. PyTorch runs transformers' CLIPModel with the same prompt insertion and the torch twin of
the encoder. Also reported: the step's FLOPs from XLA's cost analysis, and the utilisation against this machine's
measured fp32 matmul rate.

  python bench/bench_train_step.py [--batch 8] [--iters 3]
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import load  # noqa: E402

sys.path.insert(0, str(ROOT / 'bench'))
from cg3d_jax import step_cost  # noqa: E402
from cg3d_jax.configs import pretrain_pointbert  # noqa: E402
from cg3d_jax.synthetic import random_clip  # noqa: E402
from cg3d_jax.training.pretrain_step import ENCODER, PROMPTS, jit_train_step  # noqa: E402
from cg3d_jax.training.recipes import cg3d  # noqa: E402
from cg3d_jax.twins.point_transformer import PointTransformerProject, torch_farthest_point_sample, torch_gather_points  # noqa: E402,E501
from cg3d_jax.twins.prompted_clip import torch_prompted_image_features  # noqa: E402


def matmul_gflops(n: int = 2048, iters: int = 5) -> float:
  """This machine's fp32 matmul rate through XLA (the ceiling the utilisation is measured against)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  start = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(f(a))
  return 2 * n**3 * iters / (time.perf_counter() - start) / 1e9


def torch_contrastive(a, b, scale):
  logits = scale * a @ b.T
  labels = torch.arange(a.shape[0], device=a.device)
  return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


def make_torch_step(clip_model, encoder, prompts, table, num_points):
  for p in clip_model.parameters():
    p.requires_grad_(False)
  prompts = torch.nn.Parameter(prompts)
  enc_opt = torch.optim.AdamW(encoder.parameters(), lr=5e-5, weight_decay=0.05)
  prompt_opt = torch.optim.SGD([prompts], lr=2e-3, momentum=0.9, weight_decay=1e-4)
  scale = clip_model.logit_scale.exp()

  def step(points, pixels, labels, template_idx):
    idx = torch_farthest_point_sample(points, num_points)
    pts = torch_gather_points(points, idx)
    s = torch.empty(pts.shape[0], 1, 3, device=pts.device).uniform_(2 / 3, 3 / 2)
    pts = pts * s + torch.empty(pts.shape[0], 1, 3, device=pts.device).uniform_(-0.2, 0.2)
    text = table[template_idx, labels]
    image = torch.nn.functional.normalize(torch_prompted_image_features(clip_model, pixels, prompts), dim=-1)
    feats = torch.nn.functional.normalize(encoder(pts), dim=-1)
    loss = (
      torch_contrastive(feats, text, scale)
      + torch_contrastive(feats, image.detach(), scale)
      + torch_contrastive(image, text, scale)
    )
    enc_opt.zero_grad()
    prompt_opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(encoder.parameters(), 10.0)
    torch.nn.utils.clip_grad_norm_([prompts], 10.0)
    enc_opt.step()
    prompt_opt.step()
    return float(loss)

  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument(
    '--framework',
    choices=('both', 'jax', 'torch'),
    default='both',
    help="one framework per process avoids their thread pools interfering (PyTorch's OpenMP "
    'threads spin after each call, which slows an XLA call that follows at once)',
  )
  parser.add_argument(
    '--unrolled', action='store_true', help='JAX with the layer loops unrolled (scan_layers=False) instead of scanned'
  )
  args = parser.parse_args(argv)
  print(load.report())  # a ratio taken under load can reverse on an idle machine
  from transformers import CLIPModel

  config = pretrain_pointbert.get_config()
  config.train.batch_size = args.batch
  config.mesh.data = 1
  config.model.scan_layers = config.clip.scan_layers = not args.unrolled
  with tempfile.TemporaryDirectory() as tmp:
    folder = random_clip.write_random_clip(os.path.join(tmp, 'clip_b16'), seed=0, **random_clip.VIT_B16)
    config.clip.path = folder
    # One class is enough for timing: the step looks text rows up by index whatever the table holds.
    setup = cg3d.build_setup(config, train_classes=['chair'], steps_per_epoch=1000, devices=jax.devices()[:1])
    clip_model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()

  rng = np.random.default_rng(0)
  points = rng.normal(size=(args.batch, 8192, 3)).astype(np.float32)
  points /= np.linalg.norm(points, axis=-1, keepdims=True)
  size = setup.clip.spec.image_size
  batch = {
    'points': points,
    'image': rng.normal(size=(args.batch, size, size, 3)).astype(np.float32),
    'label': np.zeros(args.batch, np.int32),
    'template_idx': rng.integers(0, setup.text_table.shape[0], args.batch).astype(np.int32),
  }
  jstep = jit_train_step(
    setup.model,
    setup.tx,
    setup.labels_fn,
    active=(ENCODER, PROMPTS),
    state_shardings=setup.shardings['state'],
    frozen_shardings=setup.shardings['frozen'],
    table_sharding=setup.shardings['table'],
    batch_shardings=setup.shardings['batch'],
  )
  jbatch = jax.device_put(batch, setup.shardings['batch'])
  start = time.perf_counter()
  compiled, cost = step_cost.compile_and_analyse(
    jstep, (setup.state, setup.frozen, setup.text_table, jbatch), jnp.float32
  )
  compile_s = time.perf_counter() - start
  flops = cost.flops  # matmul FLOPs of the step, scanned layers counted per layer

  encoder = PointTransformerProject(num_classes=55)
  table = torch.nn.functional.normalize(torch.randn(*setup.text_table.shape), dim=-1)
  prompts = torch.tensor(np.asarray(setup.state['params']['clip']['prompts']['tokens']))
  tstep = make_torch_step(clip_model, encoder, prompts, table, config.model.num_points)
  t_batch = (
    torch.tensor(points),
    torch.tensor(batch['image'].transpose(0, 3, 1, 2)),
    torch.tensor(batch['label']).long(),
    torch.tensor(batch['template_idx']).long(),
  )

  state = setup.state
  run_jax, run_torch = args.framework in ('both', 'jax'), args.framework in ('both', 'torch')
  if run_jax:
    state, _ = jax.block_until_ready(compiled(state, setup.frozen, setup.text_table, jbatch))  # warm-up
  if run_torch:
    tstep(*t_batch)
  jax_times, torch_times = [], []
  for _ in range(args.iters):  # alternate so that a busy machine slows both alike
    if run_jax:
      start = time.perf_counter()
      state, _ = jax.block_until_ready(compiled(state, setup.frozen, setup.text_table, jbatch))
      jax_times.append(time.perf_counter() - start)
    if not run_torch:
      continue
    start = time.perf_counter()
    tstep(*t_batch)
    torch_times.append(time.perf_counter() - start)
  gflops = matmul_gflops()

  median = lambda times: statistics.median(times) if times else float('nan')  # noqa: E731
  jax_s, torch_s = median(jax_times), median(torch_times)
  print(
    f'CG3D joint step, PointTransformer 1024 points (FPS from 8192) + ViT-B/16 CLIP, 5 deep prompts, text cached;'
    f' batch {args.batch}, fp32'
  )
  print(
    f'machine: {load.cpu_model()}, {os.cpu_count()} CPUs; jax {jax.__version__}, '
    f'torch {torch.__version__} ({torch.get_num_threads()} threads); median of {args.iters} alternating steps'
  )
  print(
    f'matmul FLOPs of the step (step_cost.matmul_flops): {flops / 1e9:.1f} GFLOP per step (XLA cost analysis, '
    f'loop bodies once: {cost.xla_flops / 1e9:.1f}); measured fp32 matmul rate {gflops:.1f} GFLOP/s; '
    f'JAX compile {compile_s:.1f} s'
  )
  print()
  print('| implementation | s / step (median) | samples / s | GFLOP/s achieved | utilisation | torch / this |')
  print('| --- | --- | --- | --- | --- | --- |')
  for name, s in (('JAX (jit)', jax_s), ('PyTorch (transformers CLIP + twin)', torch_s)):
    if s != s:  # not measured in this process (--framework)
      continue
    achieved = flops / s / 1e9
    print(f'| {name} | {s:.2f} | {args.batch / s:.2f} | {achieved:.1f} | {achieved / gflops:.0%} | {torch_s / s:.2f} |')


if __name__ == '__main__':
  main()
