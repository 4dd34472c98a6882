"""What every per-host input pipeline shares (pipeline.py's TFDS streams, openshape_stream.py's file streams):
which process this is, its share of a global batch, the padding of an evaluation pass's last batch, and host batches
assembled into global jax.Arrays."""

from collections.abc import Iterable, Iterator

import jax
import numpy as np

from cg3d_jax.errors import ConfigError


def process(process_index=None, process_count=None) -> tuple[int, int]:
  """(index, count), JAX's unless given (given only to simulate processes in tests)."""
  return (
    jax.process_index() if process_index is None else process_index,
    jax.process_count() if process_count is None else process_count,
  )


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ConfigError(f'global batch size {global_batch_size} must divide evenly over {process_count} processes')
  return global_batch_size // process_count


def padded(batch: dict, local_batch_size: int) -> dict:
  """A host batch of an evaluation pass (its real rows, possibly none) padded with zero rows to the local batch
  size, with a bool 'mask' that is True on the real rows."""
  real = len(next(iter(batch.values())))
  pad = local_batch_size - real
  out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
  out['mask'] = np.arange(local_batch_size) < real
  return out


def to_global(batches: Iterable[dict], sharding) -> Iterator[dict[str, jax.Array]]:
  """Each process's host batch (its rows of the global batch) -> the global batch on `sharding`."""
  for batch in batches:
    yield {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
