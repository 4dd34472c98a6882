"""Embed a library of shapes: `python -m cg3d_jax.embed --checkpoint CKPT --shapes FOLDER --library OUT`.

  python -m cg3d_jax.embed --checkpoint /runs/cg3d --shapes /data/my_shapes --library /tmp/my_library
  python -m cg3d_jax.embed --checkpoint model.pt --config zeroshot_objaverse_lvis --library /tmp/lvis_library
      (with --config.eval.manual_dir=/data/openshape, and any other --config.eval.* setting)

Two kinds of input, one library format:
  --shapes   every point-cloud file under a folder (.ply .npy .off .txt .xyz .csv, any depth; a file's parent folder is
             its class when the shapes are filed by class), normalised as training does (centred, unit sphere; a
             coloured encoder gets the file's colours or grey 0.4), drawn to --points_per_shape points (a fixed
             random subset, or cycled when shorter: one compiled shape);
  --config   the split a zero-shot config's `eval` names, read as `evaluate` reads it (a TFDS dataset: ModelNet40,
             ScanObjectNN, ShapeNet-55; or OpenShape's layout: Objaverse-LVIS, OpenShape's ModelNet40 and ScanObjectNN
             files), with the same --config.eval.* settings; rows are named `<set>/<split>/<index>` and the library
             keeps a small preview cloud of each (there is no file to show).
A released family's encoder sees clouds as its own evaluation feeds them (OpenShape's: y and z swapped).

Farthest-point sampling on device picks the encoder's points and the encoder embeds them, the batch sharded over every
device of every host (`launch/local_multihost.sh` or a pod: each host reads only its rows of every global batch, as
evaluation does; process 0 writes). The rows (L2-normalised) go to the library folder in chunks with a manifest and
a top-view thumbnail per shape (cg3d_jax/shape_library.py): an interrupted run keeps every finished chunk, and a later
run embeds only what the library does not hold yet. A library is extended only by the encoder that started it. Any
checkpoint the commands read works (a training run, a CG3D .pth, a released ULIP / OpenShape / Uni3D file).
"""

import pathlib
import time

from absl import flags, logging

from cg3d_jax import cli, distributed
from cg3d_jax.errors import BadInputError, InputError

CHECKPOINT = cli.checkpoint_flags()
CLIP = cli.clip_flags()
SHAPES = flags.DEFINE_string('shapes', None, 'The folder of point-cloud files to embed (searched at any depth).')
LIBRARY = cli.library_flag()
POINTS_PER_SHAPE = flags.DEFINE_integer(
  'points_per_shape',
  None,
  "Points drawn per shape before farthest-point sampling (default: 2x the encoder's; with --config, "
  'config.eval.num_stored_points).',
)
BATCH_SIZE = cli.batch_size_flag()
CHUNK = flags.DEFINE_integer('chunk', 1024, 'Shapes per stored shard: what an interruption can lose.')
DTYPE = flags.DEFINE_enum('dtype', 'float16', ['float16', 'float32'], 'Stored precision of the rows.')
THUMBNAIL = flags.DEFINE_integer('thumbnail', 96, 'Thumbnail size in pixels (0: none).')
SKIP_BAD = cli.skip_bad_flag()

for _shared in ('checkpoint', 'step', 'num_points', 'batch_size', 'skip_bad', 'library', 'config', 'verbose'):
  flags.declare_key_flag(_shared)
flags.adopt_module_key_flags(distributed)

PREVIEW_POINTS = 2048  # the preview cloud a split's row keeps (float16) for the page's 3D view
GREY = 160  # a thumbnail's colour where the encoder takes no colours


def thumbnail(points, size: int, up: str = 'y'):
  """A top view of prepared points (S, 3 or 6; colours in [0, 1]) down the `up` axis, in their colours or grey."""
  import numpy as np

  from cg3d_jax.scenes import outputs

  points = np.asarray(points, np.float32)
  if points.shape[1] >= 6:
    rgb = np.clip(points[:, 3:6] * 255.0, 0, 255).astype(np.uint8)
  else:
    rgb = np.full((len(points), 3), GREY, np.uint8)
  return outputs.top_view(points[:, :3], rgb, up=up, size=size)


def _encoder(loaded, batch_size: int):
  """A zeroshot.PointEncoder of `loaded` over every device of every host."""
  import jax
  import numpy as np

  from cg3d_jax import sharding
  from cg3d_jax.evaluators import zeroshot
  from cg3d_jax.models.cg3d import CG3D

  model = CG3D(encoder=loaded.encoder, clip=None, num_points=loaded.num_points)
  host_vars = jax.tree.map(np.asarray, loaded.encoder_vars)  # read onto one device: other hosts take host values
  return zeroshot.PointEncoder(model, host_vars, sharding.make_mesh({'data': -1, 'fsdp': 1}), batch_size)


def _folder_batches(files, loaded, per_shape: int, batch_size: int, skip_bad: bool, swap_y_z: bool):
  """This host's rows of each global batch of `files`: 'points' (b, S, C), 'index' into files, 'count' (points
  read), 'mask' (a readable file), 'bad' (a file skipped by skip_bad, named in this host's log)."""
  import numpy as np

  from cg3d_jax import shape_library
  from cg3d_jax.data import host_batches

  process, processes = host_batches.process()
  local = host_batches.local_batch_size(batch_size, processes)
  for start in range(0, len(files), batch_size):
    batch = {
      'points': np.zeros((local, per_shape, loaded.in_channels), np.float32),
      'index': np.full(local, -1, np.int32),
      'count': np.zeros(local, np.int32),
      'mask': np.zeros(local, bool),
      'bad': np.zeros(local, bool),
    }
    mine = range(start + process * local, min(start + (process + 1) * local, len(files)))
    for row, i in enumerate(mine):
      batch['index'][row] = i
      try:
        points, cloud = shape_library.prepared(files[i], loaded.encoder, per_shape, swap_y_z=swap_y_z)
      except BadInputError as err:
        if not skip_bad:
          raise
        logging.warning('skip_bad: skipping %s (%s)', files[i], err)
        batch['bad'][row] = True
        continue
      batch['points'][row], batch['count'][row], batch['mask'][row] = points, cloud.xyz.shape[0], True
    yield batch


def _split_batches(data, encoder):
  """The split's global batches with each row's 'index' in the split (the same on every host)."""
  import numpy as np

  for step, batch in enumerate(data.batches(encoder.sharding)):
    yield {**batch, 'index': step * encoder.batch_size + np.arange(encoder.batch_size, dtype=np.int32)}


def _fill(
  library,
  batches,
  encoder,
  entry_of,
  *,
  held=frozenset(),
  chunk: int,
  thumbnail_size: int,
  up: str,
  previews: bool = False,
) -> tuple[int, int]:
  """Embeds the rows of global `batches` whose index is not `held` into `library`, shard by shard: (added, skipped).

  Every host takes part in each gather (the arrays are global); process 0 alone writes. `entry_of(index, row)` ->
  the row's manifest entry (row: its host fields). One batch is in flight while the next is read."""
  import jax
  import numpy as np

  from cg3d_jax import shape_library
  from cg3d_jax.atomic import atomic_write_npy, atomic_write_png
  from cg3d_jax.evaluators.evaluator import to_host

  writer = jax.process_index() == 0
  held = np.fromiter(held, np.int64, len(held))  # once: np.isin against a list would rebuild it every batch
  rows, entries, added, skipped, pending = [], [], 0, 0, None
  next_row = len(library)

  def finish(features, points, fields, keep):
    nonlocal next_row
    features = to_host(features)
    for j in np.flatnonzero(keep):
      entry = entry_of(int(fields['index'][j]), {k: v[j] for k, v in fields.items()})
      name = f'{next_row:07d}'
      if thumbnail_size:
        entry['thumbnail'] = f'{shape_library.THUMBNAILS}/{name}.png'
        if writer:
          atomic_write_png(library.root / entry['thumbnail'], thumbnail(points[j], thumbnail_size, up))
      if previews:
        entry['cloud'] = f'{shape_library.CLOUDS}/{name}.npy'
        if writer:
          atomic_write_npy(library.root / entry['cloud'], shape_library.preview(points[j], PREVIEW_POINTS, up))
      rows.append(features[j])
      entries.append(entry)
      next_row += 1

  for batch in batches:
    fields = {k: to_host(v) for k, v in batch.items() if k != 'points'}
    skipped += int(fields.pop('bad', np.zeros(0, bool)).sum())
    keep = fields['mask'].astype(bool) & ~np.isin(fields['index'], held)
    if not keep.any():
      continue
    features = encoder(batch['points'])  # dispatched; fetched after the next batch is read
    points = to_host(batch['points']) if thumbnail_size or previews else None
    if pending is not None:
      finish(*pending)
    pending = (features, points, fields, keep)
    if len(rows) >= chunk:
      added += _flush(library, rows, entries, writer)
  if pending is not None:
    finish(*pending)
  added += _flush(library, rows, entries, writer)
  return added, skipped


def _flush(library, rows: list, entries: list, writer: bool) -> int:
  """The rows so far as one shard (process 0 writes it; every host counts it); the lists are emptied."""
  import numpy as np

  count = len(entries)
  if count:
    if writer:
      library.add_shard(np.stack(rows), list(entries))
    else:
      library.manifest.extend(entries)
    logging.info('embedded %d more shapes into %s', count, library.root)
  rows.clear()
  entries.clear()
  return count


def _in_step(name: str) -> None:
  """Every host waits here for the others (nothing to wait for in a one-process run)."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _opened(library_dir, loaded, per_shape: int, dtype: str):
  """The library, read by every host before process 0 writes anything into it."""
  from cg3d_jax import shape_library

  library = shape_library.create_or_open(
    library_dir, shape_library.encoder_record(loaded), points_per_shape=per_shape, dtype=dtype
  )
  _in_step('cg3d-embed: library read')
  return library


def _finished(library, started: float, added: int, skipped: int) -> dict:
  import jax

  seconds = time.perf_counter() - started
  if jax.process_index() == 0:
    library.root.mkdir(parents=True, exist_ok=True)
    if not library.shards:
      library.write_index()
    library.consolidate()
  _in_step('cg3d-embed: library written')
  return {'added': added, 'skipped': skipped, 'total': len(library), 'seconds': seconds}


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
  """Embeds the files under `shapes` that `library_dir` does not hold yet; returns {'added', 'skipped', 'total',
  'seconds'}."""
  from cg3d_jax import shape_library, trained
  from cg3d_jax.data import host_batches
  from cg3d_jax.evaluators import protocols

  shapes = pathlib.Path(shapes)
  files = shape_library.shape_files(shapes)  # a bad folder costs no model
  if not files:
    raise BadInputError(shapes, 'holds no point-cloud files (.ply .npy .off .txt .xyz .csv)')
  loaded = trained.load_trained(checkpoint, step=step, num_points=num_points)
  per_shape = points_per_shape or 2 * loaded.num_points
  if per_shape < loaded.num_points:
    raise InputError(f'--points_per_shape {per_shape} is fewer than the {loaded.num_points} points the encoder takes')
  library = _opened(library_dir, loaded, per_shape, dtype)
  library.shapes = library.shapes or str(shapes.resolve())
  held = {entry['file'] for entry in library.manifest}
  todo = [p for p in files if shape_library.relative_name(p, shapes) not in held]
  logging.info('%s: %d shapes, %d already in %s, %d to embed', shapes, len(files), len(held), library.root, len(todo))
  swap = protocols.sees_z_up(loaded.released)
  encoder = _encoder(loaded, batch_size)

  def entry_of(index, row):
    path = todo[index]
    cls = path.parent.name if path.parent != shapes else None
    return {'file': shape_library.relative_name(path, shapes), 'class': cls, 'points': int(row['count'])}

  started = time.perf_counter()
  local = _folder_batches(todo, loaded, per_shape, encoder.batch_size, skip_bad, swap)
  batches = host_batches.to_global(local, encoder.sharding)
  added, skipped = _fill(
    library, batches, encoder, entry_of, chunk=chunk, thumbnail_size=thumbnail_size, up='z' if swap else 'y'
  )
  return _finished(library, started, added, skipped)


def embed_split(
  checkpoint, config, library_dir, *, step=None, batch_size=64, chunk=1024, dtype='float16', thumbnail_size=96
) -> dict:
  """Embeds the rows of the split `config.eval` names that `library_dir` does not hold yet (as `embed`)."""
  import jax

  from cg3d_jax import trained
  from cg3d_jax.data.sources import source
  from cg3d_jax.evaluators import protocols
  from cg3d_jax.training import config_checks

  config_checks.check(config)  # every setting, before any data or model
  loaded = trained.load_trained(checkpoint, step=step, num_points=config.model.num_points)
  ev = protocols.for_embedding(config.eval, loaded.released, loaded.in_channels)
  trained.encode_as_evaluated(loaded, ev)
  encoder = _encoder(loaded, batch_size)
  with ev.unlocked():
    ev.batch_size = encoder.batch_size
  data = source.eval_source(ev, process_count=jax.process_count())
  library = _opened(library_dir, loaded, ev.num_stored_points, dtype)
  prefix = f'{data.name}/{ev.split}/'
  held = {int(e['file'][len(prefix) :]) for e in library.manifest if e['file'].startswith(prefix)}
  logging.info('%s (%s): %d rows already in %s', data.name, ev.split, len(held), library.root)

  def entry_of(index, row):
    label = int(row['label'])
    return {'file': f'{prefix}{index:06d}', 'class': data.class_names[label], 'points': int(ev.num_stored_points)}

  started = time.perf_counter()
  added, skipped = _fill(
    library,
    _split_batches(data, encoder),
    encoder,
    entry_of,
    held=frozenset(held),
    chunk=chunk,
    thumbnail_size=thumbnail_size,
    up='z' if data.record.get('y_up_swapped') else 'y',
    previews=True,
  )
  return _finished(library, started, added, skipped)


def main(argv):
  del argv
  checkpoint = cli.require(CHECKPOINT.checkpoint, '--checkpoint /runs/cg3d')
  library = cli.require(LIBRARY, '--library /tmp/my_library')
  config = cli.CONFIG.value
  if (SHAPES.value is None) == (config is None):
    raise InputError(
      'give one of --shapes FOLDER (point-cloud files) or --config zeroshot_<dataset> (the split its eval names)'
    )
  for name, flag, low in (('--batch_size', BATCH_SIZE, 1), ('--chunk', CHUNK, 1), ('--thumbnail', THUMBNAIL, 0)):
    if flag.value < low:
      raise InputError(f'{name} {flag.value}: at least {low}')
  distributed.initialize()
  common = dict(
    step=CHECKPOINT.step.value,
    batch_size=BATCH_SIZE.value,
    chunk=CHUNK.value,
    dtype=DTYPE.value,
    thumbnail_size=THUMBNAIL.value,
  )
  if config is not None:
    if 'task' not in config.eval:
      raise InputError('this config has no eval split: use --config zeroshot_<dataset>')
    if POINTS_PER_SHAPE.value is not None:
      with config.unlocked():
        config.eval.num_stored_points = POINTS_PER_SHAPE.value
    done = embed_split(checkpoint, config, library, **common)
  else:
    done = embed(
      checkpoint,
      SHAPES.value,
      library,
      points_per_shape=POINTS_PER_SHAPE.value,
      skip_bad=SKIP_BAD.value,
      num_points=CLIP.num_points.value,
      **common,
    )
  rate = done['added'] / done['seconds'] if done['seconds'] > 0 and done['added'] else 0.0
  skipped = f', {done["skipped"]} skipped (named above)' if done['skipped'] else ''
  print(f'embedded {done["added"]} shapes ({rate:.1f} shapes/s){skipped}; {library} holds {done["total"]}')


run = cli.entry_point(main)  # what `python -m` and the console script call


if __name__ == '__main__':
  run()
