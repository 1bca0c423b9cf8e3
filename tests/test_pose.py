"""Pose arrays, OpenPose JSON, keypoint geometry and the extraction filters (no real ONNX model runs here)."""

import json
import os

import cv2
import numpy as np
import pytest

from magicpose_jax.pose import extract
from magicpose_jax.pose.keypoints import (
  BODY25_TO_COCO18,
  COCO18_NAMES,
  FACE_FLIP,
  Pose,
  body25_to_coco18,
  crop_resize,
  flip_horizontal,
  from_wholebody,
  to_wholebody,
)
from magicpose_jax.pose.openpose_json import read_openpose_canvas, read_openpose_json, write_openpose_json

# OpenPose's published part lists (poseParameters.cpp, POSE_BODY_25_BODY_PARTS and POSE_COCO_BODY_PARTS).
OPENPOSE_BODY25 = ["Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "MidHip", "RHip",
                   "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar", "LBigToe",
                   "LSmallToe", "LHeel", "RBigToe", "RSmallToe", "RHeel"]
OPENPOSE_COCO18 = ["Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "RHip", "RKnee",
                   "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar"]
# COCO's 17 keypoints (the body of COCO-WholeBody), as published with the COCO keypoint annotations.
COCO17 = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
          "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
          "left_ankle", "right_ankle"]
# iBUG-68 mirror pairs by region (1-based as in the iBUG 300-W annotation figure): jaw 1-17, brows 18-22/23-27,
# nostrils 32-36, eyes 37-42/43-48 (corners and lids), outer lips 49-60, inner lips 61-68; OpenPose pupils 69/70.
IBUG_MIRROR_PAIRS_1BASED = [(1, 17), (2, 16), (3, 15), (4, 14), (5, 13), (6, 12), (7, 11), (8, 10),
                            (18, 27), (19, 26), (20, 25), (21, 24), (22, 23), (32, 36), (33, 35),
                            (37, 46), (38, 45), (39, 44), (40, 43), (41, 48), (42, 47),
                            (49, 55), (50, 54), (51, 53), (56, 60), (57, 59), (61, 65), (62, 64), (66, 68), (69, 70)]


def _full_name(openpose_name: str) -> str:
  side = {"R": "right_", "L": "left_"}
  words = {"Shoulder": "shoulder", "Elbow": "elbow", "Wrist": "wrist", "Hip": "hip", "Knee": "knee",
           "Ankle": "ankle", "Eye": "eye", "Ear": "ear"}
  if openpose_name[0] in side and openpose_name[1:] in words:
    return side[openpose_name[0]] + words[openpose_name[1:]]
  return openpose_name.lower()


def random_pose(rng, width=200, height=150, missing=0.3) -> Pose:
  def kp(n):
    xy = rng.uniform(0, [width - 1, height - 1], size=(*n, 2))
    conf = rng.uniform(0.05, 1.0, size=n) * (rng.random(n) >= missing)
    return np.where(conf[..., None] > 0, np.concatenate([xy, conf[..., None]], -1), 0.0)

  return Pose(kp((18,)), kp((2, 21)), kp((70,)))


# ---------------------------------------------------------------------------------------------------------------
# Pose


def test_pose_validation_and_immutability():
  empty = Pose.empty()
  assert empty.body.shape == (18, 3) and empty.hands.shape == (2, 21, 3) and empty.face.shape == (70, 3)
  assert empty.body.dtype == np.float32 and not empty.body.any()
  with pytest.raises(ValueError, match=r"Pose.hands: expected shape \[2, 21, 3\].*got \[21, 3\]"):
    Pose(np.zeros((18, 3)), np.zeros((21, 3)), np.zeros((70, 3)))
  with pytest.raises(ValueError, match=r"Pose.body: expected shape \[18, 3\].*got \[25, 3\]"):
    Pose(np.zeros((25, 3)), np.zeros((2, 21, 3)), np.zeros((70, 3)))
  with pytest.raises(TypeError, match="Pose.face: expected a real-valued array"):
    Pose(np.zeros((18, 3)), np.zeros((2, 21, 3)), np.full((70, 3), "x"))
  face = np.zeros((70, 3))
  face[5, 1] = np.nan
  with pytest.raises(ValueError, match=r"Pose.face: non-finite value nan at index \[5, 1\]"):
    Pose(np.zeros((18, 3)), np.zeros((2, 21, 3)), face)
  body = np.ones((18, 3), np.float32)
  pose = Pose(body, np.zeros((2, 21, 3)), np.zeros((70, 3)))
  body[0, 0] = 5  # the pose holds its own copy
  assert pose.body[0, 0] == 1
  with pytest.raises(ValueError, match="read-only"):
    pose.body[0, 0] = 2
  assert pose == Pose(np.ones((18, 3)), np.zeros((2, 21, 3)), np.zeros((70, 3))) and pose != empty


# ---------------------------------------------------------------------------------------------------------------
# OpenPose JSON


def test_json_round_trip_is_exact(tmp_path):
  rng = np.random.default_rng(0)
  poses = [random_pose(rng) for _ in range(3)]
  path = tmp_path / "frame.json"
  write_openpose_json(path, poses, canvas=(150, 200))
  back = read_openpose_json(path)
  assert len(back) == 3
  for a, b in zip(poses, back, strict=True):
    for field in ("body", "hands", "face"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert read_openpose_canvas(path) == (150, 200)
  doc = json.loads(path.read_text())
  assert {"version", "people", "canvas_height", "canvas_width"} <= set(doc)
  person = doc["people"][0]
  assert len(person["pose_keypoints_2d"]) == 54 and len(person["face_keypoints_2d"]) == 210
  assert len(person["hand_left_keypoints_2d"]) == 63 and len(person["hand_right_keypoints_2d"]) == 63
  np.testing.assert_array_equal(np.reshape(person["hand_left_keypoints_2d"], (21, 3)).astype(np.float32),
                                poses[0].hands[0])
  write_openpose_json(tmp_path / "nocanvas.json", [])
  assert read_openpose_json(tmp_path / "nocanvas.json") == []
  assert read_openpose_canvas(tmp_path / "nocanvas.json") is None


def test_json_body25_and_missing_parts(tmp_path):
  body25 = np.arange(75, dtype=np.float32).reshape(25, 3)
  doc = {"version": 1.3, "people": [
    {"pose_keypoints_2d": body25.reshape(-1).tolist(), "hand_left_keypoints_2d": [], "face_keypoints_2d": None},
  ]}
  path = tmp_path / "b25.json"
  path.write_text(json.dumps(doc))
  (pose,) = read_openpose_json(path)
  for i, name in enumerate(OPENPOSE_COCO18):
    np.testing.assert_array_equal(pose.body[i], body25[OPENPOSE_BODY25.index(name)], err_msg=name)
  assert not pose.hands.any() and not pose.face.any()


@pytest.mark.parametrize(("person", "message"), [
  ({"pose_keypoints_2d": [0.0] * 51}, r"people\[1\].pose_keypoints_2d: 51 values, expected 54 .* or 75"),
  ({"pose_keypoints_2d": [0.0] * 54, "hand_left_keypoints_2d": [0.0] * 60},
   r"people\[1\].hand_left_keypoints_2d: 60 values, expected 63 \(21 keypoints x 3\)"),
  ({"pose_keypoints_2d": [0.0] * 54, "face_keypoints_2d": [0.0] * 204},
   r"people\[1\].face_keypoints_2d: 204 values, expected 210"),
  ({"pose_keypoints_2d": ["a"] * 54}, r"people\[1\].pose_keypoints_2d: expected a flat list of numbers"),
  ({"hand_left_keypoints_2d": []}, r"people\[1\]: no 'pose_keypoints_2d' field"),
  ([1, 2], r"people\[1\]: expected an object"),
])
def test_json_errors_name_file_person_and_field(tmp_path, person, message):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"people": [{"pose_keypoints_2d": [0.0] * 54}, person]}))
  with pytest.raises(ValueError, match=f"bad.json: {message}"):
    read_openpose_json(path)


def test_json_not_openpose(tmp_path):
  (tmp_path / "a.json").write_text("{not json")
  with pytest.raises(ValueError, match="a.json: not valid JSON"):
    read_openpose_json(tmp_path / "a.json")
  (tmp_path / "b.json").write_text('{"bodies": []}')
  with pytest.raises(ValueError, match="b.json: not an OpenPose JSON file"):
    read_openpose_json(tmp_path / "b.json")


# ---------------------------------------------------------------------------------------------------------------
# Keypoint geometry


def test_body25_to_coco18_by_name():
  assert [_full_name(n) for n in OPENPOSE_COCO18] == list(COCO18_NAMES)
  for i, name in enumerate(OPENPOSE_COCO18):
    assert BODY25_TO_COCO18[i] == OPENPOSE_BODY25.index(name), name
  arr = np.arange(75, dtype=np.float32).reshape(25, 3)
  np.testing.assert_array_equal(body25_to_coco18(arr)[:, 0] / 3, [OPENPOSE_BODY25.index(n) for n in OPENPOSE_COCO18])
  with pytest.raises(ValueError, match=r"expected \[25, 3\]"):
    body25_to_coco18(np.zeros((18, 3)))


def test_flip_swaps_sides_and_is_an_involution():
  rng = np.random.default_rng(1)
  width = 200
  pose = random_pose(rng, width=width, missing=0.0)
  flipped = flip_horizontal(pose, width)
  for i, name in enumerate(OPENPOSE_COCO18):
    mirror = name if name[0] not in "RL" or name == "Neck" else {"R": "L", "L": "R"}[name[0]] + name[1:]
    j = OPENPOSE_COCO18.index(mirror)
    np.testing.assert_allclose(flipped.body[i], [width - 1 - pose.body[j, 0], pose.body[j, 1], pose.body[j, 2]],
                               err_msg=f"{name} <- {mirror}")
  np.testing.assert_allclose(flipped.hands[0, :, 0], width - 1 - pose.hands[1, :, 0])  # left <- mirrored right
  np.testing.assert_allclose(flipped.hands[1, :, 1:], pose.hands[0, :, 1:])
  expected = np.arange(70)
  for a, b in IBUG_MIRROR_PAIRS_1BASED:
    expected[a - 1], expected[b - 1] = b - 1, a - 1
  np.testing.assert_array_equal(FACE_FLIP, expected)
  np.testing.assert_allclose(flipped.face[:, 0], width - 1 - pose.face[expected, 0])
  twice = flip_horizontal(flipped, width)
  for field in ("body", "hands", "face"):  # float32 rounding of width - 1 - x: equal to a few ulps
    np.testing.assert_allclose(getattr(twice, field), getattr(pose, field), rtol=0, atol=1e-4)
  # Exactly the same pose with coordinates on a 1/8-pixel grid (exact in float32), and missing keypoints stay
  # all-zero.
  sparse = random_pose(rng, width=width, missing=0.5).map(lambda kp: np.round(kp * 8) / 8)
  flipped = flip_horizontal(sparse, width)
  assert not flipped.body[flipped.body[:, 2] == 0].any()
  assert flip_horizontal(flipped, width) == sparse


def test_flip_matches_image_flip():
  image = np.zeros((40, 60), np.uint8)
  image[13, 7] = 255
  body = np.zeros((18, 3))
  body[4] = [7, 13, 1]  # right wrist
  flipped = flip_horizontal(Pose(body, np.zeros((2, 21, 3)), np.zeros((70, 3))), 60)
  x, y, _ = flipped.body[7]  # now the left wrist
  assert image[:, ::-1][int(y), int(x)] == 255


def test_crop_resize_follows_cv2_resize():
  rng = np.random.default_rng(2)
  image = np.zeros((120, 160), np.float32)
  points = [(40, 30), (100, 70), (75, 95)]
  for x, y in points:
    image[y, x] = 1.0
  body = np.zeros((18, 3))
  body[: len(points)] = [(x, y, 1.0) for x, y in points]
  body[5] = [2, 2, 1.0]  # outside the crop below
  body[6] = [50, 50, 0.0]  # missing stays missing
  pose = Pose(body, np.zeros((2, 21, 3)), rng.uniform(0, 10, (70, 3)))
  box, size = (20, 10, 140, 110), (200, 240)  # (x0, y0, x1, y1) -> (H, W): scales 2 and 2
  out = crop_resize(pose, box, size)
  resized = cv2.resize(image[box[1]:box[3], box[0]:box[2]], size[::-1], interpolation=cv2.INTER_LINEAR)
  for k in range(len(points)):
    x, y, c = out.body[k]
    assert c == 1.0
    ys, xs = np.mgrid[: size[0], : size[1]]
    win = (np.abs(xs - x) < 4) & (np.abs(ys - y) < 4)
    w = resized * win
    cx, cy = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()  # centre of mass of the resized dot
    assert abs(cx - x) < 0.1 and abs(cy - y) < 0.1, (k, (x, y), (cx, cy))
  assert not out.body[5].any() and not out.body[6].any()
  # Identity box, then an invalid one.
  same = crop_resize(pose, (0, 0, 160, 120), (120, 160))
  np.testing.assert_allclose(same.body, np.where(pose.body[:, 2:] > 0, pose.body, 0), atol=1e-5)
  with pytest.raises(ValueError, match="x1 > x0"):
    crop_resize(pose, (10, 0, 10, 5), (4, 4))
  with pytest.raises(ValueError, match="size"):
    crop_resize(pose, (0, 0, 10, 5), (0, 4))


def test_wholebody_conversion():
  rng = np.random.default_rng(3)
  keypoints = rng.uniform(0, 100, (2, 133, 2)).astype(np.float32)
  scores = rng.uniform(0, 1, (2, 133)).astype(np.float32)
  poses = from_wholebody(keypoints, scores)
  assert len(poses) == 2
  p = poses[1]
  for i, name in enumerate(COCO18_NAMES):
    if name == "neck":
      continue
    src = COCO17.index(name)
    np.testing.assert_allclose(p.body[i], [*keypoints[1, src], scores[1, src]], err_msg=name)
  ls, rs = COCO17.index("left_shoulder"), COCO17.index("right_shoulder")
  np.testing.assert_allclose(p.body[1, :2], (keypoints[1, ls] + keypoints[1, rs]) / 2)
  assert p.body[1, 2] == min(scores[1, ls], scores[1, rs])
  np.testing.assert_allclose(p.face[:68, :2], keypoints[1, 23:91])
  assert not p.face[68:].any()  # no pupils in COCO-WholeBody
  np.testing.assert_allclose(p.hands[0, :, :2], keypoints[1, 91:112])
  np.testing.assert_allclose(p.hands[1, :, 2], scores[1, 112:133])
  kp2, sc2 = to_wholebody(poses)
  feet = slice(17, 23)
  np.testing.assert_allclose(np.delete(kp2, feet, axis=1), np.delete(keypoints, feet, axis=1))
  np.testing.assert_allclose(np.delete(sc2, feet, axis=1), np.delete(scores, feet, axis=1))
  assert not sc2[:, feet].any()
  assert len(from_wholebody(keypoints[0], scores[0])) == 1
  with pytest.raises(ValueError, match=r"expected keypoints \[N, 133, 2\]"):
    from_wholebody(np.zeros((1, 134, 2)), np.zeros((1, 134)))


# ---------------------------------------------------------------------------------------------------------------
# Extraction: filters, writing, the no-model message, the SimCC geometry


def _standing(scale=1.0, conf=1.0, visible=18, offset=(0, 0)) -> Pose:
  body = np.zeros((18, 3))
  ys = np.linspace(10, 90, 18) * scale + offset[1]
  xs = np.where(np.arange(18) % 2 == 0, 40.0, 60.0) * scale + offset[0]
  body[:visible] = np.stack([xs, ys, np.full(18, conf)], -1)[:visible]
  return Pose(body, np.zeros((2, 21, 3)), np.zeros((70, 3)))


def test_filter_reasons():
  h, w = 100, 100
  assert extract.filter_reason([_standing()], h, w) is None
  assert extract.filter_reason([], h, w) == "no_person"
  assert extract.filter_reason([_standing(conf=0.2)], h, w) == "no_person"  # nothing above the threshold
  assert extract.filter_reason([_standing(), _standing(offset=(5, 0))], h, w) == "several_people"
  assert extract.filter_reason([_standing(), _standing(conf=0.1)], h, w) is None  # a ghost is no person
  assert extract.filter_reason([_standing(visible=6)], h, w) == "few_keypoints"
  assert extract.filter_reason([_standing(visible=7)], h, w) is None  # "> 6 keypoints"
  assert extract.filter_reason([_standing(scale=0.2)], h, w) == "small_person"  # 4 x 16 px box
  assert extract.filter_reason([_standing(scale=0.2)], h, w, extract.FrameFilter(min_area_fraction=0.001)) is None


def test_extract_frames_writes_kept_frames_and_report(tmp_path):
  frames = [(f"{i:04d}", np.zeros((100, 100, 3), np.uint8)) for i in range(5)] + [("0005", None)]
  outcomes = {"0000": [_standing()], "0001": [], "0002": [_standing(), _standing(offset=(3, 3))],
              "0003": [_standing(visible=3)], "0004": [_standing(offset=(1, 0)), _standing(conf=0.05)]}
  calls = iter(outcomes.values())
  report = extract.extract_frames(frames, lambda image: next(calls), str(tmp_path))
  assert report["frames"] == 6 and report["kept"] == 2
  assert report["filtered"] == {"unreadable": 1, "no_person": 1, "several_people": 1, "few_keypoints": 1,
                                "small_person": 0}
  assert report["filtered_frames"] == {"0001": "no_person", "0002": "several_people", "0003": "few_keypoints",
                                       "0005": "unreadable"}
  assert report["complete"] and json.loads((tmp_path / extract.REPORT_NAME).read_text()) == report
  assert sorted(os.listdir(tmp_path)) == ["0000.json", "0000.png", "0004.json", "0004.png", extract.REPORT_NAME]
  (pose,) = read_openpose_json(tmp_path / "0004.json")
  assert pose == _standing(offset=(1, 0))
  assert read_openpose_canvas(tmp_path / "0004.json") == (100, 100)
  png = cv2.imread(str(tmp_path / "0000.png"))[..., ::-1]
  from magicpose_jax.pose.render import render  # noqa: PLC0415

  np.testing.assert_array_equal(png, render(_standing(), 100, 100))


def test_extract_frames_writes_its_report_when_stopped_by_an_error(tmp_path):
  frames = [(f"{i:04d}", np.zeros((100, 100, 3), np.uint8)) for i in range(4)]
  outcomes = iter([[_standing()], []])

  def estimate(image):
    for poses in outcomes:
      return poses
    raise RuntimeError("model crashed")  # on the third frame

  with pytest.raises(RuntimeError, match="model crashed"):
    extract.extract_frames(frames, estimate, str(tmp_path))
  report = json.loads((tmp_path / extract.REPORT_NAME).read_text())
  assert report["complete"] is False and report["error"] == "RuntimeError: model crashed"
  assert (report["frames"], report["kept"], report["filtered_frames"]) == (3, 1, {"0001": "no_person"})


def _fake_estimator(monkeypatch):
  monkeypatch.setattr(extract, "make_estimator", lambda *args: lambda image: [_standing()])


def test_cli_counts_unreadable_frames_and_strict_fails_after_writing_everything(tmp_path, monkeypatch, capsys):
  _fake_estimator(monkeypatch)
  src = tmp_path / "frames"
  src.mkdir()
  for name in ("a.png", "c.png"):
    cv2.imwrite(str(src / name), np.zeros((100, 100, 3), np.uint8))
  (src / "b.png").write_bytes(b"truncated")
  for strict, rc in ((False, 0), (True, 1)):
    out = tmp_path / f"out_{strict}"
    assert extract.main(["--src", str(src), "--out", str(out)] + ["--strict"] * strict) == rc
    err = capsys.readouterr().err
    assert "warning: 1 frames could not be read: b" in err and ("--strict" in err) == strict
    report = json.loads((out / extract.REPORT_NAME).read_text())
    assert report["complete"] and report["kept"] == 2 and report["filtered_frames"] == {"b": "unreadable"}
    assert sorted(os.listdir(out)) == ["a.json", "a.png", "c.json", "c.png", extract.REPORT_NAME]


def test_cli_refuses_a_source_without_frames(tmp_path, monkeypatch, capsys):
  _fake_estimator(monkeypatch)
  (tmp_path / "empty").mkdir()
  assert extract.main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
  assert "no frames" in capsys.readouterr().err
  assert json.loads((tmp_path / "out" / extract.REPORT_NAME).read_text())["frames"] == 0
  assert extract.main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out2")]) == 2
  assert "no such image folder" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_iter_frames(tmp_path):
  for name in ("b.png", "a.jpg"):
    cv2.imwrite(str(tmp_path / name), np.full((8, 6, 3), 200, np.uint8))
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "c.png").write_bytes(b"not a png")
  stems = [(s, None if im is None else im.shape) for s, im in extract.iter_frames(str(tmp_path))]
  assert stems == [("a", (8, 6, 3)), ("b", (8, 6, 3)), ("c", None)]  # unreadable: None, never an exception
  video = str(tmp_path / "clip.avi")
  writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 10, (16, 12))
  for i in range(3):
    writer.write(np.full((12, 16, 3), 60 * i, np.uint8))
  writer.release()
  frames = list(extract.iter_frames(video))
  assert [s for s, _ in frames] == ["00000", "00001", "00002"] and frames[0][1].shape == (12, 16, 3)
  with pytest.raises(FileNotFoundError, match="no such image folder"):
    list(extract.iter_frames(str(tmp_path / "missing.mp4")))


def test_cli_with_a_missing_onnx_model_explains_and_exits_2(capsys, tmp_path):
  args = ["--pose-model", str(tmp_path / "none.onnx"), "--src", str(tmp_path), "--out", str(tmp_path)]
  assert extract.main(args) == 2
  err = capsys.readouterr().err
  assert "none.onnx" in err and "pip install onnxruntime rtmlib" in err and "dw-ll_ucoco_384.onnx" in err


def test_simcc_geometry_round_trip():
  input_hw = (256, 192)
  box = (30.0, 50.0, 230.0, 450.0)  # a tall person box in a larger frame
  warp, size = extract.box_to_input(box, input_hw)
  assert size[1] / size[0] == pytest.approx(256 / 192)
  # Image points -> model input pixels, written as SimCC peaks (split ratio 2), decoded back.
  points = np.array([[60.0, 80.0], [130.0, 250.0], [200.0, 420.0]])
  in_xy = points @ warp[:, :2].T + warp[:, 2]
  assert (in_xy >= 0).all() and (in_xy[:, 0] < 192).all() and (in_xy[:, 1] < 256).all()
  simcc_x = np.zeros((3, 192 * 2))
  simcc_y = np.zeros((3, 256 * 2))
  for k, (x, y) in enumerate(in_xy):
    simcc_x[k, round(x * 2)] = 0.9
    simcc_y[k, round(y * 2)] = 0.7
  kp, scores = extract.decode_simcc(simcc_x, simcc_y, warp)
  np.testing.assert_allclose(kp, points, atol=0.5 / warp[0, 0])
  np.testing.assert_allclose(scores, 0.8)
  # The box centre lands on the input centre.
  np.testing.assert_allclose(warp @ [130.0, 250.0, 1.0], [96, 128])
