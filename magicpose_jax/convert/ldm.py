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
from magicpose_jax.convert.vae import abstract_vae_params
from magicpose_jax.models.unet import UNetConfig
from magicpose_jax.models.vae import VAEConfig

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."

# Inside a UNet ResnetBlock: diffusers name -> LDM name.
_UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                      "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# Inside a VAE ResnetBlock and the VAE mid-block attention.
_VAE_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _with_parts(m: dict[str, str], diffusers: str, ldm: str, parts: dict[str, str]) -> None:
  for ours, theirs in parts.items():
    m[f"{diffusers}.{ours}"] = f"{ldm}.{theirs}"


def ldm_unet_module_map(config: UNetConfig) -> dict[str, str]:
  """diffusers module paths -> LDM module paths (`openaimodel.py` layout) for a UNet."""
  m = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
       "mid_block.attentions.0": "middle_block.1"}
  _with_parts(m, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET_PARTS)
  _with_parts(m, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET_PARTS)
  n_levels = len(config.block_out_channels)
  k = 1
  for i, kind in enumerate(config.down_block_types):
    for j in range(config.layers[i]):
      _with_parts(m, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", _UNET_RESNET_PARTS)
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
      _with_parts(m, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", _UNET_RESNET_PARTS)
      if attn:
        m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
      if j == n - 1 and i < n_levels - 1:
        m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if attn else 1}.conv"
      k += 1
  return m


def ldm_vae_module_map(config: VAEConfig) -> dict[str, str]:
  """diffusers module paths -> LDM module paths (`autoencoder.py` / `model.py` layout) for the VAE."""
  m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
  n_levels = len(config.block_out_channels)
  for side in ("encoder", "decoder"):
    m[f"{side}.conv_in"] = f"{side}.conv_in"
    m[f"{side}.conv_norm_out"] = f"{side}.norm_out"
    m[f"{side}.conv_out"] = f"{side}.conv_out"
    _with_parts(m, f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET_PARTS)
    _with_parts(m, f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET_PARTS)
    _with_parts(m, f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION_PARTS)
  for i in range(n_levels):
    for j in range(config.layers_per_block):
      _with_parts(m, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET_PARTS)
    if i < n_levels - 1:
      m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    # LDM numbers decoder levels from the lowest resolution up; diffusers from the first block run.
    level = n_levels - 1 - i
    for j in range(config.layers_per_block + 1):
      _with_parts(m, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET_PARTS)
    if i < n_levels - 1:
      m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
  return m


def _renamer(module_map: dict[str, str], prefix: str) -> Callable[[str], str]:
  """Replaces the longest matching module path of a diffusers key and adds `prefix`."""
  # Longest first, so `down_blocks.0.resnets.1` never matches inside `down_blocks.0.resnets.10`.
  pattern = re.compile(r"^(" + "|".join(re.escape(k) for k in sorted(module_map, key=len, reverse=True))
                       + r")\.(.*)$")

  def rename(key: str) -> str:
    match = pattern.match(key)
    if match is None:
      raise KeyError(f"no LDM name for {key!r}")
    module, rest = match.groups()
    return f"{prefix}{module_map[module]}.{rest}"

  return rename


@functools.lru_cache(maxsize=16)
def ldm_unet_key_table(config: UNetConfig, prefix: str = LDM_UNET_PREFIX) -> KeyTable:
  """The UNet table with LDM names under `prefix` (`model.diffusion_model.` for SD)."""
  config = config.replace(remat_policy="none", attention_backend="xla")
  return KeyTable.from_params(abstract_unet_params(config), keep=("linear_1", "linear_2"),
                              rename=_renamer(ldm_unet_module_map(config), prefix),
                              name=f"UNet ({prefix}*)")


@functools.lru_cache(maxsize=16)
def ldm_vae_key_table(config: VAEConfig, prefix: str = LDM_VAE_PREFIX) -> KeyTable:
  """The VAE table with LDM names under `prefix`; the mid-block q/k/v/proj_out are 1x1 convs there."""
  attention = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
  return KeyTable.from_params(abstract_vae_params(config), rename=_renamer(ldm_vae_module_map(config), prefix),
                              dense_as_conv=lambda key: attention.search(key) is not None,
                              name=f"AutoencoderKL ({prefix}*)")
