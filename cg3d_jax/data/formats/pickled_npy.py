"""Pickled-dict `.npy` files (OpenShape's one file per shape) read without running arbitrary code.

OpenShape stores each shape as `np.save(path, {'xyz': ..., 'rgb': ..., 'image_feat': ..., ...})`: a 0-d object
array whose payload is a pickle. `np.load(allow_pickle=True)` would run whatever that pickle names; this reader
parses the `.npy` header itself and unpickles the payload with an unpickler that admits only NumPy's array, dtype
and scalar constructors (and plain containers, which need no constructor). A file that names anything else (a
function, a class of another library) is refused with the global it names, before any of it runs.
"""

import pickle

import numpy as np

from cg3d_jax.errors import BadInputError

# (module, name) pairs a NumPy array pickle needs, under NumPy 1.x and 2.x module names; `_codecs.encode` is how
# protocol-2 pickles spell bytes. Nothing here can execute code or touch files.
ALLOWED_GLOBALS = frozenset(
  {
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),
    ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('_codecs', 'encode'),
    ('builtins', 'set'),
    ('builtins', 'frozenset'),
    ('builtins', 'bytearray'),
    ('builtins', 'complex'),
  }
)


class _Refused(pickle.UnpicklingError):
  pass


class _ArraysOnlyUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) in ALLOWED_GLOBALS:
      return super().find_class(module, name)
    raise _Refused(
      f'it names {module}.{name}, which is not a NumPy array, dtype or plain container '
      '(refused before anything in the file ran)'
    )


def read_pickled(path):
  """What a pickled `.npy` holds, through the restricted unpickler: a dict (OpenShape's per-shape files, its
  xyz_label.npy and cat_name_pt_feat.npy) or an object array (its ModelNet40 test_pc.npy: one dict per cloud)."""
  try:
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        _, _, dtype = np.lib.format.read_array_header_1_0(f)
      else:
        _, _, dtype = np.lib.format.read_array_header_2_0(f)
      if dtype != np.dtype(object):
        raise BadInputError(path, f'holds a plain {dtype} array, expected a pickled dict (OpenShape layout)')
      value = _ArraysOnlyUnpickler(f).load()
  except BadInputError:
    raise
  except _Refused as err:
    raise BadInputError(path, f'refused: {err}') from None
  except (pickle.UnpicklingError, ValueError, EOFError, OSError, TypeError, AttributeError, IndexError) as err:
    raise BadInputError(path, f'is not a readable pickled-dict .npy file ({type(err).__name__}: {err})') from None
  if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
    value = value.item()
  return value


def read_pickled_dict(path) -> dict:
  """The dict a pickled-dict `.npy` holds, through the restricted unpickler."""
  value = read_pickled(path)
  if not isinstance(value, dict):
    raise BadInputError(path, f'holds a {type(value).__name__}, expected a dict (OpenShape layout)')
  return value
