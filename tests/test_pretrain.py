"""`python -m magicpose_jax.demo.pretrain` at its micro size, the demo over the base it writes, and the checks a
pretrained base folder passes before a demo trains over it."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from diffusers import AutoencoderKL as TorchVAE
from diffusers import ControlNetModel as TorchControlNet
from diffusers import DDIMScheduler
from diffusers import UNet2DConditionModel as TorchUNet

from magicpose_jax import demo
from magicpose_jax.convert.stable_diffusion import load_stable_diffusion
from magicpose_jax.demo import pretrain, pretrained
from magicpose_jax.demo.__main__ import main as demo_main
from magicpose_jax.demo.autoencoder import DECODER_PARAMS, load_autoencoder
from magicpose_jax.train.checkpoint import read_run

ENV = {**os.environ, "JAX_PLATFORMS": "cpu",  # XLA_FLAGS: conftest's FAST_COMPILE
       "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def micro_base(tmp_path_factory):
  """The micro pretrain's folder, then the micro demo over it: (base folder, demo folder, demo metrics)."""
  out = str(tmp_path_factory.mktemp("pretrain"))
  subprocess.run([sys.executable, "-m", "magicpose_jax.demo.pretrain", "--micro", "--out", out], env=ENV, check=True,
                 stdout=subprocess.DEVNULL)
  base = os.path.join(out, "sd")
  demo_out = str(tmp_path_factory.mktemp("demo_over_base"))
  subprocess.run([sys.executable, "-m", "magicpose_jax.demo", "--micro", "--base-sd", base, "--out", demo_out,
                  "--no-jax-cache", "--jobs", "2"], env=ENV, check=True, stdout=subprocess.DEVNULL)
  with open(os.path.join(demo_out, "metrics.json")) as f:
    return base, demo_out, json.load(f)


def test_pretrain_writes_a_diffusers_pipeline_with_its_manifest(micro_base):
  base, _, _ = micro_base
  manifest = pretrained.check_base_sd(base)
  assert manifest["command"].startswith("python -m magicpose_jax.demo.pretrain --micro")
  assert manifest["budget"]["base_reference_share"] == 0.5 and manifest["step"] == demo.MICRO.base_steps
  assert manifest["budget"]["pose_steps"] == 1 and "pose" in manifest["seconds"]
  # diffusers reads every component without a missing or unexpected tensor, and the schedule the stages need.
  for cls, name in ((TorchUNet, "unet"), (TorchVAE, "vae"), (TorchControlNet, pretrained.CONTROLNET)):
    _, info = cls.from_pretrained(os.path.join(base, name), output_loading_info=True)
    assert not any(info.values()), (name, info)
  scheduler = DDIMScheduler.from_pretrained(os.path.join(base, "scheduler"))
  assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
  sd, params = load_stable_diffusion(base)
  assert sd.unet == demo.MICRO_UNET.replace(in_channels=4, out_channels=4)
  # The exported VAE is the VAE phase's with the decoder phase's decoder: the encoder (the latent space the base
  # trained in) bit-identical, the decoder moved.
  assert manifest["budget"]["decoder_steps"] == 2 and np.isfinite(manifest["decoder_training"]["loss"])
  _, vae_phase = load_autoencoder(os.path.join(os.path.dirname(base), "vae"))
  for name, tree in params["vae"].items():
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(vae_phase[name]),
                                                    strict=True))
    assert same == (name not in DECODER_PARAMS), name


def test_demo_over_a_pretrained_base_trains_only_the_stages(micro_base):
  base, out, report = micro_base
  assert sorted(os.listdir(os.path.join(out, "runs"))) == ["no_appearance", "stage1", "stage2"]
  assert not os.path.exists(os.path.join(out, "vae"))
  for name in ("retarget.png", "animation.gif"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  for run in ("stage1", "no_appearance"):
    assert read_run(os.path.join(out, "runs", run), with_params=False)[0].base.path == base, run
  # The pose nets start from the base's OpenPose ControlNet (the release's pose_init).
  for run in ("stage2", "no_appearance"):
    model = read_run(os.path.join(out, "runs", run), with_params=False)[0].model
    assert (model.pose_init, model.pose_path) == ("controlnet", pretrained.controlnet_of(base)), run
  with open(os.path.join(out, "setup.json")) as f:
    assert json.load(f)["base_sd"] == {"path": base, "sha256": pretrained.digest(pretrained.file_hashes(base))}
  assert set(report["models"]) == {"full", "no_appearance", "no_pose"}


def _copy(base, tmp_path):
  folder = str(tmp_path / "sd")
  shutil.copytree(base, folder)
  return folder


def test_a_changed_weight_file_is_named(micro_base, tmp_path):
  folder = _copy(micro_base[0], tmp_path)
  with open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "r+b") as f:
    f.seek(-4, os.SEEK_END)
    f.write(b"\0\0\0\1")
  with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.safetensors has sha256 .* records"):
    pretrained.check_base_sd(folder)


def test_a_git_lfs_pointer_is_named_as_one(micro_base, tmp_path):
  folder = _copy(micro_base[0], tmp_path)
  with open(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"), "w") as f:
    f.write("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
  with pytest.raises(ValueError, match=r"vae/diffusion_pytorch_model.safetensors .*Git LFS pointer"):
    pretrained.check_base_sd(folder)


def test_missing_and_unlisted_files_are_named(micro_base, tmp_path):
  folder = _copy(micro_base[0], tmp_path)
  os.remove(os.path.join(folder, "text_encoder", "config.json"))
  with pytest.raises(FileNotFoundError, match=r"text_encoder/config.json is missing"):
    pretrained.check_base_sd(folder)
  shutil.copytree(micro_base[0], folder, dirs_exist_ok=True)
  with open(os.path.join(folder, "unet", "extra.safetensors"), "wb") as f:
    f.write(b"x")
  with pytest.raises(ValueError, match=r"\['unet/extra.safetensors'\] are not in pretrain.json"):
    pretrained.check_base_sd(folder)


def test_a_folder_without_a_manifest_is_not_a_pretrained_base(micro_base, tmp_path):
  folder = _copy(micro_base[0], tmp_path)
  os.remove(os.path.join(folder, pretrained.MANIFEST))
  with pytest.raises(FileNotFoundError, match=r"no pretrain.json"):
    pretrained.check_base_sd(folder)
  with pytest.raises(FileNotFoundError, match=r"no such folder"):
    pretrained.check_base_sd(str(tmp_path / "absent"))


def test_a_bad_base_stops_the_demo_before_it_removes_anything(micro_base, tmp_path):
  folder = _copy(micro_base[0], tmp_path)
  out = tmp_path / "demo"
  (out / "runs" / "stage1").mkdir(parents=True)  # phases a user may still need
  with open(os.path.join(folder, "vae", "config.json"), "a") as f:
    f.write(" ")
  with pytest.raises(ValueError, match=r"vae/config.json has sha256"):
    demo.Demo(str(out), demo.MICRO, base_sd=folder)
  assert (out / "runs" / "stage1").is_dir()


def test_train_base_and_base_sd_exclude_each_other(tmp_path):
  with pytest.raises(SystemExit, match="choose one"):
    demo_main(["--train-base", "--base-sd", str(tmp_path), "--out", str(tmp_path / "out")])


@pytest.fixture(scope="module")
def continued(micro_base, tmp_path_factory):
  """A second micro pretrain continuing the first: (first folder, second folder)."""
  first = os.path.dirname(micro_base[0])
  second = str(tmp_path_factory.mktemp("continued"))
  subprocess.run([sys.executable, "-m", "magicpose_jax.demo.pretrain", "--micro", "--out", second,
                  "--continue-from", first], env=ENV, check=True, stdout=subprocess.DEVNULL)
  return first, second


def test_continue_from_trains_the_same_vae_and_base_further(continued):
  first, second = continued
  assert read_run(os.path.join(second, "runs", "base"), with_params=False)[0].init_from == os.path.join(
      first, "runs", "base")
  before, after = pretrained.check_base_sd(os.path.join(first, "sd")), pretrained.check_base_sd(
      os.path.join(second, "sd"))
  assert after["continued_from"] == [{k: before[k] for k in ("command", "commit", "step")}]
  assert after["base_steps_total"] == 2 * demo.MICRO.base_steps
  vae = "vae/diffusion_pytorch_model.safetensors"
  assert after["files"][vae] == before["files"][vae]  # the same VAE
  # The UNet moved one optimizer step (lr 1e-3) from the first base's, far less than from a fresh one.
  _, a = load_stable_diffusion(os.path.join(first, "sd"))
  _, b = load_stable_diffusion(os.path.join(second, "sd"))
  moved = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a["unet"]), jax.tree.leaves(b["unet"]),
                                                            strict=True))
  assert 0 < moved < 0.01


def test_continuing_another_folder_or_another_vae_is_refused(continued, tmp_path):
  first, second = continued
  with pytest.raises(ValueError, match=r"its base phase continued .*; this command continues nothing"):
    pretrain.pretrain(second, pretrain.MICRO_PRETRAIN, unet=demo.MICRO_UNET)
  other = str(tmp_path / "other")
  shutil.copytree(first, other)
  with open(os.path.join(other, "setup.json")) as f:
    setup = json.load(f)
  setup["budget"]["vae_steps"] += 1
  with open(os.path.join(other, "setup.json"), "w") as f:
    json.dump(setup, f)
  with pytest.raises(ValueError, match=r"its VAE was trained with another budget \(vae_steps\)"):
    pretrain.pretrain(str(tmp_path / "new"), pretrain.MICRO_PRETRAIN, unet=demo.MICRO_UNET, continue_from=other)
  assert not os.path.exists(tmp_path / "new" / "vae")  # refused before anything was copied or trained


def _run_vae_only(command: list[str], base: str, record: str) -> tuple[dict, dict, dict]:
  """Runs a pretrain command that rewrites only `base`'s VAE and checks what both modes promise: DIR/sd is valid,
  every file but the VAE's weights byte-identical to `base`'s, the manifest keeping `base`'s record and adding the
  run (with this command) to `record`. Returns (the run's record, `base`'s VAE params, the new VAE params)."""
  folder = pretrain.main(command)
  before, after = pretrained.check_base_sd(base), pretrained.check_base_sd(folder)
  (run,) = after[record]
  assert run["command"] == "python -m magicpose_jax.demo.pretrain " + " ".join(command)
  assert after["command"] == before["command"] and after["budget"] == before["budget"]
  changed = {name for name in before["files"] if after["files"][name] != before["files"][name]}
  assert changed == {"vae/diffusion_pytorch_model.safetensors"} and set(after["files"]) == set(before["files"])
  return run, load_stable_diffusion(base)[1]["vae"], load_stable_diffusion(folder)[1]["vae"]


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_finetune_decoder_changes_only_the_decoder(micro_base, tmp_path):
  """`--finetune-decoder SD_DIR`: DIR/sd is SD_DIR with the VAE's decoder trained further (head-weighted): every
  other file byte-identical, the encoder leaves bit-identical (the latent space the UNet and ControlNet trained in),
  the manifest valid and recording the run; an existing output folder is refused."""
  base = micro_base[0]
  command = ["--micro", "--finetune-decoder", base, "--out", str(tmp_path / "ft")]
  record, a, b = _run_vae_only(command, base, "decoder_continued")
  assert record["steps"] == 2 and record["head_weight"] == 4.0 and np.isfinite(record["loss"])
  assert record["head_scale"] == demo.load_config().data.synthetic.head_scale  # the figures it trained on
  for name in a:
    assert _same(a[name], b[name]) == (name not in DECODER_PARAMS), name
  with pytest.raises(FileExistsError, match=r"ft/sd exists"):
    pretrain.main(command)
  with pytest.raises(SystemExit, match="no --continue-from"):
    pretrain.main([*command, "--continue-from", base])


def test_tune_encoder_changes_only_the_vae(micro_base, tmp_path):
  """`--tune-encoder SD_DIR`: DIR/sd is SD_DIR with the VAE's encoder and decoder trained further: every other file
  byte-identical, the manifest valid and recording the run (weights, drift); an existing output folder and
  another mode beside it are refused."""
  base = micro_base[0]
  command = ["--micro", "--tune-encoder", base, "--out", str(tmp_path / "enc")]
  record, a, b = _run_vae_only(command, base, "encoder_tuned")
  assert record["steps"] == 2 and record["eye_weight"] == pretrain.TUNE_EYE_WEIGHT and np.isfinite(record["loss"])
  assert 0 < record["drift"] < 1
  assert record["eye_scale"] == demo.load_config().data.synthetic.eye_scale  # the figures it trained on
  for name in ("encoder", "decoder"):
    assert not _same(a[name], b[name]), name
  with pytest.raises(FileExistsError, match=r"enc/sd exists"):
    pretrain.main(command)
  with pytest.raises(SystemExit, match="no --continue-from, --fresh or --finetune-decoder"):
    pretrain.main([*command, "--finetune-decoder", base])
