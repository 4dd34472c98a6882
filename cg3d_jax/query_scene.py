"""Ask a whole 3D scene in words where things are and whether they are there.

  python -m cg3d_jax.query_scene --checkpoint /runs/cg3d --scene Area_5/office_1 --queries "chair,table,lamp" \
      [--out DIR] [--vocabulary training|s3dis|none|"w1,w2,..."] [--radius 0.75] [--exclude_floor] ...

The scene: an S3DIS room folder (or its <room>.txt: `x y z r g b` lines), or any file `predict` reads (PLY, NPY,
OFF, TXT/XYZ/CSV), in metres with z up by default (--scene_up). It is split into balls of --radius around
farthest-point centres, every ball is normalised like a training object and embedded, and each query is scored
against the queries plus a background vocabulary (see cg3d_jax/eval/scenes.py and scene_regions.py).

Outputs in --out (default: <scene name>_query next to the current folder): summary.json, point_scores.npy, and
per query a heat-coloured <query>.ply and a top view <query>_top.png (cg3d_jax/eval/scene_outputs.py).
"""

import argparse
import os
import pathlib
import sys

import numpy as np

from cg3d_jax.data import s3dis, shapenet55
from cg3d_jax.eval import point_files, reports, scene_outputs, scene_regions, scenes, zeroshot
from cg3d_jax.predict import parse_labels


def read_scene(path) -> tuple[np.ndarray, np.ndarray | None]:
  """(xyz float32 (N, 3), rgb uint8 (N, 3) or None) from an S3DIS room folder / room .txt or a point file."""
  path = pathlib.Path(path)
  if path.is_dir():
    if not s3dis.is_room_folder(path):
      raise FileNotFoundError(f'{path} is a folder but not an S3DIS room (expected {path.name}/{path.name}.txt)')
    return s3dis.read_room_cloud(path)
  if not path.is_file():
    raise FileNotFoundError(f'scene {path} does not exist')
  if path.suffix == '.txt' and path.parent.name == path.stem:  # an S3DIS room file
    return s3dis.read_room_cloud(path)
  cloud = point_files.read_points(path)
  return cloud.xyz, cloud.rgb


def training_vocabulary(model: zeroshot.EvalModel) -> list[str]:
  """The class names the checkpoint's encoder was trained on (ShapeNet-55's, or the demo's procedural ones)."""
  data = model.config.get('data', {})
  if data.get('name', 'shapenet55_cg3d') != 'shapenet55_cg3d':
    raise ValueError(f"--vocabulary training: the checkpoint was trained on {data.get('name')!r}, whose class "
                     'names this tool does not know; pass --vocabulary "word1,word2,..."')
  manual = data.get('manual_dir')
  names_file = pathlib.Path(manual) / 'shape_names.txt' if manual else None
  names = shapenet55.read_shape_names(names_file if names_file and names_file.is_file() else None)
  return [n.replace('_', ' ') for n in names]


def resolve_vocabulary(spec: str, model: zeroshot.EvalModel) -> list[str]:
  if spec == 'training':
    return training_vocabulary(model)
  if spec == 's3dis':
    return list(s3dis.S3DIS_CLASSES)
  if spec == 'none':
    return []
  return parse_labels(spec)


def region_settings(args) -> scene_regions.RegionSettings:
  return scene_regions.RegionSettings(
      radius=args.radius, cover=args.cover, max_regions=args.max_regions, min_points=args.min_points,
      points_per_region=args.points_per_region, scene_up=args.scene_up, model_up=args.model_up,
      exclude_floor=args.exclude_floor, floor_band=args.floor_band, aggregate=args.aggregate, seed=args.seed)


def add_region_arguments(parser: argparse.ArgumentParser) -> None:
  """Region and scoring flags, shared with evaluate_scenes."""
  d = scene_regions.RegionSettings()
  q = scenes.QuerySettings()
  g = parser.add_argument_group('regions (see cg3d_jax/eval/scene_regions.py)')
  g.add_argument('--radius', type=float, default=d.radius, help='ball radius in scene units (metres for S3DIS)')
  g.add_argument('--cover', type=float, default=d.cover,
                 help='FPS adds centres until every point is within cover x radius of one')
  g.add_argument('--max_regions', type=int, default=d.max_regions)
  g.add_argument('--min_points', type=int, default=d.min_points, help='drop regions with fewer points')
  g.add_argument('--points_per_region', type=int, default=d.points_per_region,
                 help="points drawn per region (default: the checkpoint's data.num_stored_points); the encoder "
                      'takes its own num_points from them by FPS')
  g.add_argument('--scene_up', default=d.scene_up, choices=list('xyz'), help="the scene's up axis (S3DIS: z)")
  g.add_argument('--model_up', default=d.model_up, choices=list('xyz'),
                 help="the up axis of the encoder's training objects (ShapeNet: y)")
  g.add_argument('--exclude_floor', action='store_true', help='keep the floor band out of every region')
  g.add_argument('--floor_band', type=float, default=d.floor_band, help='floor band height above the floor level')
  g.add_argument('--aggregate', default=d.aggregate, choices=['mean', 'max'],
                 help='per-point score: distance-weighted mean or max over the regions holding the point')
  g.add_argument('--seed', type=int, default=d.seed)
  g.add_argument('--threshold', type=float, default=q.threshold, help='presence: best region margin (query probability minus the best other label) above this')
  g.add_argument('--top_regions', type=int, default=q.top_regions)
  g.add_argument('--batch_size', type=int, default=q.batch_size, help='regions per device call')
  g.add_argument('--templates', default=None,
                 help="template set name ('cg3d_zeroshot', 'cg3d', 'ulip', ...) or one template with {} (default: "
                      "the checkpoint's eval.templates)")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--checkpoint', required=True,
                      help='training workdir or checkpoint step folder, or an original CG3D / exported .pth')
  parser.add_argument('--clip_path', default=None, help='CLIP folder, if not the one recorded in the checkpoint')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  parser.add_argument('--num_points', type=int, default=1024,
                      help='encoder input size, only for a .pth that does not record its config')


def query_settings(args) -> scenes.QuerySettings:
  templates = (args.templates,) if args.templates and '{}' in args.templates else args.templates
  return scenes.QuerySettings(regions=region_settings(args), threshold=args.threshold, top_regions=args.top_regions,
                              batch_size=args.batch_size, templates=templates)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m cg3d_jax.query_scene', description=__doc__.split('\n')[0])
  add_checkpoint_arguments(parser)
  parser.add_argument('--scene', required=True, help='S3DIS room folder or room .txt, or a .ply .npy .off .txt file')
  parser.add_argument('--queries', required=True, help='comma-separated text queries, e.g. "chair,table,lamp"')
  parser.add_argument('--vocabulary', default='training',
                      help="labels the queries compete with in each region: 'training' (the checkpoint's classes), "
                           "'s3dis' (its 13 classes), 'none', or comma-separated words")
  parser.add_argument('--out', default=None, help='output folder (default: ./<scene name>_query)')
  parser.add_argument('--image_size', type=int, default=512, help='long side of the top-view PNGs')
  add_region_arguments(parser)
  return parser.parse_args(argv)


def format_summary(summary: dict) -> str:
  rows = [{'query': r['query'], 'present': 'yes' if r['present'] else 'no', 'score': r['score'],
           'regions won': r['regions_won'], 'files': r['files']['ply']} for r in summary['results']]
  return (f"{summary['scene']}: {summary['scene_points']} points, {summary['regions']} regions "
          f"(radius {summary['region_settings']['radius']}), labels {summary['labels']}\n"
          + reports.format_table(rows, ['query', 'present', 'score', 'regions won', 'files'], '{:.4f}'))


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  out = args.out or f'{pathlib.Path(args.scene.rstrip("/")).stem}_query'
  try:
    queries = parse_labels(args.queries)
    settings = query_settings(args)
    settings.regions.check()
    xyz, rgb = read_scene(args.scene)
    model = zeroshot.load_eval_model(args.checkpoint, clip_path=args.clip_path, step=args.step,
                                     num_points=args.num_points)
    vocabulary = resolve_vocabulary(args.vocabulary, model)
    result = scenes.query_scene(model, xyz, queries, vocabulary, settings=settings)
    summary = scene_outputs.write_query_outputs(out, xyz, rgb, result, scene=args.scene, up=args.scene_up,
                                                image_size=args.image_size)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_summary(summary))
  print(f'outputs in {os.path.abspath(out)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
