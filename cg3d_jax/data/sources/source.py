"""A data source, one interface whatever the layout: the training data a pretraining recipe reads and the
evaluation split an evaluator scores, each picked by the config.

  TrainData  what the pretraining loop needs of its data: the recipe the data calls for, class names (or none when
             the examples carry their own text targets), sizes, and the per-host stream of global batches;
  EvalData   one evaluation split: its classes, points per example, stored class features if any, what results.json
             records of it, and a fresh pass over its global batches.

One module per layout builds both: tfds_layout.py (CG3D's TFDS datasets: ShapeNet-55, ModelNet, ScanObjectNN) and
openshape_layout.py (OpenShape's files, and Uni3D's Objaverse-LVIS list). A new layout is one new module and a line
in `train_source` / `eval_source`. TensorFlow is imported only when a TFDS source is opened.
"""

import dataclasses
from typing import Callable, Iterator

import numpy as np

OPENSHAPE = 'openshape'  # config.data.name of OpenShape's layout (stored CLIP features)


@dataclasses.dataclass
class TrainData:
  recipe: str  # the pretraining recipe the data calls for: 'cg3d', 'stored_features' or 'renders'
  describe: str  # for the log line
  num_examples: int
  steps_per_epoch: int  # full global batches of config.train.batch_size per pass
  channels: int  # per point: 3 (xyz) or 6 (xyz + rgb)
  class_names: list[str] | None  # None: the examples carry their own text targets
  feature_dim: int | None  # the stored CLIP features' width, when the data stores them
  # (start_step, global_batch_size, sharding, seed, num_templates, preprocess) -> global batches from start_step
  batches: Callable[..., Iterator[dict]]


@dataclasses.dataclass
class EvalData:
  name: str  # what reports call it
  source: str  # what was read (a dataset name, a file or folder), for messages
  class_names: list[str]
  channels: int
  batches: Callable[..., Iterator[dict]]  # (sharding, preprocess=None) -> one pass of global batches
  record: dict  # the data settings results.json records beside the scores
  size: int | None = None  # examples, when known before reading
  class_features: np.ndarray | None = None  # the layout's stored class-name text features (precomputed prompts)
  read_view: Callable[[int], np.ndarray] | None = None  # example index -> its stored render (retrieval's grid)


def is_openshape_eval(dataset: str) -> bool:
  from cg3d_jax.data.sources import openshape_layout

  return dataset in openshape_layout.SETS


def train_source(config) -> TrainData:
  """The training data config.data names, checked before any model is built."""
  if config.data.name == OPENSHAPE:
    from cg3d_jax.data.sources import openshape_layout

    return openshape_layout.train_data(config)
  from cg3d_jax.data.sources import tfds_layout  # TFDS, with TensorFlow: OpenShape's layout trains without it

  return tfds_layout.train_data(config)


def validation_source(config) -> EvalData:
  """The split the pretraining loop validates on (config.eval.split of the training data, or a layout set)."""
  if config.data.name == OPENSHAPE:
    from cg3d_jax.data.sources import openshape_layout

    return openshape_layout.eval_data(config.eval, default_root=config.data.manual_dir)
  from cg3d_jax.data.sources import tfds_layout

  return tfds_layout.validation_data(config)


def eval_source(eval_config, process_count: int = 1) -> EvalData:
  """The split config.eval names for the evaluate command; bad data settings fail here, before any model loads."""
  if is_openshape_eval(eval_config.dataset):
    from cg3d_jax.data.sources import openshape_layout

    return openshape_layout.eval_data(eval_config)
  from cg3d_jax.data.sources import tfds_layout

  return tfds_layout.eval_data(eval_config, process_count=process_count)
