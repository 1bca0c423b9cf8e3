"""Whole Stable Diffusion checkpoints: diffusers pipeline folders and original LDM single files.

    configs, params = load_stable_diffusion("stable-diffusion-v1-5")             # diffusers folder
    configs, params = load_stable_diffusion("v1-5-pruned-emaonly.safetensors")   # LDM single file (.ckpt too)
    configs, params = load_stable_diffusion("v2-1_768-ema-pruned.safetensors", prediction_type="v_prediction")

`params` is `{"unet": ..., "vae": ..., "text_encoder": ...}` (host numpy trees);
`configs` an `SDConfigs`. The reverse: `save_stable_diffusion(configs, params, folder)`
(diffusers layout), `save_ldm_checkpoint(configs, params, file.safetensors)` and
`save_flax_pipeline(configs, params, folder)` (ours: orbax params per component; read
back by `load_stable_diffusion` too).

LDM single files carry no config: the architecture is read from the tensors.
  * SD 1.x: `cond_stage_model.transformer.*` (OpenAI CLIP ViT-L) -> `SD15`.
  * SD 2.x: `cond_stage_model.model.*` (OpenCLIP ViT-H, `convert.ldm.ldm_open_clip_key_table`),
    a UNet with linear `proj_in` (2-D weights) and cross-attention width 1024 ->
    `sd2_configs(prediction_type)`. These files do not say whether the UNet predicts v
    (SD 2.x 768-v) or epsilon (512-base), so `prediction_type` must be given. (diffusers
    guesses "epsilon" iff a `.ckpt`'s top-level `global_step` is 875000, else "v_prediction":
    its own comment calls that brittle, safetensors files have no `global_step`, and a 2.1-base
    file would come out wrong, so we do not reproduce it.) The tensors of OpenCLIP's last layer,
    `text_projection` and `logit_scale`, which SD does not use, come back as `params["extras"]`
    and are written back by `save_ldm_checkpoint` (see `convert.ldm.open_clip_extra_shapes`).
Besides the weights, those files hold DDPM schedule buffers and possibly EMA
weights: both are recognised and never silently dropped (EMA weights are used with
`ema=True`; any other unknown tensor is an error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.convert.clip import clip_key_table, load_text_encoder, save_text_encoder
from magicpose_jax.convert.diffusers import load_unet, save_unet
from magicpose_jax.convert.flax_checkpoint import is_flax_model, load_flax_params, save_flax_model
from magicpose_jax.convert.keytable import ConversionError, KeyTable
from magicpose_jax.convert.ldm import (
  LDM_OPEN_CLIP_PREFIX,
  LDM_UNET_PREFIX,
  LDM_VAE_PREFIX,
  FusedKeyTable,
  check_open_clip_extras,
  ldm_open_clip_key_table,
  ldm_unet_key_table,
  ldm_vae_key_table,
  open_clip_extra_shapes,
  uses_open_clip,
)
from magicpose_jax.convert.tensor_files import read_state_dict, write_safetensors
from magicpose_jax.convert.vae import load_vae, save_vae
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE, ScheduleConfig
from magicpose_jax.models.clip import CLIP_VARIANTS, CLIPTextConfig
from magicpose_jax.models.patch_vae import AnyVAEConfig, PatchVAEConfig, vae_config_from_folder
from magicpose_jax.models.unet import VARIANTS, UNetConfig
from magicpose_jax.models.vae import VAE_VARIANTS

log = logging.getLogger(__name__)

LDM_CLIP_PREFIX = "cond_stage_model.transformer."
# The DDPM buffers of LatentDiffusion (`ldm/models/diffusion/ddpm.py`): derived from the schedule.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar")
_IGNORED_LDM_KEYS = (*SCHEDULE_BUFFERS, "model_ema.decay", "model_ema.num_updates",
                     LDM_CLIP_PREFIX + "text_model.embeddings.position_ids")
COMPONENTS = ("unet", "vae", "text_encoder")
# `params["extras"]`: file tensors no component has params for (SD 2.x; see `convert.ldm.open_clip_extra_shapes`).
EXTRAS = "extras"
# Where `save_flax_pipeline` keeps them (PyTorch names and layout).
EXTRAS_FILE = "ldm_extras.safetensors"


@dataclasses.dataclass(frozen=True)
class SDConfigs:
  """The architecture of every Stable Diffusion component, plus where the tokenizer files are."""

  unet: UNetConfig
  vae: AnyVAEConfig  # a PatchVAEConfig only in our Flax pipeline folders (no diffusers/LDM counterpart)
  text_encoder: CLIPTextConfig
  scheduler: ScheduleConfig
  tokenizer: str | None = None  # a folder with vocab.json + merges.txt (None: not in the checkpoint)


SD15 = SDConfigs(VARIANTS["sd15"], VAE_VARIANTS["sd15"], CLIP_VARIANTS["sd15"], SD15_SCHEDULE)


def sd2_configs(prediction_type: str) -> SDConfigs:
  """SD 2.x (diffusers' stable-diffusion-2-1 sizes): "v_prediction" for the 768-v models, "epsilon" for 512-base.

  The schedule is SD 1.x's (scaled_linear 0.00085 -> 0.012, 1000 steps, steps_offset 1,
  set_alpha_to_one and clip_sample off) with that prediction type.
  """
  return SDConfigs(VARIANTS["sd21"], VAE_VARIANTS["sd15"], CLIP_VARIANTS["sd21"],
                   SD15_SCHEDULE.replace(prediction_type=prediction_type))


def load_stable_diffusion(path: str | os.PathLike, param_dtype: Any = jnp.float32, variant: str | None = None,
                          ema: bool = False, configs: SDConfigs | str | os.PathLike | None = None,
                          prediction_type: str | None = None,
                          components: Sequence[str] = COMPONENTS) -> tuple[SDConfigs, dict]:
  """Reads a diffusers pipeline folder or an LDM single file (`.safetensors`, `.ckpt`, `.pth`).

  Args:
    path: the folder (with `model_index.json`) or the file.
    param_dtype: dtype of the returned params (extras included); None keeps the file's.
    variant: diffusers weight variant of a folder (e.g. "fp16").
    ema: single files only: use the `model_ema.*` UNet weights instead of `model.diffusion_model.*`.
    configs: single files only: the architecture and schedule, for non-standard sizes (default:
      detected, `SD15` or `sd2_configs(prediction_type)`): an `SDConfigs`, or a folder laid out as a diffusers
      pipeline (`unet/`, `vae/`, `text_encoder/`, `scheduler/` with their config files; e.g. the pipeline or
      export the file was converted from).
    prediction_type: single files only: the schedule's prediction type ("epsilon", "v_prediction",
      "sample"), replacing the default's or `configs`'. Required for SD 2.x files unless `configs`
      is given: they do not say whether they are 768-v ("v_prediction") or 512-base ("epsilon").
    components: which of "unet", "vae", "text_encoder" to return (the configs are always all three). A
      folder reads only those; a single file is read whole.

  Returns:
    `(configs, params)`: params `{"unet", "vae", "text_encoder"}` (nested host numpy trees) and,
    for an SD 2.x file holding them, `"extras"`: `{PyTorch name: array}` of the text-tower tensors
    SD does not use (`convert.ldm.open_clip_extra_shapes`), which `save_ldm_checkpoint` writes back.
  """
  path = os.fspath(path)
  components = tuple(components)
  if not components or set(components) - set(COMPONENTS):
    raise ValueError(f"components={components}: expected a non-empty subset of {COMPONENTS}")
  if os.path.isdir(path):
    if ema or configs is not None or prediction_type is not None:
      raise ValueError(f"{path}: ema=, configs= and prediction_type= apply to LDM single files only (a folder's "
                       f"scheduler/ config holds its prediction type)")
    if is_flax_model(os.path.join(path, "unet")):
      return _load_flax_folder(path, param_dtype, components)
    return _load_folder(path, param_dtype, variant, components)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Stable Diffusion checkpoint not found: {path}")
  if configs is not None and not isinstance(configs, SDConfigs):
    configs = model_configs(configs)
  configs, params = _load_single_file(path, param_dtype, ema, configs, prediction_type)
  return configs, {k: v for k, v in params.items() if k in components or k == EXTRAS}


def model_configs(folder: str | os.PathLike) -> SDConfigs:
  """The architectures and schedule a diffusers-layout folder's config files describe (no weights read): for an LDM
  single file of another architecture than the ones detected (CLI: `convert --model-config FOLDER`)."""
  folder = os.fspath(folder)
  missing = [c for c in (*COMPONENTS, "scheduler") if not os.path.isdir(os.path.join(folder, c))]
  if missing:
    raise FileNotFoundError(f"model config {folder}: expected a folder with unet/, vae/, text_encoder/ and "
                            f"scheduler/ config files (a diffusers pipeline or an export); missing "
                            f"{', '.join(m + '/' for m in missing)}")
  return _folder_configs(folder)


def _folder_configs(path: str) -> SDConfigs:
  return SDConfigs(UNetConfig.from_diffusers(os.path.join(path, "unet")),
                   vae_config_from_folder(os.path.join(path, "vae")),
                   CLIPTextConfig.from_transformers(os.path.join(path, "text_encoder")),
                   ScheduleConfig.from_diffusers(os.path.join(path, "scheduler")), _tokenizer_dir(path))


def _load_folder(path: str, param_dtype: Any, variant: str | None,
                 components: tuple[str, ...]) -> tuple[SDConfigs, dict]:
  missing = [c for c in (*COMPONENTS, "scheduler") if not os.path.isdir(os.path.join(path, c))]
  if missing:
    raise FileNotFoundError(f"{path}: not a Stable Diffusion pipeline folder (missing {', '.join(missing)}/)")
  loaders = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder}
  params = {name: loaders[name](os.path.join(path, name), param_dtype, variant)[1] for name in components}
  return _folder_configs(path), params


def _tokenizer_dir(path: str) -> str | None:
  tokenizer = os.path.join(path, "tokenizer")
  return tokenizer if os.path.isfile(os.path.join(tokenizer, "vocab.json")) else None


def _load_flax_folder(path: str, param_dtype: Any, components: tuple[str, ...]) -> tuple[SDConfigs, dict]:
  configs = _folder_configs(path)
  params = {name: load_flax_params(os.path.join(path, name)) for name in components}
  if os.path.isfile(os.path.join(path, EXTRAS_FILE)):
    params[EXTRAS] = read_state_dict(os.path.join(path, EXTRAS_FILE))
  if param_dtype is not None:
    params = jax.tree.map(lambda x: np.asarray(x).astype(param_dtype), params)
  return configs, params


def save_flax_pipeline(configs: SDConfigs, params: dict, folder: str | os.PathLike) -> None:
  """Our format for a whole SD: `unet/`, `vae/`, `text_encoder/` as `save_flax_model` folders,
  plus diffusers' `scheduler/` and `tokenizer/` files, and `params["extras"]` (if any) as
  `ldm_extras.safetensors`, so an SD 2.x single file converted to ours and back loses nothing."""
  folder = os.fspath(folder)
  extras = params.get(EXTRAS)
  if extras:
    _check_extras(configs, extras)
  save_flax_model(configs.unet.to_diffusers(), params["unet"], os.path.join(folder, "unet"))
  save_flax_model(configs.vae.to_diffusers(), params["vae"], os.path.join(folder, "vae"))
  save_flax_model(configs.text_encoder.to_transformers(), params["text_encoder"],
                  os.path.join(folder, "text_encoder"))
  if extras:
    write_safetensors(jax.device_get(extras), folder, EXTRAS_FILE[: -len(".safetensors")])
  _write_scheduler_and_tokenizer(configs, folder)


def _write_scheduler_and_tokenizer(configs: SDConfigs, folder: str) -> None:
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(configs.scheduler.to_diffusers(), f, indent=2)
  if configs.tokenizer is not None:
    shutil.copytree(configs.tokenizer, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)


def _check_diffusers_vae(configs: SDConfigs, layout: str) -> None:
  if isinstance(configs.vae, PatchVAEConfig):
    raise ValueError(f"the VAE is a PatchVAE (models/patch_vae.py, the demo's linear patch autoencoder), which "
                     f"{layout} cannot hold (diffusers has no such class); save_flax_pipeline keeps it")


def ldm_tables(configs: SDConfigs) -> dict[str, KeyTable | FusedKeyTable]:
  """The single-file key table of each component; the text encoder's layout follows its config
  (`convert.ldm.uses_open_clip`: SD 2.x's OpenCLIP, else SD 1.x's transformers CLIP)."""
  _check_diffusers_vae(configs, "an LDM single file")
  text = (ldm_open_clip_key_table(configs.text_encoder, LDM_OPEN_CLIP_PREFIX) if uses_open_clip(configs.text_encoder)
          else clip_key_table(configs.text_encoder).with_prefix(LDM_CLIP_PREFIX))
  return {"unet": ldm_unet_key_table(configs.unet, LDM_UNET_PREFIX),
          "vae": ldm_vae_key_table(configs.vae, LDM_VAE_PREFIX), "text_encoder": text}


def torch_keys(table: KeyTable | FusedKeyTable) -> Mapping[str, Any]:
  return table.torch_shapes if isinstance(table, FusedKeyTable) else table.by_torch


def _check_extras(configs: SDConfigs, extras: dict, source: str = "params['extras']") -> None:
  if not uses_open_clip(configs.text_encoder):
    raise ValueError(f"{source}: {len(extras)} extra tensors, but only SD 2.x (OpenCLIP) single files have any "
                     f"(this text encoder is hidden_act={configs.text_encoder.hidden_act!r}, SD 1.x's layout)")
  check_open_clip_extras(extras, configs.text_encoder, source)


def _sd2_configs_for(sd: dict, path: str, prediction_type: str) -> SDConfigs:
  """`sd2_configs(prediction_type)` after checking the UNet is SD 2.x's (linear proj_in, cross-attention 1024)."""
  unet = {k: v for k, v in sd.items() if k.startswith(LDM_UNET_PREFIX)}
  proj_in = sorted({v.ndim for k, v in unet.items() if k.endswith(".proj_in.weight")})
  cross = sorted({v.shape[-1] for k, v in unet.items() if k.endswith(".attn2.to_k.weight")})
  if proj_in != [2] or cross != [1024]:
    raise ValueError(f"{path}: an OpenCLIP text encoder (SD 2.x), but not SD 2.x's UNet: proj_in weights of rank "
                     f"{proj_in} (SD 2.x: [2], linear) and cross-attention widths {cross} (SD 2.x: [1024]); "
                     f"pass the config files of other architectures (--model-config FOLDER; Python: configs=)")
  return sd2_configs(prediction_type)


def _ema_key(ldm_key: str) -> str:
  # LDM's EMA module stores `model.diffusion_model.a.b.0.weight` as `model_ema.diffusion_modelab0weight`.
  return "model_ema." + ldm_key[len("model."):].replace(".", "")


def _load_single_file(path: str, param_dtype: Any, ema: bool, configs: SDConfigs | None,
                      prediction_type: str | None) -> tuple[SDConfigs, dict]:
  sd = read_state_dict(path)
  open_clip = any(k.startswith(LDM_OPEN_CLIP_PREFIX) for k in sd)
  if open_clip and configs is None and prediction_type is None:
    raise ValueError(f"{path}: an SD 2.x single file (OpenCLIP text encoder, {LDM_OPEN_CLIP_PREFIX}*) does not say "
                     f"what its UNet predicts: pass prediction_type=\"v_prediction\" for SD 2.x 768-v models or "
                     f"\"epsilon\" for 512-base ones (CLI: --prediction-type)")
  if not any(k.startswith(LDM_UNET_PREFIX) for k in sd):
    raise ValueError(f"{path}: no {LDM_UNET_PREFIX}* tensors: not a Stable Diffusion single file")
  # Single files do not record their architecture: without `configs` it is SD 1.5 (SD 2.x with an OpenCLIP text
  # encoder), and every mismatch error says so.
  assumed = ""
  if configs is None:
    configs = _sd2_configs_for(sd, path, prediction_type) if open_clip else SD15
    assumed = (f"{path} was read as {'SD 2.x' if open_clip else 'SD 1.5'}: a single file does not record its "
               f"architecture. For another one pass its config files: --model-config FOLDER (Python: configs=), a "
               f"folder with unet/, vae/, text_encoder/ and scheduler/ configs, e.g. the pipeline or export the file "
               f"was converted from")
    log.info("reading %s as %s (no configs given)", path, "SD 2.x" if open_clip else "SD 1.5")
  if prediction_type is not None:
    configs = dataclasses.replace(configs, scheduler=configs.scheduler.replace(prediction_type=prediction_type))
  if open_clip != uses_open_clip(configs.text_encoder):
    held = f"SD 2.x's OpenCLIP ({LDM_OPEN_CLIP_PREFIX}*)" if open_clip else f"SD 1.x's CLIP ({LDM_CLIP_PREFIX}*)"
    raise ValueError(f"{path}: the file holds {held} text encoder, but configs.text_encoder has hidden_act="
                     f"{configs.text_encoder.hidden_act!r} (SD 1.x: 'quick_gelu', SD 2.x's OpenCLIP: 'gelu')")
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
  owners = {k: name for name, table in tables.items() for k in torch_keys(table)}
  extra_names = open_clip_extra_shapes(configs.text_encoder, LDM_OPEN_CLIP_PREFIX) if open_clip else {}
  groups: dict[str, dict] = {name: {} for name in (*COMPONENTS, EXTRAS)}
  unknown = []
  for key, value in sd.items():
    owner = owners.get(key) or (EXTRAS if key in extra_names else None)
    if owner is not None:
      groups[owner][key] = value
    elif key not in _IGNORED_LDM_KEYS:
      unknown.append(key)
  if unknown:
    raise ConversionError(f"{path}: unexpected tensors ({len(unknown)}):\n" + "\n".join(f"    {k}" for k in unknown)
                          + (f"\n{assumed}" if assumed else ""))
  dtype = np.dtype(param_dtype) if param_dtype is not None else None
  try:
    params = {name: tables[name].to_flax(groups[name], dtype=dtype, source=path) for name in COMPONENTS}
  except ConversionError as e:
    if not assumed:
      raise
    raise ConversionError(f"{e}\n{assumed}") from None
  if groups[EXTRAS]:
    check_open_clip_extras(groups[EXTRAS], configs.text_encoder, path, LDM_OPEN_CLIP_PREFIX)
    params[EXTRAS] = {k: np.asarray(v).astype(dtype) if dtype is not None else v for k, v in groups[EXTRAS].items()}
  return configs, params


def save_ldm_checkpoint(configs: SDConfigs, params: dict, path: str | os.PathLike, dtype: Any = None) -> None:
  """Writes an original-layout single `.safetensors` file (UNet, VAE, text encoder; no schedule buffers).

  The text encoder's layout follows `configs.text_encoder`: SD 1.x's `cond_stage_model.transformer.*`,
  or, for an OpenCLIP config (`hidden_act="gelu"`, SD 2.x), `cond_stage_model.model.*` plus
  `params["extras"]` as given (checked against `convert.ldm.open_clip_extra_shapes`). Without extras
  an SD 2.x file lacks OpenCLIP's last layer, `text_projection` and `logit_scale`, none of which SD
  reads (diffusers' `from_single_file` and our reader take it as is).
  """
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: single files are written as .safetensors")
  tables = ldm_tables(configs)
  cast = np.dtype(dtype) if dtype is not None else None
  tensors = {}
  for name in COMPONENTS:
    tensors.update(tables[name].to_torch(jax.device_get(params[name]), dtype=cast))
  extras = params.get(EXTRAS)
  if extras:
    _check_extras(configs, extras)
    tensors.update({k: np.asarray(v).astype(cast) if cast is not None else np.asarray(v)
                    for k, v in jax.device_get(extras).items()})
  folder, name = os.path.split(os.path.abspath(path))
  write_safetensors(tensors, folder, name[: -len(".safetensors")])


def save_stable_diffusion(configs: SDConfigs, params: dict, folder: str | os.PathLike, dtype: Any = None) -> None:
  """Writes a diffusers pipeline folder (`model_index.json`, unet/, vae/, text_encoder/, scheduler/, tokenizer/).

  `params["extras"]` (SD 2.x's unused text-tower tensors) have no place in this layout (diffusers'
  own converter drops them too): they are not written, with a warning naming how many.
  """
  folder = os.fspath(folder)
  _check_diffusers_vae(configs, "a diffusers pipeline folder")
  if params.get(EXTRAS):
    warnings.warn(f"{folder}: the diffusers layout has no place for the {len(params[EXTRAS])} extra tensors of the "
                  f"SD 2.x file (OpenCLIP's last layer, text_projection, logit_scale; unused by SD); not written. "
                  f"save_ldm_checkpoint or save_flax_pipeline keep them.", stacklevel=2)
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
