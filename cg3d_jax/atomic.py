"""Writing files so that a reader never sees half of one: a temporary name in the same folder, then a rename."""

import os
import tempfile


def atomic_write_bytes(path, data: bytes) -> None:
  """Writes `data` to `path` (creating its folder); an interrupted write leaves neither `path` nor a temp file."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_npy(path, array) -> None:
  """np.save, atomically."""
  import io
  import numpy as np
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array))
  atomic_write_bytes(path, buffer.getvalue())


def atomic_write_png(path, image) -> None:
  """An (H, W, 3) or (H, W) uint8 image as PNG, atomically."""
  import io
  import numpy as np
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buffer, format='PNG')
  atomic_write_bytes(path, buffer.getvalue())
