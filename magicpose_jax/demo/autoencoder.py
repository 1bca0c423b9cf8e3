"""The demo's autoencoder (a linear patch autoencoder, or a tiny VAE trained on synthetic figures), and the SD
pipeline folder the demo's base training starts from.

    vae_config, vae_params, _ = train_autoencoder(DEMO_VAE, images)     # the default: a trained tiny VAE
    vae_config, vae_params = fit_patch_vae(DEMO_PATCH_VAE, images)      # or the patch autoencoder: no training
    vae_params, _ = finetune_decoder(vae_config, vae_params, images)   # the decoder alone, further (pretrain)
    write_base_pipeline(folder, vae_config, vae_params, unet_config, text_config, seed=0)

`DEMO_PATCH_VAE` (`models/patch_vae.py`) cuts 64 px figures into 4 x 4 patches and keeps the first 8 principal
components of each, whitened: 16 x 16 x 8 latents, fitted in a second, 25.0 dB on held-out figures, where the tiny
VAE reaches 21 dB after 800 steps (2-3 minutes of the demo's budget). The demo's diffusion models still generate
better figures over the trained VAE (docs/demo.md): its decoder smooths their errors, the patch decoder shows each
as a 4 x 4 block.

Random VAE weights give latents that mean nothing, so a diffusion model over them cannot learn figures. The demo
trains the VAE first (pixel L1 + MSE + a small KL to N(0, 1), as LDM's first stage without the GAN and LPIPS
terms), then fits the latent scaling so that the UNet sees unit-variance latents over the training images: one
`scaling_factor` by default (what SD's 0.18215 does for its VAE), or per channel (`per_channel_latents`:
`VAEConfig.latents_mean`/`latents_std`, diffusers' SDXL convention). The trained VAE goes into an SD pipeline
folder (random tiny UNet and text encoder) that `config.base.path` reads: the base run trains the UNet over it,
stages 1 and 2 freeze both.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from magicpose_jax.convert.flax_checkpoint import load_flax_params, save_flax_model
from magicpose_jax.convert.stable_diffusion import SDConfigs, save_flax_pipeline
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE, ScheduleConfig
from magicpose_jax.models.clip import CLIPTextConfig, abstract_text_encoder_params
from magicpose_jax.models.patch_vae import (
  AnyVAEConfig,
  PatchVAEConfig,
  abstract_autoencoder_params,
  make_vae,
  vae_config_from_folder,
)
from magicpose_jax.models.random_init import random_params
from magicpose_jax.models.unet import UNetConfig, abstract_unet_params
from magicpose_jax.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params, scale_latents, unscale_latents

Params = dict[str, Any]

# Downsamples by 4: 64 px figures -> 16 x 16 latents (4x fewer UNet positions than the factor-2 "tiny" VAE, which
# makes a stage-2 step ~10x faster on a CPU; the figures' flat colours survive the compression).
# Narrow (8/16/32 channels): a training step of the 64 px VAE costs about what a base UNet step costs.
DEMO_VAE = VAEConfig(sample_size=64, block_out_channels=(8, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                     up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=4)

# 4 x 4 patches (factor 4, as DEMO_VAE) projected onto their first 8 principal components, each scaled to unit
# variance (`fit_patch_vae(per_channel=True)`). Held-out plain figures (benchmarks/autoencoder_ceiling.py): 3
# components 21.1 dB PSNR, 8: 25.0, 12: 26.6, 16: 28.5, 48 (lossless): exact. 12 components with one scalar scale
# gave samples covered in high-frequency noise (benchmarks/results/demo.md).
DEMO_PATCH_VAE = PatchVAEConfig(sample_size=64, patch_size=4, latent_channels=8)


@dataclasses.dataclass(frozen=True)
class AutoencoderTraining:
  """Attributes:
    steps: Adam updates.
    batch_size: images per update.
    lr: peak learning rate (cosine decay to 10% after a 5% warm-up).
    kl_weight: weight of the KL term (per latent value) against the per-pixel reconstruction loss.
    seed: init, batch order and posterior samples.
    init_logvar: the posterior's initial log-variance (the moments head's logvar half starts at this constant).
      A random head starts near logvar 0, i.e. noise of std 1 on latents of std ~2: the decoder first learns to
      undo that noise (blurry reconstructions) and the encoder has to shrink it through the small KL-weighted
      sample path. Starting low makes the latents nearly deterministic from step one, as a trained VAE's are.
    identity_blocks: start every residual block as the identity (the last layer of each residual branch, resnet
      `conv2` and attention `to_out_0`, at zero; "zero-init residual" of Goyal et al. 2017). Every GroupNorm
      removes each image's per-group mean, i.e. its colours, so only the residual stream carries them; random
      branches add O(1) colour-blind activations to it in every block, and a tiny VAE then sits for hundreds of
      steps at the "mean colour, blurry silhouette" plateau before colours get through.
    per_channel_latents: normalise each latent channel to zero mean and unit variance (`VAEConfig.latents_mean`
      / `latents_std`, scaling_factor 1) instead of one scalar `scaling_factor` for all: a small VAE's channels
      can differ several-fold in spread (the demo's: std 0.19 to 1.59 after a scalar fit), and noise of unit
      variance then drowns the narrow channels' content at far lower noise levels than the wide ones'. Off by
      default: on the demo it measured slightly worse than the scalar fit (docs/demo.md).
  """

  steps: int = 300
  batch_size: int = 8
  lr: float = 2e-3
  kl_weight: float = 1e-4
  seed: int = 0
  init_logvar: float = -8.0
  identity_blocks: bool = True
  per_channel_latents: bool = False


def _images(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32) / 127.5 - 1.0


def autoencoder_loss(params: Params, vae: AutoencoderKL, images: jax.Array, key: jax.Array,
                     kl_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction (L1 + MSE per pixel, [-1, 1] scale) of a posterior sample, plus `kl_weight` x mean KL.

  Args:
    images: uint8 [B, H, W, 3].
  """
  x = _images(images)
  posterior = vae.apply({"params": params}, x, method="encode")
  recon = vae.apply({"params": params}, posterior.sample(key), method="decode")
  l1 = jnp.mean(jnp.abs(recon - x))
  mse = jnp.mean(jnp.square(recon - x))
  kl = jnp.mean(posterior.kl()) / np.prod(posterior.mean.shape[1:])
  return l1 + mse + kl_weight * kl, {"l1": l1, "mse": mse, "kl": kl}


@functools.partial(jax.jit, static_argnames=("vae", "tx", "kl_weight"), donate_argnums=(0, 1))
def _step(params: Params, opt_state: Any, images: jax.Array, key: jax.Array, *, vae: AutoencoderKL,
          tx: optax.GradientTransformation, kl_weight: float) -> tuple[Params, Any, dict[str, jax.Array]]:
  (loss, parts), grads = jax.value_and_grad(autoencoder_loss, has_aux=True)(params, vae, images, key, kl_weight)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"loss": loss, **parts}


@functools.partial(jax.jit, static_argnames="vae")
def _encode_mean(params: Params, vae: AutoencoderKL, images: jax.Array) -> jax.Array:
  return vae.apply({"params": params}, _images(images), method="encode").mean


def _posterior_means(vae: AutoencoderKL, params: Params, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """The posterior means of `images` (uint8 `[N, H, W, 3]`), encoded `batch_size` at a time: float32 `[N, h, w, C]`."""
  return np.concatenate([np.asarray(_encode_mean(params, vae, jnp.asarray(images[i:i + batch_size])))
                         for i in range(0, len(images), batch_size)])


def _optimizer(steps: int, peak_lr: float) -> optax.GradientTransformation:
  """Adam with global-norm clipping at 1, the rate warmed up over 5% of `steps`, then cosine-decayed to 10%."""
  warmup = max(1, steps // 20)
  lr = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(steps, warmup + 1), end_value=0.1 * peak_lr)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


def fit_latent_scaling(config: VAEConfig, vae: AutoencoderKL, params: Params, images: np.ndarray,
                       per_channel: bool = False) -> VAEConfig:
  """`config` with the latent scaling that gives the UNet unit-variance latents over `images`.

  SD's convention by default: one `scaling_factor = 1 / std` over all channels' values (what SD's 0.18215 does for
  its VAE); `per_channel`: `latents_mean`/`latents_std` per channel and `scaling_factor` 1.
  """
  z = _posterior_means(vae, params, images)
  z = z.reshape(-1, z.shape[-1]).astype(np.float64)  # one row per latent pixel
  if per_channel:
    return config.replace(scaling_factor=1.0, latents_mean=tuple(float(m) for m in z.mean(0)),
                          latents_std=tuple(float(max(s, 1e-6)) for s in z.std(0)))
  return config.replace(scaling_factor=float(1.0 / max(z.std(), 1e-6)), latents_mean=None, latents_std=None)


def _low_noise_head(quant_conv: Params, latent_channels: int, logvar: float) -> Params:
  """The 1x1 moments conv with its logvar outputs (the second `latent_channels`) constant at `logvar`."""
  kernel, bias = np.array(quant_conv["kernel"]), np.array(quant_conv["bias"])
  kernel[..., latent_channels:] = 0.0
  bias[latent_channels:] = logvar
  return {**quant_conv, "kernel": kernel, "bias": bias}


def _identity_blocks(params: Params) -> Params:
  """`params` with the last layer of every residual branch (resnet `conv2`, attention `to_out_0`) at zero."""
  def zero(path: tuple[Any, ...], x: np.ndarray) -> np.ndarray:
    names = [str(getattr(k, "key", k)) for k in path]
    return np.zeros_like(x) if names[-1] == "kernel" and names[-2] in ("conv2", "to_out_0") else x

  return jax.tree_util.tree_map_with_path(zero, params)


def train_autoencoder(config: VAEConfig, images: np.ndarray, training: AutoencoderTraining = AutoencoderTraining(),
                      progress: Callable[[int, dict[str, float]], None] | None = None) -> tuple[VAEConfig, Params,
                                                                                               dict[str, float]]:
  """Trains a VAE of architecture `config` on `images` (uint8 [N, H, W, 3]).

  Args:
    progress: called after every step with (step, {"loss", "l1", "mse", "kl"} as floats every 10 steps, else {}).

  Returns:
    (config with the fitted latent scaling (`fit_latent_scaling`), params, final {"l1", "mse", "kl"} on the last batch).
  """
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"train_autoencoder: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  vae = AutoencoderKL(config)
  key = jax.random.key(training.seed)
  # flax-default random draws without tracing `init` (a compile of the whole VAE: a minute on a busy CPU).
  params = random_params(abstract_vae_params(config), training.seed)
  params["quant_conv"] = _low_noise_head(params["quant_conv"], config.latent_channels, training.init_logvar)
  if training.identity_blocks:
    params = _identity_blocks(params)
  params = jax.device_put(params)  # one transfer (`jnp.asarray` per leaf compiles a program per leaf shape)
  tx = _optimizer(training.steps, training.lr)
  opt_state = jax.jit(tx.init)(params)  # one program, not an eager zeros_like (a compile) per leaf shape
  rng = np.random.default_rng(training.seed)
  last: dict[str, float] = {}
  for step in range(training.steps):
    batch = images[rng.integers(len(images), size=training.batch_size)]
    params, opt_state, metrics = _step(params, opt_state, jnp.asarray(batch), jax.random.fold_in(key, step),
                                       vae=vae, tx=tx, kl_weight=training.kl_weight)
    report = {}
    if step % 10 == 9 or step == training.steps - 1:
      report = last = {k: float(v) for k, v in metrics.items()}
    if progress is not None:
      progress(step + 1, report)
  params = jax.tree.map(np.asarray, params)
  return fit_latent_scaling(config, vae, params, images, training.per_channel_latents), params, last


# The decoder's parameters (diffusers' AutoencoderKL): everything after the latents. The encoder and its 1x1 moments
# conv (`quant_conv`) make the latent space every UNet over the VAE was trained in.
DECODER_PARAMS = ("post_quant_conv", "decoder")


@dataclasses.dataclass(frozen=True)
class DecoderTraining:
  """Fine-tuning of a trained VAE's decoder alone (`finetune_decoder`).

  Attributes:
    steps: Adam updates.
    batch_size: images per update.
    lr: peak learning rate (cosine decay to 10% after a 5% warm-up).
    seed: batch order.
    head_weight: extra loss weight inside each figure's head (`finetune_decoder`'s `heads`): a pixel there counts
      1 + head_weight times. A 64 px head is ~1% of the image, so a plain mean hardly sees its hair, skin and
      face; weighted 5x in all, the packaged decoder's own reconstructions keep the whole image's PSNR and cut
      hair error by a fifth (benchmarks/results/demo.md). 0: the plain mean.
    latent_noise: std of Gaussian noise added to the latents the decoder learns from, in the UNet's units (scaled
      latents, unit variance). A sampler's final latents are the UNet's estimate, off the encoder's by a few
      tenths; a decoder that has only seen exact latents draws those errors as they are, one that has seen noisy
      ones maps them back onto figures. 0: exact latents.
  """

  steps: int = 3000
  batch_size: int = 16
  lr: float = 1e-3
  seed: int = 1
  head_weight: float = 0.0
  latent_noise: float = 0.0

  def __post_init__(self):
    if self.head_weight < 0 or self.latent_noise < 0:
      raise ValueError(f"DecoderTraining: head_weight and latent_noise must be >= 0, got {self.head_weight}, "
                       f"{self.latent_noise}")


def decoder_loss(decoder: Params, encoder: Params, vae: AutoencoderKL, latents: jax.Array, images: jax.Array,
                 weights: jax.Array | None = None) -> jax.Array:
  """L1 + MSE per pixel ([-1, 1] scale, as `autoencoder_loss`) of decoding the VAE latents `latents` ([B, h, w, C])
  against uint8 `images` ([B, H, W, 3]): the mean, or with `weights` ([B, H, W], > 0) the weighted mean."""
  x = _images(images)
  recon = vae.apply({"params": {**encoder, **decoder}}, latents, method="decode")
  error = jnp.mean(jnp.abs(recon - x) + jnp.square(recon - x), axis=-1)  # [B, H, W]
  if weights is None:
    return jnp.mean(error)
  return jnp.sum(error * weights) / jnp.sum(weights)


def noisy_latents(latents: jax.Array, config: VAEConfig, std: jax.Array | float, key: jax.Array) -> jax.Array:
  """VAE latents `[..., C]` plus Gaussian noise of `std` in the UNet's units (`scale_latents`: what a sampler's
  estimate of them is off by), returned in the VAE's units."""
  noise = std * jax.random.normal(key, latents.shape, latents.dtype)
  return unscale_latents(scale_latents(latents, config) + noise, config)


@functools.partial(jax.jit, static_argnames=("vae", "tx"), donate_argnums=(0, 1))
def _decoder_step(decoder: Params, opt_state: Any, encoder: Params, latents: jax.Array, images: jax.Array,
                  weights: jax.Array | None, noise_std: jax.Array, key: jax.Array, *, vae: AutoencoderKL,
                  tx: optax.GradientTransformation) -> tuple[Params, Any, jax.Array]:
  latents = noisy_latents(latents, vae.config, noise_std, key)
  loss, grads = jax.value_and_grad(decoder_loss)(decoder, encoder, vae, latents, images, weights)
  updates, opt_state = tx.update(grads, opt_state, decoder)
  return optax.apply_updates(decoder, updates), opt_state, loss


def finetune_decoder(config: VAEConfig, params: Params, images: np.ndarray,
                     training: DecoderTraining = DecoderTraining(),
                     progress: Callable[[int, dict[str, float]], None] | None = None,
                     heads: np.ndarray | None = None) -> tuple[Params, dict[str, float]]:
  """Trains the decoder of a trained VAE further, its encoder frozen, on `images` (uint8 [N, H, W, 3]).

  What SD's "ft-MSE" VAE did: the latent space stays the one the UNet (and every ControlNet and stage over it)
  was trained in, bit for bit, so the decoder can be improved after them. The decoder learns from the posterior
  means (what a sampler's denoised latents estimate), computed once, with `training.latent_noise` added afresh
  at every step.

  Args:
    progress: called after every step with (step, {"loss": the mean over the last 10 steps} every 10 steps, else
      {}).
    heads: bool [N, H, W], each figure's head pixels (`SyntheticSource.frame`'s `part_mask == 1`); needed when
      `training.head_weight` > 0, which weighs the loss there 1 + head_weight times.

  Returns:
    (params with the new decoder and the encoder's leaves unchanged, {"loss": the mean of the last 10 steps}).
  """
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"finetune_decoder: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  weights = None
  if training.head_weight:
    if heads is None or heads.shape != images.shape[:3]:
      raise ValueError(f"finetune_decoder: head_weight={training.head_weight} needs heads, bool [N, H, W] = "
                       f"{list(images.shape[:3])}, got {None if heads is None else list(heads.shape)}")
    weights = 1.0 + training.head_weight * heads.astype(np.float32)
  missing = [k for k in (*DECODER_PARAMS, "encoder", "quant_conv") if k not in params]
  if missing:
    raise ValueError(f"finetune_decoder: params have no {missing}: not a diffusers-layout AutoencoderKL")
  vae = AutoencoderKL(config)
  latents = _posterior_means(vae, params, images)
  encoder = jax.device_put({k: v for k, v in params.items() if k not in DECODER_PARAMS})
  decoder = jax.device_put({k: params[k] for k in DECODER_PARAMS})
  tx = _optimizer(training.steps, training.lr)
  opt_state = jax.jit(tx.init)(decoder)
  rng = np.random.default_rng(training.seed)
  key = jax.random.key(training.seed)
  noise_std = jnp.float32(training.latent_noise)
  losses: list[jax.Array] = []
  last: dict[str, float] = {}
  for step in range(training.steps):
    idx = rng.integers(len(images), size=training.batch_size)
    batch_weights = None if weights is None else jnp.asarray(weights[idx])
    decoder, opt_state, loss = _decoder_step(decoder, opt_state, encoder, jnp.asarray(latents[idx]),
                                             jnp.asarray(images[idx]), batch_weights, noise_std,
                                             jax.random.fold_in(key, step), vae=vae, tx=tx)
    losses = [*losses[-9:], loss]
    report = {}
    if step % 10 == 9 or step == training.steps - 1:
      report = last = {"loss": float(np.mean([float(v) for v in losses]))}
    if progress is not None:
      progress(step + 1, report)
  return {**params, **jax.tree.map(np.asarray, decoder)}, last


@dataclasses.dataclass(frozen=True)
class EncoderTuning:
  """Training a trained VAE's encoder and decoder together on weighted pixels, its latent space held in place
  (`tune_autoencoder`).

  Attributes:
    steps: Adam updates.
    batch_size: images per update.
    lr: peak learning rate (cosine decay to 10% after a 5% warm-up); lower than a decoder's, as the encoder must
      not move far.
    seed: batch order.
    anchor: weight of the latents' mean squared drift from the VAE's own (`[B, h, w, C]` posterior means before
      tuning, over their variance) in the loss. A UNet and ControlNet trained in the old latent space keep working
      when the drift is a few percent; unanchored, the encoder is free to re-arrange the space.
  """

  steps: int = 3000
  batch_size: int = 16
  lr: float = 3e-4
  seed: int = 2
  anchor: float = 10.0

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.anchor < 0:
      raise ValueError(f"EncoderTuning: expected steps, batch_size >= 1, lr > 0, anchor >= 0, got {self}")


def tuning_loss(params: Params, vae: AutoencoderKL, images: jax.Array, weights: jax.Array, anchors: jax.Array,
                anchor: float, variance: float) -> tuple[jax.Array, jax.Array]:
  """(weighted L1 + MSE of the reconstruction of uint8 `images` [B, H, W, 3] from their posterior means, with
  per-pixel `weights` [B, H, W] > 0, plus `anchor` x drift; the drift: mean square of those means minus `anchors`
  [B, h, w, C], over `variance`)."""
  x = _images(images)
  latents = _encode_mean(params, vae, images)
  recon = vae.apply({"params": params}, latents, method="decode")
  error = jnp.mean(jnp.abs(recon - x) + jnp.square(recon - x), axis=-1)
  drift = jnp.mean(jnp.square(latents - anchors)) / variance
  return jnp.sum(error * weights) / jnp.sum(weights) + anchor * drift, drift


@functools.partial(jax.jit, static_argnames=("vae", "tx", "anchor", "variance"), donate_argnums=(0, 1))
def _tuning_step(params: Params, opt_state: Any, images: jax.Array, weights: jax.Array, anchors: jax.Array, *,
                 vae: AutoencoderKL, tx: optax.GradientTransformation, anchor: float,
                 variance: float) -> tuple[Params, Any, jax.Array, jax.Array]:
  (loss, drift), grads = jax.value_and_grad(tuning_loss, has_aux=True)(params, vae, images, weights, anchors,
                                                                      anchor, variance)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, drift


def tune_autoencoder(config: VAEConfig, params: Params, images: np.ndarray, weights: np.ndarray,
                     training: EncoderTuning = EncoderTuning(),
                     progress: Callable[[int, dict[str, float]], None] | None = None
                     ) -> tuple[Params, dict[str, float]]:
  """Trains a trained VAE's encoder and decoder further on `images` (uint8 [N, H, W, 3]), each pixel's loss
  weighted by `weights` (float [N, H, W], > 0), the latents anchored to the VAE's own (`training.anchor`).

  For what a 4-channel latent drops unless the encoder is made to keep it (a 64 px figure's eyes: `finetune_decoder`
  alone cannot draw what the latents do not carry). The latent space moves only by the anchored drift, so a base
  trained over the old one is continued on the new one rather than retrained.

  Returns:
    (params, {"loss": the mean of the last 10 steps, "drift": the latents' rms drift over their std, same steps}).
  """
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"tune_autoencoder: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  if weights.shape != images.shape[:3] or not (weights > 0).all():
    raise ValueError(f"tune_autoencoder: weights must be positive, [N, H, W] = {list(images.shape[:3])}, got "
                     f"{list(weights.shape)} (min {float(weights.min()) if weights.size else None})")
  vae = AutoencoderKL(config)
  anchors = _posterior_means(vae, params, images)
  variance = float(np.var(anchors))
  params = jax.device_put(params)
  tx = _optimizer(training.steps, training.lr)
  opt_state = jax.jit(tx.init)(params)
  rng = np.random.default_rng(training.seed)
  history: list[tuple[jax.Array, jax.Array]] = []
  last: dict[str, float] = {}
  for step in range(training.steps):
    idx = rng.integers(len(images), size=training.batch_size)
    params, opt_state, loss, drift = _tuning_step(params, opt_state, jnp.asarray(images[idx]),
                                                  jnp.asarray(weights[idx], jnp.float32), jnp.asarray(anchors[idx]),
                                                  vae=vae, tx=tx, anchor=float(training.anchor), variance=variance)
    history = [*history[-9:], (loss, drift)]
    report = {}
    if step % 10 == 9 or step == training.steps - 1:
      report = last = {"loss": float(np.mean([float(a) for a, _ in history])),
                       "drift": float(np.sqrt(np.mean([float(b) for _, b in history])))}
    if progress is not None:
      progress(step + 1, report)
  return jax.tree.map(np.asarray, params), last


def _reconstruction(config: AnyVAEConfig, params: Params, images: np.ndarray) -> np.ndarray:
  """float32 `[N, H, W, 3]` in [-1, 1]: uint8 `images` through the autoencoder (posterior mode)."""
  vae = make_vae(config)
  return np.asarray(jax.jit(lambda p, x: vae.apply({"params": p}, x))(params, _images(jnp.asarray(images))))


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def reconstruct(config: AnyVAEConfig, params: Params, images: np.ndarray) -> np.ndarray:
  """uint8 `[N, H, W, 3]` -> the autoencoder's uint8 reconstructions (posterior mode, no sampling)."""
  return _to_uint8(_reconstruction(config, params, images))


def reconstruction_metrics(config: AnyVAEConfig, params: Params, images: np.ndarray) -> dict[str, float]:
  """{"l1" (pixels in [-1, 1], as `autoencoder_loss`), "psnr" (dB, uint8 pixels)} of `images` (uint8 [N, H, W, 3])
  through the autoencoder (posterior mode)."""
  recon = _reconstruction(config, params, images)
  x = images.astype(np.float64) / 127.5 - 1.0
  mse = np.mean(np.square(_to_uint8(recon).astype(np.float64) - images.astype(np.float64)), (1, 2, 3))
  return {"l1": float(np.mean(np.abs(recon - x))),
          "psnr": float(np.mean(10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))}


def save_autoencoder(folder: str, config: AnyVAEConfig, params: Params, metrics: dict[str, float]) -> None:
  """`folder/{config.json, params/}` (a `save_flax_model` folder) plus `folder/training.json` (final losses)."""
  save_flax_model(config.to_diffusers(), params, folder)
  with open(os.path.join(folder, "training.json"), "w") as f:
    json.dump(metrics, f, indent=2)


def load_autoencoder(folder: str) -> tuple[AnyVAEConfig, Params]:
  """The VAE `save_autoencoder` wrote."""
  return vae_config_from_folder(folder), load_flax_params(folder)


def is_saved_autoencoder(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, "training.json"))


def write_base_pipeline(folder: str, vae_config: AnyVAEConfig, vae_params: Params, unet_config: UNetConfig,
                        text_config: CLIPTextConfig, seed: int, scheduler: ScheduleConfig = SD15_SCHEDULE) -> None:
  """An SD pipeline folder (`save_flax_pipeline`) of the trained VAE with a random UNet and text encoder.

  `unet_config.sample_size` should be the latent side (image side / the VAE's factor) and its in/out channels the
  VAE's latent channels; `scheduler` is the noise schedule the base (and every stage over it) trains and samples
  with.
  """
  if unet_config.in_channels != vae_config.latent_channels or unet_config.out_channels != vae_config.latent_channels:
    raise ValueError(f"write_base_pipeline: the UNet takes {unet_config.in_channels} and predicts "
                     f"{unet_config.out_channels} channels, the VAE's latents have {vae_config.latent_channels}")
  abstract = {"unet": abstract_unet_params(unet_config), "text_encoder": abstract_text_encoder_params(text_config)}
  params = {**random_params(abstract, seed), "vae": vae_params}
  if jax.tree.structure(abstract_autoencoder_params(vae_config)) != jax.tree.structure(vae_params):
    raise ValueError(f"write_base_pipeline: vae_params do not match the VAE config {vae_config}")
  save_flax_pipeline(SDConfigs(unet_config, vae_config, text_config, scheduler), params, folder)
