"""Guided DDIM sampling vs a step-by-step diffusers `DDIMScheduler` loop over the PyTorch composition.

Tolerance: max abs error <= 1e-4 in float32 on the final latents (unit scale).
"""

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from test_controlnet import _inputs as cn_inputs
from test_controlnet import _torch_residuals as torch_residuals
from test_magicpose import CONFIG, torch_nets  # noqa: F401  (module fixture)

from magicpose_jax.diffusion.sampler import SamplerConfig, sample, sample_video
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE, make_schedule
from magicpose_jax.models.magicpose import MagicPose
from magicpose_jax.torch_reference import ConcatKV, Record, nchw, nhwc, set_self_attention

STEPS, GUIDANCE = 5, 3.0


@pytest.fixture(scope="module")
def inputs():
  x_T, _, text, poses = cn_inputs(CONFIG.pose, seed=70)
  z_ref, _, _, _ = cn_inputs(CONFIG.pose, batch=1, seed=71)
  return x_T, text, z_ref, poses


def _torch_sample(nets, x_T, text, z_ref, poses, steps=STEPS):
  main, appearance, pose = nets
  scheduler = DDIMScheduler.from_config(SD15_SCHEDULE.to_diffusers())
  scheduler.set_timesteps(steps)
  plain = dict(main.attn_processors)
  z = nchw(x_T)
  text_t = torch.from_numpy(text)
  for t in scheduler.timesteps:
    recorded = []
    set_self_attention(appearance, lambda proc, store=recorded: Record(store, proc))
    with torch.no_grad():
      appearance(nchw(z_ref), t, text_t[:1])  # one reference, states shared by both frames
    queue = list(recorded)
    set_self_attention(main, lambda _, q=queue: ConcatKV(lambda h: q.pop(0).expand(h.shape[0], -1, -1)))
    down, mid = torch_residuals(pose, nhwc(z), np.full((2,), float(t), np.float32), text, poses)
    with torch.no_grad():
      cond = main(z, t, text_t, down_block_additional_residuals=tuple(nchw(d) for d in down),
                  mid_block_additional_residual=nchw(mid)).sample
      main.set_attn_processor(dict(plain))  # diffusers pops from the dict it is given
      uncond = main(z, t, text_t).sample  # the unconditional branch: plain SD
    z = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, z).prev_sample
  return nhwc(z)


@pytest.mark.parametrize("steps", [1, STEPS])  # one DDIM step, and a loop
def test_guided_ddim_matches_diffusers_loop(torch_nets, inputs, steps):  # noqa: F811
  nets, params = torch_nets
  x_T, text, z_ref, poses = inputs
  ref = _torch_sample(nets, x_T, text, z_ref, poses, steps)
  model = MagicPose(CONFIG)
  run = jax.jit(sample, static_argnums=(0, 3, 4))
  schedule = make_schedule(SD15_SCHEDULE)
  ours = np.asarray(run(model, params, schedule, SD15_SCHEDULE, SamplerConfig(steps, 0.0, GUIDANCE), x_T, text,
                        z_ref, poses))
  assert np.std(ref) > 0.05
  err = np.abs(ours - ref).max()
  assert err <= 1e-4, f"max abs error {err:.3g}"
  # The two-scale variant with equal scales is algebraically the one-scale one.
  two = np.asarray(run(model, params, schedule, SD15_SCHEDULE, SamplerConfig(steps, 0.0, GUIDANCE, GUIDANCE), x_T,
                       text, z_ref, poses))
  np.testing.assert_allclose(two, ours, atol=1e-4)


def test_cached_reference_states_give_the_same_frames(torch_nets, inputs):  # noqa: F811
  _, params = torch_nets
  x_T, text, z_ref, poses = inputs
  model = MagicPose(CONFIG)
  schedule = make_schedule(SD15_SCHEDULE)
  config = SamplerConfig(3, 0.0, GUIDANCE)
  cached = sample_video(model, params, schedule, SD15_SCHEDULE, config, x_T[:1], text, z_ref, poses, cache=True)
  fresh = sample_video(model, params, schedule, SD15_SCHEDULE, config, x_T[:1], text, z_ref, poses, cache=False)
  assert cached.shape == (2, *x_T.shape[1:])
  np.testing.assert_allclose(np.asarray(cached), np.asarray(fresh), atol=1e-6)
  assert np.abs(np.asarray(cached[0]) - np.asarray(cached[1])).max() > 1e-3  # different poses, different frames
