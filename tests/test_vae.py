"""Our Flax AutoencoderKL vs diffusers' PyTorch AutoencoderKL, and the diffusers <-> Flax VAE converter.

Tolerance: max |ours - diffusers| <= 1e-4 in float32 for the posterior mean and
log-variance, the decoded image and the tiled decode (outputs are of unit scale or
smaller; the tests also check they are not vanishingly small). Random-init tiny VAE
(block_out_channels (8, 16), 1 layer per block, 4 groups) with perturbed norms.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

from magicpose_jax.convert.keytable import ConversionError
from magicpose_jax.convert.vae import load_vae, save_vae, upgrade_legacy_vae_keys, vae_key_table
from magicpose_jax.models.vae import (
  VAE_VARIANTS,
  AutoencoderKL,
  DiagonalGaussian,
  VAEConfig,
  decode_tiled,
  scale_latents,
  unscale_latents,
)
from magicpose_jax.torch_reference import nchw, nhwc, perturb_norms, state_dict_numpy

ATOL = 1e-4
CONFIG = VAE_VARIANTS["tiny"]

# runwayml/stable-diffusion-v1-5 `vae/config.json`, as published.
SD15_CONFIG_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def torch_vae(config: VAEConfig, seed: int = 0) -> TorchVAE:
  """diffusers' AutoencoderKL with the same architecture, random init with `seed`, norms perturbed."""
  torch.manual_seed(seed)
  model = TorchVAE(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}).eval()
  perturb_norms(model, seed)
  return model


def images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
  """`[B, H, W, 3]` in [-1, 1]."""
  return np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)


def check(ours, ref, atol: float = ATOL) -> float:
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  assert np.std(ref) > 0.05, "reference output is too small for the tolerance to mean anything"
  err = float(np.abs(ours - ref).max())
  assert err <= atol, f"max abs error {err:.3g} > {atol}"
  return err


@pytest.fixture(scope="module")
def reference():
  model = torch_vae(CONFIG, seed=40)
  sd = state_dict_numpy(model)
  return model, sd, vae_key_table(CONFIG).to_flax(sd)


@pytest.fixture(scope="module")
def fns():
  vae = AutoencoderKL(CONFIG)
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))
  return vae, encode, decode


# --- parity -------------------------------------------------------------------------------------------------


def test_encode_matches_diffusers(reference, fns):
  tmodel, _, params = reference
  x = images()
  with torch.no_grad():
    dist = tmodel.encode(nchw(x)).latent_dist
  posterior = fns[1](params, x)
  assert isinstance(posterior, DiagonalGaussian)
  assert posterior.mean.shape == (2, 16, 16, 4)  # 2 levels: f = 2
  check(posterior.mean, nhwc(dist.mean))
  check(posterior.logvar, nhwc(dist.logvar))
  check(posterior.std, nhwc(dist.std))


def test_decode_matches_diffusers(reference, fns):
  tmodel, _, params = reference
  z = np.random.default_rng(1).standard_normal((2, 16, 16, 4), dtype=np.float32)
  with torch.no_grad():
    ref = nhwc(tmodel.decode(nchw(z)).sample)
  ours = fns[2](params, z)
  assert ours.dtype == jnp.float32 and ours.shape == (2, 32, 32, 3)
  check(ours, ref)


def test_reconstruction_matches_diffusers_non_square(reference):
  """`__call__` with no key = diffusers' `forward(sample_posterior=False)`; H != W catches swapped axes."""
  tmodel, _, params = reference
  x = images(batch=1, height=24, width=40, seed=2)
  with torch.no_grad():
    ref = nhwc(tmodel(nchw(x)).sample)
  ours = jax.jit(AutoencoderKL(CONFIG).apply)({"params": params}, x)
  check(ours, ref)


def test_logvar_is_clipped_like_diffusers():
  moments = jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 2), -100.0), jnp.full((1, 2, 2, 2), 100.0)],
                            axis=-1)
  posterior = DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(posterior.logvar[..., :2], -30.0)
  np.testing.assert_array_equal(posterior.logvar[..., 2:], 20.0)


def test_sample_draws_from_the_posterior(reference, fns):
  _, _, params = reference
  posterior = fns[1](params, images())
  key = jax.random.key(3)
  z = posterior.sample(key)
  eps = (z - posterior.mean) / posterior.std
  np.testing.assert_allclose(eps, jax.random.normal(key, z.shape), atol=1e-4)
  assert np.abs(np.asarray(z - posterior.mode())).max() > 1e-3  # the noise is really added
  np.testing.assert_array_equal(posterior.sample(key), z)
  # kl() is diffusers' formula.
  with torch.no_grad():
    ref = reference[0].encode(nchw(images())).latent_dist.kl().numpy()
  np.testing.assert_allclose(posterior.kl(), ref, rtol=1e-4)


def test_call_with_key_samples(reference, fns):
  """`__call__(x, key)` decodes `posterior.sample(key)`; without a key, the mode (tested above)."""
  _, _, params = reference
  x, key = images(), jax.random.key(0)
  ours = jax.jit(AutoencoderKL(CONFIG).apply)({"params": params}, x, key=key)
  posterior = fns[1](params, x)
  np.testing.assert_allclose(ours, fns[2](params, posterior.sample(key)), atol=1e-5)  # XLA fusion differs
  assert np.abs(np.asarray(ours - fns[2](params, posterior.mode()))).max() > 1e-4


def test_scaling_helpers():
  z = jnp.linspace(-3, 3, 16).reshape(1, 2, 2, 4)
  np.testing.assert_allclose(scale_latents(z, VAE_VARIANTS["sd15"]), z * 0.18215, rtol=1e-6)
  np.testing.assert_allclose(unscale_latents(scale_latents(z, CONFIG), CONFIG), z, rtol=1e-6)


def test_bf16_compute_is_close(reference, fns):
  _, _, params = reference
  z = np.random.default_rng(5).standard_normal((2, 16, 16, 4), dtype=np.float32)
  f32 = fns[2](params, z)
  bf16 = jax.jit(AutoencoderKL(CONFIG, dtype=jnp.bfloat16).apply, static_argnames="method")(
      {"params": params}, z, method=AutoencoderKL.decode)
  assert bf16.dtype == jnp.float32  # the pixel head runs in float32
  err = float(np.abs(np.asarray(bf16 - f32)).max())
  assert 0 < err < 0.1, err


# --- tiled decode -------------------------------------------------------------------------------------------


def test_tiled_decode_with_one_tile_is_decode(reference, fns):
  _, _, params = reference
  z = np.random.default_rng(6).standard_normal((2, 16, 16, 4), dtype=np.float32)
  np.testing.assert_array_equal(decode_tiled(fns[0], params, z, tile=16, overlap=4), fns[2](params, z))
  np.testing.assert_array_equal(decode_tiled(fns[0], params, z, tile=64, overlap=16), fns[2](params, z))


def test_tiled_decode_matches_diffusers_and_approximates_decode(reference, fns):
  """Tiles of 12 latents, overlap 3 = diffusers' tiled_decode with 12-latent tiles and overlap factor 0.25."""
  tmodel, _, params = reference
  rng = np.random.default_rng(7)
  z, other = rng.standard_normal((2, 2, 16, 16, 4), dtype=np.float32)
  tmodel.tile_latent_min_size, tmodel.tile_sample_min_size, tmodel.tile_overlap_factor = 12, 24, 0.25
  with torch.no_grad():
    ref = nhwc(tmodel.tiled_decode(nchw(z)).sample)
  tiled = np.asarray(decode_tiled(fns[0], params, z, tile=12, overlap=3))  # 2×2 tiles, blended over 6 pixels
  check(tiled, ref)
  # Approximate, as in diffusers: each tile sees only its own latents (the mid-block attention is global,
  # and dominant in a random tiny model). Sanity bounds: not exact, but far closer to the untiled decode
  # than the decode of other latents is.
  full = np.asarray(fns[2](params, z))
  diff = np.abs(tiled - full)
  assert diff.max() > 1e-3, "4 tiles of a 16×16 latent cannot decode exactly like the whole"
  assert diff.mean() < 0.5 * np.abs(full - np.asarray(fns[2](params, other))).mean()
  assert np.corrcoef(tiled.ravel(), full.ravel())[0, 1] > 0.85


def test_tiled_decode_rejects_bad_overlap(reference, fns):
  with pytest.raises(ValueError, match="overlap < tile"):
    decode_tiled(fns[0], reference[2], np.zeros((1, 32, 32, 4), np.float32), tile=8, overlap=8)


# --- key table and files ------------------------------------------------------------------------------------


def _assert_bit_exact(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k, x in a.items():
    assert x.dtype == b[k].dtype and x.shape == b[k].shape, k
    assert x.tobytes() == b[k].tobytes(), f"{k} differs"


def test_table_covers_every_diffusers_tensor(reference):
  _, sd, _ = reference
  table = vae_key_table(CONFIG)
  assert set(table.by_torch) == set(sd)
  assert table.by_flax[("decoder", "mid_block", "attentions_0", "to_out_0", "kernel")].torch_key == \
      "decoder.mid_block.attentions.0.to_out.0.weight"


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_round_trip_is_bit_exact(reference, dtype):
  _, sd, _ = reference
  sd = {k: v.astype(dtype) for k, v in sd.items()}
  table = vae_key_table(CONFIG)
  params = table.to_flax(sd)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(dtype)}
  _assert_bit_exact(table.to_torch(params), sd)


def test_errors_name_every_bad_key(reference):
  _, sd, _ = reference
  bad = dict(sd)
  del bad["encoder.mid_block.attentions.0.to_q.weight"]
  bad["decoder.extra.weight"] = np.zeros(3, np.float32)
  bad["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  with pytest.raises(ConversionError) as err:
    vae_key_table(CONFIG).to_flax(bad, source="vae.safetensors")
  msg = str(err.value)
  assert "AutoencoderKL" in msg and "vae.safetensors" in msg
  assert "missing (1):\n    encoder.mid_block.attentions.0.to_q.weight" in msg
  assert "unexpected (1):\n    decoder.extra.weight" in msg
  assert "quant_conv.weight: got (8, 8, 3, 3), expected (8, 8, 1, 1)" in msg


def test_to_torch_is_strict(reference):
  _, _, params = reference
  params = jax.tree.map(lambda x: x, params)  # a copy: the fixture's tree stays intact
  del params["post_quant_conv"]["bias"]
  with pytest.raises(ConversionError, match="missing \\(1\\):\n    post_quant_conv/bias"):
    vae_key_table(CONFIG).to_torch(params)


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_save_vae_loads_in_diffusers(reference, tmp_path, max_shard_bytes):
  _, sd, params = reference
  files = save_vae(CONFIG, params, tmp_path, max_shard_bytes=max_shard_bytes)
  if max_shard_bytes:
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3
  tmodel, info = TorchVAE.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info  # no missing/unexpected/mismatched keys, no errors
  assert tmodel.config.scaling_factor == CONFIG.scaling_factor
  _assert_bit_exact(state_dict_numpy(tmodel), sd)
  config, loaded = load_vae(tmp_path)
  assert config == CONFIG
  _assert_bit_exact(vae_key_table(CONFIG).to_torch(loaded), sd)


def test_save_vae_casts(reference, tmp_path):
  _, sd, params = reference
  save_vae(CONFIG, params, tmp_path, dtype=np.float16)
  _, kept = load_vae(tmp_path, param_dtype=None)
  assert {x.dtype for x in jax.tree.leaves(kept)} == {np.dtype(np.float16)}
  _, up = load_vae(tmp_path)
  _assert_bit_exact(vae_key_table(CONFIG).to_torch(up), {k: v.astype(np.float16).astype(np.float32)
                                                          for k, v in sd.items()})


def test_load_diffusers_save_pretrained_folder(reference, fns, tmp_path):
  tmodel, _, _ = reference
  tmodel.save_pretrained(tmp_path)
  config, params = load_vae(tmp_path)
  assert config == CONFIG
  z = np.random.default_rng(8).standard_normal((1, 16, 16, 4), dtype=np.float32)
  with torch.no_grad():
    ref = nhwc(tmodel.decode(nchw(z)).sample)
  check(fns[2](params, z), ref)


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_load_legacy_attention_names(reference, tmp_path, conv_shaped):
  """Old diffusers VAE files (SD 1.x's) name the mid-block attention query/key/value/proj_attn."""
  _, sd, _ = reference
  new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in sd.items():
    k, v = key, value
    for new, old in new_to_old.items():
      if f".attentions.0.{new}." in key:
        k = key.replace(f".{new}.", f".{old}.")
        v = value[:, :, None, None] if conv_shaped and value.ndim == 2 else value
    legacy[k] = v
  assert "encoder.mid_block.attentions.0.proj_attn.bias" in legacy
  assert upgrade_legacy_vae_keys(legacy).keys() == sd.keys()
  (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_diffusers()))
  torch.save({k: torch.from_numpy(v) for k, v in legacy.items()}, tmp_path / "diffusion_pytorch_model.bin")
  _, params = load_vae(tmp_path)
  _assert_bit_exact(vae_key_table(CONFIG).to_torch(params), sd)


def test_missing_weights_are_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_diffusers()))
  with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
    load_vae(tmp_path)


# --- config -------------------------------------------------------------------------------------------------


def test_config_round_trips_and_covers_diffusers_keys():
  for config in VAE_VARIANTS.values():
    d = config.to_diffusers()
    assert VAEConfig.from_diffusers(d) == config
    assert VAEConfig.from_diffusers(json.loads(json.dumps(d))) == config
  ref = TorchVAE(**{k: v for k, v in CONFIG.to_diffusers().items() if not k.startswith("_")}).config
  assert {k for k in CONFIG.to_diffusers() if not k.startswith("_")} == {k for k in ref if not k.startswith("_")}


def test_sd15_published_config_is_the_sd15_variant(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(SD15_CONFIG_JSON))
  assert VAEConfig.from_diffusers(tmp_path) == VAE_VARIANTS["sd15"]
  assert VAE_VARIANTS["sd15"].downsample_factor == 8


def test_missing_keys_take_diffusers_defaults():
  ref = TorchVAE().config  # diffusers' own defaults
  ours = VAEConfig.from_diffusers({"_class_name": "AutoencoderKL"})
  as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  for key, value in ours.to_diffusers().items():
    if not key.startswith("_"):
      assert as_list(ref[key]) == as_list(value), key
  assert ours.block_out_channels == (64,) and ours.layers_per_block == 1  # not our SD 1.5 defaults


@pytest.mark.parametrize(("entry", "message"), [
    ({"shift_factor": 0.1159}, "shift_factor=0.1159 (only None is supported)"),
    ({"latents_mean": [0.0] * 4}, "given together or not at all"),
    ({"latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}, "3 values for 4 latent channels"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0, 1.0, 0.0, 1.0]}, "expected positive values"),
    ({"use_quant_conv": False}, "use_quant_conv=False"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention=False"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"norm_type": "spatial"}, "norm_type (unknown key)"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "'AttnDownEncoderBlock2D' is not"),
    ({"_class_name": "AutoencoderTiny"}, "expected 'AutoencoderKL'"),
    ({"norm_num_groups": 3}, "must divide by norm_num_groups 3"),
])
def test_config_rejects_unsupported(entry, message):
  d = {**CONFIG.to_diffusers(), **entry}
  with pytest.raises(ValueError) as err:
    VAEConfig.from_diffusers(d)
  assert message in str(err.value)


def test_config_reports_every_bad_entry(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({**CONFIG.to_diffusers(), "shift_factor": 0.1, "foo": 1}))
  with pytest.raises(ValueError) as err:
    VAEConfig.from_diffusers(tmp_path / "config.json")
  assert "config.json" in str(err.value) and "shift_factor=0.1" in str(err.value) and "foo (unknown key)" in str(
      err.value)


def test_per_channel_latent_statistics_round_trip_and_match_diffusers_convention(tmp_path):
  """`latents_mean`/`latents_std` load from and save to diffusers' config keys (which `AutoencoderKL` itself
  keeps), and scale as diffusers' SDXL pipeline does: `(z - mean) * scaling_factor / std` (written out here in
  numpy, independently of `scale_latents`)."""
  mean, std = (0.1, -0.2, 0.3, 0.0), (0.5, 2.0, 1.0, 0.25)
  config = CONFIG.replace(scaling_factor=0.5, latents_mean=mean, latents_std=std)
  (tmp_path / "config.json").write_text(json.dumps(config.to_diffusers()))
  assert VAEConfig.from_diffusers(tmp_path) == config
  torch_config = TorchVAE.from_config(config.to_diffusers()).config
  assert list(torch_config.latents_mean) == list(mean) and list(torch_config.latents_std) == list(std)
  z = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float32)
  expected = (z - np.array(mean, np.float32)) * 0.5 / np.array(std, np.float32)
  np.testing.assert_allclose(np.asarray(scale_latents(jnp.asarray(z), config)), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(unscale_latents(jnp.asarray(expected), config)), z, rtol=1e-5, atol=1e-6)
  # Without statistics: SD's scalar scaling, unchanged.
  np.testing.assert_allclose(np.asarray(scale_latents(jnp.asarray(z), CONFIG)), z * CONFIG.scaling_factor,
                             rtol=1e-6)
