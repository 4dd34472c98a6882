"""TFDS builder `modelnet` (configs `modelnet40`, `modelnet10`): PointNet++'s resampled ModelNet, xyz and normals.

Manual folder: `modelnet40_normal_resampled/` itself, or a folder holding it, with the official files
  <class>/<class>_NNNN.txt                  10,000 lines `x,y,z,nx,ny,nz`
  modelnet40_shape_names.txt, modelnet40_train.txt, modelnet40_test.txt   (and modelnet10_*)
Labels follow the shape-names file's line order. The class of `flower_pot_0001` is `flower_pot`.

  tfds build cg3d_jax/data/modelnet.py --config modelnet40 --manual_dir /data --data_dir ~/tensorflow_datasets
"""

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from cg3d_jax import assets
from cg3d_jax.data import builder_base
from cg3d_jax.data.formats import readers

FOLDER = 'modelnet40_normal_resampled'


def package_shape_names(config_name: str) -> list[str]:
  return [n.strip() for n in assets.read_text(f'{config_name}_shape_names.txt').splitlines() if n.strip()]


def resolve_root(manual_dir) -> pathlib.Path:
  root = pathlib.Path(manual_dir)
  if (root / FOLDER).is_dir():
    root = root / FOLDER
  if not (root / 'modelnet40_shape_names.txt').is_file():
    raise readers.BadInputError(
      f'{manual_dir}: no modelnet40_shape_names.txt; expected the folder '
      f'{FOLDER}/ (or one holding it) with the official split lists'
    )
  return root


class Modelnet(builder_base.ManualBuilder):
  """ModelNet40 / ModelNet10, resampled to 10,000 points with normals."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name='modelnet40', description='40 classes'),
    tfds.core.BuilderConfig(name='modelnet10', description='10 classes'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self):
    return self.dataset_info_from_configs(
      description='ModelNet (PointNet++ resampled, xyz and normals).',
      features=tfds.features.FeaturesDict(
        {
          'points': tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
          'normals': tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
          'label': tfds.features.ClassLabel(names=package_shape_names(self.builder_config.name)),
          'name': tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = resolve_root(dl_manager.manual_dir)
    prefix = self.builder_config.name
    names_path = root / f'{prefix}_shape_names.txt'
    names = [text for _, text in readers.read_lines(names_path)]
    if names != self.info.features['label'].names:
      raise readers.BadInputError(
        f'{names_path}: class names differ from the official {prefix} list {self.info.features["label"].names}'
      )
    self.info.metadata['skipped'] = self.bad_inputs.skipped
    return {split: self._generate_examples(root, names, split) for split in ('train', 'test')}

  def _generate_examples(self, root, names, split):
    list_path = root / f'{self.builder_config.name}_{split}.txt'
    written = 0
    for number, shape_id in readers.read_lines(list_path):
      try:
        example = self._example(root, names, list_path, number, shape_id)
      except readers.BadInputError as e:
        self.bad_inputs.handle(split, e)
        continue
      written += 1
      yield shape_id, example
    self.bad_inputs.summarise(split, list_path, written)

  def _example(self, root, names, list_path, number, shape_id):
    class_name = shape_id.rsplit('_', 1)[0]
    if class_name not in names or not shape_id.rsplit('_', 1)[-1].isdigit():
      raise readers.BadInputError(
        f'{list_path}:{number}: expected `<class>_<NNNN>` with a class of the shape-names file, got {shape_id!r}'
      )
    path = root / class_name / f'{shape_id}.txt'
    if not path.is_file():
      raise readers.BadInputError(f'{list_path}:{number}: {path} is missing')
    values = readers.read_modelnet_txt(path)
    return {'points': values[:, :3], 'normals': values[:, 3:], 'label': names.index(class_name), 'name': shape_id}
