"""The MagicPose forward vs an independent PyTorch composition of diffusers' networks.

PyTorch side: diffusers' UNet (appearance) with attention processors that record every `attn1`
input, diffusers' ControlNetModel for the pose residuals, and the main diffusers UNet with `attn1`
processors that take keys/values over `[h ; r_i]` — all written in the tests, not our code.
Tolerance: max abs error <= 1e-4 in float32.
"""

import jax
import numpy as np
import pytest
import torch
from test_controlnet import CN_CONFIGS, torch_controlnet
from test_controlnet import _inputs as cn_inputs
from test_controlnet import _torch_residuals as torch_residuals
from test_unet_parity import ATOL, CONFIGS, _check

from magicpose_jax.convert.controlnet import controlnet_key_table
from magicpose_jax.convert.diffusers import unet_key_table
from magicpose_jax.models.magicpose import MagicPose, MagicPoseConfig, init_params
from magicpose_jax.torch_reference import ConcatKV, Record, nchw, nhwc, set_self_attention, state_dict_numpy, torch_unet

CONFIG = MagicPoseConfig(CONFIGS["sd1"], CN_CONFIGS["sd1"])


@pytest.fixture(scope="module")
def torch_nets():
  main, appearance = torch_unet(CONFIG.unet, seed=60), torch_unet(CONFIG.unet, seed=61)
  pose = torch_controlnet(CONFIG.pose, seed=62)
  table = unet_key_table(CONFIG.unet)
  params = {"unet": table.to_flax(state_dict_numpy(main)), "appearance": table.to_flax(state_dict_numpy(appearance)),
            "pose": controlnet_key_table(CONFIG.pose).to_flax(state_dict_numpy(pose))}
  return (main, appearance, pose), params


@pytest.fixture(scope="module")
def inputs():
  z_t, t, text, pose_image = cn_inputs(CONFIG.pose, seed=63)
  z_ref, _, _, _ = cn_inputs(CONFIG.pose, seed=64)
  return z_t, t, text, z_ref, pose_image


@pytest.fixture(scope="module")
def forward():
  model = MagicPose(CONFIG)
  return jax.jit(model.apply)


def test_magicpose_forward_matches_pytorch_composition(torch_nets, inputs, forward):
  (main, appearance, pose), params = torch_nets
  z_t, t, text, z_ref, pose_image = inputs
  recorded = []
  set_self_attention(appearance, lambda proc: Record(recorded, proc))
  with torch.no_grad():
    appearance(nchw(z_ref), torch.from_numpy(t), torch.from_numpy(text))  # same t and text as the main UNet
  down, mid = torch_residuals(pose, z_t, t, text, pose_image)
  queue = list(recorded)
  set_self_attention(main, lambda _: ConcatKV(lambda h: queue.pop(0)))
  with torch.no_grad():
    ref = nhwc(main(nchw(z_t), torch.from_numpy(t), torch.from_numpy(text),
                    down_block_additional_residuals=tuple(nchw(d) for d in down),
                    mid_block_additional_residual=nchw(mid)).sample)
  assert not queue
  _check(np.asarray(forward(params, z_t, t, text, z_ref, pose_image)), ref)


def test_ablations_and_row_switches(torch_nets, inputs, forward):
  _, params = torch_nets
  z_t, t, text, z_ref, pose_image = inputs
  plain = np.asarray(jax.jit(MagicPose(MagicPoseConfig(CONFIG.unet, None, use_appearance=False)).apply)(
      params, z_t, t, text))
  sd = np.asarray(jax.jit(MagicPose(CONFIG).unet.apply)({"params": params["unet"]}, z_t, t, text))
  np.testing.assert_array_equal(plain, sd)  # no controllers: exactly SD
  full = np.asarray(forward(params, z_t, t, text, z_ref, pose_image))
  assert np.abs(full - sd).max() > 100 * ATOL
  # Row 0 keeps both conditions, row 1 drops both (the unconditional branch of guidance).
  on = np.array([True, False])
  mixed = np.asarray(forward(params, z_t, t, text, z_ref, pose_image, on, on))
  np.testing.assert_allclose(mixed[0], full[0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], sd[1], atol=1e-5)


def test_zero_initialised_pose_controller_changes_nothing(torch_nets, inputs):
  _, params = torch_nets
  z_t, t, text, z_ref, pose_image = inputs
  fresh = init_params(CONFIG, params["unet"], jax.random.key(0), appearance_params=params["appearance"])
  for a, b in zip(jax.tree.leaves(fresh["appearance"]), jax.tree.leaves(params["appearance"]), strict=True):
    np.testing.assert_array_equal(a, b)
  with_pose = jax.jit(MagicPose(CONFIG).apply)
  without_pose = jax.jit(MagicPose(MagicPoseConfig(CONFIG.unet, None)).apply)
  a = np.asarray(with_pose(fresh, z_t, t, text, z_ref, pose_image))
  b = np.asarray(with_pose(fresh, z_t, t, text, z_ref, 1.0 - pose_image))
  c = np.asarray(without_pose(fresh, z_t, t, text, z_ref))
  np.testing.assert_array_equal(a, b)  # the pose image has no effect at init (ControlNet's zero convs)
  np.testing.assert_array_equal(a, c)


def test_missing_inputs_are_named(torch_nets, inputs):
  _, params = torch_nets
  z_t, t, text, _, pose_image = inputs
  with pytest.raises(ValueError, match="z_ref"):
    MagicPose(CONFIG).apply(params, z_t, t, text, None, pose_image)
  with pytest.raises(ValueError, match="no pose controller"):
    _ = MagicPose(MagicPoseConfig(CONFIG.unet, None)).pose_net


def test_pose_init_modes(torch_nets):
  _, params = torch_nets
  key = jax.random.key(1)
  from_sd = init_params(CONFIG, params["unet"], key, params["appearance"], pose_init="sd")
  from_app = init_params(CONFIG, params["unet"], key, params["appearance"])
  np.testing.assert_array_equal(from_sd["pose"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"])
  np.testing.assert_array_equal(from_app["pose"]["conv_in"]["kernel"], params["appearance"]["conv_in"]["kernel"])
  released = init_params(CONFIG, params["unet"], key, pose_params=params["pose"], pose_init="controlnet")
  for a, b in zip(jax.tree.leaves(released["pose"]), jax.tree.leaves(params["pose"]), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="pose_params are given exactly when"):
    init_params(CONFIG, params["unet"], key, pose_init="controlnet")
