"""diffusers model folders <-> our Flax params, for the UNet.

A diffusers UNet folder is `config.json` plus `diffusion_pytorch_model.safetensors`
(or shards with `diffusion_pytorch_model.safetensors.index.json`, or the legacy
`diffusion_pytorch_model.bin`). `save_unet` writes one that
`diffusers.UNet2DConditionModel.from_pretrained(folder)` loads with no missing or
unexpected keys.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.convert.keytable import KeyTable
from magicpose_jax.convert.tensor_files import read_state_dict, write_model_folder
from magicpose_jax.models.unet import UNetConfig, abstract_unet_params

WEIGHTS_STEM = "diffusion_pytorch_model"
# diffusers attribute names that end in `_N` but are not list indices.
_UNET_KEEP = ("linear_1", "linear_2")


@functools.lru_cache(maxsize=16)
def unet_key_table(config: UNetConfig) -> KeyTable:
  """The UNet key table (diffusers names <-> Flax paths) for `config`."""
  # The table depends on the architecture only, not on runtime choices.
  config = config.replace(remat_policy="none", attention_backend="xla")
  return KeyTable.from_params(abstract_unet_params(config), keep=_UNET_KEEP, name="UNet2DConditionModel")


def find_weights(folder: str | os.PathLike, stem: str = WEIGHTS_STEM, variant: str | None = None) -> str:
  """The weights file of a diffusers model folder (safetensors preferred, then `.bin`)."""
  folder = os.fspath(folder)
  base = f"{stem}.{variant}" if variant else stem
  candidates = [f"{base}.safetensors", f"{base}.safetensors.index.json", f"{base}.bin", f"{base}.bin.index.json"]
  for name in candidates:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{folder}: no weights found (looked for {', '.join(candidates)})")


def load_weights(folder: str | os.PathLike, table: KeyTable, param_dtype: Any = jnp.float32,
                 variant: str | None = None,
                 preprocess: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None) -> dict:
  """The params of a diffusers model folder's weights file, strictly through `table`.

  `preprocess` rewrites the state dict first (legacy names); errors name the file read.
  """
  path = find_weights(folder, variant=variant)
  state_dict = read_state_dict(path)
  if preprocess is not None:
    state_dict = preprocess(state_dict)
  return table.to_flax(state_dict, dtype=param_dtype, source=path)


def load_unet(folder: str | os.PathLike, param_dtype: Any = jnp.float32,
              variant: str | None = None, **config_overrides: Any) -> tuple[UNetConfig, dict]:
  """Reads a diffusers UNet folder.

  Args:
    folder: holds `config.json` and the weights.
    param_dtype: dtype of the returned params (fp16/bf16 files are cast to it);
      None keeps the file's dtype.
    variant: diffusers weight variant, e.g. "fp16" for `*.fp16.safetensors`.
    **config_overrides: runtime fields of `UNetConfig` (`attention_backend`, `remat_policy`).

  Returns:
    `(config, params)`, params a nested dict of host numpy arrays.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped tensor.
  """
  config = UNetConfig.from_diffusers(folder, **config_overrides)
  return config, load_weights(folder, unet_key_table(config), param_dtype, variant)


def save_unet(config: UNetConfig, params: dict, folder: str | os.PathLike, dtype: Any = None,
              max_shard_bytes: int | None = None) -> list[str]:
  """Writes `config.json` and safetensors (sharded above `max_shard_bytes`) for diffusers.

  Args:
    dtype: storage dtype of the written tensors (default: the params' own).
  Returns:
    The names of the files written.
  """
  tensors = unet_key_table(config).to_torch(jax.device_get(params),
                                      dtype=np.dtype(dtype) if dtype is not None else None)
  return write_model_folder(config.to_diffusers(), tensors, folder, WEIGHTS_STEM, max_shard_bytes)
