"""UNet options with no PyTorch counterpart: remat, compute dtype, attention backend, config checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_unet_parity import _inputs

from magicpose_jax.models.random_init import random_params
from magicpose_jax.models.unet import VARIANTS, UNet2DConditionModel, UNetConfig, abstract_unet_params


@pytest.fixture(scope="module")
def setup():
  config = VARIANTS["tiny"]
  sample, t, context = _inputs(config, seed=20)
  params = random_params(abstract_unet_params(config), 0)  # a jitted `init` would compile for tens of seconds
  return config, params, (sample, t, context)


def _loss(config, params, inputs, **kw):
  return jnp.mean(UNet2DConditionModel(config, **kw).apply({"params": params}, *inputs) ** 2)


@pytest.fixture(scope="module")
def plain_grads(setup):
  config, params, inputs = setup
  return jax.jit(jax.value_and_grad(lambda p: _loss(config, p, inputs)))(params)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "offload"])
def test_remat_same_params_outputs_and_grads(setup, plain_grads, policy):
  config, params, inputs = setup
  remat = config.replace(remat_policy=policy)
  shapes = jax.eval_shape(UNet2DConditionModel(remat).init, jax.random.key(0), *inputs)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  (l0, g0) = plain_grads
  (l1, g1) = jax.jit(jax.value_and_grad(lambda p: _loss(remat, p, inputs)))(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_offload_policy_moves_saved_projections_to_host(setup):
  """`offload` keeps the projections' outputs in host memory (CPU included: there it is the same memory, so it
  behaves like dots_with_no_batch_dims_saveable); the saving policies keep them on the device."""
  config, params, inputs = setup
  jaxpr = lambda policy: str(jax.make_jaxpr(jax.grad(lambda p: _loss(config.replace(remat_policy=policy), p,
                                                                    inputs)))(params))
  assert "<host>" in jaxpr("offload")
  assert "<host>" not in jaxpr("dots_with_no_batch_dims_saveable")


def test_dot_product_backend_matches_xla(setup):
  config, params, inputs = setup
  a = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, *inputs)
  b = jax.jit(UNet2DConditionModel(config.replace(attention_backend="dot_product")).apply)(
      {"params": params}, *inputs)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_bf16_compute_close_to_fp32(setup):
  config, params, inputs = setup
  ref = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, *inputs)
  out = jax.jit(UNet2DConditionModel(config, dtype=jnp.bfloat16).apply)({"params": params}, *inputs)
  assert out.dtype == jnp.float32  # conv_out runs in float32
  rel = np.linalg.norm(np.asarray(out) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
  assert rel < 0.05, rel


def test_bf16_params():
  config = VARIANTS["tiny"]
  sample, t, context = _inputs(config)
  model = UNet2DConditionModel(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = jax.eval_shape(model.init, jax.random.key(0), sample, t, context)["params"]
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_bad_inputs_name_the_expected_shape():
  config = VARIANTS["tiny"]
  model = UNet2DConditionModel(config)
  sample, t, context = _inputs(config)
  with pytest.raises(ValueError, match=r"sample: expected \[B, H, W, 4\] \(NHWC\)"):
    jax.eval_shape(model.init, jax.random.key(0), sample.transpose(0, 3, 1, 2), t, context)
  with pytest.raises(ValueError, match=r"encoder_hidden_states: expected \[B, L, 32\]"):
    jax.eval_shape(model.init, jax.random.key(0), sample, t, context[..., :5])


def test_reference_counts_of_sd15():
  assert VARIANTS["sd15"].num_reference_states == 16
  assert VARIANTS["sd15"].num_down_residuals == 12


def test_from_diffusers_reads_sd_configs(tmp_path):
  sd15 = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
          "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
          "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
          "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
          "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
          "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
  (tmp_path / "config.json").write_text(json.dumps(sd15))
  assert UNetConfig.from_diffusers(tmp_path) == VARIANTS["sd15"]
  sd21 = {**sd15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
          "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
          "num_class_embeds": None, "only_cross_attention": False, "resnet_time_scale_shift": "default"}
  assert UNetConfig.from_diffusers(sd21) == VARIANTS["sd21"]
  # diffusers' own default for a missing cross_attention_dim is 1280, not SD 1.5's 768.
  assert UNetConfig.from_diffusers({k: v for k, v in sd15.items() if k != "cross_attention_dim"}
                                   ).cross_attention_dim == 1280


@pytest.mark.parametrize("entry, message", [
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep' \\(only None is supported\\)"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"some_new_key": 1}, "some_new_key \\(unknown key\\)"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}, "SimpleCrossAttnDownBlock2D"),
    ({"_class_name": "ControlNetModel"}, "expected 'UNet2DConditionModel'"),
    ({"cross_attention_dim": [32, 32]}, "per-level values are not supported"),
])
def test_from_diffusers_rejects_what_we_do_not_implement(entry, message):
  base = {k: v for k, v in VARIANTS["tiny"].to_diffusers().items()}
  with pytest.raises(ValueError, match=message):
    UNetConfig.from_diffusers({**base, **entry})


def test_missing_config_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    UNetConfig.from_diffusers(tmp_path)
