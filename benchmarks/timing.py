"""Side-by-side timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(ours: Callable[[], object], reference: Callable[[], object], iters: int) -> tuple[float, float]:
  """Median seconds of `ours` and `reference`, after one warm-up each, run alternately.

  Alternating makes drifting machine load (other processes, thermal limits) hit both alike.
  """
  ours(), reference()
  times: tuple[list[float], list[float]] = ([], [])
  for _ in range(iters):
    for fn, acc in ((ours, times[0]), (reference, times[1])):
      start = time.perf_counter()
      fn()
      acc.append(time.perf_counter() - start)
  return statistics.median(times[0]), statistics.median(times[1])
