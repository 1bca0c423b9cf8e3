"""The Pose Controller (ControlNet) vs diffusers' `ControlNetModel`, and its key tables.

Tolerance: max |ours - diffusers| <= 1e-4 in float32 for every down residual and the mid
residual (and for the UNet output driven by them). diffusers zero-initialises the zero
convs and the hint encoder's last conv, which would make every residual 0 and the parity
test vacuous: the reference model perturbs them (and the norms) first, and the test checks
the residuals are not small.
"""

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from test_unet_parity import CONFIGS

from magicpose_jax.convert.controlnet import (
  LDM_CONTROLNET_PREFIX,
  MAGICPOSE_POSE_PREFIX,
  controlnet_key_table,
  ldm_controlnet_key_table,
  load_controlnet,
  load_ldm_controlnet,
  save_controlnet,
)
from magicpose_jax.convert.diffusers import unet_key_table
from magicpose_jax.convert.keytable import ConversionError
from magicpose_jax.models.controlnet import (
  ControlNetConfig,
  ControlNetModel,
  controlnet_params_from_unet,
  is_zero_initialised,
)
from magicpose_jax.models.unet import VARIANTS, UNet2DConditionModel, UNetConfig
from magicpose_jax.torch_reference import nchw, nhwc, perturb_norms, state_dict_numpy, torch_unet

ATOL = 1e-4
HINT = (8, 16, 16, 32)  # a narrow hint encoder; 3 stride-2 convs, so the image is 8x the latent as in SD
CN_CONFIGS = {name: ControlNetConfig.from_unet(CONFIGS[name], conditioning_embedding_out_channels=HINT)
              for name in ("sd1", "sd2")}
LATENT = 16


def torch_controlnet(config: ControlNetConfig, seed: int) -> TorchControlNet:
  """diffusers' ControlNet, random init, with the zero convs / hint `conv_out` and the norms perturbed."""
  torch.manual_seed(seed)
  model = TorchControlNet(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}).eval()
  perturb_norms(model, seed)
  gen = torch.Generator().manual_seed(seed + 2)
  zero = list(model.controlnet_down_blocks) + [model.controlnet_mid_block, model.controlnet_cond_embedding.conv_out]
  with torch.no_grad():
    for conv in zero:
      fan_in = conv.weight[0].numel()
      conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / fan_in ** 0.5)
      conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=gen))
    # PyTorch's default init shrinks the hint on its way through the encoder, to a near-constant map: re-draw
    # the encoder's convs so the signal carries, then scale its last conv so the part of the hint that depends
    # on the image is of unit scale (else the condition, and its channel order, barely matter).
    hint = model.controlnet_cond_embedding
    for conv in [hint.conv_in, *hint.blocks]:
      conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (3 / conv.weight[0].numel()) ** 0.5)
      conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=gen))
    f = config.downsample_factor
    probe = torch.rand((1, config.conditioning_channels, f * LATENT, f * LATENT), generator=gen)
    hint.conv_out.weight.mul_(1.0 / (hint(probe) - hint(probe.flip(1))).std())
  return model


def _inputs(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((batch, LATENT, LATENT, config.in_channels), dtype=np.float32)
  t = rng.integers(0, 1000, size=(batch,)).astype(np.float32)
  context = rng.standard_normal((batch, 7, config.cross_attention_dim), dtype=np.float32)
  f = config.downsample_factor
  cond = rng.uniform(0, 1, size=(batch, f * LATENT, f * LATENT, config.conditioning_channels)).astype(np.float32)
  return sample, t, context, cond


def _torch_residuals(model, sample, t, context, cond, scale=1.0):
  with torch.no_grad():
    down, mid = model(nchw(sample), torch.from_numpy(t), torch.from_numpy(context), nchw(cond),
                      conditioning_scale=scale, return_dict=False)
  return [nhwc(d) for d in down], nhwc(mid)


def _check(ours, ref):
  assert ours.shape == ref.shape
  assert np.std(ref) > 0.05, "reference output is too small for the tolerance to mean anything"
  err = float(np.abs(np.asarray(ours) - ref).max())
  assert err <= ATOL, f"max abs error {err:.3g} > {ATOL}"
  return err


def _check_residuals(ours, ref):
  down, mid = ours
  ref_down, ref_mid = ref
  assert len(down) == len(ref_down) == 9  # 1 + 3 levels x 2 layers + 2 downsamplers (12 for SD)
  return max([_check(a, b) for a, b in zip(down, ref_down, strict=True)] + [_check(mid, ref_mid)])


@pytest.fixture(scope="module", params=list(CN_CONFIGS))
def pair(request):
  config = CN_CONFIGS[request.param]
  model = torch_controlnet(config, seed=50)
  params = controlnet_key_table(config).to_flax(state_dict_numpy(model))
  return config, model, params


@pytest.fixture(scope="module")
def apply_fns():
  """One jitted apply per config (jit caches on the static module)."""
  cache = {}

  def get(config):
    if config not in cache:
      model = ControlNetModel(config)
      cache[config] = jax.jit(lambda p, x, t, c, h, s: model.apply({"params": p}, x, t, c, h, s))
    return cache[config]

  return get


def test_controlnet_matches_diffusers(pair, apply_fns):
  config, tmodel, params = pair
  sample, t, context, cond = _inputs(config)
  ours = apply_fns(config)(params, sample, t, context, cond, 1.0)
  err = _check_residuals(ours, _torch_residuals(tmodel, sample, t, context, cond))
  print(f"max abs error {err:.3g}")


def test_conditioning_scale_and_bgr_match_diffusers(pair, apply_fns):
  config, tmodel, params = pair
  sample, t, context, cond = _inputs(config, seed=1)
  ours = apply_fns(config)(params, sample, t, context, cond, 0.5)
  _check_residuals(ours, _torch_residuals(tmodel, sample, t, context, cond, scale=0.5))

  if config != CN_CONFIGS["sd1"]:
    return  # the channel flip does not depend on the UNet layout; one config keeps the file fast
  bgr = config.replace(controlnet_conditioning_channel_order="bgr")
  tbgr = TorchControlNet(**{k: v for k, v in bgr.to_diffusers().items() if not k.startswith("_")}).eval()
  tbgr.load_state_dict(tmodel.state_dict())
  ours_bgr = apply_fns(bgr)(params, sample, t, context, cond, 1.0)
  _check_residuals(ours_bgr, _torch_residuals(tbgr, sample, t, context, cond))
  # The flip must matter: the same weights in rgb order give other residuals.
  rgb = apply_fns(config)(params, sample, t, context, cond, 1.0)
  assert np.abs(np.asarray(rgb[0][0]) - np.asarray(ours_bgr[0][0])).max() > 100 * ATOL


@pytest.fixture(scope="module")
def unet_pair():
  tunet = torch_unet(CONFIGS["sd1"], seed=51)
  return tunet, unet_key_table(CONFIGS["sd1"]).to_flax(state_dict_numpy(tunet))


@pytest.fixture(scope="module")
def unet_apply():
  model = UNet2DConditionModel(CONFIGS["sd1"])
  plain = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  controlled = jax.jit(lambda p, x, t, c, d, m: model.apply({"params": p}, x, t, c, d, m))
  return plain, controlled


def test_unet_driven_by_controlnet_matches_diffusers(unet_pair, unet_apply, apply_fns):
  config = CN_CONFIGS["sd1"]
  tcn = torch_controlnet(config, seed=52)
  cn_params = controlnet_key_table(config).to_flax(state_dict_numpy(tcn))
  tunet, unet_params = unet_pair
  sample, t, context, cond = _inputs(config, seed=2)
  down, mid = apply_fns(config)(cn_params, sample, t, context, cond, 1.0)
  ours = unet_apply[1](unet_params, sample, t, context, down, mid)
  with torch.no_grad():
    tdown, tmid = tcn(nchw(sample), torch.from_numpy(t), torch.from_numpy(context), nchw(cond), return_dict=False)
    ref = nhwc(tunet(nchw(sample), torch.from_numpy(t), torch.from_numpy(context),
                     down_block_additional_residuals=tdown, mid_block_additional_residual=tmid).sample)
  err = _check(ours, ref)
  print(f"max abs error {err:.3g}")
  with torch.no_grad():
    plain = nhwc(tunet(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)
  assert np.abs(plain - ref).max() > 100 * ATOL  # the residuals really steer the UNet


def _assert_zero_and_no_effect(config, cn_params, unet_params, unet_apply, apply_fns):
  assert is_zero_initialised(cn_params)
  sample, t, context, cond = _inputs(config, seed=3)
  down, mid = apply_fns(config)(cn_params, sample, t, context, cond, 1.0)
  assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
  plain = np.asarray(unet_apply[0](unet_params, sample, t, context))
  controlled = np.asarray(unet_apply[1](unet_params, sample, t, context, down, mid))
  assert controlled.tobytes() == plain.tobytes()


def test_init_is_zero_initialised(apply_fns):
  """`init` zeroes the zero convs and the hint's `conv_out`: residuals exactly 0 (what that does to the UNet
  is checked with the same all-zero residuals in `test_params_from_unet_copy_shared_subtrees`)."""
  # A 2-level config: compiling `init` (one random draw per param) costs more than the model's forward.
  config = ControlNetConfig.from_unet(VARIANTS["tiny"], conditioning_embedding_out_channels=HINT)
  sample, t, context, cond = _inputs(config, batch=1)
  params = jax.jit(ControlNetModel(config).init)(jax.random.key(0), sample, t, context, cond)["params"]
  assert is_zero_initialised(params)
  assert np.any(np.asarray(params["controlnet_cond_embedding"]["blocks_0"]["kernel"]))  # the rest is random
  down, mid = apply_fns(config)(params, sample, t, context, cond, 1.0)
  assert len(down) == config.num_down_residuals == 4
  assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))


def test_params_from_unet_copy_shared_subtrees(unet_pair, unet_apply, apply_fns):
  config = CN_CONFIGS["sd1"]
  unet_params = unet_pair[1]
  params = controlnet_params_from_unet(unet_params, config, jax.random.key(1))
  shared = ["conv_in", "time_embedding", "mid_block"] + [f"down_blocks_{i}" for i in range(3)]
  for name in shared:
    ours, theirs = jax.tree_util.tree_flatten_with_path(params[name])[0], jax.tree.leaves(unet_params[name])
    assert len(ours) == len(theirs) > 0
    for (path, a), b in zip(ours, theirs, strict=True):
      assert np.asarray(a).dtype == np.asarray(b).dtype
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), f"{name}{jax.tree_util.keystr(path)}"
  # Same tree as `init` gives, so the table and the model take it.
  assert controlnet_key_table(config).to_torch(params).keys() == controlnet_key_table(config).by_torch.keys()
  assert np.any(np.asarray(params["controlnet_cond_embedding"]["blocks_5"]["kernel"]))
  _assert_zero_and_no_effect(config, params, unet_params, unet_apply, apply_fns)
  # A UNet of another width is refused, naming the mismatched leaf.
  with pytest.raises(ValueError, match=r"conv_in\['kernel'\]"):
    controlnet_params_from_unet(unet_params, config.replace(block_out_channels=(64, 64, 64)), jax.random.key(1))
  # The hint encoder is a host draw from the key: the same key gives the same bytes, another key others, and the
  # spread is flax's LeCun rule (std 1/sqrt(fan_in)) like `init`'s.
  hint = lambda key: controlnet_params_from_unet(unet_params, config, key)["controlnet_cond_embedding"]
  again, other = hint(jax.random.key(1)), hint(jax.random.key(2))
  for a, b, c in zip(*(jax.tree.leaves(t) for t in (params["controlnet_cond_embedding"], again, other)), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert not np.any(a) or np.asarray(a).tobytes() != np.asarray(c).tobytes()
  kernel = np.asarray(params["controlnet_cond_embedding"]["blocks_5"]["kernel"])
  assert abs(kernel.std() * np.sqrt(np.prod(kernel.shape[:-1])) - 1) < 0.1
  with pytest.raises(TypeError, match="outside jit"):
    jax.jit(lambda k: controlnet_params_from_unet(unet_params, config, k))(jax.random.key(1))


def test_diffusers_round_trip_and_folder(pair, tmp_path):
  config, tmodel, params = pair
  sd = state_dict_numpy(tmodel)
  back = controlnet_key_table(config).to_torch(params)
  assert back.keys() == sd.keys()
  assert all(back[k].tobytes() == v.tobytes() for k, v in sd.items())

  save_controlnet(config, params, tmp_path)
  loaded, info = TorchControlNet.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert all(v.numpy().tobytes() == sd[k].tobytes() for k, v in loaded.state_dict().items())
  assert loaded.config.controlnet_conditioning_channel_order == "rgb"
  assert tuple(loaded.config.conditioning_embedding_out_channels) == HINT
  # diffusers' own save reads back through ours.
  tmodel.save_pretrained(tmp_path / "theirs")
  config2, params2 = load_controlnet(tmp_path / "theirs")
  assert config2 == config
  again = controlnet_key_table(config2).to_torch(params2)
  assert all(again[k].tobytes() == v.tobytes() for k, v in sd.items())


def test_ldm_names_match_diffusers_single_file_converter(pair):
  config, tmodel, params = pair
  sd = state_dict_numpy(tmodel)
  ldm = ldm_controlnet_key_table(config).to_torch(params)
  assert all(k.startswith(LDM_CONTROLNET_PREFIX) for k in ldm)
  # diffusers' converter (independent of our table) must map every original tensor back to the right diffusers one.
  back = convert_controlnet_checkpoint(ldm, config.to_diffusers())
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert np.asarray(back[k]).tobytes() == v.tobytes(), k
  # ... also for a file with no prefix (e.g. thibaud/controlnet-sd21), and our reader takes it back bit-exactly.
  bare = ldm_controlnet_key_table(config, "").to_torch(params)
  assert "time_embed.0.weight" in bare
  assert {k: np.asarray(v).tobytes() for k, v in convert_controlnet_checkpoint(bare, config.to_diffusers()).items()} \
      == {k: v.tobytes() for k, v in sd.items()}
  again = controlnet_key_table(config).to_torch(ldm_controlnet_key_table(config).to_flax(ldm))
  assert all(again[k].tobytes() == v.tobytes() for k, v in sd.items())


def test_ldm_names_hand_checked():
  """Names from the original cldm.py layout (SD 1.5: 12 zero convs, 8 hint convs)."""
  keys = set(ldm_controlnet_key_table(ControlNetConfig(), MAGICPOSE_POSE_PREFIX).by_torch)
  assert len(keys) == 340  # control_v11p_sd15_openpose.pth holds 340 control_model.* tensors
  expected = ["time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
              "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.1.proj_in.weight",
              "input_blocks.3.0.op.weight", "input_blocks.11.0.out_layers.3.bias",
              "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.emb_layers.1.weight",
              "zero_convs.0.0.weight", "zero_convs.11.0.bias", "middle_block_out.0.weight",
              "input_hint_block.0.weight", "input_hint_block.2.weight", "input_hint_block.12.bias",
              "input_hint_block.14.weight"]
  assert not [k for k in expected if MAGICPOSE_POSE_PREFIX + k not in keys]
  assert not [k for k in keys if "output_blocks" in k or ".out." in k or "input_hint_block.1." in k]


def test_load_ldm_controlnet_reads_only_its_prefix(pair, tmp_path):
  config, _, params = pair
  ldm = ldm_controlnet_key_table(config, MAGICPOSE_POSE_PREFIX).to_torch(params)
  other = {"model.diffusion_model.conv_in.weight": np.zeros((2, 2), np.float32)}
  path = tmp_path / "magicpose.safetensors"
  safetensors.numpy.save_file({**ldm, **other}, str(path))
  loaded = load_ldm_controlnet(path, config, MAGICPOSE_POSE_PREFIX)
  assert all(a.tobytes() == b.tobytes() for a, b in zip(controlnet_key_table(config).to_torch(loaded).values(),
                                                        controlnet_key_table(config).to_torch(params).values(),
                                                        strict=True))
  with pytest.raises(ConversionError, match="no tensors under the prefix 'control_model.'"):
    load_ldm_controlnet(path, config)


def test_strict_errors_name_keys(pair):
  config, tmodel, _ = pair
  sd = state_dict_numpy(tmodel)
  broken = {k: v for k, v in sd.items() if k != "controlnet_down_blocks.3.weight"}
  broken["controlnet_down_blocks.99.weight"] = sd["controlnet_down_blocks.3.weight"]
  broken["controlnet_mid_block.bias"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as e:
    controlnet_key_table(config).to_flax(broken, source="cn.safetensors")
  msg = str(e.value)
  assert "cn.safetensors" in msg and "controlnet_down_blocks.3.weight" in msg
  assert "controlnet_down_blocks.99.weight" in msg and "controlnet_mid_block.bias: got (3,)" in msg
  ldm = {k.removeprefix(LDM_CONTROLNET_PREFIX): v for k, v in
         ldm_controlnet_key_table(config).to_torch(controlnet_key_table(config).to_flax(sd)).items()}
  with pytest.raises(ConversionError, match=r"missing \(\d+\)") as e:  # the prefix is part of every name
    ldm_controlnet_key_table(config).to_flax(ldm)
  assert "control_model.input_hint_block.0.bias" in str(e.value) and "unexpected" in str(e.value)


def test_config_round_trip_and_strictness(tmp_path):
  config = CN_CONFIGS["sd2"].replace(controlnet_conditioning_channel_order="bgr")
  assert ControlNetConfig.from_diffusers(config.to_diffusers()) == config
  assert ControlNetConfig().unet_config().replace(sample_size=64) == UNetConfig()  # SD 1.5's UNet
  d = config.to_diffusers()
  with pytest.raises(ValueError, match=r"global_pool_conditions=True \(only False is supported\)") as e:
    ControlNetConfig.from_diffusers({**d, "sample_size": 64, "global_pool_conditions": True})
  assert "sample_size (unknown key)" in str(e.value)
  with pytest.raises(ValueError, match=r"controlnet_conditioning_channel_order='xyz'"):
    ControlNetConfig.from_diffusers({**d, "controlnet_conditioning_channel_order": "xyz"})
  with pytest.raises(ValueError, match="_class_name is 'UNet2DConditionModel'"):
    ControlNetConfig.from_diffusers(CONFIGS["sd1"].to_diffusers())
  with pytest.raises(ValueError, match="per-level layers_per_block"):
    ControlNetConfig.from_unet(CONFIGS["sd1"].replace(layers_per_block=(1, 2, 1)))
  # diffusers' defaults for keys a config.json leaves out (cross_attention_dim 1280).
  assert ControlNetConfig.from_diffusers({"_class_name": "ControlNetModel"}).cross_attention_dim == 1280


def test_condition_shape_is_checked():
  config = CN_CONFIGS["sd1"]
  sample, t, context, cond = _inputs(config, batch=1)
  with pytest.raises(ValueError, match=r"controlnet_cond: expected \[1, 128, 128, 3\]"):
    ControlNetModel(config).init(jax.random.key(0), sample, t, context, cond[:, :64, :64])
