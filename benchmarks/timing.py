"""Side-by-side timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def alternate(ours: Callable[[], object], reference: Callable[[], object], iters: int,
              clock: str = "wall") -> tuple[float, float]:
  """Median seconds of `ours` and `reference`, after one warm-up each, run alternately.

  Alternating makes drifting machine load (other processes, thermal limits) hit both alike. `clock="process"`
  counts this process's CPU seconds (all its threads) instead of wall time: with one thread each it measures the
  work done, not the share of a loaded machine this process got.
  """
  now = CLOCKS[clock]
  ours(), reference()
  times: tuple[list[float], list[float]] = ([], [])
  for _ in range(iters):
    for fn, acc in ((ours, times[0]), (reference, times[1])):
      start = now()
      fn()
      acc.append(now() - start)
  return statistics.median(times[0]), statistics.median(times[1])
