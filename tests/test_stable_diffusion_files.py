"""Whole SD checkpoints: diffusers pipeline folders and LDM single files, in and out, strictly."""

import argparse
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint

from magicpose_jax.convert.clip import clip_key_table
from magicpose_jax.convert.diffusers import unet_key_table
from magicpose_jax.convert.keytable import ConversionError
from magicpose_jax.convert.ldm import ldm_vae_key_table
from magicpose_jax.convert.stable_diffusion import (
  SDConfigs,
  load_stable_diffusion,
  save_flax_pipeline,
  save_ldm_checkpoint,
  save_stable_diffusion,
)
from magicpose_jax.convert.vae import vae_key_table
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE
from magicpose_jax.models.clip import CLIP_VARIANTS
from magicpose_jax.models.unet import VARIANTS
from magicpose_jax.models.vae import VAE_VARIANTS
from magicpose_jax.torch_reference import state_dict_numpy, torch_unet

TINY = SDConfigs(VARIANTS["tiny"], VAE_VARIANTS["tiny"], CLIP_VARIANTS["tiny"], SD15_SCHEDULE)


@pytest.fixture(scope="module")
def reference():
  """Tiny SD components built by diffusers/transformers and their state dicts (PyTorch names)."""
  unet = torch_unet(TINY.unet, seed=50)
  torch.manual_seed(51)
  vae = TorchVAE(**{k: v for k, v in TINY.vae.to_diffusers().items() if not k.startswith("_")})
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{
      k: v for k, v in TINY.text_encoder.to_transformers().items() if k not in ("architectures", "model_type")}))
  sds = {"unet": state_dict_numpy(unet), "vae": state_dict_numpy(vae),
         "text_encoder": {k: v for k, v in state_dict_numpy(text).items() if not k.endswith("position_ids")}}
  params = {"unet": unet_key_table(TINY.unet).to_flax(sds["unet"]),
            "vae": vae_key_table(TINY.vae).to_flax(sds["vae"]),
            "text_encoder": clip_key_table(TINY.text_encoder).to_flax(
                {("text_model." + k if not k.startswith("text_model.") else k): v
                 for k, v in sds["text_encoder"].items()})}
  return params


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_pipeline_folder_round_trip(reference, tmp_path):
  params = reference
  save_stable_diffusion(TINY, params, tmp_path)
  # diffusers/transformers load each component with no missing/unexpected keys.
  _, info = TorchUNet.from_pretrained(tmp_path / "unet", output_loading_info=True)
  assert not any(info.values())
  _, info = TorchVAE.from_pretrained(tmp_path / "vae", output_loading_info=True)
  assert not any(info.values())
  transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
  configs, loaded = load_stable_diffusion(tmp_path)
  assert configs == TINY
  for name in ("unet", "vae", "text_encoder"):
    _assert_same(loaded[name], params[name])


def test_pipeline_folders_read_only_the_asked_components(reference, tmp_path):
  """`components=` (a stage over a trained base UNet needs only the VAE and text encoder): the UNet's weights are
  never opened, in both folder formats: here they are garbage, and asking for them fails."""
  diffusers_dir, flax_dir = tmp_path / "diffusers", tmp_path / "flax"
  save_stable_diffusion(TINY, reference, diffusers_dir)
  save_flax_pipeline(TINY, reference, flax_dir)
  (diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
  for f in (flax_dir / "unet" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"not an orbax file")
  for folder in (diffusers_dir, flax_dir):
    configs, loaded = load_stable_diffusion(folder, components=("vae", "text_encoder"))
    assert configs == TINY and sorted(loaded) == ["text_encoder", "vae"], folder
    for name in ("vae", "text_encoder"):
      _assert_same(loaded[name], reference[name])
    with pytest.raises(Exception):  # noqa: B017 (whichever reader error: the point is that it was read)
      load_stable_diffusion(folder)
  with pytest.raises(ValueError, match="components=.*subset"):
    load_stable_diffusion(flax_dir, components=("unet", "controlnet"))


def test_ldm_single_file_names_and_round_trip(reference, tmp_path):
  params = reference
  path = tmp_path / "sd.safetensors"
  save_ldm_checkpoint(TINY, params, path)
  ldm = safetensors.numpy.load_file(path)
  prefixes = {k.split(".")[0] for k in ldm}
  assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
  # diffusers' own single-file converters read our names back to the diffusers ones.
  vae = convert_ldm_vae_checkpoint(ldm, TINY.vae.to_diffusers())
  assert set(vae) == set(vae_key_table(TINY.vae).by_torch)
  clip = convert_ldm_clip_checkpoint(ldm)
  assert set(clip) == set(clip_key_table(TINY.text_encoder).by_torch)
  _, loaded = load_stable_diffusion(path, configs=TINY)
  for name in ("unet", "vae", "text_encoder"):
    _assert_same(loaded[name], params[name])


def test_ldm_extras_ema_and_strictness(reference, tmp_path):
  params = reference
  path = tmp_path / "sd.safetensors"
  save_ldm_checkpoint(TINY, params, path)
  ldm = safetensors.numpy.load_file(path)
  # What real LDM files also hold: schedule buffers, EMA copies of the UNet, old-style CLIP names.
  extras = {"betas": np.zeros(1000, np.float32), "alphas_cumprod": np.ones(1000, np.float32),
            "model_ema.decay": np.array(0.9999, np.float32)}
  ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in ldm.items()
         if k.startswith("model.diffusion_model.")}
  old_clip = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
              for k, v in ldm.items()}
  full = tmp_path / "full.safetensors"
  safetensors.numpy.save_file({**old_clip, **extras, **ema}, full)
  _, plain = load_stable_diffusion(full, configs=TINY)
  _assert_same(plain["unet"], params["unet"])
  _assert_same(plain["text_encoder"], params["text_encoder"])
  _, with_ema = load_stable_diffusion(full, configs=TINY, ema=True)
  a, b = jax.tree.leaves(with_ema["unet"]), jax.tree.leaves(params["unet"])
  assert all(np.array_equal(x, y + 1) for x, y in zip(a, b, strict=True))
  with pytest.raises(ValueError, match="no model_ema"):
    load_stable_diffusion(path, configs=TINY, ema=True)
  bad = tmp_path / "bad.safetensors"
  safetensors.numpy.save_file({**ldm, "model.diffusion_model.extra.weight": np.zeros(2, np.float32)}, bad)
  with pytest.raises(ConversionError, match="model.diffusion_model.extra.weight"):
    load_stable_diffusion(bad, configs=TINY)
  del ldm["first_stage_model.decoder.conv_out.bias"]
  safetensors.numpy.save_file(ldm, bad)
  with pytest.raises(ConversionError, match="missing \\(1\\):\n    first_stage_model.decoder.conv_out.bias"):
    load_stable_diffusion(bad, configs=TINY)
  # An integer tensor where a float one belongs (quantised or corrupt): named, not cast.
  ints = dict(safetensors.numpy.load_file(path))
  qkv = "first_stage_model.encoder.mid.attn_1.q.weight"
  ints[qkv] = ints[qkv].astype(np.int8)
  ints["model.diffusion_model.out.2.bias"] = ints["model.diffusion_model.out.2.bias"].astype(np.int32)
  safetensors.numpy.save_file(ints, bad)
  with pytest.raises(ConversionError, match=r"wrong dtype \(1\):\n    model.diffusion_model.out.2.bias: got int32, "
                     r"expected a float dtype"):
    load_stable_diffusion(bad, configs=TINY)
  del ints["model.diffusion_model.out.2.bias"]
  vae = {k: v for k, v in ints.items() if k.startswith("first_stage_model.")}
  with pytest.raises(ConversionError, match=r"wrong dtype \(1\):\n    " + qkv.replace(".", r"\.") + ": got int8"):
    ldm_vae_key_table(TINY.vae, "first_stage_model.").to_flax(vae)


def test_a_diffusers_tensor_of_an_integer_dtype_is_named(reference):
  table = vae_key_table(TINY.vae)
  state = table.to_torch(reference["vae"])
  assert jax.tree.leaves(table.to_flax(state))  # floats: fine
  state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"].astype(np.int64)
  state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"] > 0  # bool
  with pytest.raises(ConversionError, match=r"wrong dtype \(2\):\n    decoder.conv_out.bias: got int64, expected a "
                     r"float dtype\n    encoder.conv_in.weight: got bool"):
    table.to_flax(state)


def test_a_single_file_is_read_as_sd15_unless_given_the_model_config(reference, tmp_path):
  path = tmp_path / "tiny.safetensors"
  save_ldm_checkpoint(TINY, reference, path)
  with pytest.raises(ConversionError) as e:
    load_stable_diffusion(path)  # a tiny model: not SD 1.5's tensors
  message = str(e.value)
  assert "unexpected tensors" in message or "does not match the model" in message
  assert message.rstrip().endswith(f"{path} was read as SD 1.5: a single file does not record its architecture. For "
                                   f"another one pass its config files: --model-config FOLDER (Python: configs=), a "
                                   f"folder with unet/, vae/, text_encoder/ and scheduler/ configs, e.g. the pipeline "
                                   f"or export the file was converted from")
  save_stable_diffusion(TINY, reference, tmp_path / "hf")
  configs, loaded = load_stable_diffusion(path, configs=tmp_path / "hf")
  assert configs.unet == TINY.unet
  _assert_same(loaded["unet"], reference["unet"])
  with pytest.raises(FileNotFoundError, match="missing unet/, vae/, text_encoder/, scheduler/"):
    load_stable_diffusion(path, configs=tmp_path)
  out = subprocess.run([sys.executable, "-m", "magicpose_jax.convert", "--src", str(path), "--model-config",
                        str(tmp_path / "hf"), "--dst", str(tmp_path / "back"), "--to", "flax"], capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  _, back = load_stable_diffusion(tmp_path / "back")
  _assert_same(back["vae"], reference["vae"])


def test_bad_files_are_named(tmp_path):
  truncated = tmp_path / "cut.safetensors"
  safetensors.numpy.save_file({"a": np.zeros(100, np.float32)}, truncated)
  truncated.write_bytes(truncated.read_bytes()[:-50])
  with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file"):
    load_stable_diffusion(truncated)
  pickled = tmp_path / "evil.ckpt"
  torch.save({"state_dict": {"a": torch.zeros(2)}, "hyper_parameters": argparse.Namespace(lr=1e-4)}, pickled)
  with pytest.raises(ValueError, match="evil.ckpt: cannot be read as a tensor-only torch checkpoint"):
    load_stable_diffusion(pickled)
  (tmp_path / "pipe" / "unet").mkdir(parents=True)
  (tmp_path / "pipe" / "text_encoder").mkdir()
  (tmp_path / "pipe" / "scheduler").mkdir()
  with pytest.raises(FileNotFoundError, match="missing vae/"):
    load_stable_diffusion(tmp_path / "pipe")
  sd2 = tmp_path / "sd2.safetensors"
  safetensors.numpy.save_file({"cond_stage_model.model.positional_embedding": np.zeros((77, 8), np.float32)}, sd2)
  with pytest.raises(ValueError, match="SD 2.x single file"):
    load_stable_diffusion(sd2)


def test_cli_converts_whole_checkpoints(reference, tmp_path):
  params = reference
  save_stable_diffusion(TINY, params, tmp_path / "hf")
  run = lambda *a: subprocess.run([sys.executable, "-m", "magicpose_jax.convert", *map(str, a)],
                                  check=True, capture_output=True, text=True).stdout
  assert "read sd-diffusers" in run("--src", tmp_path / "hf", "--dst", tmp_path / "ours", "--to", "flax")
  assert "read sd-flax" in run("--src", tmp_path / "ours", "--dst", tmp_path / "sd.safetensors", "--to", "ldm")
  assert "read sd-flax" in run("--src", tmp_path / "ours", "--dst", tmp_path / "hf2", "--to", "diffusers")
  for name in ("unet", "vae", "text_encoder"):
    _, back = load_stable_diffusion(tmp_path / "hf2")
    _assert_same(back[name], params[name])
  _, ldm = load_stable_diffusion(tmp_path / "sd.safetensors", configs=TINY)
  _assert_same(ldm["unet"], params["unet"])
  failed = subprocess.run([sys.executable, "-m", "magicpose_jax.convert", "--src", str(tmp_path / "nowhere"),
                           "--dst", str(tmp_path / "x"), "--to", "flax"], capture_output=True, text=True, check=False)
  assert failed.returncode == 2 and "source not found" in failed.stderr
