"""The Stable Diffusion UNet (diffusers' `UNet2DConditionModel`) in Flax, NHWC.

Param names follow diffusers' module names with `_N` for list indices
(`down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel`), so the
converter in `magicpose_jax.convert.diffusers` is a fixed key table.

MagicPose hook: `reference_states` is a sequence with one `[B, R, C]` array per
transformer block (execution order: down, mid, up; 16 for SD 1.5). Block `i`
then runs self-attention with keys/values over `[norm1(x_i); reference_states[i]]`.
With `return_reference_states=True` the UNet also returns its own per-block
`norm1(x_i)`, which is what the appearance net hands to the main UNet.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magicpose_jax.models import platforms
from magicpose_jax.models.attention import check_runtime_fields
from magicpose_jax.models.config_files import check_class_name, parse_config_entries, read_config_dict
from magicpose_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from magicpose_jax.models.normalization import GroupNorm
from magicpose_jax.models.resnet import conv
from magicpose_jax.models.unet_blocks import DownBlock2D, MidBlock2DCrossAttn, UpBlock2D

IntOrTuple = int | tuple[int, ...]

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn",)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Saves the projections' outputs (dots with no batch dims) in host memory instead of recomputing them; the
    # rest (convolutions, attention) is recomputed. Every JAX backend has a "pinned_host" memory (CPU included).
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}

# diffusers config keys we accept only at the value that SD 1.x/2.x use (their
# defaults); any other value is a model we do not implement.
_FIXED_DIFFUSERS_KEYS: dict[str, Any] = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "dual_cross_attention": False,
    "num_attention_heads": None,
    "act_fn": "silu",
    "dropout": 0.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": 64,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}

# diffusers' defaults that differ from ours, applied to keys a config.json leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {"cross_attention_dim": 1280, "sample_size": None}


def _per_level(value: IntOrTuple, n: int, field: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * n
  if len(value) != n:
    raise ValueError(f"UNetConfig.{field}: expected an int or {n} values (one per level), got {value!r}")
  return tuple(value)


# Ours, not diffusers': how the model runs, not what it is (never written to config.json).
RUNTIME_FIELDS = ("attention_backend", "remat_policy", "target_platform")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of a `UNet2DConditionModel`; field names and meanings are diffusers'.

  `attention_head_dim` keeps diffusers' historical meaning: it is the number of
  heads per level (SD 1.5: 8; SD 2.x: (5, 10, 20, 20)); the head width is
  `channels // heads`. `attention_backend`, `remat_policy` and `target_platform` are ours
  (runtime choices, `RUNTIME_FIELDS`, not written to diffusers' config.json).
  """

  sample_size: int | None = 64  # informational (diffusers' default latent size)
  in_channels: int = 4
  out_channels: int = 4
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: IntOrTuple = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  transformer_layers_per_block: IntOrTuple = 1
  attention_head_dim: IntOrTuple = 8
  use_linear_projection: bool = False
  upcast_attention: bool = False  # our attention always takes the softmax in float32
  attention_backend: str = "auto"
  remat_policy: str = "none"
  # The platform the attention and convolution kernels are picked for ("cpu", "gpu", "tpu"; "": the mesh's or the
  # default devices'): see models/platforms.py. The train step and the sampler set it from their devices.
  target_platform: str = ""

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"UNetConfig: {n} block_out_channels but {len(self.down_block_types)} down and "
                       f"{len(self.up_block_types)} up block types")
    for field, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
      for t in getattr(self, field):
        if t not in allowed:
          raise ValueError(f"UNetConfig.{field}: {t!r} is not supported (supported: {allowed})")
    if self.mid_block_type not in _MID_TYPES:
      raise ValueError(f"UNetConfig.mid_block_type: {self.mid_block_type!r} is not supported "
                       f"(supported: {_MID_TYPES})")
    if not isinstance(self.cross_attention_dim, int):
      raise ValueError(f"UNetConfig.cross_attention_dim: per-level values are not supported, got "
                       f"{self.cross_attention_dim!r}")
    for field in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
      _per_level(getattr(self, field), n, field)
    for c, h in zip(self.block_out_channels, self.heads, strict=True):
      if c % h or c % self.norm_num_groups:
        raise ValueError(f"UNetConfig: channels {c} must divide by heads {h} and norm_num_groups "
                         f"{self.norm_num_groups}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"UNetConfig.remat_policy: {self.remat_policy!r} not in {tuple(REMAT_POLICIES)}")
    check_runtime_fields(self, "UNetConfig")

  @property
  def heads(self) -> tuple[int, ...]:
    return _per_level(self.attention_head_dim, len(self.block_out_channels), "attention_head_dim")

  @property
  def layers(self) -> tuple[int, ...]:
    return _per_level(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

  @property
  def transformer_layers(self) -> tuple[int, ...]:
    return _per_level(self.transformer_layers_per_block, len(self.block_out_channels),
                      "transformer_layers_per_block")

  @property
  def num_reference_states(self) -> int:
    """Transformer blocks in execution order (down, mid, up): 16 for SD 1.5."""
    levels = zip(self.down_block_types, self.layers, self.transformer_layers, strict=True)
    down = sum(n * t for kind, n, t in levels if kind.startswith("CrossAttn"))
    levels = zip(self.up_block_types, self.layers[::-1], self.transformer_layers[::-1], strict=True)
    up = sum((n + 1) * t for kind, n, t in levels if kind.startswith("CrossAttn"))
    return down + self.transformer_layers[-1] + up

  @property
  def num_down_residuals(self) -> int:
    """Skip tensors the down path produces (= `down_block_additional_residuals` length): 12 for SD."""
    return 1 + sum(self.layers) + len(self.block_out_channels) - 1

  def replace(self, **changes: Any) -> UNetConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> UNetConfig:
    """Reads diffusers' UNet `config.json` (a dict, the file, or the model folder holding it).

    Keys starting with `_` (`_class_name`, `_diffusers_version`, ...) are metadata;
    keys we implement only at their SD value are checked against it; any other
    key is an error, so a config we cannot reproduce never loads silently.
    """
    config, source = read_config_dict(config, "UNet")
    check_class_name(config, source, "UNet2DConditionModel")
    fields = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS)
    kwargs = parse_config_entries(config, source, "UNet", fields, _FIXED_DIFFUSERS_KEYS)
    return cls(**{**_DIFFUSERS_DEFAULTS, **kwargs, **overrides})

  def to_diffusers(self) -> dict[str, Any]:
    """diffusers' `config.json` dict for this architecture (loads with `from_pretrained`)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if f.name not in RUNTIME_FIELDS}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return {"_class_name": "UNet2DConditionModel", **d}


# Named size variants (diffusers configs of the public checkpoints, and test sizes).
VARIANTS: dict[str, UNetConfig] = {
    "sd15": UNetConfig(),
    "sd21": UNetConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                       use_linear_projection=True, upcast_attention=True),
    "tiny": UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                       cross_attention_dim=32, attention_head_dim=2),
}


def remat_block(cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """Wraps a block class in `nn.remat` (argnum 0 is `self`); `none` leaves it as is."""
  if policy == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


class UNet2DConditionModel(nn.Module):
  """SD UNet. See the module docstring for the MagicPose hooks.

  Attributes:
    config: the architecture.
    dtype: compute dtype (bf16 for training on accelerators); `conv_out` runs in float32.
    param_dtype: storage dtype of the params.
  """

  config: UNetConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @platforms.traced_for_config_platform
  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
               down_block_additional_residuals: Sequence[jax.Array] | None = None,
               mid_block_additional_residual: jax.Array | None = None,
               reference_states: Sequence[jax.Array] | None = None,
               return_reference_states: bool = False,
               reference_mask: jax.Array | None = None,
               compute_output: bool = True) -> jax.Array | tuple[jax.Array | None, list[jax.Array]]:
    """Predicts noise (or v) for `sample`.

    Args:
      sample: `[B, H, W, in_channels]` noisy latents.
      timesteps: `[B]`, `[]` or a Python number.
      encoder_hidden_states: `[B, L, cross_attention_dim]` text states.
      down_block_additional_residuals: `num_down_residuals` arrays added to the skips
        (ControlNet / MagicPose pose residuals), shapes as the skips.
      mid_block_additional_residual: `[B, H/2^k, W/2^k, C_last]` added to the mid output.
      reference_states: `num_reference_states` arrays `[B, R_i, C_i]` or None (plain SD).
      return_reference_states: also return this UNet's own per-block `norm1` states.
      reference_mask: `[B]` bool; rows where it is False ignore their reference states (exactly, up to
        float rounding), so guided sampling batches conditional and unconditional rows in one call.
        Needs each reference state shaped like the block's own tokens (same latent size).
      compute_output: False skips `conv_norm_out`/`conv_out` (returns None in their place): an
        appearance net only hands over its states (its params still hold the output head).

    Returns:
      `[B, H, W, out_channels]`, and the list of normed states if asked.
    """
    cfg = self.config
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"sample: expected [B, H, W, {cfg.in_channels}] (NHWC), got {sample.shape}")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
      raise ValueError(f"encoder_hidden_states: expected [B, L, {cfg.cross_attention_dim}], "
                       f"got {encoder_hidden_states.shape}")
    if reference_states is not None and len(reference_states) != cfg.num_reference_states:
      raise ValueError(f"reference_states: expected {cfg.num_reference_states} arrays (one per "
                       f"transformer block), got {len(reference_states)}")
    if (down_block_additional_residuals is not None
        and len(down_block_additional_residuals) != cfg.num_down_residuals):
      raise ValueError(f"down_block_additional_residuals: expected {cfg.num_down_residuals} arrays, "
                       f"got {len(down_block_additional_residuals)}")
    kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, use_linear_projection=cfg.use_linear_projection,
              backend=cfg.attention_backend, dtype=self.dtype, param_dtype=self.param_dtype)
    down_cls = remat_block(DownBlock2D, cfg.remat_policy)
    mid_cls = remat_block(MidBlock2DCrossAttn, cfg.remat_policy)
    up_cls = remat_block(UpBlock2D, cfg.remat_policy, static_argnums=(7,))  # upsample_size is a shape
    n_levels = len(cfg.block_out_channels)
    context = encoder_hidden_states.astype(self.dtype)

    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (sample.shape[0],))  # [B]
    temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = TimestepEmbedding(4 * cfg.block_out_channels[0], self.dtype, self.param_dtype,
                             name="time_embedding")(temb.astype(self.dtype))  # [B, 4*C0]

    refs = list(reference_states) if reference_states is not None else None
    ref_at = 0

    def take_refs(count: int) -> list[jax.Array] | None:
      nonlocal ref_at
      ref_at += count
      return None if refs is None else refs[ref_at - count:ref_at]

    states: list[jax.Array] = []
    h = conv(cfg.block_out_channels[0], 3, "conv_in", self.dtype, self.param_dtype)(sample.astype(self.dtype))
    skips = [h]
    for i, kind in enumerate(cfg.down_block_types):
      heads = cfg.heads[i] if kind.startswith("CrossAttn") else 0
      block = down_cls(cfg.block_out_channels[i], cfg.layers[i], heads, cfg.transformer_layers[i],
                       add_downsample=i < n_levels - 1, downsample_padding=cfg.downsample_padding,
                       name=f"down_blocks_{i}", **kw)
      h, block_skips, s = block(h, temb, context, take_refs(cfg.layers[i] * cfg.transformer_layers[i]
                                                            if heads else 0), reference_mask)
      skips += block_skips
      states += s

    if down_block_additional_residuals is not None:
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals, strict=True)]

    mid = mid_cls(cfg.block_out_channels[-1], 1, cfg.heads[-1], cfg.transformer_layers[-1],
                  output_scale_factor=cfg.mid_block_scale_factor, name="mid_block", **kw)
    h, s = mid(h, temb, context, take_refs(cfg.transformer_layers[-1]), reference_mask)
    states += s
    if mid_block_additional_residual is not None:
      h = h + mid_block_additional_residual.astype(h.dtype)

    rev_channels = cfg.block_out_channels[::-1]
    for i, kind in enumerate(cfg.up_block_types):
      level = n_levels - 1 - i
      n = cfg.layers[level] + 1
      block_skips, skips = skips[-n:], skips[:-n]
      heads = cfg.heads[level] if kind.startswith("CrossAttn") else 0
      is_last = i == n_levels - 1
      # Upsample to the size of the skips the next block consumes (odd input sizes).
      size = None if is_last else tuple(skips[-1].shape[1:3])
      block = up_cls(rev_channels[i], n, heads, cfg.transformer_layers[level], add_upsample=not is_last,
                     name=f"up_blocks_{i}", **kw)
      h, s = block(h, tuple(block_skips), temb, context,
                   take_refs(n * cfg.transformer_layers[level] if heads else 0), reference_mask, size)
      states += s

    if not compute_output:
      if not return_reference_states:
        raise ValueError("compute_output=False only makes sense with return_reference_states=True")
      return None, states
    # The output head runs in float32 (bf16 here costs visible sample quality).
    h = GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype,
                  name="conv_norm_out")(h.astype(jnp.float32))
    out = conv(cfg.out_channels, 3, "conv_out", jnp.float32, self.param_dtype)(nn.silu(h))
    return (out, states) if return_reference_states else out


def abstract_unet_params(config: UNetConfig) -> dict:
  """The UNet's param tree as `ShapeDtypeStruct`s (no memory, no compute)."""
  model = UNet2DConditionModel(config)
  size = 2 ** (len(config.block_out_channels) - 1)
  sample = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), sample, t, context)["params"]
