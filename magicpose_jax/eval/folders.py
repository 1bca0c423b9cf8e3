"""Frame folders for evaluation: generated and ground-truth frames paired by file name.

A frame's name is its path under the folder without the suffix (`video_01/0003` for `video_01/0003.png`), so
generated PNGs pair with ground-truth JPEGs and TikTok-style `<video>/<frame>` trees pair frame by frame.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_SHOW = 10  # names listed in an error


@dataclasses.dataclass(frozen=True)
class FramePair:
  """One generated frame and its ground truth: `name` (relative path without suffix) and the two file paths."""

  name: str
  pred: str
  gt: str


def list_frames(folder: str) -> dict[str, str]:
  """name -> path of every image under `folder` (recursive, suffixes `IMAGE_SUFFIXES`, any case)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"frame folder not found: {folder}")
  frames: dict[str, str] = {}
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for file in sorted(files):
      stem, suffix = os.path.splitext(file)
      if suffix.lower() not in IMAGE_SUFFIXES:
        continue
      name = os.path.relpath(os.path.join(root, stem), folder).replace(os.sep, "/")
      if name in frames:
        raise ValueError(f"{folder}: two images named {name!r} ({os.path.basename(frames[name])} and {file}); "
                         "frames pair by name without suffix")
      frames[name] = os.path.join(root, file)
  return frames


def _listing(names: list[str]) -> str:
  more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
  return ", ".join(names[:_SHOW]) + more


def pair_frames(pred_dir: str, gt_dir: str) -> list[FramePair]:
  """Pairs generated and ground-truth frames by name, sorted by name.

  Raises:
    FileNotFoundError: a folder does not exist.
    ValueError: a folder holds no images, or names that the other lacks (listed).
  """
  pred, gt = list_frames(pred_dir), list_frames(gt_dir)
  for label, folder, frames in (("--pred", pred_dir, pred), ("--gt", gt_dir, gt)):
    if not frames:
      raise ValueError(f"{label} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or below it")
  only_pred, only_gt = sorted(set(pred) - set(gt)), sorted(set(gt) - set(pred))
  if only_pred or only_gt:
    lines = [f"frames do not pair by name ({len(set(pred) & set(gt))} match):"]
    if only_pred:
      lines.append(f"  {len(only_pred)} only in --pred {pred_dir}: {_listing(only_pred)}")
    if only_gt:
      lines.append(f"  {len(only_gt)} only in --gt {gt_dir}: {_listing(only_gt)}")
    raise ValueError("\n".join(lines))
  return [FramePair(name, pred[name], gt[name]) for name in sorted(pred)]


def read_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB (grey and RGBA images are converted; alpha is dropped)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except OSError as e:
    raise ValueError(f"{path}: not a readable image ({e})") from None


def read_pair(pair: FramePair) -> tuple[np.ndarray, np.ndarray]:
  """(generated, ground truth) uint8 [H, W, 3], with an error naming both files if their sizes differ."""
  pred, gt = read_image(pair.pred), read_image(pair.gt)
  if pred.shape != gt.shape:
    raise ValueError(f"frame {pair.name!r}: size mismatch, {pair.pred} is {pred.shape[1]}x{pred.shape[0]} but "
                     f"{pair.gt} is {gt.shape[1]}x{gt.shape[0]} (width x height); resize the generated frames")
  return pred, gt
