"""Matrix products of one SD 1.5 UNet forward: XLA's dot vs our CPU kernel vs PyTorch, same threads, one run.

    python benchmarks/matmul.py                  # every linear-layer and im2col shape, 2 threads (all cores)
    python benchmarks/matmul.py --threads 1      # one thread each (pin with taskset for steadier numbers)

Shapes (batch 1, 64x64 latents): the attention projections, the GEGLU and output projections of the
feed-forward, the cross-attention keys/values of the 77 text tokens, per level, and the 16x16 / 8x8
convolutions that `models/conv.py` runs as one im2col product. Each is timed three ways in turn, after a
warm-up: `jnp.dot` under jit (XLA:CPU's YNNPACK dot), `cpu_matmul.matmul` (models/cpu_matmul.cc) and
`torch.nn.functional.linear`; medians of --iters runs. The last lines weight each shape by how often one
forward runs it, and print the totals and ratios. Needs the test/reference extra (torch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# (M, K, N, times per UNet forward) for SD 1.5 at 64x64 latents.
LEVELS = ((4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1))  # (tokens, channels, transformers)
# The 3x3 convolutions at 16x16 and 8x8 (resnets' conv1/conv2 by input channels, the 8->16 upsampler's conv).
IM2COL = ((256, 9 * 1280, 1280, 7), (256, 9 * 2560, 1280, 2), (256, 9 * 1920, 1280, 1), (256, 9 * 640, 1280, 1),
          (64, 9 * 1280, 1280, 11), (64, 9 * 2560, 1280, 3))


def shapes() -> list[tuple[int, int, int, int]]:
  out = []
  for n, c, blocks in LEVELS:
    out += [(n, c, c, 6 * blocks),       # to_q, to_k, to_v, to_out (self), to_q, to_out (cross)
            (77, 768, c, 2 * blocks),    # cross-attention to_k, to_v
            (n, c, 8 * c, blocks),       # GEGLU proj (dim -> 2 x 4 dim)
            (n, 4 * c, c, blocks),       # ff out
            (n, c, c, 2 * blocks)]       # proj_in, proj_out (1x1 convs)
  return out + list(IM2COL)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iters", type=int, default=9)
  parser.add_argument("--threads", type=int, default=0, help="threads for all three (0: every core)")
  args = parser.parse_args()
  threads = args.threads or os.cpu_count()
  if args.threads == 1:  # before jax is imported: one Eigen thread, no intra-op pool
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415

  from magicpose_jax.models import cpu_matmul  # noqa: PLC0415

  torch.set_num_threads(threads)
  reason = cpu_matmul.unavailable_reason()
  if reason is not None:
    raise SystemExit(f"the CPU matmul kernel is unavailable: {reason}")
  xla_dot, kernel = jax.jit(jnp.dot), jax.jit(cpu_matmul.matmul)
  rng = np.random.default_rng(0)
  print(f"Matmuls of one SD 1.5 UNet forward (64x64 latents), fp32, threads={threads} (all three), "
        f"jax {jax.__version__}, torch {torch.__version__}; median ms of {args.iters} runs")
  print(f"  {'M x K x N':>20} {'x':>3} {'XLA':>8} {'kernel':>8} {'PyTorch':>8} {'kernel/XLA':>10} {'kernel/torch':>12}")
  totals = np.zeros(3)
  for m, k, n, count in shapes():
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    aj, bj = jax.device_put(a), jax.device_put(b)
    at, bt = torch.from_numpy(a), torch.from_numpy(b.T.copy())  # nn.Linear's [out, in] weight

    def run_torch(at=at, bt=bt):
      with torch.inference_mode():
        return torch.nn.functional.linear(at, bt)

    runs = (lambda aj=aj, bj=bj: xla_dot(aj, bj).block_until_ready(),
            lambda aj=aj, bj=bj: kernel(aj, bj).block_until_ready(), run_torch)
    for fn in runs:
      fn()
    times: list[list[float]] = [[], [], []]
    for _ in range(args.iters):
      for fn, acc in zip(runs, times, strict=True):
        start = time.perf_counter()
        fn()
        acc.append(time.perf_counter() - start)
    ms = np.array([statistics.median(t) * 1e3 for t in times])
    totals += count * ms
    print(f"  {f'{m} x {k} x {n}':>20} {count:>3} {ms[0]:8.2f} {ms[1]:8.2f} {ms[2]:8.2f} "
          f"{ms[1] / ms[0]:10.2f} {ms[1] / ms[2]:12.2f}")
  print(f"  per forward (ms)     : XLA {totals[0]:.0f}, kernel {totals[1]:.0f}, PyTorch {totals[2]:.0f}")
  print(f"  kernel / XLA         : {totals[1] / totals[0]:.2f}x")
  print(f"  kernel / PyTorch     : {totals[1] / totals[2]:.2f}x   (XLA / PyTorch {totals[0] / totals[2]:.2f}x)")


if __name__ == "__main__":
  main()
