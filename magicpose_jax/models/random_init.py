"""Random parameters from a model's abstract param tree, on the host, without running `init`.

`module.init` traces and runs the whole forward pass; for a UNet that is tens of seconds on a CPU
even at test sizes, and a full forward at SD size. Training from scratch (the demo's tiny base) and
tests only need a sensible random draw of the right shapes, so this fills `jax.eval_shape(init)`'s
tree by leaf name, with flax's default rules:

* `kernel` (dense `[in, out]`, conv HWIO `[kh, kw, in, out]`): LeCun normal, std `1/sqrt(fan_in)`
  with `fan_in = prod(shape[:-1])` (flax's `lecun_normal` uses a truncated normal; a plain normal
  with the same std is an equally good start);
* `bias`: 0; norm `scale`: 1; `embedding` and any other leaf: normal, std 0.02.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def _leaf(path: tuple[Any, ...], x: jax.ShapeDtypeStruct, rng: np.random.Generator) -> np.ndarray:
  name = str(getattr(path[-1], "key", path[-1]))
  shape, dtype = tuple(x.shape), np.dtype(x.dtype)
  if name == "bias":
    return np.zeros(shape, dtype)
  if name == "scale":
    return np.ones(shape, dtype)
  if name == "kernel" and len(shape) >= 2:
    std = 1.0 / math.sqrt(max(math.prod(shape[:-1]), 1))
  else:
    std = 0.02
  return (rng.standard_normal(shape, np.float32) * std).astype(dtype)


def random_params(abstract: Any, seed: int | Sequence[int]) -> Any:
  """A numpy tree shaped like `abstract` (`jax.eval_shape(model.init, ...)["params"]`), drawn from `seed`.

  Deterministic: the same seed and tree give the same bytes (leaves are drawn in flattening order).
  """
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(lambda p, x: _leaf(p, x, rng), abstract)
