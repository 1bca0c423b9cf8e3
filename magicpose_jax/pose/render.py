"""Pose images in the style of ControlNet 1.1's OpenPose annotator (`annotator/openpose/util.py`).

What a pose-conditioned model (ControlNet OpenPose, MagicPose's pose net) was trained to read, reproduced
pixel for pixel on the rules of that code:
  1. black canvas;
  2. body limbs: for each of the 17 limbs (in order, every person), a filled polygon from `cv2.ellipse2Poly`
     around the limb (half-axes: half its length and stick width 4) in the limb's colour; then the whole canvas
     is scaled by 0.6 (so limbs come out at 60 % of their colour);
  3. body joints: filled circles of radius 4 in the joint's full colour;
  4. hands: 20 edges of thickness 2 coloured by HSV hue edge/20, then the 21 keypoints as filled circles of
     radius 4 coloured (0, 0, 255);
  5. face: the landmarks as white filled circles of radius 3.
The canvas is RGB (ControlNet 1.1 hands it to the model as is), so the hand dots, (0, 0, 255) in the code, are
blue; MAGICPOSE.md calls them red after the BGR original of the OpenPose code.

`scale` (default 1: ControlNet's SD-size strokes, pixel for pixel) multiplies every stick width, line thickness
and dot radius (rounded; sticks, joints and hand lines keep at least 1 pixel, dots of radius 0 are one pixel): at
64 px, SD's 4-pixel stick half-widths and radii cover the whole figure; `scale = size / 512` draws it as an SD-size
pose render scaled down.

Keypoints with confidence <= `threshold` are not drawn (nor are limbs/edges touching them). Coordinates are
truncated to integers as ControlNet does; like its `x > eps` test, hand and face points at x < 1 or y < 1
(truncated) are skipped. ControlNet stores coordinates divided by the image size and multiplies back; we keep
pixels, which can differ from its output by one pixel where that round trip loses an ulp.

`supersample=k` leaves those rules for small canvases: the pose is drawn by them at k times the size (strokes at
k times `scale`) and area-averaged down, so every stroke keeps its place to 1/k pixel, anti-aliased. Truncating a
point moves it by under 0.2 % of a 512 px frame but up to 1.6 % of a 64 px one, more than pixel metrics there allow
(a figure drawn 1 px off scores 20-21.5 dB PSNR against itself), and at 64 px the face's dots of radius 0 all fall
on a few pixels: a white blob without eyes or mouth. Such renders are for models trained on them (the demo's); a
ControlNet trained on OpenPose's renders reads the default, `supersample=1`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np

from magicpose_jax.pose.keypoints import Pose

DEFAULT_THRESHOLD = 0.3  # DWPose's visibility cut; OpenPose JSON of missing keypoints has confidence 0
STICK_WIDTH = 4
JOINT_RADIUS = 4
HAND_THICKNESS = 2
HAND_DOT_RADIUS = 4
HAND_DOT_COLOR = (0, 0, 255)
FACE_DOT_RADIUS = 3
FACE_DOT_COLOR = (255, 255, 255)
LIMB_SCALE = 0.6

# The 17 drawn limbs as (joint, joint) in COCO-18 indices; limb i has colour BODY_COLORS[i].
BODY_LIMBS = (
  (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
  (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
# One RGB colour per joint (and per limb): the hue wheel in 18 steps.
BODY_COLORS = (
  (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
  (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
  (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# Wrist to each finger tip: thumb, index, middle, ring, pinky.
HAND_EDGES = tuple((0 if j % 4 == 0 else j, j + 1) for j in range(20))


def hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
  """HSV in [0, 1] -> RGB in [0, 1], with the same floating-point steps as matplotlib's `hsv_to_rgb`."""
  i = int(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
  return ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i % 6]


# Float colours, as ControlNet passes them: OpenCV rounds them to the nearest integer (ties to even).
HAND_EDGE_COLORS = tuple(tuple(c * 255.0 for c in hsv_to_rgb(e / len(HAND_EDGES), 1.0, 1.0))
                         for e in range(len(HAND_EDGES)))


# ControlNet's `(canvas * 0.6).astype(np.uint8)` as a lookup table: the same bytes, without float images.
_LIMB_LUT = (np.arange(256) * LIMB_SCALE).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class _Strokes:
  """Pixel sizes of one render (`render`'s `scale` applied to the SD-size constants)."""

  stick: int = STICK_WIDTH
  joint: int = JOINT_RADIUS
  hand: int = HAND_THICKNESS
  hand_dot: int = HAND_DOT_RADIUS
  face_dot: int = FACE_DOT_RADIUS

  @classmethod
  def scaled(cls, scale: float) -> _Strokes:
    at_least_one = lambda v: max(1, round(v * scale))
    return cls(at_least_one(STICK_WIDTH), at_least_one(JOINT_RADIUS), at_least_one(HAND_THICKNESS),
               round(HAND_DOT_RADIUS * scale), round(FACE_DOT_RADIUS * scale))


def _draw_body(canvas: np.ndarray, bodies: Sequence[np.ndarray], threshold: float, strokes: _Strokes) -> np.ndarray:
  drawn = False
  for limb, color in zip(BODY_LIMBS, BODY_COLORS, strict=False):
    for body in bodies:
      a, b = body[limb[0]], body[limb[1]]
      if a[2] <= threshold or b[2] <= threshold:
        continue
      xs, ys = (float(a[0]), float(b[0])), (float(a[1]), float(b[1]))
      length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
      angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
      center = (int((xs[0] + xs[1]) / 2), int((ys[0] + ys[1]) / 2))
      polygon = cv2.ellipse2Poly(center, (int(length / 2), strokes.stick), int(angle), 0, 360, 1)
      cv2.fillConvexPoly(canvas, polygon, color)
      drawn = True
  if drawn:
    canvas = cv2.LUT(canvas, _LIMB_LUT)
  for j, color in enumerate(BODY_COLORS):
    for body in bodies:
      if body[j, 2] > threshold:
        cv2.circle(canvas, (int(body[j, 0]), int(body[j, 1])), strokes.joint, color, thickness=-1)
  return canvas


def _points(kp: np.ndarray, threshold: float) -> list[tuple[int, int] | None]:
  """Integer points of the drawable keypoints; None for those not drawn."""
  out = []
  for x, y, c in kp.tolist():
    ix, iy = int(x), int(y)
    out.append((ix, iy) if c > threshold and ix > 0 and iy > 0 else None)
  return out


def _draw_hand(canvas: np.ndarray, hand: np.ndarray, threshold: float, strokes: _Strokes) -> None:
  pts = _points(hand, threshold)
  for (i, j), color in zip(HAND_EDGES, HAND_EDGE_COLORS, strict=True):
    if pts[i] is not None and pts[j] is not None:
      cv2.line(canvas, pts[i], pts[j], color, thickness=strokes.hand)
  for p in pts:
    if p is not None:
      cv2.circle(canvas, p, strokes.hand_dot, HAND_DOT_COLOR, thickness=-1)


def _draw_face(canvas: np.ndarray, face: np.ndarray, threshold: float, strokes: _Strokes) -> None:
  for p in _points(face, threshold):
    if p is not None:
      cv2.circle(canvas, p, strokes.face_dot, FACE_DOT_COLOR, thickness=-1)


def render(poses: Pose | Sequence[Pose], height: int, width: int, *,
           threshold: float = DEFAULT_THRESHOLD, scale: float = 1.0, supersample: int = 1) -> np.ndarray:
  """Draws people as ControlNet's OpenPose annotator does (body, hands and face in one image).

  Args:
    poses: one pose or a sequence of poses, in pixel coordinates of the [height, width] image.
    height, width: canvas size.
    threshold: keypoints with confidence <= threshold are not drawn.
    scale: stroke widths and dot radii relative to ControlNet's (1: SD size; e.g. `height / 512` for small
      canvases).
    supersample: drawn at this many times the size (and `scale`) and area-averaged down (see the module docstring;
      1: ControlNet's render).

  Returns:
    uint8 [height, width, 3] RGB image, black where nothing is drawn.
  """
  if isinstance(poses, Pose):
    poses = [poses]
  for i, p in enumerate(poses):
    if not isinstance(p, Pose):
      raise TypeError(f"render: poses[{i}] is a {type(p).__name__}, expected a Pose")
  if height <= 0 or width <= 0:
    raise ValueError(f"render: height and width must be positive, got {height}x{width}")
  if not scale > 0:
    raise ValueError(f"render: scale must be positive, got {scale}")
  if isinstance(supersample, bool) or not isinstance(supersample, int) or supersample < 1:
    raise ValueError(f"render: supersample must be an integer >= 1, got {supersample!r}")
  if supersample > 1:
    # Pixel i of the canvas (centred on i, as the synthetic figures are drawn) is pixels k*i .. k*i + k-1 of the
    # big one, whose truncated points cover [j, j + 1): x -> k * (x + 1/2).
    k = supersample
    big = [p.map(lambda a: a * np.array([k, k, 1], np.float32) + np.array([k / 2, k / 2, 0], np.float32))
           for p in poses]
    canvas = render(big, height * k, width * k, threshold=threshold, scale=scale * k)
    return cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
  strokes = _Strokes() if scale == 1.0 else _Strokes.scaled(scale)
  # Confidences are float32: compare in float32, so a confidence written as the threshold is not drawn.
  threshold = float(np.float32(threshold))
  canvas = np.zeros((height, width, 3), np.uint8)
  canvas = _draw_body(canvas, [p.body for p in poses], threshold, strokes)
  for p in poses:
    for hand in p.hands:
      _draw_hand(canvas, hand, threshold, strokes)
  for p in poses:
    _draw_face(canvas, p.face, threshold, strokes)
  return canvas
