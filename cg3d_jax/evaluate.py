"""Zero-shot evaluation and retrieval of a checkpoint: `python -m cg3d_jax.evaluate --config ... --checkpoint PATH`.

  python -m cg3d_jax.evaluate --config zeroshot_modelnet40 --checkpoint /runs/cg3d --workdir /tmp/zs40 \
      --config.eval.manual_dir=/data/modelnet40_normal_resampled --config.eval.data_dir=/data/tfds

--checkpoint is a training workdir or step folder, or an original CG3D (or exported) .pth / .safetensors; for the
latter give the CLIP folder with --config.clip.path (the original file does not record it) and, when the file does
not record its config, the encoder's input size with --config.model.num_points (default 1024).

Zero-shot configs print a table and write results.json, per_class.csv, per_class.json and confusion.png into the
workdir; the retrieval config (retrieval_shapenet55) writes retrieval.json and retrieval_grid.png.
The split runs sharded over every device (batch over the ('data', 'fsdp') mesh); the last batch is padded and
its padding masked out, so every object is scored exactly once.
"""

import os

import jax
from absl import app, flags, logging

from cg3d_jax import cli
from cg3d_jax.data import builders, pipeline
from cg3d_jax.eval import reports, retrieval, zeroshot
from cg3d_jax.train import sharding

flags.adopt_module_key_flags(cli)  # so that --help lists --config and --workdir

CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Training workdir, checkpoint step folder or original CG3D .pth.')


def _check_batch_size(batch_size: int, mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f'config.eval.batch_size={batch_size} must be a multiple of the {mesh.size} devices the split '
                     f'is sharded over, e.g. --config.eval.batch_size={mesh.size * max(1, batch_size // mesh.size)}')


def _batches(ev, mesh, preprocess=None):
  """The split's global batches; with CLIP's `preprocess` also each object's view `ev.view_index` as 'image'."""
  kwargs = {}
  if preprocess is not None:
    pre = preprocess
    kwargs = dict(image_size=pre.crop_size, image_mean=tuple(pre.mean), image_std=tuple(pre.std),
                  view_index=ev.view_index)
  return pipeline.make_eval_iterator(
      ev.dataset, data_dir=ev.data_dir, manual_dir=ev.manual_dir, batch_size=ev.batch_size,
      sharding=sharding.batch_sharding(mesh), num_points_stored=ev.num_stored_points, split=ev.split,
      max_examples=ev.max_examples, skip_bad=ev.skip_bad, **kwargs)


def run(config, checkpoint: str, workdir: str, devices=None) -> dict:
  """Evaluates `checkpoint` as `config.eval` says; writes the reports into `workdir`; returns the summary."""
  ev = config.eval
  model = zeroshot.load_eval_model(checkpoint, clip_path=config.clip.path, step=ev.get('step'),
                                  num_points=config.model.num_points)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1}, devices)
  _check_batch_size(ev.batch_size, mesh)
  builder = builders.get_builder(ev.dataset, data_dir=ev.data_dir, manual_dir=ev.manual_dir, skip_bad=ev.skip_bad,
                                 process_count=jax.process_count())
  class_names = builders.class_names(builder)
  info = {'checkpoint': model.source, 'step': model.step, 'templates': ev.templates, 'name_style': ev.name_style,
          'normalize_text': ev.normalize_text, 'num_points': model.model.num_points,
          'num_stored_points': ev.num_stored_points, 'split': ev.split, 'devices': mesh.size}
  logging.info('evaluating %s (step %d) on %s/%s with %d devices', model.source, model.step, ev.dataset, ev.split,
               mesh.size)
  classifier = zeroshot.text_classifier(model.clip.model, model.clip_params, model.clip.tokenizer, class_names,
                                        ev.templates, normalize=ev.normalize_text, name_style=ev.name_style)
  if ev.task == 'zeroshot':
    return _zero_shot(config, model, mesh, class_names, classifier, workdir, info)
  if ev.task == 'retrieval':
    return _retrieval(config, model, mesh, builder, class_names, classifier, workdir, info)
  raise ValueError(f"config.eval.task must be 'zeroshot' or 'retrieval', got {ev.task!r}")


def _zero_shot(config, model, mesh, class_names, classifier, workdir, info) -> dict:
  ev = config.eval
  outputs = zeroshot.run_zero_shot(model.model, model.encoder_vars, model.clip_params, model.clip.tokenizer,
                                   _batches(ev, mesh), class_names, mesh, classifier=classifier)
  summary = {}
  if jax.process_index() == 0:
    summary = reports.write_classification_report(workdir, dataset=ev.dataset, class_names=class_names,
                                                  logits=outputs.scores, labels=outputs.labels, ks=tuple(ev.ks),
                                                  extra=info)
    columns = ['dataset', 'num_objects', *(f'top{k}_acc' for k in ev.ks), 'class_mean_acc']
    print(reports.format_table([summary], columns))
    written = (reports.RESULTS_FILE, reports.PER_CLASS_CSV, reports.PER_CLASS_JSON, reports.CONFUSION_PNG)
    print(f'wrote {", ".join(written)} to {workdir}')
  return summary


def _retrieval(config, model, mesh, builder, class_names, classifier, workdir, info) -> dict:
  ev = config.eval
  features = retrieval.split_features(model.model, model.encoder_vars, model.clip_params,
                                      _batches(ev, mesh, model.clip.preprocess), mesh, classifier, class_names)
  results = retrieval.retrieval_results(features, tuple(ev.ks))
  summary = {'dataset': ev.dataset, 'num_objects': int(features.labels.shape[0]), **info, 'view_index': ev.view_index,
             'relevance': {'text_to_3d': 'class', '3d_to_text': 'class', 'image_to_3d': 'instance',
                           '3d_to_image': 'instance'},
             **results}
  if jax.process_index() == 0:
    reports.write_json(os.path.join(workdir, retrieval.RESULTS_FILE), summary)
    retrieval.write_grid(os.path.join(workdir, retrieval.GRID_PNG), features,
                         retrieval.view_reader(builder, ev.split, ev.view_index), num_queries=ev.grid_queries,
                         num_matches=ev.grid_matches)
    print(reports.format_table(retrieval.results_table(results)))
    print(f'wrote {retrieval.RESULTS_FILE}, {retrieval.GRID_PNG} to {workdir}')
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = cli.require_config()
  if not CHECKPOINT.value:
    raise app.UsageError('--checkpoint is required: a training workdir, a step folder or an original CG3D .pth')
  if 'task' not in config.eval:
    raise app.UsageError('this config has no eval.task: use --config zeroshot_<dataset> or '
                         '--config retrieval_shapenet55')
  run(config, CHECKPOINT.value, cli.require_workdir())


def run() -> None:
  """The console script's entry point."""
  cli.run(main)


if __name__ == '__main__':
  run()
