"""FLOPs of the training step and the device peaks to hold them against (MFU).

Three sources of a step's FLOP count, each with its blind spot:

* `compiled_flops(compiled)`: XLA's `cost_analysis()` of the compiled step. Per device for an SPMD program
  (the partitioned module). XLA counts a `while`/`scan` body ONCE, whatever its trip count, so the scanned
  micro-batches of `grad_accum_steps > 1`, the loops of the `flash` CPU attention and the sampler's scan are
  under-counted; fused-attention custom calls (cuDNN flash, splash) count 0 FLOPs: `mosaic_kernel_costs` reads
  the Mosaic (TPU) kernels out of the compiled program and counts theirs, with the loops' trip counts.
  It includes remat recomputation: it is what the device executes ("hardware FLOPs").
* `lowered_flops(lowered)` of `loop_free_config(config)`: the same step with `xla` attention and no
  accumulation, lowered but not compiled, so nothing is looped or hidden in a custom call (global, before
  partitioning). What `benchmarks/memory_plan.py` reports as "model TFLOP".
* `unet_forward_flops` / `train_step_flops`: an analytic count of convolutions, dense layers and attention
  (2 FLOPs per multiply-add; norms, activations and the optimizer update are left out: well under 1 %),
  independent of XLA. `train_step_flops(...).model` is the MFU numerator (no recomputation, the PaLM
  definition); `.hardware` adds what the remat policy recomputes.

`peak_tflops(device_kind, dtype)` maps `jax.devices()[0].device_kind` to the dense peak of `PEAKS` (None for
CPUs and devices not in the table: no MFU is reported then); `PEAKS` also holds each device's HBM size and
bandwidth (`benchmarks/memory_plan.py --topology`: fits or not, and the kernels' roofline).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np

from magicpose_jax.models.attention import tpu_auto_backend
from magicpose_jax.models.controlnet import ControlNetConfig
from magicpose_jax.models.patch_vae import AnyVAEConfig, PatchVAEConfig
from magicpose_jax.models.unet import UNetConfig

# ---------------------------------------------------------------------------------------------------------------
# Device peaks.


@dataclasses.dataclass(frozen=True)
class Peak:
  """Dense (no sparsity) peak TFLOP/s of one device (one GPU, one TPU chip)."""

  name: str
  bf16: float
  fp32: float | None  # what XLA's default precision runs float32 matmuls at (see PEAKS); None: not published
  hbm_gb: float | None = None  # memory per device, 1e9 bytes (the vendors' "GB"); None: not tabled
  hbm_gbps: float | None = None  # memory bandwidth per device, 1e9 bytes/s

  def per_core(self, cores: int) -> Peak:
    """The share of one of `cores` devices on a chip (TPU v4 topologies give one device per TensorCore)."""
    if cores == 1:
      return self
    split = lambda v: None if v is None else v / cores
    return dataclasses.replace(self, name=f"{self.name} (1 of {cores} cores)", bf16=self.bf16 / cores,
                               fp32=split(self.fp32), hbm_gb=split(self.hbm_gb), hbm_gbps=split(self.hbm_gbps))


# Sources (vendor datasheets, dense figures; the sparse ones are 2x):
# - A100: NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312, TF32 156 (SXM and PCIe alike).
# - H100 SXM: NVIDIA H100 datasheet (2023): BF16 989.4, TF32 494.7. H100 PCIe: BF16 756, TF32 378.
#   H100 NVL: BF16 835 (per GPU), TF32 418.
# - H200: NVIDIA H200 datasheet (2024), same compute as H100 SXM: BF16 989.4, TF32 494.7.
# - TPU v4: cloud.google.com/tpu/docs/v4: 275 BF16 per chip, 32 GiB HBM2 at 1200 GB/s. v5e: /docs/v5e: 197,
#   16 GB HBM2 at 819 GB/s. v5p: /docs/v5p: 459, 95 GB HBM2e at 2765 GB/s. v6e (Trillium): /docs/v6e: 918,
#   32 GB at 1638 GB/s. H100 SXM / H200: 80 GB HBM3 at 3350 GB/s / 141 GB HBM3e at 4800 GB/s (datasheets).
# On GPUs XLA runs float32 dots and convolutions on TF32 tensor cores at the default precision, so the
# "fp32" column is the TF32 peak; TPUs run float32 matmuls as several bf16 passes and publish no float32 peak.
PEAKS: tuple[tuple[tuple[str, ...], Peak], ...] = (
    # (lower-case substrings all present in device_kind, peak); first match wins, so the specific ones first.
    (("h100", "pcie"), Peak("H100 PCIe", 756.0, 378.0)),
    (("h100", "nvl"), Peak("H100 NVL", 835.0, 418.0)),
    (("h100",), Peak("H100 SXM", 989.4, 494.7, 80.0, 3350.0)),
    (("h200",), Peak("H200", 989.4, 494.7, 141.0, 4800.0)),
    (("a100",), Peak("A100", 312.0, 156.0)),
    (("v5 lite",), Peak("TPU v5e", 197.0, None, 16.0, 819.0)),
    (("v5e",), Peak("TPU v5e", 197.0, None, 16.0, 819.0)),
    (("v6 lite",), Peak("TPU v6e", 918.0, None, 32.0, 1638.0)),
    (("v6e",), Peak("TPU v6e", 918.0, None, 32.0, 1638.0)),
    (("v5p",), Peak("TPU v5p", 459.0, None, 95.0, 2765.0)),
    (("tpu v5",), Peak("TPU v5p", 459.0, None, 95.0, 2765.0)),  # v5p reports device_kind "TPU v5"
    (("tpu v4",), Peak("TPU v4", 275.0, None, 32 * 2**30 / 1e9, 1200.0)),
)


def device_peak(device_kind: str) -> Peak | None:
  """The `PEAKS` entry for a `jax.Device.device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...), or None."""
  kind = device_kind.lower()
  for needles, peak in PEAKS:
    if all(n in kind for n in needles):
      return peak
  return None


def peak_tflops(device_kind: str, dtype: Any = "bfloat16") -> float | None:
  """Dense peak TFLOP/s of one device for compute `dtype` ("bfloat16"/"float32"); None if unknown (CPU)."""
  peak = device_peak(device_kind)
  if peak is None:
    return None
  return peak.bf16 if str(dtype) in ("bfloat16", "bf16", "float16") else peak.fp32


# ---------------------------------------------------------------------------------------------------------------
# XLA's counts.


def _flops_of(cost: Any) -> float | None:
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs XLA's cost analysis gives a compiled program (per device under SPMD; loop bodies counted once)."""
  try:
    return _flops_of(compiled.cost_analysis())
  except (AttributeError, NotImplementedError, RuntimeError):  # backends without a cost analysis: no count, no crash
    return None


def lowered_flops(lowered: Any) -> float | None:
  """FLOPs of a lowered, not yet compiled, program (global, before partitioning and fusion)."""
  try:
    return _flops_of(lowered.cost_analysis())
  except (AttributeError, NotImplementedError, RuntimeError):
    return None


@dataclasses.dataclass(frozen=True)
class KernelCost:
  """One Mosaic (Pallas TPU) kernel call of a compiled program, which XLA's cost analysis does not count."""

  name: str  # the kernel's name, e.g. "splash_mha_fwd_residuals"
  flops: float  # matmul FLOPs of the kernel as called (padded shapes), x the trip counts of enclosing loops
  bytes: float  # operand + result bytes, x the same trip counts
  calls: int  # executions per program run (1 outside loops)
  mxu_flops: float = 0.0  # `flops` with the head dim rounded up to `MXU_LANES`: what the matrix units pass over

  def roofline_seconds(self, peak: Peak) -> float:
    """max(MXU FLOPs / bf16 peak, bytes / HBM bandwidth): a lower bound on the kernel's time, not a measurement."""
    return max(self.mxu_flops / (peak.bf16 * 1e12), self.bytes / ((peak.hbm_gbps or float("inf")) * 1e9))


# Matmul FLOPs of splash attention's kernels in units of `2 Nq Nk D` per head: the forward runs QK^T and PV; the
# dq kernel recomputes QK^T and runs dO V^T and dS K; the dkv kernel recomputes QK^T and runs dO V^T, P^T dO
# and dS^T Q (jax.experimental.pallas.ops.tpu.splash_attention, separate dq/dkv kernels, its default).
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
# A head dim below the matrix unit's width still takes whole passes: QK^T contracts over D (40 of a 128-deep
# systolic array's rows busy) and PV produces D columns. The roofline counts D rounded up to this.
MXU_LANES = 128
_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
_SHAPE = re.compile(r"\b(bf16|f16|f32|s32|u32|s8|u8|pred)\[([0-9,]*)\]")


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(text)]


def _nbytes(shapes: list[tuple[str, tuple[int, ...]]]) -> float:
  return float(sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in shapes))


def _computations(hlo: str) -> dict[str, list[str]]:
  """The instruction lines of each computation of an HLO module's text, by computation name."""
  bodies: dict[str, list[str]] = {}
  current = None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(1)
      bodies[current] = []
    elif current is not None:
      bodies[current].append(line)
  return bodies


_CONSTANT = re.compile(r"= [su](?:32|64)\[\][^ ]* constant\((-?\d+)\)")
_DEFINES = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")


def _definitions(lines: list[str]) -> dict[str, str]:
  """Instruction name -> its line, for one computation's lines."""
  return {m.group(1): x for x in lines for m in [_DEFINES.match(x)] if m}


def _operands(line: str) -> list[str]:
  """The instruction names a `tuple(...)`/`add(...)`/`copy(...)` line takes, in order."""
  args = re.search(r" (?:tuple|add|copy)\((.*?)\)(?:,|$)", line)
  return re.findall(r"%([\w.\-]+)", re.sub(r"/\*.*?\*/", "", args.group(1))) if args else []


def _constant(defs: dict[str, str], name: str, depth: int = 0) -> int | None:
  """The integer value of `%name` (`_definitions` of its computation) when it is a scalar constant (or a copy of
  one)."""
  line = defs.get(name)
  if line is None or depth > 8:
    return None
  value = _CONSTANT.search(line)
  if value:
    return int(value.group(1))
  if " copy(" in line:
    ops = _operands(line)
    return _constant(defs, ops[0], depth + 1) if len(ops) == 1 else None
  return None


def _while_trips(line: str, bodies: dict[str, list[str]], caller: dict[str, str] | None = None) -> int | None:
  """A `while` instruction's trip count: XLA's `known_trip_count` when it printed one, else read from its
  condition when that is `counter < constant` (lax.scan / fori_loop, e.g. gradient accumulation, which libtpu
  prints without a count, and the compiler's own windowed all-gather matmul loops, whose counter is unsigned);
  None when neither says.

  The counter's start is read from the loop's initial tuple in `caller` (`_definitions` of the computation holding
  `line`) and its step from the body's `counter + constant`: the bidirectional windowed matmul loops count 0, 2,
  4, 6, so `counter < 8` is 4 trips there, not 8. Where neither can be read: from 0 by 1.
  """
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", line)
  lines = bodies.get(cond.group(1), []) if cond else []
  constants = [int(m.group(1)) for c in lines for m in [_CONSTANT.search(c)] if m]
  compares = [c for c in lines if " compare(" in c]
  if not (len(constants) == 1 and len(compares) == 1 and "direction=LT" in compares[0]):
    return None
  bound, start, step = constants[0], 0, 1
  index = [int(m.group(1)) for c in lines for m in [re.search(r"get-tuple-element\(.*index=(\d+)", c)] if m]
  if len(index) == 1:
    counter = index[0]
    init = re.search(r" while\(%([\w.\-]+)\)", line)
    tuple_line = caller.get(init.group(1)) if init and caller else None
    ops = _operands(tuple_line) if tuple_line and " tuple(" in tuple_line else []
    if counter < len(ops):
      start = _constant(caller, ops[counter]) or 0
    body_name = re.search(r"body=%?([\w.\-]+)", line)
    body_lines = bodies.get(body_name.group(1), []) if body_name else []
    body = _definitions(body_lines)
    root = next((x for x in body_lines if x.lstrip().startswith("ROOT ") and " tuple(" in x), None)
    ops = _operands(root) if root else []
    update = body.get(ops[counter]) if counter < len(ops) else None
    if update and " add(" in update:
      steps = [v for v in (_constant(body, op) for op in _operands(update)) if v is not None]
      step = steps[0] if len(steps) == 1 and steps[0] > 0 else 1
  return max(0, -(-(bound - start) // step))


def _whiles(bodies: dict[str, list[str]]) -> Iterator[tuple[str, int | None]]:
  """(line, `_while_trips`) of every `while` instruction in `bodies` (`_computations` of a compiled module)."""
  for lines in bodies.values():
    defs = None  # built once per computation that holds a loop: the entry of a big program has ~10^5 lines
    for line in lines:
      if " while(" in line:
        defs = _definitions(lines) if defs is None else defs
        yield line, _while_trips(line, bodies, defs)


def _trip_counts(bodies: dict[str, list[str]]) -> dict[str, int]:
  """Executions per program run of each computation (`_computations` of a compiled HLO module): the product of
  enclosing `while`s' trip counts, `_while_trips`; 1 where neither XLA nor the condition says."""
  trips = {line: n or 1 for line, n in _whiles(bodies)}
  callers: dict[str, list[tuple[str, int]]] = {}
  for name, lines in bodies.items():
    for line in lines:
      for ref in re.findall(r"(?:body|condition|calls|to_apply|branch_computations)=\{?%([\w.\-]+)", line):
        callers.setdefault(ref, []).append((name, trips.get(line, 1) if "body=%" + ref in line else 1))
  memo: dict[str, int] = {}

  def count(name: str, depth: int = 0) -> int:
    if name not in memo:
      up = callers.get(name)
      memo[name] = 1 if not up or depth > 64 else max(count(c, depth + 1) * t for c, t in up)
    return memo[name]

  return {name: count(name) for name in bodies}


def while_loops(hlo: str) -> list[tuple[str, int | None]]:
  """Every `while` of a compiled HLO module's text: (its body computation, its known trip count or None).

  XLA's `cost_analysis()` counts a loop body once, so a program with loops (gradient accumulation, the sampler's
  DDIM steps, or loops the compiler made itself, e.g. windowed all-gather matmuls) has more FLOPs and time than it
  reports.
  """
  return [(body.group(1) if (body := re.search(r"body=%?([\w.\-]+)", line)) else "?", trips)
          for line, trips in _whiles(_computations(hlo))]


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (?:bf16|f16|f32|s32|u32|s8|u8|pred)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class HloFlops:
  """Matrix-unit FLOPs of a compiled program read from its text: `once` counts every computation once (as XLA's
  `cost_analysis()` does), `executed` multiplies each by the trip counts of the loops around it."""

  once: float
  executed: float


@functools.lru_cache(maxsize=4096)
def _window_positions(size: int, out: int, k: int, stride: int, pad_lo: int, dilate_lhs: int,
                      dilate_rhs: int) -> int:
  """Multiply-adds along one spatial dimension that touch a real input element: (output, window) position pairs
  whose input position is inside the input and not a hole of its dilation (XLA's HloCostAnalysis counts the
  same, so padding and transposed-convolution holes are not work)."""
  o = np.arange(out)[:, None] * stride + np.arange(k)[None, :] * dilate_rhs - pad_lo  # [out, k] dilated input index
  return int(np.count_nonzero((o >= 0) & (o <= (size - 1) * dilate_lhs) & (o % dilate_lhs == 0)))


def _conv_flops(line: str, shapes: dict[str, tuple[int, ...]]) -> float | None:
  """2 x the multiply-adds of one `convolution` instruction line of compiled HLO (None if it cannot be read)."""
  out = _INSTRUCTION.match(line)
  operands = re.search(r" convolution\(%([\w.\-]+), %([\w.\-]+)\)", line)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
  if out is None or operands is None or labels is None or not {operands.group(1), operands.group(2)} <= set(shapes):
    return None
  lhs, rhs = shapes[operands.group(1)], shapes[operands.group(2)]
  result = tuple(int(d) for d in out.group(2).split(",") if d)
  lhs_l, rhs_l, out_l = labels.groups()
  spatial = sorted(c for c in out_l if c.isdigit())
  attrs = dict(re.findall(r"(size|stride|pad|lhs_dilate|rhs_dilate)=([0-9_x\-]+)", line.split("window={", 1)[1]
                          .split("}", 1)[0])) if "window={" in line else {}
  per_dim = lambda key, default: [int(v) for v in attrs[key].split("x")] if key in attrs else [default] * len(spatial)
  stride, dil_l, dil_r = per_dim("stride", 1), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
  pads = [int(p.split("_")[0]) for p in attrs["pad"].split("x")] if "pad" in attrs else [0] * len(spatial)
  positions = 1
  for i, d in enumerate(spatial):
    positions *= _window_positions(lhs[lhs_l.index(d)], result[out_l.index(d)], rhs[rhs_l.index(d)], stride[i],
                                   pads[i], dil_l[i], dil_r[i])
  rows = result[out_l.index("b")] * result[out_l.index("f")]  # output batch x output features
  return 2.0 * rows * rhs[rhs_l.index("i")] * positions


def convolution_flops(hlo: str) -> HloFlops:
  """The FLOPs of every `convolution` in a compiled TPU program's text (the TPU compiler turns every dot into one),
  counted as XLA's cost analysis does (multiply-adds on real input elements: padding and dilation holes skipped),
  with and without loop trip counts. Elementwise and reduction FLOPs are not counted.
  """
  shapes = {m.group(1): tuple(int(d) for d in m.group(2).split(",") if d)
            for line in hlo.splitlines() for m in [_INSTRUCTION.match(line)] if m}
  bodies = _computations(hlo)
  trips = _trip_counts(bodies)
  once = executed = 0.0
  for name, lines in bodies.items():
    for line in lines:
      if " convolution(" in line and (f := _conv_flops(line, shapes)) is not None:
        once += f
        executed += f * trips.get(name, 1)
  return HloFlops(once=once, executed=executed)


def mosaic_kernel_costs(hlo: str) -> list[KernelCost]:
  """The Mosaic kernels (`tpu_custom_call`) of a compiled TPU program's text (`compiled.as_text()`), costed.

  FLOPs are known for splash attention's kernels (`SPLASH_MATMULS` x 2 Nq Nk D per head, from the q and k
  operand shapes `[.., H, N, D]`, padded as called; `mxu_flops` with D rounded up to `MXU_LANES`); other kernels
  get their bytes and 0 FLOPs.
  """
  bodies = _computations(hlo)
  trips = _trip_counts(bodies)
  out = []
  for current, line in ((c, line) for c, lines in bodies.items() for line in lines):
    if 'custom_call_target="tpu_custom_call"' not in line:
      continue
    name = re.match(r"\s*%?([A-Za-z_]+)", line).group(1).rstrip("_")
    results = _shapes(line.split(" custom-call(")[0].split("=", 1)[1])
    constraints = line.split("operand_layout_constraints={", 1)[1].split("}, frontend_attributes", 1)[0] \
        if "operand_layout_constraints={" in line else ""
    operands = _shapes(constraints)
    arrays = [dims for dt, dims in operands if dt in ("bf16", "f16", "f32") and len(dims) >= 3]
    flops = mxu = 0.0
    kind = next((k for k in ("dkv", "dq", "fwd") if f"_{k}" in name), None)
    if name.startswith("splash") and kind and len(arrays) >= 2:
      q, k = arrays[0], arrays[1]
      flops = SPLASH_MATMULS[kind] * 2.0 * math.prod(q) * k[-2]
      mxu = flops * (-(-q[-1] // MXU_LANES) * MXU_LANES) / q[-1]
    n = trips.get(current, 1)
    out.append(KernelCost(name, flops * n, (_nbytes(results) + _nbytes(operands)) * n, n, mxu * n))
  return out


def loop_free_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a training config whose step has no loops XLA would under-count: `xla` attention, no
  gradient accumulation (the global batch in one pass: the same FLOPs)."""
  flat = config.copy_and_resolve_references()
  flat.attention_backend, flat.grad_accum_steps = "xla", 1
  return flat


# ---------------------------------------------------------------------------------------------------------------
# Analytic counts (per example).


@dataclasses.dataclass
class Flops:
  """FLOPs by kind: `conv` (convolutions), `dense` (projections, feed-forward), `attention` (QK^T and PV).

  `attention_calls` splits `attention` by call, `(queries, keys, is_self_attention, FLOPs)`, for what depends on
  the shapes: which calls a fused kernel runs (`train_step_flops(splash=...)`), which have key gradients.
  """

  conv: float = 0.0
  dense: float = 0.0
  attention: float = 0.0
  attention_calls: tuple[tuple[int, int, bool, float], ...] = ()

  @property
  def total(self) -> float:
    return self.conv + self.dense + self.attention

  def attention_where(self, keep: Callable[[int, int, bool], bool]) -> float:
    """Attention FLOPs of the calls `keep(queries, keys, is_self_attention)` selects."""
    return sum(f for nq, nk, is_self, f in self.attention_calls if keep(nq, nk, is_self))

  def __add__(self, other: Flops) -> Flops:
    return Flops(self.conv + other.conv, self.dense + other.dense, self.attention + other.attention,
                 self.attention_calls + other.attention_calls)

  def __sub__(self, other: Flops) -> Flops:
    return self + other * -1.0

  def __mul__(self, k: float) -> Flops:
    return Flops(self.conv * k, self.dense * k, self.attention * k,
                 tuple((nq, nk, s, f * k) for nq, nk, s, f in self.attention_calls))

  __rmul__ = __mul__


def _conv(h: int, w: int, k: int, cin: int, cout: int) -> Flops:
  return Flops(conv=2.0 * h * w * k * k * cin * cout)  # (h, w): the OUTPUT size


def _dense(n: int, din: int, dout: int) -> Flops:
  return Flops(dense=2.0 * n * din * dout)


def _attention(nq: int, nk: int, inner: int, is_self: bool) -> Flops:
  f = 4.0 * nq * nk * inner  # QK^T and PV, each 2 * nq * nk * inner
  return Flops(attention=f, attention_calls=((nq, nk, is_self, f),))


def _resnet(h: int, w: int, cin: int, cout: int, temb: int | None) -> Flops:
  f = _conv(h, w, 3, cin, cout) + _conv(h, w, 3, cout, cout)
  if temb is not None:
    f += _dense(1, temb, cout)
  if cin != cout:
    f += _conv(h, w, 1, cin, cout)
  return f


def _transformer_parts(h: int, w: int, c: int, context: tuple[int, int], reference: bool) -> tuple[Flops, Flops]:
  """(proj_in + proj_out, one `BasicTransformerBlock`) of a `Transformer2DModel` at `[h, w, c]` (inner width = c
  for SD); `context` (tokens, width); reference states of the block's own size double the self-attention
  keys/values."""
  n = h * w
  ctx_len, ctx_dim = context
  kv = 2 * n if reference else n
  proj = _dense(n, c, c) * 2  # proj_in, proj_out (1x1 conv or dense: the same count)
  block = (_dense(n, c, c) * 2 + _dense(kv, c, c) * 2 + _attention(n, kv, c, True)  # attn1: q, out; k, v; QK^T PV
           + _dense(n, c, c) * 2 + _dense(ctx_len, ctx_dim, c) * 2 + _attention(n, ctx_len, c, False)  # attn2
           + _dense(n, c, 8 * c) + _dense(n, 4 * c, c))  # GEGLU: c -> 2 x 4c, then 4c -> c
  return proj, block


def _transformer(h: int, w: int, c: int, layers: int, context: tuple[int, int], reference: bool) -> Flops:
  proj, block = _transformer_parts(h, w, c, context, reference)
  return proj + block * layers


def _down(h: int) -> int:
  return (h - 1) // 2 + 1  # 3x3 stride-2 conv, padding 1 (PyTorch's output size)


def _encoder_path(cfg: UNetConfig, h: int, w: int, context: tuple[int, int],
                  reference: bool) -> tuple[Flops, list[tuple[int, int, int]], tuple[int, int, int]]:
  """Time embedding, conv_in, down blocks, mid block: (FLOPs, skips (h, w, c), mid output (h, w, c))."""
  temb = 4 * cfg.block_out_channels[0]
  c0 = cfg.block_out_channels[0]
  f = _dense(1, c0, temb) + _dense(1, temb, temb) + _conv(h, w, 3, cfg.in_channels, c0)
  skips = [(h, w, c0)]
  c = c0
  n_levels = len(cfg.block_out_channels)
  for i, kind in enumerate(cfg.down_block_types):
    out = cfg.block_out_channels[i]
    for _ in range(cfg.layers[i]):
      f += _resnet(h, w, c, out, temb)
      c = out
      if kind.startswith("CrossAttn"):
        f += _transformer(h, w, c, cfg.transformer_layers[i], context, reference)
      skips.append((h, w, c))
    if i < n_levels - 1:
      h, w = _down(h), _down(w)
      f += _conv(h, w, 3, c, c)
      skips.append((h, w, c))
  f += _resnet(h, w, c, c, temb) * 2 + _transformer(h, w, c, cfg.transformer_layers[-1], context, reference)
  return f, skips, (h, w, c)


def unet_forward_flops(cfg: UNetConfig, latent_hw: tuple[int, int], context_len: int = 77,
                       reference: bool = False, compute_output: bool = True) -> Flops:
  """One example through `UNet2DConditionModel`: `[1, h, w, in]` latents, `[1, context_len, D]` text.

  Args:
    reference: the main UNet of MagicPose (reference states of the same latent size: self-attention
      keys/values over 2 x the block's tokens).
    compute_output: False for the appearance net (no `conv_norm_out`/`conv_out`).
  """
  context = (context_len, cfg.cross_attention_dim)
  h, w = latent_hw
  temb = 4 * cfg.block_out_channels[0]
  f, skips, (h, w, c) = _encoder_path(cfg, h, w, context, reference)
  # Without the output head, whatever runs after the last reference state (the last self-attention's norm1)
  # is dead code that XLA removes: `tail` tracks it.
  tail = Flops()
  n_levels = len(cfg.block_out_channels)
  for i, kind in enumerate(cfg.up_block_types):
    level = n_levels - 1 - i
    out = cfg.block_out_channels[level]
    for _ in range(cfg.layers[level] + 1):
      _, _, cs = skips.pop()
      r = _resnet(h, w, c + cs, out, temb)
      f, tail, c = f + r, tail + r, out
      if kind.startswith("CrossAttn"):
        proj, block = _transformer_parts(h, w, c, context, reference)
        f += proj + block * cfg.transformer_layers[level]
        tail = block + proj * 0.5  # the last block after its norm1, and proj_out
    if i < n_levels - 1:
      h, w = skips[-1][:2]  # upsampled to the next skips' size
      up = _conv(h, w, 3, c, c)
      f, tail = f + up, tail + up
  if compute_output:
    return f + _conv(h, w, 3, c, cfg.out_channels)
  return f - tail


def controlnet_forward_flops(cfg: ControlNetConfig, latent_hw: tuple[int, int], context_len: int = 77) -> Flops:
  """One example through the pose net (hint encoder at `factor x` the latent size, down + mid, zero convs)."""
  unet = cfg.unet_config()
  widths = cfg.conditioning_embedding_out_channels
  f_ = cfg.downsample_factor
  h, w = latent_hw[0] * f_, latent_hw[1] * f_
  hint = _conv(h, w, 3, cfg.conditioning_channels, widths[0])
  for i in range(len(widths) - 1):
    hint += _conv(h, w, 3, widths[i], widths[i])
    h, w = _down(h), _down(w)
    hint += _conv(h, w, 3, widths[i], widths[i + 1])
  hint += _conv(h, w, 3, widths[-1], unet.block_out_channels[0])
  f, skips, (h, w, c) = _encoder_path(unet, *latent_hw, (context_len, unet.cross_attention_dim), False)
  f += hint
  for sh, sw, sc in skips:
    f += _conv(sh, sw, 1, sc, sc)
  return f + _conv(h, w, 1, c, c)


def vae_encode_flops(cfg: AnyVAEConfig, image_hw: tuple[int, int]) -> Flops:
  """One image through the VAE encoder and `quant_conv` (the training step's latents); a `PatchVAE`: its
  projection of every patch."""
  h, w = image_hw
  if isinstance(cfg, PatchVAEConfig):
    return _dense((h // cfg.patch_size) * (w // cfg.patch_size), cfg.patch_dim, cfg.latent_channels)
  ch = cfg.block_out_channels
  f = _conv(h, w, 3, cfg.in_channels, ch[0])
  c = ch[0]
  for i, out in enumerate(ch):
    for _ in range(cfg.layers_per_block):
      f += _resnet(h, w, c, out, None)
      c = out
    if i < len(ch) - 1:
      h, w = math.ceil(h / 2), math.ceil(w / 2)
      f += _conv(h, w, 3, c, c)
  f += _resnet(h, w, c, c, None) * 2 + _dense(h * w, c, c) * 4 + _attention(h * w, h * w, c, True)
  return f + _conv(h, w, 3, c, 2 * cfg.latent_channels) + _conv(h, w, 1, 2 * cfg.latent_channels,
                                                                 2 * cfg.latent_channels)


# What a remat policy recomputes in the backward pass, by kind (the rest it saves or offloads).
RECOMPUTED = {
    "none": (),
    "full": ("conv", "dense", "attention"),
    "dots_saveable": (),  # saves dot_general and conv outputs
    "dots_with_no_batch_dims_saveable": ("conv", "attention"),  # convs and batched (attention) dots recomputed
    "offload": ("conv", "attention"),  # as dots_with_no_batch_dims_saveable, offloading instead of saving
}
# Splash's backward runs dq (3 units of 2 Nq Nk D per head) and dkv (4), against the 4 of dQ, dK and dV from
# saved probabilities: it recomputes QK^T in both kernels and dO V^T in dq (`SPLASH_MATMULS`), 1.5 x its forward.
SPLASH_BACKWARD_EXTRA = (SPLASH_MATMULS["dq"] + SPLASH_MATMULS["dkv"] - 4) / SPLASH_MATMULS["fwd"]


def splash_calls(backend: str, platform: str) -> Callable[[int, int], bool]:
  """Which attention calls `(queries, keys)` run splash's kernels for `backend` on `platform` (the step's target:
  `stages.target_platform`), by the rule of `models.attention.auto_backend`."""
  if backend == "splash":
    return lambda nq, nk: True
  if backend == "auto" and platform == "tpu":
    return lambda nq, nk: tpu_auto_backend(nq, nk) == "splash"
  return lambda nq, nk: False


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Per-example FLOPs of one training step: `model` (forward + backward, no recomputation; the MFU
  numerator) and `hardware` (+ the remat policy's recomputation and the kernels' own)."""

  model: float
  hardware: float
  forward: float  # forward pass alone (VAE included)


def train_step_flops(stage: str, unet: UNetConfig, vae: AnyVAEConfig | None, latent_hw: tuple[int, int],
                     pose: ControlNetConfig | None = None, use_appearance: bool = True, context_len: int = 77,
                     remat_policy: str = "none", splash: Callable[[int, int], bool] | None = None,
                     reference_only: bool = False) -> StepFlops:
  """Analytic FLOPs per example of a `train.step.train_step` (multiply by the batch for the step).

  Backward = 2 x forward for trained nets (input and weight gradients), 1 x forward for the frozen main UNet of
  stages 1/2 (its input gradients feed the trainable nets; XLA drops the unused weight gradients), except its
  self-attention: queries, keys and values all carry gradients there (the keys and values from the appearance
  net), so 2 x (dQ, dK, dV; cross-attention's keys come from the frozen text: 1 x). The VAE encodes the target
  (and the reference) without gradients; `vae=None`: cached latents, no VAE. `reference_only` (stage "base";
  `base_reference_share` > 0): the trained UNet also runs on the reference and is trained through both roles, so
  both passes have the full 2x backward (`use_appearance` is not read for stage "base").

  `splash(queries, keys)`: which attention calls run splash's kernels (`splash_calls`; None: none). Their backward
  adds `SPLASH_BACKWARD_EXTRA` x their forward, and a remat policy that saves dots recomputes their forward too
  (a custom call is not a dot). Both count in `hardware` only: they are the kernel's cost, not the model's.
  """
  if remat_policy not in RECOMPUTED:
    raise ValueError(f"remat_policy {remat_policy!r} not in {tuple(RECOMPUTED)}")
  kinds = RECOMPUTED[remat_policy]
  splash = splash or (lambda nq, nk: False)
  fused = lambda f: f.attention_where(lambda nq, nk, _: splash(nq, nk))
  rerun = remat_policy != "none" and "attention" not in kinds  # remat that saves dots reruns the kernels

  def kernel_and_recompute(f: Flops) -> float:
    return sum(getattr(f, k) for k in kinds) + fused(f) * (SPLASH_BACKWARD_EXTRA + rerun)

  image_hw = None if vae is None else (latent_hw[0] * vae.downsample_factor, latent_hw[1] * vae.downsample_factor)
  enc = 0.0 if vae is None else vae_encode_flops(vae, image_hw).total
  if stage == "base":
    if not reference_only:
      f = unet_forward_flops(unet, latent_hw, context_len)
      return StepFlops(model=3 * f.total + enc, hardware=3 * f.total + kernel_and_recompute(f) + enc,
                       forward=f.total + enc)
    use_appearance = True
  appearance = unet_forward_flops(unet, latent_hw, context_len, compute_output=False) if use_appearance else None
  main = unet_forward_flops(unet, latent_hw, context_len, reference=use_appearance)
  trained = [appearance] if appearance is not None else []
  if pose is not None:
    trained.append(controlnet_forward_flops(pose, latent_hw, context_len))
  encodes = enc * (2 if use_appearance else 1)
  forward = main.total + sum(f.total for f in trained) + encodes
  # A frozen main UNet's backward is the input gradient only (1x; 2x in its self-attention, whose keys and values
  # come from the reference too); a trained one (stage "base" reference-only) has the weight gradient as well.
  main_backward = 2 * main.total if stage == "base" else main.total + main.attention_where(
      lambda nq, nk, is_self: is_self)
  model = main.total + main_backward + sum(3 * f.total for f in trained) + encodes
  hardware = model + kernel_and_recompute(main) + sum(kernel_and_recompute(f) for f in trained)
  return StepFlops(model=model, hardware=hardware, forward=forward)


def config_step_flops(config: ml_collections.ConfigDict, nets: Any, latent_hw: tuple[int, int] | None = None,
                      latents: bool = False) -> StepFlops:
  """`train_step_flops` per example for a training config and its `stages.Networks` (whose target platform
  decides where `auto` attention runs splash).

  `latent_hw` defaults to `config.data.image_size` over the VAE's factor; `latents`: batches of cached VAE
  moments (no VAE in the step).
  """
  mp = nets.model.config
  if latent_hw is None:
    size = config.data.image_size // nets.vae.config.downsample_factor
    latent_hw = (size, size)
  return train_step_flops(nets.stage, mp.unet, None if latents else nets.vae.config, tuple(latent_hw),
                          pose=mp.pose, use_appearance=mp.use_appearance,
                          reference_only=nets.stage == "base" and config.base_reference_share > 0,
                          remat_policy=config.remat_policy,
                          splash=splash_calls(mp.unet.attention_backend, mp.unet.target_platform))


def mfu(flops_per_step: float, seconds_per_step: float, devices: int, peak: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s per device over the device's peak (TFLOP/s); None without a peak."""
  if peak is None or seconds_per_step <= 0:
    return None
  return flops_per_step / seconds_per_step / devices / (peak * 1e12)


@dataclasses.dataclass(frozen=True)
class StepThroughput:
  """FLOPs of the compiled step, counted once after compiling, turned into rates for every log line.

  Attributes:
    compiled_per_device: XLA's count for one device, x `grad_accum_steps` (the scanned micro-batch body is
      counted once); None where the backend has no cost analysis.
    model_per_step: the analytic model FLOPs of one step over the global batch (no recomputation).
    devices: devices the step runs on.
    peak: the device's dense peak TFLOP/s for the compute dtype; None (no MFU) on CPUs and unknown devices.
  """

  compiled_per_device: float | None
  model_per_step: float
  devices: int
  peak: float | None

  def rates(self, seconds_per_step: float) -> dict[str, float]:
    """`tflops_per_s` (XLA-counted, per device), `model_tflops_per_s` (analytic, per device) and `mfu`."""
    dt = max(seconds_per_step, 1e-12)
    out = {"model_tflops_per_s": self.model_per_step / self.devices / dt / 1e12}
    if self.compiled_per_device is not None:
      out["tflops_per_s"] = self.compiled_per_device / dt / 1e12
    utilisation = mfu(self.model_per_step, dt, self.devices, self.peak)
    if utilisation is not None:
      out["mfu"] = utilisation
    return out


def step_throughput(config: ml_collections.ConfigDict, nets: Any, compiled: Any, devices: list[Any],
                    batch: Mapping[str, Any]) -> StepThroughput:
  """The `StepThroughput` of a compiled `train_step` for `config` on `devices`, for global batches like `batch`
  (`[B, H, W, 3]` images, or `target_latent` `[B, h, w, 2c]` cached VAE moments)."""
  counted = compiled_flops(compiled)
  if counted is not None:
    counted *= config.grad_accum_steps
  latents = "target_latent" in batch
  if latents:
    latent_hw = tuple(batch["target_latent"].shape[1:3])
  else:
    f = nets.vae.config.downsample_factor
    latent_hw = (batch["target"].shape[1] // f, batch["target"].shape[2] // f)
  model = config_step_flops(config, nets, latent_hw, latents).model * config.global_batch_size
  return StepThroughput(counted, model, len(devices), peak_tflops(devices[0].device_kind, config.dtype))
