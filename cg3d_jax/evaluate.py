"""Zero-shot evaluation and retrieval of a checkpoint: `python -m cg3d_jax.evaluate --config ... --checkpoint PATH`.

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

import functools
import os

import jax
from absl import flags, logging

from cg3d_jax import cli, sharding
from cg3d_jax.errors import ConfigError, InputError

CHECKPOINT = cli.checkpoint_flags()
flags.adopt_module_key_flags(cli)  # after the definitions above: adopting copies the key flags defined so far


def _batches(ev, mesh, preprocess=None):
  """A fresh pass over the split's global batches; with CLIP's `preprocess` also each object's view as 'image'."""
  from cg3d_jax.data import pipeline

  kwargs = {}
  if preprocess is not None:
    kwargs = dict(**preprocess.pipeline_settings(), view_index=ev.view_index)
  return functools.partial(
    pipeline.make_eval_iterator,
    ev.dataset,
    data_dir=ev.data_dir,
    manual_dir=ev.manual_dir,
    batch_size=ev.batch_size,
    sharding=sharding.batch_sharding(mesh),
    num_points_stored=ev.num_stored_points,
    split=ev.split,
    max_examples=ev.max_examples,
    skip_bad=ev.skip_bad,
    **kwargs,
  )


def protocol_name(ev) -> str:
  """'cg3d_original' when the settings are the original eval.py's (one template, unnormalised text); otherwise
  'cosine' or 'unnormalised' (the templates and name style are recorded beside it)."""
  original = ev.templates == 'cg3d_zeroshot' and ev.name_style == 'raw' and not ev.normalize_text
  return 'cg3d_original' if original else ('cosine' if ev.normalize_text else 'unnormalised')


def evaluate(config, checkpoint: str, workdir: str, devices=None, step: int | None = None) -> dict:
  """Evaluates `checkpoint` as `config.eval` says; writes the reports into `workdir`; returns the summary."""
  from cg3d_jax import trained
  from cg3d_jax.data import builders
  from cg3d_jax.evaluators import evaluation_sets, reports, retrieval, zeroshot

  ev = config.eval
  if ev.task not in ('zeroshot', 'retrieval'):
    raise ConfigError(f"config.eval.task must be 'zeroshot' or 'retrieval', got {ev.task!r}")
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1}, devices)
  if ev.batch_size < 1 or ev.batch_size % mesh.size:
    raise ConfigError(
      f'config.eval.batch_size={ev.batch_size} must be a positive multiple of the {mesh.size} '
      f'devices the split is sharded over, e.g. --config.eval.batch_size='
      f'{mesh.size * max(1, ev.batch_size // mesh.size)}'
    )
  if evaluation_sets.is_layout_set(ev.dataset):
    return evaluate_layout_set(config, checkpoint, workdir, mesh, step)
  source = dict(
    data_dir=ev.data_dir,
    manual_dir=ev.manual_dir,
    skip_bad=ev.skip_bad,
    process_count=jax.process_count(),
    fields=builders.EVAL_FIELDS,
  )
  builders.checked_builder(ev.dataset, **source)  # a bad dataset setting costs no model
  model = trained.with_clip(
    trained.load_trained(
      checkpoint, step=step if step is not None else ev.get('step'), num_points=config.model.num_points
    ),
    config.clip.path,
  )
  if getattr(model.model.encoder, 'in_channels', 3) != 3:
    raise ConfigError(
      f'{model.source}: a coloured encoder (xyz + rgb) but {ev.dataset} is xyz only; score it on '
      "OpenShape's files instead (--config zeroshot_openshape:modelnet40 or :scanobjectnn)"
    )
  builder = builders.get_builder(ev.dataset, **source)
  class_names = builders.class_names(builder)
  info = {
    'checkpoint': model.source,
    'step': model.step,
    'templates': ev.templates,
    'name_style': ev.name_style,
    'normalize_text': ev.normalize_text,
    'protocol': protocol_name(ev),
    'clip': {'kind': model.clip.kind, 'path': model.clip.source},
    'num_points': model.model.num_points,
    'num_stored_points': ev.num_stored_points,
    'split': ev.split,
    'devices': mesh.size,
  }
  logging.info(
    'evaluating %s (step %d) on %s/%s with %d devices', model.source, model.step, ev.dataset, ev.split, mesh.size
  )
  variables = {'encoder': model.encoder_vars, 'clip': model.clip_params}
  text = dict(
    class_names=class_names,
    mesh=mesh,
    templates=ev.templates,
    normalize_text=ev.normalize_text,
    name_style=ev.name_style,
    ks=tuple(ev.ks),
  )
  if ev.task == 'zeroshot':
    outputs = zeroshot.ZeroShotEvaluator(
      model.model, model.clip_params, model.clip.tokenizer, batches=_batches(ev, mesh), **text
    ).outputs(variables)
    summary = {}
    if jax.process_index() == 0:
      summary = reports.write_classification_report(
        workdir,
        dataset=ev.dataset,
        class_names=class_names,
        logits=outputs.scores,
        labels=outputs.labels,
        ks=tuple(ev.ks),
        extra=info,
      )
      columns = ['dataset', 'num_objects', *(f'top{k}_acc' for k in ev.ks), 'class_mean_acc']
      print(reports.format_table([summary], columns))
      written = (reports.RESULTS_FILE, reports.PER_CLASS_CSV, reports.PER_CLASS_JSON, reports.CONFUSION_PNG)
      print(f'wrote {", ".join(written)} to {workdir}')
    return summary

  evaluator = retrieval.RetrievalEvaluator(
    model.model, model.clip_params, model.clip.tokenizer, batches=_batches(ev, mesh, model.clip.preprocess), **text
  )
  features = evaluator.features(variables)
  results = retrieval.retrieval_results(features, tuple(ev.ks))
  summary = {
    'dataset': ev.dataset,
    'num_objects': int(features.labels.shape[0]),
    **info,
    'view_index': ev.view_index,
    'relevance': {'text_to_3d': 'class', '3d_to_text': 'class', 'image_to_3d': 'instance', '3d_to_image': 'instance'},
    **results,
  }
  if jax.process_index() == 0:
    reports.write_json(os.path.join(workdir, retrieval.RESULTS_FILE), summary)
    retrieval.write_grid(
      os.path.join(workdir, retrieval.GRID_PNG),
      features,
      retrieval.view_reader(builder, ev.split, ev.view_index),
      num_queries=ev.grid_queries,
      num_matches=ev.grid_matches,
    )
    print(reports.format_table(retrieval.results_table(results)))
    print(f'wrote {retrieval.RESULTS_FILE}, {retrieval.GRID_PNG} to {workdir}')
  return summary


def evaluate_layout_set(config, checkpoint: str, workdir: str, mesh, step: int | None = None) -> dict:
  """Zero-shot on a set in OpenShape's or Uni3D's layout (evaluators/evaluation_sets.py); with precomputed class
  features no CLIP is loaded."""
  from cg3d_jax import trained
  from cg3d_jax.evaluators import evaluation_sets, reports, zeroshot
  from cg3d_jax.models.cg3d import CG3D

  ev = config.eval
  evalset = evaluation_sets.open_eval_set(ev)  # a bad data setting costs no model
  loaded = trained.load_trained(
    checkpoint, step=step if step is not None else ev.get('step'), num_points=config.model.num_points
  )
  channels = 6 if ev.use_color else 3
  if getattr(loaded.encoder, 'in_channels', 3) != channels:
    raise ConfigError(
      f'{loaded.source}: the encoder takes {getattr(loaded.encoder, "in_channels", 3)} channels per '
      f'point but config.eval.use_color={ev.use_color} gives {channels}'
    )
  if ev.get('prompts', 'precomputed') == 'precomputed':
    model, clip_params, tokenizer, clip_info = (
      CG3D(encoder=loaded.encoder, clip=None, num_points=loaded.num_points),
      None,
      None,
      None,
    )
  else:
    scoring = trained.with_clip(loaded, config.clip.path)
    model, clip_params, tokenizer = scoring.model, scoring.clip_params, scoring.clip.tokenizer
    clip_info = {'kind': scoring.clip.kind, 'path': scoring.clip.source}
  classifier = evaluation_sets.classifier(evalset, ev, model, clip_params, tokenizer)
  if classifier.shape[1] != loaded.embed_dim:
    raise ConfigError(
      f'{loaded.source} projects to {loaded.embed_dim} dimensions but the class features of '
      f'{evalset.source} have {classifier.shape[1]}: not the joint space it was trained in'
    )
  logging.info(
    'evaluating %s (step %d) on %s (%d shapes) with %d devices',
    loaded.source,
    loaded.step,
    evalset.name,
    len(evalset),
    mesh.size,
  )
  batches = functools.partial(evaluation_sets.eval_iterator, evalset, ev, sharding.batch_sharding(mesh))
  outputs = zeroshot.ZeroShotEvaluator(
    model,
    clip_params,
    tokenizer,
    batches=batches,
    class_names=evalset.class_names,
    mesh=mesh,
    classifier=classifier,
    ks=tuple(ev.ks),
  ).outputs({'encoder': loaded.encoder_vars, 'clip': clip_params})
  info = {
    'checkpoint': loaded.source,
    'step': loaded.step,
    'clip': clip_info,
    'num_points': loaded.num_points,
    'devices': mesh.size,
    **evaluation_sets.prompt_record(evalset, ev),
  }
  summary = {}
  if jax.process_index() == 0:
    summary = reports.write_classification_report(
      workdir,
      dataset=evalset.name,
      class_names=evalset.class_names,
      logits=outputs.scores,
      labels=outputs.labels,
      ks=tuple(ev.ks),
      extra=info,
    )
    columns = ['dataset', 'num_objects', *(f'top{k}_acc' for k in ev.ks), 'class_mean_acc', 'prompts']
    print(reports.format_table([summary], columns))
    print(
      f'wrote {reports.RESULTS_FILE}, {reports.PER_CLASS_CSV}, {reports.PER_CLASS_JSON}, '
      f'{reports.CONFUSION_PNG} to {workdir}'
    )
  return summary


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
