"""Dataset names -> TFDS builders, prepared from the manual folder on first use.

Names are TFDS-style `builder[/config]` (`shapenet55_cg3d`, `modelnet/modelnet40`, `scanobjectnn/pb_t50_rs`), or
the short forms `modelnet40`, `modelnet10`, `obj_only`, `obj_bg`, `pb_t50_rs`.
"""

import logging
import os
import pathlib
import shutil

import tensorflow_datasets as tfds

from cg3d_jax.data import modelnet, scanobjectnn, shapenet55
from cg3d_jax.errors import ConfigError

log = logging.getLogger(__name__)

BUILDER_CLASSES = {
  'shapenet55_cg3d': shapenet55.Shapenet55Cg3d,
  'modelnet': modelnet.Modelnet,
  'scanobjectnn': scanobjectnn.Scanobjectnn,
}
SHORT_NAMES = {
  'modelnet40': 'modelnet/modelnet40',
  'modelnet10': 'modelnet/modelnet10',
  'obj_only': 'scanobjectnn/obj_only',
  'obj_bg': 'scanobjectnn/obj_bg',
  'pb_t50_rs': 'scanobjectnn/pb_t50_rs',
}


# How errors name the dataset, raw-folder and prepared-folder settings: a training config, an evaluation config, the
# build_data command's flags.
DATA_FIELDS = ('config.data.name', 'config.data.manual_dir', 'config.data.data_dir')
EVAL_FIELDS = ('config.eval.dataset', 'config.eval.manual_dir', 'config.eval.data_dir')
FLAG_FIELDS = ('--dataset', '--manual_dir', '--data_dir')


def _setting(field: str, value) -> str:
  return f'{field} {value}' if field.startswith('--') else f'{field}={value!r}'


def _builder(name: str, data_dir, skip_bad: bool, fields) -> tfds.core.DatasetBuilder:
  full = SHORT_NAMES.get(name, name)
  builder_name, _, config = full.partition('/')
  if builder_name not in BUILDER_CLASSES:
    raise ConfigError(
      f'{_setting(fields[0], name)}: unknown dataset; expected one of {sorted(BUILDER_CLASSES)} '
      f'(with /config) or {sorted(SHORT_NAMES)}'
    )
  cls = BUILDER_CLASSES[builder_name]
  configs = [c.name for c in cls.BUILDER_CONFIGS]
  if configs and config and config not in configs:
    raise ConfigError(
      f'{_setting(fields[0], name)}: {builder_name} has no config {config!r}; expected one of {configs}'
    )
  return cls(data_dir=data_dir, config=config or None, skip_bad=skip_bad)


def checked_builder(
  name: str,
  *,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  skip_bad: bool = False,
  process_count: int = 1,
  fields=DATA_FIELDS,
) -> tfds.core.DatasetBuilder:
  """The builder for `name`, not prepared yet, after the checks that cost nothing (a known name; a prepared copy
  under data_dir, or a manual_dir folder to prepare one from): what commands call before loading a model.
  Errors name the settings as `fields` (name, manual_dir, data_dir) say."""
  builder = _builder(name, data_dir, skip_bad, fields)
  full = builder.info.full_name.rsplit('/', 1)[0]
  if not builder.is_prepared():
    if manual_dir is None:
      raise ConfigError(
        f'dataset {full!r} is not prepared under {_setting(fields[2], data_dir)} and no '
        f'{fields[1]} says where its raw files are'
      )
    if not os.path.isdir(manual_dir) or not any(os.scandir(manual_dir)):
      state = 'is empty' if os.path.isdir(manual_dir) else 'no such folder'
      raise ConfigError(
        f'{_setting(fields[1], manual_dir)}: {state}; expected the raw files of {full!r} '
        f'({builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip().splitlines()[0]}), which is not prepared '
        f'under {_setting(fields[2], data_dir)}'
      )
    if process_count > 1:
      raise ConfigError(
        f'dataset {full!r} is not prepared under {_setting(fields[2], data_dir)}; prepare it once '
        f'before a multi-process run: python -m cg3d_jax.build_data --dataset {full} --manual_dir '
        f'{manual_dir} --data_dir {data_dir}'
      )
  return builder


def _outermost_missing(folder) -> pathlib.Path | None:
  """The outermost folder on the way to `folder` that does not exist yet (None when it exists, or is not a local
  path)."""
  if folder is None or '://' in str(folder):
    return None
  path, missing = pathlib.Path(folder).expanduser().absolute(), None
  while not path.exists():
    path, missing = path.parent, path
  return missing


def get_builder(
  name: str,
  *,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  skip_bad: bool = False,
  prepare: bool = True,
  process_count: int = 1,
  fields=DATA_FIELDS,
) -> tfds.core.DatasetBuilder:
  """The builder for `name`; prepares it under data_dir from manual_dir when it is not prepared yet.

  A multi-process run does not prepare (processes would race on the same folder): run cg3d_jax.build_data first.
  """
  if not prepare:
    return _builder(name, data_dir, skip_bad, fields)
  created = _outermost_missing(data_dir)  # what preparing creates, removed again if it fails
  builder = checked_builder(
    name, data_dir=data_dir, manual_dir=manual_dir, skip_bad=skip_bad, process_count=process_count, fields=fields
  )
  if not builder.is_prepared():
    log.info('preparing %s from %s into %s', builder.info.full_name, manual_dir, data_dir)
    root = pathlib.Path(builder.data_dir).parents[2]  # <data_dir>/<builder>/<config>/<version>
    fresh = [p for p in (root / builder.name, root / 'downloads') if not p.exists()]
    if created is not None:
      fresh.append(created)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except BaseException:
      for path in fresh:  # TFDS's bookkeeping for a dataset that was never written: a failed prepare leaves nothing
        shutil.rmtree(path, ignore_errors=True)
      raise
  return builder


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Class names in label order (what zero-shot prompts are built from)."""
  return list(builder.info.features['label'].names)
