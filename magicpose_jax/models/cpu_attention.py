"""The fused CPU attention kernel (`cpu_attention.cc`), called through `jax.ffi`.

XLA:CPU runs attention as separate matmul, exp and reduction ops, each over a `[rows, Nk]`
logits block in memory; PyTorch's fused CPU kernel was ~1.7x faster at SD's 4096-token layers
on 2 cores (benchmarks/attention.py). `cpu_attention.cc` computes a 48-row query block of one
head from start to end in one thread's cache, on XLA's intra-op thread pool. It is built with the
other CPU kernels by `cpu_kernels.py`.

`unavailable_reason()` says why it cannot be used here (no compiler, the build failed,
`MAGICPOSE_CPU_KERNELS=0` or `MAGICPOSE_CPU_ATTENTION=0`); `models/attention.py` then runs its
pure-JAX `flash` backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magicpose_jax.models import cpu_kernels

FFI_TARGET = "magicpose_cpu_attention_forward"
DISABLE_ENV = "MAGICPOSE_CPU_ATTENTION"


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered here, else why it cannot be used."""
  return cpu_kernels.switched_off(DISABLE_ENV) or cpu_kernels.unavailable_reason()


def forward(q: jax.Array, k: jax.Array, v: jax.Array, target: str = FFI_TARGET) -> tuple[jax.Array, jax.Array]:
  """The kernel: `softmax(q·kᵀ)·v` and its log-sum-exp, float32, on CPU; `q` already scaled.

  Args:
    q: `[..., Nq, H, D]` float32 queries, the 1/sqrt(D) scale applied.
    k: `[..., Nk, H, D]` float32 keys.
    v: `[..., Nk, H, D]` float32 values.
    target: the FFI target (another build registered with `register`, in tests).

  Returns:
    out `[..., Nq, H, D]` and lse `[..., H, Nq]` (float32), the log-sum-exp of each query's logits.
  """
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"the CPU attention kernel is unavailable: {reason}")
  *lead, nq, h, _ = q.shape
  call = jax.ffi.ffi_call(
      target,
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((*lead, h, nq), jnp.float32)),
      vmap_method="broadcast_all")  # the kernel treats every leading dimension as batch
  return call(q, k, v)
