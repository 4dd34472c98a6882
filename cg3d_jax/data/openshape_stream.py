"""Host batches from OpenShape's layout: the training stream (OpenShape's per-sample targets, precomputed CLIP
features) and one in-order pass over an evaluation set (data/openshape_eval.py's EvalSet), per process of a pod.

Not TFDS: an Objaverse shape is one pickled-dict file of ~0.5 MB whose targets are drawn per sample from lists of
texts and views. Re-encoding 800k of them as TFRecords would double the storage for no gain, so the files are read
as they are (through the restricted unpickler) by a thread pool; file reads and NumPy's array work release the GIL.

Order and determinism. Epoch e visits the split in the permutation drawn from (seed, e); the stream is epoch after
epoch, and global step t covers stream positions [t*B, (t+1)*B). Process p of P builds rows [p*b, (p+1)*b) of every
global batch (b = B / P), so the global batch is the same for any process count, and a resumed run (start_step t)
yields exactly the batches an uninterrupted one yields from step t. Every random draw of an example (points,
augmentation, which text, which view) comes from a generator seeded by (seed, epoch, shape index).

A shape that cannot be read stops the run with its path: a silent skip would change the batches and their order.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from cg3d_jax.data import host_batches, openshape, openshape_eval
from cg3d_jax.errors import BadInputError, ConfigError

TRAIN_SPLITS = {
  'train_all': 'meta_data/split/train_all.json',
  'train_no_lvis': 'meta_data/split/train_no_lvis.json',
  'train_shapenet_only': 'meta_data/split/ablation/train_shapenet_only.json',
}
_PERMUTATION_TAG = 0x5EED  # keeps the epoch permutation's stream apart from every example's


def _workers(workers: int | None) -> int:
  return workers or min(16, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class TrainSource:
  """A training split of the layout, its GPT-4 text flags and the per-sample rules; `feature_dim` is D of the
  stored CLIP features (read off the first shape). With `renders` (the rendered_images folder) and `preprocess`
  (the CLIP's image preprocessing), examples carry a random render as 'image' instead of a stored image feature."""

  shapes: list
  flags: dict
  sample: openshape.SampleConfig
  feature_dim: int
  renders: str | None = None
  preprocess: Any = None


def sample_config(data_config) -> openshape.SampleConfig:
  o = data_config.openshape
  return openshape.SampleConfig(
    num_points=data_config.num_stored_points,
    y_up=o.y_up,
    normalize=True,
    augment=data_config.augment,
    random_z_rotate=o.random_z_rotate,
    use_color=o.use_color,
    rgb_random_drop_prob=o.rgb_random_drop_prob,
    text_source=tuple(o.text_source),
    use_text_filtering=o.use_text_filtering,
    text_version='prompt_avg' if o.use_prompt_engineering else 'original',
  )


def open_train_source(data_config) -> TrainSource:
  """The split named by config.data.train_split (a key of TRAIN_SPLITS or a path under the layout root)."""
  if not data_config.manual_dir:
    raise ConfigError(
      "config.data.manual_dir is not set: give the folder that holds OpenShape's meta_data/ "
      '(e.g. --config.data.manual_dir=/data/openshape)'
    )
  root = os.path.expanduser(data_config.manual_dir)
  split = TRAIN_SPLITS.get(data_config.train_split, data_config.train_split)
  if not os.path.isfile(os.path.join(root, split)):
    raise ConfigError(
      f'config.data.train_split={data_config.train_split!r}: {os.path.join(root, split)} is not a file; expected '
      f'one of {sorted(TRAIN_SPLITS)} or a split file under config.data.manual_dir'
    )
  shapes = openshape.read_split(os.path.join(root, split), root)
  if not shapes:
    raise BadInputError(os.path.join(root, split), 'lists no shape')
  config = sample_config(data_config)
  flags = {}
  if config.use_text_filtering and 'text' in config.text_source:
    path = os.path.join(root, data_config.openshape.gpt4_filtering)
    if not os.path.isfile(path):
      raise ConfigError(
        f'config.data.openshape.gpt4_filtering={data_config.openshape.gpt4_filtering!r}: {path} is not a file '
        "(OpenShape's meta_data/gpt4_filtering.json; or config.data.openshape.use_text_filtering=False)"
      )
    flags = openshape.read_text_filter(path)
  first = openshape.read_shape(shapes[0].path, objaverse=shapes[0].dataset == openshape.OBJAVERSE)
  renders = data_config.openshape.get('renders')
  if renders:
    renders = os.path.join(root, os.path.expanduser(renders))
    if not os.path.isdir(renders):
      raise ConfigError(
        f'config.data.openshape.renders={data_config.openshape.renders!r}: {renders} is not a '
        "folder (OpenShape's rendered_images/, one folder of colors_0..11.png per shape)"
      )
  return TrainSource(
    shapes=shapes,
    flags=flags,
    sample=config,
    feature_dim=int(np.shape(first['image_feat'])[-1]),
    renders=renders or None,
  )


def _example(source: TrainSource, seed: int, epoch: int, index: int) -> dict:
  shape = source.shapes[index]
  rng = np.random.default_rng((seed, epoch, index))
  data = openshape.read_shape(shape.path, objaverse=shape.dataset == openshape.OBJAVERSE)
  example = openshape.make_example(shape, data, source.sample, rng, train=True, flags=source.flags)
  for key in ('text_feat', 'image_feat'):
    if example[key].shape != (source.feature_dim,):
      raise BadInputError(
        shape.path,
        f'{key} has {example[key].shape[0]} values, expected {source.feature_dim} '
        'as the first shape of the split (features of one CLIP)',
      )
  del example['text']
  if source.renders:  # CG3D's method on Objaverse: a random render through the prompt-tuned image tower
    view = int(rng.integers(openshape.RENDER_VIEWS))
    example['image'] = openshape.read_render(openshape.render_path(source.renders, shape.id, view), source.preprocess)
    del example['image_feat']
  return example


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _prefetched(jobs: Iterator[list], workers: int, depth: int) -> Iterator[list]:
  """Runs each item's calls on a thread pool, `depth` batches ahead, and yields their results in order."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for calls in jobs:
      pending.append([pool.submit(c) for c in calls])
      if len(pending) > depth:
        yield [f.result() for f in pending.popleft()]
    while pending:
      yield [f.result() for f in pending.popleft()]


def train_local_batches(
  source: TrainSource,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  workers: int | None = None,
  prefetch: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's infinite stream of host batches from global step `start_step`: 'points' (b, S, 6 | 3),
  'text_feat' (b, D) (zeros where 'has_text' is False), 'has_text' (b,) bool, 'image_feat' (b, D) (with renders:
  'image' (b, H, W, 3), one of the shape's 12 renders preprocessed for the CLIP)."""
  process_index, process_count = host_batches.process(process_index, process_count)
  local = host_batches.local_batch_size(global_batch_size, process_count)
  n = len(source.shapes)
  permutation = functools.lru_cache(maxsize=2)(
    lambda epoch: np.random.default_rng((seed, epoch, _PERMUTATION_TAG)).permutation(n)
  )

  def jobs():
    step = start_step
    while True:
      positions = step * global_batch_size + process_index * local + np.arange(local)
      calls = []
      for position in positions:
        epoch, offset = divmod(int(position), n)
        calls.append(functools.partial(_example, source, seed, epoch, int(permutation(epoch)[offset])))
      yield calls
      step += 1

  for examples in _prefetched(jobs(), _workers(workers), prefetch):
    yield _stack(examples)


def eval_local_batches(
  evalset: openshape_eval.EvalSet,
  *,
  batch_size: int,
  num_points: int,
  use_color: bool,
  y_up: bool | None = None,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  workers: int | None = None,
  max_examples: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One in-order pass: global step t covers examples [t*B, (t+1)*B), process p holds rows [p*b, (p+1)*b) of it,
  padded, with a bool 'mask'. Example i's point draw is seeded by (seed, i), so a pass is reproducible.
  y_up: None = the layout's own convention (evalset.y_up)."""
  process_index, process_count = host_batches.process(process_index, process_count)
  local = host_batches.local_batch_size(batch_size, process_count)
  n = len(evalset) if max_examples is None else min(len(evalset), max_examples)
  swap = evalset.y_up if y_up is None else y_up
  channels = 6 if use_color else 3

  def load(i):
    xyz, rgb = evalset.cloud(i)
    points = openshape_eval.eval_points(
      xyz,
      rgb,
      num_points,
      np.random.default_rng((seed, i)),
      y_up=swap,
      use_color=use_color,
      replace=evalset.replace,
      path=f'{evalset.source} item {i}',
    )
    return {'points': points, 'label': np.int32(evalset.labels[i])}

  def jobs():
    for step in range(math.ceil(n / batch_size)):
      first = step * batch_size + process_index * local
      yield [functools.partial(load, i) for i in range(first, min(first + local, n))]

  for examples in _prefetched(jobs(), _workers(workers), 2):
    batch = (
      _stack(examples)
      if examples
      else {'points': np.zeros((0, num_points, channels), np.float32), 'label': np.zeros((0,), np.int32)}
    )
    yield host_batches.padded(batch, local)
