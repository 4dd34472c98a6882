r"""Ask a whole 3D scene in words where things are and whether they are there.

  python -m cg3d_jax.query_scene --checkpoint /runs/cg3d --scene Area_5/office_1 --queries "chair,table,lamp" \
      [--out DIR] [--vocabulary training|s3dis|none|"w1,w2,..."] [--radius 0.75] [--exclude_floor] ...

The scene: an S3DIS room folder (or its <room>.txt: `x y z r g b` lines), or any file `predict` reads (PLY, NPY,
OFF, TXT/XYZ/CSV), in metres with z up by default (--scene_up). It is split into balls of --radius around
farthest-point centres, every ball is normalised like a training object and embedded, and each query is scored
against the queries plus a background vocabulary (see cg3d_jax/scenes/queries.py and regions.py).

Outputs in --out (default: <scene name>_query in the current folder): summary.json, point_scores.npy, and per query
a heat-coloured <query>.ply and a top view <query>_top.png (cg3d_jax/scenes/outputs.py).
"""

import os
import pathlib

from absl import flags

from cg3d_jax import cli
from cg3d_jax.scenes import flags as scene_flags

CHECKPOINT = cli.checkpoint_flags()
CLIP = cli.clip_flags()
SCENE = flags.DEFINE_string('scene', None, 'S3DIS room folder or room .txt, or a .ply .npy .off .txt file.')
QUERIES = flags.DEFINE_string('queries', None, 'Comma-separated text queries, e.g. "chair,table,lamp".')
VOCABULARY = cli.vocabulary_flag()  # default here: 'training' (with --class_features: the file's names)
CLASS_FEATURES = cli.class_features_flag()
OUT = cli.out_flag()  # default here: ./<scene name>_query
IMAGE_SIZE = flags.DEFINE_integer('image_size', 512, 'Long side of the top-view PNGs.')
flags.adopt_module_key_flags(scene_flags)


# Flags defined once in cli (or scenes.flags) that this command takes: listed by its --help.
_SHARED = ('checkpoint', 'step', 'clip_path', 'num_points', 'vocabulary', 'out', 'templates', 'class_features')
for _shared in (*_SHARED, 'batch_size', 'seed', 'verbose'):
  flags.declare_key_flag(_shared)


def format_summary(summary: dict) -> str:
  from cg3d_jax.evaluators import reports

  rows = [
    {
      'query': r['query'],
      'present': 'yes' if r['present'] else 'no',
      'score': r['score'],
      'regions won': r['regions_won'],
      'files': r['files']['ply'],
    }
    for r in summary['results']
  ]
  return (
    f'{summary["scene"]}: {summary["scene_points"]} points, {summary["regions"]} regions '
    f'(radius {summary["region_settings"]["radius"]}), labels {summary["labels"]}\n'
    + reports.format_table(rows, ['query', 'present', 'score', 'regions won', 'files'], '{:.4f}')
  )


def main(argv):
  del argv
  checkpoint = cli.require(CHECKPOINT.checkpoint, '--checkpoint /runs/cg3d')
  scene = cli.require(SCENE, '--scene Area_5/office_1')
  queries_ = cli.parse_labels(cli.require(QUERIES, '--queries "chair,table,lamp"'), '--queries')
  settings = scene_flags.query_settings()
  out = OUT.value or f'{pathlib.Path(scene.rstrip("/")).stem}_query'
  from cg3d_jax import trained
  from cg3d_jax.evaluators import prediction
  from cg3d_jax.scenes import outputs, queries, s3dis

  xyz, rgb = queries.read_scene(scene)  # before the model loads: a bad scene costs no model
  loaded = trained.load_trained(checkpoint, step=CHECKPOINT.step.value, num_points=CLIP.num_points.value)
  features_file = CLASS_FEATURES.value
  model = trained.without_clip(loaded) if features_file else trained.with_clip(loaded, CLIP.clip_path.value)
  spec = VOCABULARY.value or 'training'
  if features_file and not VOCABULARY.value:
    vocabulary = prediction.file_labels(features_file)  # every name the file holds competes with the queries
  else:
    vocabulary = (
      queries.training_vocabulary(model)
      if spec == 'training'
      else list(s3dis.S3DIS_CLASSES)
      if spec == 's3dis'
      else []
      if spec == 'none'
      else cli.parse_labels(spec, '--vocabulary')
    )
  classifier = None
  if features_file:  # the labels' features as numbers, in label_set's order
    labels = queries.label_set(queries_, vocabulary)
    classifier = prediction.label_features(features_file, labels, loaded.embed_dim)
  result = queries.query_scene(model, xyz, queries_, vocabulary, settings=settings, rgb=rgb, classifier=classifier)
  summary = outputs.write_query_outputs(
    out, xyz, rgb, result, scene=scene, up=settings.regions.scene_up, image_size=IMAGE_SIZE.value
  )
  print(format_summary(summary))
  print(f'outputs in {os.path.abspath(out)}')


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
