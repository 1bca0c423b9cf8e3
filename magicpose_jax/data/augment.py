"""Training augmentation: random resized crops (target and pose together) and an optional horizontal flip.

As in the paper: a random resized crop to the output size with scale in [0.9, 1.0] and aspect 1. The crop of the
target and the pose image is the *same* box (the release crops them independently, which misaligns the pose and
the target); the reference gets its own box. The keypoints of the target follow its box (`pose.crop_resize`).

Crop boxes are squares of side `sqrt(scale) * min(H, W)` at a uniform position (for a square image this is
torchvision's `RandomResizedCrop(scale, ratio=(1, 1))`), snapped to whole pixels so the image crop and the keypoint
transform are the same map. Resizing is bilinear, or area-averaging when shrinking (bilinear aliases below 1/2).

Flip (off by default; applied to the target and its pose together, with probability `flip_prob`): mirroring a
render would keep the left limbs in the right limbs' colours, so when keypoints are known the pose image is
re-rendered from the flipped keypoints (`pose.flip_horizontal`); only without keypoints is the pose image mirrored.

With augmentation disabled every image is centre-cropped to a square and resized to the output size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np

from magicpose_jax.pose.keypoints import Pose, crop_resize, flip_horizontal
from magicpose_jax.pose.regions import head_mask
from magicpose_jax.pose.render import render

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), pixels, x1/y1 exclusive


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Attributes:
    enabled: False = no augmentation (centre crop + resize): the paper's "no data augmentation" ablation.
    crop_scale: (min, max) fraction of the image's square area the random crop covers.
    flip: horizontal flip of target and pose (re-rendered from flipped keypoints when the frame has keypoints).
    flip_prob: probability of the flip when `flip` is on.
  """

  enabled: bool = True
  crop_scale: tuple[float, float] = (0.9, 1.0)
  flip: bool = False
  flip_prob: float = 0.5

  def __post_init__(self):
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"AugmentConfig.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
    if not 0 <= self.flip_prob <= 1:
      raise ValueError(f"AugmentConfig.flip_prob must be in [0, 1], got {self.flip_prob}")


def center_box(height: int, width: int) -> Box:
  """The largest centred square of an `height` x `width` image."""
  side = min(height, width)
  x0, y0 = (width - side) // 2, (height - side) // 2
  return x0, y0, x0 + side, y0 + side


def random_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float]) -> Box:
  """A square of area `s * min(H, W)**2`, `s ~ U(scale)`, at a uniform position inside the image."""
  s = rng.uniform(scale[0], scale[1])
  side = max(1, min(round(math.sqrt(s) * min(height, width)), height, width))
  x0 = int(rng.integers(width - side + 1))
  y0 = int(rng.integers(height - side + 1))
  return x0, y0, x0 + side, y0 + side


def crop_resize_image(image: np.ndarray, box: Box, size: int) -> np.ndarray:
  """`image[y0:y1, x0:x1]` resized to `[size, size, C]` (bilinear; area-averaging when shrinking)."""
  x0, y0, x1, y1 = box
  crop = image[y0:y1, x0:x1]
  if crop.shape[:2] == (size, size):
    return np.ascontiguousarray(crop)
  shrink = (y1 - y0) > size
  return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def crop_poses(poses: Sequence[Pose] | None, box: Box, size: int) -> list[Pose] | None:
  """Keypoints following `crop_resize_image(·, box, size)`."""
  if poses is None:
    return None
  return [crop_resize(p, tuple(float(v) for v in box), (size, size)) for p in poses]


def augment_example(rng: np.random.Generator, reference: np.ndarray, target: np.ndarray, pose_image: np.ndarray,
                    poses: Sequence[Pose] | None, size: int, config: AugmentConfig,
                    pose_scale: float = 1.0, with_head_mask: bool = False, pose_supersample: int = 1) -> dict:
  """One training example's images at the output size.

  Args:
    rng: the example's generator (every draw comes from it, so the example is a function of it).
    reference, target: uint8 [H, W, 3] RGB (the two frames may differ in size).
    pose_image: uint8 [H, W, 3], the target's pose render, aligned with `target`.
    poses: the target's keypoints in `target`'s pixels, or None (a pose map without keypoints).
    size: output side.
    config: the augmentation.
    pose_scale, pose_supersample: `render`'s `scale` and `supersample` of `pose_image`, for the flipped pose's
      render.
    with_head_mask: also return "head_mask".
  Returns:
    "reference", "target", "pose": uint8 [size, size, 3]; with `with_head_mask` also "head_mask" uint8
    [size, size]: 1 inside the target's heads (`pose.regions.head_mask` of its cropped, flipped keypoints; all 0
    without keypoints).
  """
  if pose_image.shape[:2] != target.shape[:2]:
    raise ValueError(f"augment_example: pose image {pose_image.shape} and target {target.shape} differ in size")
  if config.enabled:
    target_box = random_box(rng, *target.shape[:2], config.crop_scale)
    reference_box = random_box(rng, *reference.shape[:2], config.crop_scale)
  else:
    target_box, reference_box = center_box(*target.shape[:2]), center_box(*reference.shape[:2])
  out = {
      "reference": crop_resize_image(reference, reference_box, size),
      "target": crop_resize_image(target, target_box, size),
      "pose": crop_resize_image(pose_image, target_box, size),
  }
  flip = config.enabled and config.flip and rng.uniform() < config.flip_prob
  # The keypoints are moved only where something reads them: the flipped pose's render, the head mask.
  cropped = crop_poses(poses, target_box, size) if flip or with_head_mask else None
  if flip:
    out["target"] = np.ascontiguousarray(out["target"][:, ::-1])
    if cropped is None:
      out["pose"] = np.ascontiguousarray(out["pose"][:, ::-1])
    else:
      cropped = [flip_horizontal(p, size) for p in cropped]
      out["pose"] = render(cropped, size, size, scale=pose_scale, supersample=pose_supersample)
  if with_head_mask:
    out["head_mask"] = head_mask(cropped, size, size)
  return out
