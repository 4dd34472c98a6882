r"""Open-scene evaluation on S3DIS (Area 5 by default): presence mAP over classes and per-point AUROC, as JSON.

  python -m cg3d_jax.evaluate_scenes --checkpoint /runs/cg3d --s3dis /data/s3dis --out /runs/cg3d/s3dis_area5 \
      [--areas 5] [--classes table,chair,sofa,bookcase,board] [--vocabulary s3dis] [--cache /data/s3dis_cache]

For every room of the areas, every class of --classes is queried (class names as words) against the label set
queries + vocabulary; see cg3d_jax/scenes/queries.py for the scoring and the metrics. Rooms are read from the
official layout (cg3d_jax/scenes/s3dis.py): points and labels from Annotations/, parsed once into --cache if given.
Writes <out>/scene_eval.json (overall, per class, per room) and prints a per-class table.
"""

import pathlib

from absl import flags

from cg3d_jax import cli
from cg3d_jax.errors import InputError
from cg3d_jax.scenes import flags as scene_flags
from cg3d_jax.scenes import s3dis

RESULTS_JSON = 'scene_eval.json'
S3DIS_CLASSES = s3dis.S3DIS_CLASSES

CHECKPOINT = cli.checkpoint_flags()
CLIP = cli.clip_flags()
S3DIS = flags.DEFINE_string(
  's3dis', None, 'Folder holding Stanford3dDataset_v1.2_Aligned_Version (or that folder itself).'
)
AREAS = flags.DEFINE_string('areas', '5', 'Comma-separated area numbers.')
CLASSES = flags.DEFINE_string(
  'classes', ','.join(S3DIS_CLASSES), 'Classes to query (default: all 13); names as in the annotation files.'
)
VOCABULARY = cli.vocabulary_flag()  # default here: 's3dis'

CLASS_NAMES = flags.DEFINE_string(
  'class_names', None, "The dataset's class list when it is not S3DIS's 13 (e.g. procedural scenes)."
)
CACHE = flags.DEFINE_string('cache', None, 'Folder for parsed rooms (.npz), reused across runs.')
SKIP_BAD_LINES = flags.DEFINE_bool(
  'skip_bad_lines', False, 'Drop malformed annotation lines with a warning instead of stopping.'
)
MAX_ROOMS = flags.DEFINE_integer('max_rooms', None, 'Evaluate only the first N rooms (smoke runs).')
OUT = cli.out_flag()
flags.adopt_module_key_flags(scene_flags)


# Flags defined once in cli (or scenes.flags) that this command takes: listed by its --help.
_SHARED = ('checkpoint', 'step', 'clip_path', 'num_points', 'vocabulary', 'out', 'templates', 'batch_size')
for _shared in (*_SHARED, 'seed', 'verbose'):
  flags.declare_key_flag(_shared)


def main(argv):
  del argv
  checkpoint = cli.require(CHECKPOINT.checkpoint, '--checkpoint /runs/cg3d')
  root = cli.require(S3DIS, '--s3dis /data/s3dis')
  out = pathlib.Path(cli.require(OUT, '--out /runs/cg3d/s3dis_area5'))
  class_names = tuple(cli.parse_labels(CLASS_NAMES.value, '--class_names')) if CLASS_NAMES.value else S3DIS_CLASSES
  classes = cli.parse_labels(CLASSES.value, '--classes')
  unknown = [c for c in classes if c not in class_names]
  if unknown:
    raise InputError(f'--classes {unknown} are not dataset classes {list(class_names)}')
  spec = VOCABULARY.value or 's3dis'
  vocabulary = {'s3dis': list(S3DIS_CLASSES), 'none': []}.get(spec)
  if vocabulary is None:
    vocabulary = cli.parse_labels(spec, '--vocabulary')
  try:
    areas = [int(a) for a in AREAS.value.split(',')]
  except ValueError:
    raise InputError(f'--areas {AREAS.value!r}: expected comma-separated area numbers, e.g. 5 or 1,3,5') from None
  settings = scene_flags.query_settings()
  from cg3d_jax import trained
  from cg3d_jax.evaluators import reports
  from cg3d_jax.scenes import queries

  rooms = s3dis.list_rooms(root, areas)[: MAX_ROOMS.value]
  model = trained.with_clip(
    trained.load_trained(checkpoint, step=CHECKPOINT.step.value, num_points=CLIP.num_points.value), CLIP.clip_path.value
  )
  result = queries.evaluate_scenes(
    model,
    queries.labelled_rooms(rooms, class_names, cache=CACHE.value, skip_bad_lines=SKIP_BAD_LINES.value),
    classes,
    vocabulary,
    settings=settings,
  )
  result.update({'checkpoint': checkpoint, 'step': model.step, 's3dis': root, 'areas': areas})
  out.mkdir(parents=True, exist_ok=True)
  reports.write_json(out / RESULTS_JSON, result)
  rows = [
    {'class': name, **{k: v[k] for k in ('ap', 'auroc', 'rooms_present', 'presence_accuracy')}}
    for name, v in result['per_class'].items()
  ]
  print(reports.format_table(rows, ['class', 'ap', 'auroc', 'rooms_present', 'presence_accuracy'], '{:.4f}'))
  print(
    f'mAP {result["mAP"]:.4f} over {result["classes_in_mAP"]} classes, mean AUROC {result["mean_auroc"]:.4f}, '
    f'{result["num_rooms"]} rooms -> {out / RESULTS_JSON}'
  )


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
