"""Embed a library of shapes: `python -m cg3d_jax.embed --checkpoint CKPT --shapes FOLDER --library OUT`.

  python -m cg3d_jax.embed --checkpoint /runs/cg3d --shapes /data/my_shapes --library /tmp/my_library

Every point-cloud file under --shapes (.ply .npy .off .txt .xyz .csv, any depth; a file's parent folder is its class
when the shapes are filed by class) is read, normalised as training does (centred, unit sphere; a coloured encoder
gets the file's colours or grey 0.4), drawn to --points_per_shape points (a fixed random subset, or cycled when
shorter: one compiled shape), then farthest-point sampling on device picks the encoder's points and the encoder
embeds it, batch-sharded over every local device. The rows (L2-normalised) go to the library folder in chunks with a
manifest and a top-view thumbnail per shape (cg3d_jax/shape_library.py): an interrupted run keeps every finished
chunk, and a later run over the same folder embeds only the files the library does not hold yet. A library is
extended only by the encoder that started it. Any checkpoint the commands read works (a training run, a CG3D
.pth, a released ULIP / OpenShape / Uni3D file).
"""

import pathlib
import time

from absl import flags, logging

from cg3d_jax import cli
from cg3d_jax.errors import BadInputError, InputError

CHECKPOINT = cli.checkpoint_flags()
CLIP = cli.clip_flags()
SHAPES = flags.DEFINE_string('shapes', None, 'The folder of point-cloud files to embed (searched at any depth).')
LIBRARY = cli.library_flag()
POINTS_PER_SHAPE = flags.DEFINE_integer(
  'points_per_shape', None, "Points drawn per shape before farthest-point sampling (default: 2x the encoder's)."
)
BATCH_SIZE = cli.batch_size_flag()
CHUNK = flags.DEFINE_integer('chunk', 1024, 'Shapes per stored shard: what an interruption can lose.')
DTYPE = flags.DEFINE_enum('dtype', 'float16', ['float16', 'float32'], 'Stored precision of the rows.')
THUMBNAIL = flags.DEFINE_integer('thumbnail', 96, 'Thumbnail size in pixels (0: none).')
SKIP_BAD = cli.skip_bad_flag()

for _shared in ('checkpoint', 'step', 'num_points', 'batch_size', 'skip_bad', 'library', 'verbose'):
  flags.declare_key_flag(_shared)


def thumbnail(cloud, size: int):
  """A top view (y up, as the shapes are stored) of the cloud, in its colours or grey."""
  import numpy as np

  from cg3d_jax.scenes import outputs

  rgb = cloud.rgb if cloud.rgb is not None else np.full(cloud.xyz.shape, 160, np.uint8)
  if rgb.dtype != np.uint8:
    rgb = np.clip(np.asarray(rgb) * 255.0, 0, 255).astype(np.uint8)
  return outputs.top_view(cloud.xyz, rgb, up='y', size=size)


def embed(
  checkpoint,
  shapes,
  library_dir,
  *,
  step=None,
  points_per_shape=None,
  batch_size=64,
  chunk=1024,
  dtype='float16',
  thumbnail_size=96,
  skip_bad=False,
  num_points=1024,
) -> dict:
  """Embeds what `shapes` holds and `library_dir` does not yet; returns {'added', 'skipped', 'total', 'seconds'}."""
  import numpy as np

  from cg3d_jax import shape_library, trained
  from cg3d_jax.atomic import atomic_write_png
  from cg3d_jax.models.cg3d import CG3D
  from cg3d_jax.scenes.queries import RegionEmbedder, local_mesh

  shapes = pathlib.Path(shapes)
  files = shape_library.shape_files(shapes)  # a bad folder costs no model
  if not files:
    raise BadInputError(shapes, 'holds no point-cloud files (.ply .npy .off .txt .xyz .csv)')
  loaded = trained.load_trained(checkpoint, step=step, num_points=num_points)
  per_shape = points_per_shape or 2 * loaded.num_points
  if per_shape < loaded.num_points:
    raise InputError(f'--points_per_shape {per_shape} is fewer than the {loaded.num_points} points the encoder takes')
  library = shape_library.create_or_open(
    library_dir, shape_library.encoder_record(loaded), points_per_shape=per_shape, dtype=dtype
  )
  library.shapes = library.shapes or str(shapes.resolve())
  held = {entry['file'] for entry in library.manifest}
  todo = [p for p in files if shape_library.relative_name(p, shapes) not in held]
  logging.info('%s: %d shapes, %d already in %s, %d to embed', shapes, len(files), len(held), library.root, len(todo))
  model = CG3D(encoder=loaded.encoder, clip=None, num_points=loaded.num_points)
  embedder = RegionEmbedder(model, loaded.encoder_vars, local_mesh(), batch_size)
  started, skipped, added = time.perf_counter(), 0, 0
  for start in range(0, len(todo), chunk):
    points, entries = [], []
    for path in todo[start : start + chunk]:
      try:
        cloud_points, cloud = shape_library.prepared(path, loaded.encoder, per_shape)
      except BadInputError as err:
        if not skip_bad:
          raise
        skipped += 1
        logging.warning('skip_bad: skipping %s (%s)', path, err)
        continue
      name = shape_library.relative_name(path, shapes)
      entry = {'file': name, 'class': path.parent.name if path.parent != shapes else None}
      entry['points'] = int(cloud.xyz.shape[0])
      if thumbnail_size:
        entry['thumbnail'] = f'{shape_library.THUMBNAILS}/{len(library) + len(entries):07d}.png'
        atomic_write_png(library.root / entry['thumbnail'], thumbnail(cloud, thumbnail_size))
      points.append(cloud_points)
      entries.append(entry)
    if entries:
      library.add_shard(embedder(np.stack(points)), entries)
      added += len(entries)
      logging.info('embedded %d / %d', added, len(todo))
  seconds = time.perf_counter() - started
  library.root.mkdir(parents=True, exist_ok=True)
  if not library.shards:
    library.write_index()
  library.consolidate()
  return {'added': added, 'skipped': skipped, 'total': len(library), 'seconds': seconds}


def main(argv):
  del argv
  checkpoint = cli.require(CHECKPOINT.checkpoint, '--checkpoint /runs/cg3d')
  shapes = cli.require(SHAPES, '--shapes /data/my_shapes')
  library = cli.require(LIBRARY, '--library /tmp/my_library')
  for name, flag, low in (('--batch_size', BATCH_SIZE, 1), ('--chunk', CHUNK, 1), ('--thumbnail', THUMBNAIL, 0)):
    if flag.value < low:
      raise InputError(f'{name} {flag.value}: at least {low}')
  done = embed(
    checkpoint,
    shapes,
    library,
    step=CHECKPOINT.step.value,
    points_per_shape=POINTS_PER_SHAPE.value,
    batch_size=BATCH_SIZE.value,
    chunk=CHUNK.value,
    dtype=DTYPE.value,
    thumbnail_size=THUMBNAIL.value,
    skip_bad=SKIP_BAD.value,
    num_points=CLIP.num_points.value,
  )
  rate = done['added'] / done['seconds'] if done['seconds'] > 0 and done['added'] else 0.0
  skipped = f', {done["skipped"]} skipped (named above)' if done['skipped'] else ''
  print(f'embedded {done["added"]} shapes ({rate:.1f} shapes/s){skipped}; {library} holds {done["total"]}')


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
