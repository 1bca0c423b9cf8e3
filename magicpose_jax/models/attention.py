"""Multi-head attention with a small backend registry and extra key/value tokens.

Every backend takes queries `[B, Nq, H, D]` and keys/values `[B, Nk, H, D]` with
`Nk` free (MagicPose's self-attention sees `Nk = 2 * Nq`, cross-attention
`Nk = 77`) and returns `[B, Nq, H, D]`.

Backends:
  * `xla`: two einsums with the softmax in float32; runs everywhere, any shape.
  * `xla_chunked`: `xla` one (batch, head) and query chunk at a time, logits within
    `CHUNK_LOGITS_BYTES` (a sequential loop: much faster on CPUs at SD's 4096-token
    layers, and far less memory).
  * `auto`: `xla_chunked` on CPU, `dot_product` on GPU, `xla` elsewhere.
  * `dot_product`: `jax.nn.dot_product_attention` with no implementation pinned,
    so XLA picks cuDNN flash attention on GPUs where it applies.
  * `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only,
    fp16/bf16, head dim a multiple of 8 and at most 128.
  * `splash`: reserved for TPU splash attention (the accelerator issue); until it
    lands it reports itself unsupported and the call falls back to `xla`.

A backend that cannot run a given shape/dtype/platform falls back to `xla` and
says so once in the log (the decision is made at trace time: shapes are static).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_log = logging.getLogger(__name__)

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# Returns None when the backend can run (q, k, v), else the reason it cannot.
SupportsFn = Callable[[jax.Array, jax.Array, jax.Array], "str | None"]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
  """One way of computing `softmax(q·kᵀ/√d)·v`; see the module docstring."""

  name: str
  fn: AttentionFn
  supports: SupportsFn


_BACKENDS: dict[str, AttentionBackend] = {}
_WARNED: set[tuple[str, str]] = set()


def register_backend(name: str, fn: AttentionFn, supports: SupportsFn | None = None) -> None:
  """Adds (or replaces) an attention backend under `name`."""
  _BACKENDS[name] = AttentionBackend(name, fn, supports or (lambda q, k, v: None))


def available_backends() -> tuple[str, ...]:
  return tuple(_BACKENDS)


def _grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`[G, Nq, D]`, `[G, Nk, D]`, `[G, Nk, D]` -> `[G, Nq, D]`; `q` already scaled by 1/sqrt(D)."""
  logits = jnp.einsum("gqd,gkd->gqk", q, k).astype(jnp.float32)  # [G, Nq, Nk]
  # Softmax statistics in float32 (bf16 logits over 8k keys lose the small probabilities).
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised, in [0, 1]
  denom = jnp.sum(weights, axis=-1, keepdims=True)  # [G, Nq, 1]
  # Normalising after the second matmul touches [Nq, D] values instead of [Nq, Nk].
  out = jnp.einsum("gqk,gkd->gqd", weights.astype(v.dtype), v)  # [G, Nq, D]
  return (out / denom.astype(out.dtype)).astype(v.dtype)


def _to_groups(x: jax.Array) -> jax.Array:
  b, n, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)  # [B*H, N, D]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Reference attention: `[B,Nq,H,D]`, `[B,Nk,H,D]`, `[B,Nk,H,D]` -> `[B,Nq,H,D]`."""
  b, nq, h, d = q.shape
  q = q * jnp.asarray(d**-0.5, q.dtype)
  out = _grouped_attention(_to_groups(q), _to_groups(k), _to_groups(v))  # [B*H, Nq, D]
  return out.reshape(b, h, nq, d).transpose(0, 2, 1, 3)


# Largest float32 logits block the chunked backend materialises at once. On CPUs a
# [B, H, Nq, Nk] block of hundreds of MB costs more in fresh-page faults and cache
# misses than in arithmetic; one head and ~8 MiB of logits at a time measured 4x
# faster than one block at SD's 4096-token layers (benchmarks/unet_forward.py).
CHUNK_LOGITS_BYTES = 8 * 2**20


def query_chunk_size(nq: int, nk: int, max_bytes: int = CHUNK_LOGITS_BYTES) -> int:
  """The largest divisor of `nq` whose `[chunk, Nk]` float32 logits fit in `max_bytes` (>= 1)."""
  best = 1
  for c in range(1, nq + 1):
    if nq % c == 0 and c * nk * 4 <= max_bytes:
      best = c
  return best


def chunked_xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          max_bytes: int = CHUNK_LOGITS_BYTES) -> jax.Array:
  """`xla_attention` one (batch, head) and query chunk at a time (a sequential `lax.map`).

  Identical per query to `xla_attention`; shapes as `attend`.
  """
  b, nq, h, d = q.shape
  nk = k.shape[1]
  if b * h * nq * nk * 4 <= max_bytes:
    return xla_attention(q, k, v)
  chunk = query_chunk_size(nq, nk, max_bytes)
  n_chunks, groups = nq // chunk, b * h
  q = q * jnp.asarray(d**-0.5, q.dtype)
  queries = _to_groups(q).reshape(groups * n_chunks, 1, chunk, d)  # [G*n_chunks, 1, chunk, D]
  keys, values = _to_groups(k), _to_groups(v)  # [G, Nk, D]
  owner = jnp.repeat(jnp.arange(groups), n_chunks)  # the (batch, head) group of each chunk

  def one_chunk(args: tuple[jax.Array, jax.Array]) -> jax.Array:
    qc, g = args
    kg = jax.lax.dynamic_slice_in_dim(keys, g, 1)  # [1, Nk, D]
    vg = jax.lax.dynamic_slice_in_dim(values, g, 1)
    return _grouped_attention(qc, kg, vg)  # [1, chunk, D]

  out = jax.lax.map(one_chunk, (queries, owner))  # [G*n_chunks, 1, chunk, D]
  return out.reshape(b, h, nq, d).transpose(0, 2, 1, 3)


def _dot_product(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  # jax.nn.dot_product_attention uses the same [B, T, N, H] layout as ours.
  return jax.nn.dot_product_attention(q, k, v)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def _cudnn_supports(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
  if jax.default_backend() != "gpu":
    return f"cuDNN attention needs a GPU (platform is {jax.default_backend()!r})"
  if q.dtype not in (jnp.float16, jnp.bfloat16):
    return f"cuDNN attention needs float16/bfloat16 inputs, got {q.dtype}"
  d = q.shape[-1]
  if d % 8 or d > 128:
    return f"cuDNN attention needs head_dim % 8 == 0 and <= 128, got {d}"
  return None


def _splash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  raise NotImplementedError("splash attention is not implemented yet")


def _splash_supports(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
  return "TPU splash attention is not implemented yet (accelerator issue #10)"


def _auto(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  # Per-platform default; the accelerator issue refines this per shape from benchmarks.
  platform = jax.default_backend()
  if platform == "cpu":
    return chunked_xla_attention(q, k, v)
  if platform == "gpu":
    return _dot_product(q, k, v)
  return xla_attention(q, k, v)


register_backend("xla", xla_attention)
register_backend("xla_chunked", chunked_xla_attention)
register_backend("auto", _auto)
register_backend("dot_product", _dot_product)
register_backend("cudnn", _cudnn, _cudnn_supports)
register_backend("splash", _splash, _splash_supports)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, backend: str = "xla") -> jax.Array:
  """Scaled dot-product attention through `backend`, falling back to `xla`.

  Args:
    q: `[B, Nq, H, D]` queries.
    k: `[B, Nk, H, D]` keys; `Nk` may differ from `Nq`.
    v: `[B, Nk, H, D]` values.
    backend: a name from `available_backends()`.

  Returns:
    `[B, Nq, H, D]`.
  """
  if backend not in _BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; available: {available_backends()}")
  chosen = _BACKENDS[backend]
  reason = chosen.supports(q, k, v)
  if reason is not None:
    if (backend, reason) not in _WARNED:
      _WARNED.add((backend, reason))
      _log.warning("attention backend %r cannot run q%s k%s %s: %s; using 'xla'",
                   backend, tuple(q.shape), tuple(k.shape), q.dtype, reason)
    chosen = _BACKENDS["xla"]
  return chosen.fn(q, k, v)


class Attention(nn.Module):
  """diffusers' `Attention` (to_q/to_k/to_v without bias, to_out.0 with bias).

  `extra_kv` holds extra tokens appended to the key/value input along the
  sequence axis and projected by this layer's own `to_k`/`to_v`; this is how
  MagicPose's main UNet attends to the appearance net's states.
  """

  heads: int
  head_dim: int
  backend: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               extra_kv: jax.Array | None = None) -> jax.Array:
    """`x [B, N, C]`, `context [B, M, Dc]` (None: self-attention), `extra_kv [B, R, C]`."""
    dense = lambda features, name, bias=False: nn.Dense(
        features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    inner = self.heads * self.head_dim
    kv_in = x if context is None else context
    if extra_kv is not None:
      kv_in = jnp.concatenate([kv_in, extra_kv.astype(kv_in.dtype)], axis=1)  # [B, M+R, C]
    b, n = x.shape[:2]
    q = dense(inner, "to_q")(x).reshape(b, n, self.heads, self.head_dim)  # [B, N, H, D]
    k = dense(inner, "to_k")(kv_in).reshape(b, -1, self.heads, self.head_dim)  # [B, M, H, D]
    v = dense(inner, "to_v")(kv_in).reshape(b, -1, self.heads, self.head_dim)
    out = attend(q, k, v, self.backend).reshape(b, n, inner)  # [B, N, H*D]
    return dense(x.shape[-1], "to_out_0", bias=True)(out)
