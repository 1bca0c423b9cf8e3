"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`) in Flax, NHWC.

Param names follow diffusers' module names with `_N` for list indices
(`encoder/down_blocks_0/resnets_1/conv1/kernel`, `decoder/mid_block/attentions_0/to_out_0/kernel`),
so the converter in `magicpose_jax.convert.vae` is the generic key table.

Images are `[B, H, W, 3]` in `[-1, 1]`; latents `[B, H/f, W/f, latent_channels]` with
`f = 2 ** (len(block_out_channels) - 1)` (8 for SD). As in diffusers, `encode`/`decode`
work on *unscaled* latents: multiply by `scaling_factor` (`scale_latents`) before the
UNet and divide (`unscale_latents`) before decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.models import platforms
from magicpose_jax.models.attention import attend, check_runtime_fields
from magicpose_jax.models.config_files import check_class_name, parse_config_entries, read_config_dict
from magicpose_jax.models.normalization import GroupNorm
from magicpose_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv

# diffusers hard-codes eps=1e-6 for every GroupNorm of the VAE (resnets, attention, output norms).
NORM_EPS = 1e-6

_DOWN_TYPES = ("DownEncoderBlock2D",)
_UP_TYPES = ("UpDecoderBlock2D",)

# diffusers config keys we accept only at the value the SD 1.x/2.x VAEs use; any other value
# is a model we do not implement (SD3/Flux shift_factor, ...).
_FIXED_DIFFUSERS_KEYS: dict[str, Any] = {
    "act_fn": "silu",
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

# diffusers' `AutoencoderKL.__init__` defaults that differ from ours (SD 1.5's), applied to keys
# a config.json leaves out: a missing key must mean what it means to diffusers.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "sample_size": 32,
}

_RUNTIME_FIELDS = ("attention_backend", "target_platform")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an `AutoencoderKL`; field names and meanings are diffusers'.

  Defaults are SD 1.5's VAE. `attention_backend` and `target_platform` are ours (runtime
  choices, not written to diffusers' config.json).
  """

  sample_size: int | tuple[int, ...] = 512  # informational (diffusers' tiling default)
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  # Per-channel latent statistics (diffusers' SDXL-pipeline convention, `scale_latents`); None: scalar scaling only.
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True  # informational: diffusers runs such VAEs in float32 in fp16 pipelines
  attention_backend: str = "auto"
  target_platform: str = ""  # as UNetConfig's

  def __post_init__(self):
    n = len(self.block_out_channels)
    if n == 0:
      raise ValueError("VAEConfig.block_out_channels: expected at least one level")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"VAEConfig: {n} block_out_channels but {len(self.down_block_types)} down and "
                       f"{len(self.up_block_types)} up block types")
    for field, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
      for t in getattr(self, field):
        if t not in allowed:
          raise ValueError(f"VAEConfig.{field}: {t!r} is not supported (supported: {allowed})")
    if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
      raise ValueError(f"VAEConfig.layers_per_block: expected a positive int, got {self.layers_per_block!r}")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"VAEConfig: channels {c} must divide by norm_num_groups {self.norm_num_groups}")
    if (self.latents_mean is None) != (self.latents_std is None):
      raise ValueError("VAEConfig: latents_mean and latents_std are given together or not at all")
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is not None and len(value) != self.latent_channels:
        raise ValueError(f"VAEConfig.{name}: {len(value)} values for {self.latent_channels} latent channels")
    if self.latents_std is not None and min(self.latents_std) <= 0:
      raise ValueError(f"VAEConfig.latents_std: expected positive values, got {self.latents_std}")
    check_runtime_fields(self, "VAEConfig")

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each axis (8 for SD)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def replace(self, **changes: Any) -> VAEConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> VAEConfig:
    """Reads diffusers' `AutoencoderKL` `config.json` (a dict, the file, or the model folder holding it).

    Keys starting with `_` (`_class_name`, `_diffusers_version`, ...) are metadata;
    keys we implement only at their SD value are checked against it; any other
    key is an error, so a VAE we cannot reproduce never loads silently.
    """
    config, source = read_config_dict(config, "VAE")
    check_class_name(config, source, "AutoencoderKL")
    fields = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
    kwargs = parse_config_entries(config, source, "AutoencoderKL", fields, _FIXED_DIFFUSERS_KEYS)
    return cls(**{**_DIFFUSERS_DEFAULTS, **kwargs, **overrides})

  def to_diffusers(self) -> dict[str, Any]:
    """diffusers' `config.json` dict for this architecture (loads with `AutoencoderKL.from_pretrained`)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _RUNTIME_FIELDS}
    d.update(_FIXED_DIFFUSERS_KEYS)
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return {"_class_name": "AutoencoderKL", **d}


# Named variants: SD 1.5's VAE (also sd-vae-ft-mse/ema and SD 2.x's, which share the
# architecture; only their sample_size differs) and a test size.
VAE_VARIANTS: dict[str, VAEConfig] = {
    "sd15": VAEConfig(),
    "tiny": VAEConfig(sample_size=32, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4),
}


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
  """VAE latents `[..., C]` -> the UNet's latent space: `z * scaling_factor`, or with per-channel statistics
  `(z - latents_mean) * scaling_factor / latents_std` (diffusers' SDXL pipelines)."""
  if config.latents_mean is None:
    return z * jnp.asarray(config.scaling_factor, z.dtype)
  mean, std = (jnp.asarray(v, z.dtype) for v in (config.latents_mean, config.latents_std))
  return (z - mean) * jnp.asarray(config.scaling_factor, z.dtype) / std


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
  """The UNet's latent space -> VAE latents (what `decode` takes): the inverse of `scale_latents`."""
  if config.latents_mean is None:
    return z / jnp.asarray(config.scaling_factor, z.dtype)
  mean, std = (jnp.asarray(v, z.dtype) for v in (config.latents_mean, config.latents_std))
  return z * std / jnp.asarray(config.scaling_factor, z.dtype) + mean


@flax.struct.dataclass
class DiagonalGaussian:
  """diffusers' `DiagonalGaussianDistribution`, NHWC: `mean`, `logvar` `[B, h, w, latent_channels]`.

  A pytree, so it can leave a `jax.jit`. `logvar` is clipped to `[-30, 20]` as in diffusers.
  """

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """`[B, h, w, 2C]` (mean channels first, then log-variance, as diffusers' `chunk(2, dim=1)`)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    """`mean + std * eps` with `eps ~ N(0, 1)` from `key`. `[B, h, w, C]`."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL divergence to `N(0, 1)`, summed over `h, w, C`: `[B]` (diffusers' `kl()`)."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class VAEAttention(nn.Module):
  """The VAE mid-block self-attention (diffusers' `Attention` built with `_from_deprecated_attn_block`).

  `group_norm -> to_q/to_k/to_v (with bias) -> attention -> to_out_0 (+ residual)`, over
  the `H*W` positions. diffusers passes `attention_head_dim = channels`: one head of
  width `channels`. `[B, H, W, C] -> [B, H, W, C]`.
  """

  groups: int
  heads: int = 1
  eps: float = NORM_EPS
  backend: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="group_norm")(x).reshape(b, h * w, c)  # [B, N, C]
    split = lambda t: t.reshape(b, h * w, self.heads, c // self.heads)  # [B, N, H, D]
    q, k, v = (split(dense(name)(y)) for name in ("to_q", "to_k", "to_v"))
    out = attend(q, k, v, self.backend).reshape(b, h * w, c)
    # residual_connection=True, rescale_output_factor=1 in diffusers' VAE.
    return x + dense("to_out_0")(out).reshape(b, h, w, c)


class VAEMidBlock(nn.Module):
  """diffusers' `UNetMidBlock2D` without temb: `resnets_0 -> attentions_0 -> resnets_1`. `[B, H, W, C]`."""

  channels: int
  groups: int
  backend: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    resnet = lambda name: ResnetBlock2D(self.channels, self.groups, NORM_EPS, 1.0, self.dtype, self.param_dtype,
                                        name=name)
    x = resnet("resnets_0")(x, None)
    x = VAEAttention(self.groups, 1, NORM_EPS, self.backend, self.dtype, self.param_dtype, name="attentions_0")(x)
    return resnet("resnets_1")(x, None)


class DownEncoderBlock2D(nn.Module):
  """`num_layers` resnets then (not on the last level) a stride-2 conv with diffusers' `padding=0`.

  `[B, H, W, C_in] -> [B, ceil(H/2), ceil(W/2), C]` (or `[B, H, W, C]` without downsampling).
  """

  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, NORM_EPS, 1.0, self.dtype, self.param_dtype,
                        name=f"resnets_{i}")(x, None)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, 0, self.dtype, self.param_dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """`num_layers` resnets then (not on the last level) nearest 2× and a conv. `[B, H, W, C_in] -> [B, 2H, 2W, C]`."""

  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, NORM_EPS, 1.0, self.dtype, self.param_dtype,
                        name=f"resnets_{i}")(x, None)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image `[B, H, W, in_channels]` -> moments `[B, H/f, W/f, 2 * latent_channels]` (before `quant_conv`)."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @platforms.traced_for_config_platform
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    channels = cfg.block_out_channels
    h = conv(channels[0], 3, "conv_in", self.dtype, self.param_dtype)(x.astype(self.dtype))
    for i, c in enumerate(channels):
      h = DownEncoderBlock2D(c, cfg.layers_per_block, cfg.norm_num_groups, i < len(channels) - 1, self.dtype,
                             self.param_dtype, name=f"down_blocks_{i}")(h)
    h = VAEMidBlock(channels[-1], cfg.norm_num_groups, cfg.attention_backend, self.dtype, self.param_dtype,
                    name="mid_block")(h)
    # The moments head runs in float32: exp(logvar) and the sampled latents are precision-sensitive.
    h = GroupNorm(cfg.norm_num_groups, epsilon=NORM_EPS, dtype=jnp.float32, param_dtype=self.param_dtype,
                  name="conv_norm_out")(h.astype(jnp.float32))
    return conv(2 * cfg.latent_channels, 3, "conv_out", jnp.float32, self.param_dtype)(nn.silu(h))


class Decoder(nn.Module):
  """Latents `[B, h, w, latent_channels]` (after `post_quant_conv`) -> image `[B, h*f, w*f, out_channels]`."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @platforms.traced_for_config_platform
  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    rev = cfg.block_out_channels[::-1]
    h = conv(rev[0], 3, "conv_in", self.dtype, self.param_dtype)(z.astype(self.dtype))
    h = VAEMidBlock(rev[0], cfg.norm_num_groups, cfg.attention_backend, self.dtype, self.param_dtype,
                    name="mid_block")(h)
    for i, c in enumerate(rev):
      h = UpDecoderBlock2D(c, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(rev) - 1, self.dtype,
                           self.param_dtype, name=f"up_blocks_{i}")(h)
    # The pixel head runs in float32 (as the UNet's): bf16 here shows as banding in the image.
    h = GroupNorm(cfg.norm_num_groups, epsilon=NORM_EPS, dtype=jnp.float32, param_dtype=self.param_dtype,
                  name="conv_norm_out")(h.astype(jnp.float32))
    return conv(cfg.out_channels, 3, "conv_out", jnp.float32, self.param_dtype)(nn.silu(h))


class AutoencoderKL(nn.Module):
  """The SD VAE: `encoder -> quant_conv` gives a `DiagonalGaussian`; `post_quant_conv -> decoder` an image.

  Use `apply(variables, x, method="encode")` / `method="decode"`; `__call__` (encode,
  sample or mode, decode) exists for `init`.

  Attributes:
    config: the architecture.
    dtype: compute dtype of the body; the encoder's moments head, `quant_conv`,
      `post_quant_conv` and the decoder's pixel head run in float32.
    param_dtype: storage dtype of the params.
  """

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.param_dtype)
    self.decoder = Decoder(cfg, self.dtype, self.param_dtype)
    # 1×1 convs: no padding.
    self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), padding="VALID", dtype=jnp.float32,
                              param_dtype=self.param_dtype)
    self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), padding="VALID", dtype=jnp.float32,
                                   param_dtype=self.param_dtype)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Image `[B, H, W, in_channels]` in `[-1, 1]` -> posterior over `[B, H/f, W/f, latent_channels]` (unscaled)."""
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
      raise ValueError(f"encode: expected an image [B, H, W, {self.config.in_channels}] (NHWC), got {x.shape}")
    return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents `[B, h, w, latent_channels]` -> image `[B, h*f, w*f, out_channels]` (float32)."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"decode: expected latents [B, h, w, {self.config.latent_channels}] (NHWC), got {z.shape}")
    return self.decoder(self.post_quant_conv(z.astype(jnp.float32)))

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Reconstruction `[B, H, W, out_channels]`: sample the posterior with `key`, or take its mode."""
    posterior = self.encode(x)
    return self.decode(posterior.sample(key) if key is not None else posterior.mode())


@functools.partial(jax.jit, static_argnums=0)
def _decode_jit(vae: AutoencoderKL, params: Any, z: jax.Array) -> jax.Array:
  return vae.apply({"params": params}, z, method=AutoencoderKL.decode)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
  """diffusers' `blend_v`/`blend_h`: the first `extent` rows/cols of `b` fade in from the last of `a`."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent == 0:
    return b
  w = jnp.arange(extent, dtype=b.dtype) / extent  # weight of b at each blended row/col
  shape = [1] * b.ndim
  shape[axis] = extent
  w = w.reshape(shape)
  a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
  b_head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
  b_rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
  return jnp.concatenate([a_tail * (1 - w) + b_head * w, b_rest], axis=axis)


def decode_tiled(vae: AutoencoderKL, params: Any, z: jax.Array, tile: int = 64, overlap: int = 16) -> jax.Array:
  """Decodes `z` in overlapping `tile`×`tile` latent tiles, blended linearly (diffusers' `tiled_decode`).

  Memory stays that of one tile whatever the image size. The result is *approximate*:
  each tile's decoder sees only its own latents (the mid-block attention and the
  convolutions' receptive fields are cut at tile borders), so it differs slightly from
  `decode`; the overlap hides the seams. With `overlap = tile // 4` this is exactly
  diffusers' `tiled_decode` with `tile_latent_min_size = tile`, `tile_overlap_factor = 0.25`.

  Args:
    vae: the module (its config gives the upsampling factor `f`).
    params: its param tree (not wrapped in `{"params": ...}`).
    z: unscaled latents `[B, h, w, latent_channels]`.
    tile: tile size in latents (64 = 512 pixels for SD).
    overlap: latents shared by neighbouring tiles; blended over `overlap * f` pixels.

  Returns:
    `[B, h*f, w*f, out_channels]` float32. When `z` fits in one tile this is `decode(z)`.
  """
  if not 0 <= overlap < tile:
    raise ValueError(f"decode_tiled: need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
  h, w = z.shape[1:3]
  if h <= tile and w <= tile:
    return _decode_jit(vae, params, z)
  f = vae.config.downsample_factor
  stride = tile - overlap
  blend = overlap * f
  keep = stride * f  # pixels each tile contributes, after blending its leading edge
  rows: list[list[jax.Array]] = []
  for i in range(0, h, stride):
    rows.append([_decode_jit(vae, params, z[:, i:i + tile, j:j + tile]) for j in range(0, w, stride)])
  out_rows = []
  for i, row in enumerate(rows):
    for j in range(len(row)):
      t = row[j]
      # Blend with the tiles above and to the left *after* those were blended themselves,
      # as diffusers does (its blend functions modify the tiles in place).
      if i > 0:
        t = _blend(rows[i - 1][j], t, blend, axis=1)
      if j > 0:
        t = _blend(row[j - 1], t, blend, axis=2)
      row[j] = t
    out_rows.append(jnp.concatenate([t[:, :keep, :keep] for t in row], axis=2))
  return jnp.concatenate(out_rows, axis=1)


def abstract_vae_params(config: VAEConfig) -> dict:
  """The VAE's param tree as `ShapeDtypeStruct`s (no memory, no compute)."""
  size = config.downsample_factor
  image = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), image)["params"]


class LatentEncoder:
  """Images -> VAE latent moments (mean ++ logvar, unscaled), `[n, S/f, S/f, 2C]` float32, in fixed-size batches.

  `__call__` takes uint8 `[n, S, S, 3]`; one compiled program serves every call (the last batch is padded).
  """

  def __init__(self, config: VAEConfig, params: dict, batch: int):
    self.config, self._params, self.batch = config, params, batch
    model = AutoencoderKL(config)

    def moments(params, images):  # params as an argument: closed over, they would be baked into the program
      posterior = model.apply({"params": params}, images, method=AutoencoderKL.encode)
      return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)  # [b, S/f, S/f, 2C]

    self._moments = jax.jit(moments)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(images), self.batch):
      chunk = images[start:start + self.batch].astype(np.float32) / 127.5 - 1.0
      pad = self.batch - len(chunk)  # a fixed batch shape: one compilation
      padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)]) if pad else chunk
      out.append(np.asarray(self._moments(self._params, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
