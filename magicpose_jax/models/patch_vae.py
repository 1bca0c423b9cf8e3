"""A linear patch autoencoder with the VAE's interface: space-to-depth, then an orthogonal projection.

    config = PatchVAEConfig(patch_size=4, latent_channels=12)
    params = fit_patch_vae(config, images)           # PCA of the images' 4 x 4 x 3 patches: no training
    vae = make_vae(config)                           # AutoencoderKL or PatchVAE, by the config's type
    z = vae.apply({"params": params}, x, method="encode").mode()   # [B, H/4, W/4, 12]
    x_hat = vae.apply({"params": params}, z, method="decode")      # [B, H, W, 3]

Encoding cuts the image `[B, H, W, C]` into `f x f` patches (space-to-depth: `[B, H/f, W/f, f*f*C]`), subtracts
the mean patch and projects onto `latent_channels` orthonormal directions (`projection` `[f*f*C, k]`); decoding is
the transpose (the least-squares reconstruction from those directions) and depth-to-space. With `k = f*f*C` it is
lossless; with fewer, `fit_patch_vae` takes the principal components of the training images' patches, so the
first channels are the patch's mean colour and the rest its strongest edges. On the demo's 64 px figures, 8 of 48
components reconstruct held-out figures at 25.0 dB PSNR, 12 at 26.6 dB (a trained tiny VAE: 21 dB after 800
steps).

The posterior is deterministic (`DiagonalGaussian` with log-variance -30), so every caller of `AutoencoderKL`
(`encode(...).mode()`/`.sample()`, `decode`, `scale_latents`) works unchanged. `make_vae`,
`abstract_autoencoder_params` and `vae_config_from_folder` choose between the two kinds of autoencoder by the
config's type or the folder's `config.json` `_class_name` ("AutoencoderKL" or "PatchVAE"). A PatchVAE has no
diffusers counterpart: only our Flax pipeline folders hold one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.models.config_files import parse_config_entries, read_config_dict
from magicpose_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, abstract_vae_params

CLASS_NAME = "PatchVAE"
_LOGVAR = -30.0  # DiagonalGaussian's lower clip: std 3e-7, a deterministic posterior


@dataclasses.dataclass(frozen=True)
class PatchVAEConfig:
  """Architecture of a `PatchVAE`. Field names shared with `VAEConfig` mean the same (`scaling_factor`,
  `latents_mean`/`latents_std`: `scale_latents`).

  Attributes:
    patch_size: pixels per latent pixel along each axis (`downsample_factor`).
    latent_channels: projected components per patch, 1..patch_size**2 * in_channels.
  """

  sample_size: int = 64  # informational
  in_channels: int = 3
  out_channels: int = 3
  patch_size: int = 4
  latent_channels: int = 12
  scaling_factor: float = 1.0
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.out_channels != self.in_channels:
      raise ValueError(f"PatchVAEConfig: out_channels {self.out_channels} != in_channels {self.in_channels} (the "
                       f"decoder is the encoder's transpose)")
    if self.patch_size < 1:
      raise ValueError(f"PatchVAEConfig.patch_size: expected >= 1, got {self.patch_size}")
    if not 1 <= self.latent_channels <= self.patch_dim:
      raise ValueError(f"PatchVAEConfig.latent_channels: expected 1..{self.patch_dim} (patch_size**2 * "
                       f"in_channels), got {self.latent_channels}")
    if (self.latents_mean is None) != (self.latents_std is None):
      raise ValueError("PatchVAEConfig: latents_mean and latents_std are given together or not at all")

  @property
  def downsample_factor(self) -> int:
    return self.patch_size

  @property
  def patch_dim(self) -> int:
    """Values per patch: `patch_size**2 * in_channels`."""
    return self.patch_size ** 2 * self.in_channels

  def replace(self, **changes: Any) -> PatchVAEConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any] | str | os.PathLike) -> PatchVAEConfig:
    """Reads the `config.json` `to_diffusers` wrote (a dict, the file or its folder); unknown keys are errors."""
    config, source = read_config_dict(config, "PatchVAE")
    if config.get("_class_name") != CLASS_NAME:
      raise ValueError(f"{source}: _class_name is {config.get('_class_name')!r}, expected {CLASS_NAME!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**parse_config_entries(config, source, CLASS_NAME, fields, {}))

  def to_diffusers(self) -> dict[str, Any]:
    """The `config.json` dict (our class: diffusers cannot load it)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {"_class_name": CLASS_NAME, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


AnyVAEConfig = VAEConfig | PatchVAEConfig


def space_to_depth(x: jax.Array, f: int) -> jax.Array:
  """`[B, H, W, C]` -> `[B, H/f, W/f, f*f*C]` (each patch row-major: rows, then columns, then channels)."""
  b, h, w, c = x.shape
  if h % f or w % f:
    raise ValueError(f"space_to_depth: image {h}x{w} does not divide into {f}x{f} patches")
  return x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x: jax.Array, f: int) -> jax.Array:
  """The inverse of `space_to_depth`: `[B, h, w, f*f*C]` -> `[B, h*f, w*f, C]`."""
  b, h, w, d = x.shape
  c = d // (f * f)
  return x.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * f, w * f, c)


class PatchVAE(nn.Module):
  """Params: `patch_mean` `[f*f*C]` and `projection` `[f*f*C, k]` (orthonormal columns). Images in `[-1, 1]`."""

  config: PatchVAEConfig
  dtype: jnp.dtype = jnp.float32  # accepted for AutoencoderKL's signature; the projection runs in float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    d, k = self.config.patch_dim, self.config.latent_channels
    # The init is an arbitrary orthonormal basis; `fit_patch_vae` gives the one to use.
    self.patch_mean = self.param("patch_mean", nn.initializers.zeros, (d,), self.param_dtype)
    self.projection = self.param("projection", lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype), (d, k),
                                 self.param_dtype)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Image `[B, H, W, in_channels]` -> a deterministic posterior over `[B, H/f, W/f, latent_channels]`."""
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
      raise ValueError(f"encode: expected an image [B, H, W, {self.config.in_channels}] (NHWC), got {x.shape}")
    patches = space_to_depth(x.astype(jnp.float32), self.config.patch_size)
    z = (patches - self.patch_mean.astype(jnp.float32)) @ self.projection.astype(jnp.float32)
    return DiagonalGaussian(z, jnp.full_like(z, _LOGVAR))

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents `[B, h, w, latent_channels]` -> image `[B, h*f, w*f, out_channels]` (float32)."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"decode: expected latents [B, h, w, {self.config.latent_channels}] (NHWC), got {z.shape}")
    patches = z.astype(jnp.float32) @ self.projection.astype(jnp.float32).T + self.patch_mean.astype(jnp.float32)
    return depth_to_space(patches, self.config.patch_size)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    return self.decode(self.encode(x).mode())


def fit_patch_vae(config: PatchVAEConfig, images: np.ndarray,
                  per_channel: bool = True) -> tuple[PatchVAEConfig, dict[str, np.ndarray]]:
  """The principal components of `images`' patches as a `PatchVAE`, with the latent scaling that gives the UNet
  unit-variance latents over them.

  Args:
    images: uint8 [N, H, W, in_channels], H and W multiples of `patch_size`.
    per_channel: every component scaled to unit variance (`latents_mean`/`latents_std`, `scaling_factor` 1), i.e.
      whitened; else one `scaling_factor` for all (SD's convention). The components' spreads differ ~30-fold (the
      demo's 12: std 3.0 for the first, ~0.1 for the last): with one scale, the UNet's errors on the faint edge
      components are as large as on the mean colour, and decoded they cover the figure in high-frequency noise
      (measured: full model SSIM 0.12); whitened, an error on a component is decoded at that component's spread.

  Returns:
    (config with the scaling, params {"patch_mean": float32 [D], "projection": float32 [D, k]}), D =
    `patch_dim`, columns ordered by decreasing variance, each with its largest entry positive (deterministic).
  """
  if images.ndim != 4 or images.shape[-1] != config.in_channels or images.dtype != np.uint8:
    raise ValueError(f"fit_patch_vae: images must be uint8 [N, H, W, {config.in_channels}], got {images.dtype} "
                     f"{images.shape}")
  x = images.astype(np.float64) / 127.5 - 1.0
  patches = np.asarray(space_to_depth(x, config.patch_size)).reshape(-1, config.patch_dim)
  mean = patches.mean(0)
  values, vectors = np.linalg.eigh(np.cov((patches - mean).T).reshape(config.patch_dim, config.patch_dim))
  vectors = vectors[:, np.argsort(-values, kind="stable")][:, : config.latent_channels]
  vectors *= np.where(vectors[np.abs(vectors).argmax(0), np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
  z = (patches - mean) @ vectors
  if per_channel:
    config = config.replace(scaling_factor=1.0, latents_mean=tuple(float(m) for m in z.mean(0)),
                            latents_std=tuple(float(max(s, 1e-6)) for s in z.std(0)))
  else:
    config = config.replace(scaling_factor=float(1.0 / max(z.std(), 1e-6)), latents_mean=None, latents_std=None)
  return config, {"patch_mean": mean.astype(np.float32), "projection": vectors.astype(np.float32)}


# ----------------------------------------------------------------------------------------------------------------
# Either kind of autoencoder


def make_vae(config: AnyVAEConfig, dtype: Any = jnp.float32) -> AutoencoderKL | PatchVAE:
  """The module of a VAE config: `AutoencoderKL` for a `VAEConfig`, `PatchVAE` for a `PatchVAEConfig`."""
  if isinstance(config, PatchVAEConfig):
    return PatchVAE(config, dtype=dtype)
  if isinstance(config, VAEConfig):
    return AutoencoderKL(config, dtype=dtype)
  raise TypeError(f"make_vae: expected a VAEConfig or PatchVAEConfig, got {type(config).__name__}")


def abstract_autoencoder_params(config: AnyVAEConfig) -> dict:
  """The param tree of either kind as `ShapeDtypeStruct`s."""
  if isinstance(config, PatchVAEConfig):
    d, k = config.patch_dim, config.latent_channels
    return {"patch_mean": jax.ShapeDtypeStruct((d,), jnp.float32),
            "projection": jax.ShapeDtypeStruct((d, k), jnp.float32)}
  return abstract_vae_params(config)


def vae_config_from_folder(folder: str | os.PathLike, **overrides: Any) -> AnyVAEConfig:
  """The config in a VAE folder's `config.json`: a `PatchVAEConfig` when its `_class_name` says "PatchVAE", else
  `VAEConfig.from_diffusers` (which checks for "AutoencoderKL"). `overrides`: VAEConfig runtime fields."""
  config, _ = read_config_dict(folder, "VAE")
  if config.get("_class_name") == CLASS_NAME:
    return PatchVAEConfig.from_diffusers(config)
  return VAEConfig.from_diffusers(folder, **overrides)
