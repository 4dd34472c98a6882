"""Open-scene evaluation on S3DIS (Area 5 by default): presence mAP over classes and per-point AUROC, as JSON.

  python -m cg3d_jax.evaluate_scenes --checkpoint /runs/cg3d --s3dis /data/s3dis --out /runs/cg3d/s3dis_area5 \
      [--areas 5] [--classes table,chair,sofa,bookcase,board] [--vocabulary s3dis] [--cache /data/s3dis_cache]

For every room of the areas, every class of --classes is queried (class names as words) against the label set
queries + vocabulary; see cg3d_jax/eval/scenes.py for the scoring and the metrics. Rooms are read from the
official layout (cg3d_jax/data/s3dis.py): points and labels from Annotations/, parsed once into --cache if given.
Writes <out>/scene_eval.json (overall, per class, per room) and prints a per-class table.
"""

import argparse
import pathlib
import sys

from cg3d_jax.data import s3dis
from cg3d_jax.eval import reports, scenes, zeroshot
from cg3d_jax.predict import parse_labels
from cg3d_jax.query_scene import add_checkpoint_arguments, add_region_arguments, query_settings

RESULTS_JSON = 'scene_eval.json'


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m cg3d_jax.evaluate_scenes', description=__doc__.split('\n')[0])
  add_checkpoint_arguments(parser)
  parser.add_argument('--s3dis', required=True,
                      help='folder holding Stanford3dDataset_v1.2_Aligned_Version (or that folder itself)')
  parser.add_argument('--areas', default='5', help='comma-separated area numbers (default: 5)')
  parser.add_argument('--classes', default=','.join(s3dis.S3DIS_CLASSES),
                      help='classes to query (default: all 13); names as in the annotation files')
  parser.add_argument('--vocabulary', default='s3dis',
                      help="extra labels the queries compete with: 's3dis', 'none' or comma-separated words")
  parser.add_argument('--class_names', default=None,
                      help="the dataset's class list when it is not S3DIS's 13 (e.g. procedural scenes)")
  parser.add_argument('--cache', default=None, help='folder for parsed rooms (.npz), reused across runs')
  parser.add_argument('--skip_bad_lines', action='store_true',
                      help='drop malformed annotation lines with a warning instead of stopping')
  parser.add_argument('--max_rooms', type=int, default=None, help='evaluate only the first N rooms (smoke runs)')
  parser.add_argument('--out', required=True, help='output folder for scene_eval.json')
  add_region_arguments(parser)
  return parser.parse_args(argv)


def labelled_scenes(rooms, class_names, *, cache=None, skip_bad_lines=False):
  """Reads rooms one at a time (a whole area does not fit in memory as text). Classes outside the list go to
  'clutter' (with a warning) when the list has it, as for S3DIS's few 'stairs' files, and are errors otherwise."""
  unknown_class = 'clutter' if 'clutter' in class_names else None
  for room_dir in rooms:
    room = s3dis.read_room(room_dir, class_names=class_names, unknown_class=unknown_class, cache_dir=cache,
                           skip_bad_lines=skip_bad_lines)
    yield scenes.LabelledScene(name=f'{room.area}/{room.name}', xyz=room.xyz, labels=room.labels,
                               class_names=room.class_names)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    class_names = tuple(parse_labels(args.class_names)) if args.class_names else s3dis.S3DIS_CLASSES
    classes = parse_labels(args.classes)
    unknown = [c for c in classes if c not in class_names]
    if unknown:
      raise ValueError(f'--classes {unknown} are not dataset classes {list(class_names)}')
    vocabulary = {'s3dis': list(s3dis.S3DIS_CLASSES), 'none': []}.get(args.vocabulary)
    if vocabulary is None:
      vocabulary = parse_labels(args.vocabulary)
    areas = [int(a) for a in args.areas.split(',')]
    rooms = s3dis.list_rooms(args.s3dis, areas)[:args.max_rooms]
    model = zeroshot.load_eval_model(args.checkpoint, clip_path=args.clip_path, step=args.step,
                                     num_points=args.num_points)
    result = scenes.evaluate_scenes(
        model, labelled_scenes(rooms, class_names, cache=args.cache, skip_bad_lines=args.skip_bad_lines), classes,
        vocabulary, settings=query_settings(args))
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  result.update({'checkpoint': args.checkpoint, 'step': model.step, 's3dis': args.s3dis, 'areas': areas})
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  reports.write_json(out / RESULTS_JSON, result)
  rows = [{'class': name, **{k: v[k] for k in ('ap', 'auroc', 'rooms_present', 'presence_accuracy')}}
          for name, v in result['per_class'].items()]
  print(reports.format_table(rows, ['class', 'ap', 'auroc', 'rooms_present', 'presence_accuracy'], '{:.4f}'))
  print(f"mAP {result['mAP']:.4f} over {result['classes_in_mAP']} classes, mean AUROC {result['mean_auroc']:.4f}, "
        f"{result['num_rooms']} rooms -> {out / RESULTS_JSON}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
