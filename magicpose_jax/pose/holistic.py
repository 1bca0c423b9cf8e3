"""Whole-body pose extraction with MediaPipe's TFLite models (no download at run time), mapped to OpenPose arrays.

The pipeline follows MediaPipe Holistic for one image, implemented here on `roi.py`'s geometry and run with
`ai-edge-litert` (the models come from `python -m magicpose_jax.pose.models install`):
  1. BlazePose detector (224 x 224, the whole image letterboxed, values in [-1, 1]): SSD anchors, box and
     4-keypoint decoding, weighted NMS. Keypoints: hip centre, a point on the body's enclosing circle, shoulder
     centre, a point on the upper body's circle.
  2. Pose region: centred on the hip centre, side twice the circle's radius, rotated so hips -> circle points
     up, enlarged 1.25 x. Pose landmark model (256 x 256, [0, 1]): 39 landmarks (x, y, z, visibility, presence
     logits) of which the first 33 are BlazePose's body points, refined on the model's 64 x 64 heatmaps.
  3. Hands, from the body's wrist, pinky and index points: a square around the estimated middle-finger base
     (2.7 x the wrist distance, shifted 0.1 towards the fingers), the re-crop model (256 x 256) places the hand
     box, then the hand landmark model (224 x 224): 21 points, presence and handedness.
  4. Face, from the body's eye, ear, nose and mouth points: a square twice their extent, rotated by the eyes;
     the face mesh model (192 x 192): 468 points and presence; the region is then re-fitted to the mesh (1.5 x
     its extent, rotated by the eye corners) and the model run again, as MediaPipe's tracking would on the next
     frame.
The detector's best person is the one kept: the extractor gives at most one person per image.

Mapping to OpenPose (`keypoints.Pose`, see docs/pose.md for the table): body COCO-18 from BlazePose's points (the
neck is the shoulders' midpoint with the smaller shoulder confidence), confidence = visibility; each hand's 21
points in OpenPose's order (the same as MediaPipe's) with the hand's presence as confidence; the 68 iBUG face
points from chosen mesh vertices (`FACE68_FROM_MESH`), the two pupils as the mean of each eye's 16-point mesh
contour (the 468-point mesh has no iris), with the face's presence as confidence. Points outside the image get
confidence 0.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from magicpose_jax.pose import models, roi
from magicpose_jax.pose.keypoints import NUM_FACE, NUM_HAND, Pose

# --- BlazePose ----------------------------------------------------------------------------------------------
DETECTOR_SIZE = 224
DETECTOR_STRIDES = (8, 16, 32, 32, 32)
DETECTOR_MIN_SCORE = 0.3
DETECTOR_NMS_IOU = 0.3
POSE_SIZE = 256
POSE_ROI_SCALE = 1.25
POSE_PRESENCE_THRESHOLD = 0.5
HEATMAP_KERNEL = 7
HEATMAP_MIN_CONFIDENCE = 0.5

BLAZEPOSE_NAMES = (
  "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye", "right_eye_outer",
  "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder", "right_shoulder", "left_elbow",
  "right_elbow", "left_wrist", "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index",
  "left_thumb", "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
  "left_heel", "right_heel", "left_foot_index", "right_foot_index",
)
_BP = {n: i for i, n in enumerate(BLAZEPOSE_NAMES)}
# COCO-18 joint i is BlazePose point COCO18_FROM_BLAZEPOSE[i]; -1: the neck (the shoulders' midpoint).
COCO18_FROM_BLAZEPOSE = np.array([
  _BP["nose"], -1, _BP["right_shoulder"], _BP["right_elbow"], _BP["right_wrist"], _BP["left_shoulder"],
  _BP["left_elbow"], _BP["left_wrist"], _BP["right_hip"], _BP["right_knee"], _BP["right_ankle"], _BP["left_hip"],
  _BP["left_knee"], _BP["left_ankle"], _BP["right_eye"], _BP["left_eye"], _BP["right_ear"], _BP["left_ear"],
], dtype=np.int32)

# --- Hands ----------------------------------------------------------------------------------------------------
HAND_RECROP_SIZE = 256
HAND_SIZE = 224
HAND_FROM_POSE_SCALE = 2.7
HAND_SHIFT_Y = -0.1
HAND_WRIST_MIN_VISIBILITY = 0.1
HAND_PRESENCE_THRESHOLD = 0.5

# --- Face -----------------------------------------------------------------------------------------------------
FACE_SIZE = 192
FACE_FROM_POSE_SCALE = 2.0
FACE_FROM_MESH_SCALE = 1.5
FACE_PRESENCE_THRESHOLD = 0.5
FACE_POSE_POINTS = tuple(range(11))  # BlazePose's nose, eyes, ears and mouth corners
# The 68 iBUG landmarks (OpenPose face order) as MediaPipe face-mesh vertices, picked along the mesh's own
# contours (face oval, brows, nose, eyes, lips) at about the iBUG spacing on the canonical face model:
FACE68_FROM_MESH = np.array([
  127, 234, 93, 132, 58, 172, 150, 176, 152, 400, 379, 397, 288, 361, 323, 454, 356,  # 0-16 jaw, right to left
  70, 63, 105, 66, 107,  # 17-21 right brow (upper edge), outer to inner
  336, 296, 334, 293, 300,  # 22-26 left brow, inner to outer
  6, 197, 195, 4,  # 27-30 nose bridge down to the tip
  98, 97, 2, 326, 327,  # 31-35 nostrils' lower edge, right to left
  33, 160, 158, 133, 153, 144,  # 36-41 right eye: outer corner, upper lid, inner corner, lower lid
  362, 385, 387, 263, 373, 380,  # 42-47 left eye: inner corner, upper lid, outer corner, lower lid
  61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,  # 48-59 outer lips from the right corner
  78, 81, 13, 311, 308, 402, 14, 178,  # 60-67 inner lips from the right corner
], dtype=np.int32)
# Each eye's closed contour in the mesh (16 vertices); the pupil is approximated by its mean.
RIGHT_EYE_MESH = np.array([33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246], np.int32)
LEFT_EYE_MESH = np.array([263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466], np.int32)
FACE_ROTATION_MESH = (33, 263)  # right eye's outer corner -> left eye's outer corner: horizontal when upright


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


@dataclasses.dataclass
class Detection:
  """A person from the BlazePose detector, in continuous image pixels."""

  score: float
  box: np.ndarray  # [4] cx, cy, w, h
  keypoints: np.ndarray  # [4, 2] hip centre, body circle point, shoulder centre, upper-body circle point


@dataclasses.dataclass
class HolisticResult:
  """Everything one image gave, in continuous image pixels (OpenPose's pixel indices are these - 0.5).

  `pose` is None when no person was found; a part that was not found has presence 0.
  """

  detections: list[Detection]
  pose_score: float = 0.0
  body: np.ndarray | None = None  # [33, 4] x, y, visibility, presence
  pose_roi: roi.Rect | None = None
  hands: dict = dataclasses.field(default_factory=dict)  # "left"/"right" -> {"points" [21, 2], "presence", ...}
  face: dict = dataclasses.field(default_factory=dict)  # {"points" [468, 2], "presence", "roi"}


class Holistic:
  """RGB uint8 image [H, W, 3] -> MediaPipe holistic landmarks (`analyze`) or OpenPose poses (`__call__`).

  Args:
    models_dir: the folder `python -m magicpose_jax.pose.models install` filled (default: its default folder).
    hands, face: also run the hand and face models (their parts stay missing otherwise).
    num_threads: CPU threads per model.
  """

  def __init__(self, models_dir: str | os.PathLike | None = None, hands: bool = True, face: bool = True,
               num_threads: int | None = None):
    folder = models.check_installed(models_dir)
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415  (heavy import, only when extracting)

    def load(name: str):
      interp = Interpreter(model_path=os.path.join(folder, name), num_threads=num_threads)
      interp.allocate_tensors()
      return interp

    self._detector = load("pose_detection.tflite")
    self._pose = load("pose_landmark_full.tflite")
    self._hand_recrop = load("hand_recrop.tflite") if hands else None
    self._hand = load("hand_landmark_full.tflite") if hands else None
    self._face = load("face_landmark.tflite") if face else None
    self._anchors = roi.ssd_anchors(DETECTOR_SIZE, DETECTOR_STRIDES)

  # -- model calls -------------------------------------------------------------------------------------------
  @staticmethod
  def _run(interp, x: np.ndarray) -> dict[str, np.ndarray]:
    """Runs one model on float32 [S, S, 3]; outputs by name (the tflite files name them Identity, Identity_1...)."""
    interp.set_tensor(interp.get_input_details()[0]["index"], x[None].astype(np.float32))
    interp.invoke()
    return {d["name"]: interp.get_tensor(d["index"])[0] for d in interp.get_output_details()}

  def detect(self, image: np.ndarray) -> list[Detection]:
    """People, best first (weighted NMS of the detector's boxes over the score threshold)."""
    h, w = image.shape[:2]
    rect = roi.letterbox_rect(h, w)
    x = roi.crop(image, rect, DETECTOR_SIZE, replicate_border=False).astype(np.float32) / 127.5 - 1.0
    out = self._run(self._detector, x)
    raw, logits = out["Identity"], out["Identity_1"][:, 0]  # [2254, 12], [2254]
    scores = _sigmoid(np.clip(logits, -100, 100))
    keep = scores > DETECTOR_MIN_SCORE
    if not keep.any():
      return []
    boxes, keypoints = roi.decode_boxes(raw[keep], self._anchors[keep], DETECTOR_SIZE)
    people = []
    for score, box, kps in roi.weighted_nms(boxes, keypoints, scores[keep], DETECTOR_NMS_IOU):
      centre = roi.project(box[:2], rect)
      size = box[2:] * np.array([rect.width, rect.height])
      people.append(Detection(score, np.concatenate([centre, size]), roi.project(kps, rect)))
    return people

  def landmarks(self, image: np.ndarray, detection: Detection) -> tuple[float, np.ndarray, roi.Rect]:
    """(presence, body [33, 4] x, y, visibility, presence, the region used) for one detection."""
    kp = detection.keypoints
    rect = roi.transform_rect(roi.rect_from_centre_and_scale_point(kp[0], kp[1], 90.0), POSE_ROI_SCALE)
    x = roi.crop(image, rect, POSE_SIZE).astype(np.float32) / 255.0
    out = self._run(self._pose, x)
    presence = float(out["Identity_1"][0])
    raw = out["Identity"].reshape(39, 5)[:33]
    xy = refine_on_heatmap(raw[:, :2] / POSE_SIZE, out["Identity_3"][..., :33])
    body = np.concatenate([roi.project(xy, rect), _sigmoid(raw[:, 3:5])], axis=1)
    return presence, body, rect

  def hand(self, image: np.ndarray, wrist: np.ndarray, pinky: np.ndarray, index: np.ndarray) -> dict:
    """One hand from its body points: {"points" [21, 2], "presence", "handedness", "roi"}."""
    middle = (2.0 * index + pinky) / 3.0  # the middle finger's base, estimated
    side = 2.0 * float(np.hypot(*(middle - wrist)))
    rect = roi.Rect(float(middle[0]), float(middle[1]), side, side, roi.rotation_to(wrist, middle, 90.0))
    rect = roi.transform_rect(rect, HAND_FROM_POSE_SCALE, HAND_SHIFT_Y)
    x = roi.crop(image, rect, HAND_RECROP_SIZE).astype(np.float32) / 255.0
    two = roi.project(self._run(self._hand_recrop, x)["output_crop"].reshape(2, 2) / HAND_RECROP_SIZE, rect)
    rect = roi.transform_rect(roi.rect_from_centre_and_scale_point(two[0], two[1], -90.0), 1.0, HAND_SHIFT_Y)
    x = roi.crop(image, rect, HAND_SIZE).astype(np.float32) / 255.0
    out = self._run(self._hand, x)
    points = roi.project(out["Identity"].reshape(21, 3)[:, :2] / HAND_SIZE, rect)
    return {"points": points, "presence": float(out["Identity_1"][0]), "handedness": float(out["Identity_2"][0]),
            "roi": rect}

  def face_mesh(self, image: np.ndarray, face_points: np.ndarray) -> dict:
    """The face from BlazePose's face points [11, 2]: {"points" [468, 2], "presence", "roi"}."""
    right_eye, left_eye = face_points[_BP["right_eye"]], face_points[_BP["left_eye"]]
    rect = roi.rect_around(face_points, roi.rotation_to(right_eye, left_eye, 0.0))
    rect = roi.transform_rect(rect, FACE_FROM_POSE_SCALE)
    mesh, presence = self._face_once(image, rect)
    if presence >= FACE_PRESENCE_THRESHOLD:  # a second pass on the region re-fitted to the first pass's mesh
      a, b = (mesh[i] for i in FACE_ROTATION_MESH)
      rect = roi.transform_rect(roi.rect_around(mesh, roi.rotation_to(a, b, 0.0)), FACE_FROM_MESH_SCALE)
      mesh, presence = self._face_once(image, rect)
    return {"points": mesh, "presence": presence, "roi": rect}

  def _face_once(self, image: np.ndarray, rect: roi.Rect) -> tuple[np.ndarray, float]:
    x = roi.crop(image, rect, FACE_SIZE).astype(np.float32) / 255.0
    out = self._run(self._face, x)
    mesh = roi.project(out["conv2d_21"].reshape(468, 3)[:, :2] / FACE_SIZE, rect)
    return mesh, float(_sigmoid(out["conv2d_31"].reshape(())))

  # -- the pipeline ----------------------------------------------------------------------------------------
  def analyze(self, image: np.ndarray) -> HolisticResult:
    """All landmarks of the best person in an RGB uint8 image [H, W, 3] (see HolisticResult)."""
    image = _check_image(image)
    result = HolisticResult(detections=self.detect(image))
    if not result.detections:
      return result
    presence, body, rect = self.landmarks(image, result.detections[0])
    result.pose_score, result.pose_roi = presence, rect
    if presence < POSE_PRESENCE_THRESHOLD:
      return result
    result.body = body
    if self._hand is not None:
      for side in ("left", "right"):
        wrist, pinky, index = (body[_BP[f"{side}_{p}"]] for p in ("wrist", "pinky", "index"))
        if wrist[2] > HAND_WRIST_MIN_VISIBILITY:
          result.hands[side] = self.hand(image, wrist[:2], pinky[:2], index[:2])
    if self._face is not None:
      result.face = self.face_mesh(image, body[list(FACE_POSE_POINTS), :2])
    return result

  def __call__(self, image: np.ndarray) -> list[Pose]:
    """[] (no person) or [one OpenPose `Pose`] in the image's pixel indices."""
    result = self.analyze(image)
    return [] if result.body is None else [to_openpose(result, *image.shape[:2])]


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
    raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {list(image.shape)}")
  return np.ascontiguousarray(image)


def refine_on_heatmap(points: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
  """Points [K, 2] normalized to the crop, moved to the confidence-weighted mean of their heatmap window.

  heatmap: [h, w, K] logits. A point moves only when its window's highest confidence reaches
  HEATMAP_MIN_CONFIDENCE (MediaPipe's rule, with its coordinate convention: cell index / size).
  """
  hm_h, hm_w, _ = heatmap.shape
  out = np.array(points, np.float64)
  half = (HEATMAP_KERNEL - 1) // 2
  for k, (x, y) in enumerate(points):
    col, row = int(x * hm_w), int(y * hm_h)  # C-style truncation toward zero, as the reference does
    if not (0 <= col < hm_w and 0 <= row < hm_h):
      continue
    r0, r1, c0, c1 = max(0, row - half), min(hm_h, row + half + 1), max(0, col - half), min(hm_w, col + half + 1)
    conf = _sigmoid(heatmap[r0:r1, c0:c1, k])
    total = conf.sum()
    if conf.max() >= HEATMAP_MIN_CONFIDENCE and total > 0:
      rows, cols = np.mgrid[r0:r1, c0:c1]
      out[k] = ((conf * cols).sum() / total / hm_w, (conf * rows).sum() / total / hm_h)
  return out


def _inside(points: np.ndarray, height: int, width: int) -> np.ndarray:
  return (points[..., 0] >= 0) & (points[..., 0] < width) & (points[..., 1] >= 0) & (points[..., 1] < height)


def _keypoints(points: np.ndarray, confidence: np.ndarray, height: int, width: int) -> np.ndarray:
  """[K, 3] OpenPose keypoints (pixel indices) from continuous points [K, 2]; outside the image: missing."""
  conf = np.where(_inside(points, height, width), np.broadcast_to(confidence, points.shape[:1]), 0.0)
  kp = np.concatenate([points - 0.5, conf[:, None]], axis=1)
  return np.where(conf[:, None] > 0, kp, 0.0).astype(np.float32)


def to_openpose(result: HolisticResult, height: int, width: int) -> Pose:
  """The OpenPose `Pose` of a HolisticResult with a body (see the module docstring for the mapping)."""
  if result.body is None:
    raise ValueError("to_openpose: the result holds no person")
  body_src = result.body[np.maximum(COCO18_FROM_BLAZEPOSE, 0)]
  points, conf = body_src[:, :2].copy(), body_src[:, 2].copy()
  shoulders = result.body[[_BP["left_shoulder"], _BP["right_shoulder"]]]
  points[1], conf[1] = shoulders[:, :2].mean(0), shoulders[:, 2].min()
  body = _keypoints(points, conf, height, width)
  hands = np.zeros((2, NUM_HAND, 3), np.float32)
  for i, side in enumerate(("left", "right")):  # OpenPose's hands order: left, right
    hand = result.hands.get(side)
    if hand is not None and hand["presence"] >= HAND_PRESENCE_THRESHOLD:
      hands[i] = _keypoints(hand["points"], np.float32(hand["presence"]), height, width)
  face = np.zeros((NUM_FACE, 3), np.float32)
  if result.face and result.face["presence"] >= FACE_PRESENCE_THRESHOLD:
    mesh = result.face["points"]
    pts = np.concatenate([mesh[FACE68_FROM_MESH], mesh[RIGHT_EYE_MESH].mean(0, keepdims=True),
                          mesh[LEFT_EYE_MESH].mean(0, keepdims=True)])
    face = _keypoints(pts, np.float32(result.face["presence"]), height, width)
  return Pose(body, hands, face)


def body_scale(body: np.ndarray) -> float:
  """Shoulder width in pixels of a BlazePose body [33, >=2] (for logs)."""
  return float(math.dist(body[_BP["left_shoulder"], :2], body[_BP["right_shoulder"], :2]))
