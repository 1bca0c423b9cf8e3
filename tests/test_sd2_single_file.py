"""SD 2.x original single files: the OpenCLIP text tower (`cond_stage_model.model.*`), in and out.

The reference file is built the way Stability's code saves one: a PyTorch module with
open_clip's `TextTransformer` names and `torch.nn.MultiheadAttention` (fused q/k/v
`in_proj_weight`), holding one layer more than our text encoder, plus `text_projection`
and `logit_scale`. Checks:
  * our reader's text encoder reproduces SD 2's conditioning (OpenCLIP run to the penultimate
    layer, then `ln_final`): max |ours - PyTorch| <= 1e-4 in float32 (outputs of unit scale);
  * names and values agree with diffusers' own `convert_open_clip_checkpoint` and
    `convert_ldm_unet_checkpoint`; read -> write is lossless, bit for bit (the unused layer,
    `text_projection` and `logit_scale` travel as `params["extras"]`);
  * the q/k/v split/fuse is bit-exact and strict; SD 2 files need a prediction type.
"""

import collections
import math
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers.loaders.single_file_utils import (
  SD_2_TEXT_ENCODER_KEYS_TO_IGNORE,
  convert_ldm_unet_checkpoint,
  convert_open_clip_checkpoint,
)

from magicpose_jax.convert.__main__ import main as cli_main
from magicpose_jax.convert.clip import clip_key_table
from magicpose_jax.convert.diffusers import unet_key_table
from magicpose_jax.convert.keytable import ConversionError
from magicpose_jax.convert.ldm import (
  LDM_OPEN_CLIP_PREFIX,
  ldm_open_clip_key_table,
  ldm_unet_key_table,
  ldm_vae_key_table,
  open_clip_extra_shapes,
)
from magicpose_jax.convert.stable_diffusion import (
  SDConfigs,
  load_stable_diffusion,
  save_flax_pipeline,
  save_ldm_checkpoint,
  save_stable_diffusion,
  sd2_configs,
)
from magicpose_jax.convert.vae import vae_key_table
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE
from magicpose_jax.models.clip import CLIP_VARIANTS, CLIPTextModel
from magicpose_jax.models.unet import VARIANTS
from magicpose_jax.models.vae import VAE_VARIANTS
from magicpose_jax.torch_reference import perturb_norms, state_dict_numpy, torch_unet

ATOL = 1e-4
P = LDM_OPEN_CLIP_PREFIX
# SD 2-shaped, tiny: linear proj_in, heads per level, cross-attention width = the text width (32); a gelu text
# encoder of N = 2 layers, while the file holds N + 1 = 3 OpenCLIP layers (SD 2.x: 23 of 24).
N = 2
TINY_SD2 = SDConfigs(
    VARIANTS["tiny"].replace(use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True),
    VAE_VARIANTS["tiny"], CLIP_VARIANTS["tiny"].replace(hidden_act="gelu", num_hidden_layers=N),
    SD15_SCHEDULE.replace(prediction_type="v_prediction"))
SCHEDULE_BUFFERS = {"betas": np.linspace(1e-4, 2e-2, 1000, dtype=np.float32),
                    "alphas_cumprod": np.linspace(1, 0, 1000, dtype=np.float32)}


class OpenCLIPBlock(torch.nn.Module):
  """open_clip's `ResidualAttentionBlock` (pre-LN, exact GELU), names as in SD 2 checkpoints."""

  def __init__(self, width: int, heads: int, mlp: int):
    super().__init__()
    self.ln_1 = torch.nn.LayerNorm(width)
    self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    self.ln_2 = torch.nn.LayerNorm(width)
    self.mlp = torch.nn.Sequential(collections.OrderedDict(
        c_fc=torch.nn.Linear(width, mlp), gelu=torch.nn.GELU(), c_proj=torch.nn.Linear(mlp, width)))

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    return x + self.mlp(self.ln_2(x))


class OpenCLIPText(torch.nn.Module):
  """open_clip's text tower as SD 2's `FrozenOpenCLIPEmbedder` keeps it (no visual tower)."""

  def __init__(self, config, layers: int, seed: int):
    super().__init__()
    torch.manual_seed(seed)
    d = config.hidden_size
    self.token_embedding = torch.nn.Embedding(config.vocab_size, d)
    self.positional_embedding = torch.nn.Parameter(torch.empty(config.max_position_embeddings, d))
    self.transformer = torch.nn.Module()
    self.transformer.resblocks = torch.nn.ModuleList(
        [OpenCLIPBlock(d, config.num_attention_heads, config.intermediate_size) for _ in range(layers)])
    self.ln_final = torch.nn.LayerNorm(d)
    self.text_projection = torch.nn.Parameter(torch.empty(d, 24))
    self.logit_scale = torch.nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
    perturb_norms(self, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # unit-scale embeddings and non-zero biases, so a misplaced tensor shows
      for name, p in self.named_parameters():
        if name.endswith("bias"):
          p.add_(0.1 * torch.randn(p.shape, generator=gen))
        elif "embedding" in name or name == "text_projection":
          p.copy_(0.7 * torch.randn(p.shape, generator=gen))

  def encode(self, ids: torch.Tensor) -> torch.Tensor:
    """SD 2's conditioning: every layer but the last (layer="penultimate"), then `ln_final`."""
    n = ids.shape[1]
    x = self.token_embedding(ids) + self.positional_embedding[:n]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for block in self.transformer.resblocks[:-1]:
      x = block(x, mask)
    return self.ln_final(x)


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _torch(sd):
  return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
  """An original-layout SD 2 file of TINY_SD2 sizes, its PyTorch pieces, and the expected UNet/VAE params."""
  cfg = TINY_SD2
  unet_sd = state_dict_numpy(torch_unet(cfg.unet, seed=60))
  torch.manual_seed(61)
  vae_sd = state_dict_numpy(TorchVAE(**{k: v for k, v in cfg.vae.to_diffusers().items() if not k.startswith("_")}))
  text = OpenCLIPText(cfg.text_encoder, N + 1, seed=62).eval()
  unet = unet_key_table(cfg.unet).to_flax(unet_sd)
  vae = vae_key_table(cfg.vae).to_flax(vae_sd)
  file_sd = {**ldm_unet_key_table(cfg.unet).to_torch(unet), **ldm_vae_key_table(cfg.vae).to_torch(vae),
             **{P + k: v for k, v in state_dict_numpy(text).items()}}
  path = tmp_path_factory.mktemp("sd2") / "sd2.safetensors"
  safetensors.numpy.save_file({**file_sd, **SCHEDULE_BUFFERS}, path)
  return {"path": path, "file": file_sd, "text": text, "unet_sd": unet_sd, "unet": unet, "vae": vae}


@pytest.fixture(scope="module")
def loaded(sd2):
  return load_stable_diffusion(sd2["path"], configs=TINY_SD2)


def test_reads_sd2_file_and_matches_open_clip(sd2, loaded):
  configs, params = loaded
  assert configs == TINY_SD2
  _assert_same(params["unet"], sd2["unet"])
  _assert_same(params["vae"], sd2["vae"])
  # SD 2's conditioning, by our 2-layer model vs the 3-layer OpenCLIP module.
  ids = np.random.default_rng(0).integers(0, TINY_SD2.text_encoder.vocab_size, (2, 77)).astype(np.int32)
  with torch.no_grad():
    ref = sd2["text"].encode(torch.from_numpy(ids).long()).numpy()
  ours = np.asarray(jax.jit(CLIPTextModel(TINY_SD2.text_encoder).apply)(
      {"params": params["text_encoder"]}, ids)["last_hidden_state"])
  assert np.std(ref) > 0.1
  err = np.abs(ours - ref).max()
  print(f"SD 2 text conditioning: max abs error {err:.3g}")
  assert err <= ATOL
  # The unused layer N, text_projection and logit_scale come back exactly as stored.
  extras = params["extras"]
  assert set(extras) == set(open_clip_extra_shapes(TINY_SD2.text_encoder))
  assert len(extras) == 14 and all(f"resblocks.{N}." in k for k in extras if "resblocks" in k)
  for k, v in extras.items():
    assert v.shape == sd2["file"][k].shape and v.tobytes() == sd2["file"][k].tobytes(), k
  # prediction_type overrides the configs' schedule.
  configs, _ = load_stable_diffusion(sd2["path"], configs=TINY_SD2, prediction_type="epsilon")
  assert configs.scheduler == SD15_SCHEDULE


def test_written_file_is_lossless_and_diffusers_reads_it(sd2, loaded, tmp_path):
  _, params = loaded
  path = tmp_path / "out.safetensors"
  save_ldm_checkpoint(TINY_SD2, params, path)
  out = safetensors.numpy.load_file(path)
  # Read -> write gives back every tensor of the original (schedule buffers aside), bit for bit.
  assert set(out) == set(sd2["file"])
  for k, v in sd2["file"].items():
    assert out[k].dtype == v.dtype and out[k].shape == v.shape and out[k].tobytes() == v.tobytes(), k
  # diffusers' own converters read our names to the diffusers ones, with the same values.
  unet = convert_ldm_unet_checkpoint(out, TINY_SD2.unet.to_diffusers())
  assert set(unet) == set(sd2["unet_sd"])
  assert all(np.asarray(unet[k]).tobytes() == v.tobytes() for k, v in sd2["unet_sd"].items())
  tconf = transformers.CLIPTextConfig(**{k: v for k, v in TINY_SD2.text_encoder.to_transformers().items()
                                         if k not in ("architectures", "model_type")})
  tmodel = transformers.CLIPTextModel(tconf)
  text = convert_open_clip_checkpoint(tmodel, _torch(out))
  # Its ignore list is hard-wired to SD 2's size (resblocks.23); ours is layer N of any size.
  extra_layer = {k for k in text if k.startswith(f"text_model.encoder.layers.{N}.")}
  assert len(extra_layer) == 16
  ours = clip_key_table(TINY_SD2.text_encoder).to_torch(params["text_encoder"])
  assert set(text) - extra_layer == set(ours)
  for k, v in ours.items():
    assert text[k].numpy().tobytes() == v.tobytes(), k
  # transformers 5 names the module's own tensors without `text_model.`; it loads diffusers' dict strictly.
  tmodel.load_state_dict({k[len("text_model."):]: v for k, v in text.items() if k not in extra_layer}, strict=True)
  # And our reader takes the written file back bit-exactly, extras included.
  _, again = load_stable_diffusion(path, configs=TINY_SD2)
  _assert_same(again, params)


def test_sd2_full_size_names():
  """Hand-checked OpenCLIP ViT-H names and shapes; the extras are exactly what diffusers drops (+ logit_scale)."""
  config = CLIP_VARIANTS["sd21"]
  shapes = ldm_open_clip_key_table(config).torch_shapes
  expected = {"positional_embedding": (77, 1024), "token_embedding.weight": (49408, 1024),
              "ln_final.weight": (1024,), "ln_final.bias": (1024,)}
  for i in (0, 22):
    r = f"transformer.resblocks.{i}."
    expected |= {r + "ln_1.weight": (1024,), r + "ln_1.bias": (1024,), r + "ln_2.weight": (1024,),
                 r + "ln_2.bias": (1024,), r + "attn.in_proj_weight": (3072, 1024), r + "attn.in_proj_bias": (3072,),
                 r + "attn.out_proj.weight": (1024, 1024), r + "attn.out_proj.bias": (1024,),
                 r + "mlp.c_fc.weight": (4096, 1024), r + "mlp.c_fc.bias": (4096,),
                 r + "mlp.c_proj.weight": (1024, 4096), r + "mlp.c_proj.bias": (1024,)}
  assert {k: shapes.get(P + k) for k in expected} == expected
  assert len(shapes) == 4 + 23 * 12 and not any(".resblocks.23." in k for k in shapes)
  extras = open_clip_extra_shapes(config)
  assert set(extras) == {*SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, P + "logit_scale"}
  assert extras[P + "transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)


def test_qkv_split_fuse_is_bit_exact_and_strict():
  config = TINY_SD2.text_encoder
  d = config.hidden_size
  table = ldm_open_clip_key_table(config)
  rng = np.random.default_rng(1)
  sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in table.torch_shapes.items()}
  key = P + "transformer.resblocks.1.attn.in_proj_weight"
  parts = table.split(sd)
  for i, part in enumerate("qkv"):
    assert np.array_equal(parts[f"{key}#{part}"], sd[key][i * d:(i + 1) * d])
    assert np.array_equal(parts[f"{P}transformer.resblocks.1.attn.in_proj_bias#{part}"],
                          sd[P + "transformer.resblocks.1.attn.in_proj_bias"][i * d:(i + 1) * d])
  fused = table.fuse(parts)
  assert list(fused) == list(sd) and all(fused[k].tobytes() == v.tobytes() for k, v in sd.items())
  params = table.to_flax(sd)
  attn = params["encoder"]["layers_1"]["self_attn"]
  assert np.array_equal(attn["q_proj"]["kernel"], sd[key][:d].T)
  assert np.array_equal(attn["v_proj"]["kernel"], sd[key][2 * d:].T)
  back = table.to_torch(params)
  assert list(back) == list(sd) and all(back[k].tobytes() == v.tobytes() for k, v in sd.items())
  # A mis-shaped fused tensor is named with what was expected, in both entry points.
  bad = {**sd, key: sd[key][:-1]}
  message = re.escape(f"{key}: got ({3 * d - 1}, {d}), expected ({3 * d}, {d})")
  with pytest.raises(ConversionError, match=message):
    table.to_flax(bad)
  with pytest.raises(ConversionError, match=message):
    table.split(bad)
  gone = {k: v for k, v in sd.items() if not k.endswith("resblocks.0.attn.in_proj_bias")}
  with pytest.raises(ConversionError, match=re.escape("missing (1):\n    " + P + "transformer.resblocks.0.attn."
                                                      "in_proj_bias")):
    table.to_flax(gone)


def test_prediction_type_is_required_and_passed_through(sd2, tmp_path, capsys):
  with pytest.raises(ValueError, match='SD 2.x single file.*prediction_type="v_prediction".*"epsilon"'):
    load_stable_diffusion(sd2["path"])
  # With it, the architecture is detected from the tensors: this tiny UNet is not SD 2.x's.
  with pytest.raises(ValueError, match=re.escape("not SD 2.x's UNet: proj_in weights of rank [2] (SD 2.x: [2], "
                                                 "linear) and cross-attention widths [32]")):
    load_stable_diffusion(sd2["path"], prediction_type="v_prediction")
  # A file shaped like SD 2.x where detection looks picks the full-size SD 2.x tables (only missing tensors,
  # no wrong shapes: SD 1.5's tables would expect cross-attention width 768).
  probe = tmp_path / "probe.safetensors"
  u = "model.diffusion_model.input_blocks.1.1."
  safetensors.numpy.save_file({u + "proj_in.weight": np.zeros((320, 320), np.float32),
                               u + "transformer_blocks.0.attn2.to_k.weight": np.zeros((320, 1024), np.float32),
                               P + "logit_scale": np.zeros((), np.float32)}, probe)
  with pytest.raises(ConversionError) as info:
    load_stable_diffusion(probe, prediction_type="v_prediction")
  assert "missing" in str(info.value) and "wrong shape" not in str(info.value)
  assert sd2_configs("epsilon").scheduler == SD15_SCHEDULE
  assert sd2_configs("v_prediction").scheduler == SD15_SCHEDULE.replace(prediction_type="v_prediction")
  assert sd2_configs("v_prediction").unet == VARIANTS["sd21"] and sd2_configs("epsilon").text_encoder == \
      CLIP_VARIANTS["sd21"]
  with pytest.raises(ValueError, match="apply to LDM single files only"):
    load_stable_diffusion(tmp_path, prediction_type="epsilon")
  # The CLI asks for --prediction-type, and passes it on (then fails on the sizes, as above).
  args = ["--src", str(sd2["path"]), "--dst", str(tmp_path / "x.safetensors"), "--to", "ldm"]
  assert cli_main(args) == 2
  assert "--prediction-type" in capsys.readouterr().err
  assert cli_main([*args, "--prediction-type", "v_prediction"]) == 2
  assert "not SD 2.x's UNet" in capsys.readouterr().err


def test_extras_are_checked_and_never_dropped_silently(sd2, loaded, tmp_path):
  _, params = loaded
  extras = params["extras"]
  # Without extras the file simply lacks them (SD never reads them) and reads back without any.
  plain = {k: v for k, v in params.items() if k != "extras"}
  path = tmp_path / "plain.safetensors"
  save_ldm_checkpoint(TINY_SD2, plain, path)
  assert set(safetensors.numpy.load_file(path)) == set(sd2["file"]) - set(extras)
  _, back = load_stable_diffusion(path, configs=TINY_SD2)
  assert "extras" not in back
  _assert_same(back, plain)
  # Extras are checked on the way out: names, shapes, a whole extra layer.
  bad_name = {**extras, P + "transformer.resblocks.5.ln_1.weight": np.zeros(32, np.float32)}
  bad_shape = {**extras, P + "logit_scale": np.zeros(1, np.float32)}
  partial = {k: v for k, v in extras.items() if not k.endswith(f"resblocks.{N}.mlp.c_fc.bias")}
  for bad, what in ((bad_name, "unexpected (1):\n    " + P + "transformer.resblocks.5.ln_1.weight"),
                    (bad_shape, P + "logit_scale: got (1,), expected ()"),
                    (partial, f"missing (1):\n    {P}transformer.resblocks.{N}.mlp.c_fc.bias")):
    with pytest.raises(ConversionError, match=re.escape(what)):
      save_ldm_checkpoint(TINY_SD2, {**params, "extras": bad}, tmp_path / "bad.safetensors")
  sd1_text = SDConfigs(TINY_SD2.unet, TINY_SD2.vae, TINY_SD2.text_encoder.replace(hidden_act="quick_gelu"),
                       TINY_SD2.scheduler)
  with pytest.raises(ValueError, match="only SD 2.x"):
    save_ldm_checkpoint(sd1_text, params, tmp_path / "bad.safetensors")
  # ... and on the way in.
  cut = tmp_path / "cut.safetensors"
  safetensors.numpy.save_file({k: v for k, v in sd2["file"].items()
                               if not k.endswith(f"resblocks.{N}.attn.in_proj_bias")}, cut)
  with pytest.raises(ConversionError, match=re.escape(f"missing (1):\n    {P}transformer.resblocks.{N}.attn.in_")):
    load_stable_diffusion(cut, configs=TINY_SD2)
  with pytest.raises(ValueError, match="holds SD 2.x's OpenCLIP .* hidden_act='quick_gelu'"):
    load_stable_diffusion(sd2["path"], configs=sd1_text)
  # Our pipeline format keeps them; the diffusers layout has no place for them and says so.
  save_flax_pipeline(TINY_SD2, params, tmp_path / "ours")
  _, ours = load_stable_diffusion(tmp_path / "ours")
  _assert_same(ours, params)
  with pytest.warns(UserWarning, match="no place for the 14 extra tensors"):
    save_stable_diffusion(TINY_SD2, params, tmp_path / "hf")
