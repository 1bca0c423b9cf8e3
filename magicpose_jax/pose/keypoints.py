"""Keypoint arrays of one person in the OpenPose layout, and the geometry that moves them with an image.

A `Pose` holds pixel coordinates `(x, y, confidence)`: body `[18, 3]` in OpenPose's COCO-18 order, hands
`[2, 21, 3]` (left, right; OpenPose's hand order: wrist, thumb 1-4, index 5-8, middle 9-12, ring 13-16,
pinky 17-20) and face `[70, 3]` (the 68 iBUG landmarks then the right and left pupils). A missing keypoint has
confidence 0; the functions here also zero its coordinates, as OpenPose writes it.

"Left" and "right" are the person's own sides (OpenPose's convention): for a person facing the camera the
right shoulder is on the image's left.

Also: BODY_25 -> COCO-18 (`body25_to_coco18`) and COCO-WholeBody-133 arrays as DWPose / rtmlib's `Wholebody`
produce them (`from_wholebody`, `to_wholebody`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

COCO18_NAMES = (
  "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
  "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "right_eye", "left_eye",
  "right_ear", "left_ear",
)
BODY25_NAMES = (
  "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
  "mid_hip", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "right_eye",
  "left_eye", "right_ear", "left_ear", "left_big_toe", "left_small_toe", "left_heel", "right_big_toe",
  "right_small_toe", "right_heel",
)
# COCO-18 joint i is BODY_25 joint BODY25_TO_COCO18[i]; BODY_25's mid-hip and feet have no COCO-18 joint.
BODY25_TO_COCO18 = np.array([BODY25_NAMES.index(n) for n in COCO18_NAMES], dtype=np.int32)

NUM_BODY, NUM_HAND, NUM_FACE = 18, 21, 70


def _mirror_permutation(names: Sequence[str]) -> np.ndarray:
  swapped = [n.replace("left", "@").replace("right", "left").replace("@", "right") for n in names]
  return np.array([names.index(n) for n in swapped], dtype=np.int32)


# Index permutations that a horizontal flip applies: keypoint i of the flipped pose is keypoint PERM[i] mirrored.
BODY_FLIP = _mirror_permutation(COCO18_NAMES)


def _face_flip() -> np.ndarray:
  # iBUG-68 mirror pairs (0-based): jaw, brows, nostrils, eyes (outer/inner corners, upper and lower lids),
  # outer and inner lips; the nose bridge and the lips' midline map to themselves. 68/69: the pupils.
  pairs = [(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
  pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
  pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67), (68, 69)]
  perm = np.arange(NUM_FACE, dtype=np.int32)
  for a, b in pairs:
    perm[a], perm[b] = b, a
  return perm


FACE_FLIP = _face_flip()

# COCO-WholeBody (133 keypoints: body 0-16, feet 17-22, face 23-90, left hand 91-111, right hand 112-132).
WHOLEBODY_FACE = slice(23, 91)
WHOLEBODY_LEFT_HAND = slice(91, 112)
WHOLEBODY_RIGHT_HAND = slice(112, 133)
# COCO-18 joint i is COCO-17 joint COCO17_TO_COCO18[i]; -1: the neck, which COCO lacks (mean of the shoulders).
COCO17_TO_COCO18 = np.array([0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3], dtype=np.int32)
_COCO17_SHOULDERS = (5, 6)


def _as_keypoints(value, shape: tuple[int, ...], field: str) -> np.ndarray:
  arr = np.asarray(value)
  if arr.shape != shape:
    raise ValueError(f"Pose.{field}: expected shape {list(shape)} (x, y, confidence), got {list(arr.shape)}")
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise TypeError(f"Pose.{field}: expected a real-valued array, got dtype {arr.dtype}")
  arr = np.array(arr, dtype=np.float32)  # a private copy: the pose must not change under its owner's feet
  if not np.isfinite(arr).all():
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
    raise ValueError(f"Pose.{field}: non-finite value {arr[bad]} at index {list(bad)}")
  arr.flags.writeable = False
  return arr


@dataclasses.dataclass(frozen=True, eq=False)
class Pose:
  """One person in pixel coordinates: (x, y, confidence); a missing keypoint has confidence 0.

  Attributes:
    body: [18, 3] float32, OpenPose COCO-18 order (`COCO18_NAMES`).
    hands: [2, 21, 3] float32, (left, right).
    face: [70, 3] float32, 68 iBUG landmarks + right and left pupils (OpenPose order).

  Arrays are converted to read-only float32 copies; wrong shapes or non-finite values raise.
  """

  body: np.ndarray
  hands: np.ndarray
  face: np.ndarray

  def __post_init__(self):
    object.__setattr__(self, "body", _as_keypoints(self.body, (NUM_BODY, 3), "body"))
    object.__setattr__(self, "hands", _as_keypoints(self.hands, (2, NUM_HAND, 3), "hands"))
    object.__setattr__(self, "face", _as_keypoints(self.face, (NUM_FACE, 3), "face"))

  @classmethod
  def empty(cls) -> Pose:
    """A pose with every keypoint missing."""
    return cls(np.zeros((NUM_BODY, 3)), np.zeros((2, NUM_HAND, 3)), np.zeros((NUM_FACE, 3)))

  def __eq__(self, other) -> bool:
    if not isinstance(other, Pose):
      return NotImplemented
    return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in ("body", "hands", "face"))

  __hash__ = None  # mutable-looking arrays inside: equal poses need not hash alike, so no hashing

  def map(self, fn) -> Pose:
    """Applies `fn([..., 3]) -> [..., 3]` to each of body, hands and face."""
    return Pose(fn(self.body), fn(self.hands), fn(self.face))


def body25_to_coco18(arr: np.ndarray) -> np.ndarray:
  """BODY_25 keypoints [25, 3] -> COCO-18 [18, 3] (drops the mid-hip and the six foot keypoints)."""
  arr = np.asarray(arr, dtype=np.float32)
  if arr.shape != (25, 3):
    raise ValueError(f"body25_to_coco18: expected [25, 3] BODY_25 keypoints, got {list(arr.shape)}")
  return arr[BODY25_TO_COCO18]


def flip_horizontal(pose: Pose, width: int) -> Pose:
  """The pose of the image flipped left-right (`image[:, ::-1]`): x -> width - 1 - x, left <-> right.

  Body joints swap sides, the two hands swap, and the face landmarks take their mirror images' indices.
  Flipping twice gives the same pose back.
  """
  if width <= 0:
    raise ValueError(f"flip_horizontal: width must be positive, got {width}")

  def mirror(kp: np.ndarray) -> np.ndarray:
    out = kp.copy()
    out[..., 0] = np.where(kp[..., 2] > 0, (width - 1) - kp[..., 0], kp[..., 0])
    return out

  return Pose(mirror(pose.body[BODY_FLIP]), mirror(pose.hands[::-1]), mirror(pose.face[FACE_FLIP]))


def crop_resize(pose: Pose, box: tuple[float, float, float, float], size: tuple[int, int]) -> Pose:
  """The pose of `image[y0:y1, x0:x1]` resized to `size`; keypoints that leave the image become missing.

  Uses the pixel-centre convention of `cv2.resize` (pixel i covers [i - 0.5, i + 0.5]), so for an integer
  box the keypoints land on the pixels `cv2.resize(image[y0:y1, x0:x1], (W, H))` moves their content to.

  Args:
    pose: keypoints in the source image's pixels.
    box: (x0, y0, x1, y1) crop box in source pixels, x1 > x0 and y1 > y0 (may extend past the image).
    size: (H, W) of the resized crop.
  """
  x0, y0, x1, y1 = (float(v) for v in box)
  out_h, out_w = size
  if not (x1 > x0 and y1 > y0):
    raise ValueError(f"crop_resize: box (x0, y0, x1, y1) must have x1 > x0 and y1 > y0, got {box}")
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f"crop_resize: size (H, W) must be positive, got {size}")
  sx, sy = out_w / (x1 - x0), out_h / (y1 - y0)

  def move(kp: np.ndarray) -> np.ndarray:
    x = (kp[..., 0] - x0 + 0.5) * sx - 0.5
    y = (kp[..., 1] - y0 + 0.5) * sy - 0.5
    inside = (kp[..., 2] > 0) & (x >= 0) & (x <= out_w - 1) & (y >= 0) & (y <= out_h - 1)
    return np.where(inside[..., None], np.stack([x, y, kp[..., 2]], axis=-1), 0.0)

  return pose.map(move)


def from_wholebody(keypoints: np.ndarray, scores: np.ndarray) -> list[Pose]:
  """People from COCO-WholeBody arrays (DWPose, rtmlib `Wholebody(to_openpose=False)`).

  Body: COCO-17 reordered to OpenPose COCO-18, with the neck at the mean of the shoulders (as DWPose does) and
  the smaller shoulder score as its confidence (so a threshold keeps the neck exactly when it keeps both
  shoulders, DWPose's rule). Feet are dropped. Face: the 68 landmarks; the two pupils are missing. Hands: left
  (91-111) and right (112-132).

  Args:
    keypoints: [N, 133, 2] (or [133, 2]) pixel coordinates.
    scores: [N, 133] (or [133]) confidences.

  Returns:
    N poses, with the scores as confidences (a threshold is applied when rendering, not here).
  """
  keypoints = np.asarray(keypoints, dtype=np.float32)
  scores = np.asarray(scores, dtype=np.float32)
  if keypoints.ndim == 2:
    keypoints, scores = keypoints[None], scores[None]
  if keypoints.ndim != 3 or keypoints.shape[1:] != (133, 2) or scores.shape != keypoints.shape[:2]:
    raise ValueError(f"from_wholebody: expected keypoints [N, 133, 2] and scores [N, 133], "
                     f"got {list(keypoints.shape)} and {list(scores.shape)}")
  kp = np.concatenate([keypoints, scores[..., None]], axis=-1)  # [N, 133, 3]
  poses = []
  for person in kp:
    body17 = person[:17]
    body = body17[np.maximum(COCO17_TO_COCO18, 0)].copy()
    ls, rs = body17[_COCO17_SHOULDERS[0]], body17[_COCO17_SHOULDERS[1]]
    body[1] = [(ls[0] + rs[0]) / 2, (ls[1] + rs[1]) / 2, min(ls[2], rs[2])]
    face = np.concatenate([person[WHOLEBODY_FACE], np.zeros((2, 3), np.float32)])
    hands = np.stack([person[WHOLEBODY_LEFT_HAND], person[WHOLEBODY_RIGHT_HAND]])
    poses.append(Pose(body, hands, face))
  return poses


def to_wholebody(poses: Sequence[Pose]) -> tuple[np.ndarray, np.ndarray]:
  """Poses -> COCO-WholeBody arrays (keypoints [N, 133, 2], scores [N, 133]); feet get score 0.

  The inverse of `from_wholebody` on everything COCO-WholeBody has (not the neck or the pupils).
  """
  keypoints = np.zeros((len(poses), 133, 2), np.float32)
  scores = np.zeros((len(poses), 133), np.float32)
  body_src = np.flatnonzero(COCO17_TO_COCO18 >= 0)
  for n, pose in enumerate(poses):
    person = np.zeros((133, 3), np.float32)
    person[COCO17_TO_COCO18[body_src]] = pose.body[body_src]
    person[WHOLEBODY_FACE] = pose.face[:68]
    person[WHOLEBODY_LEFT_HAND] = pose.hands[0]
    person[WHOLEBODY_RIGHT_HAND] = pose.hands[1]
    keypoints[n], scores[n] = person[:, :2], person[:, 2]
  return keypoints, scores
