"""The packaged pretrained base (magicpose_jax/demo/pretrained_sd): intact, made by the command and budget the code
names, read the same by diffusers/transformers and by us, and trained (it reconstructs and denoises held-out
figures, which it never saw, far better than an untrained model could; its OpenPose ControlNet tells the frozen UNet
where the figure is).

Tolerance of the parity checks: max |ours - PyTorch| <= 1e-4 in float32.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers import ControlNetModel as TorchControlNet
from diffusers import DDIMScheduler
from diffusers import UNet2DConditionModel as TorchUNet

from magicpose_jax.convert.controlnet import load_controlnet
from magicpose_jax.convert.stable_diffusion import load_stable_diffusion
from magicpose_jax.data.synthetic import PART_NAMES
from magicpose_jax.demo import phases, pretrain, pretrained
from magicpose_jax.demo import retarget as rt
from magicpose_jax.demo.autoencoder import reconstruct
from magicpose_jax.diffusion.schedules import add_noise, make_schedule, velocity
from magicpose_jax.models.controlnet import ControlNetModel
from magicpose_jax.models.unet import UNet2DConditionModel
from magicpose_jax.models.vae import AutoencoderKL, scale_latents, unscale_latents
from magicpose_jax.torch_reference import nchw, nhwc
from magicpose_jax.train.stages import empty_prompt_ids, text_context

ATOL = 1e-4
BASE = pretrained.PACKAGED_BASE


@pytest.fixture(scope="module")
def base():
  sd, params = load_stable_diffusion(BASE)
  return sd, params


@pytest.fixture(scope="module")
def controlnet():
  return load_controlnet(pretrained.controlnet_of(BASE))


def _heldout_frames():
  config = phases.load_config()
  source = rt.synthetic_source(config.data)
  first = config.data.synthetic.num_identities - config.data.synthetic.holdout_identities
  return [source.frame(first + i, f) for i in range(8) for f in range(2)]


@pytest.fixture(scope="module")
def heldout():
  """uint8 [16, 64, 64, 3]: frames of the demo's held-out identities (never trained on)."""
  return np.stack([f["image"] for f in _heldout_frames()])


@pytest.fixture(scope="module")
def heldout_poses():
  """uint8 [16, 64, 64, 3]: the pose renders of `heldout`'s frames."""
  return np.stack([f["pose_image"] for f in _heldout_frames()])


def test_every_file_is_intact_and_from_the_pretrain_budget():
  manifest = pretrained.check_base_sd(BASE)
  assert manifest["command"].startswith("python -m magicpose_jax.demo.pretrain")
  for key, value in manifest["budget"].items():  # PRETRAIN changed without re-running the command: stale weights
    assert getattr(pretrain.PRETRAIN, key) == value, key
  assert manifest["step"] == pretrain.PRETRAIN.base_steps
  assert manifest["budget"]["decoder_steps"] == pretrain.PRETRAIN.decoder_steps > 0  # the decoder phase ran
  # PRETRAIN's decoder head weight changed without training the packaged decoder with it: a stale decoder.
  last = manifest["decoder_continued"][-1]
  assert last["head_weight"] == pretrain.PRETRAIN.decoder_head_weight > 0
  assert last["latent_noise"] == pretrain.PRETRAIN.decoder_latent_noise > 0
  assert pretrained.controlnet_of(BASE) and manifest["budget"]["pose_steps"] > 0


def _training_commands(record: dict) -> list[str]:
  """The `python -m magicpose_jax.train` commands of a manifest's continued-training record, in order."""
  return [c for c in record["commands"] if c.startswith("python -m magicpose_jax.train")]


def test_the_controlnet_was_last_trained_on_the_demos_pose_maps():
  # configs/demo.py's pose maps changed without training the packaged ControlNet on them: it reads other maps.
  supersample = phases.load_config().data.synthetic.pose_supersample
  runs = _training_commands(pretrained.check_base_sd(BASE)["controlnet_continued"])
  assert runs and all(f"--config.data.synthetic.pose_supersample={supersample} " in c for c in runs)


def test_the_networks_were_last_trained_on_the_demos_figures():
  # configs/demo.py's head scale changed without training the packaged UNet, ControlNet and decoder on such figures:
  # they would know other people than the demo draws.
  scale = phases.load_config().data.synthetic.head_scale
  manifest = pretrained.check_base_sd(BASE)
  for record in ("unet_continued", "controlnet_continued"):
    runs = _training_commands(manifest[record])
    assert runs and f"--config.data.synthetic.head_scale={scale} " in runs[-1], record
  assert manifest["decoder_continued"][-1]["head_scale"] == scale


def test_the_scheduler_is_the_demo_schedule_in_diffusers(base):
  sd, _ = base
  assert sd.scheduler == phases.DEMO_SCHEDULE
  scheduler = DDIMScheduler.from_pretrained(os.path.join(BASE, "scheduler"))
  assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
  assert scheduler.config.timestep_spacing == "trailing"


def test_unet_matches_diffusers(base):
  sd, params = base
  model, info = TorchUNet.from_pretrained(os.path.join(BASE, "unet"), output_loading_info=True)
  assert not any(info.values()), info
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 16, sd.unet.in_channels), dtype=np.float32)
  t = np.array([50.0, 700.0], np.float32)
  ctx = rng.standard_normal((2, 7, sd.unet.cross_attention_dim), dtype=np.float32)
  ours = UNet2DConditionModel(sd.unet).apply({"params": params["unet"]}, x, t, ctx)
  with torch.no_grad():
    ref = nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  assert np.abs(np.asarray(ours) - ref).max() <= ATOL


def test_vae_matches_diffusers(base, heldout):
  sd, params = base
  model, info = TorchVAE.from_pretrained(os.path.join(BASE, "vae"), output_loading_info=True)
  assert not any(info.values()), info
  x = heldout[:2].astype(np.float32) / 127.5 - 1
  vae = AutoencoderKL(sd.vae)
  z = vae.apply({"params": params["vae"]}, x, method="encode").mode()
  out = vae.apply({"params": params["vae"]}, z, method="decode")
  with torch.no_grad():
    z_ref = model.encode(nchw(x)).latent_dist.mode()
    out_ref = model.decode(z_ref).sample
  # The raw latents (+-15) are the sensitive part: with flax's nn.GroupNorm (one running float32 sum per group on
  # XLA:CPU) ours were 1.6e-4 off on the first 1.6x-head frame; models/normalization.py's sums keep them in ATOL.
  assert np.abs(np.asarray(z) - nhwc(z_ref)).max() <= ATOL
  assert np.abs(np.asarray(out) - nhwc(out_ref)).max() <= ATOL


def test_text_encoder_matches_transformers(base):
  sd, params = base
  model = transformers.CLIPTextModel.from_pretrained(os.path.join(BASE, "text_encoder"))
  ids = empty_prompt_ids(sd.text_encoder, sd.tokenizer)
  with torch.no_grad():
    ref = model(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state.numpy()
  assert np.abs(text_context(sd, params["text_encoder"]) - ref).max() <= ATOL


def test_the_vae_reconstructs_held_out_figures(base, heldout):
  # An untrained VAE's reconstruction is noise around grey (L1 ~0.5 on these figures). The VAE phase's own decoder
  # gives 0.057 on them, the decoder phase's (shipped) 0.038: the bound fails for a base without the decoder phase.
  sd, params = base
  x = heldout.astype(np.float32) / 127.5 - 1
  vae = AutoencoderKL(sd.vae)
  out = vae.apply({"params": params["vae"]}, vae.apply({"params": params["vae"]}, x, method="encode").mode(),
                  method="decode")
  assert float(np.abs(np.asarray(out) - x).mean()) < 0.045


def test_the_decoder_keeps_the_heads(base):
  # Mean |error| inside the held-out figures' heads (1.6x heads: about 3 % of the image), uint8 reconstructions in
  # [0, 1]: the decoder phase's plain-loss decoder gives 0.113 on them, the one then fine-tuned head-weighted and on
  # noisy latents on adult heads 0.116, and that one fine-tuned on 1.6x heads (shipped) 0.088.
  sd, params = base
  frames = _heldout_frames()
  images = np.stack([f["image"] for f in frames])
  heads = np.stack([f["part_mask"] == PART_NAMES.index("head") for f in frames])
  error = np.abs(reconstruct(sd.vae, params["vae"], images).astype(np.float64) - images) / 255
  assert error[heads].mean() < 0.100


def test_the_unet_denoises_held_out_figures(base, heldout):
  # The v-prediction error of the empty-prompt UNet on noised held-out latents, against predicting v = 0 (what an
  # untrained, zero-output model scores; a random one scores worse): the trained base must cut it by more than half.
  sd, params = base
  vae = AutoencoderKL(sd.vae)
  z0 = scale_latents(vae.apply({"params": params["vae"]}, heldout.astype(np.float32) / 127.5 - 1,
                               method="encode").mode(), sd.vae)
  schedule = make_schedule(sd.scheduler)
  ctx = jnp.broadcast_to(text_context(sd, params["text_encoder"]), (len(z0), *text_context(
      sd, params["text_encoder"]).shape[1:]))
  unet = UNet2DConditionModel(sd.unet)
  for t in (200, 500, 800):
    noise = jax.random.normal(jax.random.key(t), z0.shape)
    xt = add_noise(schedule, z0, noise, t)
    target = velocity(schedule, z0, noise, t)
    pred = unet.apply({"params": params["unet"]}, xt, jnp.full((len(z0),), t, jnp.float32), ctx)
    err, zero = float(jnp.mean((pred - target) ** 2)), float(jnp.mean(target ** 2))
    assert err < 0.5 * zero, (t, err, zero)
  assert unscale_latents(z0, sd.vae).shape == (len(heldout), 16, 16, sd.vae.latent_channels)


def test_controlnet_matches_diffusers(base, controlnet, heldout_poses):
  sd, _ = base
  config, params = controlnet
  model, info = TorchControlNet.from_pretrained(pretrained.controlnet_of(BASE), output_loading_info=True)
  assert not any(info.values()), info
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 16, 16, sd.unet.in_channels), dtype=np.float32)
  t = np.array([100.0, 600.0], np.float32)
  ctx = rng.standard_normal((2, 7, sd.unet.cross_attention_dim), dtype=np.float32)
  cond = heldout_poses[:2].astype(np.float32) / 255
  down, mid = ControlNetModel(config).apply({"params": params}, x, t, ctx, cond)
  with torch.no_grad():
    ref_down, ref_mid = model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond), return_dict=False)
  for ours, ref in zip([*down, mid], [*ref_down, ref_mid], strict=True):
    assert np.abs(np.asarray(ours) - nhwc(ref)).max() <= ATOL


def test_the_controlnet_places_held_out_figures(base, controlnet, heldout, heldout_poses):
  # The frozen UNet's v-prediction error on noised held-out latents with the ControlNet's residuals for the
  # frames' own poses, against without them (an untrained ControlNet's zero convs give exactly the same error):
  # knowing where the body is must cut it by a fifth where the noise hides the figure.
  sd, params = base
  config, cn_params = controlnet
  vae = AutoencoderKL(sd.vae)
  z0 = scale_latents(vae.apply({"params": params["vae"]}, heldout.astype(np.float32) / 127.5 - 1,
                               method="encode").mode(), sd.vae)
  schedule = make_schedule(sd.scheduler)
  ctx = text_context(sd, params["text_encoder"])
  ctx = jnp.broadcast_to(ctx, (len(z0), *ctx.shape[1:]))
  unet, cn = UNet2DConditionModel(sd.unet), ControlNetModel(config)
  cond = heldout_poses.astype(np.float32) / 255
  for t in (500, 800):
    noise = jax.random.normal(jax.random.key(t), z0.shape)
    xt = add_noise(schedule, z0, noise, t)
    target = velocity(schedule, z0, noise, t)
    ts = jnp.full((len(z0),), t, jnp.float32)
    down, mid = cn.apply({"params": cn_params}, xt, ts, ctx, cond)
    plain = unet.apply({"params": params["unet"]}, xt, ts, ctx)
    posed = unet.apply({"params": params["unet"]}, xt, ts, ctx, down, mid)
    err, without = float(jnp.mean((posed - target) ** 2)), float(jnp.mean((plain - target) ** 2))
    assert err < 0.8 * without, (t, err, without)
