"""The synthetic figure generator: determinism, distinct identities, exact part masks, keypoints on their parts,
image sizes, and expressions that show."""


import numpy as np
import pytest

from magicpose_jax.data import synthetic
from magicpose_jax.data.synthetic import EXPRESSION_NAMES, PART_FLIP, PART_NAMES, SyntheticConfig, SyntheticSource
from magicpose_jax.pose.keypoints import FACE_FLIP
from magicpose_jax.pose.render import render

LABEL = {name: i for i, name in enumerate(PART_NAMES)}
# Body keypoints -> the parts they belong to (the joint between two parts may show either).
OWN_PARTS = {
  0: ("head",), 1: ("torso", "head"), 14: ("head",), 15: ("head",), 16: ("head",), 17: ("head",),
  2: ("torso", "right_arm"), 3: ("right_arm",), 4: ("right_arm", "right_hand"),
  5: ("torso", "left_arm"), 6: ("left_arm",), 7: ("left_arm", "left_hand"),
  8: ("torso", "right_leg"), 9: ("right_leg",), 10: ("right_leg",),
  11: ("torso", "left_leg"), 12: ("left_leg",), 13: ("left_leg",),
}


def _pixel_labels(mask, xy):
  ij = np.round(xy).astype(int)
  return mask[ij[..., 1], ij[..., 0]]


def _clear_caches():
  synthetic._identity.cache_clear()
  synthetic._styled_identity.cache_clear()
  synthetic._background.cache_clear()


def test_same_seed_same_bytes_and_order_independence():
  config = SyntheticConfig(image_size=96, num_identities=8, frames_per_identity=4, seed=3)
  first = SyntheticSource(config).frame(5, 2)
  _clear_caches()
  source = SyntheticSource(config)
  for v in range(3):  # other frames first: no hidden state may leak between frames
    source.frame(v, 1)
  second = source.frame(5, 2)
  for key in ("image", "pose_image", "part_mask", "expression"):
    assert first[key].tobytes() == second[key].tobytes(), key
  assert first["pose"] == second["pose"]
  assert (first["video"], first["frame"], first["identity"]) == ("identity_00005", "00002", 5)
  # Identity i does not depend on how many identities or frames the dataset has.
  bigger = SyntheticSource(SyntheticConfig(image_size=96, num_identities=64, frames_per_identity=32, seed=3))
  assert bigger.frame(5, 2)["image"].tobytes() == first["image"].tobytes()
  other_seed = SyntheticSource(SyntheticConfig(image_size=96, num_identities=8, frames_per_identity=4, seed=4))
  assert other_seed.frame(5, 2)["image"].tobytes() != first["image"].tobytes()


def test_identities_differ_in_colour():
  source = SyntheticSource(SyntheticConfig(image_size=64, num_identities=16))
  means = []
  for v in range(16):
    frames = [source.frame(v, f) for f in range(2)]
    torso = np.concatenate([d["image"][d["part_mask"] == LABEL["torso"]] for d in frames]).astype(np.float64)
    means.append(torso.mean(0))
  means = np.array(means)
  dist = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(16, 1)]
  # Mean torso colours (RGB, 0..255) more than 30 apart for at least 90 % of the identity pairs.
  assert np.mean(dist > 30) >= 0.9, np.sort(dist)[:10]


@pytest.mark.parametrize("size", [64, 256])
def test_frame_contract_and_sizes(size):
  source = SyntheticSource(SyntheticConfig(image_size=size, num_identities=4, frames_per_identity=3))
  assert source.num_videos == 4 and source.num_frames(0) == 3
  d = source.frame(3, 2)
  assert d["image"].shape == (size, size, 3) and d["image"].dtype == np.uint8
  assert d["pose_image"].shape == (size, size, 3) and d["pose_image"].dtype == np.uint8
  assert d["part_mask"].shape == (size, size) and d["part_mask"].dtype == np.uint8
  assert d["expression"].shape == (3,) and d["expression"].dtype == np.float32 and len(EXPRESSION_NAMES) == 3
  np.testing.assert_array_equal(d["pose_image"], render(d["pose"], size, size))
  assert set(np.unique(d["part_mask"])) <= set(range(len(PART_NAMES)))
  with pytest.raises(IndexError, match="video 4 out of range"):
    source.frame(4, 0)
  with pytest.raises(IndexError, match="frame 3 out of range"):
    source.frame(0, 3)
  thin = SyntheticSource(SyntheticConfig(image_size=size, num_identities=4, frames_per_identity=3,
                                         pose_scale=size / 512)).frame(3, 2)
  np.testing.assert_array_equal(thin["pose_image"], render(d["pose"], size, size, scale=size / 512))
  np.testing.assert_array_equal(thin["image"], d["image"])
  fine = SyntheticSource(SyntheticConfig(image_size=size, num_identities=4, frames_per_identity=3,
                                         pose_scale=size / 512, pose_supersample=4)).frame(3, 2)
  np.testing.assert_array_equal(fine["pose_image"], render(d["pose"], size, size, scale=size / 512, supersample=4))
  assert not np.array_equal(fine["pose_image"], thin["pose_image"])
  fine_source = SyntheticSource(SyntheticConfig(image_size=size, num_identities=4, frames_per_identity=3,
                                                pose_scale=size / 512, pose_supersample=4))
  np.testing.assert_array_equal(fine_source.pose_image(d["pose"]),
                                render(d["pose"], size, size, scale=size / 512, supersample=4))


def test_config_validation():
  with pytest.raises(ValueError, match="image_size: expected 64..512, got 32"):
    SyntheticConfig(image_size=32)
  with pytest.raises(ValueError, match="num_identities"):
    SyntheticConfig(num_identities=0)
  with pytest.raises(ValueError, match="seed: expected a non-negative integer"):
    SyntheticConfig(seed=-1)
  with pytest.raises(ValueError, match="detail: expected one of"):
    SyntheticConfig(detail="none")
  with pytest.raises(ValueError, match="pose_scale: expected a positive number, got 0"):
    SyntheticConfig(pose_scale=0)
  for bad in (0, 17, 2.0):
    with pytest.raises(ValueError, match=f"pose_supersample: expected an integer 1..16, got {bad!r}"):
      SyntheticConfig(pose_supersample=bad)
  with pytest.raises(ValueError, match=r"camera: expected one of \('frame', 'identity'\), got 'fixed'"):
    SyntheticConfig(camera="fixed")
  for bad in (0.4, 2.5, True, "1.5"):
    with pytest.raises(ValueError, match=f"head_scale: expected a number in 0.5..2, got {bad!r}"):
      SyntheticConfig(head_scale=bad)
  for bad in (0.9, 2.6, True, "2"):
    with pytest.raises(ValueError, match=f"eye_scale: expected a number in 1..2.5, got {bad!r}"):
      SyntheticConfig(eye_scale=bad)


def _similarity(a, b):
  """Least-squares scale s and offset t with b ~ s * a + t, and the largest residual (pixels)."""
  design = np.concatenate([a.reshape(-1, 1), np.tile(np.eye(2), (len(a), 1))], 1)
  coef, *_ = np.linalg.lstsq(design, b.reshape(-1), rcond=None)
  return coef[0], coef[1:], float(np.abs(design @ coef - b.reshape(-1)).max())


def test_identity_camera_changes_only_the_framing():
  """camera="identity" reframes "frame"'s figures: the same poses and expressions, each frame's body only scaled
  and shifted."""
  frames = {c: SyntheticSource(SyntheticConfig(num_identities=2, frames_per_identity=6, camera=c))
            for c in synthetic.CAMERAS}
  moved = 0
  for identity in range(2):
    for f in range(6):
      a, b = frames["frame"].frame(identity, f), frames["identity"].frame(identity, f)
      np.testing.assert_array_equal(a["expression"], b["expression"])
      s, t, residual = _similarity(a["pose"].body[:, :2], b["pose"].body[:, :2])
      assert residual < 1e-3, residual  # a scale and a shift: the same pose
      moved += abs(s - 1) > 1e-3 or np.abs(t).max() > 1e-3
  assert moved > 6  # the framing did change


def test_eye_scale_grows_each_eye_about_its_centre_alone():
  """eye_scale=1 is the default's frames byte for byte; at 2 every face landmark but the eyes' outlines is where it
  was, each outline's points lie twice as far from their centroid (the eye's centre, in pixels: the scale is
  about each eye's own centre), and open eyes show over twice the eye-white pixels."""
  def source(**kw):
    return SyntheticSource(SyntheticConfig(image_size=128, num_identities=6, frames_per_identity=4, detail="plain",
                                           head_scale=1.6, **kw))
  default, one, big = source(), source(eye_scale=1.0), source(eye_scale=2.0)
  whites = {1: 0, 2: 0}
  for v in range(6):
    palette = default.palette(v)
    for f in range(4):
      a, b, c = default.frame(v, f), one.frame(v, f), big.frame(v, f)
      for key in ("image", "pose_image", "part_mask"):
        assert a[key].tobytes() == b[key].tobytes(), key
      eyes = np.r_[36:48]
      rest = np.setdiff1d(np.arange(70), eyes)
      np.testing.assert_allclose(c["pose"].face[rest], a["pose"].face[rest], atol=1e-4)  # float32 pixels
      for outline in (np.r_[36:42], np.r_[42:48]):
        pa, pc = a["pose"].face[outline, :2], c["pose"].face[outline, :2]
        np.testing.assert_allclose(pc.mean(0), pa.mean(0), atol=1e-4)
        np.testing.assert_allclose(pc - pc.mean(0), 2 * (pa - pa.mean(0)), atol=1e-4)
      if a["expression"][1] < synthetic.EYES_CLOSED_AT:
        white = np.array(palette["head"]["eye_white"])
        whites[1] += (a["image"] == white).all(-1).sum()
        whites[2] += (c["image"] == white).all(-1).sum()
  assert whites[1] > 0 and whites[2] > 2 * whites[1], whites


def test_head_scale_grows_the_head_alone():
  """head_scale=1 is the default's frames byte for byte; at 1.6 the same people (palette, pose, expression) with
  heads 1.6x as wide, measured against the shoulders (the body's own scale in the frame), and face landmarks
  1.6x as spread around the head's centre."""
  def source(head_scale):
    return SyntheticSource(SyntheticConfig(image_size=128, num_identities=6, frames_per_identity=2, detail="plain",
                                           head_scale=head_scale))
  default, one, big = SyntheticSource(SyntheticConfig(image_size=128, num_identities=6, frames_per_identity=2,
                                                      detail="plain")), source(1), source(1.6)
  ratios, spreads = [], []
  for v in range(6):
    a, b, c = default.frame(v, 1), one.frame(v, 1), big.frame(v, 1)
    for key in ("image", "pose_image", "part_mask"):
      assert a[key].tobytes() == b[key].tobytes(), key
    assert big.palette(v) == default.palette(v)
    np.testing.assert_array_equal(a["expression"], c["expression"])

    def head_over_shoulders(f):
      body, face = f["pose"].body[:, :2], f["pose"].face[:68, :2]
      return np.linalg.norm(body[2] - body[5]), np.linalg.norm(face[16] - face[0]), face

    (sa, wa, fa), (sc, wc, fc) = head_over_shoulders(a), head_over_shoulders(c)
    ratios.append((wc / sc) / (wa / sa))
    spreads.append(np.linalg.norm(fc - fc.mean(0), axis=-1).mean() / sc
                   / (np.linalg.norm(fa - fa.mean(0), axis=-1).mean() / sa))
    # The head's pixels grow with it (area ~ 1.6^2, against the torso's).
    area = lambda f, part: (f["part_mask"] == LABEL[part]).sum()
    assert area(c, "head") / area(c, "torso") > 1.8 * area(a, "head") / area(a, "torso")
  np.testing.assert_allclose(ratios, 1.6, rtol=1e-6)
  np.testing.assert_allclose(spreads, 1.6, rtol=1e-6)


def test_plain_detail_is_the_same_people_without_patterns_or_textures():
  configs = {d: SyntheticConfig(num_identities=12, frames_per_identity=2, detail=d) for d in synthetic.DETAILS}
  full, plain = (SyntheticSource(configs[d]) for d in ("full", "plain"))
  for v in range(12):
    a, b = full.frame(v, 1), plain.frame(v, 1)
    np.testing.assert_array_equal(a["part_mask"], b["part_mask"])  # same pose, build and hair
    np.testing.assert_array_equal(a["pose_image"], b["pose_image"])
    palette = plain.palette(v)
    assert "pattern" not in palette["torso"]
    bg = a["part_mask"] == LABEL["background"]
    # One flat background colour, the full figure's first; the figure's colours are the full figure's outside
    # the shirt (whose pattern is gone).
    np.testing.assert_array_equal(b["image"][bg], np.broadcast_to(palette["background"]["background"],
                                                                  b["image"][bg].shape))
    assert palette["background"]["background"] == full.palette(v)["background"]["background"]
    shirt = b["image"] == np.array(palette["torso"]["shirt"], np.uint8)
    keep = ~bg & ~(a["part_mask"] == LABEL["torso"])
    np.testing.assert_array_equal(a["image"][keep], b["image"][keep])
    assert shirt.all(-1)[a["part_mask"] == LABEL["torso"]].mean() > 0.5  # the torso is mostly plain shirt


def test_part_masks_are_exact():
  seed, size = 0, 128
  source = SyntheticSource(SyntheticConfig(image_size=size, num_identities=6, frames_per_identity=4, seed=seed))
  for v in range(6):
    background = synthetic._background(seed, v, size)  # the identity's empty scene
    for f in range(4):
      d = source.frame(v, f)
      mask, image = d["part_mask"], d["image"]
      bg = mask == LABEL["background"]
      np.testing.assert_array_equal(image[bg], background[bg])  # background label: the scene, untouched
      changed = np.any(image != background, axis=-1)
      assert changed[~bg].mean() > 0.97  # figure labels: the figure's own colours (rarely the scene's by chance)
      for part in ("head", "torso", "left_arm", "right_arm", "left_leg", "right_leg"):
        assert (mask == LABEL[part]).any(), (v, f, part)
      # The figure fills a good part of the frame (64x64 images must keep the identity).
      rows = np.flatnonzero((~bg).any(1))
      assert rows[-1] - rows[0] > 0.5 * size


def test_keypoints_inside_image_and_on_their_parts():
  size = 128
  source = SyntheticSource(SyntheticConfig(image_size=size, num_identities=8, frames_per_identity=5))
  own_hits, total = 0, 0
  hand_hits, hand_total = 0, 0
  for v in range(8):
    for f in range(5):
      d = source.frame(v, f)
      pose, mask = d["pose"], d["part_mask"]
      for kp in (pose.body, pose.hands.reshape(-1, 3), pose.face):
        seen = kp[kp[:, 2] > 0]
        assert (seen[:, :2] >= 0).all() and (seen[:, :2] <= size - 1).all()
      assert (pose.body[:, 2] == 1).all() and (pose.hands[..., 2] == 1).all()
      # The head is drawn last: face landmarks and head keypoints are always visible on it.
      face = pose.face[pose.face[:, 2] > 0]
      assert (_pixel_labels(mask, face[:, :2]) == LABEL["head"]).all(), (v, f)
      labels = _pixel_labels(mask, pose.body[:, :2])
      assert (labels != 0).all(), (v, f)
      for j, parts in OWN_PARTS.items():
        own_hits += labels[j] in [LABEL[p] for p in parts]
        total += 1
      for h, side in enumerate(("left", "right")):
        hand_labels = _pixel_labels(mask, pose.hands[h, :, :2])
        assert (hand_labels != 0).all(), (v, f, side)
        hand_hits += int((hand_labels == LABEL[f"{side}_hand"]).sum())
        hand_total += 21
  for j in (0, 14, 15, 16, 17):
    assert OWN_PARTS[j] == ("head",)
  assert own_hits / total >= 0.9, own_hits / total  # the rest: joints hidden behind another part
  assert hand_hits / hand_total >= 0.85, hand_hits / hand_total


def _with_expression(monkeypatch, expression):
  original = synthetic._sample_params

  def patched(seed, index, frame):
    params = original(seed, index, frame)
    params["expression"] = np.array(expression, np.float32)
    return params

  monkeypatch.setattr(synthetic, "_sample_params", patched)


def test_expressions_change_the_face(monkeypatch):
  source = SyntheticSource(SyntheticConfig(image_size=256, num_identities=3, frames_per_identity=2))
  frames = {}
  for name, expression in {"neutral": (0, 0, 0), "mouth": (1, 0, 0), "eyes": (0, 1, 0), "tilt": (0, 0, 1)}.items():
    _with_expression(monkeypatch, expression)
    frames[name] = source.frame(1, 1)
    monkeypatch.undo()
  neutral = frames["neutral"]
  head = neutral["part_mask"] == LABEL["head"]
  for name in ("mouth", "eyes"):
    d = frames[name]
    diff = np.any(d["image"] != neutral["image"], axis=-1)
    assert diff[head].sum() >= 20, name  # the face changed, visibly at 256x256
    assert not diff[~head].any(), name  # and nothing but the face
    np.testing.assert_array_equal(d["expression"], {"mouth": [1, 0, 0], "eyes": [0, 1, 0]}[name])
  mouth_drop = frames["mouth"]["pose"].face[57, 1] - neutral["pose"].face[57, 1]
  assert mouth_drop > 0.2 * (neutral["pose"].face[8, 1] - neutral["pose"].face[27, 1])  # lower lip moves down
  assert (frames["eyes"]["pose"].face[68:, 2] == 0).all() and (neutral["pose"].face[68:, 2] == 1).all()
  # Tilt rotates the face: the eye line is no longer level.
  eyes = frames["tilt"]["pose"].face[[36, 45]]
  assert abs(np.degrees(np.arctan2(eyes[1, 1] - eyes[0, 1], eyes[1, 0] - eyes[0, 0]))) > 8


def test_face_layout_is_mirror_symmetric():
  # The neutral template mirrored with the iBUG left/right permutation is itself: the landmark order is right.
  base = synthetic._FACE_BASE
  mirrored = base[FACE_FLIP] * [-1, 1]
  np.testing.assert_allclose(mirrored, base, atol=1e-9)
  assert [PART_NAMES[i] for i in PART_FLIP[[3, 5, 7]]] == ["right_arm", "right_hand", "right_leg"]

