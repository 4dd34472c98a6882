"""Benchmark: CLIP image tower forward + backward to the deep visual prompts, JAX (jit) vs a PyTorch reference.

What CG3D's prompt step costs: a ViT-B/16-shaped CLIP with random weights (written by transformers), batch of
224 px images, fp32, gradient with respect to the 12 x 5 prompt tokens only (the backbone is frozen in both).
The PyTorch side is transformers' CLIPModel with the same prompt insertion written as a loop over its layers.
JAX and PyTorch iterations alternate so that a busy shared machine slows both alike; the median is reported.

With --backbone slip: SLIP ViT-B/16 (CG3D's backbone, a random file in SLIP's format), against timm's
VisionTransformer with CG3D's VisionTransformerPromptDeep forward (tests/slip_reference.py; needs .reference_libs,
README Install).

--attention auto,xla times each attention kernel (cg3d_jax/models/layers.py) in the same interleaved loop.

  python bench/bench_clip.py [--backbone transformers|slip] [--batch 8] [--iters 5] [--folder DIR] [--attention auto]
"""

import argparse
import dataclasses
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import load  # noqa: E402
from cg3d_jax.clip import hf_clip  # noqa: E402
from cg3d_jax.models.clip import CLIP  # noqa: E402
from cg3d_jax.synthetic import random_clip  # noqa: E402
from cg3d_jax.twins.prompted_clip import torch_prompted_image_features  # noqa: E402


def make_jax_step(loaded):
  model = loaded.model

  @jax.jit
  def step(prompts, frozen, pixels, direction):
    # Frozen weights are arguments (not closed-over constants) so XLA does not fold 150M parameters into the program.
    def loss(p):
      features = model.apply({'params': {**frozen, 'prompts': p}}, pixels, method=CLIP.encode_image)
      return jnp.sum(features * direction)

    return jax.value_and_grad(loss)(prompts)

  return step


def make_torch_step(torch_model, features=torch_prompted_image_features):
  for p in torch_model.parameters():
    p.requires_grad_(False)

  def step(prompts, pixels, direction):
    prompts = prompts.detach().requires_grad_(True)
    loss = (features(torch_model, pixels, prompts) * direction).sum()
    loss.backward()
    if prompts.is_cuda:
      torch.cuda.synchronize()
    return loss.detach(), prompts.grad

  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--backbone', choices=['transformers', 'slip'], default='transformers')
  parser.add_argument(
    '--folder',
    help='an existing CLIP (transformers folder, or SLIP file with --backbone slip); default: write a random ViT-B/16',
  )
  parser.add_argument(
    '--attention', default='auto', help='comma-separated attention kernels to time: auto, xla, einsum, cudnn (GPU)'
  )
  args = parser.parse_args(argv)
  print(load.report())

  if args.backbone == 'slip':
    loaded, torch_model, features, reference_name = _slip(args.folder)
  else:
    from transformers import CLIPModel

    with tempfile.TemporaryDirectory() as tmp:
      folder = args.folder or random_clip.write_random_clip(
        os.path.join(tmp, 'clip_b16'), seed=0, **random_clip.VIT_B16
      )
      loaded = hf_clip.load_transformers_clip(folder, prompt_mode='deep', num_prompts=5)
      torch_model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    features, reference_name = torch_prompted_image_features, 'transformers PyTorch'
  # Each framework on its best device: JAX's default backend, and CUDA for PyTorch when it has it.
  torch_device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch_model.to(torch_device)

  spec = loaded.spec
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(args.batch, spec.image_size, spec.image_size, 3)).astype(np.float32)
  direction = rng.normal(size=(args.batch, spec.projection_dim)).astype(np.float32)
  prompts = loaded.params['prompts']
  frozen = {k: v for k, v in loaded.params.items() if k != 'prompts'}

  j_pixels, j_direction = jnp.asarray(pixels), jnp.asarray(direction)
  jax_steps, jax_first = {}, {}
  for impl in args.attention.split(','):
    jax_steps[impl] = make_jax_step(dataclasses.replace(loaded, model=loaded.model.clone(attention=impl)))
    start = time.perf_counter()
    j_loss, j_grad = jax.block_until_ready(jax_steps[impl](prompts, frozen, j_pixels, j_direction))
    jax_first[impl] = time.perf_counter() - start

  torch_step = make_torch_step(torch_model, features)
  t_pixels = torch.tensor(pixels.transpose(0, 3, 1, 2), device=torch_device)
  t_direction = torch.tensor(direction, device=torch_device)
  t_prompts = torch.tensor(np.asarray(prompts['tokens']), device=torch_device)
  start = time.perf_counter()
  t_loss, t_grad = torch_step(t_prompts, t_pixels, t_direction)
  torch_first = time.perf_counter() - start
  t_grad = t_grad.cpu().numpy()
  grad_diff = float(np.abs(np.asarray(j_grad['tokens']) - t_grad).max() / np.abs(t_grad).max())

  jax_times, torch_times = {impl: [] for impl in jax_steps}, []
  for _ in range(args.iters):
    for impl, jax_step in jax_steps.items():
      start = time.perf_counter()
      jax.block_until_ready(jax_step(prompts, frozen, j_pixels, j_direction))
      jax_times[impl].append(time.perf_counter() - start)
    start = time.perf_counter()
    torch_step(t_prompts, t_pixels, t_direction)
    torch_times.append(time.perf_counter() - start)

  jax_s, torch_s = {k: statistics.median(v) for k, v in jax_times.items()}, statistics.median(torch_times)
  print(
    f'{args.backbone} ViT-B/16 image tower, deep prompts (12 x 5), forward + backward to the prompts only; '
    f'batch {args.batch}, {spec.image_size} px, fp32'
  )
  print(
    f'machine: {load.cpu_model()}, {os.cpu_count()} CPUs; jax {jax.__version__} '
    f'({jax.devices()[0].platform}), torch {torch.__version__} ({torch_device}, {torch.get_num_threads()} '
    'threads); '
    f'median of {args.iters} alternating iterations'
  )
  print(f'prompt gradients agree: max |dJAX - dtorch| / max |dtorch| = {grad_diff:.1e}')
  print()
  print('| implementation | s / batch (median) | min | first call (incl. compile) | images / s | torch / this |')
  print('| --- | --- | --- | --- | --- | --- |')
  rows = [(f'JAX (jit), attention={impl}', jax_times[impl], jax_first[impl]) for impl in jax_steps]
  for name, times, first in (*rows, (reference_name, torch_times, torch_first)):
    median = statistics.median(times)
    print(
      f'| {name} | {median:.3f} | {min(times):.3f} | {first:.2f} | {args.batch / median:.2f} | {torch_s / median:.2f} |'
    )
  return jax_s, torch_s


def _slip(path):
  """SLIP ViT-B/16 in JAX and timm's ViT with CG3D's prompted forward in PyTorch, from one (random) SLIP file."""
  from cg3d_jax.clip import loaded_clip
  from tests import slip_reference

  with tempfile.TemporaryDirectory() as tmp:
    sizes = {k: v for k, v in random_clip.SLIP_VIT_B16.items() if k != 'vision_heads'}
    state = random_clip.slip_state_dict(seed=0, **sizes)
    path = path or random_clip.write_slip_checkpoint(os.path.join(tmp, 'slip_base.pt'), state)
    loaded = loaded_clip.load_clip(path, prompt_mode='deep', num_prompts=5)
  reference = slip_reference.SLIPCLIP(vision_heads=12, **sizes).eval()
  reference.load_state_dict(state, strict=True)

  def features(model, pixels, prompts):
    cls = slip_reference.prompted_class_token(model.visual, pixels, prompts[:1], prompts[1:])
    return cls @ model.image_projection

  return loaded, reference, features, 'timm PyTorch (SLIP)'


if __name__ == '__main__':
  main()
