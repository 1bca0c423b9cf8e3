"""Pose alignment on synthetic skeletons built by forward kinematics, so the expected answer is known exactly."""

import math

import numpy as np
import pytest

from magicpose_jax.pose import Pose
from magicpose_jax.pose.align import TREE, align_poses, limb_scales

# Reference limb lengths (pixels) and the default joint directions (radians, image coordinates: 0 = right,
# pi/2 = down), per child joint of the COCO-18 tree.
REF_LENGTHS = {"neck": 40.0, "face": 12.0, "shoulder": 35.0, "upper_arm": 50.0, "forearm": 45.0, "torso": 110.0,
               "thigh": 80.0, "shin": 75.0}
DIRS = {0: -math.pi / 2, 14: -2.2, 15: -0.9, 16: -2.9, 17: -0.2, 2: math.pi, 5: 0.0, 3: 1.9, 6: 1.2, 4: 1.8, 7: 1.3,
        8: 1.75, 11: 1.39, 9: 1.65, 12: 1.49, 10: 1.6, 13: 1.54}
RNG = np.random.default_rng(0)
HAND_OFFSETS = RNG.normal(0, 8, (2, 21, 2))
HAND_OFFSETS[:, 0] = 0  # the hand's own wrist sits on the body's wrist
FACE_OFFSETS = RNG.normal(0, 10, (70, 2))


def skeleton(lengths: dict, dirs: dict, neck=(200.0, 120.0), hand_scale=1.0, face_scale=1.0) -> Pose:
  """A pose by forward kinematics from the neck, with hands around the wrists and a face around the nose."""
  body = np.zeros((18, 3))
  body[1] = (*neck, 1.0)
  for parent, child, limb in TREE:
    d = np.array([math.cos(dirs[child]), math.sin(dirs[child])])
    body[child] = (*(body[parent, :2] + lengths[limb] * d), 1.0)
  hands = np.ones((2, 21, 3))
  hands[0, :, :2] = body[7, :2] + hand_scale * HAND_OFFSETS[0]  # left hand on the left wrist (7)
  hands[1, :, :2] = body[4, :2] + hand_scale * HAND_OFFSETS[1]
  face = np.ones((70, 3))
  face[:, :2] = body[0, :2] + face_scale * FACE_OFFSETS
  return Pose(body, hands, face)


def limb_lengths(pose: Pose) -> np.ndarray:
  return np.array([np.hypot(*(pose.body[c, :2] - pose.body[p, :2])) for p, c, _ in TREE])


# The dancer: other proportions (arms longer, legs shorter, ...) and filmed smaller and elsewhere.
PROPORTIONS = {"neck": 1.2, "face": 0.9, "shoulder": 1.1, "upper_arm": 1.3, "forearm": 1.3, "torso": 1.05,
               "thigh": 0.8, "shin": 0.8}
CAMERA_SCALE, CAMERA_SHIFT = 0.5, np.array([310.0, -20.0])
HAND_RATIO = 1.25


def dancer(dirs: dict, neck_motion=(0.0, 0.0)) -> Pose:
  lengths = {k: v * PROPORTIONS[k] * CAMERA_SCALE for k, v in REF_LENGTHS.items()}
  neck = np.array([200.0, 120.0]) * CAMERA_SCALE + CAMERA_SHIFT + np.array(neck_motion)
  return skeleton(lengths, dirs, neck, HAND_RATIO * CAMERA_SCALE, PROPORTIONS["face"] * CAMERA_SCALE)


def moved(changes: dict) -> dict:
  """DIRS with some joints pointing elsewhere (another frame of the dance)."""
  return {**DIRS, **changes}


def test_scaled_and_shifted_dancer_gets_the_reference_proportions():
  reference = skeleton(REF_LENGTHS, DIRS)
  frames = [dancer(DIRS), dancer(moved({4: 0.3, 3: 2.5}), (6.0, 0.0)),
            dancer(moved({9: 1.0, 10: 2.4, 7: -1.0}), (-4.0, 3.0))]
  aligned, report = align_poses(frames, reference)
  assert report["anchor_frame"] == 0 and report["no_person"] == []
  expected_scales = {k: 1 / (PROPORTIONS[k] * CAMERA_SCALE) for k in PROPORTIONS}
  for limb, scale in expected_scales.items():
    assert report["scales"][limb] == pytest.approx(scale, rel=1e-4), limb
  assert report["scales"]["hand"] == pytest.approx(1 / (HAND_RATIO * CAMERA_SCALE), rel=1e-4)
  # Tolerance: limb lengths within 0.1 % of the reference's in every frame (exact up to float32 rounding).
  for pose in aligned:
    np.testing.assert_allclose(limb_lengths(pose), limb_lengths(reference), rtol=1e-3)
  # The anchor frame lands on the reference itself (same angles), hands and face included.
  for field in ("body", "hands", "face"):
    np.testing.assert_allclose(getattr(aligned[0], field), getattr(reference, field), atol=1e-3)
  # Later frames keep the dancer's angles and move the neck by the dancer's motion, scaled to the reference.
  for pose, frame in zip(aligned[1:], frames[1:], strict=True):
    for p, c, _ in TREE:
      a = pose.body[c, :2] - pose.body[p, :2]
      b = frame.body[c, :2] - frame.body[p, :2]
      assert math.atan2(a[1], a[0]) == pytest.approx(math.atan2(b[1], b[0]), abs=1e-4)
  global_scale = report["global_scale"]
  motion = (aligned[2].body[1, :2] - aligned[0].body[1, :2]) / global_scale
  np.testing.assert_allclose(motion, frames[2].body[1, :2] - frames[0].body[1, :2], atol=1e-3)
  # Hands ride on their wrists at the reference's hand size.
  np.testing.assert_allclose(aligned[1].hands[1, :, :2] - aligned[1].body[4, :2], HAND_OFFSETS[1], atol=1e-3)


def test_identity_when_driving_is_the_reference_person():
  reference = skeleton(REF_LENGTHS, DIRS)
  frames = [reference, skeleton(REF_LENGTHS, moved({4: 0.5, 13: 1.2}), neck=(210.0, 118.0))]
  aligned, report = align_poses(frames, reference)
  assert all(v == pytest.approx(1.0) for v in report["scales"].values())
  for ours, theirs in zip(aligned, frames, strict=True):
    for field in ("body", "hands", "face"):
      np.testing.assert_allclose(getattr(ours, field), getattr(theirs, field), atol=1e-3)


def test_frames_without_a_person_are_reported_and_kept():
  reference = skeleton(REF_LENGTHS, DIRS)
  ghost = Pose(np.full((18, 3), 0.1), np.zeros((2, 21, 3)), np.zeros((70, 3)))  # nothing above the threshold
  frames = [None, dancer(DIRS), Pose.empty(), ghost, dancer(moved({4: 0.4}))]
  aligned, report = align_poses(frames, reference)
  assert len(aligned) == 5 and report["frames"] == 5
  assert report["no_person"] == [0, 2, 3] and report["anchor_frame"] == 1
  assert aligned[0] == Pose.empty() and aligned[2] == Pose.empty() and aligned[3] == Pose.empty()
  np.testing.assert_allclose(aligned[1].body, reference.body, atol=1e-3)
  # Nobody at all: every frame is reported, nothing raises.
  aligned, report = align_poses([None, Pose.empty()], reference)
  assert report["no_person"] == [0, 1] and aligned == [Pose.empty(), Pose.empty()]


def test_missing_joints_stay_missing_and_one_sided_limbs_use_the_other_side():
  reference = skeleton(REF_LENGTHS, DIRS)
  frame = dancer(DIRS)
  body = frame.body.copy()
  body[6, 2] = 0.0  # left elbow unseen: the left forearm's scale cannot be measured on this side
  partial = Pose(body, frame.hands, frame.face)
  scales = limb_scales(partial, reference)
  assert scales["upper_arm"] == pytest.approx(1 / (PROPORTIONS["upper_arm"] * CAMERA_SCALE), rel=1e-4)
  aligned, _ = align_poses([partial], reference)
  assert aligned[0].body[6, 2] == 0 and aligned[0].body[7, 2] > 0  # the wrist is still placed (neck mapping)
  with pytest.raises(ValueError, match="reference pose holds no person"):
    align_poses([frame], Pose.empty())
