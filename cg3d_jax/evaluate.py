r"""Zero-shot evaluation and retrieval of a checkpoint: `python -m cg3d_jax.evaluate --config ... --checkpoint PATH`.

  python -m cg3d_jax.evaluate --config zeroshot_modelnet40 --checkpoint /runs/cg3d --workdir /tmp/zs40 \
      --config.eval.manual_dir=/data/modelnet40_normal_resampled --config.eval.data_dir=/data/tfds

--checkpoint is a training workdir or step folder, or an original CG3D (or exported) .pth / .safetensors; for the
latter give the CLIP folder with --config.clip.path (the original file does not record it) and, when the file does
not record its config, the encoder's input size with --config.model.num_points (default 1024).

Zero-shot configs print a table and write results.json, per_class.csv, per_class.json and confusion.png into the
workdir; the retrieval config (retrieval_shapenet55) writes retrieval.json and retrieval_grid.png. The split runs
sharded over every device (batch over the ('data', 'fsdp') mesh); the last batch is padded and its padding masked
out, so every object is scored exactly once.
"""

import jax
from absl import flags, logging

from cg3d_jax import cli, sharding
from cg3d_jax.errors import ConfigError, InputError

CHECKPOINT = cli.checkpoint_flags()
flags.adopt_module_key_flags(cli)  # after the definitions above: adopting copies the key flags defined so far


def evaluate(config, checkpoint: str, workdir: str, devices=None, step: int | None = None) -> dict:
  """Evaluates `checkpoint` as `config.eval` says; writes the reports into `workdir`; returns the summary."""
  from cg3d_jax import trained
  from cg3d_jax.data.sources import source
  from cg3d_jax.evaluators import evaluator, protocols, zeroshot
  from cg3d_jax.models.cg3d import CG3D
  from cg3d_jax.training import config_checks

  config_checks.check(config)  # every setting, before any data or model
  ev = config.eval
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1}, devices)
  if ev.batch_size < 1 or ev.batch_size % mesh.size:
    raise ConfigError(
      f'config.eval.batch_size={ev.batch_size} must be a positive multiple of the {mesh.size} '
      f'devices the split is sharded over, e.g. --config.eval.batch_size='
      f'{mesh.size * max(1, ev.batch_size // mesh.size)}'
    )
  data = source.eval_source(ev, process_count=jax.process_count())  # a bad data setting costs no model
  loaded = trained.load_trained(
    checkpoint, step=step if step is not None else ev.get('step'), num_points=config.model.num_points
  )
  has_clip = bool(config.clip.path or loaded.config.get('clip', {}).get('path'))
  ev, published = protocols.for_evaluation(
    ev, loaded.released, loaded.in_channels, has_clip=has_clip, layout_features=data.class_features is not None
  )
  if published['published_protocol']:
    data = source.eval_source(ev, process_count=jax.process_count())  # with the protocol's axes and colour
    logging.info('scoring with the published protocol of %s: %s', loaded.released, published['published_protocol'])
  trained.encode_as_evaluated(loaded, ev)
  channels = loaded.in_channels
  if channels != data.channels:
    raise ConfigError(
      f'{loaded.source}: the encoder takes {channels} channels per point (xyz{" + rgb" if channels == 6 else ""}) '
      f'but {data.name} gives {data.channels} here (config.eval.use_color={bool(ev.get("use_color"))}): set '
      f'--config.eval.use_color={channels == 6} (sets without colours give grey 0.4, as OpenShape does)'
    )
  if ev.task == 'retrieval' or zeroshot.needs_clip(ev):
    scoring = trained.with_clip(loaded, config.clip.path)
    model, clip_params, clip = scoring.model, scoring.clip_params, scoring.clip
    clip_info = {'kind': clip.kind, 'path': clip.source}
  else:  # the layout's stored class features score it: no CLIP is loaded
    model, clip_params, clip, clip_info = (
      CG3D(encoder=loaded.encoder, clip=None, num_points=loaded.num_points),
      None,
      None,
      None,
    )
    layout_features = ev.prompts == 'precomputed' and data.class_features is not None
    if layout_features and data.class_features.shape[1] != loaded.embed_dim:
      raise ConfigError(
        f'{loaded.source} projects to {loaded.embed_dim} dimensions but the class features of '
        f'{data.source} have {data.class_features.shape[1]}: not the joint space it was trained in'
      )
  logging.info(
    'evaluating %s (step %d) on %s (%s) with %d devices', loaded.source, loaded.step, data.name, ev.split, mesh.size
  )
  scorer = evaluator.from_config(
    ev,
    data,
    model=model,
    clip_params=clip_params,
    tokenizer=None if clip is None else clip.tokenizer,
    preprocess=None if clip is None else clip.preprocess,
    mesh=mesh,
    sharding=sharding.batch_sharding(mesh),
  )
  info = {
    'checkpoint': loaded.source,
    'family': loaded.config.get('family', 'CG3D'),
    'size': loaded.size(),
    'step': loaded.step,
    'clip': clip_info,
    'num_points': loaded.num_points,
    'devices': mesh.size,
    **zeroshot.prompt_record(ev),
    **published,
    **data.record,
  }
  return scorer.report({'encoder': loaded.encoder_vars, 'clip': clip_params}, workdir, data.name, info)


def main(argv):
  del argv
  config = cli.require_config()
  checkpoint = cli.require(
    CHECKPOINT.checkpoint, '--checkpoint /runs/cg3d (a training workdir, a step folder or an original CG3D .pth)'
  )
  if 'task' not in config.eval:
    raise InputError('this config has no eval.task: use --config zeroshot_<dataset> or --config retrieval_shapenet55')
  evaluate(config, checkpoint, cli.require_workdir(), step=CHECKPOINT.step.value)


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
