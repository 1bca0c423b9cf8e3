"""OpenPose JSON files <-> `Pose` lists.

The format OpenPose writes with `--write_json` (one file per frame): `{"version": 1.3, "people": [{
"pose_keypoints_2d": [x0, y0, c0, x1, ...], "hand_left_keypoints_2d": [...], "hand_right_keypoints_2d": [...],
"face_keypoints_2d": [...]}, ...]}`, flat lists of (x, y, confidence) triples in pixels. ControlNet's annotator
adds `canvas_height`/`canvas_width`. Body lists may hold BODY_25 (mapped to COCO-18 here) or COCO-18 keypoints;
an absent, null or empty hand/face list means "not detected" (all missing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from magicpose_jax.pose.keypoints import NUM_BODY, NUM_FACE, NUM_HAND, Pose, body25_to_coco18

OPENPOSE_JSON_VERSION = 1.3
_OPTIONAL_FIELDS = {
  "hand_left_keypoints_2d": NUM_HAND,
  "hand_right_keypoints_2d": NUM_HAND,
  "face_keypoints_2d": NUM_FACE,
}


def _triples(values, where: str, field: str, counts: Sequence[int]) -> np.ndarray:
  if not isinstance(values, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
    raise ValueError(f"{where}.{field}: expected a flat list of numbers (x, y, confidence triples)")
  if len(values) not in [3 * c for c in counts]:
    expected = " or ".join(f"{3 * c} ({c} keypoints x 3)" for c in counts)
    raise ValueError(f"{where}.{field}: {len(values)} values, expected {expected}")
  return np.asarray(values, dtype=np.float32).reshape(-1, 3)


def _parse_person(person, where: str) -> Pose:
  if not isinstance(person, dict):
    raise ValueError(f"{where}: expected an object, got {type(person).__name__}")
  if "pose_keypoints_2d" not in person:
    raise ValueError(f"{where}: no 'pose_keypoints_2d' field")
  body = _triples(person["pose_keypoints_2d"], where, "pose_keypoints_2d", (NUM_BODY, 25))
  if len(body) == 25:
    body = body25_to_coco18(body)
  parts = {}
  for field, count in _OPTIONAL_FIELDS.items():
    values = person.get(field)
    parts[field] = (np.zeros((count, 3), np.float32) if values is None or values == []
                    else _triples(values, where, field, (count,)))
  hands = np.stack([parts["hand_left_keypoints_2d"], parts["hand_right_keypoints_2d"]])
  try:
    return Pose(body, hands, parts["face_keypoints_2d"])
  except ValueError as e:  # non-finite values
    raise ValueError(f"{where}: {e}") from None


def _load(path: str | os.PathLike) -> dict:
  path = os.fspath(path)
  try:
    with open(path) as f:
      doc = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("people"), list):
    raise ValueError(f"{path}: not an OpenPose JSON file (expected an object with a 'people' list)")
  return doc


def read_openpose_json(path: str | os.PathLike) -> list[Pose]:
  """Reads the people of one OpenPose JSON file (BODY_25 bodies are mapped to COCO-18)."""
  doc = _load(path)
  return [_parse_person(p, f"{os.fspath(path)}: people[{i}]") for i, p in enumerate(doc["people"])]


def read_openpose_canvas(path: str | os.PathLike) -> tuple[int, int] | None:
  """(canvas_height, canvas_width) of a file that records them (ControlNet-style), else None."""
  doc = _load(path)
  if "canvas_height" in doc and "canvas_width" in doc:
    return int(doc["canvas_height"]), int(doc["canvas_width"])
  return None


def _flat(kp: np.ndarray) -> list[float]:
  # str() of a float32 is the shortest decimal that reads back to the same float32: short files, exact round trip.
  return [float(str(v)) for v in kp.reshape(-1)]


def write_openpose_json(path: str | os.PathLike, poses: Sequence[Pose], canvas: tuple[int, int] | None = None) -> None:
  """Writes poses as an OpenPose JSON file (COCO-18 bodies), with `canvas_height`/`canvas_width` if `canvas=(H, W)`.

  Reading the file back gives the same float32 arrays.
  """
  people = []
  for pose in poses:
    people.append({
      "person_id": [-1],
      "pose_keypoints_2d": _flat(pose.body),
      "face_keypoints_2d": _flat(pose.face),
      "hand_left_keypoints_2d": _flat(pose.hands[0]),
      "hand_right_keypoints_2d": _flat(pose.hands[1]),
      "pose_keypoints_3d": [], "face_keypoints_3d": [], "hand_left_keypoints_3d": [], "hand_right_keypoints_3d": [],
    })
  doc: dict = {"version": OPENPOSE_JSON_VERSION, "people": people}
  if canvas is not None:
    doc["canvas_height"], doc["canvas_width"] = int(canvas[0]), int(canvas[1])
  with open(path, "w") as f:
    json.dump(doc, f)
