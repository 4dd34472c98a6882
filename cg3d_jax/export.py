"""Export a checkpoint to PyTorch: `python -m cg3d_jax.export --checkpoint WORKDIR --out model.pth`.

A pretraining run becomes the original CG3D container (its PyTorch code loads `base_model` with strict=True, the
prompts under `visual_clip_model`); `--format safetensors` (the default for *.safetensors) writes the same tensors
plus a JSON sidecar (cg3d_jax/weights/cg3d_pth.py). A fine-tuning run becomes Point-BERT's fine-tune container
(`base_model` = the classifier in the original names). `--format ulip` writes an encoder with ULIP's bias-free
projection (a ULIP file, or a run started from one) in ULIP's checkpoint layout (weights/ulip.py); an OpenShape PPAT
is written in OpenShape's (`--format openshape`, weights/openshape_pt.py), a Uni3D encoder in Uni3D's (`--format
uni3d`, weights/uni3d_pt.py); each is the default for its encoder. `--verify`
reloads the written file into the PyTorch twin with strict=True and compares its outputs with JAX's, both in
float64, on four real ModelNet40 objects the package ships (or `--points` files); it exits non-zero when the largest
difference exceeds `--tolerance`.
"""

import pathlib

import numpy as np
from absl import flags, logging

from cg3d_jax import cli
from cg3d_jax.errors import InputError

CHECKPOINT = cli.checkpoint_flags()
OUT = cli.out_flag()
FORMAT = flags.DEFINE_enum(
  'format',
  None,
  ['cg3d', 'safetensors', 'ulip', 'openshape', 'uni3d'],
  'Container format; default from --out: *.safetensors -> safetensors, else cg3d (an OpenShape encoder: '
  "openshape). 'ulip': ULIP's checkpoint layout (point_encoder.* + pc_projection), for an encoder with ULIP's "
  "bias-free projection; 'openshape': OpenShape's (ppat.* + proj.*), for its PPAT; 'uni3d': Uni3D's (DeepSpeed's "
  'module with point_encoder.*), for a Uni3D encoder.',
)
EPOCH = flags.DEFINE_integer('epoch', -1, "Value of the container's 'epoch' entry (-1: unknown, as the original).")
VERIFY = flags.DEFINE_bool('verify', False, 'Reload the export into the PyTorch twin and compare outputs.')
POINTS = cli.points_flag()  # for --verify; default: four real ModelNet40 objects
MODELNET_DIR = flags.DEFINE_string(
  'modelnet_dir',
  None,
  'A modelnet40_normal_resampled folder to read the --verify '
  "objects from; default: the package's own copy of their xyz.",
)
TOLERANCE = flags.DEFINE_float(
  'tolerance',
  1e-6,
  'Largest max |JAX - PyTorch| difference --verify accepts (both '
  'run in float64, where a correct export agrees to ~1e-12).',
)


# Flags defined once in cli (or scenes.flags) that this command takes: listed by its --help.
for _shared in ('checkpoint', 'step', 'out', 'points', 'verbose'):
  flags.declare_key_flag(_shared)


def resolve_format(out: pathlib.Path, fmt: str | None) -> str:
  inferred = 'safetensors' if out.suffix == '.safetensors' else 'cg3d'
  if fmt is None:
    return inferred
  if fmt in ('ulip', 'openshape', 'uni3d') and out.suffix in ('.pt', '.pth'):
    return fmt
  if fmt != inferred and out.suffix in ('.safetensors', '.pth', '.pt'):
    raise InputError(f'--format {fmt} does not match the extension of --out {out}')
  return fmt


def _frozen_visual(trained):
  """A run on SLIP exports its frozen image tower beside the prompts, as the original saves `visual_clip_model`."""
  from cg3d_jax.clip import loaded_clip, slip

  if trained.frozen_visual:  # re-exporting an original .pth
    return trained.frozen_visual
  path = trained.config.get('clip', {}).get('path')
  if trained.prompts is None or not path:
    return None
  if not loaded_clip.is_slip_path(path):
    if not pathlib.Path(path).is_dir():
      raise InputError(
        f'{trained.source} was trained with the CLIP at {path}, which is not here: the export needs '
        'it to tell a SLIP run (whose frozen image tower is exported too) from a transformers one'
      )
    return None
  return slip.visual_tensors(path)


def _export_pretraining(trained, out: pathlib.Path, fmt: str):
  from cg3d_jax.weights import cg3d_pth

  config = trained.config
  container = cg3d_pth.build_container(
    trained.encoder_name,
    trained.encoder_vars['params'],
    trained.encoder_vars['batch_stats'],
    prompts=trained.prompts,
    prompt_mode=trained.prompt_mode,
    step=trained.step,
    epoch=EPOCH.value,
    metrics=trained.metrics,
    config=config.to_dict(),
    num_batches_tracked=trained.step,
    frozen_visual=_frozen_visual(trained),
  )
  if trained.encoder_name == 'point_transformer' and not cg3d_pth.has_classification_head(container):
    logging.warning(
      'no classification head (config.model.num_classes is unset): the original '
      'PointTransformerProject builds cls_head_finetune, so its strict load will report it missing'
    )
  written = cg3d_pth.write_container(out, container, fmt)
  print(
    f'exported step {trained.step} of {trained.source} ({trained.encoder_name}, {len(container["base_model"])} '
    f'state-dict entries, visual_clip_model: {cg3d_pth.describe_visual(container)}) to '
    f'{", ".join(map(str, written))}'
  )


def _export_ulip(trained, out: pathlib.Path):
  from cg3d_jax.weights import ulip

  encoder = trained.encoder
  if trained.encoder_name != 'point_transformer' or encoder.projection_bias:
    raise InputError(
      f"--format ulip: {trained.source} is not a Point-BERT with ULIP's bias-free projection (a run started from a "
      'ULIP file with config.model.init, or a ULIP file); export it as cg3d'
    )
  ulip.write_checkpoint(
    out,
    trained.encoder_vars['params'],
    trained.encoder_vars['batch_stats'],
    epoch=trained.step,
    num_batches_tracked=trained.step,
  )
  print(f'exported step {trained.step} of {trained.source} (ULIP Point-BERT, {encoder.depth} blocks) to {out}')


def _export_openshape(trained, out: pathlib.Path):
  from cg3d_jax.weights import openshape_pt

  if trained.encoder_name != 'ppat':
    raise InputError(f"--format openshape: {trained.source} is a {trained.encoder_name}, not OpenShape's PPAT")
  openshape_pt.write_checkpoint(
    out, trained.encoder_vars['params'], trained.encoder_vars['batch_stats'], step=trained.step
  )
  print(f'exported step {trained.step} of {trained.source} (OpenShape PPAT, {trained.encoder.depth} layers) to {out}')


def _export_uni3d(trained, out: pathlib.Path):
  from cg3d_jax.weights import uni3d_pt

  if trained.encoder_name != 'uni3d':
    raise InputError(f'--format uni3d: {trained.source} is a {trained.encoder_name}, not a Uni3D encoder')
  uni3d_pt.write_checkpoint(out, trained.encoder_vars['params'], trained.encoder_vars['batch_stats'], step=trained.step)
  print(f'exported step {trained.step} of {trained.source} (Uni3D, {trained.encoder.depth} blocks) to {out}')


def _export_finetune(finetuned, out: pathlib.Path, fmt: str):
  from cg3d_jax.weights import cg3d_pth

  if fmt != 'cg3d':
    raise InputError(f'--out {out}: a fine-tuned classifier is exported in the original .pth format only')
  config = finetuned.config
  metrics = finetuned.metrics or {}
  entries = cg3d_pth.write_finetune_checkpoint(
    out,
    config.model.encoder,
    finetuned.variables,
    step=finetuned.step,
    epoch=int(metrics.get('epoch', 0)) if EPOCH.value < 0 else EPOCH.value,
    accuracy=100.0 * float(metrics.get('val/top1', 0)),
  )
  print(
    f'exported fine-tuned step {finetuned.step} of {finetuned.source} ({config.model.encoder}, '
    f'{entries} state-dict entries, {config.model.num_classes} classes) to {out}'
  )


def _verify(
  out: pathlib.Path, encoder: str, model, variables, num_points: int, *, logits: bool, layout: str = 'cg3d'
) -> None:
  from cg3d_jax.twins import verify

  names, clouds = verify.verify_clouds(POINTS.value, MODELNET_DIR.value, num_points, getattr(model, 'in_channels', 3))
  if layout == 'ulip':
    twin = verify.load_ulip_twin(out, model)
  elif layout == 'openshape':
    twin = verify.load_openshape_twin(out, model)
  elif layout == 'uni3d':
    twin = verify.load_uni3d_twin(out, model)
  else:
    twin = verify.load_twin(out, encoder, model, num_points, allow_missing_projection=logits)
  print(f'verify: {out} loads into the PyTorch twin with strict=True')
  diff, got, _ = verify.compare_features(twin, model, variables, clouds, logits=logits)
  what = 'logits' if logits else 'features'
  print(
    f'verify: max |JAX - PyTorch| over {got.shape[1]}-d {what} of {len(names)} clouds '
    f'({", ".join(pathlib.Path(n).stem for n in names)}), both in float64: {diff:.3g} (tolerance '
    f'{TOLERANCE.value:g}); largest |output| {np.abs(got).max():.3g}'
  )
  if not diff <= TOLERANCE.value:  # also fails on NaN
    raise InputError(
      f'--verify failed: the export of {out} differs from the JAX model by {diff:.3g} > {TOLERANCE.value:g}'
    )
  print('verify: OK')


def main(argv):
  del argv
  checkpoint = cli.require(CHECKPOINT.checkpoint, '--checkpoint /runs/cg3d (a training or fine-tuning workdir)')
  out = pathlib.Path(cli.require(OUT, '--out model.pth'))
  if out.is_dir():
    raise InputError(f'--out {out} is a directory; give the file to write, e.g. {out / "model.pth"}')
  fmt = resolve_format(out, FORMAT.value)
  from cg3d_jax import checkpoints, trained

  if not str(checkpoint).endswith(trained.TORCH_SUFFIXES) and 'finetune' in checkpoints.read_config(
    checkpoint, CHECKPOINT.step.value
  ):
    finetuned = trained.load_finetuned(checkpoint, CHECKPOINT.step.value)
    _export_finetune(finetuned, out, fmt)
    if VERIFY.value:
      if finetuned.config.model.encoder != 'point_transformer':
        raise InputError(
          '--verify of a fine-tuned PointMLP is not available: the PyTorch twin has no pointMLP '
          'classifier head (the export itself is written)'
        )
      _verify(
        out, 'point_transformer', finetuned.model, finetuned.variables, finetuned.config.model.num_points, logits=True
      )
    return
  model = trained.load_trained(checkpoint, step=CHECKPOINT.step.value)
  if VERIFY.value:  # read the clouds first: a bad --points file should not cost an export
    from cg3d_jax.twins import verify

    verify.verify_clouds(POINTS.value, MODELNET_DIR.value, model.num_points, getattr(model.encoder, 'in_channels', 3))
  own = {'ppat': 'openshape', 'uni3d': 'uni3d'}.get(model.encoder_name)  # encoders with no CG3D layout
  if own and fmt == 'cg3d' and FORMAT.value is None:
    fmt = own
  if fmt == 'ulip':
    _export_ulip(model, out)
  elif fmt == 'openshape':
    _export_openshape(model, out)
  elif fmt == 'uni3d':
    _export_uni3d(model, out)
  elif own:
    raise InputError(
      f'--format {fmt}: {model.source} is a {model.encoder_name}, written in its own layout (--format {own})'
    )
  else:
    _export_pretraining(model, out, fmt)
  if VERIFY.value:
    _verify(out, model.encoder_name, model.encoder, model.encoder_vars, model.num_points, logits=False, layout=fmt)


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
