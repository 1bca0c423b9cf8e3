"""LPIPS v0.1 (Zhang et al. 2018, richzhang/PerceptualSimilarity) in JAX: AlexNet or VGG16 features, unit-normalised
per pixel over channels, squared differences weighted by the learned linear layers, averaged over space, summed
over the five layers. Lower is closer; 0 = identical.

Weights are local files (no downloads): the torchvision ImageNet backbone and LPIPS' linear layers, as torch
pickles or safetensors with the same keys. `random_lpips` builds a narrow randomly initialised network with the
same code path, so the plumbing is testable without them (its numbers mean nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.convert.tensor_files import read_state_dict
from magicpose_jax.eval.image_metrics import check_pair
from magicpose_jax.eval.layers import (
  Params,
  batch_lengths,
  check_kernel,
  conv,
  max_pool,
  padded_batches,
  random_conv,
  torch_conv,
)

# Feature stacks as torchvision's `features` (conv index in the state dict, out channels, kernel, stride,
# padding; every conv is followed by a ReLU), "pool" (size, stride) and "tap" (an LPIPS layer: the ReLU output).
_ARCHITECTURES = {
  "alex": (("conv", 0, 64, 11, 4, 2), "tap", ("pool", 3, 2), ("conv", 3, 192, 5, 1, 2), "tap", ("pool", 3, 2),
           ("conv", 6, 384, 3, 1, 1), "tap", ("conv", 8, 256, 3, 1, 1), "tap", ("conv", 10, 256, 3, 1, 1), "tap"),
  "vgg": (("conv", 0, 64, 3, 1, 1), ("conv", 2, 64, 3, 1, 1), "tap", ("pool", 2, 2),
          ("conv", 5, 128, 3, 1, 1), ("conv", 7, 128, 3, 1, 1), "tap", ("pool", 2, 2),
          ("conv", 10, 256, 3, 1, 1), ("conv", 12, 256, 3, 1, 1), ("conv", 14, 256, 3, 1, 1), "tap", ("pool", 2, 2),
          ("conv", 17, 512, 3, 1, 1), ("conv", 19, 512, 3, 1, 1), ("conv", 21, 512, 3, 1, 1), "tap", ("pool", 2, 2),
          ("conv", 24, 512, 3, 1, 1), ("conv", 26, 512, 3, 1, 1), ("conv", 28, 512, 3, 1, 1), "tap"),
}
# The files `find_lpips_weights` looks for, and where they come from.
WEIGHT_FILES = {
  "alex": (("alexnet-owt-7be5be79", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
           ("alex", "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth")),
  "vgg": (("vgg16-397923af", "https://download.pytorch.org/models/vgg16-397923af.pth"),
          ("vgg", "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth")),
}
_SUFFIXES = (".pth", ".pt", ".safetensors")
# LPIPS v0.1's ScalingLayer: inputs in [-1, 1] -> ImageNet-normalised.
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_EPS = 1e-10


class MissingWeights(FileNotFoundError):
  """A metric's weight files are not there; the message says which files and where to get them."""


@dataclasses.dataclass(frozen=True)
class Lpips:
  """An LPIPS network: `net` ("alex" | "vgg"), `params` ("features.N" convs and "linK" weights), `source` (the files
  it was read from, or "random ...")."""

  net: str
  params: Params
  source: str


def _convs(net: str, width_divisor: int = 1) -> list[tuple[int, int, int, int, int, int]]:
  """[(index, cin, cout, kernel, stride, padding)] of the feature stack."""
  if net not in _ARCHITECTURES:
    raise ValueError(f"LPIPS net: expected one of {sorted(_ARCHITECTURES)}, got {net!r}")
  out, cin = [], 3
  for op in _ARCHITECTURES[net]:
    if op[0] == "conv":
      _, index, cout, k, stride, pad = op
      cout = max(1, cout // width_divisor)
      out.append((index, cin, cout, k, stride, pad))
      cin = cout
  return out


def _tap_channels(net: str, width_divisor: int = 1) -> list[int]:
  channels, last = [], 3
  by_index = {c[0]: c[2] for c in _convs(net, width_divisor)}
  for op in _ARCHITECTURES[net]:
    if op == "tap":
      channels.append(last)
    elif op[0] == "conv":
      last = by_index[op[1]]
  return channels


def find_lpips_weights(weights_dir: str | None, net: str = "alex") -> tuple[str, str]:
  """(backbone, linear layers) files in `weights_dir`, matched by stem (any of .pth/.pt/.safetensors).

  Raises:
    MissingWeights: naming each missing file and its download address.
  """
  found, missing = [], []
  for stem, url in WEIGHT_FILES[net]:
    paths = [os.path.join(weights_dir, stem + s) for s in _SUFFIXES] if weights_dir else []
    paths = [p for p in paths if os.path.isfile(p)]
    if paths:
      found.append(paths[0])
    else:
      missing.append(f"{stem}.pth ({url})")
  if missing:
    where = f"in {weights_dir}" if weights_dir else "(no --weights directory given)"
    raise MissingWeights(f"LPIPS-{net} needs {' and '.join(missing)} {where}")
  return found[0], found[1]


def load_lpips(net: str, backbone_path: str, lin_path: str) -> Lpips:
  """Reads the torchvision backbone (`features.N.weight`, or LPIPS' own `net.sliceK.N.weight`) and the linear
  layers (`linK.model.1.weight` [1, C, 1, 1]) into an `Lpips`."""
  backbone = read_state_dict(backbone_path)
  # A whole LPIPS state dict names the backbone net.sliceK.N.*: map it back to torchvision's features.N.*.
  backbone = {("features." + k.split(".", 2)[2]) if k.startswith("net.slice") else k: v for k, v in backbone.items()}
  lins = read_state_dict(lin_path)
  params: Params = {}
  for index, cin, cout, k, _, _ in _convs(net):
    params[f"features.{index}"] = torch_conv(backbone, f"features.{index}")
    check_kernel(f"{backbone_path}: features.{index}", params[f"features.{index}"]["kernel"], (k, k, cin, cout))
  for i, channels in enumerate(_tap_channels(net)):
    key = next((f"lin{i}.model.{j}.weight" for j in (1, 0) if f"lin{i}.model.{j}.weight" in lins), None)
    if key is None:
      raise KeyError(f"{lin_path}: no lin{i}.model.1.weight (LPIPS v0.1 linear layers expected)")
    weight = np.asarray(lins[key], np.float32)
    if weight.shape != (1, channels, 1, 1):
      raise ValueError(f"{lin_path}: {key} has shape {weight.shape}, expected {(1, channels, 1, 1)} for {net}")
    params[f"lin{i}"] = {"weight": jnp.asarray(weight.reshape(channels))}
  return Lpips(net, params, f"{os.path.basename(backbone_path)} + {os.path.basename(lin_path)}")


def random_lpips(net: str = "alex", seed: int = 0, width_divisor: int = 16) -> Lpips:
  """A narrow random `Lpips` (channels / width_divisor), for tests of the plumbing."""
  rng = np.random.default_rng(seed)
  params: Params = {}
  for index, cin, cout, k, _, _ in _convs(net, width_divisor):
    params[f"features.{index}"] = random_conv(rng, (k, k, cin, cout))
  for i, channels in enumerate(_tap_channels(net, width_divisor)):  # LPIPS' linear weights are non-negative
    params[f"lin{i}"] = {"weight": rng.uniform(0.0, 1.0, channels).astype(np.float32)}
  return Lpips(net, params, f"random (seed {seed}, channels / {width_divisor})")


def _min_size(net: str) -> int:
  """Smallest image side for which every layer of the stack keeps at least one pixel."""
  for side in range(1, 512):
    size = side
    for op in _ARCHITECTURES[net]:
      if op == "tap":
        continue
      if op[0] == "conv":
        size = (size + 2 * op[5] - op[3]) // op[4] + 1
      else:
        size = (size - op[1]) // op[2] + 1
      if size < 1:
        break
    if size >= 1:
      return side
  raise AssertionError(net)


@functools.partial(jax.jit, static_argnames="net")
def _distance(params: Params, net: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """[N] LPIPS of uint8 batches a, b [N, H, W, 3]."""
  n = a.shape[0]
  x = jnp.concatenate([a, b]).astype(jnp.float32) / 127.5 - 1.0  # one pass over both: [2N, H, W, 3]
  x = (x - _SHIFT) / _SCALE
  total, tap = jnp.zeros(n), 0
  for op in _ARCHITECTURES[net]:
    if op == "tap":
      f = x / (jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)) + _EPS)  # unit length over channels
      d = jnp.square(f[:n] - f[n:]) @ params[f"lin{tap}"]["weight"]  # [N, h, w]
      total, tap = total + d.mean((1, 2)), tap + 1
    elif op[0] == "conv":
      _, index, _, _, stride, pad = op
      x = jax.nn.relu(conv(x, params[f"features.{index}"], stride, (pad, pad)))
    else:
      x = max_pool(x, op[1], op[2])
  return total


def lpips(model: Lpips, pred: np.ndarray, target: np.ndarray, batch_size: int = 16) -> np.ndarray:
  """LPIPS distance per image pair: float64 [N], >= 0, 0 = identical (typical image pairs: 0.1 .. 0.7).

  Args:
    model: `load_lpips(...)` (or `random_lpips()` in tests).
    pred, target: uint8 [N, H, W, 3] (or one [H, W, 3]); at native resolution, as LPIPS is usually reported.
    batch_size: images per jitted call.
  """
  pred, target = check_pair(pred, target)
  smallest = _min_size(model.net)
  if min(pred.shape[1:3]) < smallest:
    raise ValueError(f"LPIPS-{model.net}: images must be at least {smallest}x{smallest}, got {pred.shape[1:3]}")
  out = [np.asarray(_distance(model.params, model.net, p, t))[:n]
         for p, t, n in zip(padded_batches(pred, batch_size), padded_batches(target, batch_size),
                            batch_lengths(len(pred), batch_size), strict=True)]
  return np.concatenate(out).astype(np.float64)
