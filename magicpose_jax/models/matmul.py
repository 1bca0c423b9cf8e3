"""Matrix products of the models' Dense layers and im2col convolutions, by the CPU kernel where it is faster.

On CPU, float32 products of at least `MIN_ROWS` rows and `MIN_MACS` multiply-adds run through
`cpu_matmul.cc` (`models/cpu_matmul.py`): on 2 threads it took 0.8-0.9x XLA's (YNNPACK's) time on SD 1.5's
linear-layer and im2col shapes (benchmarks/matmul.py). Everything else, and every product on GPU/TPU or
over several devices (a custom call is not partitioned: under a mesh its inputs would be gathered), is
`lax.dot_general`. The kernel's backward is plain XLA dots, so training on CPU keeps working.

`dot_general` has `lax.dot_general`'s signature, so `flax.linen.Dense` takes it as its `dot_general`
attribute and the parameters (`kernel [in, out]`, `bias`) are unchanged.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from magicpose_jax.models import cpu_matmul

_log = logging.getLogger(__name__)

# Smaller products stay with XLA: a custom call cannot fuse with its neighbours, and the time embedding's
# [1, 320] x [320, 1280] is not worth a thread-pool round trip.
MIN_ROWS = 16
MIN_MACS = 1 << 22
_logged: set[str] = set()


def kernel_unsupported(m: int, k: int, n: int, dtype: Any) -> str | None:
  """None where `[m, k] x [k, n]` of `dtype` runs on the CPU kernel, else why not."""
  if jax.default_backend() != "cpu":
    return f"the matmul kernel runs on CPU (platform is {jax.default_backend()!r})"
  if jnp.dtype(dtype) != jnp.float32:
    return f"the matmul kernel takes float32, got {jnp.dtype(dtype)}"
  if m < MIN_ROWS or m * k * n < MIN_MACS:
    return f"[{m}, {k}] x [{k}, {n}] is below the kernel's size threshold"
  if jax.device_count() > 1:
    return f"the matmul kernel runs on one device ({jax.device_count()} here)"
  reason = cpu_matmul.unavailable_reason()
  if reason is not None and reason not in _logged:
    _logged.add(reason)
    _log.info("CPU matmul kernel unavailable, using XLA's dots: %s", reason)
  return reason


@jax.custom_vjp
def _kernel_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return cpu_matmul.matmul(a, b)


def _kernel_matmul_fwd(a, b):
  return cpu_matmul.matmul(a, b), (a, b)


def _kernel_matmul_bwd(residuals, g):
  a, b = residuals
  return matmul(g, b.T), jnp.dot(a.T, g)  # dA [M, K] may take the kernel again; dB [K, N] contracts over M


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, precision: Any = None) -> jax.Array:
  """`a [M, K] · b [K, N] -> [M, N]`: the CPU kernel where `kernel_unsupported` allows, else `jnp.dot`."""
  (m, k), n = a.shape, b.shape[1]
  if a.dtype == b.dtype and kernel_unsupported(m, k, n, a.dtype) is None:
    return _kernel_matmul(a, b)
  return jnp.dot(a, b, precision=precision)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
  """`lax.dot_general`; a Dense layer's `[..., K] x [K, N]` runs on the CPU kernel (as `[M, K]`) where it may."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dense = (rhs.ndim == 2 and lhs.ndim >= 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
           and not lhs_batch and not rhs_batch and not kwargs
           and preferred_element_type in (None, lhs.dtype) and lhs.dtype == rhs.dtype)
  if dense:
    m, (k, n) = math.prod(lhs.shape[:-1]), rhs.shape
    if kernel_unsupported(m, k, n, lhs.dtype) is None:
      return _kernel_matmul(lhs.reshape(m, k), rhs).reshape(*lhs.shape[:-1], n)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)
