"""The released MagicPose checkpoint layout: import -> export bit-exact, prefixes, stage errors."""

import jax
import numpy as np
import pytest
import safetensors.numpy
from test_stable_diffusion_files import TINY

from magicpose_jax.convert.controlnet import ldm_controlnet_key_table
from magicpose_jax.convert.keytable import ConversionError
from magicpose_jax.convert.magicpose import (
    appearance_key_table,
    load_magicpose_checkpoint,
    save_magicpose_checkpoint,
)
from magicpose_jax.convert.stable_diffusion import ldm_tables
from magicpose_jax.models.controlnet import ControlNetConfig
from magicpose_jax.models.magicpose import MagicPose, MagicPoseConfig

POSE = ControlNetConfig.from_unet(TINY.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))


def _release_file(path, appearance_prefix="appearance_control_model.", with_pose=True):
  """A file in the release layout, random values, built from the tables' PyTorch shapes."""
  rng = np.random.default_rng(80)
  tables = [*ldm_tables(TINY).values(), appearance_key_table(TINY.unet, appearance_prefix)]
  if with_pose:
    tables.append(ldm_controlnet_key_table(POSE, "pose_control_model."))
  sd = {e.torch_key: rng.standard_normal(e.torch_shape).astype(np.float32) for t in tables for e in t.entries}
  # What the release stores and never uses: the appearance net's hint encoder and DDPM buffers.
  sd[appearance_prefix + "input_hint_block.0.weight"] = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
  sd[appearance_prefix + "input_hint_block.14.bias"] = rng.standard_normal(32).astype(np.float32)
  sd["betas"] = np.linspace(1e-4, 2e-2, 1000, dtype=np.float64)  # a float64 buffer, as LDM saves it
  sd["alphas_cumprod"] = np.cumprod(1 - sd["betas"]).astype(np.float32)
  safetensors.numpy.save_file(sd, path)
  return sd


def test_import_export_is_bit_exact(tmp_path):
  sd = _release_file(tmp_path / "magicpose.safetensors")
  params = load_magicpose_checkpoint(tmp_path / "magicpose.safetensors", TINY, POSE)
  assert set(params) == {"unet", "vae", "text_encoder", "appearance", "pose", "extras"}
  assert "conv_out" not in params["appearance"]  # the release's appearance net has no output head
  assert set(params["extras"]) == {"appearance_control_model.input_hint_block.0.weight",
                                   "appearance_control_model.input_hint_block.14.bias", "betas", "alphas_cumprod"}
  save_magicpose_checkpoint(TINY, params, tmp_path / "out.safetensors", POSE)
  back = safetensors.numpy.load_file(tmp_path / "out.safetensors")
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
  # Imported params drive our model (the appearance net without its output head).
  model = MagicPose(MagicPoseConfig(TINY.unet, POSE))
  z = np.zeros((1, 16, 16, 4), np.float32)
  text = np.zeros((1, 7, TINY.unet.cross_attention_dim), np.float32)
  states = jax.jit(model.reference_states)(params, z, np.array([10.0], np.float32), text)
  assert len(states) == TINY.unet.num_reference_states


def test_names_follow_the_release(tmp_path):
  sd = _release_file(tmp_path / "m.safetensors")
  for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight",
              "appearance_control_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight",
              "appearance_control_model.output_blocks.2.1.transformer_blocks.0.attn1.to_v.weight",
              "pose_control_model.zero_convs.0.0.weight", "pose_control_model.middle_block_out.0.bias",
              "pose_control_model.input_hint_block.14.weight", "first_stage_model.decoder.conv_out.weight",
              "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
    assert key in sd, key
  assert not any(k.startswith("appearance_control_model.out.") for k in sd)


def test_stage1_prefix_needs_the_flag(tmp_path):
  sd = _release_file(tmp_path / "stage1.safetensors", appearance_prefix="control_model.", with_pose=False)
  with pytest.raises(ConversionError, match="appearance_prefix='control_model.'"):
    load_magicpose_checkpoint(tmp_path / "stage1.safetensors", TINY)
  params = load_magicpose_checkpoint(tmp_path / "stage1.safetensors", TINY, appearance_prefix="control_model.")
  assert "pose" not in params
  save_magicpose_checkpoint(TINY, params, tmp_path / "back.safetensors", appearance_prefix="control_model.")
  back = safetensors.numpy.load_file(tmp_path / "back.safetensors")
  assert set(back) == set(sd) and all(back[k].tobytes() == v.tobytes() for k, v in sd.items())


def test_unknown_tensor_is_named(tmp_path):
  sd = _release_file(tmp_path / "m.safetensors")
  sd["pose_control_model.extra.weight"] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(sd, tmp_path / "bad.safetensors")
  with pytest.raises(ConversionError, match="pose_control_model.extra.weight"):
    load_magicpose_checkpoint(tmp_path / "bad.safetensors", TINY, POSE)
