"""demo/autoencoder.py: the demo's VAE training (a short real run must learn the figures, not their mean colour)."""

import jax
import numpy as np
import pytest

from magicpose_jax.data.synthetic import SyntheticConfig, SyntheticSource
from magicpose_jax.demo import autoencoder
from magicpose_jax.models.random_init import random_params
from magicpose_jax.models.vae import VAE_VARIANTS, AutoencoderKL, abstract_vae_params, scale_latents


def _names(path):
  return [str(getattr(k, "key", k)) for k in path]


def test_identity_blocks_zero_exactly_the_residual_branch_outputs():
  params = random_params(abstract_vae_params(autoencoder.DEMO_VAE), 0)
  out = autoencoder._identity_blocks(params)
  zeroed = 0
  for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(out), strict=True):
    names = _names(path)
    if names[-1] == "kernel" and names[-2] in ("conv2", "to_out_0"):
      assert not np.any(after), names
      zeroed += 1
    else:
      np.testing.assert_array_equal(before, after)
  # DEMO_VAE: encoder 3 + 2 mid resnets, decoder 3 x 2 + 2 mid resnets, one attention in each mid block.
  assert zeroed == (3 + 2) + (3 * 2 + 2) + 2


def _figures(n: int, size: int = 32) -> np.ndarray:
  """n plain 64 px figures, 2x2-averaged to `size` px (the tiny factor-2 VAE's size: a fast test)."""
  source = SyntheticSource(SyntheticConfig(num_identities=n, frames_per_identity=1, detail="plain"))
  images = np.stack([source.frame(i, 0)["image"] for i in range(n)]).astype(np.float32)
  f = 64 // size
  return images.reshape(n, size, f, size, f, 3).mean((2, 4)).round().astype(np.uint8)


def test_short_training_learns_more_than_the_mean_colour():
  """A failure mode of GroupNorm VAEs trained from scratch: stuck at each image's mean colour and a blurry
  silhouette (the demo's VAE sat there for hundreds of steps before `identity_blocks`)."""
  images = _figures(4)
  config = VAE_VARIANTS["tiny"]
  training = autoencoder.AutoencoderTraining(steps=100, batch_size=4, lr=2e-3)
  config, params, last = autoencoder.train_autoencoder(config, images, training)
  assert np.isfinite(config.scaling_factor) and config.scaling_factor > 0
  vae = AutoencoderKL(config)
  x = images.astype(np.float32) / 127.5 - 1
  recon = np.asarray(vae.apply({"params": params}, x, method="__call__"))
  l1 = np.abs(recon - x).mean()
  mean_colour = np.abs(x - x.mean((1, 2), keepdims=True)).mean()
  assert l1 < 0.8 * mean_colour, (l1, mean_colour, last)  # 0.65 after 100 steps; ~1 when stuck


def test_fitted_latent_scaling_gives_unit_variance_per_channel_or_overall():
  """The UNet's latents (posterior means through `scale_latents`): per channel, mean 0 and std 1 with
  `per_channel_latents`; SD's scalar convention gives std 1 over all values, and leaves the channels unequal."""
  images = _figures(8)
  config = VAE_VARIANTS["tiny"]
  params = random_params(abstract_vae_params(config), 3)
  vae = AutoencoderKL(config)
  raw = np.asarray(vae.apply({"params": params}, images.astype(np.float32) / 127.5 - 1, method="encode").mean)
  per_channel = autoencoder.fit_latent_scaling(config, vae, params, images, per_channel=True)
  z = np.asarray(scale_latents(raw, per_channel)).reshape(-1, config.latent_channels)
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(z.std(0), 1, rtol=1e-4)
  scalar = autoencoder.fit_latent_scaling(config, vae, params, images, per_channel=False)
  assert scalar.latents_mean is None
  z = np.asarray(scale_latents(raw, scalar))
  np.testing.assert_allclose(z.std(), 1, rtol=1e-4)
  assert np.ptp(z.reshape(-1, config.latent_channels).std(0)) > 0.05  # a random VAE's channels differ


def test_finetuning_the_decoder_keeps_the_latent_space_and_reconstructs_better():
  """`finetune_decoder` (the pretrain command's decoder phase): every encoder leaf is bit-identical (so a UNet
  trained over the VAE's latents still fits it), and reconstructions of the training figures improve over those of
  the VAE it started from (a short VAE training, still blurry)."""
  images = _figures(4)
  config = VAE_VARIANTS["tiny"]
  config, params, _ = autoencoder.train_autoencoder(
      config, images, autoencoder.AutoencoderTraining(steps=30, batch_size=4, lr=2e-3))
  tuned, last = autoencoder.finetune_decoder(config, params, images,
                                             autoencoder.DecoderTraining(steps=60, batch_size=4, lr=2e-3))
  assert set(tuned) == set(params) and np.isfinite(last["loss"])
  for name in set(params) - set(autoencoder.DECODER_PARAMS):
    jax.tree.map(np.testing.assert_array_equal, params[name], tuned[name])
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(params["decoder"]), jax.tree.leaves(tuned["decoder"]),
                                               strict=True))
  vae = AutoencoderKL(config)
  x = images.astype(np.float32) / 127.5 - 1
  l1 = [float(np.abs(np.asarray(vae.apply({"params": p}, x, method="__call__")) - x).mean()) for p in (params, tuned)]
  assert l1[1] < 0.9 * l1[0], l1


def test_finetune_decoder_names_what_it_lacks():
  config = VAE_VARIANTS["tiny"]
  params = random_params(abstract_vae_params(config), 0)
  with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
    autoencoder.finetune_decoder(config, params, np.zeros((2, 32, 32, 3), np.float32))
  del params["post_quant_conv"]
  with pytest.raises(ValueError, match=r"no \['post_quant_conv'\]"):
    autoencoder.finetune_decoder(config, params, _figures(2))


def test_decoder_loss_weights_each_pixel():
  """`decoder_loss` against numpy: the mean of |e| + e^2 over pixels and channels, or its per-pixel weighted mean
  (channels averaged first); all-ones weights give the plain mean."""
  config = VAE_VARIANTS["tiny"]
  params = random_params(abstract_vae_params(config), 0)
  decoder = {k: params[k] for k in autoencoder.DECODER_PARAMS}
  encoder = {k: v for k, v in params.items() if k not in autoencoder.DECODER_PARAMS}
  images = _figures(2)
  vae = AutoencoderKL(config)
  latents = np.random.default_rng(0).normal(size=(2, 16, 16, config.latent_channels)).astype(np.float32)
  recon = np.asarray(vae.apply({"params": params}, latents, method="decode"), np.float64)
  e = recon - (images.astype(np.float64) / 127.5 - 1)
  per_pixel = (np.abs(e) + e ** 2).mean(-1)
  weights = np.random.default_rng(1).uniform(0.5, 5, size=per_pixel.shape).astype(np.float32)
  plain = float(autoencoder.decoder_loss(decoder, encoder, vae, latents, images))
  weighted = float(autoencoder.decoder_loss(decoder, encoder, vae, latents, images, weights))
  ones = float(autoencoder.decoder_loss(decoder, encoder, vae, latents, images, np.ones_like(weights)))
  np.testing.assert_allclose(plain, per_pixel.mean(), rtol=1e-5)
  np.testing.assert_allclose(weighted, (per_pixel * weights).sum() / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(ones, plain, rtol=1e-6)
  assert abs(weighted - plain) > 1e-4  # the weights matter


def test_head_weighted_finetuning_needs_heads_and_trains_on_them():
  config = VAE_VARIANTS["tiny"]
  params = random_params(abstract_vae_params(config), 0)
  images = _figures(2)
  training = autoencoder.DecoderTraining(steps=2, batch_size=2, head_weight=4.0)
  with pytest.raises(ValueError, match=r"head_weight=4.0 needs heads, bool \[N, H, W\] = \[2, 32, 32\], got None"):
    autoencoder.finetune_decoder(config, params, images, training)
  with pytest.raises(ValueError, match=r"got \[2, 64, 64\]"):
    autoencoder.finetune_decoder(config, params, images, training, heads=np.ones((2, 64, 64), bool))
  with pytest.raises(ValueError, match="head_weight and latent_noise must be >= 0, got -1.0, 0.0"):
    autoencoder.DecoderTraining(head_weight=-1.0)
  with pytest.raises(ValueError, match="must be >= 0, got 0.0, -0.1"):
    autoencoder.DecoderTraining(latent_noise=-0.1)
  heads = np.zeros((2, 32, 32), bool)
  heads[:, 4:10, 12:20] = True
  tuned, last = autoencoder.finetune_decoder(config, params, images, training, heads=heads)
  assert np.isfinite(last["loss"]) and set(tuned) == set(params)


@pytest.mark.parametrize("per_channel", [False, True])
def test_noisy_latents_are_noised_in_the_unets_units(per_channel):
  """`noisy_latents` (the decoder's `latent_noise`): the noise has the asked std after `scale_latents`, whether the
  VAE scales by one factor or per channel, so it is the size of a sampler's error whatever the VAE's latent spread."""
  config = VAE_VARIANTS["tiny"].replace(scaling_factor=0.5)
  if per_channel:
    config = config.replace(latents_mean=(0.3, -1.0, 0.0, 2.0), latents_std=(0.1, 1.0, 2.0, 4.0), scaling_factor=1.0)
  z = np.random.default_rng(0).normal(size=(64, 16, 16, 4)).astype(np.float32)
  noisy = autoencoder.noisy_latents(z, config, 0.2, jax.random.key(0))
  diff = np.asarray(scale_latents(noisy, config)) - np.asarray(scale_latents(z, config))
  np.testing.assert_allclose(diff.reshape(-1, 4).std(0), 0.2, rtol=0.03)
  np.testing.assert_allclose(diff.mean(), 0.0, atol=3e-3)
  np.testing.assert_allclose(np.asarray(autoencoder.noisy_latents(z, config, 0.0, jax.random.key(0))), z, atol=1e-5)


def test_tuning_loss_weights_each_pixel_and_adds_the_anchored_drift():
  """`tuning_loss` against numpy: the per-pixel weighted mean of |e| + e^2 (channels averaged first) of decoding
  the posterior means, plus `anchor` x the latents' mean squared drift from `anchors` over `variance`."""
  config = VAE_VARIANTS["tiny"]
  params = random_params(abstract_vae_params(config), 0)
  images = _figures(2)
  vae = AutoencoderKL(config)
  x = images.astype(np.float32) / 127.5 - 1
  z = np.asarray(vae.apply({"params": params}, x, method="encode").mean, np.float64)
  e = np.asarray(vae.apply({"params": params}, z.astype(np.float32), method="decode"), np.float64) - x
  per_pixel = (np.abs(e) + e ** 2).mean(-1)
  weights = np.random.default_rng(1).uniform(0.5, 5, size=per_pixel.shape).astype(np.float32)
  anchors = (z + np.random.default_rng(2).normal(scale=0.1, size=z.shape)).astype(np.float32)
  loss, drift = autoencoder.tuning_loss(params, vae, images, weights, anchors, 3.0, 0.5)
  expected_drift = np.mean((z - anchors) ** 2) / 0.5
  np.testing.assert_allclose(float(drift), expected_drift, rtol=1e-4)
  np.testing.assert_allclose(float(loss), (per_pixel * weights).sum() / weights.sum() + 3.0 * expected_drift,
                             rtol=1e-5)


def test_tuning_the_autoencoder_trains_both_halves_and_the_anchor_holds_the_latents():
  """`tune_autoencoder` (`--tune-encoder`): encoder and decoder both change; a strong anchor keeps the posterior
  means closer to the VAE's own than no anchor does, and the reported drift is that distance; bad weights are named."""
  images = _figures(4)
  config = VAE_VARIANTS["tiny"]
  config, params, _ = autoencoder.train_autoencoder(
      config, images, autoencoder.AutoencoderTraining(steps=20, batch_size=4, lr=2e-3))
  weights = np.ones(images.shape[:3], np.float32)
  weights[:, 8:16, 8:16] = 21.0
  vae = AutoencoderKL(config)
  before = np.asarray(autoencoder._encode_mean(params, vae, images))
  drifts, reported = [], []
  for anchor in (0.0, 1000.0):
    tuned, last = autoencoder.tune_autoencoder(
        config, params, images, weights, autoencoder.EncoderTuning(steps=30, batch_size=4, lr=2e-3, anchor=anchor))
    assert set(tuned) == set(params) and np.isfinite(last["loss"])
    for half in ("encoder", "decoder"):
      assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(params[half]), jax.tree.leaves(tuned[half]),
                                                   strict=True)), half
    after = np.asarray(autoencoder._encode_mean(tuned, vae, images))
    drifts.append(float(np.sqrt(np.mean((after - before) ** 2) / np.var(before))))
    reported.append(last["drift"])
  assert drifts[1] < 0.5 * drifts[0], drifts
  assert 0 < reported[1] < 0.5 * reported[0], reported
  with pytest.raises(ValueError, match=r"weights must be positive, \[N, H, W\] = \[4, 32, 32\], got \[4, 64, 64\]"):
    autoencoder.tune_autoencoder(config, params, images, np.ones((4, 64, 64), np.float32))
  with pytest.raises(ValueError, match=r"weights must be positive.*min 0.0"):
    autoencoder.tune_autoencoder(config, params, images, np.zeros((4, 32, 32), np.float32))
  with pytest.raises(ValueError, match="EncoderTuning: expected steps"):
    autoencoder.EncoderTuning(anchor=-1.0)
