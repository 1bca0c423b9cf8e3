"""Geometry of a detect-then-crop pose pipeline (BlazePose style): SSD anchors, box decoding, weighted NMS,
rotated regions of interest, crops and the projection of crop coordinates back to the image.

Coordinates here are continuous image coordinates: pixel (i, j) covers [j, j + 1) x [i, i + 1), so a point at
normalized position u of an image W pixels wide sits at u * W. (OpenPose keypoints use pixel indices, i.e. these
minus 0.5; `holistic.py` converts at the end.) A rotation is in radians, positive clockwise on screen (y points
down): a region rotated by `r` has its "up" direction at R(r) @ (0, -1), R the usual 2x2 rotation matrix.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class Rect:
  """A rotated rectangle in continuous image pixels: centre, size (before rotation), rotation (radians)."""

  cx: float
  cy: float
  width: float
  height: float
  rotation: float = 0.0

  def rotation_matrix(self) -> np.ndarray:
    c, s = math.cos(self.rotation), math.sin(self.rotation)
    return np.array([[c, -s], [s, c]])


def normalize_radians(angle: float) -> float:
  """The angle in [-pi, pi)."""
  return angle - 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))


def ssd_anchors(input_size: int, strides: tuple[int, ...], anchors_per_layer: int = 2) -> np.ndarray:
  """Anchor centres [N, 2] (x, y normalized to the input) of a single-scale SSD head, in the head's output order.

  Consecutive layers with the same stride share one feature map; each map cell holds `anchors_per_layer`
  anchors per such layer (BlazePose: one aspect ratio 1 plus its interpolated scale, both of fixed unit size,
  so only the centres matter). Order: layer group, row, column, anchor.
  """
  centres = []
  i = 0
  while i < len(strides):
    j = i
    while j < len(strides) and strides[j] == strides[i]:
      j += 1
    cells = math.ceil(input_size / strides[i])
    ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
    grid = np.stack([xs, ys], axis=-1).reshape(-1, 1, 2)
    centres.append(np.repeat(grid, anchors_per_layer * (j - i), axis=1).reshape(-1, 2))
    i = j
  return np.concatenate(centres).astype(np.float32)


def decode_boxes(raw: np.ndarray, anchors: np.ndarray, input_size: int) -> tuple[np.ndarray, np.ndarray]:
  """SSD regressions [N, 4 + 2K] (x, y, w, h, then K keypoints (x, y), in input pixels relative to the anchor)
  -> boxes [N, 4] (cx, cy, w, h) and keypoints [N, K, 2], normalized to the input.
  """
  raw = np.asarray(raw, np.float32) / input_size
  centre = raw[:, :2] + anchors
  boxes = np.concatenate([centre, raw[:, 2:4]], axis=1)
  keypoints = raw[:, 4:].reshape(len(raw), -1, 2) + anchors[:, None]
  return boxes, keypoints


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU [N] of one (cx, cy, w, h) box with boxes [N, 4]."""
  lo = np.maximum(box[:2] - box[2:] / 2, boxes[:, :2] - boxes[:, 2:] / 2)
  hi = np.minimum(box[:2] + box[2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2)
  inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
  union = np.prod(box[2:]) + np.prod(boxes[:, 2:], axis=1) - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 iou_threshold: float) -> list[tuple[float, np.ndarray, np.ndarray]]:
  """Blended non-maximum suppression, best first: each kept detection is the score-weighted mean of the boxes
  and keypoints that overlap the best remaining one by more than `iou_threshold`, with that best score.

  Returns [(score, box [4], keypoints [K, 2])].
  """
  order = list(np.argsort(-scores, kind="stable"))
  out = []
  while order:
    idx = np.array(order)
    overlap = box_iou(boxes[idx[0]], boxes[idx]) > iou_threshold
    overlap[0] = True
    group = idx[overlap]
    w = scores[group] / scores[group].sum()
    box, kps = (w[:, None] * boxes[group]).sum(0), (w[:, None, None] * keypoints[group]).sum(0)
    out.append((float(scores[idx[0]]), box, kps))
    order = list(idx[~overlap])
  return out


def rotation_to(start: np.ndarray, end: np.ndarray, target_degrees: float) -> float:
  """The rotation that turns the direction start -> end (image pixels) to `target_degrees` (90 = straight up)."""
  angle = math.atan2(-(end[1] - start[1]), end[0] - start[0])
  return normalize_radians(math.radians(target_degrees) - angle)


def rect_from_centre_and_scale_point(centre: np.ndarray, scale_point: np.ndarray, target_degrees: float) -> Rect:
  """A square of side 2 |scale_point - centre| around `centre`, rotated so centre -> scale_point is the target."""
  size = 2.0 * float(np.hypot(*(np.asarray(scale_point) - centre)))
  return Rect(float(centre[0]), float(centre[1]), size, size, rotation_to(centre, scale_point, target_degrees))


def rect_around(points: np.ndarray, rotation: float) -> Rect:
  """The axis-aligned bounding box of points [K, 2] with a rotation attached (its size is not re-fitted)."""
  lo, hi = points.min(0), points.max(0)
  return Rect(float(lo[0] + hi[0]) / 2, float(lo[1] + hi[1]) / 2, float(hi[0] - lo[0]), float(hi[1] - lo[1]),
              rotation)


def transform_rect(rect: Rect, scale: float, shift_y: float = 0.0, square_long: bool = True) -> Rect:
  """Shifts the centre by `shift_y` of the height along the rect's own down axis, makes it a square of its longer
  side, then scales it."""
  dx, dy = rect.rotation_matrix() @ np.array([0.0, rect.height * shift_y])
  w, h = rect.width, rect.height
  if square_long:
    w = h = max(w, h)
  return Rect(rect.cx + float(dx), rect.cy + float(dy), w * scale, h * scale, rect.rotation)


def crop_to_image_affine(rect: Rect, size: int) -> np.ndarray:
  """[2, 3] affine from crop pixel indices (size x size crop of `rect`) to image pixel indices (for cv2)."""
  a = rect.rotation_matrix() @ np.diag([rect.width / size, rect.height / size])
  b = np.array([rect.cx, rect.cy]) - a @ np.array([size / 2, size / 2])
  # Continuous coordinates are pixel indices + 0.5 on both sides.
  return np.concatenate([a, (a @ np.full(2, 0.5) + b - 0.5)[:, None]], axis=1)


def crop(image: np.ndarray, rect: Rect, size: int, replicate_border: bool = True) -> np.ndarray:
  """The `rect` region of `image` [H, W, C] resampled to [size, size, C] (bilinear), the rect's up pointing up.

  Outside the image: the edge pixels repeated (`replicate_border`) or zeros.
  """
  border = cv2.BORDER_REPLICATE if replicate_border else cv2.BORDER_CONSTANT
  return cv2.warpAffine(image, crop_to_image_affine(rect, size), (size, size),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=border, borderValue=0)


def project(points: np.ndarray, rect: Rect) -> np.ndarray:
  """Points [..., 2] normalized to the crop of `rect` ([0, 1] spans it) -> continuous image coordinates."""
  local = (np.asarray(points, np.float64) - 0.5) * np.array([rect.width, rect.height])
  return local @ rect.rotation_matrix().T + np.array([rect.cx, rect.cy])


def letterbox_rect(height: int, width: int) -> Rect:
  """The square around the whole image that a keep-aspect-ratio resize pads with zeros (centred)."""
  side = float(max(height, width))
  return Rect(width / 2, height / 2, side, side, 0.0)
