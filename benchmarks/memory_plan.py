"""Per-device memory and FLOPs of the full training steps, compiled (never run) for TPU topologies or simulated devices.

    python benchmarks/memory_plan.py --topology v5p:2x2x1 --stages stage1     # libtpu's compiler, splash attention
    python benchmarks/memory_plan.py --topology v5e:4x4 --stages stage1,stage2,sampler --set mesh.data=4 \
        --set mesh.fsdp=4 --json plan.json
    python benchmarks/memory_plan.py                  # SD 1.5 stage 1 (batch 192) + stage 2 (16), 8x FSDP, ~45 min
    python benchmarks/memory_plan.py --stages stage1 --grad-accum 2 --json plan.json
    python benchmarks/memory_plan.py --real-devices --attention cudnn --grad-accum 2   # on 8 GPUs
    python benchmarks/memory_plan.py --set model.unet=tiny --set model.vae=tiny --set model.text_encoder=tiny \
        --set model.sample_size=16 --set model.hint_channels=16,32 --set sharding.min_size=1024   # minutes

`--topology NAME` (jax's TPU topology names: v4:2x2x2, v5e:2x4, v5p:2x2x1, v6e:4x4, ...; needs libtpu, `pip install
"jax[tpu]==0.10.2"`) compiles with the TPU compiler for that slice from this CPU host: per chip argument/output/
temp/peak bytes against the chip's HBM (`train.flops.PEAKS`, with sources), fits or not, compile time, XLA's FLOPs
plus the Mosaic kernels' own (splash attention, which `cost_analysis()` does not count; `train.flops.
mosaic_kernel_costs`) against the analytic count (`train.flops.train_step_flops`, remat recomputation included),
and an estimated step time and MFU. The estimate is a MODEL, not a measurement: XLA's `optimal_seconds` for its
own ops plus, per kernel, max(FLOPs / peak, bytes / HBM bandwidth); communication overlap, MXU padding inside the
kernels and host input are not in it. `sampler` plans the 16-frame guided sampler (`sample_video` with
`batch_frames=16`, 50 steps, cached reference states): two programs, the cache and the DDIM loop; XLA counts the
loop body once, so its FLOPs and optimal_seconds are per step there, while kernel costs carry the trip count.

Builds each stage from `configs/<stage>.py` with mesh data=1, fsdp=N (`--set mesh.data=..` overrides), nothing
materialised
(`loop.abstract_setup`), and compiles the jitted step for N XLA:CPU devices (re-running itself with
`--xla_force_host_platform_device_count=N`). XLA compiles one SPMD program per device, so
`memory_analysis()` and the compiled `cost_analysis()` are per device (measured at stage 1: 8 x the
per-device count is the global, unpartitioned count + 0.3%). "peak" = argument + output + temp - alias, what
one device holds at the step's high-water mark; XLA:CPU's own `peak_memory_in_bytes` only counts the
arguments and is printed for reference.

Attention: the default `flash_proxy` stands in for a fused kernel (cuDNN on GPU, splash on TPU), which
XLA:CPU cannot compile; `--attention xla` is what the `auto` backend runs on GPU and TPU today.

Caveats: XLA:CPU's buffer assignment and scheduling are not the GPU/TPU ones, and it runs every bf16
convolution and matmul in float32, so treat the numbers as upper estimates; `--real-devices` on the target
machine gives its backend's own. XLA counts a `while` body once, so loops (`flash_proxy`, `--grad-accum`)
under-count the compiled FLOPs: the "model TFLOP" column re-lowers the step with `xla` attention and no
accumulation (no loops, global, before partitioning; remat recomputation included).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from magicpose_jax.configs import apply_overrides  # no jax: safe before the device-count flag is set

if TYPE_CHECKING:  # imported for real only after the device-count flag is set
  import jax
  import ml_collections

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DEFAULT_BATCH = {"base": 192, "stage1": 192, "stage2": 16, "sampler": 16}
GIB = 2**30


@dataclasses.dataclass
class Plan:
  """One compiled step: sizes in bytes per device, FLOPs per step."""

  stage: str
  devices: int
  global_batch: int
  grad_accum: int
  remat: str
  dtype: str
  frozen_dtype: str
  attention: str
  inputs: str  # "images" (VAE in the step) or "latents" (cached moments)
  argument: int
  output: int
  temp: int
  generated_code: int
  alias: int
  peak: int  # argument + output + temp - alias
  xla_peak: int | None  # CompiledMemoryStats.peak_memory_in_bytes where the field exists
  flops_per_device: float  # compiled cost analysis (while bodies counted once)
  model_flops: float | None  # global, loop-free re-lowering; None with --no-model-flops
  compile_s: float
  device_kind: str = ""
  hbm: float | None = None  # bytes per device (train.flops.PEAKS); None: unknown
  fits: bool | None = None  # peak <= hbm
  mesh: str = ""  # "data=.. fsdp=.."
  kernel_flops: float = 0.0  # Mosaic kernels, per device (trip counts included)
  kernel_bytes: float = 0.0
  kernel_calls: int = 0
  analytic_flops: float | None = None  # per device: train.flops hardware count (remat included), or None (sampler)
  analytic_model_flops: float | None = None  # per device, no recomputation: the MFU numerator
  xla_seconds: float | None = None  # XLA's optimal_seconds (its own ops; loop bodies once)
  kernel_seconds: float | None = None  # roofline of the Mosaic kernels
  est_seconds: float | None = None  # xla_seconds + kernel_seconds: a model, not a measurement
  measured_seconds: float | None = None  # --real-devices: median step time over --measure runs
  mfu: float | None = None  # analytic_model_flops / est_seconds / peak
  # --topology: the compiler refused the program for lack of HBM (train.plan.hbm_exhausted); `peak` is then what it
  # asked for and every other size and count is 0
  compile_error: str | None = None
  # --topology: the compiled program's `while` loops as "trips x count" (XLA's FLOPs and optimal_seconds count each
  # body once; the kernels' costs carry the trip counts)
  loops: str = ""
  # XLA's FLOPs and optimal_seconds x this: the program's convolution FLOPs with loop trip counts over the same
  # counted once (train.flops.convolution_flops; 1.0 without loops). A model of what the loops repeat.
  loop_factor: float = 1.0

  @property
  def xla_flops(self) -> float:
    """XLA's FLOPs per device with loop bodies counted as often as they run (`loop_factor`)."""
    return self.flops_per_device * self.loop_factor


FLASH_PROXY = "flash_proxy"
PROXY_QUERY_CHUNK = 64  # queries per loop step: [B/N, H, 64, Nk] f32 logits, ~0.4 GiB/device at stage 1's 4096 + 4096


def flash_proxy_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """A memory stand-in for fused (flash) attention that XLA:CPU can compile; shapes as `models.attention.attend`.

  Query chunks in a `lax.map` with batch and heads as plain einsum batch dims (so they stay sharded), each chunk
  rematerialised in the backward pass: like cuDNN/splash kernels, only q, k, v and the output `[B, N, H, D]` live
  across the layer; the one chunk's logits are the extra (a fused kernel's working set is smaller still).
  """
  import jax  # noqa: PLC0415 (imported after the device-count flag)
  import jax.numpy as jnp  # noqa: PLC0415

  b, nq, h, d = q.shape
  chunk = max(c for c in range(1, min(nq, PROXY_QUERY_CHUNK) + 1) if nq % c == 0)
  queries = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, nq // chunk, chunk, h, d).swapaxes(0, 1)
  # queries: [n_chunks, B, chunk, H, D]

  @jax.checkpoint
  def one_chunk(qc):
    logits = jnp.einsum("bqhd,bkhd->bhqk", qc, k, preferred_element_type=jnp.float32)  # [B, H, chunk, Nk]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, chunk, H, D]

  return jax.lax.map(one_chunk, queries).swapaxes(0, 1).reshape(b, nq, h, d)


def latent_batch(batch: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The abstract batch with cached VAE moments `[B, H/f, W/f, 2 * latent_channels]` float32 (what
  `python -m magicpose_jax.preprocess --vae` stores) instead of the reference/target images (`--latents`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from magicpose_jax.train.stages import variant_configs  # noqa: PLC0415

  vae = variant_configs(config).vae
  b, h, w, _ = batch["target"].shape
  f = vae.downsample_factor
  moments = jax.ShapeDtypeStruct((b, h // f, w // f, 2 * vae.latent_channels), jnp.float32,
                                 sharding=batch["target"].sharding)
  return {"reference_latent": moments, "target_latent": moments, "pose": batch["pose"]}


def _flag(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices}"


def _reexec_with_devices(devices: int) -> int | None:
  """Runs this script again with N host devices unless this process already has them (jax reads the flag once)."""
  if _flag(devices) in os.environ.get("XLA_FLAGS", ""):
    return None
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_flag(devices)}".strip()
  return subprocess.call([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)


def load_config(stage: str) -> ml_collections.ConfigDict:
  """`configs/<stage>.py`'s `get_config()` (stage "base" starts from stage1.py with `stage="base"`)."""
  name = "stage1" if stage == "base" else stage
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.stage = stage
  return config


def configure(args: argparse.Namespace, stage: str, batch: int) -> ml_collections.ConfigDict:
  config = load_config(stage)
  config.global_batch_size = batch
  config.grad_accum_steps = args.grad_accum
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, args.devices, 1
  attention = None if args.attention == "config" else args.attention
  for field, value in (("remat_policy", args.remat), ("dtype", args.dtype), ("frozen_dtype", args.frozen_dtype),
                       ("attention_backend", attention)):
    if value is not None:
      config[field] = value
  apply_overrides(config, args.set)
  return config


def plan_stage(args: argparse.Namespace, stage: str, batch: int) -> Plan:
  import jax  # noqa: PLC0415 (after the device-count flag is set)

  from magicpose_jax.models.attention import register_backend  # noqa: PLC0415
  from magicpose_jax.train import flops  # noqa: PLC0415
  from magicpose_jax.train.loop import abstract_setup  # noqa: PLC0415

  register_backend(FLASH_PROXY, flash_proxy_attention)
  config = configure(args, stage, batch)
  devices = jax.devices()[:args.devices]
  if len(devices) < args.devices:
    raise SystemExit(f"--devices {args.devices}: only {len(devices)} {devices[0].platform} devices here")
  step_fn, step_args = abstract_setup(config, devices)
  if args.latents:
    step_args = (*step_args[:2], latent_batch(step_args[2], config))
  t0 = time.perf_counter()
  compiled = step_fn.lower(*step_args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  model_flops = None
  if args.model_flops:
    # Loop-free twin for the FLOP count: XLA's cost analysis counts a while body once (train.flops).
    flat = flops.loop_free_config(config)
    fn, fn_args = abstract_setup(flat, devices)
    if args.latents:
      fn_args = (*fn_args[:2], latent_batch(fn_args[2], flat))
    model_flops = flops.lowered_flops(fn.lower(*fn_args))
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return Plan(stage=stage, devices=args.devices, global_batch=batch, grad_accum=config.grad_accum_steps,
              remat=config.remat_policy, dtype=config.dtype, frozen_dtype=config.frozen_dtype,
              attention=config.attention_backend, inputs="latents" if args.latents else "images",
              argument=mem.argument_size_in_bytes,
              output=mem.output_size_in_bytes, temp=mem.temp_size_in_bytes,
              generated_code=mem.generated_code_size_in_bytes, alias=mem.alias_size_in_bytes, peak=peak,
              xla_peak=getattr(mem, "peak_memory_in_bytes", None),
              flops_per_device=flops.compiled_flops(compiled) or 0.0,
              model_flops=model_flops, compile_s=compile_s)


def _memory(compiled: Any) -> dict[str, int]:
  mem = compiled.memory_analysis()
  out = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes, "temp": mem.temp_size_in_bytes,
         "generated_code": mem.generated_code_size_in_bytes, "alias": mem.alias_size_in_bytes}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _optimal_seconds(compiled: Any) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  value = (cost or {}).get("optimal_seconds")
  return float(value) if value is not None and value > 0 else None  # negative: the compiler has no estimate


def _compile(fn: Any, fn_args: tuple[Any, ...]) -> tuple[Any, float]:
  t0 = time.perf_counter()
  compiled = fn.lower(*fn_args).compile()
  return compiled, time.perf_counter() - t0


def plan_on_topology(args: argparse.Namespace, stage: str, batch: int, devices: list[jax.Device]) -> list[Plan]:
  """Compiles `stage` ("stage1", "stage2", "base" or "sampler") for the TPU `devices` and models its time."""
  from magicpose_jax.train import flops, plan  # noqa: PLC0415
  from magicpose_jax.train.loop import abstract_setup  # noqa: PLC0415

  config = configure(args, "stage2" if stage == "sampler" else stage, batch)
  kind = devices[0].device_kind
  peak = plan.device_peak(devices)  # v4 topologies: one device per TensorCore, half a chip each
  if stage == "sampler":
    programs = plan.abstract_sampler(config, devices, frames=batch, steps=args.sampler_steps)
    jobs = [("sampler-cache", *programs["cache"]), ("sampler", *programs["sample"])]
  else:
    step_fn, step_args = abstract_setup(config, devices)
    if args.latents:
      step_args = (*step_args[:2], latent_batch(step_args[2], config))
    jobs = [(stage, step_fn, step_args)]
  plans = []
  for name, fn, fn_args in jobs:
    t0 = time.perf_counter()
    try:
      compiled, compile_s = _compile(fn, fn_args)
    except Exception as e:  # jax raises XlaRuntimeError (a RuntimeError subclass, not importable by a stable name)
      oom = plan.hbm_exhausted(e)
      if oom is None:
        raise
      p = _not_fitting(config, name, batch, devices, args, oom, time.perf_counter() - t0)
      plans.append(p)
      print(describe(p), flush=True)
      continue
    mem = _memory(compiled)
    hlo = compiled.as_text()
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      with open(os.path.join(args.hlo_dir, f"{name}.hlo.txt"), "w") as f:
        f.write(hlo)
    kernels = flops.mosaic_kernel_costs(hlo)
    loops = collections.Counter(trips for _, trips in flops.while_loops(hlo))
    loops = ", ".join(f"{n} x {'?' if t is None else t} trips" for t, n in sorted(loops.items(), key=str))
    kflops, kbytes = sum(k.flops for k in kernels), sum(k.bytes for k in kernels)
    conv = flops.convolution_flops(hlo)
    loop_factor = conv.executed / conv.once if conv.once else 1.0
    xla_s = _optimal_seconds(compiled)
    if xla_s is not None:
      xla_s *= loop_factor
    kernel_s = None
    if peak is not None and peak.hbm_gbps:
      kernel_s = sum(k.roofline_seconds(peak) for k in kernels)
    est = xla_s + kernel_s if xla_s is not None and kernel_s is not None else None
    analytic = model = None
    if not name.startswith("sampler"):
      from magicpose_jax.train import stages  # noqa: PLC0415

      # The target's platform decides where `auto` attention runs splash, whose backward the count includes.
      nets = stages.networks(config, stages.variant_configs(config), stages.target_platform(config, devices))
      size = config.model.sample_size  # what abstract_setup's batch holds: sample_size x the VAE factor pixels
      counts = flops.config_step_flops(config, nets, (size, size), args.latents)
      analytic = counts.hardware * config.global_batch_size / len(devices)
      model = counts.model * config.global_batch_size / len(devices)
    hbm = peak.hbm_gb * 1e9 if peak is not None and peak.hbm_gb else None
    measured = measure(compiled, fn_args, args.measure) if args.real_devices and name == stage else None
    p = Plan(stage=name, devices=len(devices), global_batch=batch, grad_accum=config.grad_accum_steps,
             remat=config.remat_policy, dtype=config.dtype, frozen_dtype=config.frozen_dtype,
             attention=config.attention_backend, inputs="latents" if args.latents else "images",
             xla_peak=None, flops_per_device=flops.compiled_flops(compiled) or 0.0, model_flops=None,
             compile_s=compile_s, device_kind=kind, hbm=hbm, fits=None if hbm is None else mem["peak"] <= hbm,
             mesh=f"data={config.mesh.data} fsdp={config.mesh.fsdp}", kernel_flops=kflops, kernel_bytes=kbytes,
             kernel_calls=sum(k.calls for k in kernels), analytic_flops=analytic, analytic_model_flops=model,
             xla_seconds=xla_s, kernel_seconds=kernel_s, est_seconds=est,
             mfu=model / est / (peak.bf16 * 1e12) if model and est and peak else None,
             measured_seconds=measured, loops=loops, loop_factor=loop_factor, **mem)
    plans.append(p)
    print(describe(p), flush=True)
  return plans


def _not_fitting(config: ml_collections.ConfigDict, name: str, batch: int, devices: list[jax.Device],
                 args: argparse.Namespace, oom: Any, compile_s: float) -> Plan:
  """The row of a program the TPU compiler refused for lack of HBM (`oom`: a `train.plan.HbmExhausted`)."""
  from magicpose_jax.train import plan  # noqa: PLC0415

  peak = plan.device_peak(devices)
  return Plan(stage=name, devices=len(devices), global_batch=batch, grad_accum=config.grad_accum_steps,
              remat=config.remat_policy, dtype=config.dtype, frozen_dtype=config.frozen_dtype,
              attention=config.attention_backend, inputs="latents" if args.latents else "images", argument=0, output=0,
              temp=0, generated_code=0, alias=0, peak=oom.used, xla_peak=None, flops_per_device=0.0, model_flops=None,
              compile_s=compile_s, device_kind=devices[0].device_kind,
              hbm=peak.hbm_gb * 1e9 if peak is not None and peak.hbm_gb else oom.capacity, fits=False,
              mesh=f"data={config.mesh.data} fsdp={config.mesh.fsdp}", compile_error=oom.message)


def measure(compiled: Any, fn_args: tuple[Any, ...], steps: int) -> float | None:
  """Median seconds per step of a compiled training step run `steps` times (after one warm-up) on zero-filled
  arguments of its abstract shapes and shardings (the step donates its state, so each run feeds the next)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  if steps <= 0:
    return None
  state, frozen, batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), fn_args)
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    if i:
      times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def describe(p: Plan) -> str:
  """The lines `--topology` prints per compiled program."""
  fit = {None: "HBM unknown", True: "fits", False: "DOES NOT FIT"}[p.fits]
  hbm = f" of {p.hbm / GIB:.1f} GiB HBM" if p.hbm else ""
  head = (f"{p.stage}: {p.devices} x {p.device_kind} ({p.mesh}), global batch {p.global_batch}, grad accum "
          f"{p.grad_accum}, remat {p.remat}, {p.dtype}, attention {p.attention}")
  if p.compile_error:
    return "\n".join([f"{head}: refused by the compiler after {p.compile_s:.0f} s",
                      f"  memory per chip: needs {p.peak / GIB:.2f} GiB{hbm} -> {fit}",
                      f"  compiler: {p.compile_error}"])
  lines = [f"{head}: compiled in {p.compile_s:.0f} s",
           f"  memory per chip: peak {p.peak / GIB:.2f} GiB{hbm} -> {fit} (argument {p.argument / GIB:.2f}, output "
           f"{p.output / GIB:.2f}, temp {p.temp / GIB:.2f}, alias {p.alias / GIB:.2f})",
           f"  FLOPs per chip: XLA {p.xla_flops / 1e12:.2f} T + Mosaic kernels {p.kernel_flops / 1e12:.2f} T "
           f"({p.kernel_calls} calls) = {(p.xla_flops + p.kernel_flops) / 1e12:.2f} T"]
  if p.analytic_flops:
    ratio = (p.xla_flops + p.kernel_flops) / p.analytic_flops
    lines.append(f"  analytic (train/flops.py, remat included): {p.analytic_flops / 1e12:.2f} T per chip -> "
                 f"compiled / analytic = {ratio:.3f}")
  if p.loops:
    lines.append(f"  while loops in the program: {p.loops}. XLA's cost analysis counts each body once: its FLOPs "
                 f"({p.flops_per_device / 1e12:.2f} T) and optimal_seconds are scaled by {p.loop_factor:.3f}, the "
                 f"program's convolution FLOPs with trip counts over those counted once (kernels: trip counts "
                 f"included)")
  if p.est_seconds is not None:
    mfu = f", MFU {100 * p.mfu:.1f} %" if p.mfu is not None else ""
    lines.append(f"  estimated time (a MODEL, not a measurement): XLA optimal_seconds {p.xla_seconds:.3f} s + kernel "
                 f"roofline {p.kernel_seconds:.3f} s = {p.est_seconds:.3f} s{mfu}")
  else:
    lines.append(f"  estimated time: unavailable (XLA optimal_seconds {p.xla_seconds}, kernel roofline "
                 f"{p.kernel_seconds})")
  if p.measured_seconds is not None:
    vs = f" ({p.measured_seconds / p.est_seconds:.2f}x the estimate)" if p.est_seconds else ""
    lines.append(f"  measured on the real devices: {p.measured_seconds:.3f} s per step{vs}")
  return "\n".join(lines)


def format_topology_table(plans: list[Plan]) -> str:
  """The Markdown table of `--topology` plans: GiB per chip, TFLOP per chip per step."""
  head = ("| program | chips | mesh | batch | accum | remat | attention | peak GiB | HBM GiB | fits | XLA+kernel TFLOP "
          "| analytic TFLOP | ratio | est. s | MFU | compile s |")
  rows = [head, "|" + "---|" * (head.count("|") - 1)]
  for p in plans:
    if p.compile_error:  # refused for lack of HBM: only the memory it asked for is known
      hbm = f"{p.hbm / GIB:.1f}" if p.hbm else "-"
      rows.append(f"| {p.stage} | {p.devices} x {p.device_kind} | {p.mesh} | {p.global_batch} | {p.grad_accum} "
                  f"| {p.remat} | {p.attention} | {p.peak / GIB:.2f} (needed) | {hbm} | NO | - | - | - | - | - "
                  f"| {p.compile_s:.0f} |")
      continue
    total = (p.xla_flops + p.kernel_flops) / 1e12
    analytic = f"{p.analytic_flops / 1e12:.1f}" if p.analytic_flops else "-"
    ratio = f"{(p.xla_flops + p.kernel_flops) / p.analytic_flops:.3f}" if p.analytic_flops else "-"
    est = f"{p.est_seconds:.3f}" if p.est_seconds is not None else "-"
    mfu = f"{100 * p.mfu:.1f} %" if p.mfu is not None else "-"
    hbm = f"{p.hbm / GIB:.1f}" if p.hbm else "-"
    fits = "-" if p.fits is None else "yes" if p.fits else "NO"
    rows.append(f"| {p.stage} | {p.devices} x {p.device_kind} | {p.mesh} | {p.global_batch} | {p.grad_accum} "
                f"| {p.remat} | {p.attention} | {p.peak / GIB:.2f} | {hbm} | {fits} | {total:.1f} "
                f"| {analytic} | {ratio} | {est} | {mfu} | {p.compile_s:.0f} |")
  return "\n".join(rows)


def format_table(plans: list[Plan]) -> str:
  """A Markdown table; memory in GiB per device, FLOPs in TFLOP per step."""
  head = ("| stage | global batch | grad accum | inputs | remat | attention | argument | output | temp | code "
          "| alias | peak | XLA peak | TFLOP/device (compiled) | model TFLOP (global) | compile s |")
  rows = [head, "|" + "---|" * (head.count("|") - 1)]
  gib = lambda b: f"{b / GIB:.2f}" if b is not None else "-"
  for p in plans:
    model = f"{p.model_flops / 1e12:.1f}" if p.model_flops is not None else "-"
    rows.append(f"| {p.stage} | {p.global_batch} | {p.grad_accum} | {p.inputs} | {p.remat} | {p.attention} "
                f"| {gib(p.argument)} "
                f"| {gib(p.output)} | {gib(p.temp)} | {gib(p.generated_code)} | {gib(p.alias)} | {gib(p.peak)} "
                f"| {gib(p.xla_peak)} | {p.flops_per_device / 1e12:.1f} | {model} | {p.compile_s:.0f} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stages", default="stage1,stage2", help="comma list of base, stage1, stage2")
  parser.add_argument("--devices", type=int, default=8, help="devices (simulated unless --real-devices), all on fsdp")
  parser.add_argument("--batch", default=None,
                      help="global batch, one for all stages or a comma list per stage (default 192 / 16)")
  parser.add_argument("--grad-accum", type=int, default=1, help="config.grad_accum_steps")
  parser.add_argument("--remat", default=None, help="config.remat_policy (default: the config's, 'full')")
  parser.add_argument("--dtype", default=None, help="config.dtype, compute (default: the config's, bfloat16)")
  parser.add_argument("--frozen-dtype", default=None, help="config.frozen_dtype (default: the config's, bfloat16)")
  parser.add_argument("--topology", default=None,
                      help="compile for this TPU topology with libtpu (e.g. v5p:2x2x1, v5e:2x4, v6e:4x4, v4:2x2x2) "
                           "instead of simulated CPU devices; --devices is then the topology's chip count")
  parser.add_argument("--sampler-steps", type=int, default=50, help="DDIM steps of the 'sampler' plan")
  parser.add_argument("--attention", default=None,
                      help=f"config.attention_backend: '{FLASH_PROXY}' (default on simulated devices: this script's "
                           "loop-free stand-in for a fused flash attention), 'splash' (default with --topology), "
                           "'xla' (full [B, H, Nq, Nk] logits), 'flash' (our pure-JAX flash backend), 'auto', or "
                           "'config' (the config's own)")
  parser.add_argument("--latents", action="store_true",
                      help="batches of cached VAE latents (preprocess --vae) instead of images: no VAE in the step")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
  parser.add_argument("--no-model-flops", dest="model_flops", action="store_false",
                      help="skip the loop-free re-lowering for the global FLOP count")
  parser.add_argument("--real-devices", action="store_true",
                      help="compile for this machine's first --devices accelerators (GPU/TPU) instead of simulated "
                           "CPU devices: the backend's own memory analysis; with a real --attention backend (not "
                           f"'{FLASH_PROXY}') also the time model and --measure runs, measured against estimated")
  parser.add_argument("--measure", type=int, default=5,
                      help="with --real-devices and a real attention backend: run each step this many times "
                           "(zero-filled inputs) and print the measured time next to the modelled one (0: do not run)")
  parser.add_argument("--hlo-dir", default="", help="--topology: write each compiled program's HLO text here "
                      "(<program>.hlo.txt), to read its loops, fusions and kernels")
  parser.add_argument("--json", default=None, help="write the plans to this JSON file")
  args = parser.parse_args()
  if args.attention is None:
    args.attention = "splash" if args.topology else FLASH_PROXY
  if args.topology:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu's compiler runs on the host; no TPU is probed
    main_topology(args)
    return
  if args.real_devices and args.attention != FLASH_PROXY:
    main_topology(args)  # the machine's own accelerators: compiled, modelled, then measured
    return
  if not args.real_devices:
    code = _reexec_with_devices(args.devices)
    if code is not None:
      sys.exit(code)
  import jax  # noqa: PLC0415

  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  batches = [int(b) for b in args.batch.split(",")] if args.batch else [DEFAULT_BATCH[s] for s in stages]
  if len(batches) == 1:
    batches *= len(stages)
  if len(batches) != len(stages):
    raise SystemExit(f"--batch {args.batch!r}: give one value or one per stage ({len(stages)})")
  print(f"memory plan: {args.devices} x {jax.devices()[0].platform} devices, mesh data=1 fsdp={args.devices}, "
        f"jax {jax.__version__}", flush=True)
  plans = []
  for stage, batch in zip(stages, batches, strict=True):
    plans.append(plan_stage(args, stage, batch))
    p = plans[-1]
    print(f"{stage}: global batch {batch}: peak {p.peak / GIB:.2f} GiB/device (argument {p.argument / GIB:.2f}, "
          f"output {p.output / GIB:.2f}, temp {p.temp / GIB:.2f}, alias {p.alias / GIB:.2f}), compiled in "
          f"{p.compile_s:.0f} s", flush=True)
  print(format_table(plans))
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(p) for p in plans], f, indent=2)


def main_topology(args: argparse.Namespace) -> None:
  """`--topology`: every stage compiled by libtpu for the topology's chips; `--real-devices`: for this machine's
  first `--devices` accelerators, then run `--measure` times for the measured step time next to the model's."""
  import jax  # noqa: PLC0415

  from magicpose_jax.models.attention import register_backend  # noqa: PLC0415
  from magicpose_jax.train import plan  # noqa: PLC0415

  register_backend(FLASH_PROXY, flash_proxy_attention)
  if args.topology:
    devices = plan.topology_devices(args.topology)
    where = f"TPU topology {args.topology}: {len(devices)} x {devices[0].device_kind}, compiled by libtpu on this host"
  else:
    devices = jax.devices()[:args.devices]
    where = f"{len(devices)} real {devices[0].platform} device(s) ({devices[0].device_kind}), compiled and run here"
  args.devices = len(devices)
  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  batches = [int(b) for b in args.batch.split(",")] if args.batch else [DEFAULT_BATCH[s] for s in stages]
  if len(batches) == 1:
    batches *= len(stages)
  print(f"memory plan: {where} (jax {jax.__version__}); estimates are a model, not a measurement", flush=True)
  plans = []
  for stage, batch in zip(stages, batches, strict=True):
    plans += plan_on_topology(args, stage, batch, devices)
  print(format_topology_table(plans))
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(p) for p in plans], f, indent=2)


if __name__ == "__main__":
  main()
