"""Multi-head attention with a small backend registry and extra key/value tokens.

Every backend takes queries `[B, Nq, H, D]` and keys/values `[B, Nk, H, D]` with
`Nk` free (MagicPose's self-attention sees `Nk = 2 * Nq`, cross-attention
`Nk = 77`) and returns `[B, Nq, H, D]`.

Backends:
  * `xla`: two einsums with the softmax in float32; runs everywhere, any shape.
  * `flash`: pure-JAX memory-efficient attention with a custom VJP (`flash_attention`):
    a loop over heads and query chunks with the batch vectorised (so batch sharding stays
    sharded), `[B, chunk, Nk]` float32 logits within `CHUNK_LOGITS_BYTES`, only the
    output and the per-query logsumexp saved, probabilities recomputed chunk by chunk
    in the backward (FlashAttention-2). Any platform, dtype and `Nk`.
  * `cpu_fused`: the fused C++ kernel of `models/cpu_attention.cc` (built on first use with
    the machine's C++ compiler): one 48-query block of one head at a time, logits kept in
    cache, on XLA's intra-op threads. CPU, float32, one device; the backward is `flash`'s.
  * `dot_product`: `jax.nn.dot_product_attention` with no implementation pinned,
    so XLA picks cuDNN flash attention on GPUs where it applies.
  * `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only,
    fp16/bf16, head dim a multiple of 8 and at most 128.
  * `splash`: the TPU splash kernel (`models/splash_attention.py`), batch-sharded through
    `jax.shard_map` inside a mesh context. TPU only.
  * `auto`: `auto_backend` picks one of the above per shape and target platform.

The platform is the *target's* (`models/platforms.py`: the config's `target_platform`, else the
mesh being traced for, else the default devices), never the host's: a TPU program compiled on a
CPU host gets TPU kernels. A backend named explicitly that cannot run a shape/dtype on the target
is an error naming the backend, the platform and why (decided at trace time, before any compile);
no kernel is swapped silently. `xla_chunked`, the old name of `flash`, is an error naming `flash`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magicpose_jax.models import cpu_attention, platforms, splash_attention

_log = logging.getLogger(__name__)

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# Returns None when the backend can run (q, k, v) on the platform (the last argument), else the reason it cannot.
SupportsFn = Callable[[jax.Array, jax.Array, jax.Array, str], "str | None"]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
  """One way of computing `softmax(q·kᵀ/√d)·v`; see the module docstring."""

  name: str
  fn: AttentionFn
  supports: SupportsFn  # shape/dtype rules on a platform it runs on
  platforms: tuple[str, ...] | None  # the platforms it runs on (None: all)


_BACKENDS: dict[str, AttentionBackend] = {}
_WARNED: set[tuple[str, str]] = set()


def _warn_once(backend: str, reason: str, message: str, level: int = logging.WARNING) -> None:
  """Logs `message` the first time `backend` meets `reason` in this process."""
  if (backend, reason) not in _WARNED:
    _WARNED.add((backend, reason))
    _log.log(level, message)


def register_backend(name: str, fn: AttentionFn, supports: SupportsFn | None = None,
                     platforms: tuple[str, ...] | None = None) -> None:
  """Adds (or replaces) an attention backend under `name`, runnable on `platforms` (None: all)."""
  _BACKENDS[name] = AttentionBackend(name, fn, supports or (lambda q, k, v, platform: None), platforms)


def available_backends() -> tuple[str, ...]:
  return tuple(_BACKENDS)


# Names that no longer exist, with what replaced them (an error that says so rather than "unknown").
RENAMED = {"xla_chunked": "flash"}


def check_backend_name(backend: str, field: str = "attention_backend") -> str:
  """`backend` if registered, else a `ValueError` naming `field` (and the new name of a renamed backend)."""
  if backend in RENAMED:
    raise ValueError(f"{field}={backend!r} was renamed {RENAMED[backend]!r}; use {RENAMED[backend]!r}")
  if backend not in _BACKENDS:
    raise ValueError(f"{field}={backend!r}: unknown attention backend; available: {available_backends()}")
  return backend


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


def _scale_queries(q: jax.Array) -> jax.Array:
  """`q * 1/sqrt(D)` in q's dtype, as every backend applies it."""
  return q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)


def _heads_first(x: jax.Array) -> jax.Array:
  """`[B, N, H, D]` -> `[H, B, N, D]`: one head is contiguous (the layout of the flash loops)."""
  return x.transpose(2, 0, 1, 3)


def _xla_scaled(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`xla_attention` of `[B, Nq, H, D]` queries already scaled by 1/sqrt(D)."""
  b, nq, h, d = q.shape
  out = _grouped_attention(_to_groups(q), _to_groups(k), _to_groups(v))  # [B*H, Nq, D]
  return out.reshape(b, h, nq, d).transpose(0, 2, 1, 3)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Reference attention: `[B,Nq,H,D]`, `[B,Nk,H,D]`, `[B,Nk,H,D]` -> `[B,Nq,H,D]`."""
  return _xla_scaled(_scale_queries(q), k, v)


# Largest float32 logits block the chunked backend materialises at once (and the size
# above which `auto` leaves the one-block `xla` path on CPU). On CPUs a [B, H, Nq, Nk]
# block of hundreds of MB costs more in fresh-page faults and cache misses than in
# arithmetic; one head and ~4 MiB of logits at a time measured fastest at SD's
# 4096 x 8192 layer (one pinned core, forward: 4 MiB 0.77-0.82 s, 2 MiB 0.90 s,
# 8 MiB 0.94-1.1 s, 32 MiB 0.96-1.06 s; benchmarks/attention.py).
CHUNK_LOGITS_BYTES = 4 * 2**20
# Fewest queries per chunk whatever the budget says: the budget is computed from the
# global batch, and under data/FSDP sharding each device holds only its batch shard,
# so tiny chunks would only add loop trips.
MIN_QUERY_CHUNK = 32


def query_chunk_size(b: int, nq: int, nk: int, max_bytes: int | None = None) -> int:
  """Queries per chunk for `flash_attention`: one head's `[B, chunk, Nk]` float32 logits within `max_bytes`.

  At least `min(nq, MIN_QUERY_CHUNK)`; spread evenly over `ceil(nq / chunk)` chunks so that
  padding the last chunk wastes fewer than `n_chunks` rows.
  """
  max_bytes = CHUNK_LOGITS_BYTES if max_bytes is None else max_bytes
  chunk = max(1, max_bytes // (b * nk * 4))
  chunk = min(nq, max(chunk, MIN_QUERY_CHUNK))
  n_chunks = -(-nq // chunk)
  return -(-nq // n_chunks)


def _query_chunks(b: int, nq: int, nk: int, max_bytes: int | None = None) -> tuple[int, int]:
  """(`query_chunk_size`, the padding rows that make `nq` a whole number of chunks)."""
  chunk = query_chunk_size(b, nq, nk, max_bytes)
  return chunk, -(-nq // chunk) * chunk - nq


def _pad_queries(x: jax.Array, pad: int) -> jax.Array:
  """Zero rows appended on the query axis (2) of a heads-first `[H, B, Nq, ...]` array."""
  return jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3)) if pad else x


def _chunks_first(x: jax.Array, n_chunks: int) -> jax.Array:
  """`[n_chunks, B, c, ...]` stacked by a scan -> `[B, n_chunks * c, ...]`."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _flash_forward(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """`[H, B, Nq, D]` (scaled, Nq a multiple of chunk), `[H, B, Nk, D]` x2 -> out `[H, B, Nq, D]`, lse `[H, B, Nq]`."""
  n_chunks = q.shape[2] // chunk

  def one_head(_, qkv):
    qh, kh, vh = qkv  # [B, N, D]: this head's keys and values stay in cache over its query chunks

    def one_chunk(_, i):
      qc = jax.lax.dynamic_slice_in_dim(qh, i * chunk, chunk, axis=1)  # [B, c, D]
      logits = jnp.einsum("bqd,bkd->bqk", qc, kh, preferred_element_type=jnp.float32)  # [B, c, Nk]
      m = jnp.max(logits, axis=-1, keepdims=True)
      weights = jnp.exp(logits - m)  # unnormalised, in [0, 1]
      denom = jnp.sum(weights, axis=-1, keepdims=True)  # [B, c, 1]
      # Normalising after the second matmul touches [c, D] values instead of [c, Nk].
      out = jnp.einsum("bqk,bkd->bqd", weights.astype(vh.dtype), vh)
      out = (out / denom.astype(out.dtype)).astype(vh.dtype)
      return None, (out, (m + jnp.log(denom))[..., 0])

    _, (out, lse) = jax.lax.scan(one_chunk, None, jnp.arange(n_chunks))  # [n, B, c, D], [n, B, c]
    return None, (_chunks_first(out, n_chunks), _chunks_first(lse, n_chunks))

  _, (out, lse) = jax.lax.scan(one_head, None, (q, k, v))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_core(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
  return _flash_forward(q, k, v, chunk)[0]


def _flash_core_fwd(q, k, v, chunk):
  out, lse = _flash_forward(q, k, v, chunk)
  return out, (q, k, v, out, lse)  # no [Nq, Nk] residuals: the backward recomputes them per chunk


def _flash_core_bwd(chunk, residuals, d_out):
  """FlashAttention-2 backward, one head and query chunk at a time; dK and dV accumulate in float32."""
  q, k, v, out, lse = residuals
  n_chunks = q.shape[2] // chunk
  # delta_i = sum_j P_ij dP_ij = rowsum(dO * O): the softmax Jacobian's correction term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [H, B, Nq]

  def one_head(_, xs):
    qh, kh, vh, doh, lse_h, delta_h = xs  # [B, N, D] / [B, Nq]
    v_t = jnp.swapaxes(vh, 1, 2)  # [B, D, Nk]

    # Every einsum below contracts dims that XLA's CPU matmuls take without copying the
    # [c, Nk] blocks: dK and dV are accumulated transposed ([D, Nk]) for that.
    def one_chunk(carry, i):
      dk_t, dv_t = carry
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
      qc, doc, lse_c, delta_c = sl(qh), sl(doh), sl(lse_h), sl(delta_h)
      logits = jnp.einsum("bqd,bkd->bqk", qc, kh, preferred_element_type=jnp.float32)  # [B, c, Nk]
      p = jnp.exp(logits - lse_c[..., None])  # the forward's probabilities
      dv_t = dv_t + jnp.einsum("bqd,bqk->bdk", doc, p.astype(doc.dtype), preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqd,bdk->bqk", doc, v_t, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_c[..., None])).astype(qh.dtype)  # dL/dlogits
      dqc = jnp.einsum("bqk,bkd->bqd", ds, kh, preferred_element_type=jnp.float32).astype(qh.dtype)
      dk_t = dk_t + jnp.einsum("bqd,bqk->bdk", qc, ds, preferred_element_type=jnp.float32)
      return (dk_t, dv_t), dqc

    zeros = jnp.zeros(v_t.shape, jnp.float32)
    (dk_t, dv_t), dq = jax.lax.scan(one_chunk, (zeros, zeros), jnp.arange(n_chunks))  # dq [n, B, c, D]
    grads = (_chunks_first(dq, n_chunks), jnp.swapaxes(dk_t, 1, 2).astype(kh.dtype),
             jnp.swapaxes(dv_t, 1, 2).astype(vh.dtype))
    return None, grads

  _, (dq, dk, dv) = jax.lax.scan(one_head, None, (q, k, v, d_out, lse, delta))
  return dq, dk, dv


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


def _flash_backward(q, k, v, out, lse, d_out):
  """`flash`'s backward in `[B, N, H, D]` layout: grads wrt (scaled) q, k, v from out and the `[B, H, Nq]` lse."""
  b, nq, _, _ = q.shape
  chunk, pad = _query_chunks(b, nq, k.shape[1])
  # Padded query rows (zero q, output, cotangent and lse) contribute nothing to dk and dv.
  rows = lambda x: _pad_queries(_heads_first(x), pad)
  lse_h = _pad_queries(lse.transpose(1, 0, 2), pad)  # [H, B, Nq + pad]
  dq, dk, dv = _flash_core_bwd(chunk, (rows(q), _heads_first(k), _heads_first(v), rows(out), lse_h), rows(d_out))
  back = lambda x: x.transpose(1, 2, 0, 3)
  return back(dq[:, :, :nq]), back(dk), back(dv)


def _one_block_backward(q, k, v, out, lse, d_out):
  """The same gradients as `_flash_backward`, all heads and queries in one block (logits within the budget).

  The chunked loop's per-head, per-chunk steps cost more than they save at these sizes.
  """
  b, nq, h, d = q.shape
  f32 = jnp.float32
  qg, kg, vg, og, dog = (_to_groups(x) for x in (q, k, v, out, d_out))  # [B*H, N, D]
  logits = jnp.einsum("gqd,gkd->gqk", qg, kg, preferred_element_type=f32)
  p = jnp.exp(logits - lse.reshape(b * h, nq, 1))  # the forward's probabilities
  delta = jnp.sum(dog.astype(f32) * og.astype(f32), axis=-1, keepdims=True)  # [B*H, Nq, 1]
  dv = jnp.einsum("gqk,gqd->gkd", p.astype(dog.dtype), dog, preferred_element_type=f32)
  dp = jnp.einsum("gqd,gkd->gqk", dog, vg, preferred_element_type=f32)
  ds = (p * (dp - delta)).astype(q.dtype)
  dq = jnp.einsum("gqk,gkd->gqd", ds, kg, preferred_element_type=f32)
  dk = jnp.einsum("gqk,gqd->gkd", ds, qg, preferred_element_type=f32)
  back = lambda x, like: x.reshape(b, h, -1, d).transpose(0, 2, 1, 3).astype(like.dtype)
  return back(dq, q), back(dk, k), back(dv, v)


@jax.custom_vjp
def _cpu_fused_core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return cpu_attention.forward(q, k, v)[0]


def _cpu_fused_core_fwd(q, k, v):
  out, lse = cpu_attention.forward(q, k, v)
  return out, (q, k, v, out, lse)


def _cpu_fused_core_bwd(residuals, d_out):
  q, k, v, out, lse = residuals
  if _logits_bytes(q, k) <= CHUNK_LOGITS_BYTES:
    return _one_block_backward(q, k, v, out, lse, d_out)
  return _flash_backward(q, k, v, out, lse, d_out)


_cpu_fused_core.defvjp(_cpu_fused_core_fwd, _cpu_fused_core_bwd)


def cpu_fused_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`xla_attention`'s function by the fused CPU kernel (`models/cpu_attention.cc`); backward as `flash`'s.

  Args:
    q: `[B, Nq, H, D]` float32 queries.
    k: `[B, Nk, H, D]` float32 keys.
    v: `[B, Nk, H, D]` float32 values.

  Returns:
    `[B, Nq, H, D]`.
  """
  return _cpu_fused_core(_scale_queries(q), k, v)


def _cpu_fused_supports(q: jax.Array, k: jax.Array, v: jax.Array, platform: str) -> str | None:
  if {q.dtype, k.dtype, v.dtype} != {jnp.dtype(jnp.float32)}:
    return f"the fused CPU kernel takes float32, got {q.dtype}/{k.dtype}/{v.dtype}"
  if jax.device_count() > 1:  # a custom call is not partitioned: under jit over a mesh its inputs would be gathered
    return f"the fused CPU kernel runs on one device ({jax.device_count()} here)"
  return cpu_attention.unavailable_reason()


def _logits_bytes(q: jax.Array, k: jax.Array) -> int:
  """Bytes of the float32 `[B, H, Nq, Nk]` logits of one-block attention."""
  b, nq, h, _ = q.shape
  return b * h * nq * k.shape[1] * 4


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, max_bytes: int | None = None) -> jax.Array:
  """Memory-efficient attention: a loop over heads and query chunks, the batch vectorised, custom VJP.

  Same function as `xla_attention` (scale 1/sqrt(D) applied to q in its dtype, softmax
  statistics in float32, output in v's dtype), but only one head's `[B, chunk, Nk]` logits
  exist at a time, forward and backward: the forward saves the output and the per-query
  logsumexp, and the backward recomputes the probabilities chunk by chunk (FlashAttention-2).
  The batch stays an array dimension of every einsum, so a batch-sharded input stays
  sharded. Heads are looped, outermost, rather than vectorised: one head's keys and values
  then stay in cache over all its query chunks, which measured ~1.3x faster on CPU at
  SD's 4096 x 8192 layer than streaming all heads' (benchmarks/attention.py).
  Shapes too small to need chunking take the plain `xla_attention` path.

  Args:
    q: `[B, Nq, H, D]` queries.
    k: `[B, Nk, H, D]` keys.
    v: `[B, Nk, H, D]` values.
    max_bytes: float32 logits budget per chunk (computed from the global shapes);
      None: `CHUNK_LOGITS_BYTES`.

  Returns:
    `[B, Nq, H, D]`.
  """
  b, nq, _, _ = q.shape
  max_bytes = CHUNK_LOGITS_BYTES if max_bytes is None else max_bytes
  if _logits_bytes(q, k) <= max_bytes:
    return xla_attention(q, k, v)
  chunk, pad = _query_chunks(b, nq, k.shape[1], max_bytes)
  # Padded queries see real keys (no NaNs), get zero cotangents, and are cut off below.
  qh = _pad_queries(_heads_first(_scale_queries(q)), pad)
  out = _flash_core(qh, _heads_first(k), _heads_first(v), chunk)[:, :, :nq]  # [H, B, Nq, D]
  return out.transpose(1, 2, 0, 3)


def _dot_product(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  # jax.nn.dot_product_attention uses the same [B, T, N, H] layout as ours.
  return jax.nn.dot_product_attention(q, k, v)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def _cudnn_supports(q: jax.Array, k: jax.Array, v: jax.Array, platform: str) -> str | None:
  if q.dtype not in (jnp.float16, jnp.bfloat16):
    return f"cuDNN attention needs float16/bfloat16 inputs, got {q.dtype}"
  d = q.shape[-1]
  if d % 8 or d > 128:
    return f"cuDNN attention needs head_dim % 8 == 0 and <= 128, got {d}"
  return None


# `auto` on a TPU: splash from this many queries and keys up. Compiled for v5p with libtpu, forward + backward at
# batch 8 per chip (benchmarks/results/tpu-plan.md, a cost model, not a measurement): splash at 0.62x xla's time at
# 4096 x 8192 (D 40) and 0.78x at 1024 x 2048 (D 80), but 1.2x at 256 x 512, 2.7x at 64 x 128 and 1.3-2x for every
# cross-attention over 77 tokens (the kernel pads 77 keys to 128 and its fixed costs dominate small calls).
TPU_SPLASH_MIN_TOKENS = 1024


def tpu_auto_backend(nq: int, nk: int) -> str:
  """`auto` on a TPU for `nq` queries over `nk` keys (see `auto_backend`)."""
  return "splash" if min(nq, nk) >= TPU_SPLASH_MIN_TOKENS else "xla"


def auto_backend(q: jax.Array, k: jax.Array, v: jax.Array, platform: str | None = None) -> str:
  """The backend `auto` runs for these shapes on `platform` (None: `platforms.current_platform()`).

  A static rule (numbers in benchmarks/attention.py and benchmarks/results/tpu-plan.md).
  CPU: once the float32 logits outgrow `CHUNK_LOGITS_BYTES`, `cpu_fused` where it runs (float32,
  one device, the kernel built), else `flash`; below that `xla` (one block is fastest while it stays
  cache-sized: there the kernel's 48-row blocks and per-call setup measured up to 1.3x slower).
  GPU: `cudnn` where it applies, else `dot_product` (XLA's own choice). TPU: `splash` when both
  sequences are at least `TPU_SPLASH_MIN_TOKENS` (SD 1.5's self-attention at latent 64 and 32), else
  `xla` (cross-attention over 77 tokens, the 16x16 and 8x8 levels), the cheaper of the two per the TPU
  compiler's cost model and the kernels' roofline (benchmarks/tpu_attention.py). Others: `flash` for
  long sequences, else `xla`.
  """
  platform = platforms.current_platform() if platform is None else platform
  if platform == "gpu":
    return "cudnn" if backend_supports("cudnn", q, k, v, platform) is None else "dot_product"
  long = _logits_bytes(q, k) > CHUNK_LOGITS_BYTES
  if platform == "cpu" and long:
    reason = backend_supports("cpu_fused", q, k, v, platform)
    if reason is None:
      return "cpu_fused"
    _warn_once("auto", reason, f"not using the fused CPU kernel: {reason}", logging.INFO)
  if platform == "tpu":
    return tpu_auto_backend(q.shape[1], k.shape[1])
  return "flash" if long else "xla"


def _auto(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return _BACKENDS[auto_backend(q, k, v)].fn(q, k, v)


register_backend("xla", xla_attention)
register_backend("flash", flash_attention)
register_backend("cpu_fused", cpu_fused_attention, _cpu_fused_supports, ("cpu",))
register_backend("auto", _auto)
register_backend("dot_product", _dot_product)
register_backend("cudnn", _cudnn, _cudnn_supports, ("gpu",))
register_backend("splash", splash_attention.splash_attention, splash_attention.supports, ("tpu",))


def platform_reason(backend: str, platform: str) -> str | None:
  """None when `backend` runs on `platform` (for some shapes), else why not; shapes play no part."""
  runs_on = _BACKENDS[check_backend_name(backend)].platforms
  if runs_on is not None and platform not in runs_on:
    return f"{backend!r} runs on {'/'.join(runs_on)} only"
  return None


def backend_supports(backend: str, q: jax.Array, k: jax.Array, v: jax.Array, platform: str | None = None) -> str | None:
  """None when `backend` can run (q, k, v) on `platform` (None: the target being traced for), else why not."""
  platform = platforms.current_platform() if platform is None else platform
  return platform_reason(backend, platform) or _BACKENDS[backend].supports(q, k, v, platform)


def check_backend_platform(backend: str, platform: str, field: str = "attention_backend") -> None:
  """Raises when `backend` cannot run on `platform` whatever the shapes: the config check before any trace."""
  reason = platform_reason(backend, platforms.normalize(platform))
  if reason is not None:
    raise ValueError(f"{field}={backend!r} cannot run on platform {platform!r}: {reason} "
                     f"(use 'auto' to pick one that can)")


def check_runtime_fields(config: Any, name: str) -> None:
  """Validates a model config's `attention_backend` and `target_platform` (the backend must run on the platform
  when one is set), naming `name.field` in the error."""
  check_backend_name(config.attention_backend, f"{name}.attention_backend")
  platform = platforms.normalize(config.target_platform, f"{name}.target_platform")
  if platform:
    check_backend_platform(config.attention_backend, platform, f"{name}.attention_backend")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, backend: str = "xla") -> jax.Array:
  """Scaled dot-product attention through `backend` on the target platform (`platforms.current_platform()`).

  Args:
    q: `[B, Nq, H, D]` queries.
    k: `[B, Nk, H, D]` keys; `Nk` may differ from `Nq`.
    v: `[B, Nk, H, D]` values.
    backend: a name from `available_backends()`.

  Returns:
    `[B, Nq, H, D]`.

  Raises:
    ValueError: `backend` is unknown, or cannot run these shapes/dtypes on the target platform.
  """
  platform = platforms.current_platform()
  reason = backend_supports(backend, q, k, v, platform)
  if reason is not None:
    raise ValueError(f"attention backend {backend!r} cannot run q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype} on "
                     f"platform {platform!r}: {reason} (use 'auto' to pick one that can)")
  return _BACKENDS[backend].fn(q, k, v)


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
    if extra_kv is not None:
      # For inspection only (`eval.reference_attention`): kept when "intermediates" is mutable, else a no-op.
      self.sow("intermediates", "reference_qk", (q, k))
    out = attend(q, k, v, self.backend).reshape(b, n, inner)  # [B, N, H*D]
    return dense(x.shape[-1], "to_out_0", bias=True)(out)
