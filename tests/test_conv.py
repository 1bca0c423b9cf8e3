"""The im2col convolution path equals XLA's own convolution (values and gradients), and flax's `Conv` takes it
where `use_im2col` says so, with unchanged parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magicpose_jax.models import conv as conv_module
from magicpose_jax.models.resnet import conv

DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, padding):
  return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN,
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize(("shape", "kernel", "padding"), [
    ((2, 8, 8, 16), (3, 3, 16, 24), ((1, 1), (1, 1))),
    ((1, 5, 7, 12), (3, 3, 12, 8), ((1, 1), (1, 1))),  # odd, non-square map
    ((2, 6, 6, 8), (3, 3, 8, 8), ((0, 2), (1, 0))),  # asymmetric padding changes the output size
    ((1, 6, 6, 8), (1, 1, 8, 4), ((0, 0), (0, 0))),
    ((1, 9, 9, 4), (5, 5, 4, 6), ((2, 2), (2, 2))),
])
def test_im2col_equals_xla_convolution_and_its_gradients(shape, kernel, padding):
  """fp32, max abs error <= 1e-5 on unit-scale outputs (only the summation order differs)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(kernel) / np.sqrt(np.prod(kernel[:3])), jnp.float32)
  ours = conv_module.im2col_conv(x, w, padding, precision=jax.lax.Precision.HIGHEST)
  ref = _lax(x, w, padding)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  probe = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
  grad = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) * probe), argnums=(0, 1))(x, w)
  for g_ours, g_ref in zip(grad(lambda x, w: conv_module.im2col_conv(x, w, padding, jax.lax.Precision.HIGHEST)),
                           grad(lambda x, w: _lax(x, w, padding)), strict=True):
    np.testing.assert_allclose(g_ours, g_ref, atol=1e-4, rtol=1e-5)


def test_rule_picks_im2col_only_on_small_wide_cpu_maps():
  assert conv_module.use_im2col((1, 16, 16, 1280), (3, 3, 1280, 1280), "cpu")
  assert conv_module.use_im2col((2, 8, 8, 2560), (3, 3, 2560, 1280), "cpu")
  assert not conv_module.use_im2col((1, 64, 64, 320), (3, 3, 320, 320), "cpu")  # large map: Eigen is faster
  assert not conv_module.use_im2col((1, 16, 16, 128), (3, 3, 128, 128), "cpu")  # few channels
  assert not conv_module.use_im2col((1, 8, 8, 1280), (1, 1, 1280, 1280), "cpu")  # 1x1 is a matmul already
  assert not conv_module.use_im2col((1, 16, 16, 1280), (3, 3, 1280, 1280), "gpu")


def test_flax_conv_dispatches_to_im2col_with_the_same_params(monkeypatch):
  """A 3x3 conv on an 8x8x640 map takes the im2col path (counted), matches XLA's conv, same param tree."""
  calls = []
  real = conv_module.im2col_conv
  monkeypatch.setattr(conv_module, "im2col_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
  layer = conv(32, 3, "conv", jnp.float32, jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 8, 640)), jnp.float32)
  params = layer.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == {"params": {"kernel": (3, 3, 640, 32), "bias": (32,)}}
  ours = layer.apply(params, x)
  assert calls, "expected the im2col path"
  plain = nn.Conv(32, (3, 3), padding=((1, 1), (1, 1))).apply(params, x)  # flax's default lax path
  np.testing.assert_allclose(ours, plain, atol=1e-4)
  strided = conv(32, 3, "down", jnp.float32, jnp.float32, stride=2)  # stride 2 stays on lax
  calls.clear()
  strided.apply(params, x)
  assert not calls
