"""Format detection and whole-checkpoint conversion (what `python -m magicpose_jax.convert` runs).

Sources, detected from the path:
  unet-diffusers    a diffusers UNet folder (config.json + diffusion_pytorch_model.*)
  unet-flax         our UNet folder (config.json + orbax params/)
  sd-diffusers      a diffusers Stable Diffusion pipeline folder (model_index.json, unet/, vae/, ...)
  sd-flax           our pipeline folder (unet/, vae/, text_encoder/ with orbax params/, scheduler/, tokenizer/)
  sd-ldm            an original single file (.safetensors / .ckpt / .pth with model.diffusion_model.*);
                    SD 2.x files need `prediction_type` ("v_prediction" for 768-v, "epsilon" for 512-base)
  magicpose-run     a training workdir (its newest step), its checkpoints/ folder, or one step's folder
  magicpose-export  a folder written from one (magicpose.json; diffusers or flax layout)
Destinations: `flax` and `diffusers` for a UNet; `flax`, `diffusers` and `ldm` for a whole SD; `diffusers`,
`flax` and `magicpose` (the released single file) for a MagicPose model (`ldm` too for a "base" run).
See `convert.training_run` for the export folder. `ema=True` takes a run's EMA weights.
"""

from __future__ import annotations

import dataclasses
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
from magicpose_jax.convert.training_run import (
    is_export,
    load_export,
    load_run,
    save_diffusers_export,
    save_flax_export,
    save_ldm_file,
    save_magicpose_file,
)
from magicpose_jax.train.stages import is_training_run

FORMATS = ("flax", "diffusers", "ldm", "magicpose")


def detect_source(src: str | os.PathLike) -> str:
  """One of the source kinds in the module docstring; raises naming what was looked for."""
  src = os.fspath(src)
  if os.path.isfile(src):
    return "sd-ldm"
  if not os.path.isdir(src):
    raise FileNotFoundError(f"source not found: {src}")
  if is_export(src):
    return "magicpose-export"
  if is_training_run(src):
    return "magicpose-run"
  if is_flax_model(src):
    return "unet-flax"
  if is_flax_model(os.path.join(src, "unet")):
    return "sd-flax"
  if os.path.isfile(os.path.join(src, "model_index.json")):
    return "sd-diffusers"
  if os.path.isfile(os.path.join(src, "config.json")):
    return "unet-diffusers"
  raise ValueError(f"{src}: not a model folder (no model_index.json, config.json, unet/params, magicpose.json, "
                   f"or a training run's checkpoints/<step>/)")


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, dtype: Any = None,
            variant: str | None = None, max_shard_bytes: int | None = None, ema: bool = False,
            prediction_type: str | None = None) -> str:
  """Reads `src` (kind detected) and writes it to `dst` in format `to`; returns the source kind.

  `prediction_type` is for single-file sources (see `load_stable_diffusion`); SD 2.x files need it.
  `ema`: an LDM single file's `model_ema.*` UNet, or a training run's EMA of its trainable params.
  """
  if to not in FORMATS:
    raise ValueError(f"unknown destination format {to!r}; expected one of {FORMATS}")
  kind = detect_source(src)
  if prediction_type is not None and kind != "sd-ldm":
    raise ValueError(f"{src}: prediction_type applies to LDM single files only (this is {kind})")
  cast = (lambda p: jax.tree.map(lambda x: np.asarray(x).astype(dtype), p)) if dtype is not None else (lambda p: p)
  if kind.startswith("magicpose-"):
    if variant is not None or max_shard_bytes is not None:
      raise ValueError(f"{src}: --variant and --max-shard-gb apply to diffusers sources and UNet outputs, not to a "
                       f"{kind}")
    _convert_magicpose(src, dst, to, kind, cast, ema)
    return kind
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
                                          prediction_type=prediction_type)
  params = cast(params)
  if to == "flax":
    save_flax_pipeline(configs, params, dst)
  elif to == "diffusers":
    save_stable_diffusion(configs, params, dst)
  else:
    save_ldm_checkpoint(configs, params, dst)
  return kind


def _convert_magicpose(src: str | os.PathLike, dst: str | os.PathLike, to: str, kind: str, cast: Any,
                       ema: bool) -> None:
  if kind == "magicpose-export" and ema:
    raise ValueError(f"{src}: an export holds one set of weights (its magicpose.json says which); --ema applies "
                     f"to training runs")
  model = load_run(src, ema=ema) if kind == "magicpose-run" else load_export(src, param_dtype=None)
  model = dataclasses.replace(model, params=cast(model.params))
  if to == "diffusers":
    save_diffusers_export(model, dst)
  elif to == "flax":
    save_flax_export(model, dst)
  elif to == "magicpose":
    save_magicpose_file(model, dst)
  else:
    save_ldm_file(model, dst)
