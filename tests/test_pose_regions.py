"""The head region a pose implies (pose/regions.py), against the synthetic renderer's own head pixels."""

import numpy as np
import pytest

from magicpose_jax.data.augment import AugmentConfig, augment_example
from magicpose_jax.data.synthetic import PART_NAMES, SyntheticConfig, SyntheticSource
from magicpose_jax.pose.keypoints import COCO18_NAMES, Pose, flip_horizontal
from magicpose_jax.pose.regions import eye_mask, head_mask

HEAD = PART_NAMES.index("head")


@pytest.fixture(scope="module")
def frames():
  source = SyntheticSource(SyntheticConfig(image_size=128, num_identities=60, frames_per_identity=8))
  return [source.frame(v, f) for v in range(0, 60, 3) for f in range(8)]  # every hair style, tilts, expressions


def test_head_mask_covers_the_drawn_head_hair_included(frames):
  """The renderer's part mask is the independent truth: the region from the keypoints covers nearly all of the
  drawn head (face and hair) in every frame, and not much more."""
  coverage, area = [], []
  for frame in frames:
    mask = head_mask([frame["pose"]], 128, 128)
    head = frame["part_mask"] == HEAD
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    coverage.append(mask[head].mean())
    area.append(mask.sum() / head.sum())
  assert np.mean(coverage) >= 0.95 and np.percentile(coverage, 5) >= 0.88, (np.mean(coverage), min(coverage))
  assert np.mean(area) <= 1.6, np.mean(area)


def test_eye_mask_covers_every_drawn_eye_and_little_else():
  """The renderer is the truth: every eye-white pixel the generator drew lies in the mask, open and shut eyes alike
  get a region, and it is a small part of the head; an eye with a hidden landmark is left out."""
  source = SyntheticSource(SyntheticConfig(image_size=128, num_identities=60, frames_per_identity=8))
  covered, share = [], []
  for v in range(0, 60, 3):
    white = np.array(source.palette(v)["head"]["eye_white"])
    for f in range(8):
      frame = source.frame(v, f)
      mask = eye_mask([frame["pose"]], 128, 128)
      assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1} and mask.any()
      head = frame["part_mask"] == HEAD
      eye = head & (frame["image"] == white).all(-1)
      if eye.any():
        covered.append(mask.astype(bool)[eye].mean())
      share.append(mask[head].mean())
  assert len(covered) > 40 and min(covered) == 1.0, (len(covered), min(covered))
  assert 0.01 < np.mean(share) < 0.15, np.mean(share)
  pose = frame["pose"]
  face = pose.face.copy()
  face[37, 2] = 0
  hidden = Pose(pose.body, pose.hands, face)
  assert 0 < eye_mask([hidden], 128, 128).sum() < 0.7 * eye_mask([pose], 128, 128).sum()
  assert not eye_mask(None, 8, 8).any()


def test_head_mask_follows_a_horizontal_flip(frames):
  frame = frames[5]
  flipped = head_mask([flip_horizontal(frame["pose"], 128)], 128, 128)
  mirrored = head_mask([frame["pose"]], 128, 128)[:, ::-1]
  assert flipped.sum() > 50
  assert (flipped != mirrored).mean() < 0.005  # rasterisation may differ on the outline's pixels only


def test_without_landmarks_the_body_head_points_give_a_disc():
  body = np.zeros((18, 3))
  for name, xy in (("nose", (40, 30)), ("right_eye", (37, 27)), ("left_eye", (43, 27)), ("right_ear", (33, 29)),
                   ("left_ear", (47, 29))):
    body[COCO18_NAMES.index(name)] = (*xy, 1)
  pose = Pose(body, np.zeros((2, 21, 3)), np.zeros((70, 3)))
  mask = head_mask([pose], 64, 64)
  ys, xs = np.nonzero(mask)
  assert mask[30, 40] and mask[29, 33] and mask[29, 47]  # nose and ears inside
  assert 33 - 8 <= xs.min() and xs.max() <= 47 + 8 and ys.max() < 45  # ~0.75 x the ears' distance around them
  one_point = np.zeros((18, 3))
  one_point[0] = (40, 30, 1)
  assert not head_mask([Pose(one_point, np.zeros((2, 21, 3)), np.zeros((70, 3)))], 64, 64).any()
  assert not head_mask(None, 8, 8).any() and not head_mask([Pose.empty()], 8, 8).any()


def test_augmented_examples_carry_the_head_of_their_cropped_flipped_target(frames):
  """`augment_example(..., with_head_mask=True)`: the mask follows the target's crop and flip. The truth is the
  renderer's head pixels passed through the same augmentation as the target image."""
  config = AugmentConfig(enabled=True, crop_scale=(0.8, 1.0), flip=True, flip_prob=0.5)
  coverage, flips = [], 0
  for i, frame in enumerate(frames[:40]):
    head = np.repeat((frame["part_mask"] == HEAD)[..., None] * np.uint8(255), 3, -1)
    out = augment_example(np.random.default_rng(i), frame["image"], head, frame["pose_image"], [frame["pose"]], 64,
                          config, with_head_mask=True)
    plain = augment_example(np.random.default_rng(i), frame["image"], head, frame["pose_image"], [frame["pose"]], 64,
                            config)
    assert "head_mask" not in plain and out["head_mask"].shape == (64, 64)
    truth = out["target"][..., 0] >= 128
    coverage.append(out["head_mask"][truth].mean())
    flips += int(not np.array_equal(out["target"], augment_example(
        np.random.default_rng(i), frame["image"], head, frame["pose_image"], [frame["pose"]], 64,
        AugmentConfig(enabled=True, crop_scale=(0.8, 1.0), flip=False))["target"]))
  assert np.mean(coverage) >= 0.9, np.mean(coverage)
  assert 5 <= flips <= 35  # both flipped and unflipped examples were checked
