"""The CPU matmul kernel (models/cpu_matmul.cc) and where models/matmul.py uses it.

Values against float64 numpy, within the rigorous float32 summation bound |err| <= K u / (1 - K u) (|a| |b|)
(u = 2^-24, any summation order; a wrong element, or one term missed, is off by O(1)), on shapes off every
blocking size; Dense layers, 1x1 and im2col convolutions and their
gradients against XLA's dots and convolutions (<= 1e-5); the UNet with every product on the kernel
against diffusers is in test_unet_parity.py.
"""

import ctypes
import platform

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magicpose_jax.models import conv, cpu_kernels, cpu_matmul, matmul

pytestmark = [pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel"),
              pytest.mark.skipif(cpu_kernels.find_compiler() is None,
                                 reason="no C++ compiler here (matmul then runs XLA's dots)")]

# (M, K, N): rows off the 12-row micro-kernel and the 384-row task (1, 13, 385, 800), depths off the
# 256-deep block and its even split (1, 7, 300, 513, 1000), columns off the 32-column panel and the
# 128-column task (1, 33, 130, 257), and SD's 4096 x 320 x 320.
SHAPES = [(1, 1, 1), (13, 300, 33), (385, 513, 130), (800, 1000, 257), (25, 7, 1), (4096, 320, 320), (2, 40, 512)]


def _operands(m, k, n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)


def _check_float64(out, a, b, what):
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  ku = a.shape[1] * 2.0**-24
  bound = ku / (1 - ku) * (np.abs(a64) @ np.abs(b64)) + 1e-30
  excess = (np.abs(np.asarray(out, np.float64) - a64 @ b64) / bound).max()
  assert excess <= 1.0, f"{what}: error {excess:.3g}x the float32 summation bound"


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_float64(shape):
  a, b = _operands(*shape)
  _check_float64(jax.jit(cpu_matmul.matmul)(a, b), a, b, str(shape))


def test_kernel_is_deterministic_and_handles_empty_rows():
  a, b = _operands(385, 513, 130, seed=1)
  f = jax.jit(cpu_matmul.matmul)
  assert np.array_equal(np.asarray(f(a, b)), np.asarray(f(a, b)))
  assert jax.jit(cpu_matmul.matmul)(a[:0], b).shape == (0, 130)


def test_kernel_rejects_bad_shapes():
  a, b = _operands(4, 8, 3)
  with pytest.raises(ValueError, match=r"a \[M, K\] and b \[K, N\]"):
    cpu_matmul.matmul(a, b[:5])
  with pytest.raises(ValueError, match=r"a \[M, K\] and b \[K, N\]"):
    cpu_matmul.matmul(a[None], b)


def test_kernel_under_vmap():
  rng = np.random.default_rng(2)
  a, b = rng.standard_normal((3, 20, 30)).astype(np.float32), rng.standard_normal((30, 40)).astype(np.float32)
  out = jax.jit(jax.vmap(cpu_matmul.matmul, in_axes=(0, None)))(a, b)
  for i in range(3):
    _check_float64(out[i], a[i], b, f"vmapped item {i}")


def test_where_the_kernel_runs(monkeypatch):
  assert matmul.kernel_unsupported(4096, 320, 320, jnp.float32) is None
  assert "size threshold" in matmul.kernel_unsupported(1, 320, 1280, jnp.float32)  # the time embedding
  assert "size threshold" in matmul.kernel_unsupported(64, 32, 32, jnp.float32)
  assert "float32" in matmul.kernel_unsupported(4096, 320, 320, jnp.bfloat16)
  monkeypatch.setenv(cpu_matmul.DISABLE_ENV, "0")
  assert "disabled" in matmul.kernel_unsupported(4096, 320, 320, jnp.float32)


def _force_kernel(monkeypatch):
  monkeypatch.setattr(matmul, "MIN_ROWS", 1)
  monkeypatch.setattr(matmul, "MIN_MACS", 0)


def _uses_kernel(fn, *args) -> bool:
  return cpu_matmul.FFI_TARGET in jax.jit(fn).lower(*args).as_text()


def test_dense_layer_values_and_gradients_match_xla(monkeypatch):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 37, 48)).astype(np.float32)  # [B, N, C]: rows flattened to 74
  layer = nn.Dense(70, dot_general=matmul.dot_general)
  params = layer.init(jax.random.key(0), x)
  reference = nn.Dense(70)
  w = rng.standard_normal((2, 37, 70)).astype(np.float32)
  loss = lambda m, p, x: jnp.sum(m.apply(p, x) * w)
  _force_kernel(monkeypatch)
  assert _uses_kernel(layer.apply, params, x) and not _uses_kernel(reference.apply, params, x)
  np.testing.assert_allclose(jax.jit(layer.apply)(params, x), jax.jit(reference.apply)(params, x), atol=1e-5)
  ours = jax.jit(jax.grad(lambda p, x: loss(layer, p, x), argnums=(0, 1)))(params, x)
  ref = jax.jit(jax.grad(lambda p, x: loss(reference, p, x), argnums=(0, 1)))(params, x)
  for g, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5)


def test_lowered_flop_count_includes_the_kernel_calls(monkeypatch):
  """XLA's cost analysis counts a custom call as no FLOPs; train/flops.py adds 2 M K N per kernel call."""
  from magicpose_jax.train import flops  # noqa: PLC0415

  _force_kernel(monkeypatch)
  a, b = _operands(64, 32, 16)
  f = lambda a, b: matmul.matmul(a, b) + jnp.dot(a, b)
  lowered = jax.jit(f).lower(a, b)
  assert cpu_matmul.FFI_TARGET in lowered.as_text()
  assert abs(flops.lowered_flops(lowered) - 2 * 2 * 64 * 32 * 16) <= 64 * 16 + 1  # + the add, - the call's -1


def test_dense_layer_off_the_kernel_is_lax_dot_general():
  x = np.ones((2, 3, 8), np.float32)
  layer = nn.Dense(4, dot_general=matmul.dot_general)
  params = layer.init(jax.random.key(0), x)
  assert not _uses_kernel(layer.apply, params, x)  # below the size threshold


@pytest.mark.parametrize(("kernel", "channels", "size"), [((1, 1), 48, 9), ((3, 3), 40, 8)])
def test_convolutions_on_the_kernel_match_lax(monkeypatch, kernel, channels, size):
  """1x1 convolutions and the im2col path (3x3 on a small map) through the matmul kernel, values and grads."""
  _force_kernel(monkeypatch)
  monkeypatch.setattr(conv, "IM2COL_MIN_CHANNELS", 1)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, size, size, channels)).astype(np.float32)
  pad = (kernel[0] // 2,) * 2
  ours = nn.Conv(24, kernel, padding=(pad, pad), conv_general_dilated=conv.conv_general_dilated)
  reference = nn.Conv(24, kernel, padding=(pad, pad))
  params = ours.init(jax.random.key(1), x)
  assert _uses_kernel(ours.apply, params, x)
  np.testing.assert_allclose(jax.jit(ours.apply)(params, x), jax.jit(reference.apply)(params, x), atol=1e-5)
  grad = lambda m: jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1)))(params, x)
  for g, r in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(reference)), strict=True):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
def test_eight_lane_build_matches_float64():
  """The AVX2 (8-lane, 16-register: 6-row) micro-kernel, built for x86-64-v3 whatever this CPU has."""
  path = cpu_kernels.build(cpu_kernels.find_compiler(), march="x86-64-v3")
  cpu_kernels.register(ctypes.cdll.LoadLibrary(str(path)), suffix="_avx2")
  for shape in SHAPES:
    a, b = _operands(*shape, seed=5)
    out = jax.jit(lambda a, b: cpu_matmul.matmul(a, b, cpu_matmul.FFI_TARGET + "_avx2"))(a, b)
    _check_float64(out, a, b, f"x86-64-v3 {shape}")
