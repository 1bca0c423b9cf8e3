"""Original LDM / Stable Diffusion single-file key names <-> our Flax params.

The CompVis/Stability code base (`openaimodel.py`, `autoencoder.py`) names the SD
UNet `model.diffusion_model.{time_embed, input_blocks, middle_block, output_blocks,
out}`; MagicPose's release reuses that layout under other prefixes
(`appearance_control_model.`, `pose_control_model.`, ...). Each table here is the
diffusers-style table of `convert.keytable` with a rename function applied, so the
LDM tables are as strict and bijective as the diffusers ones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from magicpose_jax.convert.diffusers import abstract_unet_params
from magicpose_jax.convert.keytable import KeyTable
from magicpose_jax.models.unet import UNetConfig

LDM_UNET_PREFIX = "model.diffusion_model."

# Inside a ResnetBlock: diffusers name -> LDM name.
_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_module_map(config: UNetConfig) -> dict[str, str]:
  """diffusers module paths -> LDM module paths for the UNet's blocks (not their insides)."""
  m = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
       "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
       "mid_block.resnets.1": "middle_block.2"}
  n_levels = len(config.block_out_channels)
  k = 1
  for i, kind in enumerate(config.down_block_types):
    for j in range(config.layers[i]):
      m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
      if kind.startswith("CrossAttn"):
        m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
      k += 1
    if i < n_levels - 1:
      m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
      k += 1
  k = 0
  for i, kind in enumerate(config.up_block_types):
    attn = kind.startswith("CrossAttn")
    n = config.layers[n_levels - 1 - i] + 1
    for j in range(n):
      m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
      if attn:
        m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
      if j == n - 1 and i < n_levels - 1:
        m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if attn else 1}.conv"
      k += 1
  return m


def _renamer(module_map: dict[str, str], prefix: str) -> Callable[[str], str]:
  # Longest module path first, so `down_blocks.0.resnets.1` never matches `down_blocks.0.resnets.10`.
  pattern = re.compile(r"^(" + "|".join(re.escape(k) for k in sorted(module_map, key=len, reverse=True))
                       + r")\.(.*)$")

  def rename(key: str) -> str:
    match = pattern.match(key)
    if match is None:
      raise KeyError(f"no LDM name for {key!r}")
    module, rest = match.groups()
    if ".resnets." in module:
      part, _, leaf = rest.partition(".")
      rest = f"{_RESNET_PARTS[part]}.{leaf}"
    return f"{prefix}{module_map[module]}.{rest}"

  return rename


@functools.lru_cache(maxsize=16)
def ldm_unet_key_table(config: UNetConfig, prefix: str = LDM_UNET_PREFIX) -> KeyTable:
  """The UNet table with LDM names under `prefix` (`model.diffusion_model.` for SD)."""
  config = config.replace(remat_policy="none", attention_backend="xla")
  return KeyTable.from_params(abstract_unet_params(config), keep=("linear_1", "linear_2"),
                              rename=_renamer(ldm_unet_module_map(config), prefix),
                              name=f"UNet ({prefix}*)")
