"""The MediaPipe pose extractor: its model install step, its geometry, and the real models on a real photograph.

The photograph is scikit-image's `data.astronaut()` (512 x 512, NASA's portrait of Eileen Collins: head, both
shoulders under a bulky suit, her right hand in a purple glove at the bottom-left edge, her left hand hidden by
the helmet). Its keypoints were read off the image by eye (pixel indices, x right, y down):
  nose tip (221, 125); right eye (207, 105); left eye (245, 105); right wrist (135, 492);
  right shoulder (95, 250) and left shoulder (315, 262), where the suit's sleeves meet its torso.
Tolerances: 5 % of the image side (25.6 px) for the face points and the wrist, 8 % (41 px) for the shoulders,
whose joints the suit hides. No photograph with a bare visible hand ships in our packages: the hand models run
here (and find no hand in the gloves), but their output is not checked against a hand-annotated image.
"""

import hashlib
import json
import zipfile

import numpy as np
import pytest
import skimage.data

from magicpose_jax.pose import extract, models, roi
from magicpose_jax.pose.holistic import FACE68_FROM_MESH, LEFT_EYE_MESH, RIGHT_EYE_MESH, Holistic

SIDE = 512
ANNOTATED = {  # COCO-18 index: (x, y, tolerance in px)
  0: (221, 125, 0.05 * SIDE), 14: (207, 105, 0.05 * SIDE), 15: (245, 105, 0.05 * SIDE),
  4: (135, 492, 0.05 * SIDE), 2: (95, 250, 0.08 * SIDE), 5: (315, 262, 0.08 * SIDE),
}


@pytest.fixture(scope="module")
def holistic():
  if models.missing():
    pytest.fail(f"the pose models are not installed in {models.models_dir()}: run "
                f"{models.INSTALL_COMMAND} (make test does)")
  return Holistic()


@pytest.fixture(scope="module")
def astronaut_pose(holistic):
  poses = holistic(skimage.data.astronaut())
  assert len(poses) == 1
  return poses[0]


def test_astronaut_keypoints_land_where_annotated(astronaut_pose):
  body = astronaut_pose.body
  for joint, (x, y, tol) in ANNOTATED.items():
    assert body[joint, 2] > 0, f"joint {joint} missing"
    err = float(np.hypot(body[joint, 0] - x, body[joint, 1] - y))
    assert err < tol, f"joint {joint} at {body[joint, :2]}, {err:.1f} px from ({x}, {y})"
  for joint in (0, 1, 2, 5, 14, 15):  # clearly visible: confident
    assert body[joint, 2] > 0.5
  np.testing.assert_allclose(body[1, :2], (body[2, :2] + body[5, :2]) / 2)  # the neck is the shoulders' midpoint
  # Face present: confident, its nose tip (iBUG 30) on the annotated nose, the pupils on the eyes.
  face = astronaut_pose.face
  assert (face[:, 2] > 0.5).all()
  assert np.hypot(*(face[30, :2] - (221, 125))) < 0.03 * SIDE
  assert np.hypot(*(face[68, :2] - (207, 105))) < 0.02 * SIDE and np.hypot(*(face[69, :2] - (245, 105))) < 0.02 * SIDE
  # Jaw (0-16) from her right (image left) round the chin (8) to her left: the iBUG order.
  assert face[0, 0] < face[8, 0] < face[16, 0] and face[8, 1] > face[30, 1] > face[27, 1]
  # Gloved hands at the image edge: none reported (missing, not a guess).
  assert (astronaut_pose.hands[..., 2] == 0).all()


def test_rotated_photo_gives_rotated_keypoints(holistic, astronaut_pose):
  # Rotating the image 90 degrees clockwise maps pixel (x, y) to (H - 1 - y, x): the rotated regions of interest
  # (detector keypoints -> pose, eyes -> face) must follow.
  (rotated,) = holistic(np.ascontiguousarray(np.rot90(skimage.data.astronaut(), k=-1)))

  def turn(kp):
    return np.stack([SIDE - 1 - kp[..., 1], kp[..., 0]], axis=-1)

  assert np.hypot(*(rotated.body[0, :2] - turn(astronaut_pose.body[0]))) < 0.03 * SIDE
  assert np.abs(rotated.face[:, :2] - turn(astronaut_pose.face)).max() < 0.02 * SIDE


def test_no_person_and_unreadable_frames_are_reported(holistic):
  blank = np.zeros((240, 320, 3), np.uint8)
  assert holistic(blank) == []
  noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
  poses, report = extract.extract_poses([blank, skimage.data.astronaut(), None, noise], holistic)
  assert poses[0] is None and poses[1] is not None and poses[2] is None and poses[3] is None
  assert report == {"frames": 4, "with_person": 1, "no_person": [0, 3], "unreadable": [2], "several_people": []}
  with pytest.raises(ValueError, match="RGB uint8 image"):
    holistic(blank[..., 0])


def test_anchors_match_the_detector_head():
  anchors = roi.ssd_anchors(224, (8, 16, 32, 32, 32))
  # 28 x 28 x 2 + 14 x 14 x 2 + 7 x 7 x 6: the pose detector's 2254 boxes.
  assert anchors.shape == (2254, 2)
  np.testing.assert_allclose(anchors[:4], [[0.5 / 28, 0.5 / 28]] * 2 + [[1.5 / 28, 0.5 / 28]] * 2)
  np.testing.assert_allclose(anchors[1568], [0.5 / 14, 0.5 / 14])
  np.testing.assert_allclose(anchors[-1], [6.5 / 7, 6.5 / 7])


def test_weighted_nms_blends_overlapping_boxes():
  boxes = np.array([[0.5, 0.5, 0.2, 0.2], [0.52, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
  kps = boxes[:, None, :2].copy()
  scores = np.array([0.9, 0.6, 0.7])
  out = roi.weighted_nms(boxes, kps, scores, 0.3)
  assert [round(s, 2) for s, _, _ in out] == [0.9, 0.7]
  np.testing.assert_allclose(out[0][1][0], (0.9 * 0.5 + 0.6 * 0.52) / 1.5)


def test_rotated_crop_and_projection_agree():
  # A bright dot, cropped through a rotated, off-centre square: the crop's brightest pixel projects back onto it.
  image = np.zeros((120, 160, 3), np.uint8)
  image[40, 100] = 255
  rect = roi.Rect(95.0, 50.0, 40.0, 40.0, np.deg2rad(30))
  patch = roi.crop(image, rect, 64, replicate_border=False).astype(float).sum(-1)
  row, col = np.unravel_index(np.argmax(patch), patch.shape)
  back = roi.project(np.array([(col + 0.5) / 64, (row + 0.5) / 64]), rect) - 0.5  # continuous -> pixel index
  np.testing.assert_allclose(back, (100, 40), atol=0.7)
  # And the rotation convention: a rect turned by +90 degrees has its "up" pointing to the image's right.
  up = roi.project(np.array([0.5, 0.0]), roi.Rect(0, 0, 2, 2, np.pi / 2))
  np.testing.assert_allclose(up, (1, 0), atol=1e-9)
  assert roi.rotation_to(np.array([0, 0]), np.array([0, -1]), 90) == pytest.approx(0)  # upright: no rotation


def test_face_tables():
  assert len(FACE68_FROM_MESH) == 68 and len(set(FACE68_FROM_MESH.tolist())) == 68
  assert FACE68_FROM_MESH.max() < 468 and len(RIGHT_EYE_MESH) == len(LEFT_EYE_MESH) == 16


def _fake_wheel(path, names=models.REQUIRED):
  with zipfile.ZipFile(path, "w") as z:
    for i, name in enumerate(names):
      z.writestr(f"mediapipe/modules/part{i}/{name}", f"model {name}".encode())
    z.writestr("mediapipe/modules/pose_detection/pose_detection_pb2.py", "not a model")
    z.writestr("mediapipe/other/elsewhere.tflite", b"outside modules/")
  return path


def test_install_from_a_wheel_is_idempotent(tmp_path):
  wheel = _fake_wheel(tmp_path / "mediapipe-0.10.21-py3-none-any.whl")
  target = tmp_path / "models"
  folder, wrote = models.install(target, wheel=wheel)
  assert wrote and folder == str(target)
  assert sorted(p.name for p in target.iterdir()) == sorted([*models.REQUIRED, models.MANIFEST])
  manifest = json.loads((target / models.MANIFEST).read_text())
  for name in models.REQUIRED:
    assert (target / name).read_bytes() == f"model {name}".encode()
    assert manifest["files"][name] == hashlib.sha256(f"model {name}".encode()).hexdigest()
  assert models.check_installed(target) == str(target)
  # Present: nothing is redone (a wheel that would fail is not even opened).
  assert models.install(target, wheel=tmp_path / "missing.whl") == (str(target), False)


def test_install_errors_name_the_problem(tmp_path):
  bad = tmp_path / "bad.whl"
  bad.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="bad.whl: not a wheel"):
    models.install(tmp_path / "a", wheel=bad)
  short = _fake_wheel(tmp_path / "short.whl", models.REQUIRED[:-1])
  with pytest.raises(ValueError, match=f"no {models.REQUIRED[-1]}"):
    models.install(tmp_path / "b", wheel=short)
  assert models.main(["install", "--dir", str(tmp_path / "c"), "--wheel", str(bad)]) == 2


def test_missing_model_says_the_command(tmp_path, monkeypatch):
  monkeypatch.setenv(models.ENV_DIR, str(tmp_path / "empty"))
  assert models.models_dir() == str(tmp_path / "empty")
  with pytest.raises(models.MissingModelError, match="run once:  python -m magicpose_jax.pose.models install"):
    Holistic()
  with pytest.raises(FileNotFoundError, match="pose_detection.tflite is not installed"):
    extract.make_estimator()
  assert extract.main(["--src", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def test_video_poses_aligned_to_the_reference(tmp_path):
  import cv2  # noqa: PLC0415

  from magicpose_jax import inference  # noqa: PLC0415

  astronaut = skimage.data.astronaut()
  video = str(tmp_path / "clip.avi")
  writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5, (SIDE, SIDE))
  for frame in (astronaut, np.zeros_like(astronaut), astronaut):
    writer.write(np.ascontiguousarray(frame[..., ::-1]))
  writer.release()
  renders, report = inference.load_aligned_poses(video, (64, 64), astronaut)
  assert renders.shape == (3, 64, 64, 3) and renders.dtype == np.uint8
  assert report["no_person"] == [1] and report["anchor_frame"] == 0 and report["extract"]["no_person"] == [1]
  assert renders[1].max() == 0 and renders[0].max() > 0  # the empty frame is kept, blank
  # The same person: the scales are ~1 (the video's JPEG frames are not bit-identical to the reference).
  assert all(abs(s - 1) < 0.05 for s in report["scales"].values()), report["scales"]
