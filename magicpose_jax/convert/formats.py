"""Format detection and conversion of Stable Diffusion checkpoints (UNets and whole pipelines).

MagicPose models (training runs and export folders) sit above `train/`, so their detection and conversion live
in `magicpose_jax.export`, whose `convert` handles every kind and hands the ones below to this module.

Sources, detected from the path:
  unet-diffusers    a diffusers UNet folder (config.json + diffusion_pytorch_model.*)
  unet-flax         our UNet folder (config.json + orbax params/)
  sd-diffusers      a diffusers Stable Diffusion pipeline folder (model_index.json, unet/, vae/, ...)
  sd-flax           our pipeline folder (unet/, vae/, text_encoder/ with orbax params/, scheduler/, tokenizer/)
  sd-ldm            an original single file (.safetensors / .ckpt / .pth with model.diffusion_model.*);
                    SD 2.x files need `prediction_type` ("v_prediction" for 768-v, "epsilon" for 512-base)
Destinations: `flax` and `diffusers` for a UNet; `flax`, `diffusers` and `ldm` for a whole SD (`magicpose`, the
released single file, is for MagicPose models: `magicpose_jax.export`). `ema=True` reads an LDM file's EMA UNet.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from magicpose_jax.convert.diffusers import load_unet, save_unet
from magicpose_jax.convert.flax_checkpoint import is_flax_model, load_flax_unet, save_flax_unet
from magicpose_jax.convert.stable_diffusion import (
    load_stable_diffusion,
    save_flax_pipeline,
    save_ldm_checkpoint,
    save_stable_diffusion,
)

FORMATS = ("flax", "diffusers", "ldm", "magicpose")


def detect_source(src: str | os.PathLike) -> str:
  """One of the source kinds in the module docstring; raises naming what was looked for."""
  src = os.fspath(src)
  if os.path.isfile(src):
    return "sd-ldm"
  if not os.path.isdir(src):
    raise FileNotFoundError(f"source not found: {src}")
  if is_flax_model(src):
    return "unet-flax"
  if is_flax_model(os.path.join(src, "unet")):
    return "sd-flax"
  if os.path.isfile(os.path.join(src, "model_index.json")):
    return "sd-diffusers"
  if os.path.isfile(os.path.join(src, "config.json")):
    return "unet-diffusers"
  raise ValueError(f"{src}: not a model folder (no model_index.json, config.json or unet/params)")


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, dtype: Any = None,
            variant: str | None = None, max_shard_bytes: int | None = None, ema: bool = False,
            prediction_type: str | None = None, model_config: str | os.PathLike | None = None) -> str:
  """Reads `src` (kind detected) and writes it to `dst` in format `to`; returns the source kind.

  `prediction_type` and `model_config` (a folder of config files: `load_stable_diffusion`'s `configs`) are for
  single-file sources, which are read as SD 1.5 (SD 2.x with an OpenCLIP text encoder) without one; SD 2.x files
  need `prediction_type`. `ema`: an LDM single file's `model_ema.*` UNet.
  """
  if to not in FORMATS:
    raise ValueError(f"unknown destination format {to!r}; expected one of {FORMATS}")
  kind = detect_source(src)
  if (prediction_type is not None or model_config is not None) and kind != "sd-ldm":
    raise ValueError(f"{src}: --prediction-type and --model-config apply to LDM single files only (this is {kind})")
  cast = (lambda p: jax.tree.map(lambda x: np.asarray(x).astype(dtype), p)) if dtype is not None else (lambda p: p)
  if to == "magicpose":
    raise ValueError(f"{src}: a {kind} has no MagicPose nets; --to magicpose takes a training run or an export")
  if kind.startswith("unet-"):
    if to == "ldm":
      raise ValueError(f"{src}: a lone UNet has no single-file layout; convert a whole SD pipeline for --to ldm")
    config, params = load_flax_unet(src) if kind == "unet-flax" else load_unet(src, param_dtype=None,
                                                                                variant=variant)
    params = cast(params)
    if to == "flax":
      save_flax_unet(config, params, dst)
    else:
      save_unet(config, params, dst, max_shard_bytes=max_shard_bytes)
    return kind
  configs, params = load_stable_diffusion(src, param_dtype=None, variant=variant, ema=ema,
                                          prediction_type=prediction_type, configs=model_config)
  params = cast(params)
  if to == "flax":
    save_flax_pipeline(configs, params, dst)
  elif to == "diffusers":
    save_stable_diffusion(configs, params, dst)
  else:
    save_ldm_checkpoint(configs, params, dst)
  return kind

