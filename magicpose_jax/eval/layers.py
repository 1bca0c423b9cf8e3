"""The few layers the metric networks (LPIPS' AlexNet/VGG, FID's InceptionV3) are made of: NHWC, plain functions
over parameter dicts, PyTorch semantics (explicit padding, floor division of output sizes).

Parameters come from PyTorch state dicts (`torch_conv` turns `[O, I, kh, kw]` into HWIO) or from `random_conv` for
the tiny randomly initialised networks the tests run.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, dict[str, jax.Array | np.ndarray]]


def conv(x: jax.Array, p: Mapping[str, jax.Array], stride: int = 1, padding: tuple[int, int] = (0, 0)) -> jax.Array:
  """2D convolution of [N, H, W, Cin] with p["kernel"] [kh, kw, Cin, Cout] (+ p["bias"] [Cout] if present)."""
  y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), [(padding[0],) * 2, (padding[1],) * 2],
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["bias"] if "bias" in p else y


def max_pool(x: jax.Array, size: int, stride: int, padding: int = 0) -> jax.Array:
  """torch.nn.functional.max_pool2d (padding with -inf)."""
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pads)


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
  """avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad=False): TensorFlow's average at the borders."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return total / count


def _batch_rows(n: int, batch_size: int) -> int:
  """Rows per batch: batch_size, or for fewer images the next power of two (few distinct shapes, few compiles)."""
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


def padded_batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """[N, ...] -> batches of `_batch_rows` rows each, the last one padded with zeros, so that every batch of a call
  has one shape (one jit compile)."""
  size = _batch_rows(len(images), batch_size)
  out = []
  for start in range(0, len(images), size):
    batch = images[start:start + size]
    if len(batch) < size:
      batch = np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])
    out.append(batch)
  return out


def batch_lengths(n: int, batch_size: int) -> list[int]:
  """Real (unpadded) rows of each of `padded_batches`' batches."""
  size = _batch_rows(n, batch_size)
  return [min(size, n - start) for start in range(0, n, size)]


def torch_conv(state: Mapping[str, np.ndarray], prefix: str, bias: bool = True) -> dict[str, jax.Array]:
  """{"kernel" HWIO, "bias"} from `prefix.weight` [O, I, kh, kw] (and `prefix.bias`) of a state dict."""
  out = {"kernel": jnp.asarray(np.transpose(_get(state, f"{prefix}.weight"), (2, 3, 1, 0)), jnp.float32)}
  if bias:
    out["bias"] = jnp.asarray(_get(state, f"{prefix}.bias"), jnp.float32)
  return out


def _get(state: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in state:
    sample = sorted(state)[:6]
    raise KeyError(f"weights: no tensor {key!r} (the file holds {len(state)} tensors, e.g. {sample})")
  return np.asarray(state[key], np.float32)


def check_kernel(name: str, kernel: jax.Array, shape: tuple[int, ...]) -> None:
  if tuple(kernel.shape) != tuple(shape):
    raise ValueError(f"weights: {name} has kernel shape {tuple(kernel.shape)} (HWIO), expected {tuple(shape)}")


def random_conv(rng: np.random.Generator, shape: tuple[int, int, int, int], bias: bool = True
                ) -> dict[str, np.ndarray]:
  """He-initialised HWIO kernel (and a small random bias): activations keep their scale through deep stacks.

  NumPy arrays from NumPy's generator: eager jax ops compile once per new shape (minutes for an Inception).
  """
  fan_in = shape[0] * shape[1] * shape[2]
  out = {"kernel": rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)}
  if bias:
    out["bias"] = rng.normal(0.0, 0.1, shape[-1:]).astype(np.float32)
  return out
