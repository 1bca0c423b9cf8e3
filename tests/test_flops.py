"""FLOP accounting (`train.flops`): the analytic count vs XLA's cost analysis, the device peak table, MFU."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from test_train_step import tiny

from magicpose_jax.models.controlnet import ControlNetConfig, ControlNetModel
from magicpose_jax.models.unet import REMAT_POLICIES, VARIANTS, UNet2DConditionModel
from magicpose_jax.models.vae import VAE_VARIANTS, AutoencoderKL
from magicpose_jax.train import flops, loop, stages

# XLA counts 2 FLOPs per multiply-add like the analytic count, but only over the taps of a padded convolution
# that touch the input (3x3, pad 1: (1 - 2/(3 S))^2 of them at side S, 92 % at the tiny UNet's 8 x 8 level),
# and it drops dead code; the analytic count includes padding taps. Measured: within 3 % at tiny and SD 1.5
# sizes (SD 1.5 at 64 x 64: UNet 788 vs 803 GFLOP, +reference 938 vs 951, ControlNet 279 vs 283, VAE encoder
# at 512^2 1111 vs 1117).
REL_TOL = 0.10

UNET = dataclasses.replace(VARIANTS["tiny"], attention_backend="xla")  # no loop: XLA sees every FLOP
HW = (16, 16)


def _abstract(*shapes):
  return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]


def _close(counted, analytic):
  assert counted is not None and analytic > 0
  assert abs(counted - analytic) <= REL_TOL * analytic, (counted, analytic, counted / analytic)


@pytest.fixture(scope="module")
def unet_inputs():
  x, t, c = _abstract((1, *HW, 4), (1,), (1, 77, UNET.cross_attention_dim))
  model = UNet2DConditionModel(UNET)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, c)
  return model, params, x, t, c


def test_tiny_unet_forward_compiled_flops_match_the_analytic_count(unet_inputs):
  model, params, x, t, c = unet_inputs
  compiled = jax.jit(model.apply).lower(params, x, t, c).compile()
  analytic = flops.unet_forward_flops(UNET, HW)
  _close(flops.compiled_flops(compiled), analytic.total)
  # The three kinds are all there and the attention share is what the shapes say (QK^T + PV, 4 N^2 C).
  assert analytic.conv > 0 and analytic.dense > 0
  n, c0 = HW[0] * HW[1], UNET.block_out_channels[0]
  self_attention = 4 * n * n * c0 * 3  # level 0: 1 down + 2 up transformer blocks at 16 x 16
  assert analytic.attention > self_attention


def test_reference_appearance_controlnet_and_vae_counts(unet_inputs):
  model, params, x, t, c = unet_inputs
  states = jax.eval_shape(lambda p, *a: model.apply(p, *a, return_reference_states=True, compute_output=False)[1],
                          params, x, t, c)
  main = jax.jit(lambda p, x, t, c, r: model.apply(p, x, t, c, reference_states=r)).lower(params, x, t, c, states)
  _close(flops.lowered_flops(main), flops.unet_forward_flops(UNET, HW, reference=True).total)
  # The reference doubles the self-attention keys/values: strictly more than the plain UNet.
  assert flops.unet_forward_flops(UNET, HW, reference=True).total > flops.unet_forward_flops(UNET, HW).total
  appearance = jax.jit(lambda p, *a: model.apply(p, *a, return_reference_states=True, compute_output=False)).lower(
      params, x, t, c)
  _close(flops.lowered_flops(appearance), flops.unet_forward_flops(UNET, HW, compute_output=False).total)

  pose = ControlNetConfig.from_unet(UNET, conditioning_embedding_out_channels=(16, 32))
  net = ControlNetModel(pose)
  (image,) = _abstract((1, HW[0] * 2, HW[1] * 2, 3))
  pose_params = jax.eval_shape(net.init, jax.random.key(0), x, t, c, image)
  _close(flops.lowered_flops(jax.jit(net.apply).lower(pose_params, x, t, c, image)),
         flops.controlnet_forward_flops(pose, HW).total)

  vae_config = dataclasses.replace(VAE_VARIANTS["tiny"], attention_backend="xla")
  vae = AutoencoderKL(vae_config)
  (pixels,) = _abstract((1, 64, 64, 3))
  vae_params = jax.eval_shape(vae.init, jax.random.key(0), pixels)
  encode = jax.jit(lambda p, im: vae.apply(p, im, method="encode").mean).lower(vae_params, pixels)
  _close(flops.lowered_flops(encode), flops.vae_encode_flops(vae_config, (64, 64)).total)


def test_stage2_train_step_flops_match_the_analytic_count():
  """The whole step (VAE x 2, appearance + pose nets trained, main UNet frozen, backward, full remat) lowered with
  no loops vs `train_step_flops(...).hardware` (measured: 0.95; without remat 1.00, too slow to test both)."""
  config = flops.loop_free_config(tiny(stage="stage2", remat_policy="full", grad_accum_steps=2))
  assert config.grad_accum_steps == 1 and config.attention_backend == "xla"
  step_fn, args = loop.abstract_setup(config)
  counted = flops.lowered_flops(step_fn.lower(*args))
  per_example = flops.config_step_flops(config, stages.networks(config, stages.variant_configs(config)))
  _close(counted, per_example.hardware * config.global_batch_size)
  # Full remat recomputes one forward of the three UNet-sized nets (not the VAE); no remat recomputes nothing.
  assert per_example.model < per_example.hardware < per_example.model + per_example.forward
  plain = flops.train_step_flops("stage2", stages.variant_configs(config).unet, None, (16, 16))
  assert plain.hardware == plain.model


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_base_train_step_flops_match_the_analytic_count(share):
  """Stage "base", plain and reference-only (the UNet also runs on the reference, trained through both roles, so
  its backward is 2x and the reference pass adds a trained UNet's 3x), lowered with no loops vs the count."""
  config = flops.loop_free_config(tiny(stage="base", base_reference_share=share))
  step_fn, args = loop.abstract_setup(config)
  counted = flops.lowered_flops(step_fn.lower(*args))
  per_example = flops.config_step_flops(config, stages.networks(config, stages.variant_configs(config)))
  _close(counted, per_example.hardware * config.global_batch_size)


def test_compiled_count_sees_a_loop_body_once():
  """Why `loop_free_config` exists: XLA's cost analysis counts a scan body once, whatever its length."""
  w = jnp.ones((64, 64))

  def looped(x, n):
    return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=n)[0]

  x = jnp.ones((8, 64))
  one = flops.compiled_flops(jax.jit(lambda x: looped(x, 1)).lower(x).compile())
  four = flops.compiled_flops(jax.jit(lambda x: looped(x, 4)).lower(x).compile())
  assert one == pytest.approx(2 * 8 * 64 * 64, rel=0.05)
  assert four == pytest.approx(one, rel=0.05)


@pytest.mark.parametrize("kind, name, bf16", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H200", "H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("TPU v4", "TPU v4", 275.0),
    ("TPU v5 lite", "TPU v5e", 197.0),
    ("TPU v5", "TPU v5p", 459.0),
    ("TPU v5p", "TPU v5p", 459.0),
    ("TPU v6 lite", "TPU v6e", 918.0),
])
def test_device_kinds_map_to_their_peaks(kind, name, bf16):
  assert flops.device_peak(kind).name == name
  assert flops.peak_tflops(kind, "bfloat16") == bf16
  fp32 = flops.peak_tflops(kind, "float32")
  assert (fp32 is None) == kind.startswith("TPU") and (fp32 is None or fp32 < bf16)


def test_unknown_devices_have_no_peak_and_no_mfu():
  assert flops.device_peak("cpu") is None and flops.peak_tflops(jax.devices()[0].device_kind) is None
  assert flops.mfu(1e12, 1.0, 1, None) is None
  assert flops.mfu(989.4e12 * 8 * 0.5, 1.0, 8, 989.4) == pytest.approx(0.5)
  rates = flops.StepThroughput(compiled_per_device=2e12, model_per_step=8e12, devices=4, peak=None).rates(0.5)
  assert rates == {"model_tflops_per_s": pytest.approx(4.0), "tflops_per_s": pytest.approx(4.0)}
  rates = flops.StepThroughput(None, 8e12, 4, 400.0).rates(0.5)
  assert rates == {"model_tflops_per_s": pytest.approx(4.0), "mfu": pytest.approx(0.01)}


def test_every_remat_policy_has_a_recompute_rule():
  assert set(flops.RECOMPUTED) == set(REMAT_POLICIES)
  unet = VARIANTS["tiny"]
  hw = {p: flops.train_step_flops("stage1", unet, None, HW, remat_policy=p).hardware for p in REMAT_POLICIES}
  assert hw["none"] == hw["dots_saveable"] < hw["offload"] == hw["dots_with_no_batch_dims_saveable"] < hw["full"]
  # With splash for every call: its backward's recomputation under every policy, and its forward re-run by the
  # policies that save dots (a custom call is not one) and by full remat (already counted there as attention).
  splash = {p: flops.train_step_flops("stage1", unet, None, HW, remat_policy=p, splash=lambda nq, nk: True).hardware
            for p in REMAT_POLICIES}
  assert splash["none"] > hw["none"] and splash["dots_saveable"] > splash["none"]
  assert splash["full"] - hw["full"] == pytest.approx(splash["none"] - hw["none"])
  assert splash["dots_saveable"] - splash["none"] == pytest.approx(
      flops.train_step_flops("stage1", unet, None, HW).model - hw["none"] + splash["dots_saveable"] - splash["none"])
