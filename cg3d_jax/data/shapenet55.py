"""TFDS builder `shapenet55_cg3d`: CG3D's pre-training triplets (point cloud, rendered views, class name).

Manual folder (the official layout; CG3D's `<root>/shapenet_render` + `<root>/ShapeNet55` nesting also works):
  shapenet_pc/<synset>-<model>.npy        (8192, 3) float points
  img/<synset>/<model>/000.png ... 00{V-1}.png   V = config num_views (5)
  train_img.txt, test_img.txt             one `<synset>-<model>.npy` a line
  taxonomy.json      optional: ShapeNet's synset dictionary (list of {"synsetId", "name"}, or {id: name});
                     the package's copy of ShapeNetCore's names is used when absent
  shape_names.txt    optional: class names in label order (the package's copy of CG3D's 55 when absent)

Class name = first comma-separated synset name, with CG3D's renames (display->monitor, vessel->ship,
ashcan->trashcan); label = its line in shape_names.txt, as in CG3D's dataset code.

  tfds build cg3d_jax/data/shapenet55.py --manual_dir /data/shapenet55 --data_dir ~/tensorflow_datasets
"""

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from cg3d_jax.data import builder_base
from cg3d_jax.data.formats import readers
from cg3d_jax.data.shapenet55_names import read_shape_names, read_synset_dictionary


class Layout:
  """Where the files of a manual folder are (flat, or CG3D's shapenet_render/ + ShapeNet55/ nesting)."""

  def __init__(self, manual_dir):
    root = pathlib.Path(manual_dir)
    self.meta = root / 'shapenet_render' if (root / 'shapenet_render').is_dir() else root
    self.points = root / 'ShapeNet55' / 'shapenet_pc' if (root / 'ShapeNet55').is_dir() else root / 'shapenet_pc'
    self.images = self.meta / 'img'
    if not (self.meta / 'train_img.txt').is_file():
      raise readers.BadInputError(
        f'{root}: no train_img.txt; expected the ShapeNet-55 layout (shapenet_pc/, img/, train_img.txt, test_img.txt)'
      )

  def optional(self, name: str) -> pathlib.Path | None:
    path = self.meta / name
    return path if path.is_file() else None


class Shapenet55Cg3dConfig(tfds.core.BuilderConfig):
  def __init__(self, *, num_views: int = 5, **kwargs):
    super().__init__(version='1.0.0', **kwargs)
    self.num_views = num_views


class Shapenet55Cg3d(builder_base.ManualBuilder):
  """ShapeNet-55 point clouds with CG3D's renders and class names."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [Shapenet55Cg3dConfig(name='default', num_views=5, description='5 views per shape')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self):
    return self.dataset_info_from_configs(
      description='ShapeNet-55 triplets as CG3D trains on them.',
      features=tfds.features.FeaturesDict(
        {
          'points': tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
          'views': tfds.features.Sequence(
            tfds.features.Image(shape=(None, None, 3), encoding_format='png'), length=self.builder_config.num_views
          ),
          # Names come from the manual folder (the procedural set has its own), so they are set at build time.
          'label': tfds.features.ClassLabel(),
          'class_name': tfds.features.Text(),
          'synset': tfds.features.Text(),
          'model_id': tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    layout = Layout(dl_manager.manual_dir)
    synsets = read_synset_dictionary(layout.optional('taxonomy.json'))
    names = read_shape_names(layout.optional('shape_names.txt'))
    self.info.features['label'].names = names
    self.info.metadata['skipped'] = self.bad_inputs.skipped
    return {split: self._generate_examples(layout, synsets, names, split) for split in ('train', 'test')}

  def _generate_examples(self, layout, synsets, names, split):
    list_path = layout.meta / f'{split}_img.txt'
    written = 0
    for number, text in readers.read_lines(list_path):
      try:
        example = self._example(layout, synsets, names, list_path, number, text)
      except readers.BadInputError as e:
        self.bad_inputs.handle(split, e)
        continue
      written += 1
      yield example
    self.bad_inputs.summarise(split, list_path, written)

  def _example(self, layout, synsets, names, list_path, number, text):
    synset, model = readers.parse_shapenet_id(list_path, number, text)
    where = f'{list_path}:{number}'
    if synset not in synsets:
      raise readers.BadInputError(f'{where}: unknown synset {synset!r} (not in the synset dictionary)')
    class_name = synsets[synset]
    if class_name not in names:
      raise readers.BadInputError(f'{where}: class {class_name!r} of synset {synset} is not in shape_names.txt')
    points_path = layout.points / text
    if not points_path.is_file():
      raise readers.BadInputError(f'{where}: point cloud {points_path} is missing')
    points = readers.read_npy_points(points_path)
    views = [
      readers.read_png(layout.images / synset / model / f'{v:03d}.png') for v in range(self.builder_config.num_views)
    ]
    return f'{synset}-{model}', {
      'points': points,
      'views': views,
      'label': names.index(class_name),
      'class_name': class_name,
      'synset': synset,
      'model_id': model,
    }
