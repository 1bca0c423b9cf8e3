"""UNet forward: our jit'd Flax UNet vs diffusers' PyTorch UNet, same weights, same threads, one run.

    python benchmarks/unet_forward.py                 # full SD 1.5, batch 1, 64×64 latents, fp32
    python benchmarks/unet_forward.py --variant tiny  # seconds, for a smoke run
    python benchmarks/unet_forward.py --lax-conv      # also ours with every conv on XLA's (MAGICPOSE_CPU_CONV=lax)

Prints both median times after warm-up, their ratio, the median ratio of back-to-back pairs
(goal: ours / PyTorch <= 1.0; robust to a machine whose speed drifts) with a 90% bootstrap interval over the
pairs, every run, and our compile time. Needs the test/reference extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from timing import (
  add_thread_arguments,
  compile_with_xla_convs,
  paired_ratio,
  paired_ratio_interval,
  shuffled_samples,
  threads_for_both,
)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="sd15", help="UNet variant from magicpose_jax.models.unet.VARIANTS")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--size", type=int, default=64, help="latent height = width")
  parser.add_argument("--iters", type=int, default=5, help="timed runs of each, alternating")
  parser.add_argument("--backend", default="auto", help="our attention backend (see models/attention.py)")
  parser.add_argument("--lax-conv", action="store_true",
                      help="also time ours with every conv on XLA's (no im2col/Winograd), in the same rounds")
  add_thread_arguments(parser)
  args = parser.parse_args()
  threads = threads_for_both(args.threads)  # before jax is imported
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from diffusers import UNet2DConditionModel as TorchUNet  # noqa: PLC0415

  from magicpose_jax.convert.diffusers import unet_key_table  # noqa: PLC0415
  from magicpose_jax.models.unet import VARIANTS, UNet2DConditionModel  # noqa: PLC0415

  torch.set_num_threads(threads)
  config = VARIANTS[args.variant].replace(attention_backend=args.backend)
  torch.manual_seed(0)
  tmodel = TorchUNet(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}).eval()
  params = jax.device_put(unet_key_table(config).to_flax(
      {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}))

  rng = np.random.default_rng(0)
  sample = rng.standard_normal((args.batch, args.size, args.size, config.in_channels), dtype=np.float32)
  t = np.full((args.batch,), 500.0, np.float32)
  context = rng.standard_normal((args.batch, 77, config.cross_attention_dim), dtype=np.float32)

  model = UNet2DConditionModel(config)
  start = time.perf_counter()
  compiled = jax.jit(model.apply).lower({"params": params}, sample, t, context).compile()
  compile_s = time.perf_counter() - start
  run_jax = lambda: compiled({"params": params}, sample, t, context).block_until_ready()
  fns = {"ours": run_jax}
  if args.lax_conv:
    compiled_lax = compile_with_xla_convs(model.apply, {"params": params}, sample, t, context)
    fns["ours_lax_conv"] = lambda: compiled_lax({"params": params}, sample, t, context).block_until_ready()

  x_t, t_t, c_t = torch.from_numpy(sample.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(context)

  def run_torch():
    with torch.inference_mode():
      return tmodel(x_t, t_t, c_t).sample

  runs = shuffled_samples(fns | {"torch": run_torch}, args.iters, args.clock)
  jax_runs, torch_runs = runs["ours"], runs["torch"]
  jax_s, torch_s = statistics.median(jax_runs), statistics.median(torch_runs)
  err = np.abs(np.asarray(run_jax()) - run_torch().numpy().transpose(0, 2, 3, 1)).max()

  print(f"UNet forward: variant={args.variant} batch={args.batch} latents={args.size}x{args.size} fp32, "
        f"threads={threads} (both), {args.clock} clock, jax {jax.__version__}, torch {torch.__version__}")
  print(f"  ours (jit, {args.backend:>11}) : {jax_s * 1e3:9.1f} ms   (compile {compile_s:.1f} s)")
  print(f"  diffusers (PyTorch)     : {torch_s * 1e3:9.1f} ms")
  print(f"  ratio ours / PyTorch    : {jax_s / torch_s:9.2f}x   (of the medians)")
  lo, hi = paired_ratio_interval(jax_runs, torch_runs)
  print(f"  paired ratio            : {paired_ratio(jax_runs, torch_runs):9.2f}x   (median of back-to-back pairs; "
        f"90% bootstrap interval {lo:.2f}-{hi:.2f}; goal <= 1.00)")
  print(f"  runs, ours     (s)      : {' '.join(f'{t:.2f}' for t in jax_runs)}")
  print(f"  runs, PyTorch  (s)      : {' '.join(f'{t:.2f}' for t in torch_runs)}")
  print(f"  max |ours - PyTorch|    : {err:.2e}")
  if args.lax_conv:
    lax_runs = runs["ours_lax_conv"]
    print(f"  ours, XLA convs only    : {statistics.median(lax_runs) * 1e3:9.1f} ms   (MAGICPOSE_CPU_CONV=lax)")
    for name, a, b in (("ours / XLA convs only   ", jax_runs, lax_runs),
                       ("XLA convs only / PyTorch", lax_runs, torch_runs)):
      lo, hi = paired_ratio_interval(a, b)
      print(f"  {name}: {paired_ratio(a, b):9.2f}x   (paired; 90% interval {lo:.2f}-{hi:.2f})")
    print(f"  runs, XLA convs (s)     : {' '.join(f'{t:.2f}' for t in lax_runs)}")


if __name__ == "__main__":
  main()
