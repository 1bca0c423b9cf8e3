"""Retargeting held-out synthetic figures to new poses with a trained run, and scoring against ground truth.

    model = load_trained(workdir)                       # a stage-1/stage-2 run (its base comes with it)
    pairs = holdout_pairs(data_config, poses_per_identity=4)
    result = retarget(model, source, pairs, SamplerConfig(num_steps=20, guidance=2.0))
    result.metrics   # evaluate_figures(...) per (identity, pose): l1, psnr, ssim, mean_iou, identity_error, face_l1,
                     # eye_state

The demo and the fidelity benchmark share this. The identities are the data config's held-out ones (never
trained on), the reference is one frame of each and the targets are other frames of the same figure, so the
ground truth of a generated image is the figure's own frame in that pose (and expression). One reference drives
all its target poses through `inference.animate` (the `animate` CLI's sampler: reference states computed once for
all DDIM steps, one initial noise shared by the poses, as the release animates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from magicpose_jax.data.synthetic import SyntheticConfig, SyntheticSource
from magicpose_jax.diffusion.sampler import SamplerConfig
from magicpose_jax.eval.figure_metrics import evaluate_figures
from magicpose_jax.export import TrainedModel, load_run
from magicpose_jax.inference import AnimateOptions
from magicpose_jax.inference import animate as animate_frames

__all__ = ["TrainedModel", "animate", "holdout_pairs", "load_trained", "report", "retarget", "summary",
           "synthetic_source"]


def load_trained(workdir: str) -> TrainedModel:
  """The newest checkpoint of a "stage1"/"stage2" training run in `workdir`, with its frozen base."""
  model = load_run(workdir)
  if model.info["stage"] == "base":
    raise ValueError(f"{workdir}: a 'base' run has no appearance or pose net; pass a stage1/stage2 run")
  return model


def animate(model: TrainedModel, reference: np.ndarray, poses: np.ndarray, sampler: SamplerConfig, *,
            seed: int = 0, batch_frames: int = 4) -> np.ndarray:
  """Frames of the figure in `reference` in each pose: `inference.animate` (the `animate` CLI's sampler, reference
  states cached for all steps, one initial noise shared by the frames), also for the ablations' models.

  Args:
    reference: uint8 [S, S, 3] (S = the model's image size).
    poses: uint8 [F, S, S, 3] pose renders.
    sampler: DDIM steps and guidance (`guidance=1` is no classifier-free guidance; eta must be 0).
    seed: the initial noise.
    batch_frames: frames per sampler call (keep it fixed: every call of one shape shares a compilation).

  Returns:
    uint8 [F, S, S, 3].
  """
  if sampler.eta != 0 or sampler.pose_guidance is not None:
    raise ValueError(f"animate: DDIM with eta 0 and one guidance scale only, got {sampler}")
  options = AnimateOptions(steps=sampler.num_steps, guidance=sampler.guidance, seed=seed, batch_frames=batch_frames)
  return animate_frames(model, reference, poses, options)


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


def sampling_seed(draw: int) -> int:
  """`retarget`'s `seed` for sampling draw `draw` (0, 1, 2, ...). `retarget` draws identity i's noise from
  seed + i, so the draws are spaced by more than any identity index (the demo's 100,000 identities): no two draws
  share an identity's noise. Draw 0 is the demo's own."""
  return draw * 100_003

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
                ("mean_iou", "pose mIoU", "higher"), ("identity_error", "identity err", "lower"),
                ("face_l1", "face L1", "lower"), ("eye_state", "eyes", "higher"))


def summary(metrics: dict) -> dict[str, float]:
  """The headline numbers of an `evaluate_figures` dict."""
  return {key: float(metrics[key]) for key, _, _ in SUMMARY_KEYS}


def report(metrics: dict) -> dict:
  """What the demo and the fidelity benchmark record per model: `summary` plus the per-part IoU, the per-region
  colour error and the number of images."""
  return {**summary(metrics), "part_iou": metrics["part_iou"], "region_error": metrics["region_error"],
          "num_images": metrics["num_images"]}


# The benchmarks' Markdown columns: the headline numbers (L1 aside) and the colour error per region.
MARKDOWN_COLUMNS = ("PSNR", "SSIM", "pose mIoU", "identity err", "face L1", "eyes", "clothes", "skin", "hair",
                    "background")


def markdown_header(labels: Sequence[str]) -> str:
  """The header and rule of a Markdown table whose rows are `markdown_row`s with these leading labels."""
  return (f"| {' | '.join([*labels, *MARKDOWN_COLUMNS])} |\n"
          f"|{'---|' * len(labels)}{'---:|' * len(MARKDOWN_COLUMNS)}")


def markdown_row(labels: Sequence[str], metrics: dict) -> str:
  """A Markdown row of an `evaluate_figures` dict (`MARKDOWN_COLUMNS`) after the text cells `labels`."""
  psnr, *rest = markdown_values(metrics)
  cells = [*labels, f"{psnr:.2f}", *(f"{v:.3f}" for v in rest)]
  return f"| {' | '.join(cells)} |"


def markdown_values(metrics: dict) -> list[float]:
  """The `MARKDOWN_COLUMNS` values of an `evaluate_figures` dict (or a `report`), in order."""
  r = metrics["region_error"]
  return [metrics["psnr"], metrics["ssim"], metrics["mean_iou"], metrics["identity_error"], metrics["face_l1"],
          metrics["eye_state"], r["clothes"], r["skin"], r["hair"], r["background"]]


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
