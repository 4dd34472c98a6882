r"""Zero-shot prediction on your own point cloud (and, optionally, photos of candidates).

  python -m cg3d_jax.predict --checkpoint /runs/cg3d --points owl.ply --labels "owl,chicken,penguin" \
      [--images a.jpg,b.jpg,c.jpg] [--templates ulip] [--json out.json]

Points: PLY (ASCII or binary; meshes are sampled on their surface), NPY, OFF (surface-sampled) or TXT/XYZ/CSV
(see cg3d_jax/data/formats/point_files.py). How the cloud is prepared and the labels ranked:
cg3d_jax/evaluators/prediction.py.
"""

import os

from absl import flags

from cg3d_jax import cli
from cg3d_jax.errors import BadInputError, InputError

CHECKPOINT = cli.checkpoint_flags()
CLIP = cli.clip_flags()
POINTS = cli.points_flag()
LABELS = flags.DEFINE_string('labels', None, 'Comma-separated candidate labels, e.g. "owl,chicken,penguin".')
IMAGES = flags.DEFINE_list('images', [], 'Comma-separated image files to rank against the cloud.')
TEMPLATES = cli.templates_flag()
CLASS_FEATURES = cli.class_features_flag()
NO_NORMALIZE_TEXT = flags.DEFINE_bool(
  'no_normalize_text', False, "The original CG3D quirk: don't L2-normalise text features."
)
JSON = cli.json_flag()
COLUMNS = flags.DEFINE_string(
  'columns',
  None,
  'What the columns of a .npy or text cloud are, for files whose columns '
  '4-6 (7-9) could be normals or colours: groups xyz, normals, rgb (3 columns each) and '
  "skip (1 column), e.g. 'xyz,normals' or 'xyz,skip,rgb'.",
)


# Flags defined once in cli (or scenes.flags) that this command takes: listed by its --help.
_SHARED = ('checkpoint', 'step', 'clip_path', 'num_points', 'points', 'templates', 'class_features', 'json')
for _shared in (*_SHARED, 'verbose'):
  flags.declare_key_flag(_shared)


def format_result(result: dict) -> str:
  from cg3d_jax.evaluators import reports

  lines = [
    f'{result["points"]}: {result["num_points_read"]} points'
    f'{" sampled on the mesh" if result["from_mesh"] else ""}, normalised, '
    f'{result["num_points_encoded"]} by farthest-point sampling',
    reports.format_table(result['labels'], ['rank', 'name', 'probability', 'similarity'], '{:.4f}'),
  ]
  if 'images' in result:
    lines += [
      '',
      'images ranked against the cloud:',
      reports.format_table(result['images'], ['rank', 'name', 'probability', 'similarity'], '{:.4f}'),
    ]
  return '\n'.join(lines)


def main(argv):
  del argv
  checkpoint = cli.require(CHECKPOINT.checkpoint, '--checkpoint /runs/cg3d')
  points = cli.require(POINTS, '--points owl.ply')
  if len(points) != 1:
    raise InputError(f'--points: predict takes one point-cloud file, got {len(points)}: {points}')
  points = points[0]
  features_file = CLASS_FEATURES.value
  labels = None  # with --class_features and no --labels: every name in the file
  if LABELS.value is not None or not features_file:
    labels = cli.parse_labels(cli.require(LABELS, '--labels "owl,chicken,penguin"'))
  templates = TEMPLATES.value or 'cg3d_zeroshot'
  templates = [templates] if '{}' in templates else templates
  for path in [points, *IMAGES.value]:  # cheap checks before the model loads
    if not os.path.isfile(path):
      raise BadInputError(path, 'does not exist or is not a file')
  from cg3d_jax import trained
  from cg3d_jax.evaluators import prediction, reports

  points = prediction.read_checked_cloud(points, COLUMNS.value)  # a bad cloud costs no model
  loaded = trained.load_trained(checkpoint, step=CHECKPOINT.step.value, num_points=CLIP.num_points.value)
  classifier = None
  if features_file:  # the labels' features as numbers: no text tower (images still need the CLIP)
    labels = labels or prediction.file_labels(features_file)
    classifier = prediction.label_features(features_file, labels, loaded.embed_dim)
  if features_file and not IMAGES.value:
    model = trained.without_clip(loaded)
  else:
    model = trained.with_clip(loaded, CLIP.clip_path.value)
  result = prediction.predict(
    model,
    points,
    labels,
    IMAGES.value,
    templates=templates,
    normalize_text=not NO_NORMALIZE_TEXT.value,
    classifier=classifier,
  )
  print(format_result(result))
  if JSON.value:
    reports.write_json(JSON.value, result)


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
