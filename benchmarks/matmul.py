"""Matrix products of one SD 1.5 UNet forward: XLA:CPU's dot vs PyTorch's (MKL), same threads, one run.

    python benchmarks/matmul.py                          # 2 threads (every core), wall clock
    taskset -c 1 python benchmarks/matmul.py --threads 1 --clock process   # one pinned core: CPU seconds

Shapes (batch 1, 64x64 latents): per level, the attention projections, the cross-attention keys/values of the
77 text tokens, the GEGLU and output projections of the feed-forward, the 1x1 `proj_in`/`proj_out`, and the
16x16 / 8x8 3x3 convolutions that `models/conv.py` runs as one im2col product. Each shape is timed `jnp.dot`
under jit against `torch.nn.functional.linear` on --copies different operand pairs in turn (the UNet reads every
weight once per forward: caches are not warm for it either), each round's order drawn at random; medians of
the rounds. The last lines weight each shape by how often one forward runs it. This is where our UNet forward
loses to PyTorch's (benchmarks/results/cpu-forward.md). Needs the test/reference extra (torch).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

from timing import CLOCKS, add_thread_arguments, threads_for_both

# (tokens, channels, transformer blocks) per level of SD 1.5 at 64x64 latents.
LEVELS = ((4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1))
# The 3x3 convolutions at 16x16 and 8x8 as im2col products (resnets' conv1/conv2 by input channels, the
# 8 -> 16 upsampler's conv): (M, 9 * C_in, C_out, count).
IM2COL = ((256, 9 * 1280, 1280, 7), (256, 9 * 2560, 1280, 2), (256, 9 * 1920, 1280, 1), (256, 9 * 640, 1280, 1),
          (64, 9 * 1280, 1280, 11), (64, 9 * 2560, 1280, 3))


def shapes() -> list[tuple[int, int, int, int]]:
  """(M, K, N, times per UNet forward)."""
  out = []
  for n, c, blocks in LEVELS:
    out += [(n, c, c, 8 * blocks),      # to_q, to_k, to_v, to_out (self), to_q, to_out (cross), proj_in, proj_out
            (77, 768, c, 2 * blocks),   # cross-attention to_k, to_v  (proj_in/out: 1x1 convs in SD 1.5, same product)
            (n, c, 8 * c, blocks),      # GEGLU proj (dim -> 2 x 4 dim)
            (n, 4 * c, c, blocks)]      # feed-forward out
  return out + list(IM2COL)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds over every operand copy")
  parser.add_argument("--copies", type=int, default=3, help="different operand pairs per shape")
  add_thread_arguments(parser)
  args = parser.parse_args()
  threads = threads_for_both(args.threads)  # before jax is imported
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415

  torch.set_num_threads(threads)
  now = CLOCKS[args.clock]
  dot = jax.jit(jnp.dot)
  rng, order = np.random.default_rng(0), random.Random(0)
  print(f"Matmuls of one SD 1.5 UNet forward (64x64 latents), fp32, threads={threads} (both), {args.clock} clock, "
        f"jax {jax.__version__}, torch {torch.__version__}; median ms over {args.rounds} x {args.copies} runs")
  print(f"  {'M x K x N':>20} {'x':>3} {'XLA':>8} {'PyTorch':>8} {'XLA/torch':>9}")
  totals = np.zeros(2)
  for m, k, n, count in shapes():
    pairs = [(rng.standard_normal((m, k), dtype=np.float32),
              (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32))
             for _ in range(args.copies)]
    ours = [(jax.device_put(a), jax.device_put(b)) for a, b in pairs]
    theirs = [(torch.from_numpy(a), torch.from_numpy(b.T.copy())) for a, b in pairs]  # nn.Linear's [out, in]

    def run_xla(i, ours=ours):
      dot(*ours[i]).block_until_ready()

    def run_torch(i, theirs=theirs):
      with torch.inference_mode():
        torch.nn.functional.linear(*theirs[i])

    runs = (run_xla, run_torch)
    for i in range(args.copies):
      for fn in runs:
        fn(i)
    times: list[list[float]] = [[], []]
    for _ in range(args.rounds):
      for i in range(args.copies):
        for j in order.sample(range(2), 2):
          start = now()
          runs[j](i)
          times[j].append(now() - start)
    ms = np.array([statistics.median(t) * 1e3 for t in times])
    totals += count * ms
    print(f"  {f'{m} x {k} x {n}':>20} {count:>3} {ms[0]:8.2f} {ms[1]:8.2f} {ms[0] / ms[1]:9.2f}")
  print(f"  per forward (ms)     : XLA {totals[0]:.0f}, PyTorch {totals[1]:.0f}")
  print(f"  XLA / PyTorch        : {totals[0] / totals[1]:.2f}x")


if __name__ == "__main__":
  main()
