"""Pose (part IoU) and identity (region colour) metrics on synthetic ground truth: perfect on the ground truth,
robust to noise, lower for another pose, higher identity error for another person's colours; the palette
accessor they read."""

import json

import numpy as np
import pytest

from magicpose_jax.data.synthetic import PART_NAMES, SyntheticConfig, SyntheticSource
from magicpose_jax.eval.figure_metrics import (
  REGIONS,
  evaluate_figures,
  eye_state_accuracy,
  eye_white_share,
  palette_from_frame,
  recover_parts,
  region_map,
)
from magicpose_jax.pose.keypoints import Pose

NUM = 8  # identities; one frame each


@pytest.fixture(scope="module")
def source():
  return SyntheticSource(SyntheticConfig(image_size=64, num_identities=NUM, frames_per_identity=4))


@pytest.fixture(scope="module")
def frames(source):
  return [source.frame(v, 0) for v in range(NUM)]


def _images(frames):
  return np.stack([frame["image"] for frame in frames])


def _recolour(image, mask, palette_from, palette_to):
  """The same pose in another person's colours: each part's colour -> the other palette's colour of that name."""
  out = image.copy()
  for label, name in enumerate(PART_NAMES):
    inside = mask == label
    if name == "background":  # keep the position along the background's colour segment
      a0, a1 = (np.array(palette_from[name][k], float) for k in ("background", "background_2"))
      b0, b1 = (np.array(palette_to[name][k], float) for k in ("background", "background_2"))
      t = np.clip((image[inside] - a0) @ (a1 - a0) / max((a1 - a0) @ (a1 - a0), 1e-9), 0, 1)
      out[inside] = np.round(b0 + t[:, None] * (b1 - b0)).astype(np.uint8)
      continue
    for key, colour in palette_from[name].items():
      out[inside & (image == colour).all(-1)] = palette_to[name].get(key, palette_to["torso"]["shirt"])
  return out


def test_palette_covers_every_pixel(source, frames):
  for frame in frames:
    palette = source.palette(frame["identity"])
    assert set(palette) == set(PART_NAMES)
    image, mask = frame["image"], frame["part_mask"]
    for label, name in enumerate(PART_NAMES[1:], start=1):
      colours = np.array(list(palette[name].values()))
      assert (image[mask == label][:, None] == colours).all(-1).any(-1).all(), name
    # Background pixels lie on the segment between its two colours (up to rounding down).
    a0, a1 = (np.array(palette["background"][k], float) for k in ("background", "background_2"))
    t = np.clip((image[mask == 0] - a0) @ (a1 - a0) / max((a1 - a0) @ (a1 - a0), 1e-9), 0, 1)
    assert np.linalg.norm(image[mask == 0] - (a0 + t[:, None] * (a1 - a0)), axis=-1).max() < 2


def test_palette_from_frame_reads_skin_hair_and_regions(source, frames):
  for frame in frames:
    palette = source.palette(frame["identity"])
    derived = palette_from_frame(frame["image"], frame["part_mask"])
    assert derived["head"]["skin"] == palette["head"]["skin"]
    assert derived["head"]["hair"] == palette["head"]["hair"]
    np.testing.assert_array_equal(region_map(frame["image"], frame["part_mask"], derived),
                                  region_map(frame["image"], frame["part_mask"], palette))


@pytest.mark.parametrize("with_palettes", [False, True])
def test_ground_truth_is_perfect_and_json_ready(source, frames, with_palettes):
  palettes = [source.palette(f["identity"]) for f in frames] if with_palettes else None
  result = evaluate_figures(_images(frames), frames, palettes)
  assert result["mean_iou"] == 1.0 and result["figure_iou"] == 1.0
  assert set(result["part_iou"].values()) == {1.0}
  assert result["identity_error"] == 0.0 and set(result["region_error"].values()) == {0.0}
  assert result["l1"] == 0.0 and result["ssim"] == 1.0 and result["face_l1"] == 0.0
  assert result["num_images"] == NUM and len(result["per_image"]["mean_iou"]) == NUM
  assert np.array(result["per_image"]["part_iou"]).shape == (NUM, len(PART_NAMES))
  assert np.array(result["per_image"]["region_error"]).shape == (NUM, len(REGIONS))
  json.dumps(result, allow_nan=False)  # every value finite


def test_face_l1_is_the_error_inside_the_head(frames):
  images = _images(frames)
  heads = np.stack([f["part_mask"] == PART_NAMES.index("head") for f in frames])
  outside, inside = images.copy(), images.copy()
  outside[~heads] = 255 - outside[~heads]
  inside[heads] = 255 - inside[heads]
  expected = np.mean([np.mean(np.abs(255 - 2 * images[i][heads[i]].astype(float))) / 255 for i in range(NUM)])
  assert evaluate_figures(outside, frames)["face_l1"] == 0.0
  np.testing.assert_allclose(evaluate_figures(inside, frames)["face_l1"], expected, rtol=1e-9)
  no_head = [{**f, "part_mask": np.where(f["part_mask"] == PART_NAMES.index("head"), 0, f["part_mask"])}
             for f in frames[:1]]
  result = evaluate_figures(images[:1], no_head)
  assert result["face_l1"] == 0.0 and result["per_image"]["face_l1"] == [None]


def _eyes_set(head_scale, count=120):
  """Frames of `count` people (frame 5 each) at `head_scale`, with their palettes."""
  src = SyntheticSource(SyntheticConfig(image_size=64, num_identities=count, frames_per_identity=8, detail="plain",
                                        head_scale=head_scale))
  frames = [src.frame(v, 5) for v in range(count)]
  return frames, [src.palette(v) for v in range(count)]


@pytest.mark.parametrize("head_scale, least", [(1.6, 0.97), (1.0, 0.75)])
def test_eye_state_reads_the_generators_expressions(head_scale, least):
  """On ground truth the eyes read open exactly where the generator drew them open (its eye_closure parameter, not
  the image), up to eyes too small to show their whites; painting the eyes over with skin reads every eye shut."""
  frames, palettes = _eyes_set(head_scale)
  closures = np.array([f["expression"][1] for f in frames])
  assert 10 < (closures >= 0.8).sum() < len(frames) - 10  # both states present
  truth = evaluate_figures(_images(frames), frames, palettes)
  assert truth["eye_state"] >= least
  shares = np.array(truth["per_image"]["eye_white_share"], dtype=float)
  assert np.all(shares[closures >= 0.8] == 0.0)  # shut eyes have no white
  blank = _images(frames).copy()
  for image, palette in zip(blank, palettes, strict=True):
    white = np.all(image == np.array(palette["head"]["eye_white"], np.uint8), -1)
    image[white] = palette["head"]["skin"]
  assert evaluate_figures(blank, frames, palettes)["eye_state"] == 0.5  # every eye shut: chance
  assert "eye_state" not in evaluate_figures(_images(frames), frames)  # no palettes: nothing to read the white by


def test_eye_state_accuracy_and_share_edges(frames):
  # Balanced: 2 of 3 open targets and 1 of 1 shut read right -> (2/3 + 1) / 2; NaN shares are left out.
  assert eye_state_accuracy([0.5, 0.2, 0.0, 0.0, np.nan], [0.0, 0.1, 0.2, 0.9, 0.0]) == pytest.approx(5 / 6)
  assert eye_state_accuracy([0.5, 0.5], [0.0, 0.0]) == 1.0 and np.isnan(eye_state_accuracy([np.nan], [0.0]))
  face = frames[0]["pose"].face.copy()
  face[36:48, 2] = 0
  assert np.isnan(eye_white_share(frames[0]["image"], face, {"head": {"eye_white": (1, 2, 3)}}))
  eyeless = [{**frames[0], "pose": Pose(frames[0]["pose"].body, frames[0]["pose"].hands, face)}]
  palette = {**{k: {} for k in PART_NAMES}, "head": {"eye_white": (245, 245, 245), "skin": (200, 150, 120)}}
  assert evaluate_figures(frames[0]["image"], eyeless, [palette])["eye_state"] == 0.5  # nothing to read: chance
  with pytest.raises(ValueError, match="no 'eye_white' colour"):
    eye_white_share(frames[0]["image"], frames[0]["pose"].face, {"head": {"skin": (1, 2, 3)}})


def test_small_noise_keeps_iou(frames):
  images = _images(frames)
  noisy = np.clip(images + np.random.default_rng(0).normal(0, 3, images.shape), 0, 255).astype(np.uint8)
  result = evaluate_figures(noisy, frames)
  assert min(result["per_image"]["mean_iou"]) > 0.98
  assert result["identity_error"] < 0.01


def test_another_pose_lowers_iou(source, frames):
  other = np.stack([source.frame(f["identity"], 2)["image"] for f in frames])
  result = evaluate_figures(other, frames)
  assert max(result["per_image"]["mean_iou"]) < 0.6
  assert result["mean_iou"] < 0.4


def test_another_identity_raises_identity_error(source, frames):
  images = _images(frames)
  recoloured = np.stack([
    _recolour(f["image"], f["part_mask"], source.palette(f["identity"]), source.palette((f["identity"] + 1) % NUM))
    for f in frames])
  noisy = np.clip(images + np.random.default_rng(1).normal(0, 3, images.shape), 0, 255).astype(np.uint8)
  other, near = evaluate_figures(recoloured, frames), evaluate_figures(noisy, frames)
  assert other["identity_error"] > 0.15
  assert min(other["per_image"]["identity_error"]) > 10 * max(near["per_image"]["identity_error"])


def test_shared_colours_go_to_the_nearest_part():
  # Two parts drawn in the same colour: a stray pixel of that colour takes the nearer part's label.
  skin = (200, 150, 120)
  palette = {name: {} for name in PART_NAMES}
  palette["background"] = {"background": (0, 0, 0), "background_2": (10, 10, 10)}
  palette["left_hand"] = {"skin": skin}
  palette["right_hand"] = {"skin": skin}
  left, right = PART_NAMES.index("left_hand"), PART_NAMES.index("right_hand")
  mask = np.zeros((16, 16), np.uint8)
  mask[4:8, 0:3], mask[4:8, 13:16] = left, right
  image = np.zeros((16, 16, 3), np.uint8)
  image[mask > 0] = skin
  image[12, 4] = skin  # nearer the left hand's region
  image[2, 11] = skin  # nearer the right hand's region
  image[5, 1] = (5, 5, 5)  # background colour inside the left hand
  labels = recover_parts(image, palette, mask)
  assert labels[12, 4] == left and labels[2, 11] == right and labels[5, 1] == 0
  assert labels[6, 14] == right and labels[6, 2] == left


def test_errors_name_the_problem(frames):
  images = _images(frames)
  with pytest.raises(ValueError, match="8 generated images but 3 frames"):
    evaluate_figures(images, frames[:3])
  with pytest.raises(ValueError, match=r"frames\[0\] has no 'part_mask'"):
    evaluate_figures(images[:1], [{"image": images[0]}])
  with pytest.raises(ValueError, match="missing"):
    recover_parts(images[0], {"background": {}}, frames[0]["part_mask"])
