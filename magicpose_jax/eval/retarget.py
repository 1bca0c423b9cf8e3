"""Retargeting held-out synthetic figures to new poses with a trained run, and scoring against ground truth.

    model = load_trained(workdir)                       # a stage-1/stage-2 run (its base comes with it)
    pairs = holdout_pairs(data_config, poses_per_identity=4)
    result = retarget(model, source, pairs, SamplerConfig(num_steps=20, guidance=2.0))
    result.metrics   # evaluate_figures(...) over every (identity, pose): l1, psnr, ssim, mean_iou, identity_error

The demo and the fidelity benchmark share this. The identities are the data config's held-out ones (never
trained on), the reference is one frame of each and the targets are other frames of the same figure, so the
ground truth of a generated image is the figure's own frame in that pose (and expression). One reference drives
all its target poses through `sample_video` (reference states computed once for all DDIM steps), with one initial
noise shared by the poses, as the release animates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from magicpose_jax.data.synthetic import SyntheticConfig, SyntheticSource
from magicpose_jax.diffusion.sampler import SamplerConfig, sample_video
from magicpose_jax.diffusion.schedules import Schedule, make_schedule
from magicpose_jax.eval.figure_metrics import evaluate_figures
from magicpose_jax.models.vae import scale_latents, unscale_latents
from magicpose_jax.train import checkpoint as ckpt
from magicpose_jax.train import stages

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A trained stage-1/stage-2 run ready to sample: networks, every param (frozen base + trained nets), text."""

  config: ml_collections.ConfigDict
  nets: stages.Networks
  params: Params  # {"unet", "appearance"?, "pose"?}
  vae_params: Params
  text: np.ndarray  # [1, L, D] empty prompt
  schedule: Schedule

  @property
  def image_size(self) -> int:
    return self.nets.unet.config.sample_size * self.nets.latent_factor


def load_trained(workdir: str) -> TrainedModel:
  """The newest checkpoint of a "stage1"/"stage2" training run in `workdir`, with its frozen base."""
  config, trainable = ckpt.read_run(workdir)
  if config.stage == "base":
    raise ValueError(f"{workdir}: a 'base' run has no appearance or pose net; pass a stage1/stage2 run")
  sd, base, _ = stages.load_base(config, ckpt.read_run)
  nets = stages.networks(config, sd)
  params = {"unet": base["unet"], **trainable}
  return TrainedModel(config, nets, params, base["vae"], stages.text_context(sd, base["text_encoder"]),
                      make_schedule(nets.schedule))


@jax.jit
def _to_uint8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _encode(model: TrainedModel, image: np.ndarray) -> jax.Array:
  x = jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0
  z = _encode_jit(model.nets.vae, model.vae_params, x)
  return scale_latents(z, model.nets.vae.config)


def _encode_impl(vae: Any, params: Params, x: jax.Array) -> jax.Array:
  return vae.apply({"params": params}, x, method="encode").mean


def _decode_impl(vae: Any, params: Params, z: jax.Array) -> jax.Array:
  return vae.apply({"params": params}, z, method="decode")


_encode_jit = jax.jit(_encode_impl, static_argnums=0)
_decode_jit = jax.jit(_decode_impl, static_argnums=0)


def animate(model: TrainedModel, reference: np.ndarray, poses: np.ndarray, sampler: SamplerConfig, *,
            seed: int = 0, batch_frames: int = 4) -> np.ndarray:
  """Frames of the figure in `reference` in each pose.

  Args:
    reference: uint8 [S, S, 3] (S = `model.image_size`).
    poses: uint8 [F, S, S, 3] pose renders.
    sampler: DDIM steps and guidance (`guidance=1` is no classifier-free guidance).
    seed: the initial noise, shared by every frame.
    batch_frames: frames per sampler call (keep it fixed: every call of one shape shares a compilation).

  Returns:
    uint8 [F, S, S, 3].
  """
  s = model.image_size
  if reference.shape != (s, s, 3) or poses.ndim != 4 or poses.shape[1:] != (s, s, 3):
    raise ValueError(f"animate: expected reference [{s}, {s}, 3] and poses [F, {s}, {s}, 3], got {reference.shape} "
                     f"and {poses.shape}")
  z_ref = _encode(model, reference)
  x_t = jax.random.normal(jax.random.key(seed), z_ref.shape, jnp.float32)
  frames = poses.shape[0]
  padded = -(-frames // batch_frames) * batch_frames  # whole chunks: one compiled shape
  pose_in = np.concatenate([poses, np.repeat(poses[-1:], padded - frames, 0)]).astype(np.float32) / 255.0
  text = jnp.broadcast_to(jnp.asarray(model.text), (batch_frames, *model.text.shape[1:]))
  z = sample_video(model.nets.model, model.params, model.schedule, model.nets.schedule, sampler, x_t, text, z_ref,
                   jnp.asarray(pose_in), batch_frames=batch_frames)
  images = _decode_jit(model.nets.vae, model.vae_params, unscale_latents(z, model.nets.vae.config))
  return np.asarray(_to_uint8(images))[:frames]


def synthetic_source(data_config: ml_collections.ConfigDict) -> SyntheticSource:
  """The synthetic source of a training data config (`config.data`), at the training image size."""
  fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
  synthetic = {k: v for k, v in data_config.synthetic.items() if k in fields}
  if synthetic["image_size"] != data_config.image_size:
    raise ValueError(f"data.synthetic.image_size={synthetic['image_size']} != data.image_size="
                     f"{data_config.image_size}: evaluation needs figures rendered at the training size")
  return SyntheticSource(SyntheticConfig(**synthetic))


def holdout_pairs(data_config: ml_collections.ConfigDict, poses_per_identity: int,
                  identities: int | None = None) -> list[tuple[int, int, list[int]]]:
  """(identity, reference frame, target frames) for the held-out identities of `data_config`.

  The reference is frame 0, the targets frames 1..poses_per_identity (frames are independent random poses and
  expressions, so these are poses the model never saw on this figure).
  """
  synthetic = data_config.synthetic
  holdout = int(synthetic.get("holdout_identities", 0))
  if holdout <= 0:
    raise ValueError("data.synthetic.holdout_identities=0: no held-out identity to evaluate on")
  if poses_per_identity + 1 > synthetic.frames_per_identity:
    raise ValueError(f"poses_per_identity={poses_per_identity} needs frames_per_identity > {poses_per_identity}")
  first = synthetic.num_identities - holdout
  count = holdout if identities is None else min(identities, holdout)
  return [(first + i, 0, list(range(1, poses_per_identity + 1))) for i in range(count)]


@dataclasses.dataclass
class RetargetResult:
  """Attributes:
    metrics: `evaluate_figures` over every generated image (JSON-ready).
    rows: per pair (identity, reference image, pose images [K], generated [K], ground truth [K]).
  """

  metrics: dict
  rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def retarget(model: TrainedModel, source: SyntheticSource, pairs: Sequence[tuple[int, int, list[int]]],
             sampler: SamplerConfig, *, seed: int = 0, progress: Any = None) -> RetargetResult:
  """Generates every (identity, target pose) of `pairs` from the identity's reference frame and scores them.

  `progress`: called with 1 after each identity (e.g. a tqdm bar's `update`).
  """
  generated, frames, palettes, rows = [], [], [], []
  for identity, ref_frame, targets in pairs:
    truth = [source.frame(identity, t) for t in targets]
    reference = source.frame(identity, ref_frame)["image"]
    poses = np.stack([f["pose_image"] for f in truth])
    out = animate(model, reference, poses, sampler, seed=seed + identity, batch_frames=len(targets))
    generated.append(out)
    frames += truth
    palettes += [source.palette(identity)] * len(truth)
    rows.append((identity, reference, poses, out, np.stack([f["image"] for f in truth])))
    if progress is not None:
      progress(1)
  metrics = evaluate_figures(np.concatenate(generated), frames, palettes)
  return RetargetResult(metrics, rows)


SUMMARY_KEYS = (("l1", "L1", "lower"), ("psnr", "PSNR", "higher"), ("ssim", "SSIM", "higher"),
                ("mean_iou", "pose mIoU", "higher"), ("identity_error", "identity err", "lower"))


def summary(metrics: dict) -> dict[str, float]:
  """The headline numbers of an `evaluate_figures` dict."""
  return {key: float(metrics[key]) for key, _, _ in SUMMARY_KEYS}


def metrics_table(results: dict[str, dict[str, float]], markdown: bool = False) -> str:
  """A table of `summary` dicts, one row per variant (best value per column marked with *)."""
  names = list(results)
  header = ["variant"] + [f"{title} ({'↓' if order == 'lower' else '↑'})" for _, title, order in SUMMARY_KEYS]
  best = {}
  for key, _, order in SUMMARY_KEYS:
    values = [results[n][key] for n in names if key in results[n]]
    best[key] = (min if order == "lower" else max)(values) if values else None
  lines = []
  for n in names:
    cells = [n]
    for key, _, _ in SUMMARY_KEYS:
      v = results[n].get(key)
      cells.append("-" if v is None else f"{v:.3f}{'*' if v == best[key] and len(names) > 1 else ''}"
                   if key != "psnr" else f"{v:.2f}{'*' if v == best[key] and len(names) > 1 else ''}")
    lines.append(cells)
  if markdown:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(SUMMARY_KEYS)) + "|"]
    return "\n".join(out + ["| " + " | ".join(c) + " |" for c in lines])
  widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
  fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                               strict=True)))
  return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines])
