"""Image regions a pose implies: the head (face, forehead and hair) from the face landmarks or the body's head
points.

The training loss can weigh the head more than the rest of the frame (`config.head_loss_weight`): the face is a
few percent of a full-body frame, yet it carries the expression and most of what makes a person recognisable.
The region comes from the keypoints every training example already has, so it works on real videos as on the
synthetic figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from magicpose_jax.pose.keypoints import COCO18_NAMES, Pose

_CHIN = 8  # iBUG-68: the jaw's lowest point
_BROWS = slice(17, 27)
_LANDMARKS = slice(0, 68)  # the pupils add nothing to the outline
_MIN_LANDMARKS = 10  # fewer visible face landmarks: fall back to the body's head points
_HEAD_POINTS = tuple(COCO18_NAMES.index(n) for n in ("nose", "right_eye", "left_eye", "right_ear", "left_ear"))
# The head around the face landmarks (brows to chin, jaw to jaw), in units of the landmarks' height h and width w:
# the skull and hair rise 0.9 h above the brows, the region reaches 0.4 h below the jaw line (chin, jaw and the
# neck's top) and 0.3 w past it on each side (ears, hair). On the synthetic figures it covers 97 % of the true head
# (hair included) with 1.4x its area (tests/test_pose_regions.py).
_ABOVE, _BELOW, _SIDE = 0.9, 0.4, 0.6
# Without landmarks: a disc around the body's head points, of radius 0.75 x their largest distance (the ears are
# ~1.8 head radii apart; the hair adds a quarter).
_DISC = 0.75


def head_mask(poses: Sequence[Pose] | None, height: int, width: int) -> np.ndarray:
  """uint8 [height, width]: 1 inside the head of any of `poses` (pixel coordinates), else 0.

  Each head is an ellipse aligned with the face (its "up" runs from the chin to the brows): around the visible
  face landmarks, extended over the forehead and hair; from the nose, eyes and ears when fewer than 10 landmarks
  are visible; none when fewer than 2 of those are. None or no poses: all zeros.
  """
  mask = np.zeros((height, width), np.uint8)
  for pose in poses or ():
    ellipse = _head_ellipse(pose)
    if ellipse is not None:
      cv2.ellipse(mask, ellipse, 1, thickness=-1)
  return mask


_EYES = (slice(36, 42), slice(42, 48))  # iBUG-68: each eye's six outline points
_SUBPIXEL = 2  # cv2 fixed-point bits: outlines drawn to a quarter pixel


def eye_mask(poses: Sequence[Pose] | None, height: int, width: int) -> np.ndarray:
  """uint8 [height, width]: 1 on and inside each eye's outline (face landmarks 36-47, pixel coordinates) of any of
  `poses`, grown by one pixel (3 x 3), else 0. An eye whose six points are not all visible is left out.

  What a loss weighted there sees: the eye white, pupil and lids of an open eye, the lid line of a shut one, and
  the skin around them (an eye at 64 px is a few pixels; the ring keeps its edge in the mask when it is rounded).
  """
  mask = np.zeros((height, width), np.uint8)
  for pose in poses or ():
    for eye in _EYES:
      points = pose.face[eye]
      if not (points[:, 2] > 0).all():
        continue
      fixed = np.round(points[:, :2] * (1 << _SUBPIXEL)).astype(np.int32)
      cv2.fillPoly(mask, [fixed], 1, cv2.LINE_8, _SUBPIXEL)
      cv2.polylines(mask, [fixed], True, 1, 1, cv2.LINE_8, _SUBPIXEL)
  return cv2.dilate(mask, np.ones((3, 3), np.uint8))


def _head_ellipse(pose: Pose) -> tuple | None:
  """cv2's rotated rectangle ((cx, cy), (width, height), degrees) of one head, or None."""
  face = pose.face[_LANDMARKS]
  visible = face[:, 2] > 0
  if visible.sum() >= _MIN_LANDMARKS:
    return _around_landmarks(face, visible)
  points = pose.body[list(_HEAD_POINTS)]
  points = points[points[:, 2] > 0, :2]
  if len(points) < 2:
    return None
  radius = _DISC * float(np.max(np.linalg.norm(points[:, None] - points[None], axis=-1)))
  if radius <= 0:
    return None
  centre = points.mean(0)
  return (float(centre[0]), float(centre[1])), (2 * radius, 2 * radius), 0.0


def _around_landmarks(face: np.ndarray, visible: np.ndarray) -> tuple | None:
  up = np.array([0.0, -1.0])  # image y points down
  brows = face[_BROWS][face[_BROWS][:, 2] > 0, :2]
  if visible[_CHIN] and len(brows):
    direction = brows.mean(0) - face[_CHIN, :2]
    if np.linalg.norm(direction) > 0:
      up = direction / np.linalg.norm(direction)
  across = np.array([-up[1], up[0]])
  points = face[visible, :2]
  t, s = points @ up, points @ across
  h, w = float(t.max() - t.min()), float(s.max() - s.min())
  if h <= 0 or w <= 0:
    return None
  top, bottom = t.max() + _ABOVE * h, t.min() - _BELOW * h
  left, right = s.min() - _SIDE * w / 2, s.max() + _SIDE * w / 2
  centre = up * (top + bottom) / 2 + across * (left + right) / 2
  angle = float(np.degrees(np.arctan2(across[1], across[0])))
  return (float(centre[0]), float(centre[1])), (float(right - left), float(top - bottom)), angle
