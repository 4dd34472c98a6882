"""Reading .safetensors files (CLIP weights, cg3d-jax exports) as NumPy, with one clear error for a damaged file."""

import numpy as np

from cg3d_jax.errors import BadInputError


def read_tensors(path) -> dict[str, np.ndarray]:
  """Every tensor of the file by name, dtypes kept (bfloat16 as ml_dtypes.bfloat16, which plain NumPy lacks)."""
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(str(path), framework='np') as f:
      return {name: _get(f, name, path) for name in f.keys()}
  except (SafetensorError, OSError) as err:
    raise BadInputError(path, f'not a readable safetensors file, truncated or damaged? ({err})') from None


def _get(f, name: str, path) -> np.ndarray:
  try:
    return f.get_tensor(name)
  except TypeError:  # bfloat16: NumPy has no such dtype; the flax reader returns it as ml_dtypes.bfloat16
    from safetensors.flax import load_file

    return np.asarray(load_file(str(path))[name])
