"""Reading files written by `torch.save` without ever running pickled code, with one message per kind of failure.

`torch.load(weights_only=True)` rebuilds tensors and plain containers only; `allowed` names the few extra classes a
format needs (SLIP's `argparse.Namespace`). Before it runs, the file's first bytes say what it is, so that a damaged
file is not reported as a security refusal (torch says "Weights only load failed" for random bytes too):

  truncated / damaged   a zip archive (torch.save's format since 1.6) whose directory cannot be read, or that
                        torch cannot read
  not a torch file      empty, text, a NumPy .npy, random bytes, a pickle torch.save did not write
  refused               a readable checkpoint that needs a pickled class outside the allowed ones; never loaded
"""

import pathlib
import re
import zipfile

from cg3d_jax.errors import BadInputError

_ZIP, _PICKLE, _NUMPY = b'PK\x03\x04', b'\x80', b'\x93NUMPY'


def _first_line(text: str) -> str:
  return text.strip().splitlines()[0] if text.strip() else ''


def refusal_reason(err: Exception) -> str:
  match = re.search(r'WeightsUnpickler error: ([^\n]*)', str(err))
  return match.group(1).split(' Please use')[0].strip() if match else _first_line(str(err))


def kind_of(path: pathlib.Path) -> str:
  """'zip', 'pickle', or what the file is instead ('empty', 'damaged zip: ...', 'numpy', 'text', 'unknown')."""
  with open(path, 'rb') as f:
    head = f.read(512)
  if not head:
    return 'empty'
  if head.startswith(_ZIP):
    try:
      with zipfile.ZipFile(path) as archive:
        archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
      return f'damaged zip: {err}'
    return 'zip'
  if head.startswith(_NUMPY):
    return 'numpy'
  if head.startswith(_PICKLE):
    return 'pickle'
  if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
    return 'text'
  return 'unknown'


_NOT_TORCH = {
  'empty': 'the file is empty',
  'numpy': 'the file is a NumPy .npy array',
  'text': 'the file is text',
  'unknown': 'the file is neither a zip archive nor a pickle (corrupt, or another kind of file)',
}


def load(path, *, allowed: tuple = (), what: str = 'a PyTorch checkpoint'):
  """torch.load(path, weights_only=True) with `allowed` extra classes; a BadInputError naming the file otherwise."""
  import torch

  path = pathlib.Path(path)
  if not path.is_file():
    raise BadInputError(path, 'does not exist or is not a file' + (' (a folder?)' if path.is_dir() else ''))
  kind = kind_of(path)
  if kind.startswith('damaged zip'):
    raise BadInputError(
      path,
      f"truncated or damaged: a zip archive (torch.save's format) whose directory cannot "
      f'be read ({kind[len("damaged zip: ") :]}); copy or download it again',
    )
  if kind in _NOT_TORCH:
    raise BadInputError(path, f'not {what}: {_NOT_TORCH[kind]}; expected a file written by torch.save')
  try:
    with torch.serialization.safe_globals(list(allowed)):
      return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as err:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, KeyError)
    text = str(err)
    if 'Weights only load failed' in text and re.search(r'Unsupported (global|class)|GLOBAL', text):
      raise BadInputError(
        path,
        f'refused: {what} that needs pickled objects other than tensors and plain '
        f'containers ({refusal_reason(err)}); nothing in it was run (torch.load '
        'weights_only=True). Load it only if you trust its source, and re-save its state '
        'dicts as plain tensors.',
      ) from None
    reason = refusal_reason(err)[:200] or 'no detail'
    if kind == 'pickle':
      raise BadInputError(
        path,
        f"not {what}: a pickle that torch.load cannot read as torch.save's format "
        f'({type(err).__name__}: {reason}); truncated, or not written by torch.save',
      ) from None
    raise BadInputError(
      path, f'damaged: torch.load cannot read the archive ({type(err).__name__}: {reason}); truncated or corrupted?'
    ) from None
