"""CG3D's layout: the TFDS datasets (ShapeNet-55 with renders for pretraining, ModelNet and ScanObjectNN for
evaluation), read through the per-host tf.data pipelines (data/pipeline.py). This module imports TensorFlow."""

import functools

import jax
import numpy as np

from cg3d_jax.data import builders, host_batches, pipeline
from cg3d_jax.data.openshape import RGB_DROP_VALUE
from cg3d_jax.data.sources.source import EvalData, TrainData
from cg3d_jax.errors import ConfigError


def train_data(config) -> TrainData:
  """config.data's TFDS dataset (prepared on first use from config.data.manual_dir), with its class names."""
  if config.model.in_channels != 3:
    init = config.model.get('init')
    whose = f' (the encoder of config.model.init={init!r})' if init else ''
    raise ConfigError(
      f'config.model.in_channels={config.model.in_channels}{whose}: '
      f"the TFDS datasets ({config.data.name}) carry xyz only; coloured encoders train on OpenShape's layout "
      '(--config pretrain_openshape)'
    )
  builder = builders.get_builder(
    config.data.name,
    data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
    skip_bad=config.data.skip_bad,
    process_count=jax.process_count(),
  )
  class_names = builders.class_names(builder)

  def batches(start_step: int, *, sharding, num_templates: int = 1, preprocess=None):
    return pipeline.make_pretrain_iterator(
      config.data,
      global_batch_size=config.train.batch_size,
      sharding=sharding,
      num_templates=num_templates,
      seed=config.seed,
      start_step=start_step,
      **(preprocess.pipeline_settings() if preprocess is not None else {}),
    )

  return TrainData(
    recipe='cg3d',
    describe=f'{len(class_names)} classes',
    num_examples=pipeline.num_examples(config.data),
    steps_per_epoch=pipeline.steps_per_epoch(config.data, config.train.batch_size),
    channels=3,
    class_names=class_names,
    feature_dim=None,
    batches=batches,
  )


def _split(
  name,
  *,
  data_dir,
  manual_dir,
  skip_bad,
  split,
  batch_size,
  num_stored_points,
  max_examples,
  fields,
  process_count,
  view_index=0,
  record=None,
  y_up=False,
  use_color=False,
) -> EvalData:
  builder = builders.checked_builder(
    name, data_dir=data_dir, manual_dir=manual_dir, skip_bad=skip_bad, process_count=process_count, fields=fields
  )

  def batches(sharding, preprocess=None):
    images = {} if preprocess is None else dict(**preprocess.pipeline_settings(), view_index=view_index)
    local = pipeline.eval_local_batches(
      name,
      data_dir=data_dir,
      manual_dir=manual_dir,
      batch_size=batch_size,
      num_points_stored=num_stored_points,
      split=split,
      max_examples=max_examples,
      skip_bad=skip_bad,
      **images,
    )
    return host_batches.to_global(_oriented(local, y_up=y_up, use_color=use_color), sharding)

  def prepared():
    return builders.get_builder(
      name, data_dir=data_dir, manual_dir=manual_dir, skip_bad=skip_bad, process_count=process_count, fields=fields
    )

  return EvalData(
    name=name,
    source=name,
    class_names=builders.class_names(builder),
    channels=6 if use_color else 3,
    batches=batches,
    record={**(record or {}), 'y_up_swapped': y_up, 'use_color': use_color},
    read_view=_view_reader(prepared, split, view_index),
  )


def validation_data(config) -> EvalData:
  """config.eval.split of the training dataset (its first config.eval.max_examples objects)."""
  return _split(
    config.data.name,
    data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
    skip_bad=config.data.skip_bad,
    split=config.eval.split,
    batch_size=config.eval.batch_size,
    num_stored_points=config.data.num_stored_points,
    max_examples=config.eval.max_examples,
    fields=builders.DATA_FIELDS,
    process_count=jax.process_count(),
  )


def eval_data(ev, process_count: int = 1) -> EvalData:
  """The split config.eval names; unknown or unprepared datasets fail here, before any model loads."""
  return _split(
    ev.dataset,
    data_dir=ev.data_dir,
    manual_dir=ev.manual_dir,
    skip_bad=ev.skip_bad,
    split=ev.split,
    batch_size=ev.batch_size,
    num_stored_points=ev.num_stored_points,
    max_examples=ev.max_examples,
    fields=builders.EVAL_FIELDS,
    process_count=process_count,
    view_index=ev.get('view_index', 0),
    record={'num_stored_points': ev.num_stored_points, 'split': ev.split},
    y_up=bool(ev.get('y_up')),
    use_color=bool(ev.get('use_color', False)),
  )


def _oriented(local, *, y_up: bool, use_color: bool):
  """The batches as a released family's protocol feeds them: y and z swapped (sets stored y-up, an encoder that
  sees z-up: OpenShape's), and for a coloured encoder OpenShape's grey 0.4 as the colour these sets do not store."""
  for batch in local:
    points = batch['points']
    if y_up:
      points = points[..., [0, 2, 1]]
    if use_color:
      points = np.concatenate([points, np.full(points.shape, RGB_DROP_VALUE, points.dtype)], axis=-1)
    yield {**batch, 'points': points}


def _view_reader(prepared, split: str, view_index: int):
  """read_view: one object's render straight from the prepared TFDS files (cached); prepares on first use."""
  import tensorflow_datasets as tfds

  prepared = functools.cache(prepared)

  @functools.cache
  def fetch(index: int) -> np.ndarray:
    example = next(
      iter(tfds.as_numpy(prepared().as_dataset(split=f'{split}[{index}:{index + 1}]', shuffle_files=False)))
    )
    views = example['views']
    if not 0 <= view_index < len(views):
      raise ValueError(f'object {index} of {split} has {len(views)} views; view_index={view_index} is out of range')
    return np.asarray(views[view_index])

  return fetch
