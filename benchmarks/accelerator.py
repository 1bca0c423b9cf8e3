"""MagicPose training and sampling throughput on whatever device JAX sees, against the PyTorch reference.

    python benchmarks/accelerator.py                        # GPU/TPU: full SD 1.5 at 512 px; CPU: --reduced
    python benchmarks/accelerator.py --time-budget 420 --max-batch 32
    python benchmarks/accelerator.py --reduced --policies   # + remat x dtype table (step time vs memory)

Full size (default on GPU/TPU): `configs/stage1.py` / `configs/stage2.py` (SD 1.5 UNets, VAE in the step, 512 px,
bf16 compute over float32 masters, the config's remat policy, `attention_backend="auto"`), random weights
(`models/random_init.py` through `loop.setup` with no `base.path`: nothing runs eagerly at full size), on ONE
device. For each stage the largest per-device batch that fits is found from one probe compile: XLA's
`memory_analysis()` at the probe batch gives the batch-independent part (arguments: params, Adam moments,
frozen base) and the per-example temporaries; the largest power of two that fits 90 % of the device's
`bytes_limit` is compiled and run, halving on an out-of-memory error. Timed: `--steps` steps after a warm-up
step; steps/s, images/s, TFLOP/s per device (XLA's count of the compiled step and the analytic model count of
`train.flops`), MFU against `train.flops.PEAKS`, peak memory (`device.memory_stats()`), compile time.

The PyTorch reference runs first, in a subprocess (so its CUDA memory is gone before JAX takes the device):
diffusers `UNet2DConditionModel` x 2 (main frozen, appearance trained) + `ControlNetModel` (stage 2) + VAE,
the reference-attention processors of `tests/test_reference_states.py` (SDPA), bf16 autocast over float32
params, fused AdamW, its own largest batch by halving on OOM; random weights (timing does not depend on them).
Skipped with a message where torch/diffusers are missing, or with no CUDA at full size.

Sampling: the issue's goal, a 50-step, 16-frame animation at 512 px with guidance 7 and reference caching
(`diffusion.sampler.sample_video`, all frames in one batch, stage-2 nets), frames/s; against an estimate of the
release's per-frame loop in PyTorch (per DDIM step: appearance net on the reference, pose net, main UNet on
[cond, uncond]; a few steps timed, x 50 steps per frame).

`--reduced` (default on CPU): `configs/tiny.py`'s models at batch 4, float32, 4 frames x 10 sampling steps;
the whole run takes a few minutes on a 2-core CPU and exercises every code path. A wall-clock `--time-budget`
skips what would not fit (a skipped part is a row saying so). Results go to
`benchmarks/results/accelerator-<device>.md` (rewritten after every part, so a killed run keeps what it did).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

# Before JAX starts: no up-front grab of 75 % of the GPU (the PyTorch subprocess runs after JAX has seen the
# device and needs the memory), and a limit of 95 % instead of 75 % for the batch search.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
from magicpose_jax.configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
GOALS = {"mfu": 0.45, "train_ratio": 1.5, "sample_ratio": 2.0}


# ---------------------------------------------------------------------------------------------------------------
# Configs.


def stage_config(stage: str, args: argparse.Namespace) -> Any:
  """The stage's training config on one device: full SD 1.5 (`configs/<stage>.py`) or `configs/tiny.py`."""
  config = load_config("tiny" if args.reduced else stage)
  config.stage = stage
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  config.global_batch_size = args.probe_batch or 8  # the step is compiled per batch shape: any valid value
  config.dtype = args.dtype
  if args.remat is not None:
    config.remat_policy = args.remat
  if args.attention is not None:
    config.attention_backend = args.attention
  config.grad_accum_steps = 1
  return config


# ---------------------------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass
class Row:
  """One measured (or skipped) part."""

  part: str
  impl: str  # "JAX" or "PyTorch"
  batch: int | None = None
  steps_per_s: float | None = None
  images_per_s: float | None = None
  tflops: float | None = None  # XLA-counted per device
  model_tflops: float | None = None  # analytic per device
  mfu: float | None = None
  peak_gib: float | None = None
  compile_s: float | None = None
  note: str = ""


def _fmt(x: Any, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def write_results(path: str, header: list[str], rows: list[Row], extra: list[str]) -> None:
  lines = [*header, "", "| part | impl | batch/device | steps/s | images (frames)/s | TFLOP/s (XLA) | "
           "TFLOP/s (model) | MFU | peak GiB | compile s | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.part} | {r.impl} | {_fmt(r.batch, 'd')} | {_fmt(r.steps_per_s, '.3g')} "
                 f"| {_fmt(r.images_per_s, '.3g')} | {_fmt(r.tflops, '.3g')} | {_fmt(r.model_tflops, '.3g')} "
                 f"| {_fmt(None if r.mfu is None else 100 * r.mfu, '.1f')}{'' if r.mfu is None else ' %'} "
                 f"| {_fmt(r.peak_gib, '.2f')} | {_fmt(r.compile_s, '.0f')} | {r.note} |")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join([*lines, "", *extra]) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# JAX: the training step.


def _is_oom(e: BaseException) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _bytes_limit(device: Any) -> int | None:
  stats = _memory_stats(device)
  return stats.get("bytes_limit") if stats else None


def _memory_stats(device: Any) -> dict | None:
  try:
    return device.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None


def _random_batch(config: Any, b: int, sharding: Any, seed: int = 0) -> dict:
  import numpy as np  # noqa: PLC0415

  from magicpose_jax.train import sharding as shard  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  px = config.data.image_size
  host = {k: rng.integers(0, 256, (b, px, px, 3), dtype=np.uint8) for k in ("reference", "target", "pose")}
  return shard.global_batch(host, sharding)


def _compile(run: Any, batch: dict) -> tuple[Any, float]:
  from magicpose_jax.train import loop  # noqa: PLC0415

  t0 = time.perf_counter()
  compiled = run.step_fn.lower(loop.abstract_state(run), run.frozen, batch).compile()
  return compiled, time.perf_counter() - t0


def _fit_batch(compiled: Any, probe: int, limit: int | None, max_batch: int) -> int:
  """The largest power of two <= max_batch whose predicted peak fits 90 % of `limit` (linear in the batch)."""
  if limit is None:
    return probe
  mem = compiled.memory_analysis()
  fixed = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  per_example = mem.temp_size_in_bytes / probe  # an over-estimate: part of temp does not grow with the batch
  b = probe
  while b * 2 <= max_batch and fixed + per_example * b * 2 <= 0.9 * limit:
    b *= 2
  while b > 1 and fixed + per_example * b > 0.9 * limit:
    b //= 2
  return b


# Per-device memory of the full-size steps with remat "full", from benchmarks/memory_plan.py's XLA:CPU plans (upper
# estimates): a batch-independent ~12 GiB plus ~3.5 GiB (stage 1) / ~4.5 GiB (stage 2) per example. Used to pick the
# first batch to compile, so that usually one compile per stage suffices.
FIXED_GIB, PER_EXAMPLE_GIB = 12.0, {"stage1": 3.5, "stage2": 4.5}


def first_batch(stage: str, args: argparse.Namespace, limit: int | None) -> int:
  if args.probe_batch:
    return args.probe_batch
  if args.reduced:
    return 4
  if limit is None:
    return 8
  b = 1
  while b * 2 <= args.max_batch and FIXED_GIB + PER_EXAMPLE_GIB.get(stage, 4.5) * b * 2 <= 0.9 * limit / GIB:
    b *= 2
  return b


def setup_run(stage: str, args: argparse.Namespace) -> Any:
  import jax  # noqa: PLC0415

  from magicpose_jax.train import loop  # noqa: PLC0415

  t0 = time.perf_counter()
  run = loop.setup(stage_config(stage, args), jax.devices()[:1])
  print(f"[{stage}] setup {time.perf_counter() - t0:.0f} s", flush=True)
  return run


def jax_train(stage: str, args: argparse.Namespace, deadline: float, run: Any = None) -> Row:
  import jax  # noqa: PLC0415

  from magicpose_jax.train import flops  # noqa: PLC0415

  run = run if run is not None else setup_run(stage, args)
  config = run.config
  device = run.mesh.devices.flat[0]
  probe = first_batch(stage, args, _bytes_limit(device))
  try:
    compiled, compile_s = _compile(run, _random_batch(config, probe, run.batch_sharding))
  except Exception as e:
    if not _is_oom(e) or probe <= 1:
      raise
    probe //= 2
    compiled, compile_s = _compile(run, _random_batch(config, probe, run.batch_sharding))
  print(f"[{stage}] compile (batch {probe}) {compile_s:.0f} s", flush=True)
  b = probe if args.reduced else _fit_batch(compiled, probe, _bytes_limit(device), args.max_batch)
  compiled_batch = probe
  notes = []
  while True:
    if b != compiled_batch:
      if time.perf_counter() + 2 * compile_s > deadline:
        notes.append(f"batch {b} predicted to fit, not tried: time budget")
        b = probe
      else:
        try:
          compiled, compile_s = _compile(run, _random_batch(config, b, run.batch_sharding))
          compiled_batch = b
        except Exception as e:
          if not _is_oom(e) or b <= 1:
            raise
          notes.append(f"batch {b}: OOM at compile")
          b //= 2
          continue
    batch = _random_batch(config, b, run.batch_sharding)
    try:
      run.state, metrics = compiled(run.state, run.frozen, batch)  # warm-up
      jax.block_until_ready(metrics)
      break
    except Exception as e:
      if not _is_oom(e) or b <= 1:
        raise
      notes.append(f"batch {b}: OOM")
      b //= 2
      del run
      gc.collect()
      run = setup_run(stage, args)  # the donated state may be gone
      config = run.config
  config.global_batch_size = b
  t0 = time.perf_counter()
  for _ in range(args.steps):
    run.state, metrics = compiled(run.state, run.frozen, batch)
  jax.block_until_ready((run.state, metrics))
  dt = (time.perf_counter() - t0) / args.steps
  rates = flops.step_throughput(config, run.nets, compiled, [device], batch).rates(dt)
  # Peak: XLA's plan for this program (argument + output + temp - alias); the device's own high-water mark is
  # per process (it includes earlier stages), so it is a note.
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes) / GIB
  stats = _memory_stats(device)
  if stats and "peak_bytes_in_use" in stats:
    notes.append(f"device peak so far {stats['peak_bytes_in_use'] / GIB:.1f} GiB")
  loss = float(metrics["loss"])
  notes.append(f"loss {loss:.3f}, remat {config.remat_policy}, attention {config.attention_backend}, {config.dtype}")
  del run, compiled
  gc.collect()
  return Row(f"{stage} train step", "JAX", b, 1 / dt, b / dt, rates.get("tflops_per_s"), rates["model_tflops_per_s"],
             rates.get("mfu"), peak, compile_s, "; ".join(notes))


# ---------------------------------------------------------------------------------------------------------------
# JAX: sampling.


def jax_sampling(args: argparse.Namespace, run: Any) -> Row:
  """The animation with the nets and weights of a stage-2 `run` (`setup_run("stage2", args)`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from magicpose_jax.diffusion.sampler import SamplerConfig, sample_video  # noqa: PLC0415
  from magicpose_jax.diffusion.schedules import make_schedule  # noqa: PLC0415

  config = run.config
  nets = run.nets
  params = {"unet": run.frozen["unet"], **run.state.params}
  h = config.data.image_size // nets.latent_factor
  frames, steps = args.frames, args.sample_steps
  key = jax.random.key(0)
  x_T = jax.random.normal(key, (1, h, h, 4))
  text = jnp.asarray(run.frozen["text"])
  z_ref = jax.random.normal(jax.random.key(1), (1, h, h, 4))
  px = nets.latent_factor * h
  poses = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (frames, px, px, 3)).astype(np.float32))
  sampler = SamplerConfig(num_steps=steps)
  chunk = frames  # frames per sampler call (x 2 guidance rows); halved on an out-of-memory error
  go = lambda: sample_video(nets.model, params, make_schedule(nets.schedule), nets.schedule, sampler, x_T, text, z_ref,
                            poses, batch_frames=chunk, cache=True).block_until_ready()
  while True:
    t0 = time.perf_counter()
    try:
      go()
      break
    except Exception as e:
      if not _is_oom(e) or chunk <= 1:
        raise
      chunk //= 2
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  go()
  dt = time.perf_counter() - t0
  return Row(f"sampling: {frames} frames x {steps} DDIM steps, guidance 7", "JAX", chunk, None, frames / dt,
             compile_s=max(compile_s - dt, 0.0), note=f"reference caching, {chunk} frames per batch; "
                                                       f"{dt:.1f} s per animation")


# ---------------------------------------------------------------------------------------------------------------
# PyTorch (subprocess).


def torch_worker(args: argparse.Namespace) -> None:
  """Runs in a subprocess with JAX on CPU; prints one JSON line per row."""
  try:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from diffusers import AutoencoderKL as TorchVAE  # noqa: PLC0415
    from diffusers import ControlNetModel as TorchControlNet  # noqa: PLC0415
    from diffusers import UNet2DConditionModel as TorchUNet  # noqa: PLC0415

    from magicpose_jax.torch_reference import ConcatKV, Record, set_self_attention  # noqa: PLC0415
  except ImportError as e:
    print(json.dumps({"skip": f"PyTorch reference skipped: {e}"}))
    return
  if args.torch_device == "cuda" and not torch.cuda.is_available():
    print(json.dumps({"skip": "PyTorch reference skipped: no CUDA device"}))
    return
  import numpy as np  # noqa: PLC0415

  from magicpose_jax.diffusion.schedules import make_schedule  # noqa: PLC0415
  from magicpose_jax.train import stages  # noqa: PLC0415

  dev = torch.device(args.torch_device)
  if dev.type == "cpu":
    # PyTorch's OpenMP threads stall at every op's barrier when other processes deschedule one of them
    # (benchmarks/train_step.py measured 3-7x); one thread is its load-robust CPU number.
    torch.set_num_threads(1)
  bf16 = args.dtype == "bfloat16"
  autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
  kw = lambda c: {k: v for k, v in c.to_diffusers().items() if not k.startswith("_")}
  torch.manual_seed(0)

  built: dict[str, dict] = {}

  def build(stage: str) -> dict:
    """The stage's networks, built on the device (random init there: fast at full size), once per stage."""
    if stage not in built:
      built.clear()  # one stage's models at a time on the device
      with torch.device(dev):
        built[stage] = _build(stage)
    return built[stage]

  def _build(stage: str) -> dict:
    config = stage_config(stage, args)
    nets = stages.networks(config, stages.variant_configs(config))
    mp = nets.model.config
    m = {"main": TorchUNet(**kw(mp.unet)).to(dev).requires_grad_(False).eval(),
         "appearance": TorchUNet(**kw(mp.unet)).to(dev).eval(),
         "vae": TorchVAE(**kw(nets.vae.config)).to(dev).requires_grad_(False).eval(),
         "pose": TorchControlNet(**kw(mp.pose)).to(dev).eval() if mp.pose is not None else None,
         "config": config, "nets": nets, "recorded": [], "queue": []}
    m["appearance"].conv_norm_out, m["appearance"].conv_out = None, torch.nn.Identity()  # as ours: no output head
    set_self_attention(m["appearance"], lambda proc: Record(m["recorded"], proc))
    m["plain"] = dict(m["main"].attn_processors)  # diffusers' SDPA processors: the unconditional (plain SD) pass
    set_self_attention(m["main"], lambda _: ConcatKV(lambda h: m["queue"].pop(0)))
    m["reference"] = dict(m["main"].attn_processors)
    m["alphas"] = torch.from_numpy(np.asarray(make_schedule(nets.schedule).alphas_cumprod)).to(dev)
    m["text"] = torch.randn(1, 77, mp.unet.cross_attention_dim, device=dev)
    return m

  def predict(m: dict, z_t, t, z_ref, pose, ref_t=None):
    text = m["text"].expand(z_t.shape[0], -1, -1)
    m["recorded"].clear()
    m["appearance"](z_ref, t if ref_t is None else ref_t, text[: z_ref.shape[0]])
    m["queue"][:] = [r.expand(z_t.shape[0], -1, -1) if r.shape[0] != z_t.shape[0] else r for r in m["recorded"]]
    down = mid = None
    if m["pose"] is not None:
      down, mid = m["pose"](z_t, t, text, controlnet_cond=pose, return_dict=False)
    return m["main"](z_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

  def train_rate(stage: str, deadline: float) -> dict:
    m = build(stage)
    params = [p for k in ("appearance", "pose") if m[k] is not None for p in m[k].parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    px = m["config"].data.image_size
    scaling = m["nets"].vae.config.scaling_factor

    def step(batch):
      with autocast():
        with torch.no_grad():
          z0 = m["vae"].encode(batch["target"]).latent_dist.sample() * scaling
          z_ref = m["vae"].encode(batch["reference"]).latent_dist.sample() * scaling
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (z0.shape[0],), device=dev)
        a = m["alphas"][t].view(-1, 1, 1, 1).to(z0.dtype)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(predict(m, z_t, t, z_ref, batch["pose"]).float(), noise.float())
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      return loss

    b = args.probe_batch if args.reduced else args.max_batch
    notes = []
    while True:
      batch = {k: torch.rand(b, 3, px, px, device=dev) * 2 - 1 for k in ("reference", "target")}
      batch["pose"] = torch.rand(b, 3, px, px, device=dev)
      try:
        step(batch)  # warm-up (and the OOM probe)
        break
      except torch.cuda.OutOfMemoryError:
        notes.append(f"batch {b}: OOM")
        opt.zero_grad(set_to_none=True)
        del batch
        gc.collect()
        torch.cuda.empty_cache()
        b //= 2
        if b < 1 or time.perf_counter() > deadline:
          return {"part": f"{stage} train step", "impl": "PyTorch", "note": "; ".join([*notes, "gave up"])}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
      loss = step(batch)
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / GIB if dev.type == "cuda" else None
    opt.zero_grad(set_to_none=True)  # the models stay cached (sampling reuses stage 2's); their grads need not
    threads = f", {torch.get_num_threads()} CPU thread(s)" if dev.type == "cpu" else ""
    notes.append(f"loss {float(loss):.3f}, SDPA, {'bf16 autocast' if bf16 else 'fp32'}, fused AdamW{threads}")
    return {"part": f"{stage} train step", "impl": "PyTorch", "batch": b, "steps_per_s": 1 / dt,
            "images_per_s": b / dt, "peak_gib": peak, "note": "; ".join(notes)}

  def sampling_rate() -> dict:
    """The release's loop: per frame, per step, appearance(z_ref), pose net, main UNet on [cond, uncond]."""
    m = build("stage2")
    px = m["config"].data.image_size
    h = px // m["nets"].latent_factor
    z = torch.randn(1, 4, h, h, device=dev)
    z_ref = torch.randn(1, 4, h, h, device=dev)
    pose = torch.rand(1, 3, px, px, device=dev)
    t = torch.full((1,), 500, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def one_step():
      with torch.no_grad(), autocast():
        m["recorded"].clear()
        m["appearance"](z_ref, t, m["text"])
        states = list(m["recorded"])
        down, mid = m["pose"](z, t, m["text"], controlnet_cond=pose, return_dict=False)
        m["queue"][:] = states
        cond = m["main"](z, t, m["text"], down_block_additional_residuals=down, mid_block_additional_residual=mid)
        # Unconditional row: plain SD (no reference, no pose), as our sampler's guidance.
        m["main"].set_attn_processor(dict(m["plain"]))  # (set_attn_processor consumes its dict)
        uncond = m["main"](z, t, m["text"])
        m["main"].set_attn_processor(dict(m["reference"]))
        return cond.sample + uncond.sample

    one_step()
    sync()
    n = 3
    t0 = time.perf_counter()
    for _ in range(n):
      one_step()
    sync()
    dt = (time.perf_counter() - t0) / n
    per_frame = dt * args.sample_steps
    return {"part": f"sampling: {args.frames} frames x {args.sample_steps} DDIM steps, guidance 7",
            "impl": "PyTorch", "batch": 1, "images_per_s": 1 / per_frame,
            "note": f"release's per-frame loop, estimated from {n} timed steps ({dt * 1e3:.0f} ms/step)"}

  deadline = time.perf_counter() + args.time_budget
  for stage in args.stages:
    try:
      print(json.dumps(train_rate(stage, deadline)), flush=True)
    except Exception as e:  # one failing part must not lose the others' numbers
      print(json.dumps({"part": f"{stage} train step", "impl": "PyTorch", "note": f"failed: {e!r}"[:300]}))
    gc.collect()  # the stage's models went out of scope with train_rate
    if dev.type == "cuda":
      torch.cuda.empty_cache()
  if args.sampling:
    try:
      print(json.dumps(sampling_rate()), flush=True)
    except Exception as e:
      print(json.dumps({"part": "sampling", "impl": "PyTorch", "note": f"failed: {e!r}"[:300]}))


def run_torch_subprocess(args: argparse.Namespace, budget: float) -> tuple[list[Row], str | None]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # JAX only reads configs there: the device stays PyTorch's
  cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--time-budget", f"{budget:.0f}",
         "--stages", ",".join(args.stages), "--torch-device", args.torch_device, "--dtype", args.dtype,
         "--steps", str(args.steps), "--max-batch", str(args.max_batch),
         "--frames", str(args.frames), "--sample-steps", str(args.sample_steps),
         "--reduced" if args.reduced else "--full"] + ([] if args.sampling else ["--no-sampling"]) \
      + (["--probe-batch", str(args.probe_batch)] if args.probe_batch else [])
  try:
    out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=budget + 60)
  except subprocess.TimeoutExpired:
    return [], "PyTorch reference: timed out"
  rows, skip = [], None
  for line in out.stdout.splitlines():
    if not line.startswith("{"):
      continue
    d = json.loads(line)
    if "skip" in d:
      skip = d["skip"]
    else:
      rows.append(Row(**d))
  if out.returncode != 0 and not rows:
    skip = f"PyTorch reference failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
  return rows, skip


# ---------------------------------------------------------------------------------------------------------------
# Policies table.


def policies_table(args: argparse.Namespace, deadline: float) -> list[str]:
  """Step time and memory of the stage-1 step for each remat policy x dtype at this size."""
  import jax  # noqa: PLC0415

  from magicpose_jax.train import loop  # noqa: PLC0415

  lines = ["| remat policy | dtype | step s | compiled temp GiB | peak GiB (argument + output + temp - alias) |",
           "|---|---|---|---|---|"]
  for dtype in ("bfloat16", "float32"):
    for policy in ("none", "full", "dots_saveable", "offload"):
      if time.perf_counter() > deadline:
        lines.append(f"| {policy} | {dtype} | skipped: time budget | | |")
        continue
      sub = argparse.Namespace(**{**vars(args), "remat": policy, "dtype": dtype})
      config = stage_config("stage1", sub)
      if args.reduced:  # activations large enough next to the params and Adam moments for the policies to show
        config.data.image_size = args.policies_px
      run = loop.setup(config, jax.devices()[:1])
      batch = _random_batch(config, args.policies_batch, run.batch_sharding)
      compiled, _ = _compile(run, batch)
      mem = compiled.memory_analysis()
      run.state, m = compiled(run.state, run.frozen, batch)
      jax.block_until_ready(m)
      times = []
      for _ in range(max(args.steps, 3)):
        t0 = time.perf_counter()
        run.state, m = compiled(run.state, run.frozen, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
      peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
      lines.append(f"| {policy} | {dtype} | {statistics.median(times):.3f} | {mem.temp_size_in_bytes / GIB:.3f} "
                   f"| {peak / GIB:.3f} |")
      print(lines[-1], flush=True)
      del run, compiled
      gc.collect()
  return lines


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--reduced", dest="reduced", action="store_true", default=None,
                    help="configs/tiny.py models, batch 4, float32 (default on CPU)")
  size.add_argument("--full", dest="reduced", action="store_false", help="full SD 1.5 at 512 px (default on GPU/TPU)")
  parser.add_argument("--stages", default="stage1,stage2")
  parser.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16; float32 with --reduced)")
  parser.add_argument("--remat", default=None, help="remat policy (default: the config's)")
  parser.add_argument("--attention", default=None, help="attention backend (default: the config's, auto)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
  parser.add_argument("--probe-batch", type=int, default=None,
                      help="first compile's batch (default: from the device's memory; 4 reduced)")
  parser.add_argument("--max-batch", type=int, default=64, help="largest per-device batch tried")
  parser.add_argument("--frames", type=int, default=None, help="animation frames (default 16; 4 reduced)")
  parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 50; 10 reduced)")
  parser.add_argument("--no-sampling", dest="sampling", action="store_false")
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  parser.add_argument("--torch-device", default=None, help="cuda (default with a GPU), cpu (default with --reduced)")
  parser.add_argument("--policies", action="store_true", help="also the remat x dtype table (stage 1)")
  parser.add_argument("--policies-px", type=int, default=64, help="--policies with --reduced: image size")
  parser.add_argument("--policies-batch", type=int, default=4, help="--policies: batch")
  parser.add_argument("--time-budget", type=float, default=450.0, help="seconds for the whole run")
  parser.add_argument("--out", default=None, help="results file (default benchmarks/results/accelerator-<dev>.md)")
  parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/magicpose_jax/xla"),
                      help="persistent XLA compilation cache (a rerun skips the compiles); '' disables")
  parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  return args


def _defaults(args: argparse.Namespace, platform: str) -> None:
  if args.reduced is None:
    args.reduced = platform == "cpu"
  args.dtype = args.dtype or ("float32" if args.reduced else "bfloat16")
  if args.reduced:
    args.probe_batch = args.probe_batch or 4
  args.frames = args.frames or (4 if args.reduced else 16)
  args.sample_steps = args.sample_steps or (10 if args.reduced else 50)
  args.torch_device = args.torch_device or ("cuda" if platform == "gpu" else "cpu" if args.reduced else "none")


def main() -> None:
  args = parse_args()
  if args.torch_worker:
    _defaults(args, "cpu")
    torch_worker(args)
    return
  start = time.perf_counter()
  deadline = start + args.time_budget
  import jax  # noqa: PLC0415

  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 5.0)
  device = jax.devices()[0]
  _defaults(args, device.platform)
  from magicpose_jax.train import flops  # noqa: PLC0415

  peak = flops.device_peak(device.device_kind)
  name = re.sub(r"[^a-z0-9]+", "-", (peak.name if peak else device.device_kind).lower()).strip("-") or "cpu"
  suffix = "-reduced" if args.reduced else ""
  out = args.out or os.path.join(ROOT, "benchmarks", "results", f"accelerator-{name}{suffix}.md")
  peak_text = "unknown (no MFU)" if peak is None else f"{flops.peak_tflops(device.device_kind, args.dtype)} TFLOP/s"
  load = os.getloadavg()
  header = [f"# MagicPose accelerator benchmark: {device.device_kind} ({device.platform}), "
            f"{'reduced (configs/tiny.py models)' if args.reduced else 'full SD 1.5 at 512 px'}",
            "", f"`python benchmarks/accelerator.py {' '.join(sys.argv[1:])}`; jax {jax.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPU cores, 1-min load average "
            f"{load[0]:.1f} at start; one device; dtype {args.dtype}; peak "
            f"{peak_text}. XLA compilation cache: {args.cache_dir or 'off'} (a program it already holds compiles in "
            f"seconds: compile times of a rerun are cache hits)."]
  rows: list[Row] = []
  extra: list[str] = []
  save = lambda: write_results(out, header, rows, extra)

  if args.torch and args.torch_device != "none":
    print("PyTorch reference (subprocess) ...", flush=True)
    torch_rows, skip = run_torch_subprocess(args, 0.35 * args.time_budget)
    rows += torch_rows
    if skip:
      extra.append(f"- {skip}")
    save()
  elif args.torch:
    extra.append("- PyTorch reference skipped: no CUDA device (run with --reduced for a CPU reference)")

  # Order: what the issue's goals name first (stage 1, sampling); sampling and stage 2 share one stage-2 setup.
  def part(name: str, fn: Any) -> None:
    if time.perf_counter() > deadline:
      rows.append(Row(name, "JAX", note="skipped: time budget"))
    else:
      try:
        rows.append(fn())
      except Exception as e:  # keep the other parts' numbers
        rows.append(Row(name, "JAX", note=f"failed: {e!r}"[:300]))
    print(rows[-1], flush=True)
    save()

  if "stage1" in args.stages:
    part("stage1 train step", lambda: jax_train("stage1", args, deadline))
    gc.collect()
  if "stage2" in args.stages or args.sampling:
    stage2 = []
    get = lambda: stage2[0] if stage2 else stage2.append(setup_run("stage2", args)) or stage2[0]
    if args.sampling:
      part("sampling", lambda: jax_sampling(args, get()))
    if "stage2" in args.stages:
      part("stage2 train step", lambda: jax_train("stage2", args, deadline, get()))
    stage2.clear()
    gc.collect()

  extra += summary(rows, args)
  if args.policies:
    px = args.policies_px if args.reduced else "the config's"
    extra += ["", f"Remat policy x compute dtype, the stage-1 step at {px} px, batch {args.policies_batch} (medians "
              f"of {max(args.steps, 3)} steps; memory from XLA's memory_analysis):", ""]
    extra += policies_table(args, deadline + args.time_budget)
  extra.append(f"\nTotal wall time {time.perf_counter() - start:.0f} s.")
  save()
  print(open(out).read())


def summary(rows: list[Row], args: argparse.Namespace) -> list[str]:
  """Ratios against PyTorch and the issue's goals."""
  lines = ["", "Ratios (images or frames per second, ours / PyTorch on the same device) and goals:"]
  by = {(r.part.split(":")[0], r.impl): r for r in rows}
  for part in [f"{s} train step" for s in args.stages] + ["sampling"]:
    ours, ref = by.get((part, "JAX")), by.get((part, "PyTorch"))
    if ours is None or ref is None or ours.images_per_s is None or ref.images_per_s is None:
      continue
    goal = GOALS["sample_ratio"] if part == "sampling" else GOALS["train_ratio"]
    ratio = ours.images_per_s / ref.images_per_s
    verdict = "" if args.reduced else (": met" if ratio >= goal else ": not met")
    lines.append(f"- {part}: {ratio:.2f}x (goal >= {goal}x{verdict})")
  s1 = by.get(("stage1 train step", "JAX"))
  if s1 is not None and s1.mfu is not None:
    lines.append(f"- stage 1 MFU {100 * s1.mfu:.1f} % (goal >= {100 * GOALS['mfu']:.0f} %: "
                 f"{'met' if s1.mfu >= GOALS['mfu'] else 'not met'})")
  if args.reduced:
    lines.append("- reduced size: these exercise the code paths; the goals are for full size on a GPU/TPU.")
  return lines


if __name__ == "__main__":
  main()
