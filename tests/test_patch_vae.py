"""`models.patch_vae`: the linear patch autoencoder the demo uses instead of a trained VAE. Checked against numpy
written here (patch cutting by slicing, PCA's least-squares optimum), and through a pipeline folder save/load."""

import numpy as np
import pytest

from magicpose_jax.convert.stable_diffusion import SDConfigs, load_stable_diffusion, save_stable_diffusion
from magicpose_jax.data.synthetic import SyntheticConfig, SyntheticSource
from magicpose_jax.demo.autoencoder import write_base_pipeline
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE
from magicpose_jax.models.clip import CLIP_VARIANTS
from magicpose_jax.models.patch_vae import (
  PatchVAE,
  PatchVAEConfig,
  abstract_autoencoder_params,
  depth_to_space,
  fit_patch_vae,
  make_vae,
  space_to_depth,
)
from magicpose_jax.models.unet import VARIANTS
from magicpose_jax.models.vae import AutoencoderKL, VAEConfig, scale_latents, unscale_latents


@pytest.fixture(scope="module")
def figures():
  source = SyntheticSource(SyntheticConfig(image_size=64, num_identities=40, frames_per_identity=2, detail="plain"))
  images = np.stack([source.frame(v, f)["image"] for v in range(40) for f in range(2)])
  return images[:64], images[64:]  # fit on 64, check on 16 others


def _apply(config, params, x, method):
  return np.asarray(make_vae(config).apply({"params": params}, x, method=method))


def test_space_to_depth_cuts_patches_row_major():
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  z = np.asarray(space_to_depth(x, 4))
  assert z.shape == (2, 2, 3, 48)
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(z[:, i, j], x[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, 48))
  np.testing.assert_array_equal(np.asarray(depth_to_space(z, 4)), x)
  with pytest.raises(ValueError, match="does not divide"):
    space_to_depth(x[:, :7], 4)


def test_all_components_reconstruct_exactly(figures):
  train, held_out = figures
  config, params = fit_patch_vae(PatchVAEConfig(latent_channels=48), train)
  x = held_out.astype(np.float32) / 127.5 - 1
  posterior = make_vae(config).apply({"params": params}, x, method="encode")
  z = np.asarray(posterior.mode())
  assert z.shape == (16, 16, 16, 48) and float(posterior.std.max()) < 1e-6  # deterministic
  np.testing.assert_allclose(_apply(config, params, z, "decode"), x, atol=2e-5)
  np.testing.assert_allclose(params["projection"].T @ params["projection"], np.eye(48), atol=1e-5)


def test_fitted_components_are_the_least_squares_optimum(figures):
  """k components reconstruct with the error PCA promises (the variance of the discarded directions), better
  than any other k-dimensional orthonormal projection tried."""
  train = figures[0]
  k = 12
  config, params = fit_patch_vae(PatchVAEConfig(latent_channels=k), train)
  x = train.astype(np.float64) / 127.5 - 1
  patches = np.stack([x[:, i:i + 4, j:j + 4].reshape(len(x), 48) for i in range(0, 64, 4)
                      for j in range(0, 64, 4)], 1).reshape(-1, 48)
  variances = np.sort(np.linalg.eigvalsh(np.cov(patches.T)))[::-1]
  encode = lambda p: np.asarray(make_vae(config).apply({"params": p}, x.astype(np.float32), method="encode").mode())
  recon = _apply(config, params, encode(params), "decode")
  mse = np.mean(np.square(recon - x)) * 48  # per patch
  np.testing.assert_allclose(mse, variances[k:].sum() * (len(patches) - 1) / len(patches), rtol=1e-3)
  random = np.linalg.qr(np.random.default_rng(0).normal(size=(48, k)))[0].astype(np.float32)
  other = {**params, "projection": random}
  assert np.mean(np.square(_apply(config, other, encode(other), "decode") - x)) * 48 > 2 * mse
  # The default scaling whitens: every channel of the UNet's latents at unit variance; with one scalar the
  # latents have unit variance overall and the first channel carries the most.
  z = np.asarray(scale_latents(encode(params), config))
  np.testing.assert_allclose(np.std(z, (0, 1, 2)), 1.0, atol=1e-3)
  np.testing.assert_allclose(unscale_latents(z, config), encode(params), atol=1e-5)
  scalar, _ = fit_patch_vae(PatchVAEConfig(latent_channels=k), train, per_channel=False)
  z = np.asarray(scale_latents(encode(params), scalar))
  assert abs(float(np.std(z)) - 1) < 1e-3 and np.argmax(np.std(z, (0, 1, 2))) == 0 and scalar.latents_std is None


def test_either_kind_of_config_picks_its_module():
  patch, kl = PatchVAEConfig(latent_channels=5), VAEConfig(block_out_channels=(8,), down_block_types=(
      "DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4)
  assert isinstance(make_vae(patch), PatchVAE) and isinstance(make_vae(kl), AutoencoderKL)
  shapes = {k: v.shape for k, v in abstract_autoencoder_params(patch).items()}
  assert shapes == {"patch_mean": (48,), "projection": (48, 5)}
  with pytest.raises(ValueError, match="latent_channels: expected 1..48"):
    PatchVAEConfig(latent_channels=49)
  with pytest.raises(TypeError, match="VAEConfig or PatchVAEConfig"):
    make_vae("sd15")


def test_pipeline_folder_keeps_the_patch_vae_and_diffusers_refuses_it(figures, tmp_path):
  config, params = fit_patch_vae(PatchVAEConfig(latent_channels=12), figures[0])
  unet = VARIANTS["tiny"].replace(sample_size=16, in_channels=12, out_channels=12)
  write_base_pipeline(str(tmp_path / "sd"), config, params, unet, CLIP_VARIANTS["tiny"], seed=0)
  configs, loaded = load_stable_diffusion(str(tmp_path / "sd"), components=("vae",))
  assert configs.vae == config
  for name in params:
    np.testing.assert_array_equal(loaded["vae"][name], params[name])
  with pytest.raises(ValueError, match="the VAE is a PatchVAE"):
    save_stable_diffusion(SDConfigs(unet, config, CLIP_VARIANTS["tiny"], SD15_SCHEDULE), {}, str(tmp_path / "d"))
  with pytest.raises(ValueError, match="latents have 12"):
    write_base_pipeline(str(tmp_path / "bad"), config, params, VARIANTS["tiny"], CLIP_VARIANTS["tiny"], seed=0)
