"""LDM (original Stable Diffusion) key tables: names checked against diffusers' own single-file converter."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from test_unet_parity import CONFIGS

from magicpose_jax.convert.diffusers import unet_key_table
from magicpose_jax.convert.ldm import ldm_unet_key_table, ldm_vae_key_table
from magicpose_jax.convert.vae import vae_key_table
from magicpose_jax.models.vae import VAE_VARIANTS
from magicpose_jax.torch_reference import state_dict_numpy, torch_unet


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_ldm_unet_names_match_diffusers_single_file_converter(name):
  config = CONFIGS[name]
  sd = state_dict_numpy(torch_unet(config, seed=40))
  params = unet_key_table(config).to_flax(sd)
  ldm = ldm_unet_key_table(config).to_torch(params)
  # diffusers' converter (independent of our table) must map every LDM tensor back to the right diffusers one.
  back = convert_ldm_unet_checkpoint(ldm, config.to_diffusers())
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert np.asarray(back[k]).tobytes() == v.tobytes(), k
  # and our reader takes the LDM dict back bit-exactly.
  again = ldm_unet_key_table(config).to_flax(ldm)
  assert all(np.array_equal(a, b) for a, b in zip(unet_key_table(config).to_torch(again).values(),
                                                  unet_key_table(config).to_torch(params).values(), strict=True))


def test_ldm_unet_names_hand_checked():
  """Names from CompVis' openaimodel.py layout (SD 1.x pattern, 3 levels of 2 layers)."""
  keys = set(ldm_unet_key_table(CONFIGS["sd1"]).by_torch)
  expected = [
      "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.time_embed.2.bias",
      "model.diffusion_model.input_blocks.0.0.weight",
      "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",  # GroupNorm of the first resnet
      "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight",
      "model.diffusion_model.input_blocks.1.0.out_layers.3.weight",
      "model.diffusion_model.input_blocks.1.1.proj_in.weight",
      "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
      "model.diffusion_model.input_blocks.3.0.op.weight",  # first downsampler
      "model.diffusion_model.input_blocks.4.0.skip_connection.weight",  # 32 -> 64 channels
      "model.diffusion_model.input_blocks.6.0.op.bias",
      "model.diffusion_model.input_blocks.8.0.in_layers.2.weight",
      "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
      "model.diffusion_model.middle_block.2.out_layers.0.bias",
      "model.diffusion_model.output_blocks.2.1.conv.weight",  # upsampler after an attention-free block
      "model.diffusion_model.output_blocks.5.2.conv.weight",  # upsampler after a cross-attention block
      "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.attn2.to_out.0.bias",
      "model.diffusion_model.out.0.weight", "model.diffusion_model.out.2.bias",
  ]
  assert not [k for k in expected if k not in keys]


def test_ldm_prefix_is_configurable():
  table = ldm_unet_key_table(CONFIGS["sd1"], prefix="appearance_control_model.")
  assert all(k.startswith("appearance_control_model.") for k in table.by_torch)
  assert "appearance_control_model.input_blocks.0.0.weight" in table.by_torch


@pytest.mark.parametrize("variant", ["tiny", "sd15"])
def test_ldm_vae_names_match_diffusers_single_file_converter(variant):
  config = VAE_VARIANTS[variant]
  torch.manual_seed(41)
  tvae = TorchVAE(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")})
  sd = state_dict_numpy(tvae)
  params = vae_key_table(config).to_flax(sd)
  ldm = ldm_vae_key_table(config).to_torch(params)
  assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convs in LDM files
  back = convert_ldm_vae_checkpoint(ldm, config.to_diffusers())
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert np.asarray(back[k]).tobytes() == v.tobytes(), k
  again = vae_key_table(config).to_torch(ldm_vae_key_table(config).to_flax(ldm))
  assert all(again[k].tobytes() == v.tobytes() for k, v in sd.items())
