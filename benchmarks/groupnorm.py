"""The models' GroupNorm (models/normalization.py) against flax's nn.GroupNorm: accuracy and cost, side by side.

    python benchmarks/groupnorm.py                          # CPU: SD 1.5's norm layers, UNet forward, VAE decode
    python benchmarks/groupnorm.py --topology v5e:2x2       # + the UNet train step compiled for a TPU (cost model)

1. Every GroupNorm shape of SD 1.5 (UNet at 64 x 64 latents, VAE decoder at 512 px), batch 1: max abs error
   against float64 on a flat figure (a rectangle on a background, both exactly flat, as in the demo's frames, a
   letterboxed video's bars or a blown-out sky) and on N(1, 1) noise, and the median paired time ratio ours / flax
   over `--iters` back-to-back runs with a 90% bootstrap interval (timing.py).
2. The whole SD 1.5 UNet forward (batch 1, 64 x 64 latents) and VAE decode (`--vae-size` px), each compiled once
   with every norm of the models on flax's and once on ours, timed in alternating rounds.
3. With `--topology`: each UNet norm's forward + backward (batch `--tpu-batch` per chip, bfloat16 activations)
   compiled by libtpu on this host for the topology's first chip: flax's, ours (traced for the TPU: flax's
   statistics) and ours' CPU path forced onto the TPU (why the TPU does not get it): bytes accessed and the
   compiler's own time estimate (`optimal_seconds`). A model of the chip, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

from timing import add_thread_arguments, paired_ratio, paired_ratio_interval, shuffled_samples, threads_for_both

UNET_NORMS = [(64, 320), (64, 640), (32, 640), (32, 1280), (16, 1280), (8, 1280), (8, 2560), (64, 960)]
VAE_NORMS = [(512, 128), (512, 256), (256, 256), (256, 512), (128, 512), (64, 512)]
MODULES = ("resnet", "transformer", "unet", "vae")  # the model files that build GroupNorms


def _flax_group_norm():
  """flax's nn.GroupNorm behind our GroupNorm's signature (two-pass variance, as the models used before)."""
  import flax.linen as nn  # noqa: PLC0415

  def make(num_groups=32, epsilon=1e-5, dtype=None, param_dtype=None, name=None):
    return nn.GroupNorm(num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        name=name)
  return make


@contextlib.contextmanager
def norms_from(factory):
  """Every model module builds its GroupNorms with `factory` while inside (tracing happens here)."""
  import importlib  # noqa: PLC0415
  modules = [importlib.import_module(f"magicpose_jax.models.{m}") for m in MODULES]
  saved = [m.GroupNorm for m in modules]
  for m in modules:
    m.GroupNorm = factory
  try:
    yield
  finally:
    for m, s in zip(modules, saved, strict=True):
      m.GroupNorm = s


def _ratio_line(name: str, times: dict[str, list[float]]) -> str:
  ours, ref = times["ours"], times["flax"]
  lo, hi = paired_ratio_interval(ours, ref)
  return (f"| {name} | {1e3 * statistics.median(ref):.2f} | {1e3 * statistics.median(ours):.2f} | "
          f"{paired_ratio(ours, ref):.3f} [{lo:.3f}, {hi:.3f}] |")


def layers(iters: int) -> None:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from magicpose_jax.models.normalization import GroupNorm  # noqa: PLC0415

  flax_norm = _flax_group_norm()
  print("\n## 1. SD 1.5's GroupNorm layers, batch 1, float32: max abs error against float64 on a flat figure and on "
        "noise; time on the flat figure\n")
  print("| layer (side, channels) | flax err, flat | ours err, flat | flax err, noise | ours err, noise | flax ms "
        "| ours ms | ours / flax [90%] |")
  print("|---|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for part, shapes, eps in (("unet", UNET_NORMS, 1e-5), ("vae", VAE_NORMS, 1e-6)):
    for side, c in shapes:
      flat = np.full((1, side, side, c), 7.3, np.float32)  # tests/test_normalization.py's flat figure
      flat[:, side // 4:3 * side // 4, side // 3:2 * side // 3] = 7.5
      noise = 1 + rng.standard_normal(flat.shape, dtype=np.float32)
      params = {"params": {"scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)}}
      fns = {"flax": jax.jit(flax_norm(32, eps).apply), "ours": jax.jit(GroupNorm(32, eps).apply)}
      errs = []
      for x in (flat, noise):
        x64 = x.astype(np.float64).reshape(1, -1, 32, c // 32)
        ref = ((x64 - x64.mean((1, 3), keepdims=True)) / np.sqrt(x64.var((1, 3), keepdims=True) + eps))
        errs += [np.abs(np.asarray(fns[k](params, x)) - ref.reshape(x.shape)).max() for k in ("flax", "ours")]
      runs = {k: (lambda f=f, p=params, x=flat: f(p, x).block_until_ready()) for k, f in fns.items()}
      times = shuffled_samples(runs, iters)
      head, rest = _ratio_line(f"{part} {side}x{side}x{c}", times).split(" | ", 1)
      print(f"{head} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {rest}", flush=True)


def models(iters: int, vae_size: int) -> None:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from magicpose_jax.models.normalization import GroupNorm  # noqa: PLC0415
  from magicpose_jax.models.unet import VARIANTS, UNet2DConditionModel  # noqa: PLC0415
  from magicpose_jax.models.vae import VAE_VARIANTS, AutoencoderKL  # noqa: PLC0415

  rng = np.random.default_rng(0)
  unet = UNet2DConditionModel(VARIANTS["sd15"])
  sample = rng.standard_normal((1, 64, 64, 4), dtype=np.float32)
  t = np.full((1,), 500.0, np.float32)
  context = rng.standard_normal((1, 77, 768), dtype=np.float32)
  unet_params = jax.jit(unet.init)(jax.random.key(0), sample, t, context)
  vae = AutoencoderKL(VAE_VARIANTS["sd15"])
  z = rng.standard_normal((1, vae_size // 8, vae_size // 8, 4), dtype=np.float32)
  vae_params = jax.jit(lambda k: vae.init(k, np.zeros((1, 64, 64, 3), np.float32)))(jax.random.key(1))

  print("\n## 2. Whole models, float32, batch 1 (each compiled with every norm on flax's, then on ours)\n")
  print("| model | flax ms | ours ms | ours / flax [90%] | compile s (flax, ours) |")
  print("|---|---|---|---|---|")
  jobs = {"SD 1.5 UNet forward, 64x64 latents": (unet.apply, (unet_params, sample, t, context)),
          f"SD 1.5 VAE decode, {vae_size} px": (lambda p, z: vae.apply(p, z, method="decode"), (vae_params, z))}
  for name, (fn, args) in jobs.items():
    compiled, compile_s, outs = {}, {}, {}
    for impl, factory in (("flax", _flax_group_norm()), ("ours", GroupNorm)):
      with norms_from(factory):
        start = time.perf_counter()
        # A fresh function object: jax.jit would reuse the first trace of `fn`, made with the other norms.
        compiled[impl] = jax.jit(lambda *a, fn=fn: fn(*a)).lower(*args).compile()
        compile_s[impl] = time.perf_counter() - start
      outs[impl] = np.asarray(compiled[impl](*args))
    runs = {k: (lambda c=c, a=args: jax.block_until_ready(c(*a))) for k, c in compiled.items()}
    times = shuffled_samples(runs, iters)
    print(f"{_ratio_line(name, times)} {compile_s['flax']:.0f}, {compile_s['ours']:.0f} |", flush=True)
    print(f"  (outputs differ by at most {np.abs(outs['flax'] - outs['ours']).max():.1e}; random weights)")


def tpu(topology: str, batch: int) -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from magicpose_jax.models import platforms  # noqa: PLC0415
  from magicpose_jax.models.normalization import GroupNorm  # noqa: PLC0415
  from magicpose_jax.train import plan  # noqa: PLC0415

  device = plan.topology_devices(topology)[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  print(f"\n## 3. {topology} ({device.device_kind}): each UNet norm, forward + backward, batch {batch} per chip, "
        "bfloat16 activations; the TPU compiler's cost model (the whole UNet's step takes over an hour to compile "
        "here)\n")
  print("| layer | flax GB | ours GB | CPU path GB | flax us | ours us | CPU path us |")
  print("|---|---|---|---|---|---|---|")
  variants = (("flax", _flax_group_norm(), "tpu"), ("ours", GroupNorm, "tpu"), ("cpu_path", GroupNorm, "cpu"))
  for side, c in UNET_NORMS:
    x = jax.ShapeDtypeStruct((batch, side, side, c), jnp.bfloat16, sharding=sharding)
    p = jax.ShapeDtypeStruct((c,), jnp.float32, sharding=sharding)
    row = {}
    for name, factory, traced_for in variants:
      norm = factory(32, 1e-5, jnp.bfloat16, jnp.float32)

      def step(scale, bias, x, norm=norm, traced_for=traced_for):
        loss = lambda s, b, x: jnp.sum(norm.apply({"params": {"scale": s, "bias": b}}, x).astype(jnp.float32))
        with platforms.target_platform(traced_for):  # "cpu": the statistics XLA:CPU gets, compiled for the TPU
          return jax.grad(loss, argnums=(0, 1, 2))(scale, bias, x)

      cost = jax.jit(step).lower(p, p, x).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, list | tuple) else cost
      seconds = float(cost.get("optimal_seconds", -1))
      row[name] = (f"{float(cost.get('bytes accessed', 0)) / 1e9:.3f}", f"{1e6 * seconds:.1f}" if seconds > 0 else "-")
    print(f"| unet {side}x{side}x{c} | " + " | ".join(row[n][0] for n, _, _ in variants) + " | "
          + " | ".join(row[n][1] for n, _, _ in variants) + " |", flush=True)
  print("(optimal_seconds '-': the compiler gave no estimate)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iters", type=int, default=15, help="timed runs of each, in shuffled rounds")
  parser.add_argument("--vae-size", type=int, default=256, help="image side of the timed VAE decode")
  parser.add_argument("--topology", default="", help="also compile for this TPU topology, e.g. v5e:2x2")
  parser.add_argument("--tpu-batch", type=int, default=8)
  parser.add_argument("--skip-cpu", action="store_true", help="only the TPU part")
  add_thread_arguments(parser)
  args = parser.parse_args()
  threads_for_both(args.threads)  # before jax is imported
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if not args.skip_cpu:
    layers(args.iters)
    models(max(args.iters // 3, 3), args.vae_size)
  if args.topology:
    tpu(args.topology, args.tpu_batch)


if __name__ == "__main__":
  main()
