"""Our DDPM/DDIM schedules vs diffusers' `DDIMScheduler` / `DDPMScheduler` (PyTorch, CPU), built from one config dict.

Tolerances (float32 throughout):
- `ddim_timesteps`, `betas`, `alphas_cumprod`: equal bit for bit. Exception: with `rescale_betas_zero_snr`
  diffusers takes a float32 `torch.sqrt` that on the CPU is not correctly rounded (MKL, up to ~0.55 ulp), so there
  `alphas_cumprod` must match to 1e-6 and `betas` to 1e-5 max abs (a few ulp; measured 1.8e-7 and 3e-7).
- `add_noise`, `get_velocity`, `training_target` (v), the predicted x0: max abs error <= 1e-6.
- DDIM steps, each taken from diffusers' own x_t (every step of every loop below, eta = 0 and eta > 0 with the
  same injected noise): <= 1e-6 per unit of magnitude (|x| <= ~3 here, ~30 in the eta > 0 epsilon loop), and for
  epsilon prediction also times sqrt((1 - a_t) / a_t), by which x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
  magnifies one float32 rounding of x_t (1 for a_t >= 0.5; ~160 at t = 999 with linear betas).
- Full free-running DDIM loops (each side from its own previous output): rounding compounds over the steps in
  any float32 implementation; diffusers itself drifts from the same loop in float64 by up to 7e-5 here. Bound:
  2 * (1e-6 + |diffusers - float64|) (measured worst 0.7 of it).
The loops start on the noising trajectory of a fixed x0 in [-1, 1]; the fake model outputs (fixed per step) are
that trajectory's exact targets plus a fixed random perturbation, so values stay bounded (checked) and a wrong
coefficient, alpha or timestep moves the result by orders of magnitude more than the tolerances.
Run with `-s` to print the worst errors measured (`test_zz_report`).
"""

import dataclasses
import functools
import itertools
import json
import warnings

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from magicpose_jax.diffusion.schedules import (
  BETA_SCHEDULES,
  IGNORED_KEYS,
  PREDICTION_TYPES,
  SCHEDULER_CLASSES,
  SD15_SCHEDULE,
  TIMESTEP_SPACINGS,
  Schedule,
  ScheduleConfig,
  add_noise,
  ddim_prev_timestep,
  ddim_step,
  ddim_timesteps,
  make_schedule,
  predict_x0_and_eps,
  training_target,
  velocity,
)

# diffusers' other scheduler classes trip numpy 2 deprecation warnings when built; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ATOL = 1e-6
MEASURED: dict[str, float] = {}  # worst errors seen, printed by test_zz_report (run with -s)
SHAPE = (2, 4, 4, 3)  # [B, H, W, C]; the schedule math is elementwise, so diffusers takes the same NHWC arrays

# Beta ranges as the model families use them (SD for scaled_linear, DDPM's defaults otherwise).
_BETA_RANGE = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (0.0001, 0.02)}


def _config_dict(beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading",
                 set_alpha_to_one=False, steps_offset=1, **extra):
  start, end = _BETA_RANGE[beta_schedule]
  return {"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
          "beta_start": start, "beta_end": end, "beta_schedule": beta_schedule, "trained_betas": None,
          "prediction_type": prediction_type, "clip_sample": False, "set_alpha_to_one": set_alpha_to_one,
          "steps_offset": steps_offset, "timestep_spacing": timestep_spacing, **extra}


GRID = list(itertools.product(BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, (False, True), (0, 1)))
GRID_IDS = [f"{b}-{p}-{s}-one{int(a)}-off{o}" for b, p, s, a, o in GRID]

_jit_step = jax.jit(ddim_step, static_argnums=(1,))


def _record(name, value):
  MEASURED[name] = max(MEASURED.get(name, 0.0), float(value))


def _pair(d):
  return ScheduleConfig.from_diffusers(d), DDIMScheduler.from_config(d)


def _max_err(ours, ref):
  ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
  ours = np.asarray(ours)
  assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ours.dtype, ref.shape, ref.dtype)
  return float(np.abs(ours.astype(np.float64) - ref).max())


def _assert_close(ours, ref, atol=ATOL, min_scale=0.1):
  ref_np = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
  assert np.abs(ref_np).max() > min_scale, "reference is too small for the tolerance to mean anything"
  err = _max_err(ours, ref)
  assert err <= atol, f"max abs error {err:.3g} > {atol}"
  return err


# --- schedule arrays and timesteps ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("num_train_timesteps", [1, 2, 37, 1000, 4000])
def test_betas_and_alphas_cumprod_bit_exact(beta_schedule, num_train_timesteps):
  d = _config_dict(beta_schedule, num_train_timesteps=num_train_timesteps)
  config, ref = _pair(d)
  schedule = make_schedule(config)
  assert schedule.betas.dtype == jnp.float32 and schedule.alphas_cumprod.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(schedule.betas), ref.betas.numpy())
  np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod), ref.alphas_cumprod.numpy())
  ddpm = DDPMScheduler.from_config(d)
  np.testing.assert_array_equal(np.asarray(schedule.betas), ddpm.betas.numpy())
  np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod), ddpm.alphas_cumprod.numpy())


def test_float64_linspace_would_not_be_exact():
  # Guards the reason the schedule reproduces torch's float32 linspace: the obvious float64 version differs.
  start, end = _BETA_RANGE["scaled_linear"]
  naive = (np.linspace(start**0.5, end**0.5, 1000) ** 2).astype(np.float32)
  assert (naive != DDIMScheduler.from_config(_config_dict()).betas.numpy()).sum() > 10


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_rescale_zero_snr_schedule(beta_schedule):
  config, ref = _pair(_config_dict(beta_schedule, prediction_type="v_prediction", rescale_betas_zero_snr=True))
  schedule = make_schedule(config)
  _record("rescaled alphas_cumprod", _assert_close(schedule.alphas_cumprod, ref.alphas_cumprod, atol=1e-6))
  _record("rescaled betas", _assert_close(schedule.betas, ref.betas, atol=1e-5))
  assert float(schedule.alphas_cumprod[-1]) == 0.0 == float(ref.alphas_cumprod[-1])  # zero terminal SNR
  plain = make_schedule(config.replace(rescale_betas_zero_snr=False))
  assert float(plain.alphas_cumprod[-1]) > 0  # without the rescale there is signal left at t = T - 1
  assert np.abs(np.asarray(plain.alphas_cumprod - schedule.alphas_cumprod)).max() > 1e-5


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1, 3])
def test_ddim_timesteps_equal(spacing, steps_offset):
  config, ref = _pair(_config_dict(timestep_spacing=spacing, steps_offset=steps_offset))
  for n in (1, 2, 3, 7, 20, 50, 61, 333, 998, 999, 1000):  # 61, 998: diffusers' trailing gives n + 1 steps
    ref.set_timesteps(n)
    ours = ddim_timesteps(config, n)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"num_inference_steps={n}")
  with pytest.raises(ValueError, match="num_inference_steps"):
    ddim_timesteps(config, 1001)
  with pytest.raises(ValueError):
    ref.set_timesteps(1001)
  with pytest.raises(ValueError, match="num_inference_steps"):
    ddim_timesteps(config, 0)


def test_prev_timestep_is_diffusers_not_the_next_list_entry():
  config = ScheduleConfig(timestep_spacing="trailing")
  ts = ddim_timesteps(config, 3)
  np.testing.assert_array_equal(ts, [999, 666, 332])
  assert [ddim_prev_timestep(config, int(t), 3) for t in ts] == [666, 333, -1]  # 333, not the list's 332


# --- forward process ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
def test_add_noise_and_velocity(beta_schedule, rescale):
  d = _config_dict(beta_schedule, prediction_type="v_prediction", rescale_betas_zero_snr=rescale)
  config, ref = _pair(d)
  ddpm = DDPMScheduler.from_config(d)
  schedule = make_schedule(config)
  rng = np.random.default_rng(1)
  shape = (8,) + SHAPE[1:]
  x0 = rng.uniform(-1, 1, shape).astype(np.float32)
  noise = rng.standard_normal(shape, dtype=np.float32)
  t = np.array([0, 1, 17, 250, 500, 750, 998, 999])
  targs = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
  fn_noise, fn_v = jax.jit(add_noise), jax.jit(velocity)
  ours_noisy, ours_v = fn_noise(schedule, x0, noise, t), fn_v(schedule, x0, noise, t)
  for sched in (ref, ddpm):
    _record("add_noise", _assert_close(ours_noisy, sched.add_noise(*targs)))
    _record("get_velocity", _assert_close(ours_v, sched.get_velocity(*targs)))
  # Scalar t broadcasts over the batch.
  _assert_close(fn_noise(schedule, x0, noise, 500), ref.add_noise(*targs[:2], torch.full((8,), 500)))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_target_and_prediction_round_trip(prediction_type):
  config = SD15_SCHEDULE.replace(prediction_type=prediction_type)
  schedule = make_schedule(config)
  rng = np.random.default_rng(2)
  x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
  noise = rng.standard_normal(SHAPE, dtype=np.float32)
  t = np.array([3, 600])
  target = training_target(config, schedule, x0, noise, t)
  expected = {"epsilon": noise, "sample": x0,
              "v_prediction": DDIMScheduler.from_config(config.to_diffusers()).get_velocity(
                  torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()}[prediction_type]
  _assert_close(target, expected)
  x_t = add_noise(schedule, x0, noise, t)
  pred_x0, pred_eps = predict_x0_and_eps(schedule, target, x_t, t, prediction_type)
  # x0 from eps at t=3 divides by sqrt(a) ~ 1 and eps from x0 divides by sqrt(1 - a) ~ 0.06: float32 rounding.
  _assert_close(pred_x0, x0, atol=1e-5)
  _assert_close(pred_eps, noise, atol=1e-4)


# --- DDIM -----------------------------------------------------------------------------------------------------


def _trajectory(ref_alphas_cumprod, timesteps, prediction_type, seed, delta=0.1):
  """x_T and the fake model output of every step (float32): targets of one x0/noise pair plus a perturbation."""
  rng = np.random.default_rng(seed)
  ac = ref_alphas_cumprod.astype(np.float64)
  x0 = rng.uniform(-1, 1, SHAPE)
  eps = rng.standard_normal(SHAPE)
  a = ac[timesteps[0]]
  x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
  outputs = []
  for t in timesteps:
    a = ac[t]
    r = rng.standard_normal(SHAPE)
    if prediction_type == "epsilon":
      out = eps + delta * a**0.5 * r  # scaled so that the implied x0 stays O(1) even where a ~ 0
    elif prediction_type == "v_prediction":
      out = a**0.5 * eps - (1 - a) ** 0.5 * x0 + delta * r
    else:
      out = x0 + delta * r
    outputs.append(out.astype(np.float32))
  return x_t.astype(np.float32), outputs


def _exact_step(config, ac, out, t, t_prev, x, eta=0.0, noise=None):
  """The DDIM step in float64 numpy (DDIM paper eqs. 12 and 16) on diffusers' float32 alphas_cumprod."""
  a = ac[t]
  a_prev = ac[t_prev] if t_prev >= 0 else (1.0 if config.set_alpha_to_one else ac[0])
  if config.prediction_type == "epsilon":
    x0, eps = (x - (1 - a) ** 0.5 * out) / a**0.5, out
  elif config.prediction_type == "v_prediction":
    x0, eps = a**0.5 * x - (1 - a) ** 0.5 * out, a**0.5 * out + (1 - a) ** 0.5 * x
  else:
    x0, eps = out, (x - a**0.5 * out) / (1 - a) ** 0.5
  if config.clip_sample:
    x0 = np.clip(x0, -config.clip_sample_range, config.clip_sample_range)
  std = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
  x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
  return x_prev if noise is None else x_prev + std * noise


def _step_tolerance(config, a_t, scale):
  # 1e-6 per unit of magnitude (float32 holds values of ~4 to 5e-7). For epsilon prediction,
  # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) also turns one rounding of x_t into sqrt((1 - a) / a) of them (up to
  # ~160 at t = 999 with linear betas); the other parameterisations are O(1).
  cond = max(1.0, ((1 - a_t) / a_t) ** 0.5) if config.prediction_type == "epsilon" else 1.0
  return ATOL * cond * max(1.0, scale)


def _run_both(config, ref, schedule, n, seed, eta=0.0, noise_seed=None):
  """The DDIM loop in diffusers, in ours, and in float64; checks every step; returns diffusers' final sample.

  Each step is checked from diffusers' own x_t to `_step_tolerance`. The free-running loops (ours and diffusers'
  each from its own previous output) are compared at the end: float32 rounding compounds over the steps in both
  (by up to a few 1e-6 at O(1) values, as much for diffusers vs float64 as for ours vs diffusers), so the bound is
  2 * (1e-6 + |diffusers - float64|) (measured worst ratio 1.4).
  """
  ref.set_timesteps(n)
  timesteps = ddim_timesteps(config, n)
  ac = ref.alphas_cumprod.numpy().astype(np.float64)
  x_t, outputs = _trajectory(ac, timesteps, config.prediction_type, seed)
  x_ref, x_ours, x_exact = torch.from_numpy(x_t), x_t, x_t.astype(np.float64)
  batch = SHAPE[0]
  peak, loop_err, ref_err = 0.0, 0.0, 0.0
  for i, step_t in enumerate(timesteps):
    t, t_prev = int(step_t), ddim_prev_timestep(config, int(step_t), n)
    noise = None if noise_seed is None else np.random.default_rng(noise_seed + i).standard_normal(SHAPE, np.float32)
    out = outputs[i]
    # One call for both: the step from diffusers' x_t and our free-running one (the step is per sample).
    both = np.asarray(ddim_step(schedule, config, np.concatenate([out, out]), t, t_prev,
                                np.concatenate([x_ref.numpy(), x_ours]), eta,
                                variance_noise=None if noise is None else np.concatenate([noise, noise])))
    from_ref, x_ours = both[:batch], both[batch:]
    x_ref = ref.step(torch.from_numpy(out), t, x_ref, eta=eta,
                     variance_noise=None if noise is None else torch.from_numpy(noise)).prev_sample
    x_exact = _exact_step(config, ac, out.astype(np.float64), t, t_prev, x_exact, eta, noise)
    step_err = _max_err(from_ref, x_ref)
    scale = float(x_ref.abs().max())
    tol = _step_tolerance(config, ac[t], scale)
    assert step_err <= tol, f"step {i} (t={t} -> {t_prev}): max abs error {step_err:.3g} > {tol:.3g}"
    if config.prediction_type != "epsilon" or ac[t] > 0.5:  # well-conditioned steps
      _record("step_from_same_x_t, well-conditioned, per unit magnitude", step_err / max(1.0, scale))
      if scale <= 4:
        _record("step_from_same_x_t, well-conditioned, |x| <= 4", step_err)
    _record("step_from_same_x_t / tolerance", step_err / tol)
    peak = max(peak, float(x_ref.abs().max()))
    loop_err = max(loop_err, _max_err(x_ours, x_ref))
    ref_err = max(ref_err, float(np.abs(x_ref.numpy() - x_exact).max()))
  assert 0.5 < peak < 50, f"reference values of {peak:.3g}: the inputs are not O(1) as the tolerance assumes"
  loop_tol = 2 * (ATOL + ref_err)
  assert loop_err <= loop_tol, f"free-running loop: max abs error {loop_err:.3g} > {loop_tol:.3g}"
  _record("loop_free_running", loop_err)
  _record("loop_free_running / tolerance", loop_err / loop_tol)
  _record("loop diffusers vs float64", ref_err)
  return x_ref


@pytest.mark.parametrize(("beta_schedule", "prediction_type", "spacing", "set_alpha_to_one", "steps_offset"),
                         GRID, ids=GRID_IDS)
def test_ddim_loop_matches_diffusers(beta_schedule, prediction_type, spacing, set_alpha_to_one, steps_offset):
  d = _config_dict(beta_schedule, prediction_type, spacing, set_alpha_to_one, steps_offset)
  config, ref = _pair(d)
  schedule = make_schedule(config)
  np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod), ref.alphas_cumprod.numpy())
  for n in (1, 20, 50):
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ddim_timesteps(config, n), ref.timesteps.numpy())
    _run_both(config, ref, schedule, n, seed=n)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_loop_with_eta_and_noise(prediction_type):
  config, ref = _pair(_config_dict("scaled_linear", prediction_type, "trailing"))
  schedule = make_schedule(config)
  x_noisy = _run_both(config, ref, schedule, 20, seed=5, eta=0.7, noise_seed=100)
  x_plain = _run_both(config, ref, schedule, 20, seed=5)
  assert float((x_noisy - x_plain).abs().max()) > 0.05, "eta > 0 did not change the samples"


def test_ddim_step_eta_single_steps():
  # Every regime of the step: early, late, the final step to t_prev < 0 (both final alphas), eta in (0, 1].
  rng = np.random.default_rng(6)
  for set_alpha_to_one, prediction_type in itertools.product((False, True), PREDICTION_TYPES):
    config, ref = _pair(_config_dict(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one))
    schedule = make_schedule(config)
    ref.set_timesteps(50)
    for (t, eta), seed in zip(itertools.product((981, 501, 21, 1), (0.3, 1.0)), itertools.count()):
      x_t = rng.standard_normal(SHAPE, dtype=np.float32)
      out = rng.standard_normal(SHAPE, dtype=np.float32)
      key = jax.random.key(seed, impl="rbg")  # rbg: compiles in a fraction of threefry's time on the CPU
      noise = np.array(jax.random.normal(key, SHAPE, jnp.float32))
      expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_t), eta=eta,
                          variance_noise=torch.from_numpy(noise)).prev_sample
      t_prev = ddim_prev_timestep(config, t, 50)
      # x_t is not on a trajectory here, so the implied x0 is up to 1/sqrt(a) large: 1e-6 per unit of magnitude.
      scale = max(1.0, float(expected.abs().max()))
      ours = ddim_step(schedule, config, out, t, t_prev, x_t, eta, key)
      _record("single_step_per_unit", _assert_close(ours, expected, atol=ATOL * scale) / scale)
      # The key path draws exactly jax.random.normal(key, x_t.shape, x_t.dtype).
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(
          ddim_step(schedule, config, out, t, t_prev, x_t, eta, variance_noise=noise)))
      if t_prev >= 0:  # the last step's variance is 0 with set_alpha_to_one; elsewhere the noise must matter
        assert np.abs(np.asarray(ddim_step(schedule, config, out, t, t_prev, x_t)) - expected.numpy()).max() > 1e-3


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_clip_sample(prediction_type):
  d = _config_dict("linear", prediction_type, "linspace", clip_sample=True, clip_sample_range=0.5)
  config, ref = _pair(d)
  assert config.clip_sample and config.clip_sample_range == 0.5
  schedule = make_schedule(config)
  x_clipped = _run_both(config, ref, schedule, 20, seed=7)
  unclipped = config.replace(clip_sample=False)
  x_plain = _run_both(unclipped, DDIMScheduler.from_config(unclipped.to_diffusers()), schedule, 20, seed=7)
  assert float((x_clipped - x_plain).abs().max()) > 0.05, "clipping to 0.5 did not change the samples"
  # The predicted x0 that diffusers returns is ours too.
  x_t = np.random.default_rng(8).standard_normal(SHAPE, dtype=np.float32)
  out = np.random.default_rng(9).standard_normal(SHAPE, dtype=np.float32)
  ref.set_timesteps(20)
  ref_x0 = ref.step(torch.from_numpy(out), 500, torch.from_numpy(x_t)).pred_original_sample
  ours_x0, _ = predict_x0_and_eps(schedule, out, x_t, 500, prediction_type)
  _record("pred_original_sample", _assert_close(jnp.clip(ours_x0, -0.5, 0.5), ref_x0))


def test_ddim_loop_long_and_sd15():
  config, ref = _pair(SD15_SCHEDULE.to_diffusers())
  _run_both(config, ref, make_schedule(config), 999, seed=10)
  v_config, v_ref = _pair(_config_dict("scaled_linear", "v_prediction", "trailing", rescale_betas_zero_snr=True))
  _run_both(v_config, v_ref, make_schedule(v_config), 1000, seed=11)


def test_ddim_step_per_sample_timesteps_and_dtype():
  config = SD15_SCHEDULE.replace(prediction_type="v_prediction")
  schedule = make_schedule(config)
  rng = np.random.default_rng(12)
  x_t = rng.standard_normal(SHAPE, dtype=np.float32)
  out = rng.standard_normal(SHAPE, dtype=np.float32)
  t, t_prev = np.array([801, 21]), np.array([781, -19])
  batched = _jit_step(schedule, config, out, t, t_prev, x_t)
  for i in range(2):
    single = ddim_step(schedule, config, out[i:i + 1], int(t[i]), int(t_prev[i]), x_t[i:i + 1])
    np.testing.assert_allclose(np.asarray(batched[i:i + 1]), np.asarray(single), atol=1e-7)
  # A whole sampling loop under one jit, t a traced scalar, equals the eager step-by-step loop.
  timesteps = jnp.asarray(ddim_timesteps(config, 10), jnp.int32)

  @jax.jit
  def sample(x):
    def body(x, t):
      return ddim_step(schedule, config, out, t, ddim_prev_timestep(config, t, 10), x), None
    return jax.lax.scan(body, x, timesteps)[0]

  x = x_t
  for step_t in np.asarray(timesteps):
    x = ddim_step(schedule, config, out, int(step_t), ddim_prev_timestep(config, int(step_t), 10), x)
  np.testing.assert_allclose(np.asarray(sample(x_t)), np.asarray(x), atol=1e-6)
  low = _jit_step(schedule, config, out.astype(jnp.bfloat16), t, t_prev, x_t.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  assert np.abs(np.asarray(low, np.float32) - np.asarray(batched)).max() < 0.05
  with pytest.raises(ValueError, match="key"):
    ddim_step(schedule, config, out, 801, 781, x_t, eta=0.5)
  with pytest.raises(ValueError, match="not both"):
    ddim_step(schedule, config, out, 801, 781, x_t, eta=0.5, key=jax.random.key(0), variance_noise=out)


# --- config reading -------------------------------------------------------------------------------------------


SD15_SCHEDULER_JSON = {  # stable-diffusion-v1-5/scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def test_sd15_config_and_files(tmp_path):
  assert ScheduleConfig.from_diffusers(SD15_SCHEDULER_JSON) == SD15_SCHEDULE
  folder = tmp_path / "pipe" / "scheduler"
  folder.mkdir(parents=True)
  (folder / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_JSON))
  for source in (folder / "scheduler_config.json", folder, str(folder), tmp_path / "pipe"):
    assert ScheduleConfig.from_diffusers(source) == SD15_SCHEDULE
  with pytest.raises(FileNotFoundError, match=r"scheduler_config\.json"):
    ScheduleConfig.from_diffusers(tmp_path)
  # What diffusers itself makes of the same file.
  ref = DDIMScheduler.from_pretrained(folder)
  np.testing.assert_array_equal(np.asarray(make_schedule(SD15_SCHEDULE).alphas_cumprod), ref.alphas_cumprod.numpy())
  assert ScheduleConfig.from_diffusers(dict(ref.config)) == SD15_SCHEDULE
  for config in (SD15_SCHEDULE, ScheduleConfig(), ScheduleConfig(prediction_type="v_prediction", clip_sample=True)):
    assert ScheduleConfig.from_diffusers(config.to_diffusers()) == config
  assert ScheduleConfig.from_diffusers(SD15_SCHEDULER_JSON, prediction_type="v_prediction").prediction_type == (
      "v_prediction")


@functools.cache
def _scheduler_classes():
  out = []
  for name in sorted(SCHEDULER_CLASSES):
    try:
      with warnings.catch_warnings():  # some trip numpy 2 deprecation warnings when built
        warnings.simplefilter("ignore", DeprecationWarning)
        getattr(diffusers, name)()
    except ImportError:  # a dummy object (e.g. DPMSolverSDEScheduler without torchsde)
      continue
    out.append(name)
  return out


@pytest.mark.parametrize("name", _scheduler_classes())
def test_every_accepted_scheduler_class_reads(name):
  cls = getattr(diffusers, name)
  sd15 = {k: v for k, v in SD15_SCHEDULER_JSON.items() if not k.startswith("_")}
  for scheduler in (cls(), cls.from_config(sd15)):
    # As saved to scheduler_config.json (every key written): the class's own schedule.
    saved = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    config = ScheduleConfig.from_diffusers(saved)
    np.testing.assert_array_equal(np.asarray(make_schedule(config).alphas_cumprod),
                                  scheduler.alphas_cumprod.numpy())
    # In memory, `_use_default_values` marks the keys the class defaulted, which DDIMScheduler.from_config
    # replaces by its own defaults. Either way: what DDIMScheduler makes of the same dict.
    for d in (saved, dict(scheduler.config)):
      config, ddim = ScheduleConfig.from_diffusers(d), DDIMScheduler.from_config(d)
      np.testing.assert_array_equal(np.asarray(make_schedule(config).alphas_cumprod), ddim.alphas_cumprod.numpy())
      for n in (10, 25):
        ddim.set_timesteps(n)
        np.testing.assert_array_equal(ddim_timesteps(config, n), ddim.timesteps.numpy())


def test_ignored_keys_are_other_samplers_options():
  ours = {f.name for f in dataclasses.fields(ScheduleConfig)} | {"trained_betas", "thresholding"}
  assert not IGNORED_KEYS & ours
  # Every option of an accepted class is either ours or explicitly ignored.
  for name in _scheduler_classes():
    keys = {k for k in getattr(diffusers, name)().config if not k.startswith("_")}
    assert keys <= ours | IGNORED_KEYS, f"{name}: {sorted(keys - ours - IGNORED_KEYS)}"


@pytest.mark.parametrize(("change", "message"), [
    ({"some_new_option": 1}, "some_new_option \\(unknown key\\)"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas=.*only None"),
    ({"thresholding": True}, "thresholding=True"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "_class_name='FlowMatchEulerDiscreteScheduler'"),
    ({"_class_name": "EDMEulerScheduler", "sigma_data": 0.5}, "_class_name=.*; sigma_data \\(unknown key\\)"),
])
def test_config_rejections(change, message):
  with pytest.raises(ValueError, match=message):
    ScheduleConfig.from_diffusers({**SD15_SCHEDULER_JSON, **change})


def test_config_value_checks():
  for bad in ({"num_train_timesteps": 0}, {"steps_offset": -1}, {"clip_sample_range": 0.0},
              {"beta_schedule": "cosine"}, {"rescale_betas_zero_snr": True, "num_train_timesteps": 1}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      ScheduleConfig(**bad)
  with pytest.raises(ValueError, match="prediction_type"):
    predict_x0_and_eps(make_schedule(ScheduleConfig()), jnp.zeros(SHAPE), jnp.zeros(SHAPE), 0, "flow")


def test_schedule_is_a_pytree():
  schedule = make_schedule(SD15_SCHEDULE)
  leaves, treedef = jax.tree_util.tree_flatten(schedule)
  assert len(leaves) == 2 and isinstance(jax.tree_util.tree_unflatten(treedef, leaves), Schedule)
  assert schedule.betas.shape == schedule.alphas_cumprod.shape == (1000,)


def test_zz_report():
  # Runs last (pytest keeps file order): the worst errors of this session, for `pytest -s`.
  print("\nworst max abs errors vs diffusers:", {k: f"{v:.3g}" for k, v in sorted(MEASURED.items())})
