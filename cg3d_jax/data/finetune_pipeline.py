"""The per-host training stream for supervised fine-tuning on a labelled split (ModelNet, ScanObjectNN).

Each example is prepared as Point-BERT's classification datasets do and as `pipeline.eval_local_batches` does for
evaluation: the stored cloud's first `num_stored_points` points (cycled when the cloud is shorter, which
farthest-point sampling ignores), centred and scaled to the unit sphere. Nothing random happens on the host: the
fine-tuning augmentation (FPS to ~1.2 N, a random N of those, per-cloud scale and translation) runs on device in the
train step, as the original runs it on the GPU after loading.

Determinism and resume follow `pipeline.pretrain_local_dataset`: epoch e's order is a shuffle seeded by
(seed, e), batches run across epoch boundaries, and the stream started at global step k yields exactly the batches
an uninterrupted one yields from step k. Multi-host: process p reads its contiguous slice of the split and builds
B / P examples per global step.
"""

from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cg3d_jax.data import builders, pipeline, transforms


def _builder(data_config, process_count: int):
  return builders.get_builder(data_config.name, data_dir=data_config.data_dir, manual_dir=data_config.manual_dir,
                              skip_bad=data_config.skip_bad, process_count=process_count)


def num_train_examples(data_config) -> int:
  builder = _builder(data_config, jax.process_count())
  split = data_config.train_split
  if split not in builder.info.splits:
    raise ValueError(f'config.data.train_split={split!r}: {builder.name} has splits {sorted(builder.info.splits)}')
  return builder.info.splits[split].num_examples


def steps_per_epoch(data_config, global_batch_size: int) -> int:
  """Full global batches per pass over the training split (the original drops the last partial batch)."""
  n = num_train_examples(data_config)
  if n < global_batch_size:
    raise ValueError(f'the training split {data_config.name}/{data_config.train_split} has {n} examples, fewer '
                     f'than one global batch of {global_batch_size} (config.train.batch_size)')
  return n // global_batch_size


def prepare_cloud(points: tf.Tensor, num_points: int) -> tf.Tensor:
  """First `num_points` points (cycled), centred and scaled to the unit sphere: (num_points, 3) float32."""
  points = tf.gather(points, tf.range(num_points) % tf.shape(points)[0])
  return tf.ensure_shape(transforms.tf_normalize_unit_sphere(points), (num_points, 3))


def train_local_dataset(data_config, *, global_batch_size: int, seed: int, start_step: int = 0,
                        process_index: int | None = None, process_count: int | None = None) -> tf.data.Dataset:
  """This process's infinite stream of host batches {'points' (b, S, 3), 'label' (b,)} from global step start_step."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} must divide evenly over {process_count} processes')
  local_batch = global_batch_size // process_count
  builder = _builder(data_config, process_count)
  n_total = num_train_examples(data_config)
  start, end = n_total * process_index // process_count, n_total * (process_index + 1) // process_count
  n_local = end - start
  if n_local < 1:
    raise ValueError(f'process {process_index} of {process_count} gets no example of '
                     f'{data_config.train_split} ({n_total} in all)')
  options = tf.data.Options()
  options.deterministic = True
  shard = builder.as_dataset(split=f'{data_config.train_split}[{start}:{end}]', shuffle_files=False,
                             read_config=tfds.ReadConfig(try_autocache=False)).with_options(options)
  num_points = data_config.num_stored_points

  def prepare(ex):
    return {'points': prepare_cloud(ex['points'], num_points), 'label': tf.cast(ex['label'], tf.int32)}

  # Prepared before the shuffle so that the buffer holds fixed-size clouds and no normals or names.
  shard = shard.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def epoch_stream(epoch):
    shuffle_seed = tf.constant(seed, tf.int64) * 1_000_003 + epoch
    return shard.shuffle(data_config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

  first = start_step * local_batch
  ds = tf.data.Dataset.range(first // n_local, np.iinfo(np.int64).max).flat_map(epoch_stream)
  ds = ds.skip(first % n_local)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(data_config.prefetch)


def make_train_iterator(data_config, *, global_batch_size: int, sharding, seed: int,
                        start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
  """Infinite iterator of global batches 'points' (B, S, 3) and 'label' (B,) int32, from global step start_step."""
  ds = train_local_dataset(data_config, global_batch_size=global_batch_size, seed=seed, start_step=start_step)
  return pipeline.to_global(ds.as_numpy_iterator(), sharding)
