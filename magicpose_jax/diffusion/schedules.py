"""DDPM noise schedules and the DDIM sampler step, numerically diffusers' `DDIMScheduler` / `DDPMScheduler`.

`ScheduleConfig` holds diffusers' scheduler config keys; `make_schedule` turns it into a `Schedule` of float32
arrays (`betas [T]`, `alphas_cumprod [T]`) equal bit for bit to diffusers' tensors (to a few ulp with
`rescale_betas_zero_snr`, see below). The functions below take the `Schedule` as an argument (a pytree of arrays)
and the `ScheduleConfig` as a static value, so they all run under `jax.jit` with traced timesteps.

Shapes: samples are `[B, ...]` (NHWC latents `[B, H, W, C]` in this project; the math is elementwise so any layout
with the batch first works); timesteps are integer scalars or `[B]` (one per sample). Timesteps index the
schedule like PyTorch does (-1 is the last entry); out-of-range ones are clamped by JAX rather than raising.

How diffusers computes the schedule (what `make_schedule` reproduces):
- `linear` / `scaled_linear` betas come from `torch.linspace(..., dtype=torch.float32)`, computed in float32 on the
  CPU as `start + step * i` for the first half and `end - step * (T - 1 - i)` for the second, each one a fused
  multiply-add (checked bit for bit against torch 2.13 on x86-64 AVX-512; PyTorch's vectorised CPU kernels are
  compiled with FMA, so AVX2 and ARM64 builds should agree, and a build without FMA would differ in the last bit
  of a few betas). So the betas are not `np.linspace` in float64 cast to float32: that differs in the last bit
  for about a third of them.
- `squaredcos_cap_v2` betas are Python floats (float64) cast to float32.
- `alphas_cumprod = torch.cumprod(1 - betas)`: PyTorch's CPU cumprod accumulates float32 inputs in float64 and
  rounds each output to float32, which is `np.cumprod(alphas.astype(float64)).astype(float32)`.
- `rescale_betas_zero_snr` works on those float32 tensors with float32 ops, including a `torch.sqrt` that on the
  CPU is not correctly rounded (MKL, up to ~0.55 ulp; ~0.6% of inputs come out one ulp low). We use the correctly
  rounded numpy sqrt, so rescaled schedules match diffusers to a few ulp (<= 2e-7 absolute), not bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers scheduler classes whose config keys num_train_timesteps / beta_* / trained_betas / prediction_type /
# steps_offset / timestep_spacing mean what they mean to DDIMScheduler (they are DDIMScheduler's `_compatibles`,
# plus the DDIM/DDPM variants and LCM/TCD, which build their betas with the same code). A config of any of them is
# read the way `DDIMScheduler.from_config(config)` reads it: keys it leaves out take DDIMScheduler's defaults.
SCHEDULER_CLASSES = frozenset({
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
    "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
})

# Keys that only matter to the samplers of the classes above, not to the noise schedule or to DDIM: skipped.
IGNORED_KEYS = frozenset({
    # used by DDIM only when thresholding=True, which we reject
    "dynamic_thresholding_ratio", "sample_max_value",
    # DDPM / DDPMParallel: the posterior variance of the ancestral step
    "variance_type",
    # PNDM
    "skip_prk_steps",
    # sigma-space samplers (Euler, Heun, LMS, KDPM2, DPM-Solver, DEIS, UniPC)
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "flow_shift",
    "interpolation_type", "sigma_min", "sigma_max", "timestep_type", "final_sigmas_type",
    "use_dynamic_shifting", "time_shift_type", "shift_terminal", "noise_sampler_seed",
    # multistep solvers (DPM-Solver, DEIS, UniPC)
    "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_lu_lambdas",
    "lambda_min_clipped", "predict_x0", "disable_corrector", "solver_p",
    # LCM / TCD
    "original_inference_steps", "timestep_scaling",
})

# Keys accepted only at one value (the other values change the schedule or the step in ways we do not implement).
_FIXED_KEYS: dict[str, Any] = {"trained_betas": None, "thresholding": False}

# Keys diffusers writes that carry no configuration.
_METADATA_KEYS = frozenset({"_class_name", "_diffusers_version", "_use_default_values", "_name_or_path"})

CONFIG_NAME = "scheduler_config.json"


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """A DDPM/DDIM noise schedule; field names, meanings and defaults are diffusers' `DDIMScheduler`'s.

  `prediction_type` is what the model outputs (epsilon, v = sqrt(a) eps - sqrt(1 - a) x0, or x0 itself);
  `clip_sample` / `clip_sample_range` clip the predicted x0 in `ddim_step`; `set_alpha_to_one` picks the
  alpha_cumprod that the last DDIM step steps to (1.0, or alphas_cumprod[0]); `steps_offset` shifts the
  `leading` inference timesteps; `timestep_spacing` picks how `ddim_timesteps` spreads them.
  """

  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  prediction_type: str = "epsilon"
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  timestep_spacing: str = "leading"
  rescale_betas_zero_snr: bool = False

  def __post_init__(self):
    for field, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                           ("timestep_spacing", TIMESTEP_SPACINGS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"ScheduleConfig.{field}: {getattr(self, field)!r} is not supported (supported: {allowed})")
    if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
      raise ValueError(f"ScheduleConfig.num_train_timesteps: expected a positive int, got {self.num_train_timesteps!r}")
    if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
      raise ValueError(f"ScheduleConfig.steps_offset: expected an int >= 0, got {self.steps_offset!r}")
    if not self.clip_sample_range > 0:
      raise ValueError(f"ScheduleConfig.clip_sample_range: expected > 0, got {self.clip_sample_range!r}")
    if self.rescale_betas_zero_snr and self.num_train_timesteps < 2:
      raise ValueError("ScheduleConfig.rescale_betas_zero_snr needs num_train_timesteps >= 2")

  def replace(self, **changes: Any) -> ScheduleConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> ScheduleConfig:
    """Reads diffusers' scheduler config (a dict, `scheduler_config.json`, or the folder holding it).

    Also takes a pipeline folder (`<folder>/scheduler/scheduler_config.json`). Keys the config leaves out (or
    lists in `_use_default_values`) take `DDIMScheduler`'s defaults, as with `DDIMScheduler.from_config(config)`.
    Keys in `IGNORED_KEYS` (other samplers' options) are skipped; an unknown key, an unsupported `_class_name`,
    `trained_betas` other than null or `thresholding: true` raise one ValueError naming every offending entry.
    """
    source = "scheduler config"
    if not isinstance(config, Mapping):
      path = os.fspath(config)
      if os.path.isdir(path):
        candidates = [os.path.join(path, CONFIG_NAME), os.path.join(path, "scheduler", CONFIG_NAME)]
        path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
      source = path
      try:
        with open(path) as f:
          config = json.load(f)
      except FileNotFoundError:
        raise FileNotFoundError(f"scheduler config not found: {path}") from None
    ours = {f.name for f in dataclasses.fields(cls)}
    kwargs, errors = {}, []
    class_name = config.get("_class_name", "DDIMScheduler")
    if class_name not in SCHEDULER_CLASSES:
      errors.append(f"_class_name={class_name!r} (supported: {sorted(SCHEDULER_CLASSES)})")
    # diffusers lists the keys a scheduler took from its own defaults (not from the file) in `_use_default_values`,
    # and `from_config` drops them so that the new class's defaults apply; so do we.
    defaulted = set(config.get("_use_default_values") or ())
    for key, value in config.items():
      if key in _METADATA_KEYS or key in IGNORED_KEYS or key in defaulted:
        continue
      if key in ours:
        kwargs[key] = value
      elif key in _FIXED_KEYS:
        if value != _FIXED_KEYS[key]:
          errors.append(f"{key}={_short(value)} (only {_FIXED_KEYS[key]!r} is supported)")
      else:
        errors.append(f"{key} (unknown key)")
    for field, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                           ("timestep_spacing", TIMESTEP_SPACINGS)):
      if field in kwargs and kwargs[field] not in allowed:
        errors.append(f"{field}={kwargs[field]!r} (supported: {allowed})")
    if errors:
      raise ValueError(f"{source}: unsupported scheduler config entries: " + "; ".join(errors))
    return cls(**{**kwargs, **overrides})

  def to_diffusers(self) -> dict[str, Any]:
    """diffusers' `scheduler_config.json` dict (`DDIMScheduler.from_config` builds the same schedule)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {"_class_name": "DDIMScheduler", **d, **_FIXED_KEYS}


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


# Stable Diffusion 1.x: the schedule its UNet was trained with, read as DDIMScheduler (as SD pipelines do).
SD15_SCHEDULE = ScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class Schedule(NamedTuple):
  """The noise schedule as float32 arrays (a pytree: pass it to jitted functions as an argument).

  betas: `[T]`; alphas_cumprod: `[T]`, the product of `1 - betas` up to and including each step.
  """

  betas: jax.Array
  alphas_cumprod: jax.Array


# ---------------------------------------------------------------------------------------------------------------
# The schedule, in numpy, bit-exact with PyTorch's float32 CPU arithmetic.


def _fma_f32(a: np.float32, k: np.ndarray, c: np.ndarray) -> np.ndarray:
  """float32 `fma(a, k, c)` (one rounding of the exact `a * k + c`), elementwise; `k` integers below 2**29."""
  p = np.float64(a) * k.astype(np.float64)  # exact: a 24-bit significand times a 29-bit integer
  c64 = c.astype(np.float64)
  s = p + c64
  # TwoSum: err is exactly (p + c64) - s.
  bp = s - c64
  err = (p - bp) + (c64 - (s - bp))
  r = s.astype(np.float32)
  # Rounding to float64 then to float32 only differs from one rounding when s lands exactly halfway between two
  # float32 values while the exact sum does not: then round toward the side the exact sum lies on.
  r64 = r.astype(np.float64)
  nb = np.nextafter(r, np.where(s > r64, np.float32(np.inf), np.float32(-np.inf))).astype(np.float64)
  tie = (s != r64) & (s == (r64 + nb) * 0.5) & (err != 0)
  fixed = np.where(err > 0, np.maximum(r64, nb), np.minimum(r64, nb))
  return np.where(tie, fixed, r64).astype(np.float32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit. Returns `[steps]` float32."""
  s, e = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([s], np.float32)
  step = (e - s) / np.float32(steps - 1)
  i = np.arange(steps, dtype=np.int64)
  first_half = i < steps // 2
  # start + step * i for the first half, end - step * (steps - 1 - i) for the second (PyTorch's kernel).
  return _fma_f32(step, np.where(first_half, i, i - (steps - 1)), np.where(first_half, s, e))


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  # diffusers' betas_for_alpha_bar (GLIDE cosine), in Python floats with `math.cos` as diffusers does.
  def alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  n = num_train_timesteps
  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
  # torch.cumprod on the CPU accumulates float32 in float64 and rounds each output to float32.
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1), in float32 like the original."""
  alphas_bar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
  first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return (np.float32(1.0) - alphas).astype(np.float32)


def betas_numpy(config: ScheduleConfig) -> np.ndarray:
  """diffusers' `scheduler.betas` for `config` as a float32 numpy array `[T]`."""
  n = config.num_train_timesteps
  if config.beta_schedule == "linear":
    betas = torch_linspace_f32(config.beta_start, config.beta_end, n)
  elif config.beta_schedule == "scaled_linear":
    betas = torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
  else:
    betas = _cosine_betas(n)
  if config.rescale_betas_zero_snr:
    betas = _rescale_zero_terminal_snr(betas)
  return betas


def make_schedule(config: ScheduleConfig) -> Schedule:
  """The `Schedule` (float32 `betas`, `alphas_cumprod`, both `[T]`) equal to diffusers' scheduler tensors."""
  betas = betas_numpy(config)
  alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
  return Schedule(betas=jnp.asarray(betas), alphas_cumprod=jnp.asarray(alphas_cumprod))


# ---------------------------------------------------------------------------------------------------------------
# Forward process and parameterisations. All jit-able; `t` may be traced.


def _compute_dtype(x: jax.Array) -> jnp.dtype:
  # Schedule math runs in at least float32 (bf16 coefficients near t=0 would lose the signal); outputs are cast
  # back to the sample's dtype.
  return jnp.promote_types(x.dtype, jnp.float32)


def _per_sample(values: jax.Array, x: jax.Array) -> jax.Array:
  """`values` (a scalar or `[B]`) shaped to broadcast against `x [B, ...]`."""
  if values.ndim == 0:
    return values
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def _alpha_cumprod(schedule: Schedule, t: jax.Array | int, x: jax.Array) -> jax.Array:
  t = jnp.asarray(t)
  return _per_sample(schedule.alphas_cumprod[t].astype(_compute_dtype(x)), x)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (diffusers' `add_noise`). x0, noise `[B, ...]`; t `[B]` or scalar."""
  a = _alpha_cumprod(schedule, t, x0)
  dtype = _compute_dtype(x0)
  out = a**0.5 * x0.astype(dtype) + (1 - a) ** 0.5 * noise.astype(dtype)
  return out.astype(x0.dtype)


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array | int) -> jax.Array:
  """v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (diffusers' `get_velocity`). x0, noise `[B, ...]`; t `[B]` or scalar."""
  a = _alpha_cumprod(schedule, t, x0)
  dtype = _compute_dtype(x0)
  out = a**0.5 * noise.astype(dtype) - (1 - a) ** 0.5 * x0.astype(dtype)
  return out.astype(x0.dtype)


def _x0_and_eps(model_output: jax.Array, x_t: jax.Array, a: jax.Array,
                prediction_type: str) -> tuple[jax.Array, jax.Array]:
  # Same expressions and order of operations as DDIMScheduler.step.
  b = 1 - a
  if prediction_type == "epsilon":
    return (x_t - b**0.5 * model_output) / a**0.5, model_output
  if prediction_type == "v_prediction":
    return a**0.5 * x_t - b**0.5 * model_output, a**0.5 * model_output + b**0.5 * x_t
  if prediction_type == "sample":
    return model_output, (x_t - a**0.5 * model_output) / b**0.5
  raise ValueError(f"prediction_type: {prediction_type!r} is not supported (supported: {PREDICTION_TYPES})")


def predict_x0_and_eps(schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array | int,
                       prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """(predicted x0, predicted noise) from a model output of `prediction_type` at x_t. All `[B, ...]`; t `[B]`/scalar."""
  a = _alpha_cumprod(schedule, t, x_t)
  dtype = _compute_dtype(x_t)
  x0, eps = _x0_and_eps(model_output.astype(dtype), x_t.astype(dtype), a, prediction_type)
  return x0.astype(x_t.dtype), eps.astype(x_t.dtype)


def training_target(config: ScheduleConfig, schedule: Schedule, x0: jax.Array, noise: jax.Array,
                    t: jax.Array | int) -> jax.Array:
  """What the model should output for x_t = add_noise(x0, noise, t): noise, v, or x0 per `config.prediction_type`."""
  if config.prediction_type == "epsilon":
    return noise
  if config.prediction_type == "v_prediction":
    return velocity(schedule, x0, noise, t)
  return x0


# ---------------------------------------------------------------------------------------------------------------
# DDIM sampling.


def ddim_timesteps(config: ScheduleConfig, num_inference_steps: int) -> np.ndarray:
  """The descending int64 timesteps of diffusers' `DDIMScheduler.set_timesteps`, `[num_inference_steps]`.

  Reproduced as is, quirks included: with `trailing` spacing diffusers' float `np.arange` yields one extra
  timestep, -1 (which indexes the last alpha), for some step counts (61, 103, 121, ... of 1000 train steps).
  """
  n, total = num_inference_steps, config.num_train_timesteps
  if not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
    raise ValueError(f"num_inference_steps: expected an int in [1, num_train_timesteps={total}], got {n!r}")
  # The exact numpy expressions of DDIMScheduler.set_timesteps (rounding included).
  if config.timestep_spacing == "linspace":
    timesteps = np.linspace(0, total - 1, n).round()[::-1].copy().astype(np.int64)
  elif config.timestep_spacing == "leading":
    step_ratio = total // n
    timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
    timesteps += config.steps_offset
  else:  # trailing
    timesteps = np.round(np.arange(total, 0, -total / n)).astype(np.int64)
    timesteps -= 1
  return timesteps


def ddim_prev_timestep(config: ScheduleConfig, t: jax.Array | int, num_inference_steps: int) -> jax.Array | int:
  """The timestep diffusers' `DDIMScheduler.step` steps to from `t`: `t - num_train_timesteps // num_inference_steps`.

  This is not always the next entry of `ddim_timesteps` (with `trailing`/`linspace` spacing, or a `steps_offset`);
  pass it as `t_prev` to `ddim_step` to reproduce diffusers' sampler. A negative value means "the end" (x0).
  """
  return t - config.num_train_timesteps // num_inference_steps


def ddim_step(schedule: Schedule, config: ScheduleConfig, model_output: jax.Array, t: jax.Array | int,
              t_prev: jax.Array | int, x_t: jax.Array, eta: float | jax.Array = 0.0, key: jax.Array | None = None,
              variance_noise: jax.Array | None = None) -> jax.Array:
  """One DDIM step x_t -> x_{t_prev} (diffusers' `DDIMScheduler.step(...).prev_sample`).

  model_output, x_t: `[B, ...]`; t, t_prev: integer scalars or `[B]` (traced is fine); `t_prev < 0` steps to the
  end, where alpha_cumprod is 1.0 if `config.set_alpha_to_one` else `alphas_cumprod[0]`. The predicted x0 is
  clipped to +-`clip_sample_range` when `config.clip_sample`. With `eta > 0` the step adds
  `eta * sigma_t * noise`, sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev); the noise is
  `jax.random.normal(key, x_t.shape, x_t.dtype)`, or `variance_noise` when given (as diffusers' argument of that
  name). Math in float32 (or wider); returns `[B, ...]` in `x_t`'s dtype.

  Jitted on its own (static: the four config fields the step uses), so eager calls in a Python sampling loop
  compile once per step kind, and it inlines into an enclosing `jax.jit`.
  """
  if key is not None and variance_noise is not None:
    raise ValueError("ddim_step: pass either key or variance_noise, not both")
  if key is None and variance_noise is None and not isinstance(eta, jax.Array) and eta > 0:
    raise ValueError(f"ddim_step: eta={eta} > 0 needs a `key` (or `variance_noise`) for the noise")
  if key is not None:
    variance_noise = jax.random.normal(key, x_t.shape, x_t.dtype)
  clip = config.clip_sample_range if config.clip_sample else None
  return _ddim_step(schedule.alphas_cumprod, model_output, t, t_prev, x_t, eta,
                    variance_noise, prediction_type=config.prediction_type, clip=clip,
                    set_alpha_to_one=config.set_alpha_to_one)


@functools.partial(jax.jit, static_argnames=("prediction_type", "clip", "set_alpha_to_one"))
def _ddim_step(alphas_cumprod: jax.Array, model_output: jax.Array, t: jax.Array | int, t_prev: jax.Array | int,
               x_t: jax.Array, eta: float | jax.Array, variance_noise: jax.Array | None, *, prediction_type: str,
               clip: float | None, set_alpha_to_one: bool) -> jax.Array:
  dtype = _compute_dtype(x_t)
  alphas_cumprod = alphas_cumprod.astype(dtype)
  a_t = _per_sample(alphas_cumprod[t], x_t)
  final = jnp.asarray(1.0, dtype) if set_alpha_to_one else alphas_cumprod[0]
  a_prev = _per_sample(jnp.where(t_prev >= 0, alphas_cumprod[jnp.maximum(t_prev, 0)], final), x_t)

  x0, eps = _x0_and_eps(model_output.astype(dtype), x_t.astype(dtype), a_t, prediction_type)
  if clip is not None:
    x0 = jnp.clip(x0, -clip, clip)
  # DDIM paper eq. (16); the same expression order as diffusers' _get_variance.
  variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
  std = eta * variance**0.5
  x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
  if variance_noise is not None:
    x_prev = x_prev + std * variance_noise.astype(dtype)
  return x_prev.astype(x_t.dtype)
