"""ResNet block, down- and up-sampling of the SD UNet (diffusers' `resnet.py`, NHWC)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from magicpose_jax.models.conv import conv_general_dilated
from magicpose_jax.models.normalization import GroupNorm


def conv(features: int, kernel: int, name: str, dtype: jnp.dtype, param_dtype: jnp.dtype,
         stride: int = 1, padding: int | None = None) -> nn.Conv:
  """A 2-D convolution with PyTorch's explicit symmetric padding (default `kernel // 2`); see `models/conv.py`."""
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, param_dtype=param_dtype, name=name, conv_general_dilated=conv_general_dilated)


class ResnetBlock2D(nn.Module):
  """`norm1 -> SiLU -> conv1 (+ time_emb_proj) -> norm2 -> SiLU -> conv2`, plus a skip.

  The 1×1 `conv_shortcut` exists exactly when input and output channels differ,
  as in diffusers (`use_in_shortcut` default). `[B, H, W, C_in] -> [B, H, W, C_out]`.
  """

  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
    # torch's numerics (models/normalization.py): two-pass variance, float32-accurate sums over large groups.
    norm = lambda name: GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=name)
    h = conv(self.out_channels, 3, "conv1", self.dtype, self.param_dtype)(nn.silu(norm("norm1")(x)))
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]  # [B, 1, 1, C] broadcast over H, W
    h = conv(self.out_channels, 3, "conv2", self.dtype, self.param_dtype)(nn.silu(norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "conv_shortcut", self.dtype, self.param_dtype)(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """Stride-2 3×3 conv (`downsamplers.0.conv`): `[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]`."""

  out_channels: int
  padding: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding == 0:
      # diffusers pads (0, 1, 0, 1) by hand before an unpadded conv.
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.out_channels, 3, "conv", self.dtype, self.param_dtype, stride=2,
                padding=self.padding)(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch's `interpolate(mode="nearest")`: source index `floor(dst * in / out)`. `[B,H,W,C]`."""
  h, w = x.shape[1:3]
  rows = (jnp.arange(size[0]) * h) // size[0]
  cols = (jnp.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """Nearest 2× (or to `size`) then a 3×3 conv (`upsamplers.0.conv`). `[B, H, W, C]`."""

  out_channels: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    else:
      x = nearest_resize(x, size)
    return conv(self.out_channels, 3, "conv", self.dtype, self.param_dtype)(x)
