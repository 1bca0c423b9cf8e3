"""SIGTERM/SIGINT -> finish the current step, save, exit 0 (preemptible TPU VMs and SLURM send SIGTERM)."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class PreemptionFlag:
  """Set by SIGTERM (and SIGINT); every process agrees to stop when any of them was signalled."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self._previous = {}
    for s in signals:
      self.watch(s)

  def watch(self, signum: int) -> None:
    """Also sets the flag on `signum` (the trainer adds SIGINT once the first compile is done: before, Ctrl-C
    must stop the process at once)."""
    if threading.current_thread() is threading.main_thread() and signum not in self._previous:
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal = signum
    self._event.set()

  def local(self) -> bool:
    return self._event.is_set()

  def should_stop(self) -> bool:
    """True on every process once any process was signalled (a collective when there are several)."""
    if jax.process_count() == 1:
      return self.local()
    from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-host only)

    flags = multihost_utils.process_allgather(np.asarray(self.local(), np.int32))
    return bool(np.any(flags))

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
