"""Search an embedded shape library by text, image or shape: `python -m cg3d_jax.search --library DIR --checkpoint ...`.

  python -m cg3d_jax.search --library /tmp/my_library --checkpoint /runs/cg3d --text "a wooden chair" --k 10
  python -m cg3d_jax.search --library /tmp/my_library --checkpoint /runs/cg3d --points query.ply
  python -m cg3d_jax.search --library /tmp/lib --checkpoint uni3d/model.pt --text chair --class_features labels.npz

The query goes into the library's joint space with the checkpoint that embedded it (refused otherwise): a text through
the CLIP's text tower (--templates, default the checkpoint's; or its row of a --class_features file, for text towers
the package cannot run), an image through the CLIP's image tower (with the trained prompts), a point cloud through
the encoder prepared as cg3d-embed prepares the library's shapes. The top --k rows by cosine similarity (exact:
cg3d_jax/shape_library.top_k), at or above --min_score, are printed with their files, classes and thumbnails.
"""

import os

from absl import flags

from cg3d_jax import cli
from cg3d_jax.errors import InputError

CHECKPOINT = cli.checkpoint_flags()
CLIP = cli.clip_flags()
LIBRARY_DIR = cli.library_flag()
TEXT = flags.DEFINE_string('text', None, 'A text query.')
IMAGE = flags.DEFINE_string('image', None, 'An image query (a photo or render).')
POINTS = cli.points_flag()
K = flags.DEFINE_integer('k', 10, 'How many shapes to return.')
APPROXIMATE = flags.DEFINE_bool(
  'approximate',
  False,
  "Search the library's approximate index (HNSW, faiss-cpu; built on first use) instead of all rows.",
)
MIN_SCORE = flags.DEFINE_float('min_score', None, 'Only shapes whose cosine similarity reaches this.')
TEMPLATES = cli.templates_flag()
CLASS_FEATURES = cli.class_features_flag()
JSON = cli.json_flag()

_SHARED = ('checkpoint', 'step', 'clip_path', 'num_points', 'points', 'templates', 'class_features', 'library', 'json')
for _shared in (*_SHARED, 'verbose'):
  flags.declare_key_flag(_shared)


def main(argv):
  del argv
  from cg3d_jax import shape_library, trained
  from cg3d_jax.evaluators import reports

  library_dir = cli.require(LIBRARY_DIR, '--library /tmp/my_library')
  checkpoint = cli.require(CHECKPOINT.checkpoint, '--checkpoint /runs/cg3d (the one that embedded the library)')
  given = [
    name for name, value in (('--text', TEXT.value), ('--image', IMAGE.value), ('--points', POINTS.value)) if value
  ]
  if len(given) != 1:
    raise InputError(f'give one query: --text, --image or --points (got {", ".join(given) or "none"})')
  if POINTS.value and len(POINTS.value) != 1:
    raise InputError(f'--points: one query cloud, got {len(POINTS.value)}')
  if K.value < 1:
    raise InputError(f'--k {K.value}: at least 1')
  library = shape_library.open_library(library_dir)  # a bad library costs no model
  for path in [IMAGE.value, *(POINTS.value or [])]:
    if path and not os.path.isfile(path):
      raise InputError(f'{path}: does not exist or is not a file')
  loaded = trained.load_trained(checkpoint, step=CHECKPOINT.step.value, num_points=CLIP.num_points.value)
  if not library.embedded_by(loaded):
    raise InputError(
      f'--library {library_dir} was embedded with {library.encoder["source"]}, not {loaded.source}: '
      'a query must come from the encoder that embedded the rows'
    )
  query = shape_library.query_vector(
    loaded,
    library,
    text=TEXT.value,
    image=IMAGE.value,
    points=POINTS.value[0] if POINTS.value else None,
    templates=TEMPLATES.value,
    class_features=CLASS_FEATURES.value,
    clip_path=CLIP.clip_path.value,
  )
  found = shape_library.search(library, query, K.value, MIN_SCORE.value, approximate=APPROXIMATE.value)
  kind, value = given[0], TEXT.value or IMAGE.value or POINTS.value[0]
  print(f'{kind} {value!r}: the {len(found)} nearest of {len(library)} shapes in {library_dir}')
  print(reports.format_table(found, ['rank', 'score', 'file', 'class'], '{:.4f}'))
  if JSON.value:
    reports.write_json(JSON.value, {'query': {kind.lstrip('-'): value}, 'library': str(library_dir), 'results': found})


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
