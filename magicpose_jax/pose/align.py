"""Pose alignment: the driving skeleton rescaled to the reference person's proportions (after MusePose's
`pose_align.py`, re-derived here).

    aligned, report = align_poses(driving, reference)

For each limb of the COCO-18 kinematic tree (neck -> nose -> eyes/ears, neck -> shoulders -> elbows -> wrists ->
hands, neck -> hips -> knees -> ankles, nose -> face) a scale `reference length / driving length` is measured
once, on the first driving frame that holds a person (the anchor frame); left and right limbs share the mean of
their two scales (a limb missing on one side takes the other's; missing on both, the median of all scales).
Every frame is then rebuilt from the neck outwards: each joint = its parent's new position + scale x (joint -
parent) in the driving frame, so angles are the dancer's and lengths the reference's. Hands follow their wrist
(scaled by the hand scale: wrist-to-knuckle distances when both hands are seen, else the forearm's), the 70 face
points follow the nose (face scale: ear distance, else eye distance). Finally the neck's path is mapped: the
anchor frame's neck lands on the reference's neck and later motion is scaled by the median limb scale, so the
output is in the reference image's pixels (its canvas).

Frames without a person stay empty poses and are listed in the report (nothing is dropped); a joint missing
in a frame stays missing, and a present joint whose parent is missing moves by the neck mapping alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from magicpose_jax.pose.keypoints import Pose

NECK, NOSE = 1, 0
R_WRIST, L_WRIST = 4, 7
# (parent, child, limb name) in tree order (a parent is placed before its children).
TREE = (
  (1, 0, "neck"),
  (0, 14, "face"), (0, 15, "face"), (14, 16, "face"), (15, 17, "face"),
  (1, 2, "shoulder"), (1, 5, "shoulder"),
  (2, 3, "upper_arm"), (5, 6, "upper_arm"),
  (3, 4, "forearm"), (6, 7, "forearm"),
  (1, 8, "torso"), (1, 11, "torso"),
  (8, 9, "thigh"), (11, 12, "thigh"),
  (9, 10, "shin"), (12, 13, "shin"),
)
LIMBS = ("neck", "face", "shoulder", "upper_arm", "forearm", "hand", "torso", "thigh", "shin")
# The pairs (a, b) whose length defines each limb's scale (both sides for bilateral limbs).
_LENGTHS = {
  "neck": ((1, 0),),
  "shoulder": ((1, 2), (1, 5)),
  "upper_arm": ((2, 3), (5, 6)),
  "forearm": ((3, 4), (6, 7)),
  "torso": ((1, 8), (1, 11)),
  "thigh": ((8, 9), (11, 12)),
  "shin": ((9, 10), (12, 13)),
}
_FACE_LENGTHS = ((16, 17), (14, 15))  # ears, else eyes
_HAND_LENGTHS = ((0, 5), (0, 9), (0, 13), (0, 17))  # wrist to the knuckles


@dataclasses.dataclass(frozen=True)
class AlignOptions:
  """threshold: a keypoint counts when its confidence is above this (the render threshold)."""

  threshold: float = 0.3


def has_person(pose: Pose | None, threshold: float = 0.3) -> bool:
  return pose is not None and bool((pose.body[:, 2] > threshold).any())


def _length(kp: np.ndarray, a: int, b: int, threshold: float) -> float | None:
  if kp[a, 2] > threshold and kp[b, 2] > threshold:
    d = float(np.hypot(*(kp[a, :2] - kp[b, :2])))
    return d if d > 0 else None
  return None


def _ratio(ref: np.ndarray, drv: np.ndarray, pairs, threshold: float) -> list[float]:
  out = []
  for a, b in pairs:
    r, d = _length(ref, a, b, threshold), _length(drv, a, b, threshold)
    if r is not None and d is not None:
      out.append(r / d)
  return out


def limb_scales(driving: Pose, reference: Pose, threshold: float = 0.3) -> dict[str, float]:
  """Per-limb scale `reference length / driving length` (see the module docstring for the fallbacks)."""
  scales: dict[str, float | None] = {}
  for limb, pairs in _LENGTHS.items():
    ratios = _ratio(reference.body, driving.body, pairs, threshold)
    scales[limb] = float(np.mean(ratios)) if ratios else None
  face = None
  for pair in _FACE_LENGTHS:  # the first pair seen in both wins: ears are the wider, steadier measure
    ratios = _ratio(reference.body, driving.body, (pair,), threshold)
    if ratios:
      face = ratios[0]
      break
  scales["face"] = face
  hand = []
  for side in range(2):
    hand += _ratio(reference.hands[side], driving.hands[side], _HAND_LENGTHS, threshold)
  scales["hand"] = float(np.mean(hand)) if hand else scales["forearm"]
  known = [v for v in scales.values() if v is not None]
  if not known:
    raise ValueError("align: the reference and the anchor driving frame share no limb (no two keypoints seen in "
                     "both); cannot measure the proportions")
  fallback = float(np.median(known))
  return {limb: (scales[limb] if scales[limb] is not None else fallback) for limb in LIMBS}


def _rebuild(pose: Pose, scales: dict[str, float], neck_map, threshold: float) -> Pose:
  """One frame rebuilt along the tree; neck_map(points [..., 2]) -> the global placement of unanchored points."""
  src = pose.body
  seen = src[:, 2] > threshold
  body = src.copy()
  placed = np.zeros(len(src), bool)
  if seen[NECK]:
    body[NECK, :2] = neck_map(src[NECK, :2])
    placed[NECK] = True
  for parent, child, limb in TREE:
    if not seen[child]:
      continue
    if placed[parent]:
      body[child, :2] = body[parent, :2] + scales[limb] * (src[child, :2] - src[parent, :2])
    else:
      body[child, :2] = neck_map(src[child, :2])
    placed[child] = True
  body[~seen] = 0.0

  def carried(points: np.ndarray, anchor: int, scale: float) -> np.ndarray:
    out = points.copy()
    vis = points[:, 2] > threshold
    if placed[anchor]:
      out[:, :2] = body[anchor, :2] + scale * (points[:, :2] - src[anchor, :2])
    else:
      out[:, :2] = neck_map(points[:, :2])
    out[~vis] = 0.0
    return out

  hands = np.stack([carried(pose.hands[0], L_WRIST, scales["hand"]), carried(pose.hands[1], R_WRIST, scales["hand"])])
  face = carried(pose.face, NOSE, scales["face"])
  return Pose(body, hands, face)


def align_poses(driving: Sequence[Pose | None], reference: Pose,
                options: AlignOptions = AlignOptions()) -> tuple[list[Pose], dict]:
  """The driving poses rescaled to the reference's proportions and placed on its canvas.

  Args:
    driving: one pose per frame (None or a pose without body keypoints: no person), in the video's pixels.
    reference: the reference person's pose, in the reference image's pixels.

  Returns:
    (aligned poses, one per frame, in the reference image's pixels; report). The report holds `frames`,
    `anchor_frame` (whose scales are used), `no_person` (frame indices, left as empty poses) and `scales`.
  """
  t = options.threshold
  if not has_person(reference, t):
    raise ValueError("align: the reference pose holds no person (no body keypoint above the threshold)")
  no_person = [i for i, p in enumerate(driving) if not has_person(p, t)]
  report = {"frames": len(driving), "no_person": no_person, "anchor_frame": None, "scales": None}
  if len(no_person) == len(driving):
    return [Pose.empty() for _ in driving], report
  anchor = next(i for i, p in enumerate(driving) if has_person(p, t))
  first = driving[anchor]
  scales = limb_scales(first, reference, t)
  global_scale = float(np.median(list(scales.values())))
  # The neck's placement: the anchor frame's neck onto the reference's (or, lacking either neck, the mean of the
  # keypoints both see), later motion scaled by the global scale.
  both = (first.body[:, 2] > t) & (reference.body[:, 2] > t)
  if both[NECK]:
    src_origin, dst_origin = first.body[NECK, :2], reference.body[NECK, :2]
  elif both.any():
    src_origin, dst_origin = first.body[both, :2].mean(0), reference.body[both, :2].mean(0)
  else:
    src_origin = first.body[first.body[:, 2] > t, :2].mean(0)
    dst_origin = reference.body[reference.body[:, 2] > t, :2].mean(0)

  def neck_map(points: np.ndarray) -> np.ndarray:
    return dst_origin + global_scale * (points - src_origin)

  empty = set(no_person)
  aligned = [Pose.empty() if i in empty else _rebuild(p, scales, neck_map, t) for i, p in enumerate(driving)]
  report.update(anchor_frame=anchor, scales=scales, global_scale=global_scale)
  return aligned, report
