"""TFDS builder `scanobjectnn` (configs `obj_only`, `obj_bg`, `pb_t50_rs`): the official h5 files, 2,048 points.

Manual folder: the official `h5_files/` folder, or the folder holding it, or the one inside it; files as shipped:
  obj_only   main_split_nobg/training_objectdataset.h5, main_split_nobg/test_objectdataset.h5
  obj_bg     main_split/training_objectdataset.h5,      main_split/test_objectdataset.h5
  pb_t50_rs  main_split/training_objectdataset_augmentedrot_scale75.h5,
             main_split/test_objectdataset_augmentedrot_scale75.h5
each with `data` (N, 2048, 3) float and `label` (N,) integer in [0, 15).

  tfds build cg3d_jax/data/scanobjectnn.py --config pb_t50_rs --manual_dir /data/ScanObjectNN
"""

import pathlib

import h5py
import numpy as np
import tensorflow_datasets as tfds

from cg3d_jax import assets
from cg3d_jax.data import builder_base
from cg3d_jax.data.formats import readers

FILES = {
  'obj_only': ('main_split_nobg', 'training_objectdataset.h5', 'test_objectdataset.h5'),
  'obj_bg': ('main_split', 'training_objectdataset.h5', 'test_objectdataset.h5'),
  'pb_t50_rs': (
    'main_split',
    'training_objectdataset_augmentedrot_scale75.h5',
    'test_objectdataset_augmentedrot_scale75.h5',
  ),
}


def shape_names() -> list[str]:
  return [n.strip() for n in assets.read_text('scanobjectnn_shape_names.txt').splitlines() if n.strip()]


def h5_path(manual_dir, variant: str, split: str) -> pathlib.Path:
  folder, train_file, test_file = FILES[variant]
  name = train_file if split == 'train' else test_file
  root = pathlib.Path(manual_dir)
  for base in (root / 'h5_files', root, root.parent):
    if (base / folder / name).is_file():
      return base / folder / name
  raise readers.BadInputError(
    f'{root / folder / name}: file not found (ScanObjectNN {variant} {split} split; also '
    f'looked under {root / "h5_files"})'
  )


def read_h5(path: pathlib.Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  try:
    with h5py.File(path, 'r') as f:
      if 'data' not in f or 'label' not in f:
        raise readers.BadInputError(f'{path}: expected datasets `data` and `label`, found {sorted(f.keys())}')
      data, label = f['data'][...], f['label'][...]
  except OSError as e:
    raise readers.BadInputError(f'{path}: not a readable HDF5 file ({e})') from e
  label = label.reshape(-1) if label.ndim == 2 and label.shape[1] == 1 else label
  if data.ndim != 3 or data.shape[2] != 3 or data.dtype.kind != 'f':
    raise readers.BadInputError(f'{path}: `data` must be float (N, points, 3), got {data.dtype} {data.shape}')
  if label.shape != (data.shape[0],) or label.dtype.kind not in 'iu':
    raise readers.BadInputError(f'{path}: `label` must be integer ({data.shape[0]},), got {label.dtype} {label.shape}')
  bad = (label < 0) | (label >= num_classes)
  if bad.any():
    raise readers.BadInputError(
      f'{path}: label {int(label[bad][0])} of object {int(np.argmax(bad))} is outside [0, {num_classes})'
    )
  return data, label


class Scanobjectnn(builder_base.ManualBuilder):
  """ScanObjectNN object classification (15 classes, 2,048 points per object)."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f'ScanObjectNN {n.upper()}') for n in FILES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self):
    return self.dataset_info_from_configs(
      description='ScanObjectNN real scans.',
      features=tfds.features.FeaturesDict(
        {
          'points': tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
          'label': tfds.features.ClassLabel(names=shape_names()),
          'index': np.int32,  # position in the h5 file, to compare with other tools' predictions
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    self.info.metadata['skipped'] = self.bad_inputs.skipped
    return {
      split: self._generate_examples(h5_path(dl_manager.manual_dir, self.builder_config.name, split), split)
      for split in ('train', 'test')
    }

  def _generate_examples(self, path, split):
    data, label = read_h5(path, self.info.features['label'].num_classes)
    written = 0
    for i in range(len(data)):
      try:
        points = readers.check_points(f'{path} (object {i})', data[i])
      except readers.BadInputError as e:
        self.bad_inputs.handle(split, e)
        continue
      written += 1
      yield i, {'points': points, 'label': int(label[i]), 'index': i}
    self.bad_inputs.summarise(split, path, written)
