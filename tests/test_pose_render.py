"""`pose.render` against an independent rebuild of ControlNet 1.1's OpenPose drawing.

The reference below is written from ControlNet's published colour list and drawing rules, on ControlNet's own
data layout (coordinates divided by the image size, a `candidate`/`subset` table for bodies, -1 for missing hand
and face points), with OpenCV and the standard library's `colorsys`; it shares no code with `render.py`.
Pass criterion: at least 99 % of the pixels equal (all three channels), for every keypoint set.
"""

import colorsys
import math

import cv2
import numpy as np
import pytest

from magicpose_jax.pose.keypoints import Pose
from magicpose_jax.pose.render import render

MIN_PIXEL_MATCH = 0.99
THRESHOLD = 0.3

# ControlNet annotator/openpose/util.py: 1-based joint pairs (the last two are never drawn) and 18 colours.
REF_LIMB_SEQ = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
                [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
REF_COLORS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
              [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
              [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
REF_HAND_EDGES = [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10], [10, 11],
                  [11, 12], [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20]]
REF_EPS = 0.01


def _annotator_layout(people, height, width, threshold):
  """Poses -> ControlNet's (candidate, subset, hands, faces), normalised coordinates, -1 for missing."""
  candidate, subset, hands, faces = [], [], [], []
  threshold = float(np.float32(threshold))  # confidences are float32: "0.3" equals a 0.3 threshold
  for p in people:
    row = []
    for x, y, c in p.body.tolist():
      if c > threshold:
        row.append(len(candidate))
        candidate.append([x / width, y / height])
      else:
        row.append(-1)
    subset.append(row)
  for p in people:
    for hand in p.hands:
      hands.append([[x / width, y / height] if c > threshold else [-1.0, -1.0] for x, y, c in hand.tolist()])
  for p in people:
    faces.append([[x / width, y / height] if c > threshold else [-1.0, -1.0] for x, y, c in p.face.tolist()])
  return np.array(candidate).reshape(-1, 2), np.array(subset).reshape(-1, 18), hands, faces


def reference_render(people, height, width, threshold=THRESHOLD):
  candidate, subset, hands, faces = _annotator_layout(people, height, width, threshold)
  canvas = np.zeros((height, width, 3), np.uint8)
  # Body: limbs as filled ellipse polygons, the canvas dimmed to 60 %, then the joints.
  for i in range(17):
    for n in range(len(subset)):
      index = subset[n][np.array(REF_LIMB_SEQ[i]) - 1]
      if -1 in index:
        continue
      xs = candidate[index.astype(int), 0] * float(width)
      ys = candidate[index.astype(int), 1] * float(height)
      length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
      angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
      polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), 4), int(angle), 0, 360, 1)
      cv2.fillConvexPoly(canvas, polygon, REF_COLORS[i])
  canvas = (canvas * 0.6).astype(np.uint8)
  for i in range(18):
    for n in range(len(subset)):
      index = int(subset[n][i])
      if index == -1:
        continue
      x, y = candidate[index][0:2]
      cv2.circle(canvas, (int(x * width), int(y * height)), 4, REF_COLORS[i], thickness=-1)
  # Hands: HSV-coloured edges, then dots.
  for hand in hands:
    peaks = np.array(hand)
    for ie, (a, b) in enumerate(REF_HAND_EDGES):
      x1, y1 = int(peaks[a][0] * width), int(peaks[a][1] * height)
      x2, y2 = int(peaks[b][0] * width), int(peaks[b][1] * height)
      if x1 > REF_EPS and y1 > REF_EPS and x2 > REF_EPS and y2 > REF_EPS:
        color = np.array(colorsys.hsv_to_rgb(ie / float(len(REF_HAND_EDGES)), 1.0, 1.0)) * 255
        cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
    for px, py in peaks:
      x, y = int(px * width), int(py * height)
      if x > REF_EPS and y > REF_EPS:
        cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
  # Face: white dots.
  for lmks in faces:
    for px, py in lmks:
      x, y = int(px * width), int(py * height)
      if x > REF_EPS and y > REF_EPS:
        cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)
  return canvas


def _random_pose(rng, height, width, missing=0.0, parts=("body", "hands", "face")):
  def kp(shape):
    xy = rng.uniform([-2, -2], [width + 2, height + 2], size=(*shape, 2))
    conf = rng.uniform(THRESHOLD + 0.01, 1.0, size=shape) * (rng.random(shape) >= missing)
    return np.concatenate([xy, conf[..., None]], axis=-1)

  empty = Pose.empty()
  return Pose(kp((18,)) if "body" in parts else empty.body, kp((2, 21)) if "hands" in parts else empty.hands,
              kp((70,)) if "face" in parts else empty.face)


def _plausible_pose(height, width):
  """A standing person, so limbs have realistic lengths (random poses draw long crossing ellipses)."""
  body = np.array([[50, 20], [50, 35], [38, 36], [33, 55], [30, 72], [62, 36], [67, 55], [70, 72], [43, 70],
                   [42, 95], [41, 120], [57, 70], [58, 95], [59, 120], [47, 17], [53, 17], [44, 19], [56, 19]],
                  np.float64) * [width / 100, height / 130]
  hands = np.stack([body[7] + np.linspace(0, 8, 21)[:, None] * [0.3, 1.0], body[4] + np.linspace(0, 8, 21)[:, None]])
  face = body[0] + np.stack([np.cos(np.arange(70)), np.sin(np.arange(70))], -1) * 5
  ones = lambda a: np.concatenate([a, np.ones((*a.shape[:-1], 1))], -1)
  return Pose(ones(body), ones(hands), ones(face))


CASES = {
  "plausible": lambda rng: ([_plausible_pose(260, 200)], 260, 200),
  "random_full": lambda rng: ([_random_pose(rng, 96, 128)], 96, 128),
  "random_missing": lambda rng: ([_random_pose(rng, 128, 96, missing=0.4)], 128, 96),
  "body_only": lambda rng: ([_random_pose(rng, 64, 64, missing=0.2, parts=("body",))], 64, 64),
  "hands_only": lambda rng: ([_random_pose(rng, 80, 120, missing=0.2, parts=("hands",))], 80, 120),
  "face_only": lambda rng: ([_random_pose(rng, 120, 80, missing=0.2, parts=("face",))], 120, 80),
  "two_people": lambda rng: ([_random_pose(rng, 150, 150, missing=0.3), _plausible_pose(150, 150)], 150, 150),
  "low_confidence": lambda rng: ([Pose(*(np.where(np.arange(3) == 2, 0.3, 10.0) * np.ones(s) for s in
                                         [(18, 3), (2, 21, 3), (70, 3)]))], 32, 32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_controlnet_reference(case):
  rng = np.random.default_rng(sorted(CASES).index(case))
  people, height, width = CASES[case](rng)
  ours = render(people, height, width, threshold=THRESHOLD)
  ref = reference_render(people, height, width)
  assert ours.shape == (height, width, 3) and ours.dtype == np.uint8
  match = np.mean(np.all(ours == ref, axis=-1))
  assert match >= MIN_PIXEL_MATCH, f"{case}: {match:.4f} of pixels match the ControlNet reference"
  if case == "low_confidence":
    assert not ours.any()  # confidence == threshold is not drawn
  else:
    assert ours.any()


def test_single_pose_argument_and_colours():
  pose = _plausible_pose(260, 200)
  image = render(pose, 260, 200)
  np.testing.assert_array_equal(image, render([pose], 260, 200))
  x, y = pose.body[1, :2].astype(int)  # the neck joint: full colour (255, 85, 0) over the dimmed limbs
  np.testing.assert_array_equal(image[y, x], [255, 85, 0])
  only_hand = Pose(np.zeros((18, 3)), pose.hands * [1, 1, 1], np.zeros((70, 3)))
  hx, hy = only_hand.hands[0, 20, :2].astype(int)  # the last hand point: a blue dot in RGB (ControlNet 1.1)
  np.testing.assert_array_equal(render(only_hand, 260, 200)[hy, hx], [0, 0, 255])


def test_render_rejects_bad_input():
  with pytest.raises(TypeError, match=r"poses\[0\] is a ndarray"):
    render([np.zeros((18, 3))], 10, 10)
  with pytest.raises(ValueError, match="height and width must be positive"):
    render(Pose.empty(), 0, 10)
  assert not render([], 8, 8).any()


def test_scale_draws_strokes_and_dots_in_proportion():
  size = 64
  pose = _plausible_pose(size, size)
  np.testing.assert_array_equal(render(pose, size, size, scale=1.0), render(pose, size, size))  # SD size unchanged
  # A face point alone at scale 1/8 (SD size -> 64 px): one white pixel each (radius 3 * 1/8 rounds to 0); at SD
  # size a 7 x 7 disc.
  face = np.zeros((70, 3), np.float32)
  face[:3] = [(10.5, 12.2, 1), (30, 40, 1), (50.9, 20, 1)]
  only_face = Pose(np.zeros((18, 3)), np.zeros((2, 21, 3)), face)
  small = render(only_face, size, size, scale=0.125)
  assert sorted(zip(*np.nonzero(small.any(-1)), strict=True)) == [(12, 10), (20, 50), (40, 30)]
  assert np.count_nonzero(render(only_face, size, size).any(-1)) == 3 * 29
  # A horizontal limb (neck to right shoulder): 2 * stick width + 1 rows thick at its middle, 9 at SD size, 3 here.
  body = np.zeros((18, 3), np.float32)
  body[1], body[2] = (10, 32, 1), (50, 32, 1)
  limb = Pose(body, np.zeros((2, 21, 3)), np.zeros((70, 3)))
  rows = lambda image: np.count_nonzero(image[:, 30].any(-1))
  assert (rows(render(limb, size, size)), rows(render(limb, size, size, scale=0.125))) == (9, 3)
  with pytest.raises(ValueError, match="scale must be positive"):
    render(pose, size, size, scale=0.0)


def _one_joint(x, y):
  body = np.zeros((18, 3), np.float32)
  body[0] = (x, y, 1)
  return Pose(body, np.zeros((2, 21, 3)), np.zeros((70, 3)))


def _centroid(image):
  w = image.astype(np.float64).sum(-1)
  ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
  return (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()


def test_supersample_keeps_subpixel_places():
  """A joint's disc lies where its keypoint is, to a fraction of a pixel (pixels centred on integers, as the
  synthetic figures are drawn); ControlNet's render moves it by the truncation, up to a pixel."""
  size = 32
  for x, y in [(10.0, 12.0), (10.25, 12.5), (10.75, 12.9), (20.5, 7.3)]:
    cx, cy = _centroid(render(_one_joint(x, y), size, size, scale=0.5, supersample=8))
    assert abs(cx - x) < 0.1 and abs(cy - y) < 0.1, ((x, y), (cx, cy))
  # Moved by a quarter pixel: the default draws the same pixels, the supersampled render follows.
  a, b = _one_joint(10.1, 12.1), _one_joint(10.35, 12.35)
  np.testing.assert_array_equal(render(a, size, size, scale=0.5), render(b, size, size, scale=0.5))
  ca, cb = (np.array(_centroid(render(p, size, size, scale=0.5, supersample=4))) for p in (a, b))
  np.testing.assert_allclose(cb - ca, [0.25, 0.25], atol=0.06)


def test_supersample_is_the_big_render_area_averaged():
  """Against a render drawn by hand at k times the size with k times the strokes, averaged over k x k blocks."""
  size, k = 64, 4
  pose = _plausible_pose(size, size)
  big = reference_render([pose.map(lambda a: a * [k, k, 1] + [k / 2, k / 2, 0])], size * k, size * k)
  # The reference draws SD-size strokes: at scale 1/k they are the big render's.
  ours = render(pose, size, size, scale=1 / k, supersample=k)
  expected = big.reshape(size, k, size, k, 3).astype(np.float64).mean((1, 3))
  assert np.abs(ours.astype(np.float64) - expected).max() <= 1.0  # uint8 rounding
  np.testing.assert_array_equal(render(pose, size, size, supersample=1), render(pose, size, size))
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="supersample must be an integer >= 1"):
      render(pose, size, size, supersample=bad)
