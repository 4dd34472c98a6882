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
