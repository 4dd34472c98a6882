"""Dataset names -> TFDS builders, prepared from the manual folder on first use.

Names are TFDS-style `builder[/config]` (`shapenet55_cg3d`, `modelnet/modelnet40`, `scanobjectnn/pb_t50_rs`), or
the short forms `modelnet40`, `modelnet10`, `obj_only`, `obj_bg`, `pb_t50_rs`.
"""

import logging

import tensorflow_datasets as tfds

from cg3d_jax.data import modelnet, scanobjectnn, shapenet55

log = logging.getLogger(__name__)

BUILDER_CLASSES = {
    'shapenet55_cg3d': shapenet55.Shapenet55Cg3d,
    'modelnet': modelnet.Modelnet,
    'scanobjectnn': scanobjectnn.Scanobjectnn,
}
SHORT_NAMES = {
    'modelnet40': 'modelnet/modelnet40', 'modelnet10': 'modelnet/modelnet10',
    'obj_only': 'scanobjectnn/obj_only', 'obj_bg': 'scanobjectnn/obj_bg', 'pb_t50_rs': 'scanobjectnn/pb_t50_rs',
}


def get_builder(name: str, *, data_dir: str | None = None, manual_dir: str | None = None, skip_bad: bool = False,
                prepare: bool = True, process_count: int = 1) -> tfds.core.DatasetBuilder:
  """The builder for `name`; prepares it under data_dir from manual_dir when it is not prepared yet.

  A multi-process run does not prepare (processes would race on the same folder): run cg3d_jax.build_data first.
  """
  full = SHORT_NAMES.get(name, name)
  builder_name, _, config = full.partition('/')
  if builder_name not in BUILDER_CLASSES:
    raise ValueError(f'unknown dataset {name!r}; expected one of {sorted(BUILDER_CLASSES)} (with /config) '
                     f'or {sorted(SHORT_NAMES)}')
  builder = BUILDER_CLASSES[builder_name](data_dir=data_dir, config=config or None, skip_bad=skip_bad)
  if prepare and not builder.is_prepared():
    if manual_dir is None:
      raise FileNotFoundError(f'dataset {full!r} is not prepared under data_dir={data_dir!r} and no '
                              'manual_dir (config.data.manual_dir) says where its raw files are')
    if process_count > 1:
      raise RuntimeError(f'dataset {full!r} is not prepared under {data_dir!r}; prepare it once before a '
                         f'multi-process run: python -m cg3d_jax.build_data --dataset {full} --manual_dir '
                         f'{manual_dir} --data_dir {data_dir}')
    log.info('preparing %s from %s into %s', full, manual_dir, data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Class names in label order (what zero-shot prompts are built from)."""
  return list(builder.info.features['label'].names)
