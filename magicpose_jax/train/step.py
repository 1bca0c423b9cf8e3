"""The training step: VAE latents, noise at a random t, the stage's denoiser, MSE, AdamW.

    state, metrics = train_step(state, frozen, batch)   # jit with the static Networks closed over

`frozen` (main UNet, VAE, the empty prompt's text states) is an input that is never differentiated.
Gradients exist only for `state.params` (the trainable tree). A non-finite loss or gradient skips
the update (params, optimizer state and EMA unchanged) and counts it in `state.nonfinite`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from magicpose_jax.diffusion.schedules import Schedule, add_noise, training_target
from magicpose_jax.models.vae import DiagonalGaussian, scale_latents
from magicpose_jax.train.stages import Networks

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the frozen base and the data iterator.

  Attributes:
    step: optimizer updates done (int32 scalar).
    params: the trainable tree (float32 masters).
    opt_state: optax state for `params` only.
    ema: EMA of `params` (an empty dict when `ema_decay` is 0).
    rng: the step key (`jax.random.key_data` form, uint32 `[2]`, so it checkpoints as an array).
    nonfinite: consecutive skipped (non-finite) steps.
  """

  step: jax.Array
  params: Params
  opt_state: Any
  ema: Params
  rng: jax.Array
  nonfinite: jax.Array


def init_state(params: Params, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema=jax.tree.map(jnp.array, params) if ema else {},
                    rng=jax.random.key_data(jax.random.key(seed)), nonfinite=jnp.zeros((), jnp.int32))


def _images(x: jax.Array) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> float32 in [-1, 1]."""
  return x.astype(jnp.float32) / 127.5 - 1.0


def latents(nets: Networks, vae_params: Params, batch: Mapping[str, jax.Array], name: str,
            key: jax.Array) -> jax.Array:
  """The scaled latent `[B, h, w, 4]` of `batch[name]` (pixels) or `batch[name + "_latent"]` (cached moments).

  Like LDM's `get_first_stage_encoding`, a sample of the posterior, not its mean.
  """
  if name + "_latent" in batch:
    dist = DiagonalGaussian.from_moments(batch[name + "_latent"].astype(jnp.float32))
  else:
    dist = nets.vae.apply({"params": vae_params}, _images(batch[name]), method="encode")
  z = dist.sample(key).astype(jnp.float32)
  return jax.lax.stop_gradient(scale_latents(z, nets.vae.config))


def predict(nets: Networks, params: Params, z_t: jax.Array, t: jax.Array, text: jax.Array, z_ref: jax.Array | None,
            pose: jax.Array | None, use_reference: jax.Array | None, use_pose: jax.Array | None) -> jax.Array:
  """The stage's model output for `z_t`; `params` holds every network (frozen and trainable).

  Stage "base" with `z_ref` is reference-only training: the UNet's self-attention also reads its own states of
  the clean reference (the Appearance Controller's route, with the UNet itself as the controller: one set of
  weights in both roles, so its gradient is the sum of both uses). `use_reference [B]` picks the rows that do.
  """
  if nets.stage == "base":
    if z_ref is None:
      return nets.unet.apply({"params": params["unet"]}, z_t, t, text)
    model = dataclasses.replace(nets.model, config=dataclasses.replace(nets.model.config, use_appearance=True))
    shared = {"unet": params["unet"], "appearance": params["unet"]}
    return model.apply(shared, z_t, t, text, z_ref, use_reference=use_reference)
  pose_image = None if pose is None else pose.astype(jnp.float32) / 255.0
  return nets.model.apply(params, z_t, t, text, z_ref, pose_image, use_reference=use_reference, use_pose=use_pose)


def head_weights(head_mask: jax.Array, latent_shape: tuple[int, ...], weight: float) -> jax.Array:
  """float32 `[B, h, w, 1]` loss weights: `weight` inside the head, 1 elsewhere, on the latent grid.

  Args:
    head_mask: uint8 `[B, H, W]`, 1 inside the target's heads (`pose.regions.head_mask`), at the image's size.
    latent_shape: `[B, h, w, C]`, the latents' shape; H and W must be multiples of h and w.
    weight: the head's weight.
  A latent cell takes the share of its pixels inside the head, so a cell on the head's outline is weighed
  in proportion.
  """
  b, h, w = latent_shape[:3]
  big_h, big_w = head_mask.shape[1:]
  if big_h % h or big_w % w:
    raise ValueError(f"head_mask {list(head_mask.shape)} does not tile the latents {list(latent_shape)}")
  share = head_mask.astype(jnp.float32).reshape(b, h, big_h // h, w, big_w // w).mean((2, 4))
  return (1.0 + (weight - 1.0) * share)[..., None]


def loss_fn(trainable: Params, frozen: Params, batch: Mapping[str, jax.Array], key: jax.Array, nets: Networks,
            schedule: Schedule, drop_reference: float, drop_pose: float, base_reference: float = 0.0,
            head_weight: float = 1.0) -> jax.Array:
  """Mean squared error of the prediction (ε or v per the schedule) over a batch, in float32.

  `base_reference` (stage "base" only): the share of rows trained reference-only (`predict`); the others, and
  every row when it is 0, are plain SD training. `head_weight` != 1 (needs `batch["head_mask"]`): the error
  inside the target's head weighs that much more, as a weighted mean over the batch (`head_weights`).
  """
  k_z, k_ref, k_noise, k_t, k_drop_r, k_drop_p = jax.random.split(key, 6)
  z0 = latents(nets, frozen["vae"], batch, "target", k_z)
  b = z0.shape[0]
  noise = jax.random.normal(k_noise, z0.shape, jnp.float32)
  t = jax.random.randint(k_t, (b,), 0, nets.schedule.num_train_timesteps)
  z_t = add_noise(schedule, z0, noise, t)
  text = jnp.broadcast_to(frozen["text"], (b, *frozen["text"].shape[1:]))
  params = {**{k: v for k, v in frozen.items() if k in ("unet",)}, **trainable}
  if nets.stage == "base":
    drop_reference = 1.0 - base_reference
  with_reference = nets.model.config.use_appearance if nets.stage != "base" else base_reference > 0
  z_ref = latents(nets, frozen["vae"], batch, "reference", k_ref) if with_reference else None
  use_reference = jax.random.uniform(k_drop_r, (b,)) >= drop_reference if drop_reference > 0 else None
  use_pose = jax.random.uniform(k_drop_p, (b,)) >= drop_pose if drop_pose > 0 else None
  pose = batch.get("pose") if nets.model.config.pose is not None else None
  pred = predict(nets, params, z_t, t, text, z_ref, pose, use_reference, use_pose)
  target = training_target(nets.schedule, schedule, z0, noise, t)
  error = jnp.square(pred.astype(jnp.float32) - target)
  if head_weight == 1.0:
    return jnp.mean(error)
  weights = head_weights(batch["head_mask"], z0.shape, head_weight)
  return jnp.sum(weights * error) / (jnp.sum(weights) * error.shape[-1])


def split_micro(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
  """`[B, ...]` -> `[n, B/n, ...]`: micro-batch j is rows j, j + n, j + 2n, ... (strided, not contiguous).

  The batch axis is sharded over the data-parallel devices in contiguous blocks of `B/D` rows. Strided
  micro-batches take `B/(n*D)` rows from every block, so each micro-step keeps all D devices busy on a
  per-device batch `n` times smaller, with no resharding inside the scan. Contiguous chunks would put
  micro-batch j on devices `j*D/n ... (j+1)*D/n - 1` only: the per-device batch would not shrink and the
  partitioner would move weights and activations between devices every micro-step
  (benchmarks/memory_plan.py measured it).
  """
  return {k: v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def train_step(state: TrainState, frozen: Params, batch: Mapping[str, jax.Array], *, nets: Networks,
               schedule: Schedule, tx: optax.GradientTransformation, lr_fn: optax.Schedule, grad_accum_steps: int = 1,
               ema_decay: float = 0.0, drop_reference: float = 0.0, drop_pose: float = 0.0,
               base_reference: float = 0.0, head_weight: float = 1.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update over the global batch (`grad_accum_steps` micro-batches scanned)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  grad_fn = jax.value_and_grad(loss_fn)
  args = (nets, schedule, drop_reference, drop_pose, base_reference, head_weight)
  if grad_accum_steps == 1:
    loss, grads = grad_fn(state.params, frozen, batch, key, *args)
  else:
    micro = split_micro(batch, grad_accum_steps)

    def body(carry, xs):
      loss_sum, grad_sum = carry
      i, mb = xs
      loss, grads = grad_fn(state.params, frozen, mb, jax.random.fold_in(key, i), *args)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (jnp.arange(grad_accum_steps), micro))
    loss, grads = loss / grad_accum_steps, jax.tree.map(lambda g: g / grad_accum_steps, grads)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  ema = state.ema
  if ema_decay > 0:
    ema = keep(jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params), ema)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                            nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step), "finite": finite}
  return new_state, metrics
