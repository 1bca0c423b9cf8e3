"""TPU splash attention (a Pallas kernel) for our `[B, N, H, D]` attention, with padding and batch sharding.

`jax.experimental.pallas.ops.tpu.splash_attention` is a FlashAttention-2 style kernel for TPUs: forward and
backward kernels, no `[Nq, Nk]` logits in HBM. It takes one example's `[H, N, D]` queries/keys/values with the
sequence lengths a multiple of its block sizes. SD 1.5 has head dims 40/80/160 and cross-attention over 77 text
tokens, so `splash_attention`

  * keeps the head dim as it is: Mosaic compiles the kernel at D = 40, 80 and 160 (checked with libtpu for
    v5e/v5p, `benchmarks/tpu_attention.py`), and zero-padding D to 128 only multiplied the kernel's HBM traffic
    (3.2x at D = 40) for the same MXU passes (the MXU pads a 40-deep contraction to its 128 rows either way).
    `pad_head_dim=True` keeps the old padding for comparison; the scale is 1/sqrt(true D), applied to q first;
  * pads the sequences to a multiple of 128 and masks padded keys out with segment ids (queries in segment 0,
    real keys 0, padded keys 1); padded query rows attend to the real keys and are sliced off, so their
    cotangents are zero;
  * vmaps the kernel over the batch and, inside a mesh context whose `data`/`fsdp` axes split the batch, runs it
    under `jax.shard_map` over those axes: a Pallas call is opaque to XLA's sharding propagation, which would
    otherwise gather the global batch onto every device (and the TPU compiler refuses to partition it). A batch
    the mesh cannot split runs replicated under `shard_map`.

On a machine without a TPU the kernel runs only in Pallas' interpreter (`interpret=True`, what the tests do on
CPU: slow, for correctness). The `splash` backend in `models/attention.py` calls this when the target platform
is a TPU (`models/platforms.py`: also when compiling for a TPU topology from a CPU host); naming it for any other
target is an error.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LANES = 128  # the TPU vector lane count: head dims and sequence blocks are multiples of it
# Largest tile along each sequence; the kernel's blocks must divide the (padded) lengths, so each block is the
# largest of (MAX_BLOCK, MAX_BLOCK / 2, ..., 128) that does. 512 is what MaxText / MaxDiffusion default to.
MAX_BLOCK = 512
# The mesh axes that split the batch: the same names as `train.sharding.BATCH_AXES` (models do not import train;
# tests/test_splash_attention.py checks that the two agree).
BATCH_MESH_AXES = ("data", "fsdp")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block(length: int) -> int:
  """The largest power-of-two multiple of 128, at most `MAX_BLOCK`, dividing `length` (itself a multiple of 128)."""
  block = MAX_BLOCK
  while length % block:
    block //= 2
  return block


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, nq: int, nk: int, interpret: bool):
  """The splash MHA kernel for `[heads, nq, D]` x `[heads, nk, D]` (padded lengths), full (unmasked) attention."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415  (Pallas TPU: only when used)
      splash_attention_kernel as kernel,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask  # noqa: PLC0415

  bq, bk = _block(nq), _block(nk)
  blocks = kernel.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                             block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  full = mask.MultiHeadMask([mask.FullMask((nq, nk))] * heads)
  # Built eagerly even when first called inside a trace: the kernel holds the mask's block tables as arrays, and
  # the cached kernel is reused by later traces, so they must be constants, not this trace's tracers.
  with jax.ensure_compile_time_eval():
    return kernel.make_splash_mha(full, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool = False,
                     pad_head_dim: bool = False) -> jax.Array:
  """Attention through the TPU splash kernel; the same function as `attention.xla_attention`.

  Args:
    q: `[B, Nq, H, D]` queries.
    k: `[B, Nk, H, D]` keys (`Nk` free).
    v: `[B, Nk, H, D]` values.
    interpret: run the kernel in Pallas' interpreter (any platform; for tests).
    pad_head_dim: zero-pad D to a multiple of 128 (the old layout; for `benchmarks/tpu_attention.py`).

  Returns:
    `[B, Nq, H, D]` in v's dtype.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as kernel,
  )

  b, nq, h, d = q.shape
  nk = k.shape[1]
  nq_pad, nk_pad = _round_up(nq, LANES), _round_up(nk, LANES)
  d_pad = _round_up(d, LANES) if pad_head_dim else d
  q = q * jnp.asarray(d**-0.5, q.dtype)

  def heads_first(x: jax.Array, n_pad: int) -> jax.Array:  # [B, N, H, D] -> [B, H, N', D'], zero-padded
    x = x.transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - x.shape[2]), (0, d_pad - d)))

  qh, kh, vh = heads_first(q, nq_pad), heads_first(k, nk_pad), heads_first(v, nk_pad)
  segments = None
  if nk_pad != nk:  # padded keys get their own segment: no real query (segment 0) attends to them
    segments = kernel.SegmentIds(q=jnp.zeros((nq_pad,), jnp.int32),
                                 kv=(jnp.arange(nk_pad) >= nk).astype(jnp.int32))
  splash = _kernel(h, nq_pad, nk_pad, interpret)
  run = jax.vmap(lambda q1, k1, v1: splash(q1, k1, v1, segment_ids=segments))

  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_MESH_AXES if not mesh.empty and a in mesh.axis_names and mesh.shape[a] > 1)
  shards = math.prod(mesh.shape[a] for a in axes)
  if shards > 1 and b % shards == 0:
    spec = P(axes)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  elif not mesh.empty and mesh.size > 1:
    # A batch the mesh does not split (the sampler's one reference): every device runs the whole call. Mosaic
    # kernels cannot be partitioned automatically, so they are wrapped all the same, replicated.
    run = jax.shard_map(run, mesh=mesh, in_specs=(P(),) * 3, out_specs=P(), check_vma=False)
  out = run(qh, kh, vh)  # [B, H, Nq', D']
  return out[:, :, :nq, :d].transpose(0, 2, 1, 3).astype(v.dtype)


def supports(q: jax.Array, k: jax.Array, v: jax.Array, platform: str) -> str | None:
  """None on a TPU target (any shape: padding handles the rest), else why not."""
  if platform != "tpu":
    return "splash attention is a TPU kernel"
  return None


def padding_overhead(q_shape: tuple[int, ...], k_shape: tuple[int, ...], pad_head_dim: bool = False) -> float:
  """Kernel FLOPs / true FLOPs of `splash_attention` as called for these `[B, N, H, D]` shapes (lengths padded to
  128; the head dim too with `pad_head_dim`): 1.0 at SD 1.5's 4096 x 8192 self-attention, 128/77 for its
  cross-attention, and 3.2 at head dim 40 with `pad_head_dim` (the old layout)."""
  (_, nq, _, d), nk = q_shape, k_shape[1]
  padded = _round_up(nq, LANES) * _round_up(nk, LANES) * (_round_up(d, LANES) if pad_head_dim else d)
  return float(padded / (nq * nk * d))

