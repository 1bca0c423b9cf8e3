"""Stage 2's pose net from a pretrained ControlNet (`config.model.pose_init="controlnet"`, the release's choice):
a diffusers folder or an original-layout file becomes the run's initial pose params exactly; a ControlNet of another
architecture, a file without ControlNet tensors and a missing or stray `pose_path` are refused, naming what is
wrong, before anything compiles."""

import jax
import numpy as np
import pytest
import safetensors.numpy
from test_train_step import flat, tiny

from magicpose_jax.convert.controlnet import ldm_controlnet_key_table, save_controlnet
from magicpose_jax.convert.keytable import ConversionError
from magicpose_jax.models.controlnet import abstract_controlnet_params
from magicpose_jax.train import loop, stages
from magicpose_jax.train.validate import ConfigError, check_config


def _pose_config(config):
  return stages.networks(config, stages.variant_configs(config)).model.config.pose


def _random_controlnet(pose, seed=0):
  """Random tensors of the pose net's shapes (non-zero zero-convs too: a pretrained ControlNet's are trained)."""
  rng = np.random.default_rng(seed)
  abstract = abstract_controlnet_params(pose)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  config = tiny(stage="stage2")
  pose = _pose_config(config)
  params = _random_controlnet(pose)
  root = tmp_path_factory.mktemp("controlnet")
  save_controlnet(pose, params, str(root / "diffusers"))
  for name, prefix in (("control.safetensors", "control_model."), ("release.safetensors", "pose_control_model.")):
    tensors = ldm_controlnet_key_table(pose, prefix).to_torch(params)
    # A release file also holds the UNet's and other nets' tensors: those are not read.
    safetensors.numpy.save_file({**tensors, "model.diffusion_model.out.0.weight": np.ones(4, np.float32)},
                                str(root / name))
  return root, pose, flat({"pose": params})


@pytest.mark.parametrize("name", ["diffusers", "control.safetensors", "release.safetensors"])
@pytest.mark.parametrize("use_appearance", [True, False])
def test_the_run_starts_from_the_controlnet(written, name, use_appearance):
  root, _, expected = written
  run = loop.setup(tiny(stage="stage2", **{"model.pose_init": "controlnet", "model.pose_path": str(root / name),
                                           "model.use_appearance": use_appearance}))
  params = flat(run.state.params)
  assert sorted(k for k in params if k.startswith("pose/")) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  assert ("appearance/conv_in/kernel" in params) == use_appearance


def test_another_architecture_is_refused_naming_the_field(written, tmp_path):
  _, pose, _ = written
  other = pose.replace(conditioning_embedding_out_channels=(8, 16, 32))
  save_controlnet(other, _random_controlnet(other), str(tmp_path / "other"))
  with pytest.raises(ValueError, match=r"not the run's pose net(.|\n)*conditioning_embedding_out_channels: file "
                     r"\(8, 16, 32\), run \(16, 32\)"):
    loop.setup(tiny(stage="stage2", **{"model.pose_init": "controlnet", "model.pose_path": str(tmp_path / "other")}))
  # An original-layout file of another shape: every mis-shaped tensor is named.
  tensors = ldm_controlnet_key_table(other, "control_model.").to_torch(_random_controlnet(other))
  safetensors.numpy.save_file(tensors, str(tmp_path / "other.safetensors"))
  with pytest.raises(ConversionError, match=r"control_model\.input_hint_block\.0\.weight"):
    loop.setup(tiny(stage="stage2", **{"model.pose_init": "controlnet",
                                       "model.pose_path": str(tmp_path / "other.safetensors")}))


def test_a_file_without_controlnet_tensors_is_refused(tmp_path):
  path = str(tmp_path / "unet.safetensors")
  safetensors.numpy.save_file({"model.diffusion_model.out.0.weight": np.ones(4, np.float32)}, path)
  with pytest.raises(ValueError, match=r"unet.safetensors: no tensors under 'control_model.' or 'pose_control_model."):
    loop.setup(tiny(stage="stage2", **{"model.pose_init": "controlnet", "model.pose_path": path}))


def test_pose_path_is_checked_with_the_config(tmp_path):
  with pytest.raises(ConfigError, match=r"pose_init='controlnet' needs config.model.pose_path"):
    check_config(tiny(stage="stage2", **{"model.pose_init": "controlnet"}))
  with pytest.raises(ConfigError, match=r"config.model.pose_path='.*/nowhere': no such file or folder"):
    check_config(tiny(stage="stage2", **{"model.pose_init": "controlnet",
                                         "model.pose_path": str(tmp_path / "nowhere")}))
  with pytest.raises(ConfigError, match=r"pose_path='.*' is read only with config.model.pose_init='controlnet' \(it "
                     r"is 'appearance'\)"):
    check_config(tiny(stage="stage2", **{"model.pose_path": str(tmp_path)}))
  with pytest.raises(ConfigError, match=r"config.model.pose_init='copy': expected one of \('appearance', 'sd', "
                     r"'controlnet'\)"):
    check_config(tiny(stage="stage2", **{"model.pose_init": "copy"}))
