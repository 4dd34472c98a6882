"""A library of embedded shapes on disk, and exact search over it.

A library folder holds:
  library.json     which encoder embedded it (source, family, width, points encoded, channels), the points drawn
                   per shape, the stored dtype and the shard files in order;
  manifest.json    one entry per shape, in row order: its file (relative to the shapes folder), class (the parent
                   folder's name when the shapes are filed by class, else null), points read, thumbnail;
  embeddings/      the rows, one .npy shard per embedding chunk (L2-normalised, float16 or float32), so that an
                   interrupted or extended run keeps what is done; embeddings.npy, all rows in one array, is written
                   at the end of every run;
  thumbnails/      a small top view of each shape (PNG);
  clouds/          for rows embedded from a dataset split (no file to show), a preview of each shape's prepared
                   points (float16, y up, xyz and colours in [0, 1]), named in the manifest as `cloud`.
Every file is written under a temporary name and renamed: a library is never left half-written.

Search is exact: the queries' scores against every row by matrix product in chunks, each chunk cut to its best k by a
partial sort (np.argpartition), the survivors merged: O(N) memory per chunk and no full sort of N scores (OpenShape's
demo sorts all of them).
"""

import dataclasses
import json
import os
import pathlib

import numpy as np
from absl import logging

from cg3d_jax.atomic import atomic_write_bytes, atomic_write_npy
from cg3d_jax.data.openshape import RGB_DROP_VALUE
from cg3d_jax.errors import BadInputError, InputError

LIBRARY_FILE = 'library.json'
MANIFEST_FILE = 'manifest.json'
EMBEDDINGS_FILE = 'embeddings.npy'
SHARDS = 'embeddings'
THUMBNAILS = 'thumbnails'
CLOUDS = 'clouds'  # a split's rows have no file to show: a preview cloud of each
DTYPES = ('float16', 'float32')
SEARCH_CHUNK = 65536  # rows scored per matrix product


@dataclasses.dataclass
class ShapeLibrary:
  root: pathlib.Path
  encoder: dict  # what embedded it: source, family, embed_dim, num_points, in_channels
  points_per_shape: int
  dtype: str
  shards: list[str]  # shard file names under embeddings/, in row order
  manifest: list[dict]
  shapes: str | None = None  # the folder the manifest's files are relative to (where cg3d-embed read them)

  def __len__(self) -> int:
    return len(self.manifest)

  def embedded_by(self, loaded) -> bool:
    """Whether `loaded` (a trained.TrainedModel) is the encoder whose space the rows are in."""
    record = encoder_record(loaded)
    return all(self.encoder.get(k) == record[k] for k in ('source', 'embed_dim'))

  def embeddings(self) -> np.ndarray:
    """(N, D) rows in manifest order, as stored (float16 or float32)."""
    if not self.shards:
      return np.zeros((0, int(self.encoder['embed_dim'])), self.dtype)
    return np.concatenate([np.load(self.root / SHARDS / name, allow_pickle=False) for name in self.shards])

  def write_index(self) -> None:
    """library.json and manifest.json, atomically (the shards are written before they are listed here)."""
    record = {
      'encoder': self.encoder,
      'points_per_shape': self.points_per_shape,
      'dtype': self.dtype,
      'shards': self.shards,
      'count': len(self.manifest),
      'shapes': self.shapes,
    }
    atomic_write_bytes(self.root / MANIFEST_FILE, json.dumps(self.manifest, indent=1).encode())
    atomic_write_bytes(self.root / LIBRARY_FILE, json.dumps(record, indent=1).encode())

  def add_shard(self, rows: np.ndarray, entries: list[dict]) -> None:
    """Appends `rows` (normalised features) and their manifest entries: the shard first, then the index naming it."""
    if rows.shape[0] != len(entries):
      raise ValueError(f'add_shard: {rows.shape[0]} rows for {len(entries)} entries')
    name = f'{len(self.shards):06d}.npy'
    atomic_write_npy(self.root / SHARDS / name, rows.astype(self.dtype))
    self.shards.append(name)
    self.manifest.extend(entries)
    self.write_index()

  def consolidate(self) -> pathlib.Path:
    """embeddings.npy: every row in one array (what search and other tools read)."""
    path = self.root / EMBEDDINGS_FILE
    atomic_write_npy(path, self.embeddings())
    return path


def create_or_open(root, encoder: dict, *, points_per_shape: int, dtype: str) -> ShapeLibrary:
  """The library at `root`, created when absent; an existing one must come from the same encoder and settings."""
  if dtype not in DTYPES:
    raise InputError(f'--dtype {dtype!r}: expected one of {DTYPES}')
  root = pathlib.Path(root)
  if not (root / LIBRARY_FILE).exists():
    if root.exists() and any(root.iterdir()):
      raise InputError(f'--library {root}: a folder that is not a shape library (no {LIBRARY_FILE}); give a new one')
    return ShapeLibrary(root, encoder, points_per_shape, dtype, [], [])
  library = open_library(root)
  mismatched = [k for k in ('source', 'embed_dim', 'num_points', 'in_channels') if library.encoder.get(k) != encoder[k]]
  if mismatched:
    raise InputError(
      f'--library {root} was embedded with {library.encoder["source"]} ({_describe(library.encoder)}), not '
      f'{encoder["source"]} ({_describe(encoder)}): its rows live in another space; give a new folder'
    )
  if (library.points_per_shape, library.dtype) != (points_per_shape, dtype):
    raise InputError(
      f'--library {root} holds {library.points_per_shape} points per shape in {library.dtype}; extending it '
      f'with {points_per_shape} in {dtype} would mix two preparations'
    )
  return library


def _describe(encoder: dict) -> str:
  return f'{encoder.get("family")}, {encoder["embed_dim"]}-dimensional, {encoder["num_points"]} points'


def open_library(root) -> ShapeLibrary:
  """Reads a library's index (not its rows), checking that every shard it names is there."""
  root = pathlib.Path(root)
  path = root / LIBRARY_FILE
  try:
    record = json.loads(path.read_text())
    manifest = json.loads((root / MANIFEST_FILE).read_text())
  except FileNotFoundError as err:
    raise BadInputError(err.filename, 'missing: not a shape library (cg3d-embed writes one)') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise BadInputError(path, f'not a readable shape-library index ({err})') from None
  missing = [name for name in record['shards'] if not (root / SHARDS / name).exists()]
  if missing or record.get('count') != len(manifest):
    raise BadInputError(path, f'the index and its files disagree (missing shards {missing[:3]}); embed again')
  return ShapeLibrary(
    root,
    record['encoder'],
    record['points_per_shape'],
    record['dtype'],
    record['shards'],
    manifest,
    record.get('shapes'),
  )


def top_k(queries: np.ndarray, rows: np.ndarray, k: int, *, chunk: int = SEARCH_CHUNK) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k of each query (Q, D) over rows (N, D) by dot product: (scores (Q, k'), indices (Q, k')) best first,
  k' = min(k, N). Chunked matrix products, a partial sort per chunk (rows of equal score at the k-th place may come
  in any order)."""
  queries = np.atleast_2d(np.asarray(queries, np.float32))
  if k < 1:
    raise ValueError(f'top_k: k must be at least 1, got {k}')
  if queries.shape[1] != rows.shape[1]:
    raise InputError(f'queries of width {queries.shape[1]} against a library of width {rows.shape[1]}')
  k = min(k, rows.shape[0])
  best_scores = np.full((queries.shape[0], 0), -np.inf, np.float32)
  best_rows = np.zeros((queries.shape[0], 0), np.int64)
  for start in range(0, rows.shape[0], chunk):
    scores = queries @ np.asarray(rows[start : start + chunk], np.float32).T
    if scores.shape[1] > k:
      keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
      scores = np.take_along_axis(scores, keep, axis=1)
    else:
      keep = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    best_scores = np.concatenate([best_scores, scores], axis=1)
    best_rows = np.concatenate([best_rows, keep + start], axis=1)
    if best_scores.shape[1] > k:
      order = np.lexsort((best_rows, -best_scores), axis=1)[:, :k]
      best_scores, best_rows = np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)
  order = np.lexsort((best_rows, -best_scores), axis=1)
  return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)


SEED = 0  # the subset drawn from a shape with more points than points_per_shape


def encoder_record(loaded) -> dict:
  """What library.json records of the encoder (a trained.TrainedModel) that embeds a library: its rows' space."""
  return {
    'source': str(loaded.source),
    'family': loaded.config.get('family', 'CG3D'),
    'embed_dim': int(loaded.embed_dim),
    'num_points': int(loaded.num_points),
    'in_channels': int(loaded.in_channels),
  }


def _fixed_subset(points, count: int):
  """`count` rows of `points`, the same ones every time (a seeded choice, in their order)."""
  return points[np.sort(np.random.default_rng(SEED).permutation(points.shape[0])[:count])]


def drawn(points, count: int, source: str):
  """`count` rows of a prepared cloud: a fixed random subset of a larger one, a shorter one cycled (said in the log;
  farthest-point sampling then sees each point once)."""
  if points.shape[0] > count:
    return _fixed_subset(points, count)
  if points.shape[0] < count:
    logging.warning(
      '%s: %d points, fewer than --points_per_shape %d: repeated to fill them', source, len(points), count
    )
  return points[np.arange(count) % points.shape[0]]


def prepared(path: pathlib.Path, encoder, points_per_shape: int, *, swap_y_z: bool = False):
  """(points (S, C) as the encoder takes them, the cloud read) of one file: normalised as training does (centred, unit
  sphere), a coloured encoder's colours (the file's, or grey 0.4), drawn to points_per_shape; y and z swapped for an
  encoder that sees z-up (protocols.sees_z_up: the files are stored y-up)."""
  from cg3d_jax.evaluators import prediction

  cloud = prediction.read_checked_cloud(path)
  colours = prediction.colour_channels(encoder, cloud.rgb, cloud.xyz.shape[0], str(path))
  points = prediction.prepare_points(cloud.xyz, 1, str(path), colours, swap_y_z=swap_y_z)
  return drawn(points, points_per_shape, str(path)), cloud


def preview(points, count: int, up: str = 'y') -> np.ndarray:
  """(<= count, 6) float16 of prepared points (S, 3 or 6): a fixed random subset, y up (z and y swapped back when the
  encoder saw z-up), grey 0.4 where there are no colours."""
  points = np.asarray(points, np.float32)
  if points.shape[0] > count:
    points = _fixed_subset(points, count)
  xyz = points[:, [0, 2, 1]] if up == 'z' else points[:, :3]
  rgb = points[:, 3:6] if points.shape[1] >= 6 else np.full_like(xyz, RGB_DROP_VALUE)
  return np.concatenate([xyz, rgb], axis=1).astype(np.float16)


INDEX_FILE = 'index.faiss'  # the approximate index (faiss's own binary format, not a pickle)


class ApproximateIndex:
  """An HNSW graph over a library's rows (faiss-cpu, the `search` extra), for libraries where the exact scan is too
  slow or the rows too many for memory: a query visits about `search_depth` x log(N) rows instead of N. Its recall
  against the exact scan is measured, not assumed (bench/bench_search.py, tests/test_shape_library.py)."""

  def __init__(self, rows: np.ndarray, *, neighbours: int = 32, build_depth: int = 80):
    faiss = _faiss()
    rows = np.ascontiguousarray(rows, np.float32)
    self.index = faiss.IndexHNSWFlat(rows.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
    self.index.hnsw.efConstruction = build_depth
    self.index.add(rows)

  @classmethod
  def read(cls, path) -> 'ApproximateIndex':
    self = cls.__new__(cls)
    self.index = _faiss().read_index(str(path))
    return self

  def write(self, path) -> None:
    faiss = _faiss()
    atomic_write_bytes(path, faiss.serialize_index(self.index).tobytes())

  def __len__(self) -> int:
    return int(self.index.ntotal)

  def top_k(self, queries, k: int, *, search_depth: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of each query's approximate top k, best first (as top_k's)."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
    if queries.shape[1] != self.index.d:
      raise InputError(f'queries of width {queries.shape[1]} against a library of width {self.index.d}')
    self.index.hnsw.efSearch = max(search_depth, k)
    return self.index.search(queries, min(k, len(self)))


def _faiss():
  try:
    import faiss
  except ImportError:
    raise InputError('the approximate index needs faiss-cpu: pip install "cg3d-jax[search]"') from None
  return faiss


def approximate_index(library: 'ShapeLibrary') -> ApproximateIndex:
  """The library's approximate index, built on first use and kept beside its rows (rebuilt when rows were added)."""
  path = library.root / INDEX_FILE
  if path.exists():
    index = ApproximateIndex.read(path)
    if len(index) == len(library):
      return index
  index = ApproximateIndex(library.embeddings())
  index.write(path)
  return index


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
  """The mean share of each query's exact top k that `found` holds (recall@k of an approximate search)."""
  k = exact.shape[1]
  return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))


def shape_files(folder) -> list[pathlib.Path]:
  """Every point-cloud file under `folder` (any depth), sorted, by the extensions the readers take."""
  from cg3d_jax.data.formats.point_files import SUPPORTED_EXTENSIONS

  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise BadInputError(folder, 'is not a folder of point-cloud files (--shapes)')
  found = sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
  return [p for p in found if not any(part.startswith('.') for part in p.relative_to(folder).parts)]


def relative_name(path: pathlib.Path, folder: pathlib.Path) -> str:
  return os.fspath(path.relative_to(folder))


def query_vector(
  loaded, library, *, text=None, image=None, points=None, templates=None, class_features=None, clip_path=None
):
  """(D,) normalised query of one kind in the library's space, with `loaded` (a trained.TrainedModel)."""
  from cg3d_jax import trained
  from cg3d_jax.evaluators import prediction, protocols, zeroshot
  from cg3d_jax.models.cg3d import CG3D
  from cg3d_jax.scenes.queries import RegionEmbedder, local_mesh

  if text is not None and class_features:
    return prediction.label_features(class_features, [text], loaded.embed_dim)[0]
  if points is not None:
    swap = protocols.sees_z_up(loaded.released)
    cloud_points, _ = prepared(points, loaded.encoder, library.points_per_shape, swap_y_z=swap)
    # encoded as the library's rows were (a released file's evaluation may have set fewer points than its default)
    model = CG3D(encoder=loaded.encoder, clip=None, num_points=int(library.encoder['num_points']))
    return RegionEmbedder(model, loaded.encoder_vars, local_mesh(), 1)(cloud_points[None])[0]
  scoring = trained.with_clip(loaded, clip_path)
  if text is not None:
    chosen = templates or scoring.config.get('eval', {}).get('templates', 'cg3d_zeroshot')
    chosen = [chosen] if '{}' in chosen else chosen
    classifier = zeroshot.text_classifier(
      scoring.clip.model, scoring.clip_params, scoring.clip.tokenizer, [text], chosen
    )
    return np.asarray(classifier)[0]
  import jax

  from cg3d_jax.data.formats.readers import read_image

  pixels = read_image(image, scoring.clip.preprocess)[None]
  return np.asarray(jax.jit(scoring.model.image_features)(scoring.clip_params, pixels))[0]


def search(library, query, k: int, threshold: float | None = None, *, approximate: bool = False) -> list[dict]:
  """[{rank, score, file, class, thumbnail, cloud}] of the library's best `k` rows for `query` (D,), best first;
  exact, or through the approximate index."""
  if approximate:
    scores, rows = approximate_index(library).top_k(query[None], k)
  else:
    scores, rows = top_k(query[None], library.embeddings(), k)
  found = []
  for score, row in zip(scores[0], rows[0]):
    if threshold is not None and score < threshold:
      break
    entry = library.manifest[int(row)]
    thumbnail = entry.get('thumbnail')
    cloud = entry.get('cloud')
    found.append(
      {
        'rank': len(found) + 1,
        'score': float(score),
        'file': entry['file'],
        'class': entry.get('class'),
        'thumbnail': os.fspath(library.root / thumbnail) if thumbnail else None,
        'cloud': os.fspath(library.root / cloud) if cloud else None,
      }
    )
  return found
