"""Sample grids for TensorBoard during training: reference | pose | generated | target, one row per example.

The generator is the stage's model with the current trainable params (the EMA when there is one), guided DDIM
(`diffusion.sampler.sample`) from fixed noise, decoded by the frozen VAE; one jit over the mesh with a
replicated output, so every process takes part and process 0 writes the image.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.diffusion.sampler import SamplerConfig, sample
from magicpose_jax.diffusion.schedules import Schedule, make_schedule
from magicpose_jax.models.vae import scale_latents, unscale_latents
from magicpose_jax.train.stages import Networks

Params = dict[str, Any]
COLUMNS = ("reference", "pose", "generated", "target")


def _to_uint8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def generate(nets: Networks, schedule: Schedule, sampler: SamplerConfig, params: Params, frozen: Params,
             reference: jax.Array, pose: jax.Array, key: jax.Array) -> jax.Array:
  """uint8 images `[N, H, W, 3]` for uint8 `reference`/`pose` `[N, H, W, 3]` (jit with the first 3 args static)."""
  n = reference.shape[0]
  vae = nets.vae
  full = {**{k: v for k, v in frozen.items() if k == "unet"}, **params}
  text = jnp.broadcast_to(frozen["text"], (n, *frozen["text"].shape[1:]))
  z_ref = None
  if nets.model.config.use_appearance:
    ref = reference.astype(jnp.float32) / 127.5 - 1.0
    z_ref = scale_latents(vae.apply({"params": frozen["vae"]}, ref, method="encode").mode(), vae.config)
  pose_image = pose.astype(jnp.float32) / 255.0 if nets.model.config.pose is not None else None
  f = nets.latent_factor
  shape = (n, reference.shape[1] // f, reference.shape[2] // f, nets.unet.config.out_channels)
  x_T = jax.random.normal(key, shape, jnp.float32)
  z0 = sample(nets.model, full, schedule, nets.schedule, sampler, x_T, text, z_ref, pose_image)
  images = vae.apply({"params": frozen["vae"]}, unscale_latents(z0, vae.config), method="decode")
  return _to_uint8(images)


def make_sampler(nets: Networks, steps: int, guidance: float, mesh: jax.sharding.Mesh) -> Any:
  """A jitted `(params, frozen, reference, pose, key) -> uint8 images`, replicated on every device."""
  fn = functools.partial(generate, nets, make_schedule(nets.schedule), SamplerConfig(num_steps=steps,
                                                                                     guidance=guidance))
  return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def grid(columns: list[np.ndarray], gap: int = 2) -> np.ndarray:
  """Rows of `[N, H, W, 3]` column images -> one uint8 `[N*(H+gap), C*(W+gap), 3]` image."""
  n, h, w, _ = columns[0].shape
  out = np.full((n * (h + gap), len(columns) * (w + gap), 3), 255, np.uint8)
  for c, images in enumerate(columns):
    for r in range(n):
      out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = images[r]
  return out
