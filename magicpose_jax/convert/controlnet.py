"""ControlNet checkpoints <-> our Flax params: diffusers folders and the original (LDM) layout.

A diffusers ControlNet folder is `config.json` plus `diffusion_pytorch_model.safetensors`
(or shards, or the legacy `.bin`); `save_controlnet` writes one that
`diffusers.ControlNetModel.from_pretrained(folder)` loads with no missing or unexpected keys.

The original ControlNet code (`cldm.py`) names the same tensors like the LDM UNet
(`time_embed.*`, `input_blocks.*`, `middle_block.*`) plus `zero_convs.{j}.0` (the 1×1
down-residual convs), `middle_block_out.0` and `input_hint_block.{0,2,...,14}` (the hint
encoder's convs; the odd indices are its SiLUs). ControlNet 1.1 files
(`control_v11p_sd15_openpose.pth`) use the prefix `control_model.`; MagicPose's release
`pose_control_model.`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.convert.diffusers import WEIGHTS_STEM, load_weights
from magicpose_jax.convert.keytable import ConversionError, KeyTable
from magicpose_jax.convert.ldm import _renamer, ldm_unet_module_map
from magicpose_jax.convert.tensor_files import read_state_dict, write_model_folder
from magicpose_jax.models.controlnet import ControlNetConfig, abstract_controlnet_params

LDM_CONTROLNET_PREFIX = "control_model."  # ControlNet 1.0/1.1 files (and diffusers' single-file loader)
MAGICPOSE_POSE_PREFIX = "pose_control_model."  # MagicPose's release checkpoint
_KEEP = ("linear_1", "linear_2")  # diffusers attribute names that end in `_N` but are not list indices


def _architecture(config: ControlNetConfig) -> ControlNetConfig:
  # The tables depend on the architecture only, not on runtime choices.
  return config.replace(remat_policy="none", attention_backend="xla")


@functools.lru_cache(maxsize=16)
def controlnet_key_table(config: ControlNetConfig) -> KeyTable:
  """The `ControlNetModel` key table (diffusers names <-> Flax paths) for `config`."""
  return KeyTable.from_params(abstract_controlnet_params(_architecture(config)), keep=_KEEP, name="ControlNetModel")


def ldm_controlnet_module_map(config: ControlNetConfig) -> dict[str, str]:
  """diffusers module paths -> original ControlNet (`cldm.py`) module paths."""
  unet = ldm_unet_module_map(config.unet_config())
  shared = ("conv_in", "time_embedding.", "down_blocks.", "mid_block.")
  m = {k: v for k, v in unet.items() if k.startswith(shared)}
  for j in range(config.num_down_residuals):
    m[f"controlnet_down_blocks.{j}"] = f"zero_convs.{j}.0"
  m["controlnet_mid_block"] = "middle_block_out.0"
  # `input_hint_block` is one Sequential of convs and SiLUs: the convs sit at the even indices.
  n_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
  m["controlnet_cond_embedding.conv_in"] = "input_hint_block.0"
  for j in range(n_blocks):
    m[f"controlnet_cond_embedding.blocks.{j}"] = f"input_hint_block.{2 * (j + 1)}"
  m["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{2 * (n_blocks + 1)}"
  return m


@functools.lru_cache(maxsize=16)
def ldm_controlnet_key_table(config: ControlNetConfig, prefix: str = LDM_CONTROLNET_PREFIX) -> KeyTable:
  """The ControlNet table with original-layout names under `prefix` (`control_model.`, `pose_control_model.`)."""
  config = _architecture(config)
  return KeyTable.from_params(abstract_controlnet_params(config), keep=_KEEP,
                              rename=_renamer(ldm_controlnet_module_map(config), prefix),
                              name=f"ControlNet ({prefix}*)")


def load_controlnet(folder: str | os.PathLike, param_dtype: Any = jnp.float32, variant: str | None = None,
                    **config_overrides: Any) -> tuple[ControlNetConfig, dict]:
  """Reads a diffusers `ControlNetModel` folder.

  Args:
    folder: holds `config.json` and the weights.
    param_dtype: dtype of the returned params (fp16/bf16 files are cast to it); None keeps the file's dtype.
    variant: diffusers weight variant, e.g. "fp16" for `*.fp16.safetensors`.
    **config_overrides: runtime fields of `ControlNetConfig` (`attention_backend`, `remat_policy`).

  Returns:
    `(config, params)`, params a nested dict of host numpy arrays.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped tensor.
  """
  config = ControlNetConfig.from_diffusers(folder, **config_overrides)
  return config, load_weights(folder, controlnet_key_table(config), param_dtype, variant)


def save_controlnet(config: ControlNetConfig, params: dict, folder: str | os.PathLike, dtype: Any = None,
                    max_shard_bytes: int | None = None) -> list[str]:
  """Writes `config.json` and `diffusion_pytorch_model.safetensors` (sharded above `max_shard_bytes`).

  Args:
    dtype: storage dtype of the written tensors (default: the params' own).
  Returns:
    The names of the files written.
  """
  tensors = controlnet_key_table(config).to_torch(jax.device_get(params),
                                      dtype=np.dtype(dtype) if dtype is not None else None)
  return write_model_folder(config.to_diffusers(), tensors, folder, WEIGHTS_STEM, max_shard_bytes)


def load_ldm_controlnet(path: str | os.PathLike, config: ControlNetConfig,
                        prefix: str | Sequence[str] = LDM_CONTROLNET_PREFIX, param_dtype: Any = jnp.float32) -> dict:
  """Reads the ControlNet under `prefix` from an original-layout file (`.pth`, `.ckpt`, `.safetensors`).

  Only keys starting with `prefix` are read (a MagicPose release file also holds the UNet,
  VAE, CLIP and appearance net); those must match the table exactly. `prefix` may be several candidates, tried in
  order: the first that any key starts with is read (e.g. `(LDM_CONTROLNET_PREFIX, MAGICPOSE_POSE_PREFIX)` for a
  ControlNet 1.1 or a MagicPose release file).

  Raises:
    ConversionError: no key has the prefix, or the keys under it do not match (every one named).
  """
  path = os.fspath(path)
  candidates = (prefix,) if isinstance(prefix, str) else tuple(prefix)
  state_dict = read_state_dict(path)
  found = next((p for p in candidates if any(k.startswith(p) for k in state_dict)), None)
  if found is None:
    under = f"the prefix {candidates[0]!r}" if len(candidates) == 1 else " or ".join(map(repr, candidates))
    raise ConversionError(f"{path}: no tensors under {under}")
  state_dict = {k: v for k, v in state_dict.items() if k.startswith(found)}
  return ldm_controlnet_key_table(config, found).to_flax(state_dict, dtype=param_dtype, source=path)
