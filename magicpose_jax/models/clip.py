"""The CLIP text encoder of Stable Diffusion (transformers' `CLIPTextModel`) in Flax.

Param names follow transformers' module names with `_N` for list indices
(`encoder/layers_3/self_attn/q_proj/kernel`); the converter in
`magicpose_jax.convert.clip` maps them onto the `text_model.`-prefixed keys of
the public SD checkpoints.

Which layer Stable Diffusion reads (see `encode_text`):
  * SD 1.x (OpenAI ViT-L/14 text tower, 12 layers): the last layer, final-layer-normed
    (`last_hidden_state`).
  * SD 2.x (OpenCLIP ViT-H/14 text tower, 24 layers): the *penultimate* layer of the 24,
    final-layer-normed. diffusers' SD 2 folders store that truncated: their
    `text_encoder` is a 23-layer `CLIPTextModel` whose `last_hidden_state` already is
    what SD 2 uses (diffusers' converter drops `resblocks.23`). So with diffusers
    folders `layer="last"` is right for both, and `layer="penultimate"` means
    diffusers' `clip_skip=1` on top of that: layer 11 of 12 for SD 1.x, layer 22 of
    the original 24 for SD 2.x.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magicpose_jax.models.config_files import parse_config_entries, read_config_dict

_ACTIVATIONS = ("quick_gelu", "gelu")

# transformers' CLIPTextConfig defaults, applied to keys a config.json leaves out (ViT-B/32 sizes).
_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406,
    "eos_token_id": 49407,
}
# Keys accepted only at the value given (dropout is inactive at inference, but a
# config that trains with it is not one we reproduce).
_FIXED_KEYS: dict[str, Any] = {"attention_dropout": 0.0, "dropout": 0.0, "pruned_heads": {}}
# Metadata, init-time and generation settings of transformers' PretrainedConfig
# (4.x and 5.x spellings): they do not change CLIPTextModel's weights or outputs.
_METADATA_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "initializer_range",
    "initializer_factor", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "gradient_checkpointing",
})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of a `CLIPTextModel`; field names and meanings are transformers'.

  Defaults are SD 1.x's text encoder (OpenAI CLIP ViT-L/14). `projection_dim` does not
  affect `CLIPTextModel` (it sizes the projection of `CLIPTextModelWithProjection`); it is
  kept so configs round-trip. `eos_token_id == 2` selects transformers' legacy pooling
  (at the highest id), which every SD 1.x/2.x config uses.
  """

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768
  bos_token_id: int = 0
  eos_token_id: int = 2
  pad_token_id: int = 1

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"CLIPTextConfig.hidden_act: {self.hidden_act!r} is not supported (supported: {_ACTIVATIONS})")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPTextConfig: hidden_size {self.hidden_size} must divide by num_attention_heads "
                       f"{self.num_attention_heads}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        raise ValueError(f"CLIPTextConfig.{field}: expected a positive int, got {getattr(self, field)!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def legacy_pooling(self) -> bool:
    """transformers pools at `argmax(input_ids)` when `eos_token_id == 2` (configs before its PR #24773)."""
    return self.eos_token_id == 2

  def replace(self, **changes: Any) -> CLIPTextConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> CLIPTextConfig:
    """Reads transformers' `config.json` (a dict, the file, or the model folder holding it).

    Accepts a `CLIPTextModel` config (`model_type: clip_text_model`) or a full `CLIPModel`
    config (`model_type: clip`), whose `text_config` (or legacy `text_config_dict`) is read.
    Keys starting with `_` and transformers' metadata/generation keys are ignored; keys we
    implement at one value only are checked against it; any other key is an error, so a config
    we cannot reproduce never loads silently.
    """
    config, source = read_config_dict(config, "CLIP text")
    model_type = config.get("model_type", "clip_text_model")
    if model_type == "clip" or "text_config" in config or "text_config_dict" in config:
      nested = config.get("text_config") or config.get("text_config_dict")
      if not isinstance(nested, Mapping):
        raise ValueError(f"{source}: a CLIPModel config (model_type {model_type!r}) without a text_config")
      source, config = f"{source} [text_config]", nested
      model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise ValueError(f"{source}: model_type is {model_type!r}, expected 'clip_text_model' (or a 'clip' "
                       f"config with a text_config)")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = parse_config_entries(config, source, "CLIP text", fields, _FIXED_KEYS, ignored=_METADATA_KEYS,
                                  choices={"hidden_act": _ACTIVATIONS})
    return cls(**{**_TRANSFORMERS_DEFAULTS, **kwargs, **overrides})

  def to_transformers(self) -> dict[str, Any]:
    """transformers' `config.json` dict of a `CLIPTextModel` (loads with `from_pretrained`)."""
    d = dataclasses.asdict(self)
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **d,
            "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02}


# Named variants: diffusers' `text_encoder` configs of the public checkpoints, and a test size.
CLIP_VARIANTS: dict[str, CLIPTextConfig] = {
    # SD 1.x: OpenAI CLIP ViT-L/14 text tower.
    "sd15": CLIPTextConfig(),
    # SD 2.x: OpenCLIP ViT-H/14 text tower as diffusers stores it, 23 of its 24 layers
    # (SD 2 reads the penultimate layer, so the last one is dropped; see the module docstring).
    "sd21": CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                           hidden_act="gelu", projection_dim=512),
    "tiny": CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, projection_dim=32),
}


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
  return quick_gelu if name == "quick_gelu" else lambda x: nn.gelu(x, approximate=False)


def _layer_norm(eps: float, dtype: Any, param_dtype: Any, name: str) -> nn.LayerNorm:
  # Two-pass variance (as PyTorch): CLIP's residual stream has large outliers, where
  # E[x²] - E[x]² in float32 loses digits.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention with biased q/k/v/out projections: `[B, L, D] -> [B, L, D]`.

  `attend` in `attention.py` takes no mask, so the causal attention lives here; the
  softmax runs in float32.
  """

  heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    head_dim = d // self.heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q = dense("q_proj")(x).reshape(b, n, self.heads, head_dim)  # [B, L, H, Dh]
    k = dense("k_proj")(x).reshape(b, n, self.heads, head_dim)
    v = dense("v_proj")(x).reshape(b, n, self.heads, head_dim)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim ** -0.5  # [B, H, L, L]
    causal = jnp.tril(jnp.ones((n, n), bool))  # query i sees keys 0..i
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
    return dense("out_proj")(out)


class CLIPMLP(nn.Module):
  """`fc1` (D -> intermediate), activation, `fc2` (intermediate -> D)."""

  intermediate_size: int
  hidden_act: str
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
    h = _activation(self.hidden_act)(h)
    return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm transformer layer: `x + attn(ln1(x))`, then `+ mlp(ln2(x))`. `[B, L, D]`."""

  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    norm = lambda name: _layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name)
    x = x + CLIPAttention(cfg.num_attention_heads, self.dtype, self.param_dtype, name="self_attn")(
        norm("layer_norm1")(x))
    return x + CLIPMLP(cfg.intermediate_size, cfg.hidden_act, self.dtype, self.param_dtype, name="mlp")(
        norm("layer_norm2")(x))


class CLIPEncoder(nn.Module):
  """`num_hidden_layers` layers; returns every layer's output, `[B, L, D]` each."""

  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    outs = []
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")(x)
      outs.append(x)
    return outs


class CLIPTextEmbeddings(nn.Module):
  """Token plus learned absolute position embeddings: `[B, L]` ids -> `[B, L, D]`."""

  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    tokens = embed(cfg.vocab_size, "token_embedding")(input_ids)  # [B, L, D]
    positions = embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPTextModel(nn.Module):
  """transformers' `CLIPTextModel` (no projection), causal, no padding mask (as SD uses it).

  Attributes:
    config: the architecture.
    dtype: compute dtype; softmax and LayerNorm statistics run in float32 regardless.
    param_dtype: storage dtype of the params.
  """

  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> dict[str, Any]:
    """Encodes token ids.

    Args:
      input_ids: int `[B, L]`, `L <= max_position_embeddings` (77 for SD).

    Returns:
      dict with
        `last_hidden_state`: `[B, L, D]`, the last layer's output after `final_layer_norm`;
        `hidden_states`: tuple of `num_hidden_layers + 1` arrays `[B, L, D]`: the embeddings,
          then each layer's output (the last one before `final_layer_norm`), as transformers'
          `output_hidden_states=True`;
        `pooled_output`: `[B, D]`, `last_hidden_state` at the end-of-text position: the first
          `argmax(input_ids)` when `eos_token_id == 2` (legacy configs, all SD ones), else the
          first position holding `eos_token_id` (position 0 when there is none), as transformers.
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids: expected [B, L], got shape {input_ids.shape}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"input_ids: sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    h = CLIPTextEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(input_ids)
    layers = CLIPEncoder(cfg, self.dtype, self.param_dtype, name="encoder")(h)
    last = _layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "final_layer_norm")(layers[-1])
    ids = input_ids.astype(jnp.int32)
    at = jnp.argmax(ids if cfg.legacy_pooling else (ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)  # [B]
    pooled = jnp.take_along_axis(last, at[:, None, None], axis=1)[:, 0]  # [B, D]
    return {"last_hidden_state": last, "hidden_states": (h, *layers), "pooled_output": pooled}


def encode_text(model: CLIPTextModel, params: Mapping[str, Any], input_ids: jax.Array,
                layer: str | int = "last") -> jax.Array:
  """The text states Stable Diffusion's UNet cross-attends to: `[B, L]` ids -> `[B, L, D]`.

  Args:
    model: the text encoder module.
    params: its params (the `params` collection).
    input_ids: int `[B, L]` from the tokenizer.
    layer: "last": `last_hidden_state` (SD 1.x, and SD 2.x with diffusers' 23-layer folders);
      "penultimate": the second-to-last layer's output through `final_layer_norm` (diffusers'
      `clip_skip=1`); an int `k >= 0`: diffusers' `clip_skip=k` (0 is "last").

  Returns:
    `[B, L, hidden_size]` in the model's compute dtype.
  """
  if layer == "last":
    skip = 0
  elif layer == "penultimate":
    skip = 1
  elif isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < model.config.num_hidden_layers:
    skip = layer
  else:
    raise ValueError(f"layer: expected 'last', 'penultimate' or an int clip_skip in "
                     f"[0, {model.config.num_hidden_layers}), got {layer!r}")
  out = model.apply({"params": params}, input_ids)
  if skip == 0:
    return out["last_hidden_state"]
  # As diffusers: hidden_states[-(clip_skip + 1)], then the model's own final LayerNorm.
  norm = _layer_norm(model.config.layer_norm_eps, model.dtype, model.param_dtype, "final_layer_norm")
  return norm.apply({"params": params["final_layer_norm"]}, out["hidden_states"][-(skip + 1)])


def abstract_text_encoder_params(config: CLIPTextConfig) -> dict:
  """The text encoder's param tree as `ShapeDtypeStruct`s (no memory, no compute)."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(CLIPTextModel(config).init, jax.random.key(0), ids)["params"]
