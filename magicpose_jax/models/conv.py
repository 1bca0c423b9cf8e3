"""2-D convolutions (NHWC inputs, HWIO kernels) with the implementation chosen per shape.

XLA:CPU lowers `lax.conv_general_dilated` to Eigen's spatial convolution, which is fast on large maps but
2-3x slower than PyTorch's oneDNN on small maps with many channels: an SD 1.5 UNet's 16x16 and 8x8 levels at
1280-2560 channels (`benchmarks/conv.py`). There, `im2col` (the k*k shifted views concatenated on the channel
axis, then one `[B*H*W, k*k*Cin] x [k*k*Cin, Cout]` matmul) runs at matmul speed instead. Its extra
`[B, H, W, k*k*Cin]` buffer is small exactly where it is used. GPUs and TPUs keep `lax` (cuDNN / the TPU
convolution units are the fast path there).

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so `flax.linen.Conv` takes it as its
`conv_general_dilated` attribute and the parameters (`kernel [kh, kw, Cin, Cout]`, `bias`) are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# Take the im2col path on CPU when the input map has at most this many pixels per image and at least this many
# channels. Measured with benchmarks/conv.py (fp32, batch 1, 2-core Sapphire Rapids, loaded): at 16x16 and 8x8
# with 640-2560 input channels im2col takes 0.5-0.8x Eigen's forward time and 0.26-0.55x its forward+backward
# time; at 32x32 and 64x64 Eigen's forward is as fast or faster; at <= 256 channels (tiny/mid configs) Eigen wins
# or ties.
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 640

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lax's (lhs, rhs, out) specs for NHWC x HWIO -> NHWC


def _is_nhwc(dimension_numbers: Any) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(map(tuple, dimension_numbers)) == _NHWC
  return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def use_im2col(input_shape: Sequence[int], kernel_shape: Sequence[int], platform: str | None = None) -> bool:
  """Whether `conv_general_dilated` takes the im2col path for an NHWC input and HWIO kernel (stride 1)."""
  platform = platform or jax.default_backend()
  _, h, w, cin = input_shape
  kh, kw = kernel_shape[:2]
  return platform == "cpu" and kh * kw > 1 and h * w <= IM2COL_MAX_PIXELS and cin >= IM2COL_MIN_CHANNELS


def im2col_conv(x: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]],
                precision: Any = None) -> jax.Array:
  """Stride-1 convolution as one matmul: `x [B, H, W, Cin]`, `kernel [kh, kw, Cin, Cout]` -> `[B, H', W', Cout]`.

  `padding` is `((top, bottom), (left, right))`; `H' = H + top + bottom - kh + 1` (likewise `W'`).
  """
  kh, kw, cin, cout = kernel.shape
  (top, bottom), (left, right) = padding
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  b, hp, wp, _ = x.shape
  ho, wo = hp - kh + 1, wp - kw + 1
  # Channel index (i * kw + j) * Cin + c matches the row-major reshape of the HWIO kernel below.
  cols = jnp.concatenate([x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
  out = jnp.dot(cols.reshape(b * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout), precision=precision)
  return out.reshape(b, ho, wo, cout)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None, **kwargs: Any) -> jax.Array:
  """`lax.conv_general_dilated`, through `im2col_conv` where `use_im2col` says it is faster."""
  plain = (lhs.ndim == 4 and _is_nhwc(dimension_numbers) and feature_group_count == 1 and not kwargs
           and tuple(window_strides) == (1, 1) and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1))) and not isinstance(padding, str))
  if plain and use_im2col(lhs.shape, rhs.shape):
    return im2col_conv(lhs, rhs, [tuple(p) for p in padding], precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, precision=precision, **kwargs)
