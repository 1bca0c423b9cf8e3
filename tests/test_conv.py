"""The im2col and Winograd convolution paths equal XLA's own convolution (values against float64, gradients), and
flax's `Conv` takes them where `use_im2col` / `use_winograd` say so, with unchanged parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magicpose_jax.models import conv as conv_module
from magicpose_jax.models.resnet import conv

DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, padding, strides=(1, 1)):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize(("shape", "kernel", "padding", "strides"), [
    ((2, 8, 8, 16), (3, 3, 16, 24), ((1, 1), (1, 1)), (1, 1)),
    ((1, 5, 7, 12), (3, 3, 12, 8), ((1, 1), (1, 1)), (1, 1)),  # odd, non-square map
    ((2, 6, 6, 8), (3, 3, 8, 8), ((0, 2), (1, 0)), (1, 1)),  # asymmetric padding changes the output size
    ((1, 6, 6, 8), (1, 1, 8, 4), ((0, 0), (0, 0)), (1, 1)),
    ((1, 9, 9, 4), (5, 5, 4, 6), ((2, 2), (2, 2)), (1, 1)),
    ((1, 16, 16, 8), (3, 3, 8, 8), ((1, 1), (1, 1)), (2, 2)),  # the SD downsampler: 16x16 -> 8x8
    ((2, 7, 9, 4), (3, 3, 4, 6), ((1, 1), (0, 2)), (2, 3)),  # odd sizes, unequal strides
])
def test_im2col_equals_xla_convolution_and_its_gradients(shape, kernel, padding, strides):
  """fp32, max abs error <= 1e-5 on unit-scale outputs (only the summation order differs)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(kernel) / np.sqrt(np.prod(kernel[:3])), jnp.float32)
  ours = conv_module.im2col_conv(x, w, padding, jax.lax.Precision.HIGHEST, strides)
  ref = _lax(x, w, padding, strides)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  probe = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
  grad = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) * probe), argnums=(0, 1))(x, w)
  for g_ours, g_ref in zip(grad(lambda x, w: conv_module.im2col_conv(x, w, padding, jax.lax.Precision.HIGHEST,
                                                                     strides)),
                           grad(lambda x, w: _lax(x, w, padding, strides)), strict=True):
    np.testing.assert_allclose(g_ours, g_ref, atol=1e-4, rtol=1e-5)


def test_rule_picks_im2col_only_on_small_wide_cpu_maps():
  assert conv_module.use_im2col((1, 16, 16, 1280), (3, 3, 1280, 1280), "cpu")
  assert conv_module.use_im2col((2, 8, 8, 2560), (3, 3, 2560, 1280), "cpu")
  assert not conv_module.use_im2col((1, 64, 64, 320), (3, 3, 320, 320), "cpu")  # large map: XLA's conv is faster
  assert not conv_module.use_im2col((1, 16, 16, 128), (3, 3, 128, 128), "cpu")  # few channels
  assert not conv_module.use_im2col((1, 8, 8, 1280), (1, 1, 1280, 1280), "cpu")  # 1x1 is a matmul already
  assert not conv_module.use_im2col((1, 16, 16, 1280), (3, 3, 1280, 1280), "gpu")


def _count_calls(monkeypatch, *names):
  """Wrap `conv_module.<name>` for each name so every call (at trace time) appends to the returned list."""
  calls = []
  for name in names:
    real = getattr(conv_module, name)
    monkeypatch.setattr(conv_module, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
  return calls


def test_flax_conv_dispatches_to_im2col_with_the_same_params(monkeypatch):
  """A 3x3 conv on an 8x8x640 map takes the im2col path (counted), matches XLA's conv, same param tree."""
  calls = _count_calls(monkeypatch, "im2col_conv")
  layer = conv(32, 3, "conv", jnp.float32, jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 8, 640)), jnp.float32)
  params = layer.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == {"params": {"kernel": (3, 3, 640, 32), "bias": (32,)}}
  ours = layer.apply(params, x)
  assert calls, "expected the im2col path"
  plain = nn.Conv(32, (3, 3), padding=((1, 1), (1, 1))).apply(params, x)  # flax's default lax path
  np.testing.assert_allclose(ours, plain, atol=1e-4)
  strided = conv(32, 3, "down", jnp.float32, jnp.float32, stride=2)  # the downsampler's 8x8 -> 4x4 too
  calls.clear()
  ours = strided.apply(params, x)
  assert calls, "expected the im2col path for the strided conv"
  plain = nn.Conv(32, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))).apply(params, x)
  assert ours.shape == plain.shape == (1, 4, 4, 32)
  np.testing.assert_allclose(ours, plain, atol=1e-4)


def _float64_conv(x, w, padding):
  """Direct convolution in float64 numpy: the independent reference for both paths' errors."""
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
  kh, kw = w.shape[:2]
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  return sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + ho, j:j + wo], np.asarray(w[i, j], np.float64))
             for i in range(kh) for j in range(kw))


@pytest.mark.parametrize(("shape", "cout", "padding"), [
    ((2, 8, 8, 16), 24, ((1, 1), (1, 1))),
    ((1, 6, 10, 12), 8, ((1, 1), (1, 1))),  # non-square map
    ((1, 5, 7, 8), 8, ((0, 1), (2, 1))),  # odd input, asymmetric padding, even output (4x8)
    ((1, 4, 4, 8), 8, ((0, 0), (0, 0))),  # "valid": one 2x2 output tile per image
    ((1, 16, 16, 256), 64, ((1, 1), (1, 1))),  # a long channel sum
])
def test_winograd_matches_float64_and_xla_gradients(shape, cout, padding):
  """fp32 unit-scale outputs: max abs error against float64 <= 1e-5 and <= 4x XLA's own (F(2x2, 3x3)'s transforms
  have coefficients 0, +-1, +-1/2, so it stays at direct convolution's accuracy; measured 1-2x)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1]), jnp.float32)
  ref = _float64_conv(x, w, padding)
  ours = np.asarray(jax.jit(lambda x, w: conv_module.winograd_conv(x, w, padding))(x, w))
  assert ours.shape == ref.shape
  assert np.std(ref) > 0.3
  err, xla_err = np.abs(ours - ref).max(), np.abs(np.asarray(_lax(x, w, padding)) - ref).max()
  assert err <= 1e-5 and err <= 4 * max(xla_err, 1e-7), (err, xla_err)
  probe = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
  grad = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) * probe), argnums=(0, 1))(x, w)
  for g_ours, g_ref in zip(grad(lambda x, w: conv_module.winograd_conv(x, w, padding)),
                           grad(lambda x, w: _lax(x, w, padding)), strict=True):
    np.testing.assert_allclose(g_ours, g_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("band_bytes", [1, 16 * 2 * 4 * 8 * 4 * 3])  # one tile row per band; 3 of the 7 rows
def test_winograd_in_bands_equals_one_pass(monkeypatch, band_bytes):
  """Over WINOGRAD_MAX_TRANSFORM_BYTES the output rows run in bands (overlapping input rows); values and
  gradients equal the one-pass result (asymmetric padding, so each band's rows are offset differently)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 13, 8, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 6, 8)) / np.sqrt(54), jnp.float32)
  padding = ((2, 1), (1, 1))  # 14 output rows: 7 tile rows
  probe = jnp.asarray(rng.standard_normal((2, 14, 8, 8)), jnp.float32)
  loss = lambda x, w: jnp.sum(conv_module.winograd_conv(x, w, padding) * probe)
  one_pass = conv_module.winograd_conv(x, w, padding), jax.grad(loss, argnums=(0, 1))(x, w)
  monkeypatch.setattr(conv_module, "WINOGRAD_MAX_TRANSFORM_BYTES", band_bytes)
  banded = conv_module.winograd_conv(x, w, padding), jax.grad(loss, argnums=(0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(banded), jax.tree.leaves(one_pass), strict=True):  # only sums split by band
    np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.abs(b).max()))
  np.testing.assert_allclose(banded[0], _float64_conv(x, w, padding), atol=1e-5)


def test_winograd_kernel_is_g_g_transposed():
  """`winograd_kernel` is `G g G^T` per channel pair, here against the textbook matrices in float64."""
  g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
  w = np.random.default_rng(2).standard_normal((3, 3, 5, 7)).astype(np.float32)
  ref = np.einsum("ui,ijco,vj->uvco", g, w.astype(np.float64), g).reshape(16, 5, 7)
  np.testing.assert_allclose(conv_module.winograd_kernel(jnp.asarray(w)), ref, atol=1e-6)


def test_winograd_rejects_what_it_cannot_tile():
  x = jnp.zeros((1, 5, 8, 4))
  with pytest.raises(ValueError, match=r"even output sizes, got 5x8"):
    conv_module.winograd_conv(x, jnp.zeros((3, 3, 4, 4)), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match=r"3x3 kernel"):
    conv_module.winograd_conv(x, jnp.zeros((5, 5, 4, 4)), ((2, 2), (2, 2)))


def test_rule_picks_winograd_on_large_wide_fp32_cpu_maps():
  same = ((1, 1), (1, 1))
  assert conv_module.use_winograd((1, 32, 32, 640), (3, 3, 640, 640), same, jnp.float32, "cpu")
  assert conv_module.use_winograd((1, 32, 32, 320), (3, 3, 320, 640), same, jnp.float32, "cpu")
  assert conv_module.use_winograd((2, 64, 64, 960), (3, 3, 960, 320), same, jnp.float32, "cpu")
  assert conv_module.use_winograd((1, 128, 128, 512), (3, 3, 512, 512), same, jnp.float32, "cpu")  # SD VAE
  assert not conv_module.use_winograd((1, 64, 64, 320), (3, 3, 320, 320), same, jnp.float32, "cpu")  # narrow
  assert conv_module.use_winograd((1, 256, 256, 512), (3, 3, 512, 256), same, jnp.float32, "cpu")  # in bands
  assert not conv_module.use_winograd((1, 16, 16, 1280), (3, 3, 1280, 1280), same, jnp.float32, "cpu")  # im2col's
  assert not conv_module.use_winograd((1, 33, 32, 640), (3, 3, 640, 640), same, jnp.float32, "cpu")  # odd rows
  assert not conv_module.use_winograd((1, 32, 32, 640), (1, 1, 640, 640), ((0, 0), (0, 0)), jnp.float32, "cpu")
  assert not conv_module.use_winograd((1, 32, 32, 640), (3, 3, 640, 640), same, jnp.bfloat16, "cpu")
  assert not conv_module.use_winograd((1, 32, 32, 640), (3, 3, 640, 640), same, jnp.float32, "gpu")


def test_flax_conv_dispatches_to_winograd_with_the_same_params(monkeypatch):
  """A 3x3 conv on a 32x32x640 map takes the Winograd path (counted) and matches flax's plain lax conv."""
  calls = _count_calls(monkeypatch, "winograd_conv")
  layer = conv(16, 3, "conv", jnp.float32, jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 32, 32, 640)), jnp.float32)
  params = layer.init(jax.random.key(0), x)
  ours = layer.apply(params, x)
  assert calls, "expected the Winograd path"
  plain = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1))).apply(params, x)
  np.testing.assert_allclose(ours, plain, atol=1e-4)


def test_env_switch_keeps_every_conv_on_lax(monkeypatch):
  calls = _count_calls(monkeypatch, "im2col_conv", "winograd_conv")
  layer = conv(16, 3, "conv", jnp.float32, jnp.float32)
  x = jnp.ones((1, 32, 32, 640), jnp.float32)
  params = layer.init(jax.random.key(0), x)
  assert calls, "expected the Winograd path by default"
  calls.clear()
  monkeypatch.setenv("MAGICPOSE_CPU_CONV", "lax")
  layer.apply(params, x)
  layer.apply(params, x[:, :8, :8])
  assert not calls
  monkeypatch.setenv("MAGICPOSE_CPU_CONV", "winograd")
  with pytest.raises(ValueError, match="MAGICPOSE_CPU_CONV must be 'auto' or 'lax', got 'winograd'"):
    layer.apply(params, x)


def test_unet_gradients_through_winograd_equal_xla_convs(monkeypatch):
  """The custom VJP under per-block remat (`dots_saveable`; ~50 s, so one policy): gradients wrt params and input
  of a tiny UNet with every eligible 3x3 conv forced onto Winograd equal those with MAGICPOSE_CPU_CONV=lax
  (relative 1e-5 of each leaf's scale)."""
  from test_unet_parity import CONFIGS, FORCED_CONV_PATHS, _inputs  # noqa: PLC0415

  from magicpose_jax.models.unet import UNet2DConditionModel  # noqa: PLC0415

  for name, value in FORCED_CONV_PATHS["winograd"].items():
    monkeypatch.setattr(conv_module, name, value)
  calls = _count_calls(monkeypatch, "winograd_conv")
  config = CONFIGS["sd1"].replace(remat_policy="dots_saveable")
  model = UNet2DConditionModel(config)
  sample, t, context = _inputs(config, batch=1)
  params = model.init(jax.random.key(0), sample, t, context)
  loss = lambda p, s: jnp.sum(model.apply(p, s, t, context) ** 2)
  # A new jit per call: the conv rules apply when tracing, and jit would reuse a traced function's trace.
  grads = lambda: jax.jit(jax.grad(loss, argnums=(0, 1)))(params, sample)
  ours = grads()
  assert calls
  calls.clear()
  monkeypatch.setenv("MAGICPOSE_CPU_CONV", "lax")
  ref = grads()
  assert not calls, "the reference must be traced again, on XLA's convs"
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-12)
