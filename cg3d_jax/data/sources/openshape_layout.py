"""OpenShape's layout: training shapes with stored CLIP image and text features (and optionally renders), and the
evaluation sets in its and Uni3D's layouts (Objaverse-LVIS from OpenShape's lvis.json or Uni3D's lvis_testset.txt,
OpenShape's ModelNet40 and ScanObjectNN files). Files are read as they are, on the host, without TensorFlow
(data/openshape_stream.py, data/openshape_eval.py)."""

import dataclasses
import os

from cg3d_jax.data import host_batches, openshape_eval, openshape_stream
from cg3d_jax.data.sources.source import EvalData, TrainData
from cg3d_jax.errors import ConfigError

SETS = ('objaverse_lvis', 'modelnet40_openshape', 'scanobjectnn_openshape')
LAYOUTS = ('openshape', 'uni3d')


def train_data(config) -> TrainData:
  """config.data.train_split of the layout at config.data.manual_dir; with config.data.openshape.renders the
  examples carry renders for the CLIP image tower (the 'renders' recipe), else stored image features."""
  source = openshape_stream.open_train_source(config.data)
  if len(source.shapes) < config.train.batch_size:
    raise ConfigError(
      f'the training split {config.data.train_split} has {len(source.shapes)} shapes, fewer than '
      f'one global batch of {config.train.batch_size} (config.train.batch_size)'
    )
  channels = 6 if source.sample.use_color else 3
  if config.model.in_channels != channels:
    raise ConfigError(
      f'config.model.in_channels={config.model.in_channels} but the data gives '
      f'{channels} channels per point (config.data.openshape.use_color={source.sample.use_color})'
    )

  def batches(start_step: int, *, sharding, num_templates: int = 1, preprocess=None):
    del num_templates  # the examples carry their own text features
    stream = source if preprocess is None else dataclasses.replace(source, preprocess=preprocess)
    return host_batches.to_global(
      openshape_stream.train_local_batches(
        stream,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        start_step=start_step,
        workers=config.data.openshape.workers,
        prefetch=config.data.prefetch,
      ),
      sharding,
    )

  renders = bool(source.renders)
  what = (
    f'renders and stored {source.feature_dim}-d text features' if renders else f'stored {source.feature_dim}-d features'
  )
  return TrainData(
    recipe='renders' if renders else 'stored_features',
    describe=f'{len(source.shapes)} shapes with {what}',
    num_examples=len(source.shapes),
    steps_per_epoch=len(source.shapes) // config.train.batch_size,
    channels=channels,
    class_names=None,
    feature_dim=source.feature_dim,
    batches=batches,
  )


def open_eval_set(ev, default_root=None) -> openshape_eval.EvalSet:
  """The EvalSet config.eval names (dataset, layout, manual_dir, list_file); `default_root`: the training data's."""
  root = ev.manual_dir or default_root
  if not root:
    raise ConfigError(
      f'config.eval.manual_dir is not set: give the folder that holds the {ev.dataset} files '
      '(OpenShape: the folder with meta_data/; Uni3D: the objaverse_lvis folder)'
    )
  root = os.path.expanduser(root)
  if ev.dataset == 'objaverse_lvis':
    layout = ev.layout
    if layout == 'openshape':
      return openshape_eval.lvis_openshape(root)
    if layout == 'uni3d':
      return openshape_eval.lvis_uni3d(ev.list_file or os.path.join(root, 'lvis_testset.txt'), root)
    raise ConfigError(f'config.eval.layout={layout!r}: expected one of {LAYOUTS}')
  if ev.dataset == 'modelnet40_openshape':
    return openshape_eval.modelnet40_openshape(root)
  if ev.dataset == 'scanobjectnn_openshape':
    return openshape_eval.scanobjectnn_openshape(root)
  raise ConfigError(f'config.eval.dataset={ev.dataset!r}: expected one of {SETS}')


def eval_data(ev, default_root=None) -> EvalData:
  """The set config.eval names, as global batches ('points', 'label', 'mask') of config.eval.use_color channels."""
  evalset = open_eval_set(ev, default_root)

  def batches(sharding, preprocess=None, seed: int = 0):
    del preprocess  # the layout's sets carry no renders
    return host_batches.to_global(
      openshape_stream.eval_local_batches(
        evalset,
        batch_size=ev.batch_size,
        num_points=ev.num_stored_points,
        use_color=ev.use_color,
        y_up=ev.y_up,
        seed=seed,
        max_examples=ev.max_examples,
      ),
      sharding,
    )

  return EvalData(
    name=evalset.name,
    source=evalset.source,
    class_names=evalset.class_names,
    channels=6 if ev.use_color else 3,
    batches=batches,
    size=len(evalset),
    class_features=evalset.class_features,
    record={
      'layout': ev.layout if ev.dataset == 'objaverse_lvis' else 'openshape',
      'y_up_swapped': evalset.y_up if ev.y_up is None else bool(ev.y_up),
      'use_color': ev.use_color,
      'num_stored_points': ev.num_stored_points,
      'source': evalset.source,
    },
  )
