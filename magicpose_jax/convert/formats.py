"""Format detection and whole-model conversion between the on-disk UNet formats.

Formats: `diffusers` (see `convert.diffusers`) and `flax` (see `convert.flax_checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from magicpose_jax.convert.diffusers import load_unet, save_unet
from magicpose_jax.convert.flax_checkpoint import is_flax_unet, load_flax_unet, save_flax_unet
from magicpose_jax.models.unet import UNetConfig

FORMATS = ("flax", "diffusers")


def read_any_unet(src: str | os.PathLike, variant: str | None = None) -> tuple[UNetConfig, dict]:
  """Reads a UNet folder in either format (detected from its contents), keeping its dtype."""
  if is_flax_unet(src):
    return load_flax_unet(src)
  return load_unet(src, param_dtype=None, variant=variant)


def convert_unet(src: str | os.PathLike, dst: str | os.PathLike, to: str, dtype: Any = None,
                 variant: str | None = None, max_shard_bytes: int | None = None) -> None:
  """Reads the UNet at `src` and writes it to `dst` in format `to`, cast to `dtype` if given."""
  if to not in FORMATS:
    raise ValueError(f"unknown destination format {to!r}; expected one of {FORMATS}")
  config, params = read_any_unet(src, variant)
  if dtype is not None:
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
  if to == "flax":
    save_flax_unet(config, params, dst)
  else:
    save_unet(config, params, dst, max_shard_bytes=max_shard_bytes)
