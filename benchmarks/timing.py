"""Side-by-side timing shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def add_thread_arguments(parser: argparse.ArgumentParser) -> None:
  """`--threads` and `--clock`, as the jax-vs-PyTorch CPU benchmarks take them."""
  parser.add_argument("--threads", type=int, default=0,
                      help="threads for both (0: every core). 1 with --clock process measures work on a loaded machine")
  parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                      help="wall time, or this process's CPU time (meaningful with --threads 1)")


def threads_for_both(threads: int) -> int:
  """The thread count both libraries get: `threads`, or every core for 0 (XLA's CPU client uses them all). For 1
  it sets XLA's flags for one Eigen thread and no intra-op pool, so call it before jax is imported."""
  if threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
  return threads or os.cpu_count()


def shuffled_samples(fns: dict[str, Callable[[], object]], iters: int, clock: str = "wall",
                     seed: int = 0) -> dict[str, list[float]]:
  """Seconds of each of `iters` runs of every function in `fns`, after one warm-up each, run in rounds.

  Each round runs every function once, so drifting machine load (other processes, thermal limits, a noisy
  neighbour on a shared host) hits all alike; the i-th runs are neighbours in time. The order within a round is
  drawn at random (seeded): whatever runs right after another pays for the caches it left cold (and for
  PyTorch's OpenMP threads still spinning), and in a fixed order that cost always fell on the same side
  (measured on matmuls: up to 15%). `clock="process"` counts this process's CPU seconds (all its threads) instead
  of wall time: with one thread each it measures the work done, not the share of a loaded machine it got.
  """
  now = CLOCKS[clock]
  order = random.Random(seed)
  for fn in fns.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(iters):
    names = list(fns)
    order.shuffle(names)
    for name in names:
      start = now()
      fns[name]()
      times[name].append(now() - start)
  return times


def alternate_samples(ours: Callable[[], object], reference: Callable[[], object], iters: int,
                      clock: str = "wall", seed: int = 0) -> tuple[list[float], list[float]]:
  """`shuffled_samples` of two functions: (ours' seconds, reference's seconds), run in back-to-back pairs."""
  times = shuffled_samples({"ours": ours, "reference": reference}, iters, clock, seed)
  return times["ours"], times["reference"]


def alternate(ours: Callable[[], object], reference: Callable[[], object], iters: int,
              clock: str = "wall") -> tuple[float, float]:
  """Median seconds of `ours` and `reference` over `alternate_samples`."""
  ours_s, ref_s = alternate_samples(ours, reference, iters, clock)
  return statistics.median(ours_s), statistics.median(ref_s)


def paired_ratio(ours: list[float], reference: list[float]) -> float:
  """Median over i of ours[i] / reference[i]: each ratio compares runs made back to back, so a machine whose
  speed drifts between runs (seen here: one model's runs spread over 6-13 s in a minute) moves it far less than
  it moves either median."""
  return statistics.median(o / r for o, r in zip(ours, reference, strict=True))


def paired_ratio_interval(ours: list[float], reference: list[float], level: float = 0.9, draws: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
  """A bootstrap interval for `paired_ratio`: the pairs resampled with replacement `draws` times (seeded), the
  (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled medians. A goal such as `<= 1.0` is met only
  where the whole interval is under it; an interval across it says the runs cannot tell."""
  ratios = [o / r for o, r in zip(ours, reference, strict=True)]
  rng = random.Random(seed)
  medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
  lo = medians[int((1 - level) / 2 * (draws - 1))]
  hi = medians[int((1 + level) / 2 * (draws - 1))]
  return lo, hi


def compile_with_xla_convs(fn: Callable[..., Any], *args: Any) -> Any:
  """`fn` jitted and compiled for `args` with every conv on XLA's convolution (`models.conv.conv_mode("lax")`).
  The mode applies when tracing, and `jax.jit` reuses the trace of a function object it has seen, so `fn` is
  wrapped in a new one first."""
  import jax  # noqa: PLC0415  (the benchmarks import jax after setting their thread flags)

  from magicpose_jax.models.conv import conv_mode  # noqa: PLC0415

  with conv_mode("lax"):
    return jax.jit(lambda *a: fn(*a)).lower(*args).compile()  # noqa: PLW0108
