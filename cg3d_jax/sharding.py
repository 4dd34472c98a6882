"""Device mesh and sharding rules: batches over data x fsdp, big arrays over fsdp, everything else replicated.

Mesh. Two named axes, ('data', 'fsdp'), sizes from the config's `mesh` block; one size may be -1 for "the devices
left over". Batches split their leading dimension over both axes (every device sees a distinct slice of the
global batch); parameters are split over 'fsdp' only, so a data-parallel mesh is just fsdp=1.

Parameter rule (a function of the array's shape alone; in a scanned layer stack, of one layer's shape, the leading
layer axis never split):
  * replicated if the mesh's fsdp size is 1, or the array has fewer than `min_fsdp_size` elements (biases, norms,
    scalars, prompts, small kernels: the gather would cost more than the memory it saves);
  * otherwise split over 'fsdp' along its largest dimension that the fsdp size divides (ties: the last such
    dimension); replicated if no dimension divides.
Because the rule reads only shapes, an optimizer moment (Adam's mu and nu, SGD's trace) lands exactly like the
parameter it mirrors, so `state_shardings` applies the same rule to a whole train state: parameters, optimizer
state, batch statistics, step counters and RNG keys (scalars, hence replicated).
"""

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cg3d_jax.trees import in_stack, path_to_str

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')
DEFAULT_MIN_FSDP_SIZE = 2**18


def _as_dict(mesh_config) -> dict:
  return mesh_config.to_dict() if hasattr(mesh_config, 'to_dict') else dict(mesh_config)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Axis sizes in MESH_AXES order, with a -1 resolved to the devices left over."""
  sizes = _as_dict(mesh_config)
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'mesh config: unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}')
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f'mesh config {sizes}: at most one axis may be -1 (the devices left over)')
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh config {sizes}: axis sizes must be positive or -1')
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % fixed:
      raise ValueError(f'mesh config {sizes}: {num_devices} devices do not divide into the fixed axes of size {fixed}')
    shape[shape.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
      f'mesh config {sizes} needs {fixed} devices, but {num_devices} are available; use -1 for one '
      'axis to take the rest'
    )
  return tuple(shape)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all devices of all processes) with axes ('data', 'fsdp')."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  # jax.make_mesh orders devices by the physical topology on TPU/GPU; Auto axes keep jit's sharding propagation.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp; the global batch must be divisible by mesh.size."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> P:
  """The PartitionSpec of the parameter rule (module docstring) for one array shape."""
  shape = tuple(int(d) for d in shape)
  if fsdp_size == 1 or math.prod(shape) < min_fsdp_size:
    return P()
  divisible = [axis for axis, dim in enumerate(shape) if dim % fsdp_size == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda a: (shape[a], a))  # largest dimension, the last one on ties
  return P(*(['fsdp' if a == axis else None for a in range(len(shape))]))


def param_shardings(params_or_shapes: Any, mesh: Mesh, *, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """A NamedSharding for every leaf (arrays or jax.ShapeDtypeStruct), by the parameter rule."""
  fsdp_size = mesh.shape['fsdp']

  def spec(path, x):
    shape = np.shape(x)
    if shape and in_stack(path_to_str(path)):  # per layer: the scan slices the layer axis, which stays whole
      return NamedSharding(mesh, P(None, *fsdp_spec(shape[1:], fsdp_size, min_fsdp_size)))
    return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_fsdp_size))

  return jax.tree_util.tree_map_with_path(spec, params_or_shapes)


def state_shardings(state_shapes: Any, mesh: Mesh, *, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """Shardings for a whole train state; optimizer moments follow their parameters, scalars are replicated."""
  return param_shardings(state_shapes, mesh, min_fsdp_size=min_fsdp_size)


def with_shardings(shapes: Any, shardings: Any) -> Any:
  """jax.ShapeDtypeStruct leaves carrying their sharding: the target that jit outputs and checkpoint restores take."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(np.shape(s), s.dtype, sharding=sh), shapes, shardings)
