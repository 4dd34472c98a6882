"""The per-host input pipelines: this process's shard of a split -> host batches -> global jax.Arrays.

Three streams: pretraining triplets (cloud, one rendered view, caption template), labelled clouds for supervised
fine-tuning, and one in-order pass over an evaluation split (padded, with a mask).

Determinism. Every random choice for an example (view, resampling, augmentations, caption template) comes from
stateless RNG seeded by (seed, epoch, global example index), and each epoch's shuffle order by (seed, epoch). The
stream is epoch after epoch with batches running across epoch boundaries, so local batch k covers stream positions
[k*b, (k+1)*b): a pipeline started at step k (epoch = k*b // n, skip k*b % n) yields exactly the batches an
uninterrupted one yields from step k. The resume state is the global step alone.

Multi-host. With P processes and global batch B, process p reads examples [n*p//P, n*(p+1)//P) of the split
(disjoint, covering it), builds B/P examples per step and `jax.make_array_from_process_local_data` assembles the
global batch. FPS to the model's N points and the random scale/translate run on device in the step
(see device_transforms.scale_and_translate and bench/README_data.md for why).

Fine-tuning and evaluation prepare a cloud as Point-BERT's classification datasets do (`prepare_cloud`): the stored
cloud's first `num_stored_points` points (cycled when the cloud is shorter, which farthest-point sampling ignores),
centred and scaled to the unit sphere. Nothing random happens on the host for fine-tuning: its augmentation (FPS to
~1.2 N, a random N of those, per-cloud scale and translation) runs on device in the train step, as the original
runs it on the GPU after loading.
"""

import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cg3d_jax.data import builders, host_batches, tf_transforms
from cg3d_jax.errors import ConfigError

class_names = builders.class_names

# TensorFlow only feeds the host pipeline: it must not claim accelerator memory that JAX needs (a no-op with
# tensorflow-cpu; too late, and harmless, if TF already ran ops in this process).
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass
_EPOCH_STRIDE = 1 << 32  # example seeds are (seed, epoch * stride + index): unique while index < 2**32


def _shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  return n * process_index // process_count, n * (process_index + 1) // process_count


def _read(builder, split: str, start: int, end: int) -> tf.data.Dataset:
  """Examples [start, end) of a split, in the prepared files' fixed order, with the views left PNG-encoded."""
  decoders = {'views': tfds.decode.SkipDecoding()} if 'views' in builder.info.features else None
  ds = builder.as_dataset(
    split=f'{split}[{start}:{end}]',
    shuffle_files=False,
    decoders=decoders,
    read_config=tfds.ReadConfig(try_autocache=False),
  )
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _without_autotune_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  """The stream with tf.data's autotuning model off: its thread sleeps through the iterator's cancellation, so
  destroying an iterator (the end of every training run and evaluation pass) waited out the thread's current
  optimisation period, which grows with the iterator's age: up to 30 s after a 300-step demo run, 10 s in one of two
  teardowns of a 30 s-old pretraining stream and never without the model (tensorflow-cpu 2.21, 2026-12-06, AMD
  EPYC, 2 cores). Parallel maps then run as many calls as the host has cores (tf.data's default, at most 16) and
  the prefetch buffers keep their own sizes."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def example_seeds(seed: int, epoch, index, num: int) -> tf.Tensor:
  """`num` independent stateless seeds (num, 2) for one example of one epoch."""
  key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64) * _EPOCH_STRIDE + tf.cast(index, tf.int64)])
  return tf.random.experimental.stateless_split(key, num=num)


def preprocess_image(png: tf.Tensor, image_size: int, mean, std, resample: str = 'bicubic') -> tf.Tensor:
  """CLIP's preprocessing: RGB, shortest side to image_size (bicubic for OpenAI CLIP, bilinear for SLIP), centre
  crop, /255, (x - mean) / std."""
  image = tf.cast(tf.io.decode_png(png, channels=3), tf.float32)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  short = tf.minimum(h, w)
  # torchvision's Resize(int): the short side becomes image_size, the long side int(image_size * long / short).
  new_h = tf.where(h == short, image_size, (image_size * h) // short)
  new_w = tf.where(w == short, image_size, (image_size * w) // short)
  image = tf.cond(
    tf.logical_and(new_h == h, new_w == w),
    lambda: image,
    lambda: tf.clip_by_value(
      tf.round(tf.image.resize(image, tf.stack([new_h, new_w]), resample, antialias=True)), 0.0, 255.0
    ),
  )
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2), tf.int32)
  image = image[top : top + image_size, left : left + image_size]
  image = tf.ensure_shape(image, (image_size, image_size, 3)) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _builder(data_config, process_count: int):
  return builders.get_builder(
    data_config.name,
    data_dir=data_config.data_dir,
    manual_dir=data_config.manual_dir,
    skip_bad=data_config.skip_bad,
    process_count=process_count,
  )


def prepare_cloud(points: tf.Tensor, num_points: int) -> tf.Tensor:
  """First `num_points` points (cycled), centred and scaled to the unit sphere: (num_points, 3) float32."""
  points = tf.gather(points, tf.range(num_points) % tf.shape(points)[0])
  return tf.ensure_shape(tf_transforms.tf_normalize_unit_sphere(points), (num_points, 3))


def pretrain_local_dataset(
  data_config,
  *,
  global_batch_size: int,
  image_size: int,
  image_mean,
  image_std,
  image_resample: str = 'bicubic',
  num_templates: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tf.data.Dataset:
  """This process's infinite stream of host batches (dicts of tensors), starting at global step `start_step`."""
  process_index, process_count = host_batches.process(process_index, process_count)
  local_batch = host_batches.local_batch_size(global_batch_size, process_count)
  builder = _builder(data_config, process_count)
  split = data_config.train_split
  stored_views = builder.info.features['views'].shape[0]
  num_views = data_config.num_views
  if not 1 <= num_views <= stored_views:
    raise ValueError(f'config.data.num_views={num_views} but {builder.name} stores {stored_views} views per object')
  n_total = builder.info.splits[split].num_examples
  start, end = _shard_bounds(n_total, process_index, process_count)
  n_local = end - start
  if n_local < 1:
    raise ValueError(f'process {process_index} of {process_count} gets no example of {split} ({n_total} in all)')
  shard = _read(builder, split, start, end)
  num_points = data_config.num_stored_points
  prob = float(data_config.augment_prob) if data_config.augment else 0.0

  def pick_view(epoch, position, ex):
    index = start + position
    seeds = example_seeds(seed, epoch, index, 4)
    view = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=num_views, dtype=tf.int32)
    # Only the drawn view travels through the shuffle buffer: it is a fifth of the bytes.
    return {
      'points': ex['points'],
      'png': ex['views'][view],
      'label': tf.cast(ex['label'], tf.int32),
      'seeds': seeds[1:],
    }

  def epoch_stream(epoch):
    ds = shard.enumerate().map(lambda position, ex: pick_view(epoch, position, ex))
    shuffle_seed = tf.constant(seed, tf.int64) * 1_000_003 + epoch
    return ds.shuffle(data_config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

  def finish(ex):
    seeds = ex['seeds']
    points = tf_transforms.tf_normalize_unit_sphere(ex['points'])
    points = tf_transforms.tf_resample(seeds[0], points, num_points)
    if prob > 0:
      points = tf_transforms.tf_augment(seeds[1], points, prob)
    template = tf.random.stateless_uniform([], seeds[2], minval=0, maxval=num_templates, dtype=tf.int32)
    return {
      'points': tf.ensure_shape(points, (num_points, 3)),
      'image': preprocess_image(ex['png'], image_size, image_mean, image_std, image_resample),
      'label': ex['label'],
      'template_idx': template,
    }

  first = start_step * local_batch
  ds = tf.data.Dataset.range(first // n_local, np.iinfo(np.int64).max).flat_map(epoch_stream)
  ds = ds.skip(first % n_local)
  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  return _without_autotune_thread(ds.prefetch(data_config.prefetch))


def make_pretrain_iterator(
  data_config,
  *,
  global_batch_size,
  sharding,
  image_size,
  image_mean,
  image_std,
  image_resample: str = 'bicubic',
  num_templates,
  seed,
  start_step=0,
  process_index=None,
  process_count=None,
) -> Iterator[dict[str, jax.Array]]:
  """Infinite iterator of global batches: 'points' (B, S, 3) augmented, 'image' (B, H, W, 3) normalised,
  'label' (B,) int32, 'template_idx' (B,) int32; the first batch is global step `start_step`'s.

  process_index / process_count default to JAX's; pass them explicitly only to simulate processes with
  `pretrain_local_dataset` (global arrays need the real process layout)."""
  ds = pretrain_local_dataset(
    data_config,
    global_batch_size=global_batch_size,
    image_size=image_size,
    image_mean=image_mean,
    image_std=image_std,
    image_resample=image_resample,
    num_templates=num_templates,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  )
  return host_batches.to_global(ds.as_numpy_iterator(), sharding)


def num_examples(data_config, split: str | None = None) -> int:
  split = split or data_config.train_split
  builder = _builder(data_config, jax.process_count())
  if split not in builder.info.splits:
    raise ConfigError(f'config.data.train_split={split!r}: {builder.name} has splits {sorted(builder.info.splits)}')
  return builder.info.splits[split].num_examples


def steps_per_epoch(data_config, global_batch_size: int) -> int:
  """Full global batches per pass over the training split (for per-epoch schedules; batches run across epochs)."""
  n = num_examples(data_config)
  if n < global_batch_size:
    raise ConfigError(
      f'the training split {data_config.name}/{data_config.train_split} has {n} examples, fewer '
      f'than one global batch of {global_batch_size} (config.train.batch_size)'
    )
  return n // global_batch_size


def labelled_local_dataset(
  data_config,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tf.data.Dataset:
  """This process's infinite stream of fine-tuning host batches {'points' (b, S, 3), 'label' (b,)} from global step
  start_step; order and resume as the pretraining stream's."""
  process_index, process_count = host_batches.process(process_index, process_count)
  local_batch = host_batches.local_batch_size(global_batch_size, process_count)
  builder = _builder(data_config, process_count)
  n_total = num_examples(data_config)
  start, end = _shard_bounds(n_total, process_index, process_count)
  n_local = end - start
  if n_local < 1:
    raise ValueError(
      f'process {process_index} of {process_count} gets no example of {data_config.train_split} ({n_total} in all)'
    )
  num_points = data_config.num_stored_points

  def prepare(ex):
    return {'points': prepare_cloud(ex['points'], num_points), 'label': tf.cast(ex['label'], tf.int32)}

  # Prepared before the shuffle so that the buffer holds fixed-size clouds and no normals or names.
  shard = _read(builder, data_config.train_split, start, end).map(
    prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )

  def epoch_stream(epoch):
    shuffle_seed = tf.constant(seed, tf.int64) * 1_000_003 + epoch
    return shard.shuffle(data_config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

  first = start_step * local_batch
  ds = tf.data.Dataset.range(first // n_local, np.iinfo(np.int64).max).flat_map(epoch_stream)
  ds = ds.skip(first % n_local)
  ds = ds.batch(local_batch, drop_remainder=True)
  return _without_autotune_thread(ds.prefetch(data_config.prefetch))


def make_labelled_iterator(
  data_config, *, global_batch_size: int, sharding, seed: int, start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
  """Infinite iterator of fine-tuning global batches 'points' (B, S, 3) and 'label' (B,) int32."""
  ds = labelled_local_dataset(data_config, global_batch_size=global_batch_size, seed=seed, start_step=start_step)
  return host_batches.to_global(ds.as_numpy_iterator(), sharding)


def eval_local_batches(
  name: str,
  *,
  data_dir,
  batch_size: int,
  num_points_stored: int,
  split: str = 'test',
  manual_dir=None,
  skip_bad: bool = False,
  max_examples: int | None = None,
  image_size: int | None = None,
  image_mean=None,
  image_std=None,
  image_resample: str = 'bicubic',
  view_index: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict]:
  """This process's host batches (NumPy) for one in-order pass over a split, padded, with a bool 'mask'.

  Global step t covers examples [t*B, (t+1)*B); process p holds rows [t*B + p*b, t*B + (p+1)*b) of it. Clouds
  keep their first `num_points_stored` points (cycled when shorter, which farthest-point sampling ignores), then
  are centred and scaled to the unit sphere, as Point-BERT's evaluation datasets do.
  """
  process_index, process_count = host_batches.process(process_index, process_count)
  local_batch = host_batches.local_batch_size(batch_size, process_count)
  builder = builders.get_builder(
    name, data_dir=data_dir, manual_dir=manual_dir, skip_bad=skip_bad, process_count=process_count
  )
  if split not in builder.info.splits:
    raise ConfigError(f'config.eval.split={split!r}: {builder.name} has splits {sorted(builder.info.splits)}')
  n = builder.info.splits[split].num_examples
  n = n if max_examples is None else min(n, max_examples)
  with_image = 'views' in builder.info.features and image_size is not None

  def prepare(ex):
    out = {'points': prepare_cloud(ex['points'], num_points_stored), 'label': tf.cast(ex['label'], tf.int32)}
    if with_image:
      out['image'] = preprocess_image(ex['views'][view_index], image_size, image_mean, image_std, image_resample)
    return out

  ds = _read(builder, split, 0, n).map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = _without_autotune_thread(ds.batch(local_batch).shard(process_count, process_index).prefetch(2))
  batches = ds.as_numpy_iterator()
  for _ in range(math.ceil(n / batch_size)):
    batch = next(batches, None)
    if batch is None:  # this process's part of the last global batch is all padding
      batch = {
        k: np.zeros((0,) + tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype) for k, spec in ds.element_spec.items()
      }
    yield host_batches.padded(batch, local_batch)


def make_eval_iterator(
  name: str, *, data_dir, batch_size: int, sharding, num_points_stored: int, **kwargs
) -> Iterator[dict[str, jax.Array]]:
  """One in-order pass over a split as global batches: 'points', 'label', 'mask' (and 'image' for ShapeNet-55
  when image_size is given); keyword arguments as eval_local_batches."""
  return host_batches.to_global(
    eval_local_batches(name, data_dir=data_dir, batch_size=batch_size, num_points_stored=num_points_stored, **kwargs),
    sharding,
  )
