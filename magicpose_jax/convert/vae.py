"""diffusers `AutoencoderKL` folders <-> our Flax params.

A diffusers VAE folder is `config.json` plus `diffusion_pytorch_model.safetensors`
(or shards, or the legacy `.bin`). `save_vae` writes one that
`diffusers.AutoencoderKL.from_pretrained(folder)` loads with no missing or
unexpected keys.

Older diffusers VAE files (SD 1.x's own `vae/` folder among them) name the
mid-block attention `query/key/value/proj_attn` instead of `to_q/to_k/to_v/to_out.0`;
`load_vae` renames those as diffusers does on load (`upgrade_legacy_vae_keys`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.convert.diffusers import WEIGHTS_STEM, load_weights
from magicpose_jax.convert.keytable import KeyTable
from magicpose_jax.convert.tensor_files import write_model_folder
from magicpose_jax.models.vae import LatentEncoder, VAEConfig, abstract_vae_params

# diffusers' deprecated attention-block names -> current ones (`_fix_state_dict_keys_on_load`).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\."
                         r"(weight|bias)$")


@functools.lru_cache(maxsize=16)
def vae_key_table(config: VAEConfig) -> KeyTable:
  """The `AutoencoderKL` key table (diffusers names <-> Flax paths) for `config`."""
  # The table depends on the architecture only, not on runtime choices.
  config = config.replace(attention_backend="xla")
  return KeyTable.from_params(abstract_vae_params(config), name="AutoencoderKL")


def upgrade_legacy_vae_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames deprecated mid-block attention keys (`...attentions.0.query.weight` -> `...to_q.weight`).

  Their projections are linear layers; checkpoints that stored them as 1×1 convs
  (`[C, C, 1, 1]`, from the original LDM code) are reshaped to `[C, C]`. Every other
  key passes through unchanged.
  """
  out = {}
  for old_key, value in state_dict.items():
    m = _LEGACY_KEY.match(old_key)
    key = f"{m.group(1)}.{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}" if m else old_key
    squeeze = (".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 4
               and value.shape[2:] == (1, 1))
    out[key] = value.reshape(value.shape[:2]) if squeeze else value
  return out


def load_vae(folder: str | os.PathLike, param_dtype: Any = jnp.float32, variant: str | None = None,
             **config_overrides: Any) -> tuple[VAEConfig, dict]:
  """Reads a diffusers `AutoencoderKL` folder.

  Args:
    folder: holds `config.json` and the weights.
    param_dtype: dtype of the returned params (fp16/bf16 files are cast to it);
      None keeps the file's dtype.
    variant: diffusers weight variant, e.g. "fp16" for `*.fp16.safetensors`.
    **config_overrides: runtime fields of `VAEConfig` (`attention_backend`).

  Returns:
    `(config, params)`, params a nested dict of host numpy arrays.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped tensor.
  """
  config = VAEConfig.from_diffusers(folder, **config_overrides)
  return config, load_weights(folder, vae_key_table(config), param_dtype, variant, upgrade_legacy_vae_keys)


def latent_encoder(folder: str | os.PathLike, batch: int) -> LatentEncoder:
  """A diffusers `AutoencoderKL` folder -> `models.vae.LatentEncoder` (what `data.preprocessing` takes for --vae)."""
  return LatentEncoder(*load_vae(folder), batch)


def save_vae(config: VAEConfig, params: dict, folder: str | os.PathLike, dtype: Any = None,
             max_shard_bytes: int | None = None) -> list[str]:
  """Writes `config.json` and `diffusion_pytorch_model.safetensors` (sharded above `max_shard_bytes`).

  Args:
    dtype: storage dtype of the written tensors (default: the params' own).
  Returns:
    The names of the files written.
  """
  tensors = vae_key_table(config).to_torch(jax.device_get(params),
                                      dtype=np.dtype(dtype) if dtype is not None else None)
  return write_model_folder(config.to_diffusers(), tensors, folder, WEIGHTS_STEM, max_shard_bytes)
