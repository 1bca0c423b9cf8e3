"""Original LDM / Stable Diffusion single-file key names <-> our Flax params.

The CompVis/Stability code base (`openaimodel.py`, `autoencoder.py`) names the SD
UNet `model.diffusion_model.{time_embed, input_blocks, middle_block, output_blocks,
out}`; MagicPose's release reuses that layout under other prefixes
(`appearance_control_model.`, `pose_control_model.`, ...). Each table here is the
diffusers-style table of `convert.keytable` with a rename function applied, so the
LDM tables are as strict and bijective as the diffusers ones.

SD 2.x files hold an OpenCLIP text tower under `cond_stage_model.model.`
(`ldm_open_clip_key_table`). It differs from transformers' CLIP in one way that is
not a rename: each layer's q, k and v projections are one tensor, `attn.in_proj_weight`
`[3D, D]` / `attn.in_proj_bias` `[3D]` (q, k, v stacked along dim 0, as
`torch.nn.MultiheadAttention` stores them). `FusedKeyTable` keeps the table one-to-one
by giving each part a synthetic key (`...in_proj_weight#q`) and splits/fuses the real
tensor around the strict `KeyTable`, in both directions. The file also holds tensors
our 23-layer `CLIPTextModel` has no params for (`open_clip_extra_shapes`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from magicpose_jax.convert.keytable import Entry, KeyTable, not_float, raise_mismatch
from magicpose_jax.models.clip import CLIPTextConfig, abstract_text_encoder_params
from magicpose_jax.models.unet import UNetConfig, abstract_unet_params
from magicpose_jax.models.vae import VAEConfig, abstract_vae_params

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_OPEN_CLIP_PREFIX = "cond_stage_model.model."

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


# ---------------------------------------------------------------------------------------------------------------
# SD 2.x: the OpenCLIP text tower (`open_clip.TextTransformer`, as `FrozenOpenCLIPEmbedder` saves it).

FUSED_SEP = "#"  # synthetic part keys are `<real key>#<part>`; no state-dict key contains "#"
QKV = ("q", "k", "v")

# transformers names (without `text_model.`) -> OpenCLIP names, outside the layers and inside one layer.
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",  # a bare nn.Parameter
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
    **{f"self_attn.{p}_proj.{leaf}": f"attn.in_proj_{leaf}{FUSED_SEP}{p}" for p in QKV for leaf in ("weight", "bias")},
    "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


class FusedKeyTable:
  """A key table for a PyTorch layout that stores some tensors as one, concatenated along dim 0.

  The inner `table` is one-to-one with one synthetic key per part (`<real key>#<part>`,
  e.g. `...attn.in_proj_weight#q`, PyTorch shape `[D, D]`). `split` (real -> synthetic)
  and `fuse` (synthetic -> real) are the only places that know about the fusion:
  `to_flax` is `table.to_flax(split(sd))` and `to_torch` is `fuse(table.to_torch(params))`,
  so the two directions stay inverse (slices and one concatenation: bit-exact).

  Attributes:
    table: the one-to-one table (synthetic keys).
    fused: real key -> its part entries in storage order (q, k, v).
    torch_shapes: every real PyTorch key of the file layout -> its shape, in table order.
  """

  def __init__(self, table: KeyTable, parts: tuple[str, ...] = QKV):
    self.table = table
    self.name = table.name
    groups: dict[str, dict[str, Entry]] = {}
    for e in table.entries:
      real, sep, part = e.torch_key.partition(FUSED_SEP)
      if sep:
        groups.setdefault(real, {})[part] = e
    self.fused: dict[str, tuple[Entry, ...]] = {}
    for real, by_part in groups.items():
      if sorted(by_part) != sorted(parts):
        raise ValueError(f"{self.name}: fused key {real} has parts {sorted(by_part)}, expected {list(parts)}")
      entries = tuple(by_part[p] for p in parts)
      if len({e.torch_shape[1:] for e in entries}) != 1:
        raise ValueError(f"{self.name}: the parts of {real} differ beyond dim 0 "
                         f"({[e.torch_shape for e in entries]})")
      self.fused[real] = entries
    self.torch_shapes: dict[str, tuple[int, ...]] = {}
    for e in table.entries:
      real = e.torch_key.partition(FUSED_SEP)[0]
      if real in self.fused:
        group = self.fused[real]
        self.torch_shapes.setdefault(real, (sum(p.torch_shape[0] for p in group), *group[0].torch_shape[1:]))
      else:
        self.torch_shapes[e.torch_key] = e.torch_shape

  def split(self, state_dict: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """Real keys -> synthetic part keys (other keys unchanged; parts are views of the fused tensor).

    Raises:
      ConversionError: naming every fused tensor whose shape is not the parts' stacked shape.
    """
    bad = [f"{k}: got {tuple(np.shape(v))}, expected {self.torch_shapes[k]} ({', '.join(QKV)} stacked along dim 0)"
           for k, v in state_dict.items() if k in self.fused and tuple(np.shape(v)) != self.torch_shapes[k]]
    where = f" in {source}" if source else ""
    raise_mismatch(f"{self.name}: fused tensors{where} cannot be split", [], [], bad)
    out = {}
    for k, v in state_dict.items():
      if k not in self.fused:
        out[k] = v
        continue
      start = 0
      for e in self.fused[k]:
        out[e.torch_key] = v[start:start + e.torch_shape[0]]
        start += e.torch_shape[0]
    return out

  def fuse(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Synthetic part keys -> real keys, the inverse of `split` (raises naming a fused key with missing parts)."""
    out: dict[str, np.ndarray] = {}
    missing = [e.torch_key for entries in self.fused.values() for e in entries
               if e.torch_key not in tensors and any(p.torch_key in tensors for p in entries)]
    raise_mismatch(f"{self.name}: cannot fuse", missing, [], [])
    for k, v in tensors.items():
      real, sep, _ = k.partition(FUSED_SEP)
      if not sep:
        out[k] = v
      elif real not in out:
        out[real] = np.concatenate([np.asarray(tensors[e.torch_key]) for e in self.fused[real]], axis=0)
    return out

  def to_flax(self, state_dict: Mapping[str, Any], dtype: Any = None, source: str = "") -> dict:
    """File-layout arrays (real keys) -> nested Flax params; strict like `KeyTable.to_flax`, naming real keys."""
    where = f" in {source}" if source else ""
    missing = [k for k in self.torch_shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in self.torch_shapes]
    bad_shape = [f"{k}: got {tuple(np.shape(v))}, expected {self.torch_shapes[k]}" for k, v in state_dict.items()
                 if k in self.torch_shapes and tuple(np.shape(v)) != self.torch_shapes[k]]
    bad_dtype = [f"{k}: got {np.dtype(v.dtype)}, expected a float dtype" for k, v in state_dict.items()
                 if k in self.torch_shapes and not_float(v)]
    raise_mismatch(f"{self.name}: state dict{where} does not match the model", missing, unexpected, bad_shape,
                   bad_dtype)
    return self.table.to_flax(self.split(state_dict, source), dtype=dtype, source=source)

  def to_torch(self, params: Mapping[str, Any], dtype: Any = None) -> dict[str, np.ndarray]:
    """Nested Flax params -> file-layout numpy arrays (real keys), strict."""
    return self.fuse(self.table.to_torch(params, dtype=dtype))


def _open_clip_renamer(prefix: str) -> Callable[[str], str]:
  def rename(key: str) -> str:
    if key in _OPEN_CLIP_TOP:
      return prefix + _OPEN_CLIP_TOP[key]
    match = _LAYER_KEY.match(key)
    if match is None or match.group(2) not in _OPEN_CLIP_LAYER:
      raise KeyError(f"no OpenCLIP name for {key!r}")
    return f"{prefix}transformer.resblocks.{match.group(1)}.{_OPEN_CLIP_LAYER[match.group(2)]}"

  return rename


def uses_open_clip(config: CLIPTextConfig) -> bool:
  """Whether a text encoder is stored in the OpenCLIP layout (SD 2.x) in LDM files.

  Decided by the activation: OpenAI's CLIP (SD 1.x, `cond_stage_model.transformer.`) uses
  quick GELU, OpenCLIP's ViT-H (SD 2.x, `cond_stage_model.model.`) exact GELU. The width
  (768 / 1024) is not used, so small test configs follow the same rule.
  """
  return config.hidden_act == "gelu"


@functools.lru_cache(maxsize=16)
def ldm_open_clip_key_table(config: CLIPTextConfig, prefix: str = LDM_OPEN_CLIP_PREFIX) -> FusedKeyTable:
  """SD 2.x's OpenCLIP text tower names under `prefix` <-> our `CLIPTextModel(config)` params.

  `token_embedding.weight` <-> `embeddings/token_embedding/embedding`, `positional_embedding`
  <-> `embeddings/position_embedding/embedding`, `transformer.resblocks.{i}.{ln_1, ln_2,
  attn.in_proj_*, attn.out_proj, mlp.c_fc, mlp.c_proj}` <-> `encoder/layers_{i}/{layer_norm1,
  layer_norm2, self_attn/{q,k,v}_proj, self_attn/out_proj, mlp/fc1, mlp/fc2}`, `ln_final` <->
  `final_layer_norm`. Only layers `0 .. num_hidden_layers - 1`; see `open_clip_extra_shapes`.
  """
  table = KeyTable.from_params(abstract_text_encoder_params(config), rename=_open_clip_renamer(prefix),
                               name=f"OpenCLIP text encoder ({prefix}*)")
  return FusedKeyTable(table, QKV)


def open_clip_extra_shapes(config: CLIPTextConfig,
                           prefix: str = LDM_OPEN_CLIP_PREFIX) -> dict[str, tuple[int | None, ...]]:
  """The tensors of an SD 2.x file's text tower that `CLIPTextModel(config)` has no params for.

  SD 2.x conditions on the *penultimate* layer of OpenCLIP's 24, so diffusers' (and our)
  text encoder is a `num_hidden_layers = 23` model and its `last_hidden_state` is what SD
  uses. The file still holds (diffusers' converter silently drops them):
    * layer `num_hidden_layers` (`transformer.resblocks.23.*`, 12 tensors),
    * `text_projection` `[D, P]` (CLIP's text embedding projection; P is not in our config),
    * `logit_scale` `[]` (CLIP's contrastive temperature).
  SD never reads them, but a converter that drops them loses data: a file we read and write
  back would no longer be the original. So `load_stable_diffusion` returns whichever of them
  the file holds as `params["extras"]` (PyTorch names and layout, exactly as stored), and
  `save_ldm_checkpoint` writes `params["extras"]` back: an SD 2.x file read and written again
  is the same set of tensors, bit for bit (schedule buffers aside). Both check the extras
  against these names and shapes (`check_open_clip_extras`). Formats without a place for
  them (diffusers folders) warn when they drop them.

  Returns:
    name -> PyTorch shape, `None` for a size our config does not fix.
  """
  n = config.num_hidden_layers
  layer = f"{prefix}transformer.resblocks.{n}."
  # The same table one layer longer (cached), so the extra layer's names and shapes are the table's.
  longer = ldm_open_clip_key_table(config.replace(num_hidden_layers=n + 1), prefix)
  shapes: dict[str, tuple[int | None, ...]] = {k: s for k, s in longer.torch_shapes.items() if k.startswith(layer)}
  shapes[prefix + "text_projection"] = (config.hidden_size, None)
  shapes[prefix + "logit_scale"] = ()
  return shapes


def check_open_clip_extras(extras: Mapping[str, Any], config: CLIPTextConfig, source: str = "",
                           prefix: str = LDM_OPEN_CLIP_PREFIX) -> None:
  """Checks `extras` against `open_clip_extra_shapes(config)`: known names, right shapes, and the
  extra layer whole or absent (each of `text_projection` / `logit_scale` may be absent).

  Raises:
    ConversionError: naming every unexpected, mis-shaped or missing tensor.
  """
  expected = open_clip_extra_shapes(config, prefix)
  layer = [k for k in expected if ".resblocks." in k]
  unexpected = [k for k in extras if k not in expected]
  bad_shape = [f"{k}: got {tuple(np.shape(v))}, expected {_shape_text(expected[k])}" for k, v in extras.items()
               if k in expected and not _fits(tuple(np.shape(v)), expected[k])]
  missing = [k for k in layer if k not in extras] if any(k in extras for k in layer) else []
  where = f" in {source}" if source else ""
  raise_mismatch(f"OpenCLIP extra tensors{where} (the unused last layer, text_projection, logit_scale) do not "
                 f"match the {config.num_hidden_layers}-layer text encoder", missing, unexpected, bad_shape)


def _fits(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
  return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected, strict=True))


def _shape_text(shape: tuple[int | None, ...]) -> str:
  return "(" + ", ".join("any" if s is None else str(s) for s in shape) + (",)" if len(shape) == 1 else ")")
