"""The MagicPose Pose Controller: a ControlNet (diffusers' `ControlNetModel`) in Flax, NHWC.

A copy of the SD UNet's `conv_in`, time embedding, down blocks and mid block; a hint
encoder (`controlnet_cond_embedding`) turns the full-resolution pose image into a
`[B, h, w, C0]` map added after `conv_in`; one zero-initialised 1×1 conv per down
skip (`controlnet_down_blocks_j`, 12 for SD) and one on the mid output
(`controlnet_mid_block`). Its outputs are the UNet's `down_block_additional_residuals`
/ `mid_block_additional_residual`.

Param names follow diffusers' module names with `_N` for list indices, so
`magicpose_jax.convert.controlnet` is a fixed key table (diffusers and LDM layouts).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.models import platforms
from magicpose_jax.models.config_files import check_class_name, parse_config_entries, read_config_dict
from magicpose_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from magicpose_jax.models.random_init import random_params
from magicpose_jax.models.resnet import conv
from magicpose_jax.models.unet import IntOrTuple, UNetConfig, remat_block
from magicpose_jax.models.unet_blocks import DownBlock2D, MidBlock2DCrossAttn

CHANNEL_ORDERS = ("rgb", "bgr")

# diffusers `ControlNetModel` keys we accept only at their SD value (their defaults).
_FIXED_DIFFUSERS_KEYS: dict[str, Any] = {
    "only_cross_attention": False,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "projection_class_embeddings_input_dim": None,
    "global_pool_conditions": False,
    "addition_embed_type_num_heads": 64,
}

# diffusers' defaults that differ from ours, applied to keys a config.json leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {"cross_attention_dim": 1280}

# Fields shared with `UNetConfig` (same names, same meanings).
_UNET_FIELDS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
                "block_out_channels", "downsample_padding", "mid_block_scale_factor", "norm_num_groups", "norm_eps",
                "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "use_linear_projection",
                "upcast_attention", "attention_backend", "remat_policy", "target_platform")
_RUNTIME_FIELDS = ("attention_backend", "remat_policy", "target_platform")
_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
  """Architecture of a diffusers `ControlNetModel`; field names and meanings are diffusers'.

  The UNet fields mean what they mean in `UNetConfig` (and are validated by it, through
  `unet_config()`); `layers_per_block` is one int, as diffusers' ControlNetModel takes it.
  `conditioning_embedding_out_channels` are the hint encoder's widths: it downsamples
  `len - 1` times (3 for SD: the pose image is 8× the latent). `attention_backend`,
  `remat_policy` and `target_platform` are runtime choices, not written to config.json.
  """

  in_channels: int = 4
  conditioning_channels: int = 3
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  transformer_layers_per_block: IntOrTuple = 1
  attention_head_dim: IntOrTuple = 8
  use_linear_projection: bool = False
  upcast_attention: bool = False
  controlnet_conditioning_channel_order: str = "rgb"
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  attention_backend: str = "auto"
  remat_policy: str = "none"
  target_platform: str = ""  # as UNetConfig's

  def __post_init__(self):
    if not isinstance(self.layers_per_block, int):
      raise ValueError(f"ControlNetConfig.layers_per_block: diffusers' ControlNetModel takes one int, got "
                       f"{self.layers_per_block!r}")
    if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
      raise ValueError(f"ControlNetConfig.controlnet_conditioning_channel_order: "
                       f"{self.controlnet_conditioning_channel_order!r} not in {CHANNEL_ORDERS}")
    widths = self.conditioning_embedding_out_channels
    if not widths or not all(isinstance(c, int) and c > 0 for c in widths):
      raise ValueError(f"ControlNetConfig.conditioning_embedding_out_channels: expected positive ints, got "
                       f"{widths!r}")
    self.unet_config()  # validates the shared fields (block types, heads, groups, backend, remat)

  def unet_config(self) -> UNetConfig:
    """The UNet whose `conv_in`, time embedding, down and mid blocks this ControlNet copies.

    Its up path mirrors the down path (as every SD UNet's does); a ControlNet has none.
    """
    up = tuple(_UP_OF_DOWN.get(t, t) for t in self.down_block_types[::-1])
    return UNetConfig(**{f: getattr(self, f) for f in _UNET_FIELDS}, out_channels=self.in_channels,
                      sample_size=None, layers_per_block=self.layers_per_block, up_block_types=up)

  @property
  def num_down_residuals(self) -> int:
    """Down residuals (zero convs before the mid one): 12 for SD."""
    return self.unet_config().num_down_residuals

  @property
  def downsample_factor(self) -> int:
    """Pose-image size / latent size (8 for SD)."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  def replace(self, **changes: Any) -> ControlNetConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_unet(cls, unet: UNetConfig, **controlnet_fields: Any) -> ControlNetConfig:
    """The ControlNet of an SD-style UNet (diffusers' `ControlNetModel.from_unet`).

    `controlnet_fields`: the ControlNet-only fields (`conditioning_channels`,
    `controlnet_conditioning_channel_order`, `conditioning_embedding_out_channels`).
    """
    layers = set(unet.layers)
    if len(layers) != 1:
      raise ValueError(f"ControlNetConfig.from_unet: per-level layers_per_block {unet.layers_per_block!r} cannot be "
                       f"a diffusers ControlNetModel (it takes one int)")
    return cls(**{f: getattr(unet, f) for f in _UNET_FIELDS}, layers_per_block=layers.pop(), **controlnet_fields)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> ControlNetConfig:
    """Reads diffusers' ControlNet `config.json` (a dict, the file, or the model folder holding it).

    Strict like `UNetConfig.from_diffusers`: `_`-keys are metadata, keys we implement
    only at their SD value are checked against it, any other key is an error.
    """
    config, source = read_config_dict(config, "ControlNet")
    check_class_name(config, source, "ControlNetModel")
    fields = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
    kwargs = parse_config_entries(config, source, "ControlNet", fields, _FIXED_DIFFUSERS_KEYS,
                                  choices={"controlnet_conditioning_channel_order": CHANNEL_ORDERS})
    return cls(**{**_DIFFUSERS_DEFAULTS, **kwargs, **overrides})

  def to_diffusers(self) -> dict[str, Any]:
    """diffusers' `config.json` dict for this architecture (loads with `ControlNetModel.from_pretrained`)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _RUNTIME_FIELDS}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return {"_class_name": "ControlNetModel", **d, "global_pool_conditions": False}


def _zero_conv(features: int, kernel: int, name: str, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nn.Conv:
  """A conv whose kernel and bias start at zero (diffusers' `zero_module`), PyTorch padding."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=param_dtype, name=name)


class ControlNetConditioningEmbedding(nn.Module):
  """The hint encoder: `conv_in`, `blocks_0..2k-1` (pairs: 3×3, then 3×3 stride 2), `conv_out` (zero-init).

  SiLU after every conv but the last. `[B, H, W, C_cond] -> [B, H/2^k, W/2^k, out_channels]`
  (k = len(block_out_channels) - 1; sizes round up like PyTorch's padded stride-2 conv).
  """

  out_channels: int
  block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    widths = self.block_out_channels
    x = nn.silu(conv(widths[0], 3, "conv_in", self.dtype, self.param_dtype)(x))
    for i in range(len(widths) - 1):
      x = nn.silu(conv(widths[i], 3, f"blocks_{2 * i}", self.dtype, self.param_dtype)(x))
      x = nn.silu(conv(widths[i + 1], 3, f"blocks_{2 * i + 1}", self.dtype, self.param_dtype, stride=2)(x))
    return _zero_conv(self.out_channels, 3, "conv_out", self.dtype, self.param_dtype)(x)


class ControlNetModel(nn.Module):
  """ControlNet / MagicPose Pose Controller. See the module docstring.

  Attributes:
    config: the architecture.
    dtype: compute dtype (bf16 for training on accelerators).
    param_dtype: storage dtype of the params.
  """

  config: ControlNetConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @platforms.traced_for_config_platform
  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
               controlnet_cond: jax.Array,
               conditioning_scale: jax.Array | float = 1.0) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Residuals for the UNet's skips and mid output.

    Args:
      sample: `[B, h, w, in_channels]` noisy latents (the UNet's input).
      timesteps: `[B]`, `[]` or a Python number.
      encoder_hidden_states: `[B, L, cross_attention_dim]` text states.
      controlnet_cond: `[B, f*h, f*w, conditioning_channels]` condition image (pose render in [0, 1]),
        f = `config.downsample_factor` (8 for SD); channel order `config.controlnet_conditioning_channel_order`.
      conditioning_scale: multiplies every residual (diffusers' `conditioning_scale`).

    Returns:
      `(down_residuals, mid_residual)`: `num_down_residuals` arrays shaped as the UNet's skips
      (`[B, h_i, w_i, C_i]`), and `[B, h/2^(L-1), w/2^(L-1), C_last]`.
    """
    cfg = self.config
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"sample: expected [B, H, W, {cfg.in_channels}] (NHWC), got {sample.shape}")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
      raise ValueError(f"encoder_hidden_states: expected [B, L, {cfg.cross_attention_dim}], "
                       f"got {encoder_hidden_states.shape}")
    f = cfg.downsample_factor
    expected = (sample.shape[0], f * sample.shape[1], f * sample.shape[2], cfg.conditioning_channels)
    if tuple(controlnet_cond.shape) != expected:
      raise ValueError(f"controlnet_cond: expected {list(expected)} ({f}x the latent, NHWC), "
                       f"got {list(controlnet_cond.shape)}")
    unet = cfg.unet_config()
    kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, use_linear_projection=cfg.use_linear_projection,
              backend=cfg.attention_backend, dtype=self.dtype, param_dtype=self.param_dtype)
    down_cls = remat_block(DownBlock2D, cfg.remat_policy)
    mid_cls = remat_block(MidBlock2DCrossAttn, cfg.remat_policy)
    hint_cls = remat_block(ControlNetConditioningEmbedding, cfg.remat_policy)  # full-resolution activations
    n_levels = len(cfg.block_out_channels)
    context = encoder_hidden_states.astype(self.dtype)

    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (sample.shape[0],))  # [B]
    temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = TimestepEmbedding(4 * cfg.block_out_channels[0], self.dtype, self.param_dtype,
                             name="time_embedding")(temb.astype(self.dtype))  # [B, 4*C0]

    if cfg.controlnet_conditioning_channel_order == "bgr":
      controlnet_cond = controlnet_cond[..., ::-1]
    h = conv(cfg.block_out_channels[0], 3, "conv_in", self.dtype, self.param_dtype)(sample.astype(self.dtype))
    hint = hint_cls(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels, self.dtype,
                    self.param_dtype, name="controlnet_cond_embedding")(controlnet_cond.astype(self.dtype))
    h = h + hint
    skips = [h]
    for i, kind in enumerate(cfg.down_block_types):
      heads = unet.heads[i] if kind.startswith("CrossAttn") else 0
      block = down_cls(cfg.block_out_channels[i], cfg.layers_per_block, heads, unet.transformer_layers[i],
                       add_downsample=i < n_levels - 1, downsample_padding=cfg.downsample_padding,
                       name=f"down_blocks_{i}", **kw)
      h, block_skips, _ = block(h, temb, context)
      skips += block_skips
    h, _ = mid_cls(cfg.block_out_channels[-1], 1, unet.heads[-1], unet.transformer_layers[-1],
                   output_scale_factor=cfg.mid_block_scale_factor, name="mid_block", **kw)(h, temb, context)

    scale = jnp.asarray(conditioning_scale, self.dtype)
    down = tuple(scale * _zero_conv(s.shape[-1], 1, f"controlnet_down_blocks_{j}", self.dtype, self.param_dtype)(s)
                 for j, s in enumerate(skips))
    mid = scale * _zero_conv(h.shape[-1], 1, "controlnet_mid_block", self.dtype, self.param_dtype)(h)
    return down, mid


# Sub-trees a ControlNet shares with the UNet it is made from.
SHARED_WITH_UNET = ("conv_in", "time_embedding", "mid_block")


def abstract_controlnet_params(config: ControlNetConfig) -> dict:
  """The ControlNet's param tree as `ShapeDtypeStruct`s (no memory, no compute)."""
  size = 2 ** (len(config.block_out_channels) - 1)
  f = config.downsample_factor
  sample = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  cond = jax.ShapeDtypeStruct((1, f * size, f * size, config.conditioning_channels), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  return jax.eval_shape(ControlNetModel(config).init, jax.random.key(0), sample, t, context, cond)["params"]


def _shared_names(config: ControlNetConfig) -> tuple[str, ...]:
  return SHARED_WITH_UNET + tuple(f"down_blocks_{i}" for i in range(len(config.block_out_channels)))


def controlnet_params_from_unet(unet_params: Mapping[str, Any], config: ControlNetConfig, key: jax.Array,
                                param_dtype: Any = None) -> dict:
  """A fresh ControlNet initialised from a UNet (MagicPose's `pose_init="appearance"` / `"sd"`), as host numpy.

  Copies (bit-equal, new host buffers) `conv_in`, `time_embedding`, `down_blocks_*` and `mid_block`
  from `unet_params` (the appearance net's or SD's UNet); the hint encoder is random with a
  zero `conv_out`, every zero conv is zero, so the ControlNet's residuals start at exactly 0.

  Args:
    unet_params: the UNet's `params` tree (`UNet2DConditionModel(config.unet_config())`).
    config: the ControlNet; its shared fields must match the UNet's.
    key: PRNG key for the hint encoder (concrete: it seeds a host draw, so not under `jit`).
    param_dtype: dtype of the new leaves (default: that of `unet_params["conv_in"]["kernel"]`).

  Raises:
    ValueError: naming every UNet sub-tree leaf that is missing or mis-shaped.
  """
  abstract = abstract_controlnet_params(config)
  if param_dtype is None:
    param_dtype = unet_params["conv_in"]["kernel"].dtype
  errors = []
  for name in _shared_names(config):
    want = jax.tree_util.tree_flatten_with_path(abstract[name])[0]
    got = dict(jax.tree_util.tree_flatten_with_path(unet_params.get(name, {}))[0])
    for path, leaf in want:
      where = f"{name}{jax.tree_util.keystr(path)}"
      if path not in got:
        errors.append(f"{where} missing")
      elif tuple(got[path].shape) != tuple(leaf.shape):
        errors.append(f"{where}: got {tuple(got[path].shape)}, expected {tuple(leaf.shape)}")
  if errors:
    raise ValueError("controlnet_params_from_unet: the UNet params do not match the ControlNet config:\n  "
                     + "\n  ".join(errors))
  # Host copies (np.array): a jax array's `.copy()` compiles a copy program per leaf shape.
  params: dict = {name: jax.tree.map(np.array, unet_params[name]) for name in _shared_names(config)}
  # The hint encoder is drawn on the host (models/random_init.py's rules, seeded by `key`): `hint.init` would
  # trace, compile and run it (1-4 s on a CPU) for a few small kernels. Its `conv_out` is a zero conv.
  try:
    seed = [int(v) for v in np.asarray(jax.random.key_data(key)).ravel()]
  except jax.errors.TracerArrayConversionError as e:
    raise TypeError("controlnet_params_from_unet draws the hint encoder on the host: call it outside jit "
                    "(with a concrete key)") from e
  hint = random_params(abstract["controlnet_cond_embedding"], seed)
  hint["conv_out"] = jax.tree.map(np.zeros_like, hint["conv_out"])
  params["controlnet_cond_embedding"] = jax.tree.map(lambda x: np.asarray(x, param_dtype), hint)
  for name, tree in abstract.items():
    if name not in params:  # the zero convs
      params[name] = jax.tree.map(lambda s: np.zeros(s.shape, param_dtype), tree)
  if set(params) != set(abstract):
    raise AssertionError(f"ControlNet sub-trees {sorted(params)} != {sorted(abstract)}")
  return params


def is_zero_initialised(params: Mapping[str, Any]) -> bool:
  """Whether every zero conv and the hint encoder's `conv_out` are still exactly zero."""
  trees = [v for k, v in params.items() if k.startswith("controlnet_") and k != "controlnet_cond_embedding"]
  trees.append(params["controlnet_cond_embedding"]["conv_out"])
  return all(not np.any(np.asarray(x)) for x in jax.tree.leaves(trees))
