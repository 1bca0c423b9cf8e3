"""The CPU matrix-product kernel (`cpu_matmul.cc`), called through `jax.ffi`.

XLA:CPU (jaxlib 0.10) runs float32 dots through YNNPACK, which on 2 threads took 1.3-1.5x PyTorch's time on
SD's linear-layer shapes (benchmarks/matmul.py). `cpu_matmul.cc` is a blocked, register-tiled product on
XLA's intra-op thread pool. It is built with the other CPU kernels by `cpu_kernels.py`; `models/matmul.py`
decides where it runs.

`unavailable_reason()` says why it cannot be used here (no compiler, the build failed,
`MAGICPOSE_CPU_KERNELS=0` or `MAGICPOSE_CPU_MATMUL=0`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magicpose_jax.models import cpu_kernels

FFI_TARGET = "magicpose_cpu_matmul"
DISABLE_ENV = "MAGICPOSE_CPU_MATMUL"


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered here, else why it cannot be used."""
  return cpu_kernels.switched_off(DISABLE_ENV) or cpu_kernels.unavailable_reason()


def matmul(a: jax.Array, b: jax.Array, target: str = FFI_TARGET) -> jax.Array:
  """The kernel: `a [M, K] · b [K, N] -> [M, N]`, float32, on CPU.

  Args:
    a: `[M, K]` float32.
    b: `[K, N]` float32.
    target: the FFI target (another build registered with `cpu_kernels.register`, in tests).

  Raises:
    RuntimeError: the kernel is unavailable here (see `unavailable_reason`).
    ValueError: the shapes are not `[M, K]` and `[K, N]`.
  """
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"the CPU matmul kernel is unavailable: {reason}")
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(f"matmul takes a [M, K] and b [K, N], got {a.shape} and {b.shape}")
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32),
                          vmap_method="sequential")  # the kernel is 2-D only
  return call(a, b)
