"""Writing files so that a reader never sees half of one: a temporary name in the same folder, flushed to disk, then
a rename. An interrupted write leaves neither the file nor the temporary behind."""

import io
import os
import tempfile
from typing import BinaryIO, Callable


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
  """write(binary file) into a temporary file beside `path` (creating its folder), fsync, then rename onto `path`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; these are ordinary outputs
    os.replace(tmp, path)
  except BaseException:  # an interrupt too: never leave the temporary file behind
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_bytes(path, data: bytes) -> None:
  atomic_write(path, lambda f: f.write(data))


def atomic_write_npy(path, array) -> None:
  """np.save, atomically."""
  import numpy as np

  atomic_write(path, lambda f: np.save(f, np.asarray(array)))


def atomic_write_png(path, image) -> None:
  """An (H, W, 3) or (H, W) uint8 image as PNG, atomically."""
  import numpy as np
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buffer, format='PNG')
  atomic_write_bytes(path, buffer.getvalue())
