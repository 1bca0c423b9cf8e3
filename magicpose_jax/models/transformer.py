"""Spatial transformer of the SD UNet (diffusers' `Transformer2DModel` + `BasicTransformerBlock`).

Each `BasicTransformerBlock` returns, besides its output, the normed input of its
self-attention (`norm1(x)`): these are MagicPose's reference states. When a
reference state `r` is passed in, self-attention keys/values run over `[norm1(x); r]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magicpose_jax.models.attention import Attention
from magicpose_jax.models.normalization import GroupNorm
from magicpose_jax.models.resnet import conv


class FeedForward(nn.Module):
  """GEGLU feed-forward: `net.0` (GEGLU, dim -> inner), `net.2` (inner -> dim). `[B, N, dim]`."""

  mult: int = 4
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    h = GEGLU(dim * self.mult, self.dtype, self.param_dtype, name="net_0")(x)
    return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class GEGLU(nn.Module):
  """`proj` (dim -> 2·features), then `h * gelu(gate)`: `[B, N, dim] -> [B, N, features]`."""

  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)  # 2 x [B, N, features]
    return h * nn.gelu(gate, approximate=False)  # diffusers' GEGLU uses the exact (erf) GELU


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and GEGLU FF, each pre-LayerNorm with a residual.

  `x [B, N, C]`, `context [B, L, D]`, `reference [B, R, C] | None`, `reference_mask [B] bool | None`
  (False rows ignore their reference) -> `(out [B, N, C], norm1(x) [B, N, C])`.
  """

  heads: int
  head_dim: int
  backend: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, reference: jax.Array | None = None,
               reference_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    attn = lambda name: Attention(self.heads, self.head_dim, self.backend, self.dtype,
                                  self.param_dtype, name=name)
    normed = norm("norm1")(x)
    if reference is not None and reference_mask is not None:
      # Rows without a reference attend over [h; h], which is exactly attention over h (every key
      # and value duplicated leaves the softmax average unchanged): classifier-free guidance can batch
      # "with reference" and "without" rows in one call, with no attention mask for any backend.
      if reference.shape != normed.shape:
        raise ValueError(f"reference_mask needs reference states shaped like the block's own tokens "
                         f"{normed.shape}, got {reference.shape}")
      reference = jnp.where(reference_mask[:, None, None], reference.astype(normed.dtype), normed)
    x = x + attn("attn1")(normed, extra_kv=reference)
    x = x + attn("attn2")(norm("norm2")(x), context)
    x = x + FeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(norm("norm3")(x))
    return x, normed


class Transformer2DModel(nn.Module):
  """GroupNorm, `proj_in` (1×1 conv, or dense with `use_linear_projection`), blocks, `proj_out`, residual.

  `x [B, H, W, C]` -> `(out [B, H, W, C], normed states: one [B, H*W, C] per block)`.
  """

  heads: int
  head_dim: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  backend: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, references: Sequence[jax.Array] | None = None,
               reference_mask: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    b, hgt, wid, c = x.shape
    inner = self.heads * self.head_dim
    if self.use_linear_projection:
      proj = lambda name, f: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    else:
      proj = lambda name, f: conv(f, 1, name, self.dtype, self.param_dtype)
    h = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    # A 1x1 conv and a dense layer are the same map on NHWC; only the kernel shape differs.
    h = proj("proj_in", inner)(h).reshape(b, hgt * wid, inner)  # [B, H*W, inner]
    states = []
    for i in range(self.num_layers):
      ref = None if references is None else references[i]
      h, normed = BasicTransformerBlock(self.heads, self.head_dim, self.backend, self.dtype,
                                        self.param_dtype, name=f"transformer_blocks_{i}")(h, context, ref,
                                                                                          reference_mask)
      states.append(normed)
    h = proj("proj_out", c)(h.reshape(b, hgt, wid, inner))  # [B, H, W, C]
    return h + x, states
