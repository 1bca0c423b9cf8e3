"""transformers `CLIPTextModel` folders <-> our Flax params, for SD's text encoder.

Such a folder (diffusers' `text_encoder/`) is `config.json` plus `model.safetensors`
(or shards with `model.safetensors.index.json`, or the legacy `pytorch_model.bin`,
possibly sharded with `pytorch_model.bin.index.json`).

Key names: the public SD checkpoints (and transformers 4) name every tensor
`text_model.<module path>`; transformers 5's `save_pretrained` drops that prefix
(its loader accepts both). Our table uses the prefixed names, so `save_text_encoder`
writes what every version of transformers and every SD tool reads; `load_text_encoder`
reads both spellings.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.convert.keytable import KeyTable
from magicpose_jax.convert.tensor_files import read_state_dict, write_model_folder
from magicpose_jax.models.clip import CLIPTextConfig, abstract_text_encoder_params
from magicpose_jax.models.config_files import read_config_dict

PREFIX = "text_model."
WEIGHTS_STEM = "model"
# The only tensor of a text-encoder checkpoint that is not a parameter: the
# `embeddings.position_ids` buffer (arange(max_position_embeddings)), which older
# transformers versions saved as persistent. It carries no information, so it is
# accepted and dropped; no other extra key is.
_IGNORED_BUFFERS = (PREFIX + "embeddings.position_ids",)
# A full `CLIPModel` checkpoint also holds the vision tower and both projections;
# reading its text encoder drops exactly these.
_CLIP_MODEL_EXTRA_PREFIXES = ("vision_model.",)
_CLIP_MODEL_EXTRA_KEYS = ("visual_projection.weight", "text_projection.weight", "logit_scale")


@functools.lru_cache(maxsize=16)
def clip_key_table(config: CLIPTextConfig) -> KeyTable:
  """The CLIP text encoder key table for `config`.

  transformers names <-> Flax paths, e.g. `text_model.encoder.layers.0.self_attn.q_proj.weight`
  <-> `encoder/layers_0/self_attn/q_proj/kernel` (transposed), `...token_embedding.weight` <->
  `embeddings/token_embedding/embedding`, LayerNorm `weight` <-> `scale`.
  """
  generic = KeyTable.from_params(abstract_text_encoder_params(config), name="CLIPTextModel")
  return generic.with_prefix(PREFIX, name="CLIPTextModel")


def find_text_encoder_weights(folder: str | os.PathLike, variant: str | None = None) -> str:
  """The weights file of a transformers model folder (safetensors preferred, then torch pickles)."""
  folder = os.fspath(folder)
  suffix = f".{variant}" if variant else ""
  candidates = [f"model{suffix}.safetensors", f"model{suffix}.safetensors.index.json",
                f"pytorch_model{suffix}.bin", f"pytorch_model{suffix}.bin.index.json"]
  for name in candidates:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{folder}: no text encoder weights found (looked for {', '.join(candidates)})")


def normalize_state_dict(state_dict: Mapping[str, Any], full_clip_model: bool = False) -> dict[str, Any]:
  """Brings a text-encoder state dict to the table's spelling.

  Adds the `text_model.` prefix when the file has none (transformers 5 `save_pretrained`),
  drops the `position_ids` buffer, and, for a full `CLIPModel` checkpoint
  (`full_clip_model=True`), drops its vision tower and projections. Everything else is
  left for the key table to check.
  """
  sd = dict(state_dict)
  if full_clip_model:
    sd = {k: v for k, v in sd.items()
          if not k.startswith(_CLIP_MODEL_EXTRA_PREFIXES) and k not in _CLIP_MODEL_EXTRA_KEYS}
  if not any(k.startswith(PREFIX) for k in sd):
    sd = {PREFIX + k: v for k, v in sd.items()}
  for k in _IGNORED_BUFFERS:
    sd.pop(k, None)
  return sd


def load_text_encoder(folder: str | os.PathLike, param_dtype: Any = jnp.float32,
                      variant: str | None = None) -> tuple[CLIPTextConfig, dict]:
  """Reads a transformers `CLIPTextModel` folder (or a full `CLIPModel` one: its text tower).

  Args:
    folder: holds `config.json` and the weights.
    param_dtype: dtype of the returned params (fp16/bf16 files are cast to it); None keeps
      the file's dtype.
    variant: weight variant, e.g. "fp16" for diffusers' `model.fp16.safetensors`.

  Returns:
    `(config, params)`, params a nested dict of host numpy arrays.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped tensor.
  """
  config = CLIPTextConfig.from_transformers(folder)
  raw, _ = read_config_dict(folder, "CLIP text")
  full = raw.get("model_type") == "clip" or "text_config" in raw or "text_config_dict" in raw
  weights = find_text_encoder_weights(folder, variant)
  sd = normalize_state_dict(read_state_dict(weights), full_clip_model=full)
  dtype = np.dtype(param_dtype) if param_dtype is not None else None
  return config, clip_key_table(config).to_flax(sd, dtype=dtype, source=weights)


def save_text_encoder(config: CLIPTextConfig, params: Mapping[str, Any], folder: str | os.PathLike,
                      dtype: Any = None, max_shard_bytes: int | None = None) -> list[str]:
  """Writes `config.json` and `model.safetensors` (sharded above `max_shard_bytes`).

  `transformers.CLIPTextModel.from_pretrained(folder)` loads the result with no missing or
  unexpected keys.

  Args:
    dtype: storage dtype of the written tensors (default: the params' own).
  Returns:
    The names of the files written.
  """
  tensors = clip_key_table(config).to_torch(jax.device_get(params),
                                      dtype=np.dtype(dtype) if dtype is not None else None)
  return write_model_folder(config.to_transformers(), tensors, folder, WEIGHTS_STEM, max_shard_bytes)
