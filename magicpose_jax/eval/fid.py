"""FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to InceptionV3 pool3 features (2048-d)
of two image sets, with the TensorFlow FID Inception as pytorch-fid ports it (its weights file, its block patches:
TF's border-excluding average pools, max pool in the last block) and pytorch-fid's preprocessing (bilinear resize
to 299x299 without antialiasing, [0, 1] -> [-1, 1]). clean-fid resizes with PIL bicubic instead: scores differ by
a little; the report names the variant.

Weights are a local file (no downloads); `random_inception` builds a narrow randomly initialised network with the
same code path, so the plumbing is testable without it (its numbers mean nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.convert.tensor_files import read_state_dict
from magicpose_jax.eval.image_metrics import as_batch
from magicpose_jax.eval.layers import (
  Params,
  avg_pool_3x3_exclude_pad,
  batch_lengths,
  check_kernel,
  conv,
  max_pool,
  padded_batches,
  random_conv,
)
from magicpose_jax.eval.lpips import MissingWeights

WEIGHT_STEM = "pt_inception-2015-12-05-6726825d"
WEIGHT_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHT_STEM}.pth"
INPUT_SIZE = 299
_BN_EPS = 1e-3  # torchvision's BasicConv2d

Spec = tuple[int, int, tuple[int, int], int, tuple[int, int]]  # (cin, cout, (kh, kw), stride, (pad_h, pad_w))


@dataclasses.dataclass(frozen=True)
class Inception:
  """FID's InceptionV3: `params` (torchvision module names -> conv + batch norm), `width_divisor` (1 = the real
  network), `source` (the file it was read from, or "random ...")."""

  params: Params
  width_divisor: int
  source: str


# ----------------------------------------------------------------------------------------------------------------
# Architecture: torchvision's Inception3 layer table (names, shapes, strides, paddings)


def _conv_spec(specs: dict[str, Spec], name: str, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> int:
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  padding = (padding, padding) if isinstance(padding, int) else padding
  specs[name] = (cin, cout, kernel, stride, padding)
  return cout


@functools.cache
def _specs(width_divisor: int) -> tuple[dict[str, Spec], int]:
  """All BasicConv2d layers by module name, and the feature size (2048 for the real network)."""
  w = lambda c: max(1, c // width_divisor)
  s: dict[str, Spec] = {}
  _conv_spec(s, "Conv2d_1a_3x3", 3, w(32), 3, 2)
  _conv_spec(s, "Conv2d_2a_3x3", w(32), w(32), 3)
  _conv_spec(s, "Conv2d_2b_3x3", w(32), w(64), 3, padding=1)
  _conv_spec(s, "Conv2d_3b_1x1", w(64), w(80), 1)
  c = _conv_spec(s, "Conv2d_4a_3x3", w(80), w(192), 3)
  for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):  # InceptionA
    _conv_spec(s, f"{name}.branch1x1", c, w(64), 1)
    _conv_spec(s, f"{name}.branch5x5_1", c, w(48), 1)
    _conv_spec(s, f"{name}.branch5x5_2", w(48), w(64), 5, padding=2)
    _conv_spec(s, f"{name}.branch3x3dbl_1", c, w(64), 1)
    _conv_spec(s, f"{name}.branch3x3dbl_2", w(64), w(96), 3, padding=1)
    _conv_spec(s, f"{name}.branch3x3dbl_3", w(96), w(96), 3, padding=1)
    _conv_spec(s, f"{name}.branch_pool", c, w(pool), 1)
    c = w(64) + w(64) + w(96) + w(pool)
  _conv_spec(s, "Mixed_6a.branch3x3", c, w(384), 3, 2)  # InceptionB
  _conv_spec(s, "Mixed_6a.branch3x3dbl_1", c, w(64), 1)
  _conv_spec(s, "Mixed_6a.branch3x3dbl_2", w(64), w(96), 3, padding=1)
  _conv_spec(s, "Mixed_6a.branch3x3dbl_3", w(96), w(96), 3, 2)
  c = w(384) + w(96) + c
  for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    c7 = w(channels_7x7)  # InceptionC
    _conv_spec(s, f"{name}.branch1x1", c, w(192), 1)
    _conv_spec(s, f"{name}.branch7x7_1", c, c7, 1)
    _conv_spec(s, f"{name}.branch7x7_2", c7, c7, (1, 7), padding=(0, 3))
    _conv_spec(s, f"{name}.branch7x7_3", c7, w(192), (7, 1), padding=(3, 0))
    _conv_spec(s, f"{name}.branch7x7dbl_1", c, c7, 1)
    _conv_spec(s, f"{name}.branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0))
    _conv_spec(s, f"{name}.branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3))
    _conv_spec(s, f"{name}.branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0))
    _conv_spec(s, f"{name}.branch7x7dbl_5", c7, w(192), (1, 7), padding=(0, 3))
    _conv_spec(s, f"{name}.branch_pool", c, w(192), 1)
    c = 4 * w(192)
  _conv_spec(s, "Mixed_7a.branch3x3_1", c, w(192), 1)  # InceptionD
  _conv_spec(s, "Mixed_7a.branch3x3_2", w(192), w(320), 3, 2)
  _conv_spec(s, "Mixed_7a.branch7x7x3_1", c, w(192), 1)
  _conv_spec(s, "Mixed_7a.branch7x7x3_2", w(192), w(192), (1, 7), padding=(0, 3))
  _conv_spec(s, "Mixed_7a.branch7x7x3_3", w(192), w(192), (7, 1), padding=(3, 0))
  _conv_spec(s, "Mixed_7a.branch7x7x3_4", w(192), w(192), 3, 2)
  c = w(320) + w(192) + c
  for name in ("Mixed_7b", "Mixed_7c"):  # InceptionE
    _conv_spec(s, f"{name}.branch1x1", c, w(320), 1)
    _conv_spec(s, f"{name}.branch3x3_1", c, w(384), 1)
    _conv_spec(s, f"{name}.branch3x3_2a", w(384), w(384), (1, 3), padding=(0, 1))
    _conv_spec(s, f"{name}.branch3x3_2b", w(384), w(384), (3, 1), padding=(1, 0))
    _conv_spec(s, f"{name}.branch3x3dbl_1", c, w(448), 1)
    _conv_spec(s, f"{name}.branch3x3dbl_2", w(448), w(384), 3, padding=1)
    _conv_spec(s, f"{name}.branch3x3dbl_3a", w(384), w(384), (1, 3), padding=(0, 1))
    _conv_spec(s, f"{name}.branch3x3dbl_3b", w(384), w(384), (3, 1), padding=(1, 0))
    _conv_spec(s, f"{name}.branch_pool", c, w(192), 1)
    c = w(320) + 4 * w(384) + w(192)
  return s, c


def _forward(params: Params, x: jax.Array, width_divisor: int) -> jax.Array:
  """Pool3 features [N, D] of images [N, 299, 299, 3] in [-1, 1]."""
  specs, _ = _specs(width_divisor)

  def c(name: str, h: jax.Array) -> jax.Array:  # torchvision's BasicConv2d: conv (no bias), batch norm, ReLU
    _, _, _, stride, padding = specs[name]
    p = params[name]
    h = conv(h, {"kernel": p["kernel"]}, stride, padding)
    return jax.nn.relu((h - p["mean"]) * (p["scale"] * jax.lax.rsqrt(p["var"] + _BN_EPS)) + p["bias"])

  cat = lambda *hs: jnp.concatenate(hs, -1)
  x = c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x)))
  x = max_pool(x, 3, 2)
  x = max_pool(c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", x)), 3, 2)
  for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = cat(c(f"{n}.branch1x1", x), c(f"{n}.branch5x5_2", c(f"{n}.branch5x5_1", x)),
            c(f"{n}.branch3x3dbl_3", c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x))),
            c(f"{n}.branch_pool", avg_pool_3x3_exclude_pad(x)))
  n = "Mixed_6a"
  x = cat(c(f"{n}.branch3x3", x), c(f"{n}.branch3x3dbl_3", c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x))),
          max_pool(x, 3, 2))
  for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    b7 = c(f"{n}.branch7x7_3", c(f"{n}.branch7x7_2", c(f"{n}.branch7x7_1", x)))
    b7d = x
    for i in range(1, 6):
      b7d = c(f"{n}.branch7x7dbl_{i}", b7d)
    x = cat(c(f"{n}.branch1x1", x), b7, b7d, c(f"{n}.branch_pool", avg_pool_3x3_exclude_pad(x)))
  n = "Mixed_7a"
  b7 = x
  for i in range(1, 5):
    b7 = c(f"{n}.branch7x7x3_{i}", b7)
  x = cat(c(f"{n}.branch3x3_2", c(f"{n}.branch3x3_1", x)), b7, max_pool(x, 3, 2))
  for n, pool in (("Mixed_7b", avg_pool_3x3_exclude_pad), ("Mixed_7c", lambda h: max_pool(h, 3, 1, 1))):
    b3 = c(f"{n}.branch3x3_1", x)
    b3d = c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x))
    x = cat(c(f"{n}.branch1x1", x), c(f"{n}.branch3x3_2a", b3), c(f"{n}.branch3x3_2b", b3),
            c(f"{n}.branch3x3dbl_3a", b3d), c(f"{n}.branch3x3dbl_3b", b3d), c(f"{n}.branch_pool", pool(x)))
  return x.mean((1, 2))  # [N, D]


@jax.jit
def _preprocess(images: jax.Array) -> jax.Array:
  """uint8 [N, H, W, 3] -> [N, 299, 299, 3] in [-1, 1]; its own jit, so the network compiles once for all sizes."""
  x = images.astype(jnp.float32) / 255.0
  # pytorch-fid: F.interpolate(bilinear, align_corners=False), i.e. no antialiasing when shrinking.
  x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "linear", antialias=False)
  return 2.0 * x - 1.0


_pool3 = jax.jit(_forward, static_argnames="width_divisor")


# ----------------------------------------------------------------------------------------------------------------
# Weights


def find_inception_weights(weights_dir: str | None) -> str:
  """The FID Inception file in `weights_dir` (`pt_inception-2015-12-05-6726825d` .pth/.pt/.safetensors).

  Raises:
    MissingWeights: naming the file and its download address.
  """
  for suffix in (".pth", ".pt", ".safetensors"):
    path = os.path.join(weights_dir, WEIGHT_STEM + suffix) if weights_dir else ""
    if path and os.path.isfile(path):
      return path
  where = f"in {weights_dir}" if weights_dir else "(no --weights directory given)"
  raise MissingWeights(f"FID needs {WEIGHT_STEM}.pth ({WEIGHT_URL}) {where}")


def load_inception(path: str) -> Inception:
  """Reads pytorch-fid's FID Inception state dict (`Mixed_5b.branch1x1.conv.weight`, `... .bn.running_mean`, ...)."""
  return Inception(_params_from_state(read_state_dict(path), path, 1), 1, os.path.basename(path))


def _params_from_state(state: dict[str, np.ndarray], path: str, width_divisor: int) -> Params:
  specs, _ = _specs(width_divisor)
  params: Params = {}
  for name, (cin, cout, (kh, kw), _, _) in specs.items():
    layer = {"kernel": jnp.asarray(np.transpose(_tensor(state, path, f"{name}.conv.weight"), (2, 3, 1, 0)))}
    check_kernel(f"{path}: {name}", layer["kernel"], (kh, kw, cin, cout))
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
      layer[ours] = jnp.asarray(_tensor(state, path, f"{name}.bn.{theirs}"))
    params[name] = layer
  return params


def _tensor(state: dict[str, np.ndarray], path: str, key: str) -> np.ndarray:
  if key not in state:
    raise KeyError(f"{path}: no tensor {key!r}; expected pytorch-fid's FID Inception ({WEIGHT_STEM}.pth)")
  return np.asarray(state[key], np.float32)


def random_inception(seed: int = 0, width_divisor: int = 16) -> Inception:
  """A narrow random `Inception` (channels / width_divisor), for tests of the plumbing."""
  specs, _ = _specs(width_divisor)
  rng = np.random.default_rng(seed)
  params: Params = {}
  for name, (cin, cout, (kh, kw), _, _) in specs.items():
    layer = random_conv(rng, (kh, kw, cin, cout), bias=False)
    layer.update(scale=np.ones(cout, np.float32), bias=rng.normal(0.0, 0.1, cout).astype(np.float32),
                 mean=np.zeros(cout, np.float32), var=np.ones(cout, np.float32))
    params[name] = layer
  return Inception(params, width_divisor, f"random (seed {seed}, channels / {width_divisor})")


# ----------------------------------------------------------------------------------------------------------------
# Features and the distance


def inception_features(model: Inception, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
  """Pool3 features: float64 [N, 2048] (narrower for random networks) of uint8 images [N, H, W, 3]."""
  images = as_batch(images, "images")
  out = [np.asarray(_pool3(model.params, _preprocess(batch), model.width_divisor))[:n]
         for batch, n in zip(padded_batches(images, batch_size), batch_lengths(len(images), batch_size), strict=True)]
  return np.concatenate(out).astype(np.float64)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) for means [D] and covariances [D, D].

  tr sqrtm(S1 S2) = tr sqrtm(S1^1/2 S2 S1^1/2), whose argument is symmetric PSD: eigh instead of a general sqrtm,
  so singular covariances (fewer images than dimensions) need no offset.
  """
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  middle = root1 @ sigma2 @ root1
  trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two feature sets [N1, D] and [N2, D] (N >= 2 each); >= 0, 0 = same statistics."""
  for name, f in (("first", features1), ("second", features2)):
    if f.ndim != 2 or len(f) < 2:
      raise ValueError(f"FID: the {name} set needs at least 2 images ([N >= 2, D] features), got {f.shape}")
  stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (features1, features2)]
  return max(0.0, frechet_distance(*stats[0], *stats[1]))


def fid(model: Inception, images1: np.ndarray, images2: np.ndarray, batch_size: int = 16) -> float:
  """FID between two uint8 image sets [N, H, W, 3] (any sizes; resized to 299). A few thousand images per set
  are needed for scores comparable across papers; fewer give a biased (higher) value."""
  return fid_from_features(inception_features(model, images1, batch_size), inception_features(model, images2,
                                                                                             batch_size))
