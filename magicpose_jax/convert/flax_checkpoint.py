"""Our own on-disk format for one model: `config.json` + an orbax tree of its Flax params.

Layout of a folder written by `save_flax_model`:
  config.json   the model's config in its reference library's keys (diffusers/transformers),
                so the architecture is readable anywhere
  params/       an orbax `StandardCheckpointer` checkpoint of the Flax param tree
This is what `python -m magicpose_jax.convert --to flax` writes (one such folder per
component for a whole pipeline); orbax restores it sharded onto any mesh.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from magicpose_jax.models.unet import UNetConfig

PARAMS_DIR = "params"


def is_flax_model(folder: str | os.PathLike) -> bool:
  return os.path.isdir(os.path.join(folder, PARAMS_DIR)) and os.path.isfile(os.path.join(folder, "config.json"))


def save_flax_model(config: dict[str, Any], params: dict, folder: str | os.PathLike) -> None:
  """Writes `folder/config.json` and `folder/params` (orbax). The folder must not hold params yet."""
  folder = os.path.abspath(folder)
  target = os.path.join(folder, PARAMS_DIR)
  if os.path.exists(target):
    raise FileExistsError(f"{target} already exists; choose an empty destination")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(target, jax.device_get(params))
    ckpt.wait_until_finished()


def load_flax_params(folder: str | os.PathLike) -> dict:
  """The param tree of a folder written by `save_flax_model` (host arrays)."""
  folder = os.path.abspath(folder)
  if not is_flax_model(folder):
    raise FileNotFoundError(f"{folder}: not a Flax model folder (expected config.json and {PARAMS_DIR}/)")
  with ocp.StandardCheckpointer() as ckpt:
    return jax.device_get(ckpt.restore(os.path.join(folder, PARAMS_DIR)))


def save_flax_unet(config: UNetConfig, params: dict, folder: str | os.PathLike) -> None:
  save_flax_model(config.to_diffusers(), params, folder)


def load_flax_unet(folder: str | os.PathLike, **config_overrides: Any) -> tuple[UNetConfig, dict]:
  """Reads a UNet folder written by `save_flax_unet` -> `(config, params)`."""
  params = load_flax_params(folder)
  return UNetConfig.from_diffusers(folder, **config_overrides), params
