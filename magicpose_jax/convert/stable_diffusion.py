"""Whole Stable Diffusion checkpoints: diffusers pipeline folders and original LDM single files.

    configs, params = load_stable_diffusion("stable-diffusion-v1-5")             # diffusers folder
    configs, params = load_stable_diffusion("v1-5-pruned-emaonly.safetensors")   # LDM single file (.ckpt too)

`params` is `{"unet": ..., "vae": ..., "text_encoder": ...}` (host numpy trees);
`configs` an `SDConfigs`. The reverse: `save_stable_diffusion(configs, params, folder)`
(diffusers layout), `save_ldm_checkpoint(configs, params, file.safetensors)` and
`save_flax_pipeline(configs, params, folder)` (ours: orbax params per component; read
back by `load_stable_diffusion` too).

LDM single files carry no config: the architecture is read from the tensors (SD 1.x:
`cond_stage_model.transformer.*` CLIP ViT-L; SD 2.x's OpenCLIP text encoder
`cond_stage_model.model.*` is not supported yet and is refused with that reason).
Besides the weights, those files hold DDPM schedule buffers and possibly EMA
weights: both are recognised and never silently dropped (EMA weights are used with
`ema=True`; any other unknown tensor is an error).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.convert.clip import clip_key_table, load_text_encoder, save_text_encoder
from magicpose_jax.convert.diffusers import load_unet, save_unet
from magicpose_jax.convert.flax_checkpoint import is_flax_model, load_flax_params, save_flax_model
from magicpose_jax.convert.keytable import ConversionError
from magicpose_jax.convert.ldm import LDM_UNET_PREFIX, LDM_VAE_PREFIX, ldm_unet_key_table, ldm_vae_key_table
from magicpose_jax.convert.tensor_files import read_state_dict, write_safetensors
from magicpose_jax.convert.vae import load_vae, save_vae
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE, ScheduleConfig
from magicpose_jax.models.clip import CLIP_VARIANTS, CLIPTextConfig
from magicpose_jax.models.unet import VARIANTS, UNetConfig
from magicpose_jax.models.vae import VAE_VARIANTS, VAEConfig

LDM_CLIP_PREFIX = "cond_stage_model.transformer."
# The DDPM buffers of LatentDiffusion (`ldm/models/diffusion/ddpm.py`): derived from the schedule.
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar")
_IGNORED_LDM_KEYS = (*_SCHEDULE_BUFFERS, "model_ema.decay", "model_ema.num_updates",
                     LDM_CLIP_PREFIX + "text_model.embeddings.position_ids")
COMPONENTS = ("unet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class SDConfigs:
  """The architecture of every Stable Diffusion component, plus where the tokenizer files are."""

  unet: UNetConfig
  vae: VAEConfig
  text_encoder: CLIPTextConfig
  scheduler: ScheduleConfig
  tokenizer: str | None = None  # a folder with vocab.json + merges.txt (None: not in the checkpoint)


SD15 = SDConfigs(VARIANTS["sd15"], VAE_VARIANTS["sd15"], CLIP_VARIANTS["sd15"], SD15_SCHEDULE)


def load_stable_diffusion(path: str | os.PathLike, param_dtype: Any = jnp.float32, variant: str | None = None,
                          ema: bool = False, configs: SDConfigs | None = None) -> tuple[SDConfigs, dict]:
  """Reads a diffusers pipeline folder or an LDM single file (`.safetensors`, `.ckpt`, `.pth`).

  Args:
    path: the folder (with `model_index.json`) or the file.
    param_dtype: dtype of the returned params; None keeps the file's.
    variant: diffusers weight variant of a folder (e.g. "fp16").
    ema: single files only: use the `model_ema.*` UNet weights instead of `model.diffusion_model.*`.
    configs: single files only: the architecture (default `SD15`), for non-standard sizes.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if ema or configs is not None:
      raise ValueError(f"{path}: ema= and configs= apply to LDM single files only")
    if is_flax_model(os.path.join(path, "unet")):
      return _load_flax_folder(path, param_dtype)
    return _load_folder(path, param_dtype, variant)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Stable Diffusion checkpoint not found: {path}")
  return _load_single_file(path, param_dtype, ema, configs or SD15)


def _load_folder(path: str, param_dtype: Any, variant: str | None) -> tuple[SDConfigs, dict]:
  missing = [c for c in (*COMPONENTS, "scheduler") if not os.path.isdir(os.path.join(path, c))]
  if missing:
    raise FileNotFoundError(f"{path}: not a Stable Diffusion pipeline folder (missing {', '.join(missing)}/)")
  unet_config, unet = load_unet(os.path.join(path, "unet"), param_dtype, variant)
  vae_config, vae = load_vae(os.path.join(path, "vae"), param_dtype, variant)
  text_config, text = load_text_encoder(os.path.join(path, "text_encoder"), param_dtype, variant)
  scheduler = ScheduleConfig.from_diffusers(os.path.join(path, "scheduler"))
  configs = SDConfigs(unet_config, vae_config, text_config, scheduler, _tokenizer_dir(path))
  return configs, {"unet": unet, "vae": vae, "text_encoder": text}


def _tokenizer_dir(path: str) -> str | None:
  tokenizer = os.path.join(path, "tokenizer")
  return tokenizer if os.path.isfile(os.path.join(tokenizer, "vocab.json")) else None


def _load_flax_folder(path: str, param_dtype: Any) -> tuple[SDConfigs, dict]:
  configs = SDConfigs(UNetConfig.from_diffusers(os.path.join(path, "unet")),
                      VAEConfig.from_diffusers(os.path.join(path, "vae")),
                      CLIPTextConfig.from_transformers(os.path.join(path, "text_encoder")),
                      ScheduleConfig.from_diffusers(os.path.join(path, "scheduler")), _tokenizer_dir(path))
  params = {name: load_flax_params(os.path.join(path, name)) for name in COMPONENTS}
  if param_dtype is not None:
    params = jax.tree.map(lambda x: np.asarray(x).astype(param_dtype), params)
  return configs, params


def save_flax_pipeline(configs: SDConfigs, params: dict, folder: str | os.PathLike) -> None:
  """Our format for a whole SD: `unet/`, `vae/`, `text_encoder/` as `save_flax_model` folders,
  plus diffusers' `scheduler/` and `tokenizer/` files."""
  folder = os.fspath(folder)
  save_flax_model(configs.unet.to_diffusers(), params["unet"], os.path.join(folder, "unet"))
  save_flax_model(configs.vae.to_diffusers(), params["vae"], os.path.join(folder, "vae"))
  save_flax_model(configs.text_encoder.to_transformers(), params["text_encoder"],
                  os.path.join(folder, "text_encoder"))
  _write_scheduler_and_tokenizer(configs, folder)


def _write_scheduler_and_tokenizer(configs: SDConfigs, folder: str) -> None:
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(configs.scheduler.to_diffusers(), f, indent=2)
  if configs.tokenizer is not None:
    shutil.copytree(configs.tokenizer, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)


def ldm_tables(configs: SDConfigs) -> dict:
  """The single-file key table of each component."""
  return {"unet": ldm_unet_key_table(configs.unet, LDM_UNET_PREFIX),
          "vae": ldm_vae_key_table(configs.vae, LDM_VAE_PREFIX),
          "text_encoder": clip_key_table(configs.text_encoder).with_prefix(LDM_CLIP_PREFIX)}


def _ema_key(ldm_key: str) -> str:
  # LDM's EMA module stores `model.diffusion_model.a.b.0.weight` as `model_ema.diffusion_modelab0weight`.
  return "model_ema." + ldm_key[len("model."):].replace(".", "")


def _load_single_file(path: str, param_dtype: Any, ema: bool, configs: SDConfigs) -> tuple[SDConfigs, dict]:
  sd = read_state_dict(path)
  if any(k.startswith("cond_stage_model.model.") for k in sd):
    raise ValueError(f"{path}: an SD 2.x single file (OpenCLIP text encoder, cond_stage_model.model.*) is not "
                     f"supported yet; convert it to a diffusers folder first (diffusers' from_single_file)")
  if not any(k.startswith(LDM_UNET_PREFIX) for k in sd):
    raise ValueError(f"{path}: no {LDM_UNET_PREFIX}* tensors: not a Stable Diffusion single file")
  # transformers < 4.31 saved the CLIP text model without its `text_model.` level.
  sd = {(LDM_CLIP_PREFIX + "text_model." + k[len(LDM_CLIP_PREFIX):]
         if k.startswith(LDM_CLIP_PREFIX) and not k.startswith(LDM_CLIP_PREFIX + "text_model.") else k): v
        for k, v in sd.items()}
  tables = ldm_tables(configs)
  ema_keys = {_ema_key(k): k for k in tables["unet"].by_torch}
  has_ema = any(k in ema_keys for k in sd)
  if ema and not has_ema:
    raise ValueError(f"{path}: ema=True but the file holds no model_ema.* weights")
  if ema:
    sd = {ema_keys.get(k, k): v for k, v in sd.items() if not k.startswith(LDM_UNET_PREFIX)}
  else:
    sd = {k: v for k, v in sd.items() if k not in ema_keys}
  groups: dict[str, dict] = {name: {} for name in COMPONENTS}
  unknown = []
  for key, value in sd.items():
    owner = next((name for name, table in tables.items() if key in table.by_torch), None)
    if owner is not None:
      groups[owner][key] = value
    elif key not in _IGNORED_LDM_KEYS:
      unknown.append(key)
  if unknown:
    raise ConversionError(f"{path}: unexpected tensors ({len(unknown)}):\n" + "\n".join(f"    {k}" for k in unknown))
  dtype = np.dtype(param_dtype) if param_dtype is not None else None
  params = {name: tables[name].to_flax(groups[name], dtype=dtype, source=path) for name in COMPONENTS}
  return configs, params


def save_ldm_checkpoint(configs: SDConfigs, params: dict, path: str | os.PathLike, dtype: Any = None) -> None:
  """Writes an original-layout single `.safetensors` file (UNet, VAE, CLIP text; no schedule buffers)."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: single files are written as .safetensors")
  tables = ldm_tables(configs)
  cast = np.dtype(dtype) if dtype is not None else None
  tensors = {}
  for name in COMPONENTS:
    tensors.update(tables[name].to_torch(jax.device_get(params[name]), dtype=cast))
  folder, stem = os.path.split(os.path.abspath(path))
  write_safetensors(tensors, folder, stem[: -len(".safetensors")])


def save_stable_diffusion(configs: SDConfigs, params: dict, folder: str | os.PathLike, dtype: Any = None) -> None:
  """Writes a diffusers pipeline folder (`model_index.json`, unet/, vae/, text_encoder/, scheduler/, tokenizer/)."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  save_unet(configs.unet, params["unet"], os.path.join(folder, "unet"), dtype)
  save_vae(configs.vae, params["vae"], os.path.join(folder, "vae"), dtype)
  save_text_encoder(configs.text_encoder, params["text_encoder"], os.path.join(folder, "text_encoder"), dtype)
  _write_scheduler_and_tokenizer(configs, folder)
  index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
           "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
           "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
           "feature_extractor": [None, None], "requires_safety_checker": False}
  if configs.tokenizer is not None:
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)
