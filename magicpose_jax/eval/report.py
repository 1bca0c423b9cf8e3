"""Evaluating folders of generated frames against ground truth, and the report (JSON + Markdown) that records how.

Per frame: L1, PSNR, SSIM, LPIPS; over the set: FID. FID-VID and FVD are not implemented (skipped with a message).
LPIPS and FID need local weight files (`--weights DIR`); without them they are skipped with a message that names
the files and where to get them. Every report records the resolution, frame count, frame rate (if given), metric
settings, weights and package versions: FID-family numbers move with all of these.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Sequence

import numpy as np

from magicpose_jax.eval import fid as fid_lib
from magicpose_jax.eval import lpips as lpips_lib
from magicpose_jax.eval.folders import FramePair, pair_frames, read_pair
from magicpose_jax.eval.image_metrics import PSNR_MAX_DB, SSIM_K1, SSIM_K2, SSIM_SIGMA, l1, psnr, ssim

PER_FRAME_METRICS = ("l1", "psnr", "ssim", "lpips")
SET_METRICS = ("fid",)
VIDEO_METRICS = ("fid_vid", "fvd")
METRICS = PER_FRAME_METRICS + SET_METRICS + VIDEO_METRICS
DEFAULT_METRICS = ("l1", "psnr", "ssim", "lpips", "fid")
_VIDEO_SKIP = ("not implemented in magicpose_jax (they need DisCo's I3D / 3D-ResNeXt video networks); run DisCo's "
               "evaluation scripts on the same folders and record the frame rate and package versions beside it")
_PACKAGES = ("magicpose_jax", "jax", "jaxlib", "numpy", "pillow", "opencv-python-headless", "safetensors", "torch")


def _settings(metrics: Sequence[str], lpips_model: lpips_lib.Lpips | None,
              inception: fid_lib.Inception | None) -> dict:
  out = {}
  if "l1" in metrics:
    out["l1"] = "mean |pred - gt| over pixels and RGB on the [0, 1] scale (as DisCo); lower is better"
  if "psnr" in metrics:
    out["psnr"] = f"dB, data range 255, MSE over pixels and RGB, capped at {PSNR_MAX_DB:g} dB; higher is better"
  if "ssim" in metrics:
    out["ssim"] = (f"Wang et al. 2004: gaussian window sigma {SSIM_SIGMA} (11 taps), K1 {SSIM_K1}, K2 "
                   f"{SSIM_K2}, data range 255, population covariance, mean over RGB channels, 5-pixel border left "
                   "out (= skimage structural_similarity(gaussian_weights=True, sigma=1.5, "
                   "use_sample_covariance=False, data_range=255)); higher is better")
  if lpips_model is not None:
    out["lpips"] = {"version": "0.1", "net": lpips_model.net, "weights": lpips_model.source,
                    "input": "native resolution, [-1, 1]", "better": "lower"}
  if inception is not None:
    out["fid"] = {"features": "InceptionV3 pool3 (TF FID Inception, pytorch-fid port)", "weights": inception.source,
                  "resize": "bilinear to 299x299, no antialiasing (pytorch-fid; clean-fid uses PIL bicubic)",
                  "better": "lower"}
  return out


def source_commit(mark_dirty: bool = True) -> str | None:
  """The git commit of the source tree this package runs from (with `mark_dirty`, `+dirty` when tracked files have
  uncommitted changes), or None when git cannot tell (e.g. a pip-installed copy). Read-only; what reports and
  benchmarks record."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    git = lambda *args: subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10,
                                       check=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    dirty = mark_dirty and git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "")


def _source_version() -> str:
  """Run from a source tree (not pip-installed): its git commit, when git can tell."""
  commit = source_commit(mark_dirty=False)
  return f"source tree, git {commit}" if commit else "source tree (commit unknown)"


def package_versions() -> dict[str, str]:
  """Versions of the packages the numbers depend on (and Python, and the JAX backend)."""
  out = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = _source_version() if name == "magicpose_jax" else "not installed"
  import jax  # noqa: PLC0415  (after the metadata: importing jax starts its backends)

  out["jax_backend"] = jax.default_backend()
  return out


def _networks(metrics: Sequence[str], weights_dir: str | None, lpips_net: str, lpips_model, inception,
              skipped: dict[str, str]):
  """The LPIPS / FID networks the metrics need: given ones, else read from `weights_dir`, else a skip message."""
  if "lpips" in metrics and lpips_model is None:
    try:
      lpips_model = lpips_lib.load_lpips(lpips_net, *lpips_lib.find_lpips_weights(weights_dir, lpips_net))
    except lpips_lib.MissingWeights as e:
      skipped["lpips"] = f"skipped: {e}"
  if "fid" in metrics and inception is None:
    try:
      inception = fid_lib.load_inception(fid_lib.find_inception_weights(weights_dir))
    except lpips_lib.MissingWeights as e:
      skipped["fid"] = f"skipped: {e}"
  return (lpips_model if "lpips" in metrics else None), (inception if "fid" in metrics else None)


def _check_metrics(metrics: Sequence[str]) -> list[str]:
  unknown = [m for m in metrics if m not in METRICS]
  if unknown or not metrics:
    raise ValueError(f"metrics: unknown {unknown}; choose from {', '.join(METRICS)}" if unknown else
                     f"metrics: none given; choose from {', '.join(METRICS)}")
  return list(dict.fromkeys(metrics))


def evaluate_folders(pred_dir: str, gt_dir: str, metrics: Sequence[str] = DEFAULT_METRICS, *,
                     weights_dir: str | None = None, fps: float | None = None, lpips_net: str = "alex",
                     batch_size: int = 16, lpips_model: lpips_lib.Lpips | None = None,
                     inception: fid_lib.Inception | None = None) -> dict:
  """Metrics of generated frames against ground truth, paired by file name (`folders.pair_frames`).

  Args:
    pred_dir, gt_dir: frame folders (images, recursively; one resolution throughout).
    metrics: names from `METRICS`; LPIPS/FID without weights and FID-VID/FVD are skipped with a message.
    weights_dir: folder with the LPIPS / FID weight files (`lpips.WEIGHT_FILES`, `fid.WEIGHT_STEM`).
    fps: the videos' frame rate, recorded (FID-VID/FVD depend on it).
    lpips_net: "alex" (LPIPS' default) or "vgg".
    batch_size: frames read and run through the networks at a time.
    lpips_model, inception: networks to use instead of reading `weights_dir` (tests pass random ones).

  Returns:
    The report: "metrics" (means; "fid" over the whole set), "per_frame" (name and per-frame values), "skipped"
    (metric -> why), "num_frames", "resolution" ([H, W]), "fps", "settings", "versions", "pred_dir", "gt_dir",
    "created".
  """
  metrics = _check_metrics(metrics)
  pairs = pair_frames(pred_dir, gt_dir)
  skipped = {m: f"skipped: FID-VID/FVD {_VIDEO_SKIP}" for m in metrics if m in VIDEO_METRICS}
  lpips_model, inception = _networks(metrics, weights_dir, lpips_net, lpips_model, inception, skipped)
  per_frame: list[dict] = []
  features: dict[str, list[np.ndarray]] = {"pred": [], "gt": []}
  shape = None
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    pred, gt, shape = _read_chunk(chunk, pairs[0], shape)
    values = {m: fn(pred, gt) for m, fn in (("l1", l1), ("psnr", psnr), ("ssim", ssim)) if m in metrics}
    if lpips_model is not None:
      values["lpips"] = lpips_lib.lpips(lpips_model, pred, gt, batch_size)
    if inception is not None:
      features["pred"].append(fid_lib.inception_features(inception, pred, batch_size))
      features["gt"].append(fid_lib.inception_features(inception, gt, batch_size))
    for i, pair in enumerate(chunk):
      per_frame.append({"name": pair.name, **{m: float(v[i]) for m, v in values.items()}})
  means = {m: float(np.mean([row[m] for row in per_frame])) for m in PER_FRAME_METRICS if m in per_frame[0]}
  if inception is not None:
    if len(pairs) < 2:
      skipped["fid"] = "skipped: FID needs at least 2 frames"
    else:
      means["fid"] = fid_lib.fid_from_features(np.concatenate(features["pred"]), np.concatenate(features["gt"]))
  settings = _settings(metrics, lpips_model, inception)
  if "fid" in means:
    settings["fid"]["num_images"] = len(pairs)
  return {
    "metrics": means, "skipped": skipped, "num_frames": len(pairs), "resolution": list(shape[:2]),
    "fps": fps, "settings": settings, "versions": package_versions(), "pred_dir": os.path.abspath(pred_dir),
    "gt_dir": os.path.abspath(gt_dir), "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "per_frame": per_frame,
  }


def _read_chunk(chunk: list[FramePair], first: FramePair, shape):
  pred, gt = zip(*(read_pair(pair) for pair in chunk), strict=True)
  shape = shape or pred[0].shape
  for pair, image in zip(chunk, pred, strict=True):
    if image.shape != shape:
      raise ValueError(f"frame {pair.name!r} is {image.shape[1]}x{image.shape[0]} but {first.name!r} is "
                       f"{shape[1]}x{shape[0]}: every frame must have one size")
  return np.stack(pred), np.stack(gt), shape


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _markdown(report: dict) -> str:
  height, width = report["resolution"]
  fps = "not given" if report["fps"] is None else f"{report['fps']:g}"
  lines = ["# Evaluation report", "", f"- generated: `{report['pred_dir']}`", f"- ground truth: `{report['gt_dir']}`",
           f"- frames: {report['num_frames']} at {width}x{height} (width x height), frame rate: {fps}",
           f"- created: {report['created']}", "", "| metric | value |", "|---|---|"]
  lines += [f"| {name} | {value:.6g} |" for name, value in report["metrics"].items()]
  if report["skipped"]:
    lines += ["", "## Skipped", ""] + [f"- **{name}**: {why}" for name, why in report["skipped"].items()]
  lines += ["", "## Settings", ""]
  for name, setting in report["settings"].items():
    text = setting if isinstance(setting, str) else "; ".join(f"{k}: {v}" for k, v in setting.items())
    lines.append(f"- **{name}**: {text}")
  lines += ["", "## Versions", "", "| package | version |", "|---|---|"]
  lines += [f"| {name} | {version} |" for name, version in report["versions"].items()]
  lines += ["", f"Per-frame values: report.json (`per_frame`, {report['num_frames']} rows).", ""]
  return "\n".join(lines)


def write_report(report: dict, out_dir: str) -> tuple[str, str]:
  """Writes `out_dir`/report.json and `out_dir`/report.md; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path, md_path = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")
  with open(json_path, "w") as f:
    json.dump(report, f, indent=2, allow_nan=False)
    f.write("\n")
  with open(md_path, "w") as f:
    f.write(_markdown(report))
  return json_path, md_path
