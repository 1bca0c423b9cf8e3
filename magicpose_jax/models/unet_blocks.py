"""Down, mid and up blocks of the SD UNet (diffusers' `unet_2d_blocks.py`, NHWC).

`heads == 0` gives the attention-free variants (`DownBlock2D`, `UpBlock2D`);
`heads > 0` the cross-attention ones (`CrossAttnDownBlock2D`, `CrossAttnUpBlock2D`).
Every block returns the normed self-attention inputs of its transformer blocks
in execution order (MagicPose's reference states); attention-free blocks return `[]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magicpose_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from magicpose_jax.models.transformer import Transformer2DModel

References = Sequence[jax.Array] | None


def _slice(references: References, index: int, count: int) -> References:
  return None if references is None else references[index * count:(index + 1) * count]


class _BlockBase(nn.Module):
  """Fields shared by every block; `resnet` and `transformer` build the named layers."""

  out_channels: int
  num_layers: int
  heads: int = 0
  transformer_layers: int = 1
  groups: int = 32
  eps: float = 1e-5
  use_linear_projection: bool = False
  backend: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def resnet(self, name: str, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(self.out_channels, self.groups, self.eps, scale, self.dtype,
                         self.param_dtype, name=name)

  def transformer(self, name: str) -> Transformer2DModel:
    return Transformer2DModel(self.heads, self.out_channels // self.heads, self.transformer_layers,
                              self.groups, self.use_linear_projection, self.backend, self.dtype,
                              self.param_dtype, name=name)


class DownBlock2D(_BlockBase):
  """`[B, H, W, C_in] -> (h [B, H', W', C], skips (num_layers + downsample) x [B, ., ., C], states)`."""

  add_downsample: bool = True
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, references: References = None,
               reference_mask: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...], list[jax.Array]]:
    skips, states = [], []
    for i in range(self.num_layers):
      x = self.resnet(f"resnets_{i}")(x, temb)
      if self.heads:
        x, s = self.transformer(f"attentions_{i}")(x, context, _slice(references, i, self.transformer_layers),
                                                            reference_mask)
        states += s
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, self.param_dtype,
                       name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips), states


class MidBlock2DCrossAttn(_BlockBase):
  """`resnets_0`, then (`attentions_i`, `resnets_{i+1}`) for each layer. `[B, H, W, C]`."""

  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, references: References = None,
               reference_mask: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    states = []
    x = self.resnet("resnets_0", self.output_scale_factor)(x, temb)
    for i in range(self.num_layers):
      x, s = self.transformer(f"attentions_{i}")(x, context, _slice(references, i, self.transformer_layers),
                                                            reference_mask)
      states += s
      x = self.resnet(f"resnets_{i + 1}", self.output_scale_factor)(x, temb)
    return x, states


class UpBlock2D(_BlockBase):
  """Consumes `skips` from the last: `[B, H, W, C_prev] -> ([B, 2H, 2W, C] (or H if last), states)`.

  `upsample_size` forces the upsampled size (diffusers' `upsample_size`, used when
  the input size is not a multiple of 2**num_downsamplers).
  """

  add_upsample: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array,
               references: References = None, reference_mask: jax.Array | None = None,
               upsample_size: tuple[int, int] | None = None) -> tuple[jax.Array, list[jax.Array]]:
    if len(skips) != self.num_layers:
      raise ValueError(f"{self.name}: expected {self.num_layers} skip tensors, got {len(skips)}")
    states = []
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)  # [B, H, W, C + C_skip]
      x = self.resnet(f"resnets_{i}")(x, temb)
      if self.heads:
        x, s = self.transformer(f"attentions_{i}")(x, context, _slice(references, i, self.transformer_layers),
                                                            reference_mask)
        states += s
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x, upsample_size)
    return x, states
