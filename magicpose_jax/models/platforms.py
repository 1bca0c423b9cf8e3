"""The platform a model is traced for, which picks its attention and convolution kernels.

Kernels are chosen at trace time, and a program may be compiled for devices other than the host's: a TPU step
compiled ahead of time on a CPU host (`benchmarks/memory_plan.py --topology v5p:2x2x1`) must get the TPU kernels,
never the CPU ones. So the choice follows the *target* platform, resolved in this order:

  1. `target_platform(...)`, the context the models enter with their configs' `target_platform` field
     (`UNetConfig`, `ControlNetConfig`, `VAEConfig`; the train step builder and the sampler set it);
  2. the platform of the mesh in context (`jax.sharding.use_abstract_mesh`, which the train step traces under);
  3. the platform of the default devices, where an un-sharded `jax.jit` runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
# jax device platforms that name a GPU backend ("gpu" is jax's own alias for both).
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("magicpose_target_platform", default=None)


def normalize(platform: str, field: str = "target_platform") -> str:
  """`platform` as one of `PLATFORMS` ("" stays ""); a clear error naming `field` otherwise."""
  name = _ALIASES.get(platform.lower(), platform.lower())
  if name and name not in PLATFORMS:
    raise ValueError(f"{field}={platform!r}: expected '' (the devices' own) or one of {PLATFORMS}")
  return name


def device_platform(device: jax.Device) -> str:
  """The platform of a device (real or a topology's description), as one of `PLATFORMS`."""
  return normalize(device.platform, "device.platform")


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
  """Traces the body for `platform` ("" keeps the enclosing choice)."""
  platform = normalize(platform)
  if not platform:
    yield
    return
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def current_platform() -> str:
  """The platform being traced for (see the module docstring for the order)."""
  explicit = _TARGET.get()
  if explicit:
    return explicit
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return normalize(mesh.abstract_device.platform, "mesh platform")
  return device_platform(jax.devices()[0])


def traced_for_config_platform(method: Callable[..., Any]) -> Callable[..., Any]:
  """Decorates a module method so that its body traces for `self.config.target_platform` (outside `nn.compact`)."""

  @functools.wraps(method)  # keeps flax's `compact` marker
  def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
    with target_platform(self.config.target_platform):
      return method(self, *args, **kwargs)

  return wrapper
