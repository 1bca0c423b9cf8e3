"""2-D convolutions (NHWC inputs, HWIO kernels) with the implementation chosen per shape.

XLA:CPU's convolution (a YNNPACK fusion in jaxlib 0.10.2; Eigen's spatial convolution before) is fast on large
maps but 2-3x slower than PyTorch's oneDNN on small maps with many channels: an SD 1.5 UNet's 16x16 and 8x8 levels at
1280-2560 channels (`benchmarks/conv.py`). There, `im2col` (the k*k shifted views concatenated on the channel
axis, then one `[B*H*W, k*k*Cin] x [k*k*Cin, Cout]` matmul) runs at matmul speed instead. Its extra
`[B, H, W, k*k*Cin]` buffer is small exactly where it is used. GPUs and TPUs keep `lax` (cuDNN / the TPU
convolution units are the fast path there).

On the 32x32 and 64x64 levels, where XLA's convolution already runs at 120-190 GFLOP/s on 2 cores, the 3x3 convs take
Winograd's minimal filtering F(2x2, 3x3) instead (Lavin & Gray 2016): each 4x4 input tile and the 3x3 kernel
are taken to a 4x4 transform domain, where a 2x2 output tile is 16 independent products over the channels, so
the multiplies drop 2.25x (16 instead of 36 per tile) and run as one batched `[16, tiles, Cin] x [16, Cin, Cout]`
matmul. Its transforms have coefficients 0, +-1 and +-1/2 only (exact in fp32), so its error stays at direct
convolution's (measured 1-2x its max error against float64, `tests/test_conv.py`). The larger tiles, F(4x4, 3x3),
would save 4x but carry ~7e-5 errors per conv on unit-scale outputs, too much for 1e-4 parity through a UNet.

The rules apply when the *target* platform is the CPU (`models/platforms.py`: the models' `target_platform`, else
the mesh being traced for, else the default devices), so a TPU or GPU program compiled on a CPU host keeps XLA's
convolution. `with conv_mode("lax"):` (benchmarks' XLA-only baseline, parity checks) keeps every conv on
`lax.conv_general_dilated`; `MAGICPOSE_CPU_CONV=lax` is the same as a documented environment override for a whole
process. Both are read when a conv is traced, so a function `jax.jit` has already traced keeps its earlier choice.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so `flax.linen.Conv` takes it as its
`conv_general_dilated` attribute and the parameters (`kernel [kh, kw, Cin, Cout]`, `bias`) are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from magicpose_jax.models import platforms

# Take the im2col path on CPU when the input map has at most this many pixels per image and at least this many
# channels. Measured with benchmarks/conv.py (fp32, batch 1, 2-core Sapphire Rapids, loaded): at 16x16 and 8x8
# with 640-2560 input channels im2col takes 0.5-0.8x XLA's forward time and 0.26-0.55x its forward+backward
# time; at 32x32 and 64x64 XLA's forward is as fast or faster; at <= 256 channels (tiny/mid configs) XLA wins
# or ties. Stride 2 likewise: the last downsampler (16x16 -> 8x8, 1280 channels) took 20 ms against XLA's 69 ms.
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 640
# Take Winograd F(2x2, 3x3) on CPU for fp32 3x3 convs with even output sizes on larger maps than im2col's, when
# the wider of input and output channels is at least this. Measured with benchmarks/conv.py (fp32, batch 1, 2
# threads, shuffled order, weight transform included): at 32x32 0.63-0.89x XLA's forward time at 320-1920 -> 640
# and 1280 -> 1280 channels; at 64x64 0.77-0.96x at 640-960 -> 320 and 640 -> 640, but 1.2x at 320 -> 320, where
# the transforms' memory traffic outweighs the saved multiplies; at 16x16 and 8x8 im2col stays faster (the
# transformed kernel, 16/9 of the kernel's bytes, is rebuilt on every call and dominates there). The SD VAE's
# decoder shapes (`--shapes vae`): 0.65-0.86x at 512 channels on 64-256 px maps, 0.93-1.2x at 256 and 1.35-1.5x
# at 128 channels on 256-512 px maps.
WINOGRAD_MIN_CHANNELS = 512
# Its transformed input and output hold 16 values per 2x2 output tile and channel, 4x the maps' bytes: where
# they would pass this many bytes each (a 256x256x512 map: 0.5 GiB), `winograd_conv` runs bands of output rows
# one after the other, each under it, so a large batch or map adds no gigabytes of temporaries.
WINOGRAD_MAX_TRANSFORM_BYTES = 256 * 2**20

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lax's (lhs, rhs, out) specs for NHWC x HWIO -> NHWC


def _is_nhwc(dimension_numbers: Any) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(map(tuple, dimension_numbers)) == _NHWC
  return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def use_im2col(input_shape: Sequence[int], kernel_shape: Sequence[int], platform: str | None = None) -> bool:
  """Whether `conv_general_dilated` takes the im2col path for an NHWC input and HWIO kernel (any stride)."""
  platform = platform or platforms.current_platform()
  _, h, w, cin = input_shape
  kh, kw = kernel_shape[:2]
  return platform == "cpu" and kh * kw > 1 and h * w <= IM2COL_MAX_PIXELS and cin >= IM2COL_MIN_CHANNELS


def use_winograd(input_shape: Sequence[int], kernel_shape: Sequence[int], padding: Sequence[tuple[int, int]],
                 dtype: Any = jnp.float32, platform: str | None = None) -> bool:
  """Whether `conv_general_dilated` takes `winograd_conv` for an NHWC input and HWIO kernel (stride 1)."""
  platform = platform or platforms.current_platform()
  _, h, w, cin = input_shape
  kh, kw, _, cout = kernel_shape
  (top, bottom), (left, right) = padding
  ho, wo = h + top + bottom - 2, w + left + right - 2
  return (platform == "cpu" and (kh, kw) == (3, 3) and jnp.dtype(dtype) == jnp.float32
          and ho % 2 == 0 and wo % 2 == 0 and h * w > IM2COL_MAX_PIXELS and max(cin, cout) >= WINOGRAD_MIN_CHANNELS)


# F(2x2, 3x3) transforms (Lavin & Gray 2016, eq. 7): Y = A^T [(G g G^T) * (B^T d B)] A for a 4x4 input tile d,
# a 3x3 kernel g and a 2x2 output tile Y.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
# The same transforms on flattened tiles: [16 (u, v), 16 (i, j)] input, [16 (u, v), 9 (i, j)] kernel and
# [2 (p), 2 (q), 16 (u, v)] output coefficients.
_WINOGRAD_BB = np.einsum("ui,vj->uvij", _WINOGRAD_BT, _WINOGRAD_BT).reshape(16, 16)
_WINOGRAD_GG = np.einsum("ui,vj->uvij", _WINOGRAD_G, _WINOGRAD_G).reshape(16, 9)
_WINOGRAD_AA = np.einsum("pu,qv->pquv", _WINOGRAD_AT, _WINOGRAD_AT).reshape(2, 2, 16)


def _combine(coefficients: np.ndarray, terms: Sequence[jax.Array]) -> jax.Array:
  """`sum_k coefficients[k] * terms[k]` over the nonzero coefficients, without multiplying by +-1."""
  out = None
  for c, t in zip(coefficients, terms, strict=True):
    if c == 0:
      continue
    term = t if c == 1 else -t if c == -1 else t * c
    out = term if out is None else out + term
  return out


def winograd_kernel(kernel: jax.Array, precision: Any = None) -> jax.Array:
  """The transformed kernel `G g G^T`: `[3, 3, Cin, Cout]` -> `[16, Cin, Cout]` (index `4 * u + v`)."""
  _, _, cin, cout = kernel.shape
  # One K=9 product: written as 16 elementwise combinations XLA:CPU runs it several times slower.
  u = jnp.dot(_WINOGRAD_GG.astype(kernel.dtype), kernel.reshape(9, cin * cout), precision=precision)
  return u.reshape(16, cin, cout)


def winograd_conv(x: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]],
                  precision: Any = None) -> jax.Array:
  """Stride-1 3x3 convolution by Winograd F(2x2, 3x3): `x [B, H, W, Cin]`, `kernel [3, 3, Cin, Cout]`.

  `padding` is `((top, bottom), (left, right))`; the output `[B, H', W', Cout]` (`H' = H + top + bottom - 2`,
  likewise `W'`) must have even `H'` and `W'` (2x2 output tiles). Gradients are XLA's convolution's (a custom
  VJP): differentiating through the transforms instead took 3-5x lax's forward+backward time
  (`benchmarks/conv.py`), which matters wherever a gradient crosses a frozen UNet (MagicPose's stage 1).
  Where the transformed maps would pass `WINOGRAD_MAX_TRANSFORM_BYTES`, bands of output rows run one by one.
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"winograd_conv needs a 3x3 kernel, got kernel shape {kernel.shape}")
  (top, bottom), (left, right) = padding
  ho, wo = x.shape[1] + top + bottom - 2, x.shape[2] + left + right - 2
  if ho % 2 or wo % 2:
    raise ValueError(f"winograd_conv needs even output sizes, got {ho}x{wo} (input {x.shape[1]}x{x.shape[2]} "
                     f"padded by {padding})")
  b, _, _, cin = x.shape
  tile_row_bytes = 16 * b * (wo // 2) * max(cin, kernel.shape[-1]) * jnp.dtype(x.dtype).itemsize
  band = max(1, WINOGRAD_MAX_TRANSFORM_BYTES // tile_row_bytes)  # tile rows (2 output rows each) per band
  if band >= ho // 2:
    return _winograd_conv(x, kernel, ((top, bottom), (left, right)), precision)
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  # Output rows [2r, 2(r + n)) read padded rows [2r, 2(r + n) + 2): bands overlap by two input rows.
  return jnp.concatenate([_winograd_conv(x[:, 2 * r:2 * min(r + band, ho // 2) + 2], kernel, ((0, 0), (0, 0)),
                                         precision) for r in range(0, ho // 2, band)], axis=1)


def _lax_nhwc(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...], precision: Any) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd_conv(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...],
                   precision: Any) -> jax.Array:
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  b, hp, wp, cin = x.shape
  th, tw = (hp - 2) // 2, (wp - 2) // 2  # output tiles per column / row
  cout = kernel.shape[-1]
  # Tile (ty, tx) reads padded rows 2ty..2ty+3: with rows split as (row // 2, row % 2) each of the 16 tile
  # offsets (i, j) is a plain slice, and the transform B^T d B a sum of +-slices, one fused pass over the input.
  xr = x.reshape(b, th + 1, 2, tw + 1, 2, cin)
  view = lambda i, j: xr[:, i // 2:i // 2 + th, i % 2, j // 2:j // 2 + tw, j % 2]  # [B, th, tw, Cin]
  v = sum(jnp.asarray(_WINOGRAD_BB[:, k].reshape(16, 1, 1, 1, 1), x.dtype) * view(*divmod(k, 4))[None]
          for k in range(16) if _WINOGRAD_BB[:, k].any())
  m = lax.dot_general(v.reshape(16, b * th * tw, cin), winograd_kernel(kernel, precision),
                      (((2,), (1,)), ((0,), (0,))), precision=precision)  # [16, tiles, Cout]
  m = m.reshape(16, b, th, tw, cout)
  y = [[_combine(_WINOGRAD_AA[p, q], list(m)) for q in range(2)] for p in range(2)]  # [B, th, tw, Cout]
  y = jnp.stack([jnp.stack(y[p], axis=3) for p in range(2)], axis=2)  # [B, th, 2, tw, 2, Cout]
  return y.reshape(b, 2 * th, 2 * tw, cout)


def _winograd_fwd(x, kernel, padding, precision):
  return _winograd_conv(x, kernel, padding, precision), (x, kernel)


def _winograd_bwd(padding, precision, residuals, g):
  x, kernel = residuals
  return jax.vjp(lambda x, k: _lax_nhwc(x, k, padding, precision), x, kernel)[1](g)


_winograd_conv.defvjp(_winograd_fwd, _winograd_bwd)


def im2col_conv(x: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]],
                precision: Any = None, strides: Sequence[int] = (1, 1)) -> jax.Array:
  """Convolution as one matmul: `x [B, H, W, Cin]`, `kernel [kh, kw, Cin, Cout]` -> `[B, H', W', Cout]`.

  `padding` is `((top, bottom), (left, right))`; `H' = (H + top + bottom - kh) // stride + 1` (likewise `W'`).
  """
  kh, kw, cin, cout = kernel.shape
  (top, bottom), (left, right) = padding
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  b, hp, wp, _ = x.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  # Channel index (i * kw + j) * Cin + c matches the row-major reshape of the HWIO kernel below.
  cols = jnp.concatenate([x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                          for i in range(kh) for j in range(kw)], axis=-1)
  out = jnp.dot(cols.reshape(b * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout), precision=precision)
  return out.reshape(b, ho, wo, cout)


CONV_MODES = ("auto", "lax")
ENV_OVERRIDE = "MAGICPOSE_CPU_CONV"
_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("magicpose_conv_mode", default=None)


@contextlib.contextmanager
def conv_mode(mode: str) -> Iterator[None]:
  """Traces the body with `mode`: "auto" (the rules above) or "lax" (every conv on XLA's; benchmarks' baseline)."""
  if mode not in CONV_MODES:
    raise ValueError(f"conv mode must be one of {CONV_MODES}, got {mode!r}")
  token = _MODE.set(mode)
  try:
    yield
  finally:
    _MODE.reset(token)


def _cpu_paths_enabled() -> bool:
  """The `conv_mode` context, else the `MAGICPOSE_CPU_CONV` override, else "auto"."""
  mode = _MODE.get() or os.environ.get(ENV_OVERRIDE, "auto")
  if mode not in CONV_MODES:
    raise ValueError(f"{ENV_OVERRIDE} must be 'auto' or 'lax', got {mode!r}")
  return mode == "auto"


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None, **kwargs: Any) -> jax.Array:
  """`lax.conv_general_dilated`, through `im2col_conv` / `winograd_conv` where `use_im2col` / `use_winograd` say
  they are faster."""
  plain = (_cpu_paths_enabled() and lhs.ndim == 4 and _is_nhwc(dimension_numbers) and feature_group_count == 1
           and not kwargs and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1))) and not isinstance(padding, str))
  pads = [tuple(p) for p in padding] if plain else None
  if plain and use_im2col(lhs.shape, rhs.shape):
    return im2col_conv(lhs, rhs, pads, precision, tuple(window_strides))
  if (plain and tuple(window_strides) == (1, 1)
      and use_winograd(lhs.shape, rhs.shape, pads, jnp.result_type(lhs, rhs))):
    return winograd_conv(lhs, rhs, pads, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, precision=precision, **kwargs)
