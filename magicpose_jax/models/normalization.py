"""GroupNorm with float32 statistics that stay accurate over large groups (torch.nn.GroupNorm's numerics, NHWC).

Every norm of the UNet, ControlNet and VAE is a GroupNorm, and a group of SD 1.5's VAE at 512 px holds
64 x 64 x 4 = 16384 values per image (the UNet's 40960). flax's `nn.GroupNorm` takes each group's mean as one
`jnp.mean`, which XLA's CPU backend lowers to a single running float32 sum. Its rounding error grows with the
count, and on images (flat backgrounds, flat clothes: the same value added thousands of times) it does not average
out: on the packaged demo VAE's first encoder norm (64 x 64 x 2 values per group) the group mean came out 2.5e-5
off and the encoder's raw latents 1.6e-4 off float64 (torch's float32 3e-6). Two changes, both standard:

- **Shifted data.** Each group's first value is subtracted before summing, so the sums run over deviations
  (exactly 0 on flat regions) instead of raw values; the mean adds the shift back.
- **Two-level sums.** Each statistic is summed within rows, then across them, with an `optimization_barrier`
  between so that XLA cannot fuse the two back into one sequential sum.

On a flat figure on a flat background (tests/test_normalization.py) the normalised output's error against float64 drops
from 3.7e-4 (flax) to 2e-6. Both are for XLA:CPU only, chosen by the platform traced for (`models/platforms.py`):
GPU and TPU reduce in trees already, and there the barrier and the extra pass would double the layer's HBM traffic
(TPU v5e cost model) for nothing, so they keep flax's plain two-pass statistics. On CPU the layer alone takes 1.1-2.1x
flax's time; the SD 1.5 UNet forward 0.97x, the VAE decode 1.11x, both within noise (benchmarks/results/groupnorm.md).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from magicpose_jax.models import platforms


def _rows(length: int) -> int:
  """The divisor of `length` nearest its square root from below: rows of the first-level sums."""
  for r in range(math.isqrt(length), 0, -1):
    if length % r == 0:
      return r
  return 1


def _group_sum(x: jax.Array) -> jax.Array:
  """Sum of `[B, L, G, C/G]` over axes 1 and 3 in two levels: `[B, G]`, float32-accurate for large L.

  The first level adds rows of whole channel vectors (`[B, rows, G, C/G]`: contiguous in NHWC, so it vectorises
  across the channels; measured 1.1-1.4x faster on CPU than summing each group's values within a row first).
  """
  b, length, groups, per_group = x.shape
  rows = _rows(length)
  partial = x.reshape(b, rows, length // rows, groups, per_group).sum(axis=2)  # [B, rows, G, C/G]
  # Without the barrier XLA fuses both levels into one reduction that sums every value in sequence again.
  return jax.lax.optimization_barrier(partial).sum(axis=(1, 3))


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
  """`x` `[B, ..., C]` as `[B, L, G, C/G]` (L: the product of the spatial axes), in at least float32."""
  b, c = x.shape[0], x.shape[-1]
  if c % num_groups:
    raise ValueError(f"GroupNorm: {c} channels do not split into {num_groups} groups")
  return x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(b, -1, num_groups, c // num_groups)


def group_statistics(xg: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-image, per-group mean and (two-pass, biased) variance of grouped activations `xg` `[B, L, G, C/G]`
  (float32); shifted, two-level sums when traced for the CPU (see the module docstring).

  Returns:
    `(mean, var)`, each `[B, 1, G, 1]`. The variance is `E[(x - E[x])^2]`, as torch's: flax's fast
    `E[x^2] - E[x]^2` cancels catastrophically when |mean| >> std (tests/test_unet_parity.py).
  """
  if platforms.current_platform() != "cpu":  # tree-shaped reductions: flax's statistics, at flax's cost
    mean = xg.mean(axis=(1, 3), keepdims=True)
    return mean, jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
  count = xg.shape[1] * xg.shape[3]
  # Any value of the group is a valid shift; the gradient of the mean does not depend on it.
  shift = jax.lax.stop_gradient(xg[:, :1, :, :1])  # [B, 1, G, 1]
  deviation = xg - shift
  mean_deviation = (_group_sum(deviation) / count)[:, None, :, None]
  var = (_group_sum(jnp.square(deviation - mean_deviation)) / count)[:, None, :, None]
  mean = shift + mean_deviation
  return mean, var


class GroupNorm(nn.Module):
  """`torch.nn.GroupNorm` on NHWC: `[B, ..., C] -> [B, ..., C]`, params `scale` and `bias` `[C]` (flax's names).

  Statistics and the affine map run in at least float32; the output is cast to `dtype`.
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    xg = _grouped(x, self.num_groups)  # [B, L, G, C/G]
    mean, var = group_statistics(xg)
    # flax's order of operations: (x - mean) * (rsqrt(var + eps) * scale) + bias.
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(mean.dtype).reshape(self.num_groups, -1)
    y = (xg - mean) * mul + bias.astype(mean.dtype).reshape(self.num_groups, -1)
    return y.reshape(x.shape).astype(self.dtype)
