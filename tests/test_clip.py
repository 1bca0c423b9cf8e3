"""Our Flax CLIP text encoder and its converter vs transformers' PyTorch `CLIPTextModel`.

Tolerance: max |ours - transformers| <= 1e-4 in float32 for `last_hidden_state`, every
entry of `hidden_states`, the penultimate-layer states SD's `clip_skip=1` uses, and the
pooled output (all of unit scale; the tests check they are not vanishingly small).
Converter round trips are bit-exact; `save_text_encoder` folders load in transformers
with no missing or unexpected keys.
"""

import functools
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from magicpose_jax.convert.clip import clip_key_table, load_text_encoder, normalize_state_dict, save_text_encoder
from magicpose_jax.convert.keytable import ConversionError
from magicpose_jax.models.clip import CLIP_VARIANTS, CLIPTextConfig, CLIPTextModel, encode_text
from magicpose_jax.torch_reference import perturb_norms, state_dict_numpy

ATOL = 1e-4
TINY = CLIP_VARIANTS["tiny"]  # vocab 1000, width 32, 4 layers, 4 heads, quick_gelu, legacy eos_token_id=2
CONFIGS = {
    # SD 1.x-like: quick GELU, pooling at argmax(ids) (eos_token_id == 2).
    "quick_gelu_legacy_eos": TINY,
    # SD 2.x-like activation, and the newer pooling rule (first position of eos_token_id).
    "gelu_first_eos": TINY.replace(hidden_act="gelu", bos_token_id=499, eos_token_id=500, pad_token_id=0),
}
SEQ = 77


def torch_clip(config: CLIPTextConfig, seed: int = 0) -> transformers.CLIPTextModel:
  """transformers' CLIPTextModel with the same architecture, randomly initialised with `seed`.

  Norm scales/biases and linear biases start at 1/0 in PyTorch; they are perturbed so a
  swapped or dropped tensor in the converter shows up in the outputs. The embeddings
  (std 0.02 by default) are drawn at unit scale, so that every layer's output is too and
  the absolute tolerance means something for `hidden_states`.
  """
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_transformers())).eval()
  perturb_norms(model, seed)
  gen = torch.Generator().manual_seed(seed + 2)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
      elif "embedding" in name:
        p.copy_(0.7 * torch.randn(p.shape, generator=gen))
  return model


@functools.cache
def jitted_apply(config: CLIPTextConfig):
  """One compiled forward per config (and input shape), shared by the tests."""
  return jax.jit(CLIPTextModel(config).apply)


def prefixed_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """The state dict as the public SD checkpoints spell it (`text_model.` prefix)."""
  return {"text_model." + k: v for k, v in state_dict_numpy(model).items()}


def _ids(config: CLIPTextConfig, seed: int = 0) -> np.ndarray:
  """Three prompts shaped like the tokenizer's output: bos, tokens, eos, padding; int32 [3, 77]."""
  rng = np.random.default_rng(seed)
  bos, eos = (config.vocab_size - 2, config.vocab_size - 1) if config.legacy_pooling else (
      config.bos_token_id, config.eos_token_id)
  rows = []
  for n, pad in ((9, eos), (40, 0), (SEQ - 2, eos)):
    body = rng.integers(3, config.vocab_size - 2, size=n)
    if not config.legacy_pooling:
      body[body == eos] = 3
      body[0] = config.vocab_size - 1  # above eos: the legacy argmax rule would pool here
    row = np.full(SEQ, pad)
    row[0], row[1:n + 1], row[n + 1] = bos, body, eos
    rows.append(row)
  return np.stack(rows).astype(np.int32)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
  config = CONFIGS[request.param]
  tmodel = torch_clip(config, seed=10)
  params = clip_key_table(config).to_flax(prefixed_state_dict(tmodel))
  return config, tmodel, params


def _torch_outputs(tmodel, ids):
  with torch.no_grad():
    out = tmodel(torch.from_numpy(ids).long(), output_hidden_states=True)
    penultimate = tmodel.final_layer_norm(out.hidden_states[-2])  # diffusers' clip_skip=1
  return out, penultimate.numpy()


def _check(ours, ref, what):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, what
  assert np.std(ref) > 0.1, f"{what}: reference is too small for the tolerance to mean anything"
  err = np.abs(ours - ref).max()
  assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"
  return err


def test_text_encoder_matches_transformers(pair):
  config, tmodel, params = pair
  ids = _ids(config)
  ref, _ = _torch_outputs(tmodel, ids)
  ours = jitted_apply(config)({"params": params}, ids)
  _check(ours["last_hidden_state"], ref.last_hidden_state.numpy(), "last_hidden_state")
  _check(ours["pooled_output"], ref.pooler_output.numpy(), "pooled_output")
  assert len(ours["hidden_states"]) == len(ref.hidden_states) == config.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(ours["hidden_states"], ref.hidden_states, strict=True)):
    _check(a, b.numpy(), f"hidden_states[{i}]")


def test_pooling_rule_follows_eos_token_id(pair):
  config, _, params = pair
  ids = _ids(config)
  out = jitted_apply(config)({"params": params}, ids)
  eos_at = np.argmax(ids, -1) if config.legacy_pooling else np.argmax(ids == config.eos_token_id, -1)
  assert len(set(eos_at.tolist())) == 3 and (eos_at > 0).all()
  np.testing.assert_array_equal(np.asarray(out["pooled_output"]),
                                np.asarray(out["last_hidden_state"])[np.arange(3), eos_at])
  if not config.legacy_pooling:
    assert (np.argmax(ids, -1) != eos_at).all()  # the test distinguishes the two rules


def test_encode_text_layers(pair):
  config, tmodel, params = pair
  model = CLIPTextModel(config)
  ids = _ids(config)
  layers = ("last", 0, "penultimate", 1, 2)
  # One compilation for all five layer choices (`layer` is static).
  last, zero, penultimate, one, two = jax.jit(
      lambda p, x: [encode_text(model, p, x, layer) for layer in layers])(params, ids)
  out = jitted_apply(config)({"params": params}, ids)
  np.testing.assert_allclose(last, out["last_hidden_state"], atol=1e-6)
  np.testing.assert_array_equal(zero, last)
  np.testing.assert_array_equal(one, penultimate)
  ref, ref_penultimate = _torch_outputs(tmodel, ids)
  _check(penultimate, ref_penultimate, "penultimate")
  # The two layers really differ (else "penultimate" could silently return the last one).
  assert np.abs(ref_penultimate - ref.last_hidden_state.numpy()).max() > 0.1
  with torch.no_grad():
    ref_two = tmodel.final_layer_norm(ref.hidden_states[-3]).numpy()
  _check(two, ref_two, "clip_skip=2")
  for bad in ("first", config.num_hidden_layers, -1, True):
    with pytest.raises(ValueError, match="layer"):
      encode_text(model, params, ids, bad)


def test_shorter_sequences_and_errors(pair):
  config, tmodel, params = pair
  ids = _ids(config)[:, :20]
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  model = CLIPTextModel(config)
  _check(jitted_apply(config)({"params": params}, ids)["last_hidden_state"], ref, "L=20")
  with pytest.raises(ValueError, match="exceeds max_position_embeddings 77"):
    model.apply({"params": params}, np.zeros((1, 78), np.int32))
  with pytest.raises(ValueError, match=r"expected \[B, L\]"):
    model.apply({"params": params}, np.zeros((78,), np.int32))


# --- key table ---------------------------------------------------------------------------------


def _assert_bit_exact(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k, x in a.items():
    assert x.dtype == b[k].dtype and x.shape == b[k].shape, k
    assert x.tobytes() == b[k].tobytes(), f"{k} differs"


@pytest.fixture(scope="module")
def reference():
  model = torch_clip(TINY, seed=20)
  return model, prefixed_state_dict(model)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_round_trip_is_bit_exact(reference, dtype):
  _, sd = reference
  sd = {k: v.astype(dtype) for k, v in sd.items()}
  table = clip_key_table(TINY)
  params = table.to_flax(sd)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(dtype)}
  _assert_bit_exact(table.to_torch(params), sd)


def test_table_names(reference):
  model, sd = reference
  table = clip_key_table(TINY)
  assert set(table.by_torch) == set(sd)
  assert len(sd) == len(model.state_dict()) == 4 + 16 * TINY.num_hidden_layers
  e = table.by_torch["text_model.encoder.layers.0.self_attn.q_proj.weight"]
  assert e.flax_path == ("encoder", "layers_0", "self_attn", "q_proj", "kernel") and e.layout == "dense"
  e = table.by_torch["text_model.embeddings.token_embedding.weight"]
  assert e.flax_path == ("embeddings", "token_embedding", "embedding") and e.layout == "same"
  assert table.by_torch["text_model.final_layer_norm.weight"].flax_path == ("final_layer_norm", "scale")


def test_errors_name_every_bad_key(reference):
  _, sd = reference
  bad = dict(sd)
  del bad["text_model.encoder.layers.1.mlp.fc2.bias"]
  bad["text_model.embeddings.token_type_ids"] = np.zeros(3, np.float32)
  bad["text_model.final_layer_norm.weight"] = np.zeros(7, np.float32)
  with pytest.raises(ConversionError) as err:
    clip_key_table(TINY).to_flax(normalize_state_dict(bad), source="model.safetensors")
  msg = str(err.value)
  assert "model.safetensors" in msg
  assert "missing (1):\n    text_model.encoder.layers.1.mlp.fc2.bias" in msg
  assert "unexpected (1):\n    text_model.embeddings.token_type_ids" in msg
  assert "text_model.final_layer_norm.weight: got (7,), expected (32,)" in msg


def test_only_position_ids_buffer_is_ignored(reference):
  _, sd = reference
  with_buffer = {**sd, "text_model.embeddings.position_ids": np.arange(77)[None]}
  _assert_bit_exact(clip_key_table(TINY).to_torch(clip_key_table(TINY).to_flax(normalize_state_dict(with_buffer))),
                    sd)
  unprefixed = {k.removeprefix("text_model."): v for k, v in with_buffer.items()}
  assert normalize_state_dict(unprefixed).keys() == sd.keys()


def test_to_torch_is_strict(reference):
  _, sd = reference
  params = clip_key_table(TINY).to_flax(sd)
  del params["encoder"]["layers_3"]["self_attn"]["v_proj"]["bias"]
  with pytest.raises(ConversionError, match="missing \\(1\\):\n    encoder/layers_3/self_attn/v_proj/bias"):
    clip_key_table(TINY).to_torch(params)


# --- folders -----------------------------------------------------------------------------------


def _forward_both(tmodel, config, params):
  ids = _ids(config, seed=3)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  return np.asarray(jitted_apply(config)({"params": params}, ids)["last_hidden_state"]), ref


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_save_text_encoder_loads_in_transformers(reference, tmp_path, max_shard_bytes):
  _, sd = reference
  params = clip_key_table(TINY).to_flax(sd)
  files = save_text_encoder(TINY, params, tmp_path, max_shard_bytes=max_shard_bytes)
  if max_shard_bytes:
    assert "model.safetensors.index.json" in files and len(files) > 3
  else:
    assert set(safetensors.numpy.load_file(tmp_path / "model.safetensors")) == set(sd)  # SD's key spelling
  tmodel, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info  # no missing/unexpected/mismatched keys, no errors
  _assert_bit_exact(prefixed_state_dict(tmodel), sd)
  ours, ref = _forward_both(tmodel.eval(), TINY, params)
  _check(ours, ref, "reloaded")
  config, loaded = load_text_encoder(tmp_path)
  assert config == TINY
  _assert_bit_exact(clip_key_table(TINY).to_torch(loaded), sd)


def test_load_transformers_save_pretrained_folder(reference, tmp_path):
  tmodel, sd = reference
  tmodel.save_pretrained(tmp_path)  # transformers 5 writes the keys without `text_model.`
  assert not any(k.startswith("text_model.") for k in safetensors.numpy.load_file(tmp_path / "model.safetensors"))
  config, params = load_text_encoder(tmp_path)
  assert config == TINY
  _assert_bit_exact(clip_key_table(TINY).to_torch(params), sd)


def test_load_legacy_bin_with_position_ids(reference, tmp_path):
  tmodel, sd = reference
  (tmp_path / "config.json").write_text(json.dumps(TINY.to_transformers()))
  state = {k: torch.from_numpy(v) for k, v in sd.items()}
  state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
  torch.save(state, tmp_path / "pytorch_model.bin")
  _, params = load_text_encoder(tmp_path)
  _assert_bit_exact(clip_key_table(TINY).to_torch(params), sd)
  ours, ref = _forward_both(tmodel, TINY, params)
  _check(ours, ref, "from .bin")


def test_load_fp16_variant(reference, tmp_path):
  _, sd = reference
  save_text_encoder(TINY, clip_key_table(TINY).to_flax(sd), tmp_path, dtype=np.float16)
  (tmp_path / "model.safetensors").rename(tmp_path / "model.fp16.safetensors")
  _, params = load_text_encoder(tmp_path, variant="fp16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  _, kept = load_text_encoder(tmp_path, variant="fp16", param_dtype=None)
  assert {x.dtype for x in jax.tree.leaves(kept)} == {np.dtype(np.float16)}
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
    load_text_encoder(tmp_path)


def test_load_text_tower_of_full_clip_model(tmp_path):
  text = TINY.to_transformers()
  vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 16}
  torch.manual_seed(0)
  full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                        projection_dim=32)).eval()
  full.save_pretrained(tmp_path)
  assert "text_config" in json.loads((tmp_path / "config.json").read_text())
  config, params = load_text_encoder(tmp_path)
  assert config == TINY
  ids = _ids(TINY)
  with torch.no_grad():
    ref = full.text_model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  _check(jitted_apply(config)({"params": params}, ids)["last_hidden_state"], ref, "CLIPModel text tower")


# --- config ------------------------------------------------------------------------------------

# diffusers' text_encoder/config.json of SD 1.5 and SD 2.1, as published.
SD15_JSON = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD21_JSON = {**SD15_JSON, "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
             "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
             "num_hidden_layers": 23, "projection_dim": 512, "transformers_version": "4.25.0.dev0"}


def test_published_configs_are_the_variants():
  assert CLIPTextConfig.from_transformers(SD15_JSON) == CLIP_VARIANTS["sd15"]
  assert CLIPTextConfig.from_transformers(SD21_JSON) == CLIP_VARIANTS["sd21"]
  nested = {"model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
            "text_config": {**SD15_JSON, "add_cross_attention": False, "bad_words_ids": None, "pruned_heads": {}},
            "vision_config": {"hidden_size": 1024}}
  assert CLIPTextConfig.from_transformers(nested) == CLIP_VARIANTS["sd15"]


@pytest.mark.parametrize("name", list(CLIP_VARIANTS))
def test_config_round_trips_through_transformers(name, tmp_path):
  config = CLIP_VARIANTS[name]
  assert CLIPTextConfig.from_transformers(config.to_transformers()) == config
  transformers.CLIPTextConfig(**config.to_transformers()).save_pretrained(tmp_path)
  assert CLIPTextConfig.from_transformers(tmp_path) == config  # transformers' own config.json


def test_config_errors_name_every_entry(tmp_path):
  bad = {**SD15_JSON, "hidden_act": "relu", "dropout": 0.1, "use_cache": True}
  (tmp_path / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError) as err:
    CLIPTextConfig.from_transformers(tmp_path)
  msg = str(err.value)
  assert str(tmp_path / "config.json") in msg
  assert "hidden_act='relu'" in msg and "dropout=0.1 (only 0.0 is supported)" in msg
  assert "use_cache (unknown key)" in msg
  with pytest.raises(ValueError, match="model_type is 'bert'"):
    CLIPTextConfig.from_transformers({**SD15_JSON, "model_type": "bert"})
  with pytest.raises(ValueError, match="must divide by num_attention_heads"):
    CLIPTextConfig.from_transformers({**SD15_JSON, "num_attention_heads": 7})
  with pytest.raises(FileNotFoundError, match="CLIP text config not found"):
    CLIPTextConfig.from_transformers(tmp_path / "nowhere")
