"""Device mesh and partition rules.

The mesh has three named axes: `data` (pure data parallelism, params replicated), `fsdp` (data
parallelism with params, gradients and optimizer state split across it, ZeRO-3 style) and `tensor`
(splits the output-feature dim of large kernels). The batch is split over `data x fsdp`.

The rule is a function of a leaf's shape only, so a param, its gradient and its Adam moments always
get the same sharding, and the frozen base is split the same way as the trainable tree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Axis sizes for `num_devices` from `{"data": d, "fsdp": f, "tensor": t}`; one `-1` takes what is left."""
  unknown = set(mesh_config) - set(AXES)
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {sorted(unknown)}; the axes are {AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))} does not divide the {num_devices} devices "
                     f"(the fixed axes need a multiple of {known})")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))} uses {math.prod(sizes)} devices but "
                     f"{num_devices} are present; set one axis to -1 or make the product {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The training mesh over `devices` (default: all, over every host)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  if devices == jax.devices():  # the same devices, not just as many (a TPU topology's on a CPU host)
    # jax's topology-aware device order (ICI rings on TPU) for the whole system.
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def param_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
  """FSDP over the largest dim divisible by the `fsdp` size; `tensor` over the last (output) dim.

  Leaves under `min_size` elements stay replicated (norm scales, biases: sharding them costs more in
  collectives than it saves).
  """
  spec: list[Any] = [None] * len(shape)
  if math.prod(shape) < min_size or not shape:
    return P(*spec)
  tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
  if tensor > 1 and len(shape) >= 2 and shape[-1] % tensor == 0:
    spec[-1] = "tensor"
  if fsdp > 1:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if spec[dim] is None and shape[dim] % fsdp == 0:
        spec[dim] = "fsdp"
        break
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
  """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs); scalars are replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), mesh, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis over `data x fsdp`."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallelism(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch_size: int, grad_accum_steps: int, mesh: Mesh, process_count: int) -> None:
  """The global batch must split evenly over micro-batches, data-parallel devices and hosts."""
  if grad_accum_steps < 1 or global_batch_size % grad_accum_steps:
    raise ValueError(f"config.global_batch_size={global_batch_size} is not divisible by "
                     f"config.grad_accum_steps={grad_accum_steps}")
  micro = global_batch_size // grad_accum_steps
  dp = data_parallelism(mesh)
  if micro % dp:
    raise ValueError(f"config.global_batch_size={global_batch_size} (micro-batch {micro} with grad_accum_steps="
                     f"{grad_accum_steps}) is not divisible by the data parallelism data x fsdp = {dp} of "
                     f"mesh {dict(mesh.shape)}")
  if global_batch_size % process_count:
    raise ValueError(f"config.global_batch_size={global_batch_size} is not divisible by the {process_count} "
                     f"processes (each feeds an equal part)")


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the batch axes (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
