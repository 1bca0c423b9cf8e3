"""Where training numbers go: a progress bar, `metrics.jsonl` and TensorBoard (`tb/`), all in the workdir.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step (`step`, `loss`, `lr`,
`grad_norm`, `steps_per_s`, `images_per_s`, `skipped`, and from `train.flops`: `tflops_per_s` (XLA's count of
the compiled step, per device), `model_tflops_per_s` (analytic, per device) and `mfu` where the device's peak is
known); on resume the lines after the restored step
are dropped, so the file reads as one run. Every line is strict JSON: a non-finite value is written as the string
"NaN", "Infinity" or "-Infinity" (`float()` reads them back). A last line torn by a crash mid-write is dropped on
resume with a message; a garbled line before it stops the resume with the file and line number.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm

log = logging.getLogger(__name__)


def json_value(v: float) -> float | str:
  """A float as strict JSON: itself when finite, else "NaN", "Infinity" or "-Infinity"."""
  if math.isfinite(v):
    return v
  return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drops the records of steps after `last_step` (written before a crash, lost with it)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i < len(lines) - 1:
        raise ValueError(f"{path}, line {i + 1}: not JSON ({e}); only a last line torn by a crash is repaired: fix or "
                         f"remove that line, or move the file aside, and resume") from None
      log.warning("%s: dropped its last line, torn by a crash mid-write (%d characters, not JSON)", path, len(line))
  kept = [line for line, r in zip(lines, records, strict=False) if r.get("step", 0) <= last_step]
  kept = [line if line.endswith("\n") else line + "\n" for line in kept]
  with open(path, "w") as f:
    f.writelines(kept)


def _summary_writer_class() -> type:
  """tensorboardX's `SummaryWriter`, imported without torch.

  tensorboardX's writer module imports torch whenever it is installed (only to accept torch tensors, which we
  never pass): 2 s at every training start in an environment that has torch for weight conversion. A `None` in
  `sys.modules` makes that import fail fast (the documented way to block one), for the duration of this import.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:  # nothing to save (torch loaded) or already done
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (heavy import, process 0 only)

    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsLog:
  """Progress bar + jsonl + TensorBoard for one run."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    self.bar = None
    if not self.enabled:
      return
    truncate_jsonl(self.jsonl, start_step)
    self.tb_dir = os.path.join(workdir, "tb")
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

  def _tb(self) -> Any:
    """The TensorBoard writer, created at the first record (a run that fails before then leaves no tb/)."""
    if self.writer is None:
      self.writer = _summary_writer_class()(self.tb_dir)
    return self.writer

  def step(self, n: int = 1, loss: float | None = None) -> None:
    if self.bar is not None:
      self.bar.update(n)
      if loss is not None:
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    with open(self.jsonl, "a") as f:
      f.write(json.dumps({k: json_value(v) for k, v in record.items()}, allow_nan=False) + "\n")
    for k, v in values.items():
      self._tb().add_scalar(f"train/{k}", float(v), step)
    if self.bar is not None:
      extra = {"tflops": f"{record['model_tflops_per_s']:.3g}"} if "model_tflops_per_s" in record else {}
      if "mfu" in record:
        extra["mfu"] = f"{100 * record['mfu']:.1f}%"
      self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record.get('images_per_s', 0):.1f}", **extra,
                           refresh=False)

  def images(self, step: int, name: str, grid: np.ndarray) -> None:
    """`grid [H, W, 3]` uint8."""
    if self.enabled:
      self._tb().add_image(name, grid, step, dataformats="HWC")

  def message(self, text: str) -> None:
    if self.enabled:
      (self.bar.write if self.bar is not None else print)(text)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()
