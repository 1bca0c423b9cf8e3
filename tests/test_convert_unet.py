"""The diffusers <-> Flax UNet converter: bit-exact round trips, strict errors, real file formats."""

import json
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from test_unet_parity import ATOL, _inputs

from magicpose_jax.convert.diffusers import load_unet, save_unet, unet_key_table
from magicpose_jax.convert.keytable import ConversionError
from magicpose_jax.models.unet import VARIANTS, UNet2DConditionModel
from magicpose_jax.torch_reference import nchw, nhwc, state_dict_numpy, torch_unet

CONFIG = VARIANTS["tiny"]


@pytest.fixture(scope="module")
def reference():
  model = torch_unet(CONFIG, seed=30)
  return model, state_dict_numpy(model)


def _assert_bit_exact(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k, x in a.items():
    assert x.dtype == b[k].dtype and x.shape == b[k].shape, k
    assert x.tobytes() == b[k].tobytes(), f"{k} differs"


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_round_trip_is_bit_exact(reference, dtype):
  _, sd = reference
  sd = {k: v.astype(dtype) for k, v in sd.items()}
  table = unet_key_table(CONFIG)
  params = table.to_flax(sd)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(dtype)}
  _assert_bit_exact(table.to_torch(params), sd)


def test_table_covers_every_diffusers_tensor(reference):
  _, sd = reference
  assert set(unet_key_table(CONFIG).by_torch) == set(sd)


def test_errors_name_every_bad_key(reference):
  _, sd = reference
  table = unet_key_table(CONFIG)
  bad = dict(sd)
  del bad["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
  bad["down_blocks.0.extra.weight"] = np.zeros(3, np.float32)
  bad["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
  with pytest.raises(ConversionError) as err:
    table.to_flax(bad, source="model.safetensors")
  msg = str(err.value)
  assert "model.safetensors" in msg
  assert "missing (1):\n    down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in msg
  assert "unexpected (1):\n    down_blocks.0.extra.weight" in msg
  assert "conv_in.weight: got (32, 4, 1, 1), expected (32, 4, 3, 3)" in msg


def test_to_torch_is_strict(reference):
  _, sd = reference
  table = unet_key_table(CONFIG)
  params = table.to_flax(sd)
  del params["conv_out"]["bias"]
  params["time_embedding"]["linear_1"]["kernel"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ConversionError, match="missing \\(1\\):\n    conv_out/bias") as err:
    table.to_torch(params)
  assert "time_embedding/linear_1/kernel: got (3, 3), expected (32, 128)" in str(err.value)


def _forward_both(tmodel, params, seed=31):
  sample, t, context = _inputs(CONFIG, seed=seed)
  with torch.no_grad():
    ref = nhwc(tmodel(nchw(sample), torch.from_numpy(t), torch.from_numpy(context)).sample)
  ours = jax.jit(UNet2DConditionModel(CONFIG).apply)({"params": params}, sample, t, context)
  return np.asarray(ours), ref


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_save_unet_loads_in_diffusers(reference, tmp_path, max_shard_bytes):
  _, sd = reference
  params = unet_key_table(CONFIG).to_flax(sd)
  files = save_unet(CONFIG, params, tmp_path, max_shard_bytes=max_shard_bytes)
  if max_shard_bytes:
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3
  tmodel, info = TorchUNet.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info  # no missing/unexpected/mismatched keys, no errors
  _assert_bit_exact(state_dict_numpy(tmodel), sd)
  ours, ref = _forward_both(tmodel.eval(), params)
  np.testing.assert_allclose(ours, ref, atol=ATOL)
  # ... and our loader reads it back, sharded or not, bit-exactly.
  config, loaded = load_unet(tmp_path)
  assert config == CONFIG
  _assert_bit_exact(unet_key_table(CONFIG).to_torch(loaded), sd)


def test_load_diffusers_save_pretrained_folder(reference, tmp_path):
  tmodel, _ = reference
  tmodel.save_pretrained(tmp_path)
  config, params = load_unet(tmp_path)
  assert config == CONFIG
  ours, ref = _forward_both(tmodel, params)
  np.testing.assert_allclose(ours, ref, atol=ATOL)


def test_load_fp16_variant_upcasts(reference, tmp_path):
  _, sd = reference
  torch_unet(CONFIG, seed=30).half().save_pretrained(tmp_path, variant="fp16")
  _, params = load_unet(tmp_path, variant="fp16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  _, kept = load_unet(tmp_path, variant="fp16", param_dtype=None)
  assert {x.dtype for x in jax.tree.leaves(kept)} == {np.dtype(np.float16)}
  back = unet_key_table(CONFIG).to_torch(params)
  _assert_bit_exact(back, {k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()})


def test_load_legacy_bin(reference, tmp_path):
  tmodel, sd = reference
  (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_diffusers()))
  torch.save(tmodel.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
  _, params = load_unet(tmp_path)
  _assert_bit_exact(unet_key_table(CONFIG).to_torch(params), sd)


def test_missing_weights_are_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_diffusers()))
  with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
    load_unet(tmp_path)


def test_cli_round_trip(reference, tmp_path):
  tmodel, sd = reference
  tmodel.save_pretrained(tmp_path / "src")
  run = lambda *a: subprocess.run([sys.executable, "-m", "magicpose_jax.convert", *a],
                                  check=True, capture_output=True, text=True)
  run("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "flax"), "--to", "flax")
  assert (tmp_path / "flax" / "params").is_dir()
  run("--src", str(tmp_path / "flax"), "--dst", str(tmp_path / "back"), "--to", "diffusers")
  _assert_bit_exact(safetensors.numpy.load_file(tmp_path / "back" / "diffusion_pytorch_model.safetensors"), sd)
  run("--src", str(tmp_path / "flax"), "--dst", str(tmp_path / "half"), "--to", "diffusers", "--dtype", "bfloat16")
  half = safetensors.numpy.load_file(tmp_path / "half" / "diffusion_pytorch_model.safetensors")
  assert {v.dtype for v in half.values()} == {np.dtype(ml_dtypes.bfloat16)}
  failed = subprocess.run([sys.executable, "-m", "magicpose_jax.convert", "--src", str(tmp_path / "flax"),
                           "--dst", str(tmp_path / "flax"), "--to", "flax"], capture_output=True, text=True,
                          check=False)
  assert failed.returncode != 0 and "already exists" in failed.stderr
