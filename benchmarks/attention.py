"""Attention backends on every SD 1.5 attention shape at 512 px: forward and forward+backward times.

    python benchmarks/attention.py --reduced            # quarter-length sequences: ~1-2 min on a CPU
    python benchmarks/attention.py                      # the real shapes (4096-token layers: minutes on a CPU)
    python benchmarks/attention.py --torch              # + torch SDPA on the same shapes and threads
    taskset -c 0 python benchmarks/attention.py --clock process   # one pinned core: load-robust CPU seconds

Shapes (batch 1 unless --batch): per UNet level (64x64 latents: 4096 tokens, 8 heads of 40; 1024 tokens x 80;
256 x 160; the mid block 64 x 160), MagicPose's self-attention over [main; reference] tokens (kv = 2 q), plain
self-attention (kv = q) and cross-attention to 77 text tokens. Every registered backend that can run the shape on
this platform (its `supports` passes) is timed with `jax.jit`, after a warm-up, median of --iters runs; the
forward+backward time is of `jax.vjp` with a random cotangent, gradients wrt q, k and v. The last columns say
which backend `auto` picks for the shape and, with --torch, torch SDPA's times and ours(auto) / torch. Runs
unchanged on GPU/TPU (backends that cannot run there are skipped, not timed as their `xla` fallback).
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

from timing import CLOCKS

# (level, Nq, heads, head_dim) of SD 1.5's transformer blocks for 512x512 images (64x64 latents).
LEVELS = (("64x64", 4096, 8, 40), ("32x32", 1024, 8, 80), ("16x16", 256, 8, 160), ("mid", 64, 8, 160))
TEXT_TOKENS = 77


def shapes(reduced: bool) -> list[tuple[str, int, int, int, int]]:
  """(name, Nq, Nk, H, D) for every attention kind at every level; --reduced quarters the token counts."""
  out = []
  for level, full_nq, h, d in LEVELS:
    nq = max(16, full_nq // 4) if reduced else full_nq
    out += [(f"{level} self+ref", nq, 2 * nq, h, d), (f"{level} self", nq, nq, h, d),
            (f"{level} cross", nq, TEXT_TOKENS, h, d)]
  return out


def median_time(fn: Callable[[], object], iters: int, clock: Callable[[], float]) -> float:
  fn()  # warm-up (and compile)
  times = []
  for _ in range(iters):
    start = clock()
    fn()
    times.append(clock() - start)
  return statistics.median(times)


def time_jax(backend: str, q, k, v, ct, iters: int, clock, backward: bool) -> dict[str, float]:
  """Median seconds of `attend(q, k, v, backend)` ('fwd') and of it with its VJP ('fwd+bwd'), jitted."""
  import jax  # noqa: PLC0415

  from magicpose_jax.models import attention  # noqa: PLC0415

  fwd = jax.jit(lambda q, k, v: attention.attend(q, k, v, backend))
  out = {"fwd": median_time(lambda: jax.block_until_ready(fwd(q, k, v)), iters, clock)}
  if backward:
    grads = jax.jit(lambda q, k, v, ct: jax.vjp(fwd, q, k, v)[1](ct))
    out["fwd+bwd"] = median_time(lambda: jax.block_until_ready(grads(q, k, v, ct)), iters, clock)
  return out


def time_torch(torch, q, k, v, ct, dtype: str, device: str, iters: int, clock, backward: bool) -> dict[str, float]:
  """The same for `torch.nn.functional.scaled_dot_product_attention` ([B, H, N, D] layout)."""
  import numpy as np  # noqa: PLC0415

  as_torch = lambda x, grad=False: torch.tensor(np.asarray(x, np.float32), dtype=getattr(torch, dtype),
                                                device=device).transpose(1, 2).requires_grad_(grad)
  tq, tk, tv = (as_torch(x, True) for x in (q, k, v))
  tct = as_torch(ct)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def t_fwd():
    with torch.no_grad():
      sdpa(tq, tk, tv)
    sync()

  def t_fwd_bwd():
    torch.autograd.grad(sdpa(tq, tk, tv), (tq, tk, tv), tct)
    sync()

  out = {"fwd": median_time(t_fwd, iters, clock)}
  if backward:
    out["fwd+bwd"] = median_time(t_fwd_bwd, iters, clock)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--reduced", action="store_true", help="quarter-length sequences (a quick CPU run)")
  parser.add_argument("--iters", type=int, default=5, help="timed runs per case (median)")
  parser.add_argument("--backends", default="", help="comma-separated subset (default: all that run here)")
  parser.add_argument("--only", default="", help="run only shapes whose name contains this (e.g. 64x64)")
  parser.add_argument("--no-backward", action="store_true", help="forward times only")
  parser.add_argument("--torch", action="store_true", help="also time torch SDPA (CPU, or CUDA when JAX is on GPU)")
  parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                      help="wall time, or this process's CPU time (use with one pinned core under load)")
  args = parser.parse_args()
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from magicpose_jax.models import attention  # noqa: PLC0415

  clock = CLOCKS[args.clock]
  dtype = jnp.dtype(args.dtype)
  platform = jax.default_backend()
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  names = [n for n in (args.backends.split(",") if args.backends else attention.available_backends()) if n != "auto"]
  torch = None
  if args.torch:
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
  print(f"attention: platform={platform} ({jax.devices()[0].device_kind}), dtype={args.dtype}, batch={args.batch}, "
        f"threads={threads}, clock={args.clock}, median of {args.iters}, jax {jax.__version__}"
        + (f", torch {torch.__version__}" if torch else ""))
  print("ms per call; 'fwd+bwd' = forward + gradients wrt q, k, v; '-' = the backend cannot run this case here")
  header = f"{'shape':<16} {'Nq':>5} {'Nk':>5} {'H':>2} {'D':>4} {'pass':<8}" + "".join(f"{n:>12}" for n in names)
  header += f"{'auto picks':>12}" + (f"{'torch':>10}{'auto/torch':>11}" if torch else "")
  print(header)

  rng = np.random.default_rng(0)
  for name, nq, nk, h, d in shapes(args.reduced):
    if args.only and args.only not in name:
      continue
    b = args.batch
    q, k, v, ct = (jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)
                   for s in ((b, nq, h, d), (b, nk, h, d), (b, nk, h, d), (b, nq, h, d)))
    auto_pick = attention.auto_backend(q, k, v)
    rows = {"fwd": {}, "fwd+bwd": {}}
    for backend in names:
      if attention.backend_supports(backend, q, k, v) is not None:
        continue  # would time the xla fallback under another name
      for pass_name, seconds in time_jax(backend, q, k, v, ct, args.iters, clock, not args.no_backward).items():
        rows[pass_name][backend] = seconds
    torch_times = {}
    if torch:
      device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
      torch_times = time_torch(torch, q, k, v, ct, args.dtype, device, args.iters, clock, not args.no_backward)
    for pass_name, times in rows.items():
      if not times:
        continue
      line = f"{name:<16} {nq:>5} {nk:>5} {h:>2} {d:>4} {pass_name:<8}"
      line += "".join(f"{times[n] * 1e3:>12.2f}" if n in times else f"{'-':>12}" for n in names)
      line += f"{auto_pick:>12}"
      if torch_times:
        auto_s = times.get(auto_pick)
        ratio = f"{auto_s / torch_times[pass_name]:.2f}x" if auto_s else "-"
        line += f"{torch_times[pass_name] * 1e3:>10.2f}{ratio:>11}"
      print(line, flush=True)


if __name__ == "__main__":
  main()
