"""One key table per model family, used in both directions between PyTorch and Flax.

A table lists, for every Flax param leaf, the PyTorch state-dict key and the
layout change between them. It is built once from the abstract Flax param tree
(`jax.eval_shape` of `init`), so the Flax model is the single source of the
names; both `to_flax` and `to_torch` read the same table, which makes the two
directions inverse by construction (transposes only: round trips are bit-exact).

Layouts: conv kernels Flax HWIO <-> PyTorch OIHW; dense kernels `[in, out]` <->
`[out, in]`; norm `scale` <-> `weight`; biases unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

FlaxPath = tuple[str, ...]

_INDEX = re.compile(r"^(.*)_(\d+)$")


class ConversionError(ValueError):
  """Missing, unexpected, mis-shaped or non-float tensors; the message lists every one of them."""


def not_float(x: Any) -> bool:
  """True for bool, integer and complex tensors: every param of our models is a float (bfloat16 included, whose
  numpy kind is "V"), and casting an integer tensor to float would convert quantised or corrupt data silently."""
  return np.dtype(x.dtype).kind in "biuc"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: its Flax path and shape, its PyTorch key, and the layout between them."""

  flax_path: FlaxPath
  torch_key: str
  flax_shape: tuple[int, ...]
  # "conv" (HWIO/OIHW), "dense" ([in,out]/[out,in]), "dense_conv" (a Flax dense kernel stored as
  # a PyTorch 1x1 conv, [in,out]/[out,in,1,1], as in LDM's VAE attention) or "same".
  layout: str

  @property
  def torch_shape(self) -> tuple[int, ...]:
    s = self.flax_shape
    if self.layout == "conv":
      return (s[3], s[2], s[0], s[1])
    if self.layout == "dense":
      return (s[1], s[0])
    if self.layout == "dense_conv":
      return (s[1], s[0], 1, 1)
    return s


def torch_name(path: FlaxPath, keep: Iterable[str] = ()) -> tuple[str, str]:
  """Maps a Flax param path to (PyTorch key, layout).

  `name_N` becomes `name.N` (a list index) unless `name_N` is in `keep` (a real
  attribute name such as diffusers' `time_embedding.linear_1`).
  """
  keep = set(keep)
  parts = []
  for p in path[:-1]:
    m = _INDEX.match(p)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m and p not in keep else p)
  leaf = path[-1]
  if leaf == "kernel":
    return ".".join(parts + ["weight"]), "kernel"
  if leaf in ("scale", "embedding"):
    return ".".join(parts + ["weight"]), "same"
  return ".".join(parts + [leaf]), "same"


class KeyTable:
  """The bijection between a Flax param tree and a PyTorch state dict."""

  def __init__(self, entries: Iterable[Entry], name: str = "model"):
    self.name = name
    self.entries = tuple(entries)
    self.by_flax = {e.flax_path: e for e in self.entries}
    self.by_torch = {e.torch_key: e for e in self.entries}
    if len(self.by_torch) != len(self.entries):
      counts = collections.Counter(e.torch_key for e in self.entries)
      dup = sorted(k for k, n in counts.items() if n > 1)
      raise ValueError(f"{name}: key table is not one-to-one (duplicate keys {dup})")

  @classmethod
  def from_params(cls, abstract_params: Mapping[str, Any], keep: Iterable[str] = (),
                  rename: Callable[[str], str] | None = None,
                  dense_as_conv: Callable[[str], bool] | None = None, name: str = "model") -> KeyTable:
    """Builds the table from a (possibly abstract) Flax param tree.

    Args:
      abstract_params: nested dict of arrays or `ShapeDtypeStruct`s.
      keep: module names with a `_N` suffix that are attribute names, not indices.
      rename: maps the generic (diffusers-style) key to the target layout's key, e.g. LDM names.
      dense_as_conv: true for (renamed) keys whose dense kernel the target stores as a 1x1 conv.
      name: used in error messages.
    """
    entries = []
    for path, leaf in _flatten(abstract_params):
      key, layout = torch_name(path, keep)
      if rename is not None:
        key = rename(key)
      shape = tuple(leaf.shape)
      if layout == "kernel":
        layout = {4: "conv", 2: "dense"}.get(len(shape))
        if layout is None:
          raise ValueError(f"{name}: kernel {'/'.join(path)} has unsupported rank {len(shape)}")
        if layout == "dense" and dense_as_conv is not None and dense_as_conv(key):
          layout = "dense_conv"
      entries.append(Entry(path, key, shape, layout))
    return cls(entries, name)

  def with_prefix(self, prefix: str, name: str | None = None) -> KeyTable:
    """The same table with `prefix` before every PyTorch key (e.g. a component inside a single file)."""
    return KeyTable([dataclasses.replace(e, torch_key=prefix + e.torch_key) for e in self.entries],
                    name or f"{self.name} ({prefix}*)")

  def to_flax(self, state_dict: Mapping[str, Any], dtype: Any = None, source: str = "") -> dict:
    """PyTorch-layout arrays (numpy) keyed by PyTorch names -> nested Flax params.

    Raises:
      ConversionError: naming every missing, unexpected and mis-shaped tensor.
    """
    where = f" in {source}" if source else ""
    missing = [k for k in self.by_torch if k not in state_dict]
    unexpected = [k for k in state_dict if k not in self.by_torch]
    bad_shape = [f"{k}: got {tuple(v.shape)}, expected {self.by_torch[k].torch_shape}"
                 for k, v in state_dict.items()
                 if k in self.by_torch and tuple(v.shape) != self.by_torch[k].torch_shape]
    bad_dtype = [f"{k}: got {np.dtype(v.dtype)}, expected a float dtype" for k, v in state_dict.items()
                 if k in self.by_torch and not_float(v)]
    raise_mismatch(f"{self.name}: state dict{where} does not match the model", missing, unexpected, bad_shape,
                   bad_dtype)
    params: dict = {}
    for e in self.entries:
      x = _to_flax_layout(np.asarray(state_dict[e.torch_key]), e.layout)
      if dtype is not None:
        x = x.astype(dtype)
      _set(params, e.flax_path, x)
    return params

  def to_torch(self, params: Mapping[str, Any], dtype: Any = None) -> dict[str, np.ndarray]:
    """Nested Flax params -> PyTorch-layout numpy arrays keyed by PyTorch names (strict)."""
    flat = dict(_flatten(params))
    missing = ["/".join(p) for p in self.by_flax if p not in flat]
    unexpected = ["/".join(p) for p in flat if p not in self.by_flax]
    bad_shape = [f"{'/'.join(p)}: got {tuple(v.shape)}, expected {self.by_flax[p].flax_shape}"
                 for p, v in flat.items() if p in self.by_flax and tuple(v.shape) != self.by_flax[p].flax_shape]
    bad_dtype = [f"{'/'.join(p)}: got {np.dtype(v.dtype)}, expected a float dtype" for p, v in flat.items()
                 if p in self.by_flax and not_float(v)]
    raise_mismatch(f"{self.name}: params do not match the model", missing, unexpected, bad_shape, bad_dtype)
    out = {}
    for e in self.entries:
      x = _to_torch_layout(np.asarray(flat[e.flax_path]), e.layout)
      out[e.torch_key] = x.astype(dtype) if dtype is not None else x
    return out


def _to_flax_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  if layout == "dense":
    return np.ascontiguousarray(x.T)  # [out, in] -> [in, out]
  if layout == "dense_conv":
    return np.ascontiguousarray(x[:, :, 0, 0].T)  # [out, in, 1, 1] -> [in, out]
  return x


def _to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # HWIO -> OIHW
  if layout == "dense":
    return np.ascontiguousarray(x.T)
  if layout == "dense_conv":
    return np.ascontiguousarray(x.T[:, :, None, None])  # [in, out] -> [out, in, 1, 1]
  return x


def raise_mismatch(title: str, missing: list[str], unexpected: list[str], bad_shape: list[str],
                   bad_dtype: list[str] = (), hint: str = "") -> None:
  """Raises `ConversionError` listing every problem (nothing when there is none); `hint` ends the message."""
  if not (missing or unexpected or bad_shape or bad_dtype):
    return
  lines = [title + ":"]
  for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape),
                       ("wrong dtype", bad_dtype)):
    if items:
      lines.append(f"  {label} ({len(items)}):")
      lines += [f"    {i}" for i in items]
  if hint:
    lines.append(hint)
  raise ConversionError("\n".join(lines))


def _flatten(tree: Mapping[str, Any], prefix: FlaxPath = ()) -> Iterable[tuple[FlaxPath, Any]]:
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree: dict, path: FlaxPath, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value
