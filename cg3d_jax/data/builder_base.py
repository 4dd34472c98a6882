"""What the three builders share: a `skip_bad` switch, and a fix for TFDS's lookup of the builder's source path.

`skip_bad` is a constructor argument; `tfds build` passes none, so CG3D_DATA_SKIP_BAD=1 in the environment asks
for it there.

`ManualBuilder` stays abstract (it implements no `_info`), so TFDS does not register it as a dataset.
"""

import abc
import os

import tensorflow_datasets as tfds
from etils import epath

from cg3d_jax.data.formats import readers

SKIP_BAD_ENV = 'CG3D_DATA_SKIP_BAD'


class ManualBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC, skip_registration=True):
  """A builder that reads files a user placed in `manual_dir`; `skip_bad=True` skips and counts bad examples."""

  def __init__(self, *, skip_bad: bool | None = None, **kwargs):
    if skip_bad is None:  # `tfds build` passes no builder arguments: the environment can ask for it instead.
      skip_bad = os.environ.get(SKIP_BAD_ENV, '').lower() in ('1', 'true', 'yes')
    self.bad_inputs = readers.BadInputLog(skip_bad)
    super().__init__(**kwargs)

  # TFDS 4.9 derives this from the package and, for installed source trees, reaches `importlib_resources`, which
  # is not a dependency it declares. The builder's own file is the right answer and needs nothing.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    import sys

    return epath.Path(sys.modules[cls.__module__].__file__)
