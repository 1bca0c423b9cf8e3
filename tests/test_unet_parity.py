"""Our Flax UNet vs diffusers' PyTorch UNet2DConditionModel, same weights via our converter.

Tolerance: max |ours - diffusers| <= 1e-4 in float32 (outputs are of unit scale or
smaller; the test also checks they are not vanishingly small).
"""

import jax
import numpy as np
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D as TorchResnet

from magicpose_jax.convert.diffusers import unet_key_table
from magicpose_jax.models import conv as conv_module
from magicpose_jax.models.resnet import ResnetBlock2D
from magicpose_jax.models.unet import UNet2DConditionModel, UNetConfig
from magicpose_jax.torch_reference import nchw, nhwc, state_dict_numpy, torch_unet

ATOL = 1e-4

_SD1 = UNetConfig(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
CONFIGS = {
    # SD 1.x shape: conv proj_in/out, one head count for every level.
    "sd1": _SD1,
    # SD 2.x shape: linear projections, heads per level, upcast attention, wider text states.
    "sd2": _SD1.replace(use_linear_projection=True, attention_head_dim=(2, 4, 4), cross_attention_dim=48,
                        upcast_attention=True),
    # Per-level layer counts, several transformer layers per block, attention in every level.
    "per_level": _SD1.replace(layers_per_block=(1, 2, 1), transformer_layers_per_block=(1, 2, 1),
                              down_block_types=("CrossAttnDownBlock2D",) * 3,
                              up_block_types=("CrossAttnUpBlock2D",) * 3),
}


def _inputs(config, batch=2, height=16, width=16, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((batch, height, width, config.in_channels), dtype=np.float32)
  t = rng.integers(0, 1000, size=(batch,)).astype(np.float32)
  context = rng.standard_normal((batch, 7, config.cross_attention_dim), dtype=np.float32)
  return sample, t, context


def _pair(config, seed=0):
  model = torch_unet(config, seed)
  params = unet_key_table(config).to_flax(state_dict_numpy(model))
  return model, params


def _check(ours, ref):
  assert ours.shape == ref.shape
  assert np.std(ref) > 0.05, "reference output is too small for the tolerance to mean anything"
  err = np.abs(np.asarray(ours) - ref).max()
  assert err <= ATOL, f"max abs error {err:.3g} > {ATOL}"


@pytest.mark.parametrize(("name", "backend"), [(name, "auto") for name in CONFIGS] + [("sd1", "cpu_fused")])
def test_unet_matches_diffusers(name, backend):
  config = CONFIGS[name].replace(attention_backend=backend)
  tmodel, params = _pair(config)
  sample, t, context = _inputs(config)
  with torch.no_grad():
    ref = nhwc(tmodel(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)
  ours = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, sample, t, context)
  _check(ours, ref)


# Thresholds that send every eligible conv of the tiny configs down one CPU path (the defaults keep them on lax).
FORCED_CONV_PATHS = {
    "im2col": {"IM2COL_MAX_PIXELS": 10**9, "IM2COL_MIN_CHANNELS": 0},
    "winograd": {"IM2COL_MIN_CHANNELS": 10**9, "IM2COL_MAX_PIXELS": 0, "WINOGRAD_MIN_CHANNELS": 0},
}


@pytest.mark.parametrize("path", sorted(FORCED_CONV_PATHS))
@pytest.mark.parametrize("size", [(16, 16), (10, 14)])  # 10x14: odd maps (5x7) below, which stay on lax
def test_unet_matches_diffusers_with_convs_on_each_cpu_path(monkeypatch, path, size):
  """The full SD UNet uses im2col only at 16x16/8x8 and Winograd only at 32x32/64x64, which the tiny configs
  do not reach: force each path onto every 3x3 conv that it can take, count its calls, check parity."""
  for name, value in FORCED_CONV_PATHS[path].items():
    monkeypatch.setattr(conv_module, name, value)
  calls = []
  real = getattr(conv_module, f"{path}_conv")
  monkeypatch.setattr(conv_module, f"{path}_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
  config = CONFIGS["sd1"]
  tmodel, params = _pair(config, seed=7)
  sample, t, context = _inputs(config, batch=1, height=size[0], width=size[1], seed=7)
  with torch.no_grad():
    ref = nhwc(tmodel(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)
  ours = UNet2DConditionModel(config).apply({"params": params}, sample, t, context)
  assert len(calls) >= 10, f"expected the {path} path on most 3x3 convs, got {len(calls)} calls"
  _check(ours, ref)


def test_additional_residuals_match_diffusers():
  config = CONFIGS["sd1"]
  tmodel, params = _pair(config, seed=3)
  sample, t, context = _inputs(config, seed=3)
  rng = np.random.default_rng(4)
  # The skip shapes, from our own down path's bookkeeping: conv_in, then each block's outputs.
  shapes = [(16, 32), (16, 32), (16, 32), (8, 32), (8, 64), (8, 64), (4, 64), (4, 64), (4, 64)]
  assert len(shapes) == config.num_down_residuals
  down = [rng.standard_normal((2, s, s, c), dtype=np.float32) for s, c in shapes]
  mid = rng.standard_normal((2, 4, 4, 64), dtype=np.float32)
  with torch.no_grad():
    ref = nhwc(tmodel(nchw(sample), torch.from_numpy(t), torch.from_numpy(context),
                      down_block_additional_residuals=tuple(nchw(d) for d in down),
                      mid_block_additional_residual=nchw(mid)).sample)
  ours = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, sample, t, context, down, mid)
  _check(ours, ref)
  # The residuals must matter (a no-op hook would pass the parity check only by luck).
  plain = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, sample, t, context)
  assert np.abs(np.asarray(plain) - ref).max() > 100 * ATOL


def test_odd_sample_size_matches_diffusers():
  """Sizes that are not multiples of 2**downsamplers use diffusers' `upsample_size` path."""
  config = CONFIGS["sd1"]
  tmodel, params = _pair(config, seed=5)
  sample, t, context = _inputs(config, batch=1, height=10, width=14, seed=5)
  with torch.no_grad():
    ref = nhwc(tmodel(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)
  ours = UNet2DConditionModel(config).apply({"params": params}, sample, t, context)
  _check(ours, ref)


def test_scalar_timestep_broadcasts():
  config = CONFIGS["sd1"]
  tmodel, params = _pair(config, seed=6)
  sample, _, context = _inputs(config, seed=6)
  with torch.no_grad():
    ref = nhwc(tmodel(nchw(sample), 321, torch.from_numpy(context)).sample)
  ours = UNet2DConditionModel(config).apply({"params": params}, sample, 321, context)
  _check(ours, ref)


def test_group_norm_keeps_offset_activations_exact():
  """A ResNet block on activations far from zero mean (|mean| ~100x their spread, as in a trained VAE's encoder)
  against diffusers' block: GroupNorm's variance must be two-pass, as torch's is. flax's default
  `E[x^2] - E[x]^2` in float32 loses the digits that matter there (max error 3.6e-3 here)."""
  torch.manual_seed(0)
  ref = TorchResnet(in_channels=8, out_channels=8, temb_channels=None, groups=4, eps=1e-6).eval()
  sd = state_dict_numpy(ref)
  conv = lambda n: {"kernel": sd[f"{n}.weight"].transpose(2, 3, 1, 0), "bias": sd[f"{n}.bias"]}
  norm = lambda n: {"scale": sd[f"{n}.weight"], "bias": sd[f"{n}.bias"]}
  params = {"norm1": norm("norm1"), "conv1": conv("conv1"), "norm2": norm("norm2"), "conv2": conv("conv2")}
  x = (100 + np.random.default_rng(0).standard_normal((2, 8, 8, 8))).astype(np.float32)
  ours = ResnetBlock2D(8, groups=4, eps=1e-6).apply({"params": params}, x, None)
  with torch.no_grad():
    expected = nhwc(ref(nchw(x), None))
  assert np.abs(np.asarray(ours) - expected).max() <= ATOL
