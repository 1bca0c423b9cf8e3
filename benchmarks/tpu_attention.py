"""SD 1.5's attention layers compiled for a TPU by libtpu on this CPU host: which backend is cheapest per layer.

    python benchmarks/tpu_attention.py --topology v5p:2x2x1 --batch 8        # ~5 min on 2 cores

For each SD 1.5 attention shape of the MagicPose step (self-attention with the reference's tokens, Nk = 2 Nq, and
cross-attention over 77 text tokens; head dim 40/80/160 at latent 64/32/16/8), forward + backward of one layer on
one chip, as compiled for the topology's first device:

  * `xla`: the einsum path; time = the compiler's `optimal_seconds` (its own cost model of the fused program);
  * `splash`: the splash kernel as `models/splash_attention.py` calls it (head dim unpadded, lengths padded to
    128); `splash_pad128`: the old layout, head dim zero-padded to 128. Kernel time = roofline over the Mosaic
    kernels (`train.flops.mosaic_kernel_costs`: MXU FLOPs / bf16 peak vs bytes / HBM bandwidth, the larger) plus
    `optimal_seconds` of the XLA ops around them (transposes, padding).

These are models, not measurements. The kernel roofline counts the head dim rounded up to 128 (a head dim of 40
fills 40 of the MXU's 128 contraction rows whatever the layout), so padding D in HBM only adds bytes there. On a
TPU, `benchmarks/attention.py` times the backends for real.
"""

from __future__ import annotations

import argparse
import os
import time

# (latent side, Nq, Nk, heads, head dim): SD 1.5 with MagicPose's doubled self-attention keys
LAYERS = [(64, 4096, 8192, 8, 40), (64, 4096, 77, 8, 40), (32, 1024, 2048, 8, 80), (32, 1024, 77, 8, 80),
          (16, 256, 512, 8, 160), (16, 256, 77, 8, 160), (8, 64, 128, 8, 160), (8, 64, 77, 8, 160)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--batch", type=int, default=8, help="examples per chip")
  parser.add_argument("--backends", default="xla,splash,splash_pad128")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from magicpose_jax.models import attention, platforms, splash_attention  # noqa: PLC0415
  from magicpose_jax.train import flops, plan  # noqa: PLC0415

  device = plan.topology_devices(args.topology)[0]
  peak = flops.device_peak(device.device_kind)
  sharding = jax.sharding.SingleDeviceSharding(device)
  fns = {"xla": attention.xla_attention, "splash": splash_attention.splash_attention,
         "splash_pad128": lambda q, k, v: splash_attention.splash_attention(q, k, v, pad_head_dim=True)}
  print(f"{args.topology}: {device.device_kind}, batch {args.batch} per chip, bf16, forward + backward; "
        f"times are the compiler's / a roofline MODEL, not measurements")
  print("| latent | Nq | Nk | D | backend | XLA GFLOP | kernel GFLOP | kernel MB | XLA s | kernel s | est. ms | "
        "vs xla | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for side, nq, nk, h, d in LAYERS:
    q = jax.ShapeDtypeStruct((args.batch, nq, h, d), jnp.bfloat16, sharding=sharding)
    k = jax.ShapeDtypeStruct((args.batch, nk, h, d), jnp.bfloat16, sharding=sharding)
    base = None
    for name in args.backends.split(","):
      fn = fns[name]

      def train(q, k, v, fn=fn):
        with platforms.target_platform("tpu"):
          out, vjp = jax.vjp(fn, q, k, v)
          return vjp(out)

      t0 = time.perf_counter()
      compiled = jax.jit(train).lower(q, k, k).compile()
      compile_s = time.perf_counter() - t0
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list | tuple) else cost
      xla_s = max(float(cost.get("optimal_seconds", 0.0)), 0.0)
      kernels = flops.mosaic_kernel_costs(compiled.as_text())
      kf, kb = sum(x.flops for x in kernels), sum(x.bytes for x in kernels)
      kernel_s = sum(x.roofline_seconds(peak) for x in kernels)
      est = xla_s + kernel_s
      base = est if name == "xla" else base
      ratio = f"{est / base:.2f}" if base else "-"
      print(f"| {side} | {nq} | {nk} | {d} | {name} | {float(cost.get('flops', 0)) / 1e9:.1f} | {kf / 1e9:.1f} "
            f"| {kb / 1e6:.0f} | {xla_s:.5f} | {kernel_s:.5f} | {1e3 * est:.3f} | {ratio} | {compile_s:.0f} |",
            flush=True)


if __name__ == "__main__":
  main()
