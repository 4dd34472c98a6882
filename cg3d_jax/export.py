"""Export a training checkpoint to PyTorch: `python -m cg3d_jax.export --checkpoint WORKDIR --out model.pth`.

`--format cg3d` (default for any name but *.safetensors) writes the original CG3D container that its PyTorch code
loads with strict=True; `--format safetensors` writes the same tensors plus a JSON sidecar (see
cg3d_jax/weights/cg3d_checkpoint.py). `--verify` reloads the written file into the PyTorch twin with strict=True
and compares its features with the JAX encoder's on real ModelNet40 objects (or `--points` files); it exits
non-zero when the largest difference exceeds `--tolerance`.
"""

import pathlib
import sys

from absl import app, flags, logging
import numpy as np

from cg3d_jax import cli

flags.adopt_module_key_flags(cli)  # so that --help lists --config and --workdir

CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Training workdir, its checkpoints/ folder or one step folder.')
STEP = flags.DEFINE_integer('step', None, 'Step to export (default: the newest checkpoint).')
OUT = flags.DEFINE_string('out', None, 'Output file (.pth for the original CG3D format, .safetensors otherwise).')
FORMAT = flags.DEFINE_enum('format', None, ['cg3d', 'safetensors'],
                           'Container format; default from --out: *.safetensors -> safetensors, else cg3d.')
EPOCH = flags.DEFINE_integer('epoch', -1, "Value of the container's 'epoch' entry (-1: unknown, as the original).")
VERIFY = flags.DEFINE_bool('verify', False, 'Reload the export into the PyTorch twin and compare features.')
POINTS = flags.DEFINE_multi_string('points', None, 'Point files (.ply/.npy/.off/.txt) for --verify; default: real '
                                   'ModelNet40 objects from --modelnet_dir.')
MODELNET_DIR = flags.DEFINE_string('modelnet_dir', None, 'A modelnet40_normal_resampled folder to read the --verify '
                                   "objects from; default: the package's own copy of their xyz.")
TOLERANCE = flags.DEFINE_float('tolerance', 1e-6, 'Largest max |JAX - PyTorch| feature difference --verify accepts '
                                '(both run in float64, where a correct export agrees to ~1e-12).')

# Two classes, train and test split (the package ships their xyz: assets.VERIFY_CLOUDS).
VERIFY_OBJECTS = ('airplane/airplane_0002', 'airplane/airplane_0633', 'bathtub/bathtub_0108', 'bathtub/bathtub_0115')


def resolve_format(out: pathlib.Path, fmt: str | None) -> str:
  inferred = 'safetensors' if out.suffix == '.safetensors' else 'cg3d'
  if fmt is None:
    return inferred
  if fmt != inferred and out.suffix in ('.safetensors', '.pth', '.pt'):
    raise app.UsageError(f'--format {fmt} does not match the extension of --out {out}')
  return fmt


def encoder_update_count(config, step: int) -> int:
  """BatchNorm updates of the encoder (torch's num_batches_tracked): every step, or the even ones when alternating."""
  return (step + 1) // 2 if config.train.get('mode') == 'alternating' else step


def verify_points(files, modelnet_dir, num_points: int) -> tuple[list[str], np.ndarray]:
  """(names, (B, num_points, 3)) clouds: read, centred and scaled to the unit sphere, FPS to num_points."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cg3d_jax import assets  # pylint: disable=g-import-not-at-top
  from cg3d_jax.eval.point_files import normalize_points, read_points  # pylint: disable=g-import-not-at-top
  from cg3d_jax.models import point_ops  # pylint: disable=g-import-not-at-top
  if files:
    named = [(str(f), read_points(f).xyz) for f in files]  # the reader tells the columns apart, or asks for them
  elif modelnet_dir:
    root = pathlib.Path(modelnet_dir)
    if not root.is_dir():
      raise FileNotFoundError(f'--modelnet_dir {root} is not a folder (modelnet40_normal_resampled)')
    # The official layout: x,y,z,nx,ny,nz lines.
    named = [(str(root / f'{n}.txt'), read_points(root / f'{n}.txt', columns='xyz,normals').xyz)
             for n in VERIFY_OBJECTS]
  else:
    with np.load(assets.path(assets.VERIFY_CLOUDS)) as shipped:
      named = [(pathlib.Path(n).name, shipped[pathlib.Path(n).name]) for n in VERIFY_OBJECTS]
  clouds = []
  for name, xyz in named:
    xyz = normalize_points(xyz)
    if len(xyz) < num_points:
      raise ValueError(f'{name}: {len(xyz)} points, but the encoder takes {num_points} (config.model.num_points)')
    idx = point_ops.farthest_point_sample(jnp.asarray(xyz)[None], num_points)
    clouds.append(np.asarray(point_ops.gather_points(jnp.asarray(xyz)[None], idx))[0])
  return [name for name, _ in named], np.stack(clouds)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not CHECKPOINT.value or not OUT.value:
    raise app.UsageError('--checkpoint and --out are required, e.g. --checkpoint workdir --out model.pth')
  from cg3d_jax.train.trained import CheckpointNotFoundError, load_trained  # pylint: disable=g-import-not-at-top
  from cg3d_jax.weights import cg3d_checkpoint as ckpt  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(OUT.value)
  fmt = resolve_format(out, FORMAT.value)
  try:
    trained = load_trained(CHECKPOINT.value, STEP.value)
  except CheckpointNotFoundError as err:
    sys.exit(f'error: --checkpoint: {err}')
  config = trained.config
  encoder = config.model.encoder
  if VERIFY.value:  # read the clouds first: a bad --points file should not cost an export
    try:
      names, clouds = verify_points(POINTS.value, MODELNET_DIR.value, config.model.num_points)
    except (OSError, ValueError) as err:
      sys.exit(f'error: {err}')
  container = ckpt.build_container(
      encoder, trained.encoder_vars['params'], trained.encoder_vars['batch_stats'], prompts=trained.prompts,
      prompt_mode=config.clip.prompt.mode, step=trained.step, epoch=EPOCH.value, metrics=trained.metrics,
      config=config.to_dict(), num_batches_tracked=encoder_update_count(config, trained.step))
  if encoder == 'point_transformer' and 'cls_head_finetune.0.weight' not in container['base_model']:
    logging.warning('no classification head (config.model.num_classes is unset): the original '
                    'PointTransformerProject builds cls_head_finetune, so its strict load will report it missing')
  if fmt == 'cg3d':
    written = [ckpt.write_cg3d_checkpoint(out, container)]
  else:
    written = list(ckpt.write_safetensors_checkpoint(out, container))
  print(f'exported step {trained.step} of {trained.path} ({encoder}, {len(container["base_model"])} state-dict '
        f'entries, prompts: {sorted(container.get("visual_clip_model", {})) or "none"}) to '
        f'{", ".join(map(str, written))}')

  if VERIFY.value:
    twin = ckpt.load_twin(out, encoder, trained.encoder, config.model.num_points)
    print(f'verify: {out} loads into the PyTorch twin with strict=True')
    diff, got, _ = ckpt.compare_features(twin, trained.encoder, trained.encoder_vars, clouds)
    print(f'verify: max |JAX - PyTorch| over {got.shape[1]}-d features of {len(names)} clouds '
          f'({", ".join(pathlib.Path(n).stem for n in names)}): {diff:.3g} (tolerance {TOLERANCE.value:g}); '
          f'largest |feature| {np.abs(got).max():.3g}')
    if not diff <= TOLERANCE.value:  # also fails on NaN
      logging.error('verify failed: %g > %g', diff, TOLERANCE.value)
      sys.exit(f'error: --verify failed: features differ by {diff:.3g} > {TOLERANCE.value:g}')
    print('verify: OK')


def run() -> None:
  """The console script's entry point."""
  cli.run(main)


if __name__ == '__main__':
  run()
