"""Training step: our jitted step vs a PyTorch reference step of the same MagicPose model, same weights and batch.

    python benchmarks/train_step.py                                  # tiny + mid, stage 1 and stage 2
    python benchmarks/train_step.py --models tiny --stages stage1    # a smoke run
    python benchmarks/train_step.py --models mid --profile           # + per-part times (VAE, forwards, backward)
    taskset -c 0 python benchmarks/train_step.py                     # one core, one thread each (see below)

Ours: `loop.setup(config)` and the compiled `run.step_fn` on one fixed uint8 batch (VAE encode, noise, the
stage's denoiser, MSE, backward, clip + AdamW, all inside the jit). PyTorch: diffusers' `AutoencoderKL`,
`UNet2DConditionModel` (main, frozen; appearance, trained) and `ControlNetModel` (pose, trained in stage 2)
holding our weights (the project's key tables), with the reference-attention processors of
`tests/test_reference_states.py`, fused `torch.optim.AdamW` + global-norm clipping on the trainable params,
fp32, as many threads as XLA uses (the cores this process may run on).

"tiny" is `configs/tiny.py` (batch 4, 32 px, 16 x 16 latents). "mid" is a small real-shaped SD defined here:
UNet widths (64, 128, 256) with two layers per block, a VAE that downsamples by 8 (256 px -> 32 x 32 latents),
SD's hint encoder, batch 4; the base is written as a diffusers pipeline folder and loaded with `base.path`.

Before timing, both sides compute the loss and the gradients on the same latents, noise and t, and the script
prints their differences: the two steps compute the same function. Times are medians of steps that alternate
between ours and PyTorch, so drifting background load hits both alike. The CPU seconds per step
(`time.process_time`, all threads) are printed too. On a machine shared with other jobs, PyTorch's OpenMP
threads wait at every op's barrier for a descheduled sibling and its wall time balloons (several x); pinning
the run to one core (`taskset -c 0`: one thread each) gives load-robust numbers, where CPU time ~ wall time.
"""

# ruff: noqa: E402 -- the platform and the import paths (repo root, tests/) must be set before the imports.
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as TorchVAE
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet

from magicpose_jax.configs import load_config
from magicpose_jax.convert.controlnet import controlnet_key_table
from magicpose_jax.convert.diffusers import unet_key_table
from magicpose_jax.convert.stable_diffusion import SDConfigs, save_stable_diffusion
from magicpose_jax.convert.vae import vae_key_table
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE, add_noise, make_schedule
from magicpose_jax.models.clip import CLIP_VARIANTS
from magicpose_jax.models.unet import UNetConfig
from magicpose_jax.models.vae import VAEConfig
from magicpose_jax.torch_reference import ConcatKV, Record, set_self_attention
from magicpose_jax.train import loop, sharding, stages
from magicpose_jax.train.optimizer import make_optimizer
from magicpose_jax.train.step import latents, predict

Params = dict[str, Any]
GOAL = 1.5  # ours / PyTorch steps per second

# The "mid" base: SD's block layout at small widths (transformer blocks at the two finer levels, like SD 1.5's
# three of four), head width 32; a VAE with SD's 8x downsampling at quarter widths; a 2-layer text tower whose
# width is the cross-attention width.
MID = SDConfigs(
    unet=UNetConfig(sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=256, attention_head_dim=(2, 4, 8)),
    vae=VAEConfig(sample_size=256, block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16),
    text_encoder=dataclasses.replace(CLIP_VARIANTS["tiny"], hidden_size=256, intermediate_size=1024,
                                     num_hidden_layers=2, num_attention_heads=4, projection_dim=256),
    scheduler=SD15_SCHEDULE)
MID_IMAGE = 256
MID_BATCH = 4


# ---------------------------------------------------------------------------------------------------------------
# Configs and batches.


def make_config(model: str, stage: str, mid_base: str) -> ml_collections.ConfigDict:
  """`configs/tiny.py`, or it over the "mid" base folder `mid_base`, for `stage`, float32 on one device."""
  c = load_config("tiny")
  c.stage = stage
  c.dtype = "float32"
  if model == "mid":
    c.base.path = mid_base
    c.global_batch_size = MID_BATCH
    c.model.hint_channels = (16, 32, 96, 256)  # SD's hint encoder: 3 stride-2 convs, like the VAE
    c.data.image_size = MID_IMAGE
  return c


def write_mid_base(folder: str, seed: int = 0) -> None:
  """A random-init "mid" SD as a diffusers pipeline folder (what `config.base.path` reads)."""
  save_stable_diffusion(MID, jax.tree.map(np.asarray, stages.random_base(MID, seed)), folder)


def fixed_batch(batch_size: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random uint8 `reference`, `target` and `pose` images `[B, size, size, 3]` (the step's input format)."""
  rng = np.random.default_rng(seed)
  return {k: rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8) for k in ("reference", "target", "pose")}


# ---------------------------------------------------------------------------------------------------------------
# The PyTorch reference.


def _torch_state(table: Any, params: Params) -> dict[str, torch.Tensor]:
  return {k: torch.from_numpy(np.array(v)) for k, v in table.to_torch(params).items()}  # writable copies


def _diffusers_kwargs(config: Any) -> dict[str, Any]:
  return {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}


class TorchStep:
  """The same training step in PyTorch: diffusers networks holding our weights, AdamW on the trainable ones.

  Reference attention: the appearance UNet's `attn1` processors record their (normed) inputs and the main
  UNet's `attn1` attend over `[h ; r_i]` (`Record` / `ConcatKV` from `tests/test_reference_states.py`).
  """

  def __init__(self, config: ml_collections.ConfigDict, nets: stages.Networks, trainable: Params, frozen: Params):
    mp = nets.model.config
    unet_table = unet_key_table(mp.unet)
    self.main = TorchUNet(**_diffusers_kwargs(mp.unet))
    self.main.load_state_dict(_torch_state(unet_table, frozen["unet"]))
    self.main.requires_grad_(False)
    self.appearance = TorchUNet(**_diffusers_kwargs(mp.unet))
    self.appearance.load_state_dict(_torch_state(unet_table, trainable["appearance"]))
    # Ours skips the appearance net's output head (`compute_output=False`); so does this one.
    self.appearance.conv_norm_out, self.appearance.conv_out = None, torch.nn.Identity()
    self.pose = None
    if mp.pose is not None:
      self.pose = TorchControlNet(**_diffusers_kwargs(mp.pose))
      self.pose.load_state_dict(_torch_state(controlnet_key_table(mp.pose), trainable["pose"]))
    self.vae = TorchVAE(**_diffusers_kwargs(nets.vae.config))
    self.vae.load_state_dict(_torch_state(vae_key_table(nets.vae.config), frozen["vae"]))
    self.vae.requires_grad_(False)
    for m in (self.main, self.appearance, self.pose, self.vae):
      if m is not None:
        m.train(False)  # no dropout anywhere (ours has none); training mode only matters for dropout here
    self.scaling = nets.vae.config.scaling_factor
    self.num_t = nets.schedule.num_train_timesteps
    self.alphas = torch.from_numpy(np.asarray(make_schedule(nets.schedule).alphas_cumprod))
    self.text = torch.from_numpy(np.asarray(frozen["text"]))
    self.recorded: list[torch.Tensor] = []
    self.queue: list[torch.Tensor] = []
    set_self_attention(self.appearance, lambda proc: Record(self.recorded, proc))
    set_self_attention(self.main, lambda _: ConcatKV(lambda h: self.queue.pop(0)))
    self.params = [p for m in (self.appearance, self.pose) if m is not None for p in m.parameters()]
    opt = config.optimizer
    self.clip = opt.grad_clip
    # fused: PyTorch's fastest CPU AdamW (2.3x its default per-tensor loop at "mid" size), the stronger baseline.
    self.opt = torch.optim.AdamW(self.params, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps,
                                 weight_decay=opt.weight_decay, fused=True)

  def predict(self, z_t: torch.Tensor, t: torch.Tensor, z_ref: torch.Tensor, pose: torch.Tensor | None) -> torch.Tensor:
    """NCHW latents -> the main UNet's output (with the appearance states and pose residuals)."""
    text = self.text.expand(z_t.shape[0], -1, -1)
    self.recorded.clear()
    self.appearance(z_ref, t, text)
    self.queue[:] = self.recorded
    down = mid = None
    if self.pose is not None:
      down, mid = self.pose(z_t, t, text, controlnet_cond=pose, return_dict=False)
    out = self.main(z_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    if self.queue:
      raise RuntimeError(f"{len(self.queue)} reference states were not consumed by the main UNet")
    return out

  def encode(self, images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> a scaled posterior sample, like ours (`train.step.latents`)."""
    with torch.no_grad():
      return self.vae.encode(images.float() / 127.5 - 1.0).latent_dist.sample() * self.scaling

  def loss(self, z0: torch.Tensor, z_ref: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
           pose: torch.Tensor | None) -> torch.Tensor:
    a = self.alphas[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    return F.mse_loss(self.predict(z_t, t, z_ref, pose), noise)

  def step(self, batch: dict[str, torch.Tensor]) -> float:
    """One update on a uint8 NCHW batch; returns the loss."""
    z0, z_ref = self.encode(batch["target"]), self.encode(batch["reference"])
    noise = torch.randn_like(z0)
    t = torch.randint(0, self.num_t, (z0.shape[0],))
    pose = batch["pose"].float() / 255.0 if self.pose is not None else None
    loss = self.loss(z0, z_ref, noise, t, pose)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    return loss.detach()

  def grads(self) -> dict[str, dict[str, np.ndarray]]:
    """The trainable nets' gradients by PyTorch name (after a backward)."""
    return {name: {k: p.grad.numpy() for k, p in m.named_parameters() if p.grad is not None}
            for name, m in (("appearance", self.appearance), ("pose", self.pose)) if m is not None}


def to_torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  return {k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))) for k, v in batch.items()}


def nchw(x: Any) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------------------------
# Same inputs, same loss.


def ours_loss(trainable: Params, frozen: Params, z0: jax.Array, z_ref: jax.Array, noise: jax.Array, t: jax.Array,
              pose: jax.Array | None, nets: stages.Networks) -> jax.Array:
  """`train.step.loss_fn` with given latents `[B, h, w, 4]`, noise and t `[B]` (no VAE, no random draws)."""
  z_t = add_noise(make_schedule(nets.schedule), z0, noise, t)
  text = jnp.broadcast_to(frozen["text"], (z0.shape[0], *frozen["text"].shape[1:]))
  pred = predict(nets, {"unet": frozen["unet"], **trainable}, z_t, t, text, z_ref, pose, None, None)
  return jnp.mean(jnp.square(pred - noise))


def _flat(tree: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
  return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in keys])


def sanity(nets: stages.Networks, trainable: Params, frozen: Params, ref: TorchStep,
           batch: dict[str, np.ndarray]) -> dict[str, float]:
  """Both losses and gradients on our latents with one noise/t draw, and the VAE posterior means' difference."""
  key = jax.random.key(1)
  k_z, k_r, k_n, k_t = jax.random.split(key, 4)
  z0 = latents(nets, frozen["vae"], batch, "target", k_z)
  z_ref = latents(nets, frozen["vae"], batch, "reference", k_r)
  noise = jax.random.normal(k_n, z0.shape, jnp.float32)
  t = jax.random.randint(k_t, (z0.shape[0],), 0, nets.schedule.num_train_timesteps)
  pose = batch["pose"] if nets.model.config.pose is not None else None
  loss, grads = jax.jit(jax.value_and_grad(ours_loss), static_argnames="nets")(
      trainable, frozen, z0, z_ref, noise, t, pose, nets=nets)
  mean = nets.vae.apply({"params": frozen["vae"]}, batch["target"].astype(np.float32) / 127.5 - 1.0,
                        method="encode").mean
  tb = to_torch_batch(batch)
  with torch.no_grad():
    torch_mean = ref.vae.encode(tb["target"].float() / 127.5 - 1.0).latent_dist.mean
  pose_t = tb["pose"].float() / 255.0 if pose is not None else None
  for p in ref.params:
    p.grad = None
  torch_loss = ref.loss(nchw(z0), nchw(z_ref), nchw(noise), torch.from_numpy(np.asarray(t)).long(), pose_t)
  torch_loss.backward()
  torch_loss = torch_loss.detach()
  torch_grads = ref.grads()
  for p in ref.params:
    p.grad = None
  out = {"loss": float(loss), "loss_diff": abs(float(loss) - torch_loss.item()),
         "vae_mean_diff": float(np.abs(np.asarray(mean) - torch_mean.numpy().transpose(0, 2, 3, 1)).max())}
  tables = {"appearance": unet_key_table(nets.model.config.unet)}
  if nets.model.config.pose is not None:
    tables["pose"] = controlnet_key_table(nets.model.config.pose)
  for name, table in tables.items():
    ours = table.to_torch(jax.device_get(grads[name]))
    # The PyTorch appearance net has no output head (as ours computes none): its zero gradients are left out.
    keys = sorted(torch_grads[name])
    g_ours, g_torch = _flat(ours, keys), _flat(torch_grads[name], keys)
    out[f"grad_norm_{name}"] = float(np.linalg.norm(g_ours))
    out[f"grad_{name}_rel_err"] = float(np.linalg.norm(g_ours - g_torch) / max(np.linalg.norm(g_torch), 1e-30))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass(frozen=True)
class Timing:
  wall_s: float  # median wall seconds per call
  cpu_s: float  # median CPU seconds per call, all threads of this process
  min_s: float  # fastest call (wall): the least disturbed by other processes


def alternate(fns: list[Callable[[], Any]], iters: int) -> list[Timing]:
  """Medians of each of `fns`, after one warm-up each, run in rounds (as `benchmarks/timing.py` does).

  Rounds make drifting load from other processes hit every function alike; each round's order is drawn at
  random (seeded), so the cost of running right after another function (cold caches) falls on none in particular.
  """
  for fn in fns:
    fn()
  wall: list[list[float]] = [[] for _ in fns]
  cpu: list[list[float]] = [[] for _ in fns]
  order = random.Random(0)
  for _ in range(iters):
    for i in order.sample(range(len(fns)), len(fns)):
      fn = fns[i]
      w, c = time.perf_counter(), time.process_time()
      fn()
      cpu[i].append(time.process_time() - c)
      wall[i].append(time.perf_counter() - w)
  return [Timing(statistics.median(w), statistics.median(c), min(w)) for w, c in zip(wall, cpu, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# Per-part times (`--profile`).


def profile_parts(config: ml_collections.ConfigDict, nets: stages.Networks, trainable: Params, frozen: Params,
                  ref: TorchStep, batch: dict[str, np.ndarray], iters: int) -> list[tuple[str, Timing, Timing]]:
  """(part, ours, PyTorch) times of the VAE encodes, each forward, forward+backward and the optimizer update."""
  mp = nets.model
  trainable, frozen = jax.device_put(trainable), jax.device_put(frozen)
  b = batch["target"].shape[0]
  key = jax.random.key(2)
  z0 = latents(nets, frozen["vae"], batch, "target", key)
  z_ref = latents(nets, frozen["vae"], batch, "reference", key)
  noise = jax.random.normal(key, z0.shape, jnp.float32)
  t = jnp.full((b,), 500, jnp.int32)
  pose = batch["pose"] if mp.config.pose is not None else None
  text = jnp.broadcast_to(frozen["text"], (b, *frozen["text"].shape[1:]))
  params = {"unet": frozen["unet"], **trainable}
  z_t = add_noise(make_schedule(nets.schedule), z0, noise, t)
  ready = jax.block_until_ready

  vae_fn = jax.jit(lambda v, x, y: (latents(nets, v, {"target": x}, "target", key),
                                    latents(nets, v, {"reference": y}, "reference", key)))
  app_fn = jax.jit(mp.reference_states)
  states = app_fn(params, z_ref, t, text)
  parts: list[tuple[str, Callable[[], Any]]] = [
      ("VAE encode x2", lambda: ready(vae_fn(frozen["vae"], batch["target"], batch["reference"]))),
      ("appearance forward", lambda: ready(app_fn(params, z_ref, t, text)))]
  residuals = None
  if mp.config.pose is not None:
    pose_fn = jax.jit(lambda p, z, tt, c, img: mp.pose_residuals(p, z, tt, c, img.astype(jnp.float32) / 255.0))
    residuals = pose_fn(params, z_t, t, text, pose)
    parts.append(("pose forward", lambda: ready(pose_fn(params, z_t, t, text, pose))))
  main_fn = jax.jit(mp.denoise)
  parts.append(("main forward", lambda: ready(main_fn(params, z_t, t, text, states, residuals))))
  loss_fn = jax.jit(ours_loss, static_argnames="nets")
  grad_fn = jax.jit(jax.value_and_grad(ours_loss), static_argnames="nets")
  args = (trainable, frozen, z0, z_ref, noise, t, pose)
  parts.append(("loss forward (all nets)", lambda: ready(loss_fn(*args, nets=nets))))
  parts.append(("forward + backward", lambda: ready(grad_fn(*args, nets=nets))))
  tx, _ = make_optimizer(config.optimizer, config.total_steps, trainable)
  opt_state = tx.init(trainable)
  grads = grad_fn(*args, nets=nets)[1]
  update_fn = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))
  parts.append(("clip + AdamW update", lambda: ready(update_fn(grads, opt_state, trainable))))

  tb = to_torch_batch(batch)
  zt0, tref, tnoise, tt = nchw(z0), nchw(z_ref), nchw(noise), torch.from_numpy(np.asarray(t)).long()
  tz_t, tpose = nchw(z_t), (tb["pose"].float() / 255.0 if pose is not None else None)
  ttext = ref.text.expand(b, -1, -1)

  def torch_app():
    with torch.no_grad():
      ref.recorded.clear()
      ref.appearance(tref, tt, ttext)

  def torch_pose():
    with torch.no_grad():
      return ref.pose(tz_t, tt, ttext, controlnet_cond=tpose, return_dict=False)

  torch_app()
  recorded = list(ref.recorded)
  residual = torch_pose() if ref.pose is not None else (None, None)

  def torch_main():
    with torch.no_grad():
      ref.queue[:] = recorded
      ref.main(tz_t, tt, ttext, down_block_additional_residuals=residual[0],
               mid_block_additional_residual=residual[1])

  def torch_loss():
    with torch.no_grad():
      ref.loss(zt0, tref, tnoise, tt, tpose)

  def torch_grad():
    ref.opt.zero_grad(set_to_none=True)
    ref.loss(zt0, tref, tnoise, tt, tpose).backward()

  torch_grad()
  saved = [p.detach().clone() for p in ref.params]

  def torch_update():
    torch.nn.utils.clip_grad_norm_(ref.params, ref.clip)
    ref.opt.step()

  torch_parts = {"VAE encode x2": lambda: (ref.encode(tb["target"]), ref.encode(tb["reference"])),
                 "appearance forward": torch_app, "pose forward": torch_pose, "main forward": torch_main,
                 "loss forward (all nets)": torch_loss, "forward + backward": torch_grad,
                 "clip + AdamW update": torch_update}
  rows = [(name, *alternate([fn, torch_parts[name]], iters)) for name, fn in parts]
  with torch.no_grad():  # undo the profiled updates
    for p, s in zip(ref.params, saved, strict=True):
      p.copy_(s)
  return rows


# ---------------------------------------------------------------------------------------------------------------
# The comparison.


@dataclasses.dataclass
class Result:
  model: str
  stage: str
  batch: int
  ours: Timing
  torch: Timing
  compile: Timing
  setup_s: float
  load: tuple[float, float, float]  # 1-min load average: at setup, before and after the timed steps
  check: dict[str, float]
  parts: list[tuple[str, Timing, Timing]] | None = None


def compare(model: str, stage: str, mid_base: str, iters: int, profile: bool) -> Result:
  """Sets up both steps for (model, stage), checks they agree, times them alternately."""
  load_start = os.getloadavg()[0]
  config = make_config(model, stage, mid_base)
  start = time.perf_counter()
  run = loop.setup(config)
  setup_s = time.perf_counter() - start
  trainable, frozen = loop.as_host(run.state.params), loop.as_host(run.frozen)  # before the step donates them
  batch_np = fixed_batch(config.global_batch_size, config.data.image_size)
  ref = TorchStep(config, run.nets, trainable, frozen)
  check = sanity(run.nets, trainable, frozen, ref, batch_np)
  parts = profile_parts(config, run.nets, trainable, frozen, ref, batch_np, iters) if profile else None

  batch = sharding.global_batch(batch_np, run.batch_sharding)
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = loop.compile_step(run, batch)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  compile_time = Timing(wall, cpu, wall)
  state = [run.state]

  def ours():
    state[0], metrics = compiled(state[0], run.frozen, batch)
    jax.block_until_ready((state[0], metrics))

  torch_batch = to_torch_batch(batch_np)
  load_timed = os.getloadavg()[0]
  ours_t, torch_t = alternate([ours, lambda: ref.step(torch_batch)], iters)
  return Result(model, stage, config.global_batch_size, ours_t, torch_t, compile_time, setup_s,
                (load_start, load_timed, os.getloadavg()[0]), check, parts)


def print_result(r: Result) -> None:
  c = r.check
  grads = ", ".join(f"{k[len('grad_'):-len('_rel_err')]} {v:.1e}" for k, v in c.items() if k.endswith("rel_err"))
  o, t = r.ours, r.torch
  print(f"{r.model}/{r.stage}: ours {o.wall_s * 1e3:.1f} ms/step (min {o.min_s * 1e3:.1f}, {o.cpu_s:.2f} CPU s), "
        f"PyTorch {t.wall_s * 1e3:.1f} ms/step (min {t.min_s * 1e3:.1f}, {t.cpu_s:.2f} CPU s), speed-up "
        f"{t.wall_s / o.wall_s:.2f}x (CPU time {t.cpu_s / o.cpu_s:.2f}x)", flush=True)
  print(f"  compile {r.compile.wall_s:.1f} s ({r.compile.cpu_s:.1f} CPU s), setup {r.setup_s:.1f} s; 1-min load "
        f"average {r.load[0]:.1f} / {r.load[1]:.1f} / {r.load[2]:.1f} (setup / timing / end)", flush=True)
  print(f"  same inputs: loss {c['loss']:.5f}, |ours - PyTorch| {c['loss_diff']:.1e}; gradients |ours - PyTorch| / "
        f"|PyTorch| {grads}; VAE mean max diff {c['vae_mean_diff']:.1e}", flush=True)
  if r.parts:
    for name, o, t in r.parts:
      print(f"    {name:<24} ours {o.wall_s * 1e3:8.1f} ms ({o.cpu_s:6.2f} CPU s)   PyTorch {t.wall_s * 1e3:8.1f} ms "
            f"({t.cpu_s:6.2f} CPU s)   speed-up {t.wall_s / o.wall_s:5.2f}x (CPU s {t.cpu_s / o.cpu_s:5.2f}x)",
            flush=True)


def print_table(results: list[Result], threads: int) -> None:
  print(f"\nTraining step, fp32, {threads} threads (both), jax {jax.__version__}, torch {torch.__version__}; "
        f"medians of alternating steps after compile/warm-up")
  print("| config | batch | ours steps/s | ours images/s | PyTorch steps/s | PyTorch images/s | speed-up | "
        "speed-up (CPU s) | ours compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    o, t = r.ours.wall_s, r.torch.wall_s
    print(f"| {r.model} {r.stage} | {r.batch} | {1 / o:.2f} | {r.batch / o:.1f} | {1 / t:.2f} | {r.batch / t:.1f} | "
          f"{t / o:.2f}x | {r.torch.cpu_s / r.ours.cpu_s:.2f}x | {r.compile.wall_s:.0f} |")
  below = [f"{r.model} {r.stage}" for r in results if r.torch.wall_s / r.ours.wall_s < GOAL]
  print(f"goal: speed-up >= {GOAL}x" + (f"; below it: {', '.join(below)}" if below else "; met everywhere"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
  parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"], choices=["stage1", "stage2"])
  parser.add_argument("--iters", type=int, default=5, help="timed steps of each, alternating")
  parser.add_argument("--profile", action="store_true", help="also time the parts (VAE, forwards, backward, AdamW)")
  args = parser.parse_args()

  threads = len(os.sched_getaffinity(0))  # XLA's CPU client uses every core it may run on; PyTorch gets as many
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  results = []
  with tempfile.TemporaryDirectory() as mid_base:
    if "mid" in args.models:
      write_mid_base(mid_base)
    for model in args.models:
      for stage in args.stages:
        results.append(compare(model, stage, mid_base, args.iters, args.profile))
        print_result(results[-1])
  print_table(results, threads)


if __name__ == "__main__":
  main()
