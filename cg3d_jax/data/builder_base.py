"""What the three builders share: a `skip_bad` switch and a fix for TFDS's lookup of the builder's source path.

`ManualBuilder` stays abstract (it implements no `_info`), so TFDS does not register it as a dataset.
"""

import abc

import tensorflow_datasets as tfds
from etils import epath

from cg3d_jax.data import readers


class ManualBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC, skip_registration=True):
  """A builder that reads files a user placed in `manual_dir`; `skip_bad=True` skips and counts bad examples."""

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    self.bad_inputs = readers.BadInputLog(skip_bad)
    super().__init__(**kwargs)

  # TFDS 4.9 derives this from the package and, for installed source trees, reaches `importlib_resources`, which
  # is not a dependency it declares. The builder's own file is the right answer and needs nothing.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    import sys
    return epath.Path(sys.modules[cls.__module__].__file__)
