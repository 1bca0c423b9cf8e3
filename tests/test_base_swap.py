"""Another SD 1.5 as the frozen base (`export.with_base`, `animate --base`, `convert --base`) on the tiny stage-2 run.

The bases are written from the run's own base (`save_stable_diffusion`): the same weights must give bit-identical
frames; a perturbed UNet or VAE must change them; another architecture must raise naming the difference.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image
from test_animate import read_mp4
from test_export_run import loaded_run, make_tiny_run

from magicpose_jax import export, inference
from magicpose_jax.animate import main as animate_main
from magicpose_jax.convert.__main__ import main as convert_main
from magicpose_jax.convert.stable_diffusion import COMPONENTS, save_ldm_checkpoint, save_stable_diffusion
from magicpose_jax.train.stages import random_base

OPTIONS = inference.AnimateOptions(steps=2, batch_frames=2)


def _perturbed(tree, seed: int):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + np.float32(0.05) * rng.standard_normal(np.shape(x)).astype(np.float32),
                      tree)


def _write_base(folder, sd, params) -> str:
  save_stable_diffusion(sd, {k: params[k] for k in COMPONENTS}, folder)
  return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("bases")
  model = loaded_run()
  same = _write_base(root / "same", model.sd, model.params)
  other = _write_base(root / "other", model.sd, {**model.params, "unet": _perturbed(model.params["unet"], 1),
                                                 "vae": _perturbed(model.params["vae"], 2)})
  rng = np.random.default_rng(0)
  reference = rng.integers(0, 256, (*model.image_size, 3), dtype=np.uint8)
  poses = np.zeros((2, *model.image_size, 3), np.uint8)
  poses[0, 8:24, 14:18] = 255  # two different pose images
  poses[1, 14:18, 8:24] = 255
  frames = inference.animate(model, reference, poses, OPTIONS)
  return root, model, same, other, reference, poses, frames


def test_the_same_weights_as_base_give_bit_identical_frames(setup):
  _, model, same, _, reference, poses, frames = setup
  swapped = export.with_base(model, same, same)
  assert swapped.info["swapped_base"] == {"unet": same, "vae": same}
  np.testing.assert_array_equal(inference.animate(swapped, reference, poses, OPTIONS), frames)


def test_another_base_changes_the_frames_and_keeps_the_controllers(setup):
  _, model, _, other, reference, poses, frames = setup
  unet_only = export.with_base(model, other)
  for name in ("appearance", "pose", "text_encoder", "vae"):
    assert unet_only.params[name] is model.params[name]
  assert not np.array_equal(inference.animate(unet_only, reference, poses, OPTIONS), frames)
  vae_only = export.with_base(model, vae=other)
  assert vae_only.params["unet"] is model.params["unet"]
  assert not np.array_equal(inference.animate(vae_only, reference, poses, OPTIONS), frames)


def test_a_mismatched_architecture_raises_naming_it(setup):
  root, model, same, _, _, _, _ = setup
  # A single file of the tiny SD is read as SD 1.5: the tensors SD 1.5 lacks are named.
  single = root / "tiny.safetensors"
  save_ldm_checkpoint(model.sd, {k: model.params[k] for k in COMPONENTS}, single)
  with pytest.raises(ValueError, match=r"read as SD 1.5's architecture.*unexpected tensors \(42\)"):
    export.with_base(model, single)
  # A folder of another UNet size: the config fields are named.
  other_size = dataclasses.replace(model.sd, unet=dataclasses.replace(model.sd.unet, layers_per_block=2))
  folder = _write_base(root / "deeper", other_size, jax.tree.map(np.asarray, random_base(other_size, 0)))
  with pytest.raises(ValueError, match=r"its unet is not the architecture.*\n    layers_per_block: the model's 1 vs "
                     r"the base's 2"):
    export.with_base(model, folder)
  # Same configs, but a UNet with a wider cross-attention (another text encoder): config field named.
  wider = dataclasses.replace(model.sd.unet, cross_attention_dim=2 * model.sd.unet.cross_attention_dim)
  sd = dataclasses.replace(model.sd, unet=wider)
  base = random_base(sd, 0)
  folder = _write_base(root / "wider", sd, jax.tree.map(np.asarray, base))
  with pytest.raises(ValueError, match="cross_attention_dim: the model's 32 vs the base's 64"):
    export.with_base(model, folder)
  # A mis-shaped weight (same config): named by its key.
  tree = dict(model.params["unet"])
  tree["conv_in"] = {**tree["conv_in"], "bias": np.zeros(7, np.float32)}
  assert "conv_in/bias: the model's shape (32,) vs the base's (7,)" in export._tree_mismatch(model.params["unet"],
                                                                                              tree)
  assert "missing conv_in/kernel (3, 3, 4, 32)" in export._tree_mismatch(
      model.params["unet"], {**model.params["unet"], "conv_in": {"bias": tree["conv_in"]["bias"]}})
  # A scheduler predicting another target.
  v_folder = root / "v_prediction"
  v_sd = dataclasses.replace(model.sd, scheduler=model.sd.scheduler.replace(prediction_type="v_prediction"))
  _write_base(v_folder, v_sd, model.params)
  with pytest.raises(ValueError, match="predicts 'v_prediction'"):
    export.with_base(model, v_folder)
  with pytest.raises(FileNotFoundError, match="no such Stable Diffusion folder"):
    export.with_base(model, root / "missing")
  with pytest.raises(ValueError, match="names 'AutoencoderKL', but the base's unet must be"):
    export.with_base(model, f"{same}/vae")


def test_animate_and_convert_with_base(setup, tmp_path, capsys):
  _, model, _, other, reference, poses, _ = setup
  ref_file = tmp_path / "reference.png"
  Image.fromarray(reference).save(ref_file)
  pose_dir = tmp_path / "poses"
  pose_dir.mkdir()
  for i, pose in enumerate(poses):
    Image.fromarray(pose).save(pose_dir / f"{i}.png")
  common = ["--reference", str(ref_file), "--poses", str(pose_dir), "--steps", "2", "--batch-frames", "2"]
  out = tmp_path / "over_other.png"
  assert animate_main(["--checkpoint", make_tiny_run(), "--base", other, "--base-vae", *common, "--out", str(out)]) \
      == 0, capsys.readouterr().err
  expected = inference.animate(export.with_base(model, other, other), reference, poses, OPTIONS)
  np.testing.assert_array_equal(np.asarray(Image.open(out)), np.concatenate(list(expected), axis=1))

  # convert --base writes the combination; animating the export gives the same frames (mp4 here: decoded count).
  dst = tmp_path / "export"
  assert convert_main(["--src", make_tiny_run(), "--dst", str(dst), "--to", "diffusers", "--base", other,
                       "--base-vae"]) == 0, capsys.readouterr().err
  assert json.loads((dst / "magicpose.json").read_text())["swapped_base"] == {"unet": other, "vae": other}
  np.testing.assert_array_equal(inference.animate(export.load_export(dst), reference, poses, OPTIONS), expected)
  mp4 = tmp_path / "from_export.mp4"
  assert animate_main(["--checkpoint", str(dst), *common, "--out", str(mp4)]) == 0, capsys.readouterr().err
  assert read_mp4(mp4).shape == (2, *model.image_size, 3)
  assert len(read_mp4(tmp_path / "from_export_side_by_side.mp4")) == 2

  # Errors: a bare --base-vae needs --base; --base on a Stable Diffusion source.
  with pytest.raises(SystemExit):
    animate_main(["--checkpoint", make_tiny_run(), "--base-vae", *common, "--out", str(out)])
  assert "--base-vae without a PATH" in capsys.readouterr().err
  assert convert_main(["--src", other, "--dst", str(tmp_path / "x"), "--to", "flax", "--base", other]) == 2
  assert "--base / --base-vae apply to MagicPose" in capsys.readouterr().err
