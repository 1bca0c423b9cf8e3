"""Dataset layouts, the record format, pair sampling and augmentation (data/layouts, records, pairs, augment)."""

import os

import numpy as np
import pytest
from dataset_folders import HEIGHT, WIDTH, frame_image, frame_pose, write_image, write_tiktok

from magicpose_jax.data import records
from magicpose_jax.data.augment import AugmentConfig, augment_example, center_box, crop_poses, random_box
from magicpose_jax.data.layouts import FrameError, edn_source, natural_key, open_layout, tiktok_source
from magicpose_jax.data.pairs import FrameIndex, PairConfig, sample_reference
from magicpose_jax.pose import Pose, render, write_openpose_json
from magicpose_jax.pose.render import BODY_COLORS

# ---------------------------------------------------------------------------------------------------- layouts


def test_tiktok_layout_finds_frames_and_reports_every_skip(tmp_path):
  expected = write_tiktok(str(tmp_path))
  source = tiktok_source(tmp_path)
  assert source.videos == ["v0", "v1", "v2"]
  found = [(source.files(v, f).video, source.files(v, f).frame)
           for v in range(source.num_videos) for f in range(source.num_frames(v))]
  # The corrupt and the near-constant frames are still frames here: they fail (or are filtered) on decoding.
  assert found == expected["good"][:4] + [("v0", "f4")] + expected["good"][4:7] + [("v1", "f3")] + expected[
      "good"][7:]
  skipped = {(s.reason, os.path.relpath(s.path, tmp_path)) for s in source.skipped}
  assert skipped == {("missing_pose", "train_set/v2/f3.png"), ("empty_video", "train_set/v3")}


def test_tiktok_frame_contents(tmp_path):
  write_tiktok(str(tmp_path))
  source = tiktok_source(tmp_path)
  json_frame = source.frame(0, 1)  # v0/f1: JSON pose, rendered
  assert json_frame["video"] == "v0" and json_frame["frame"] == "f1"
  np.testing.assert_array_equal(json_frame["image"], frame_image(2))
  assert json_frame["pose"] == frame_pose(2)
  np.testing.assert_array_equal(json_frame["pose_image"], render(frame_pose(2), HEIGHT, WIDTH))
  map_frame = source.frame(2, 1)  # v2/f1: pose map only
  assert map_frame["pose"] is None and map_frame["poses"] is None
  np.testing.assert_array_equal(map_frame["pose_image"], render(frame_pose(9), HEIGHT, WIDTH))
  assert map_frame["image"].shape == (HEIGHT, WIDTH, 3) and map_frame["image"].dtype == np.uint8


def test_corrupt_files_raise_frame_errors(tmp_path):
  write_tiktok(str(tmp_path))
  source = tiktok_source(tmp_path)
  with pytest.raises(FrameError, match=r"v1/f3.jpg: corrupt_image") as e:
    source.frame(1, 3)
  assert e.value.reason == "corrupt_image"
  (tmp_path / "train_set" / "v0" / "f0.json").write_text('{"people": [{"pose_keypoints_2d": [1, 2]}]}')
  with pytest.raises(FrameError, match=r"f0.json: corrupt_pose .*pose_keypoints_2d"):
    source.frame(0, 0)


def test_pose_map_and_json_together(tmp_path):
  write_tiktok(str(tmp_path))
  # v1/f0 has a pose map; a JSON beside it adds keypoints, the map stays the pose image.
  write_openpose_json(tmp_path / "train_set" / "v1" / "f0_keypoints.json", [frame_pose(50)])
  frame = tiktok_source(tmp_path).frame(1, 0)
  assert frame["pose"] == frame_pose(50)
  np.testing.assert_array_equal(frame["pose_image"], render(frame_pose(5), HEIGHT, WIDTH))


def test_edn_layout(tmp_path):
  for i in (10, 2, 1):  # natural order: f1, f2, f10
    write_image(str(tmp_path / "subject1" / "train" / f"f{i}.png"), frame_image(i))
    write_image(str(tmp_path / "subject1" / "train" / "pose_map" / f"f{i}.png"), render(frame_pose(i), HEIGHT, WIDTH))
  write_image(str(tmp_path / "subject2" / "train" / "a.jpg"), frame_image(7))
  write_openpose_json(tmp_path / "subject2" / "train" / "a.json", [frame_pose(7)])
  write_image(str(tmp_path / "subject3" / "val" / "a.png"), frame_image(8))  # no train/ folder
  source = edn_source(tmp_path)
  assert source.videos == ["subject1", "subject2"]
  assert [source.files(0, f).frame for f in range(3)] == ["f1", "f2", "f10"]
  assert source.frame(1, 0)["pose"] == frame_pose(7)
  assert [(s.reason, os.path.relpath(s.path, tmp_path)) for s in source.skipped] == [
      ("empty_video", "subject3/train")]
  val = open_layout("edn", tmp_path, "val")  # subject3's val frame has no pose; the others have no val/
  assert val.videos == []
  assert sorted(s.reason for s in val.skipped) == ["empty_video", "empty_video", "missing_pose"]


def test_layout_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"train_set: no such folder \(TikTok layout"):
    tiktok_source(tmp_path)
  with pytest.raises(ValueError, match="unknown layout 'coco'"):
    open_layout("coco", tmp_path)


def test_natural_key():
  assert sorted(["f10", "f2", "f1", "g0"], key=natural_key) == ["f1", "f2", "f10", "g0"]


# ---------------------------------------------------------------------------------------------------- records


def test_record_round_trip_and_determinism():
  fields = {"video": "v0", "frame": "f1", "image": b"\x89PNG...", "latent": np.arange(24, dtype=np.float32).reshape(
      2, 3, 4), "ids": np.array([1, -2], np.int64), "flag": np.array(True), "empty": np.zeros((0, 18, 3), np.float32)}
  data = records.encode_example(fields)
  assert data == records.encode_example(dict(reversed(list(fields.items()))))
  out = records.decode_example(data)
  assert set(out) == set(fields)
  for key, value in fields.items():
    if isinstance(value, np.ndarray):
      assert out[key].dtype == value.dtype and out[key].shape == value.shape
      np.testing.assert_array_equal(out[key], value)
    else:
      assert out[key] == value


def test_record_errors():
  with pytest.raises(records.RecordError, match="field 'x': only bool/int/float arrays"):
    records.encode_example({"x": np.array(["a"], object)})
  with pytest.raises(records.RecordError, match="field 'x': expected a numpy array, bytes or str, got list"):
    records.encode_example({"x": [1, 2]})
  with pytest.raises(records.RecordError, match="not a magicpose_jax record"):
    records.decode_example(b"PK\x03\x04 zip")
  with pytest.raises(records.RecordError, match="image: 3 bytes that OpenCV cannot decode"):
    records.decode_image(b"abc")


def test_pose_fields_round_trip():
  poses = [frame_pose(1), frame_pose(2)]
  out = records.poses_from_fields(records.decode_example(records.encode_example(records.pose_fields(poses))))
  assert out == poses
  assert records.poses_from_fields(records.pose_fields([])) == []
  assert records.poses_from_fields({}) is None


def test_image_codec_is_lossless_for_png():
  image = frame_image(3)
  np.testing.assert_array_equal(records.decode_image(records.encode_image(image)), image)
  assert records.encode_image(image) == records.encode_image(image)


# ---------------------------------------------------------------------------------------------------- pairs


def test_frame_index():
  index = FrameIndex([3, 0, 2])
  assert len(index) == 5
  assert [index.locate(i) for i in range(5)] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]
  with pytest.raises(IndexError):
    index.locate(5)


def test_reference_is_uniform_over_the_video():
  rng = np.random.default_rng(0)
  draws = [sample_reference(rng, 5, 2, PairConfig()) for _ in range(5000)]
  counts = np.bincount(draws, minlength=5)
  assert counts.min() > 900 and counts.max() < 1100  # 1000 expected each


@pytest.mark.parametrize(("min_gap", "allow_same", "allowed"), [
    (0, False, {0, 1, 3, 4, 5}), (2, True, {0, 4, 5}), (3, True, {5}),
])
def test_reference_respects_the_gap(min_gap, allow_same, allowed):
  rng = np.random.default_rng(1)
  draws = {sample_reference(rng, 6, 2, PairConfig(min_gap=min_gap, allow_same=allow_same)) for _ in range(500)}
  assert draws == allowed


def test_reference_falls_back_to_the_farthest_frame():
  rng = np.random.default_rng(0)
  assert sample_reference(rng, 1, 0, PairConfig(allow_same=False)) == 0
  assert sample_reference(rng, 3, 0, PairConfig(min_gap=5)) == 2
  assert sample_reference(rng, 3, 2, PairConfig(min_gap=5)) == 0
  with pytest.raises(ValueError, match="min_gap must be >= 0"):
    PairConfig(min_gap=-1)


# ---------------------------------------------------------------------------------------------------- augment


def _marker_centre(image: np.ndarray) -> np.ndarray:
  """(x, y) centroid of the bright pixels of an otherwise black image."""
  ys, xs = np.nonzero(image.max(axis=-1) > 100)
  return np.array([xs.mean(), ys.mean()])


def _one_joint_pose(joint: int, x: float, y: float) -> Pose:
  body = np.zeros((18, 3), np.float32)
  body[joint] = (x, y, 1.0)
  return Pose(body, np.zeros((2, 21, 3)), np.zeros((70, 3)))


def test_random_box_is_a_square_of_the_requested_scale():
  rng = np.random.default_rng(0)
  for _ in range(200):
    x0, y0, x1, y1 = random_box(rng, 80, 60, (0.9, 1.0))
    assert x1 - x0 == y1 - y0 and 0 <= x0 and x1 <= 60 and 0 <= y0 and y1 <= 80
    assert round(np.sqrt(0.9) * 60) <= x1 - x0 <= 60
  assert center_box(80, 60) == (0, 10, 60, 70)


def test_crop_moves_target_and_pose_together_and_reference_independently():
  size, x, y = 64, 20.0, 41.0
  target = np.zeros((size, size, 3), np.uint8)
  target[40:43, 19:22] = 255  # a 3x3 marker centred on the joint
  pose = _one_joint_pose(0, x, y)
  pose_image = render(pose, size, size)
  config = AugmentConfig(crop_scale=(0.5, 0.6))  # big moves, so misalignment would show
  moved = []
  for seed in range(8):
    out = augment_example(np.random.default_rng(seed), target, target, pose_image, [pose], size, config)
    # Where crop_resize puts the keypoint is where the target's marker and the pose's joint went.
    keypoint = crop_poses([pose], random_box(np.random.default_rng(seed), size, size, config.crop_scale), size)[0]
    np.testing.assert_allclose(_marker_centre(out["target"]), keypoint.body[0, :2], atol=0.75)
    np.testing.assert_allclose(_marker_centre(out["pose"]), keypoint.body[0, :2], atol=0.75)
    moved.append(np.abs(_marker_centre(out["reference"]) - _marker_centre(out["target"])).max())
  assert max(moved) > 2  # the reference's crop is its own


def test_flip_swaps_sides_and_rerenders_the_pose():
  size = 48
  target = frame_image(5, size, size)
  pose = _one_joint_pose(2, 10.0, 20.0)  # the right shoulder
  pose_image = render(pose, size, size)
  plain = augment_example(np.random.default_rng(3), target, target, pose_image, [pose], size,
                          AugmentConfig(crop_scale=(1.0, 1.0)))
  flipped = augment_example(np.random.default_rng(3), target, target, pose_image, [pose], size,
                            AugmentConfig(crop_scale=(1.0, 1.0), flip=True, flip_prob=1.0))
  np.testing.assert_array_equal(flipped["target"], plain["target"][:, ::-1])
  np.testing.assert_array_equal(flipped["reference"], plain["reference"])
  # After the flip the joint is a *left* shoulder (its colour too), at the mirrored x.
  np.testing.assert_array_equal(flipped["pose"], render(_one_joint_pose(5, size - 1 - 10.0, 20.0), size, size))
  assert tuple(flipped["pose"][20, size - 1 - 10]) == BODY_COLORS[5]
  assert not np.array_equal(flipped["pose"], plain["pose"][:, ::-1])  # a mirrored render keeps the wrong colour
  # A thin-stroke render (SyntheticConfig.pose_scale) is drawn again at its own scale.
  thin = augment_example(np.random.default_rng(3), target, target, render(pose, size, size, scale=0.25), [pose], size,
                         AugmentConfig(crop_scale=(1.0, 1.0), flip=True, flip_prob=1.0), pose_scale=0.25)
  np.testing.assert_array_equal(thin["pose"], render(_one_joint_pose(5, size - 1 - 10.0, 20.0), size, size, scale=0.25))
  # ... and a supersampled one supersampled again (SyntheticConfig.pose_supersample).
  fine = augment_example(np.random.default_rng(3), target, target, render(pose, size, size, supersample=4), [pose],
                         size, AugmentConfig(crop_scale=(1.0, 1.0), flip=True, flip_prob=1.0), pose_supersample=4)
  np.testing.assert_array_equal(fine["pose"], render(_one_joint_pose(5, size - 1 - 10.0, 20.0), size, size,
                                                     supersample=4))
  # Without keypoints the render can only be mirrored.
  mirrored = augment_example(np.random.default_rng(3), target, target, pose_image, None, size,
                             AugmentConfig(crop_scale=(1.0, 1.0), flip=True, flip_prob=1.0))
  np.testing.assert_array_equal(mirrored["pose"], plain["pose"][:, ::-1])


def test_disabled_augmentation_centre_crops():
  image = frame_image(1, 48, 40)
  out = augment_example(np.random.default_rng(0), image, image, image, None, 40,
                        AugmentConfig(enabled=False, flip=True, flip_prob=1.0))
  for key in ("reference", "target", "pose"):
    np.testing.assert_array_equal(out[key], image[4:44])


def test_augment_config_errors():
  with pytest.raises(ValueError, match="crop_scale must satisfy"):
    AugmentConfig(crop_scale=(0.9, 1.1))
  with pytest.raises(ValueError, match="pose image .* and target .* differ in size"):
    augment_example(np.random.default_rng(0), frame_image(0), frame_image(0), frame_image(0, 8, 8), None, 32,
                    AugmentConfig())
