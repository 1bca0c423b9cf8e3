"""Procedural figures with ground truth: the dataset of the demo, the tests and the fidelity benchmark.

Each identity (a "video") is a cartoon person with its own look: skin, hair colour and style, shirt colour with a
pattern (plain, stripes, dots, checks), sleeve length, trousers or shorts, shoes, body proportions, and a
background colour and texture. Each frame shows that person in a new pose of a 2D kinematic skeleton (torso
lean, shoulder/elbow/hip/knee angles within joint limits, hand spread and curl, global scale and shift) with a
facial expression (mouth opening, eye closure, head tilt). A frame comes with its OpenPose keypoints (body
COCO-18, 2x21 hand keypoints, 70 face landmarks in the iBUG-68 layout plus the pupils), their ControlNet-style
render, and a part mask (labels in `PART_NAMES`).

Figures fill most of the frame's height with bold colours, so that 64x64 images keep the identity. Drawing is
aliased (no anti-aliasing) so that the part mask is exact: every pixel of the image has exactly one label.
Frame (identity i, frame f) depends only on (seed, i, f) and the image size.

Geometry is laid out in figure units (FU, about a head's height / 1.2), y down, the person facing the camera
(their right side on the image's left), then scaled and shifted into the image.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math

import cv2
import numpy as np

from magicpose_jax.pose.keypoints import Pose
from magicpose_jax.pose.render import render

PART_NAMES = ("background", "head", "torso", "left_arm", "right_arm", "left_hand", "right_hand", "left_leg",
              "right_leg")
# part_mask of the image flipped left-right: label l becomes PART_FLIP[l].
PART_FLIP = np.array([PART_NAMES.index(n.replace("left", "@").replace("right", "left").replace("@", "right"))
                      for n in PART_NAMES], np.uint8)
EXPRESSION_NAMES = ("mouth_open", "eye_closure", "head_tilt")  # [0, 1], [0, 1], [-1, 1] (= +-MAX_TILT_DEG)
EYES_CLOSED_AT = 0.8  # eye_closure from which eyes are drawn shut (a dark line, no white, no pupils in the pose)
MIN_SIZE, MAX_SIZE = 64, 512
MAX_TILT_DEG = 20.0
_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel accurate shapes at 64x64
_ONE = 1 << _SHIFT
_GOLDEN = 0.6180339887498949

_SKIN = np.array([(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 94), (160, 100, 65), (120, 75, 45),
                  (88, 56, 38)], np.float64)
_HAIR = np.array([(25, 20, 20), (70, 40, 20), (125, 75, 35), (225, 190, 110), (175, 60, 20), (170, 170, 170),
                  (40, 80, 210), (230, 100, 170)], np.float64)
_PATTERNS = ("plain", "stripes", "diagonal", "dots", "checks")
_HAIR_STYLES = ("short", "long", "bob")
_SLEEVES = ("long", "short", "none")
_BACKGROUNDS = ("gradient", "stripes", "checks", "floor", "dots")
# SyntheticConfig.detail: "full" draws shirt patterns and background textures; "plain" the same people (same
# colours, builds, hair, poses) with plain shirts on flat backgrounds.
CAMERAS = ("frame", "identity")  # `SyntheticConfig.camera`
FILL = (0.8, 0.94)  # range of the figure's extent (with a small margin) / image height
DETAILS = ("full", "plain")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """The synthetic dataset.

  Attributes:
    image_size: square image side in pixels, 64..512.
    num_identities: number of people ("videos"); identity i looks the same whatever this number is.
    frames_per_identity: frames (poses) per person.
    seed: the dataset; everything is a function of (seed, identity, frame).
    detail: "full" (shirt patterns, textured backgrounds) or "plain" (plain shirts on flat backgrounds of the
      identity's first background colour; everything else as "full"). The tiny models of the demo learn plain
      figures' colours within its budget; the patterns' 2-3 pixel periods cost most of a tiny VAE's capacity.
    pose_scale: stroke widths and dot radii of "pose_image" (`render`'s `scale`): 1 draws ControlNet's SD-size
      strokes, which at 64 px cover the whole figure (limbs 9 px wide, face dots 7 px across); `image_size / 512`
      draws them in proportion.
    pose_supersample: "pose_image" drawn at this many times the size and area-averaged down (`render`'s
      `supersample`): 1 is ControlNet's render, whose truncated points and one-pixel dots lose the figure's
      sub-pixel place and the face's eyes and mouth at 64 px; 4 keeps them to 1/4 pixel, anti-aliased.
    camera: how frames are framed (the figure's height fill and its place in the free room). "frame": each frame
      its own draw, so a person's reference and target frames differ in framing. "identity": one draw per person,
      every frame framed alike, as by a video's fixed camera (TikTok's), where a training pair's reference and
      target differ in framing only through augmentation (the setting of the paper's augmentation ablation).
    head_scale: every head (face, hair, face landmarks) drawn this many times its drawn size, 0.5..2; the rest of
      the person and every colour unchanged (the figure is framed again, so it shrinks a little). 1 draws adult
      proportions, where a 64 px face is ~8 px wide (2 x 2 latent tokens of a factor-4 autoencoder) and its eyes
      1-2 px; at 1.6 the head has 2.6 times the area and its eyes show their whites.
    eye_scale: each eye's outline and lids' travel drawn this many times their size about the eye's centre,
      1..2.5, in the image and the pose's face landmarks alike; the pupils and the rest of the face unchanged. At
      2 (with `head_scale` 1.6) an open eye is ~4 x 2.6 px at 64 px, a 4 x 4 latent patch's worth: large enough
      for a factor-4, 4-channel autoencoder trained to keep it (benchmarks/results/demo.md).
  """

  image_size: int = 64
  num_identities: int = 64
  frames_per_identity: int = 32
  seed: int = 0
  detail: str = "full"
  pose_scale: float = 1.0
  pose_supersample: int = 1
  camera: str = "frame"
  head_scale: float = 1.0
  eye_scale: float = 1.0

  def __post_init__(self):
    if not MIN_SIZE <= self.image_size <= MAX_SIZE:
      raise ValueError(f"SyntheticConfig.image_size: expected {MIN_SIZE}..{MAX_SIZE}, got {self.image_size}")
    if self.seed < 0:
      raise ValueError(f"SyntheticConfig.seed: expected a non-negative integer, got {self.seed}")
    if self.num_identities < 1 or self.frames_per_identity < 1:
      raise ValueError(f"SyntheticConfig: num_identities and frames_per_identity must be >= 1, got "
                       f"{self.num_identities} and {self.frames_per_identity}")
    if not self.pose_scale > 0:
      raise ValueError(f"SyntheticConfig.pose_scale: expected a positive number, got {self.pose_scale}")
    if isinstance(self.pose_supersample, bool) or not isinstance(self.pose_supersample, int) \
        or not 1 <= self.pose_supersample <= 16:
      raise ValueError(f"SyntheticConfig.pose_supersample: expected an integer 1..16, got {self.pose_supersample!r}")
    if isinstance(self.head_scale, bool) or not isinstance(self.head_scale, (int, float)) \
        or not 0.5 <= self.head_scale <= 2.0:
      raise ValueError(f"SyntheticConfig.head_scale: expected a number in 0.5..2, got {self.head_scale!r}")
    if isinstance(self.eye_scale, bool) or not isinstance(self.eye_scale, (int, float)) \
        or not 1.0 <= self.eye_scale <= 2.5:
      raise ValueError(f"SyntheticConfig.eye_scale: expected a number in 1..2.5, got {self.eye_scale!r}")
    if self.camera not in CAMERAS:
      raise ValueError(f"SyntheticConfig.camera: expected one of {CAMERAS}, got {self.camera!r}")
    if self.detail not in DETAILS:
      raise ValueError(f"SyntheticConfig.detail: expected one of {DETAILS}, got {self.detail!r}")


# Drawing materials: (name, part label, palette key). The image takes the palette colour of each pixel's material
# (the background texture and the shirt pattern replace theirs), the part mask its label.
_MATERIALS = (
  ("background", "background", "background"),
  ("hair", "head", "hair"), ("skin_head", "head", "skin"), ("eye_white", "head", "eye_white"),
  ("eye_dark", "head", "eye_dark"), ("brow", "head", "brow"), ("lips", "head", "lips"),
  ("mouth", "head", "mouth"),
  ("shirt", "torso", "shirt"), ("pelvis", "torso", "pants"),
  ("right_upper", "right_arm", "upper_arm"), ("right_fore", "right_arm", "forearm"),
  ("left_upper", "left_arm", "upper_arm"), ("left_fore", "left_arm", "forearm"),
  ("right_hand", "right_hand", "skin"), ("left_hand", "left_hand", "skin"),
  ("right_thigh", "right_leg", "pants"), ("right_shin", "right_leg", "shin"), ("right_shoe", "right_leg", "shoes"),
  ("left_thigh", "left_leg", "pants"), ("left_shin", "left_leg", "shin"), ("left_shoe", "left_leg", "shoes"),
)
_M = {name: i for i, (name, _, _) in enumerate(_MATERIALS)}
_MATERIAL_PART = np.zeros(256, np.uint8)  # an OpenCV lookup table: material id -> part label
_MATERIAL_PART[: len(_MATERIALS)] = [PART_NAMES.index(part) for _, part, _ in _MATERIALS]


# ----------------------------------------------------------------------------------------------------------------
# Identities


@dataclasses.dataclass(frozen=True)
class _Identity:
  colors: np.ndarray  # uint8 [256, 1, 3]: an OpenCV lookup table, material id -> RGB
  pattern: str
  pattern_color: tuple[int, int, int]
  pattern_period: float  # FU
  hair_style: str
  background: str
  background_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
  background_period: float  # fraction of the image
  # Body proportions (FU).
  head_r: float
  shoulder: float
  hip: float
  torso: float
  upper_arm: float
  forearm: float
  thigh: float
  shin: float
  limb: float  # limb thickness scale
  eye_scale: float = 1.0  # SyntheticConfig.eye_scale


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
  return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


@functools.lru_cache(maxsize=4096)
def _identity(seed: int, index: int) -> _Identity:
  rng = np.random.default_rng([seed, index])
  # Shirt hues walk the colour wheel by the golden ratio: neighbouring identities get far-apart hues.
  hue = (_GOLDEN * index + seed * 0.137) % 1.0
  shirt = _hsv(hue + rng.uniform(-0.04, 0.04), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
  pants = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.9), rng.uniform(0.2, 0.75))
  skin = tuple(int(c) for c in np.clip(_SKIN[rng.integers(len(_SKIN))] + rng.uniform(-12, 12, 3), 0, 255))
  hair = tuple(int(c) for c in np.clip(_HAIR[rng.integers(len(_HAIR))] + rng.uniform(-15, 15, 3), 0, 255))
  shoes = _hsv(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.1, 0.9))
  sleeves = _SLEEVES[rng.integers(len(_SLEEVES))]
  shorts = bool(rng.random() < 0.3)
  colors = {
    "hair": hair, "skin": skin, "eye_white": (245, 245, 245), "eye_dark": (30, 25, 35),
    "brow": tuple(int(c * 0.6) for c in hair), "lips": tuple(int(c) for c in np.array(skin) * [0.8, 0.45, 0.45]),
    "mouth": (70, 15, 25), "shirt": shirt, "pants": pants, "shoes": shoes,
    "upper_arm": skin if sleeves == "none" else shirt, "forearm": shirt if sleeves == "long" else skin,
    "shin": skin if shorts else pants,
  }
  # Background: low saturation, and light or dark against the shirt's brightness.
  shirt_v = max(shirt) / 255
  light = bool(shirt_v < 0.75 or rng.random() < 0.5)
  v = rng.uniform(0.75, 0.95) if light else rng.uniform(0.12, 0.3)
  bg_hue, bg_sat = rng.random(), rng.uniform(0.05, 0.45)
  bg_a = _hsv(bg_hue, bg_sat, v)
  bg_b = _hsv(bg_hue + rng.uniform(-0.15, 0.15), bg_sat, float(np.clip(v + rng.choice([-1, 1]) * 0.12, 0, 1)))
  colors["background"] = bg_a
  lut = np.zeros((256, 1, 3), np.uint8)
  lut[: len(_MATERIALS), 0] = [colors[key] for _, _, key in _MATERIALS]
  pattern_hue = hue + rng.choice([0.5, 0.0])
  pattern_color = _hsv(pattern_hue, rng.uniform(0.0, 0.7), 1.0 if shirt_v < 0.6 else 0.25)
  s = rng.uniform(0.92, 1.08)  # overall build
  return _Identity(
    colors=lut, pattern=_PATTERNS[rng.integers(len(_PATTERNS))], pattern_color=pattern_color,
    pattern_period=rng.uniform(0.35, 0.6), hair_style=_HAIR_STYLES[rng.integers(len(_HAIR_STYLES))],
    background=_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))], background_colors=(bg_a, bg_b),
    background_period=rng.uniform(0.08, 0.2),
    head_r=0.5 * rng.uniform(0.92, 1.08), shoulder=0.72 * s * rng.uniform(0.9, 1.12),
    hip=0.42 * s * rng.uniform(0.9, 1.15), torso=2.2 * s * rng.uniform(0.93, 1.07), upper_arm=1.15 * s,
    forearm=1.05 * s, thigh=1.45 * s * rng.uniform(0.95, 1.05), shin=1.35 * s, limb=s * rng.uniform(0.85, 1.2),
  )


@functools.lru_cache(maxsize=4096)
def _styled_identity(seed: int, index: int, detail: str, head_scale: float = 1.0, eye_scale: float = 1.0) -> _Identity:
  """`_identity` drawn at `detail` (SyntheticConfig.detail), `head_scale` and `eye_scale`: "plain" keeps every draw
  of "full" (so an identity's colours do not depend on the detail) and drops the shirt pattern and the background
  texture."""
  ident = _identity(seed, index)
  if head_scale != 1.0:
    ident = dataclasses.replace(ident, head_r=ident.head_r * head_scale)
  if eye_scale != 1.0:
    ident = dataclasses.replace(ident, eye_scale=eye_scale)
  if detail == "plain":
    a = ident.background_colors[0]
    return dataclasses.replace(ident, pattern="plain", background="flat", background_colors=(a, a))
  return ident


@functools.lru_cache(maxsize=64)
def _background(seed: int, index: int, size: int, detail: str = "full") -> np.ndarray:
  """uint8 [size, size, 3] background of an identity (the same in all its frames)."""
  ident = _styled_identity(seed, index, detail)
  a, b = (np.array(c, np.float32) for c in ident.background_colors)
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
  period = ident.background_period
  if ident.background == "flat":
    w = np.zeros_like(ys)
  elif ident.background == "gradient":
    w = ys
  elif ident.background == "stripes":
    w = (np.floor((xs + 0.5 * ys) / period) % 2).astype(np.float32)
  elif ident.background == "checks":
    w = ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float32)
  elif ident.background == "floor":
    w = (ys > 0.78).astype(np.float32)
  else:  # dots
    u, v = (xs / period) % 1 - 0.5, (ys / period) % 1 - 0.5
    w = (u * u + v * v < 0.08).astype(np.float32)
  out = a * (1 - w[..., None]) + b * w[..., None]
  out = out.astype(np.uint8)
  out.flags.writeable = False
  return out


# ----------------------------------------------------------------------------------------------------------------
# Face landmarks (iBUG-68 + pupils) in head units (head half-width = 1), y down, head centre at the origin.


def _face_template(eye_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Neutral landmarks [70, 2] and their displacements at full eye closure and full mouth opening, each eye's
  outline and lids' travel `eye_scale` times their size about the eye's centre (its pupil)."""
  base = np.zeros((70, 2))
  eye_d = np.zeros((70, 2))
  mouth_d = np.zeros((70, 2))
  t = np.pi * np.arange(17) / 16
  base[0:17] = np.stack([-0.86 * np.cos(t), -0.05 + 0.88 * np.sin(t)], -1)
  mouth_d[0:17, 1] = 0.24 * np.sin(t) ** 2  # the jaw drops with the mouth
  brow_y = -0.46 - 0.07 * np.sin(np.pi * np.arange(5) / 4)
  base[17:22] = np.stack([np.linspace(-0.62, -0.16, 5), brow_y], -1)
  base[22:27] = np.stack([np.linspace(0.16, 0.62, 5), brow_y], -1)
  base[27:31] = np.stack([np.zeros(4), np.linspace(-0.3, 0.12, 4)], -1)
  base[31:36] = np.stack([np.linspace(-0.17, 0.17, 5), [0.2, 0.23, 0.25, 0.23, 0.2]], -1)
  eye_h, eye_y = 0.1, -0.22
  for first, cx, order in ((36, -0.36, (-0.17, -0.06, 0.06, 0.17, 0.06, -0.06)),
                           (42, 0.36, (-0.17, -0.06, 0.06, 0.17, 0.06, -0.06))):
    lid = np.array([0, -1, -1, 0, 1, 1])  # corner, upper, upper, corner, lower, lower
    base[first:first + 6] = np.stack([cx + eye_scale * np.array(order), eye_y + eye_scale * lid * eye_h], -1)
    eye_d[first:first + 6, 1] = -eye_scale * lid * eye_h  # lids meet on the eye's midline
  base[68], base[69] = (-0.36, eye_y), (0.36, eye_y)
  base[48:60] = [(-0.3, 0.5), (-0.18, 0.43), (-0.07, 0.41), (0, 0.43), (0.07, 0.41), (0.18, 0.43), (0.3, 0.5),
                 (0.18, 0.57), (0.07, 0.6), (0, 0.61), (-0.07, 0.6), (-0.18, 0.57)]
  base[60:68] = [(-0.2, 0.5), (-0.07, 0.48), (0, 0.48), (0.07, 0.48), (0.2, 0.5), (0.07, 0.52), (0, 0.52),
                 (-0.07, 0.52)]
  mouth_d[55:60, 1] = 0.3
  mouth_d[65:68, 1] = 0.3
  return base, eye_d, mouth_d


_FACE_BASE, _FACE_EYE, _FACE_MOUTH = _face_template()
_face_template_at = functools.lru_cache(maxsize=8)(_face_template)
_EAR_X, _EAR_Y = 0.9, -0.1
_HEAD_ASPECT = 1.2  # head half-height / half-width


# ----------------------------------------------------------------------------------------------------------------
# Pose sampling and the kinematic chain


def _rot(deg: float) -> np.ndarray:
  c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
  return np.array([[c, -s], [s, c]])


def _direction(deg: float, side: int) -> np.ndarray:
  """Unit vector at `deg` from straight down, turned outwards (side -1: the person's right = image left)."""
  r = math.radians(deg)
  return np.array([side * math.sin(r), math.cos(r)])


def _sample_params(seed: int, index: int, frame: int) -> dict:
  rng = np.random.default_rng([seed, index, frame])
  p = {"lean": float(np.clip(rng.normal(0, 5), -12, 12))}
  for side in ("right", "left"):
    raised = rng.random() < 0.5
    p[f"{side}_shoulder"] = rng.uniform(60, 170) if raised else rng.uniform(-15, 80)
    p[f"{side}_elbow"] = rng.uniform(-50, 130)
    p[f"{side}_spread"] = rng.uniform(0.6, 1.4)
    p[f"{side}_curl"] = rng.uniform(0, 1) if rng.random() < 0.5 else 0.0
  kick = rng.integers(4)  # 0/1: one leg lifted, else both on the ground
  for i, side in enumerate(("right", "left")):
    if kick == i:
      p[f"{side}_hip"], p[f"{side}_knee"] = rng.uniform(35, 80), rng.uniform(30, 90)
    else:
      p[f"{side}_hip"], p[f"{side}_knee"] = rng.uniform(-6, 32), rng.uniform(0, 30)
  mouth = 0.0 if rng.random() < 0.35 else rng.uniform(0.3, 1.0)
  r = rng.random()
  eyes = 0.0 if r < 0.6 else (1.0 if r < 0.8 else rng.uniform(0, 1))
  p["expression"] = np.array([mouth, eyes, rng.uniform(-1, 1)], np.float32)
  p["fill"] = rng.uniform(*FILL)
  p["place"] = rng.uniform(0, 1, 2)
  return p


def _hand(wrist: np.ndarray, d: np.ndarray, side: int, spread: float, curl: float) -> np.ndarray:
  """21 hand keypoints [21, 2] (FU) at the wrist, fingers along d; the thumb on the outer side (palm forward)."""
  local = [(0.0, 0.0)] * 21  # (along d, across towards the thumb)
  shrink = 1 - 0.55 * curl
  chains = [(1, 50.0, 1.0, (0.07, 0.07), (0.09, 0.07 * shrink, 0.06 * shrink))]  # thumb: first bone not curled
  for f, (offset, angle, scale) in enumerate(((0.085, 12, 0.95), (0.03, 3, 1.05), (-0.03, -5, 1.0),
                                              (-0.085, -14, 0.82))):
    chains.append((5 + 4 * f, angle, scale, (0.23, offset), tuple(v * scale * shrink for v in (0.1, 0.07, 0.06))))
  for base, angle, _, start, lengths in chains:
    ca, sa = math.cos(math.radians(angle * spread)), math.sin(math.radians(angle * spread))
    local[base] = start
    for j, length in enumerate(lengths):
      prev = local[base + j]
      local[base + 1 + j] = (prev[0] + ca * length, prev[1] + sa * length)
  n = np.array([-d[1], d[0]]) * (-side)  # across the hand, towards the thumb
  arr = np.array(local)
  return wrist + arr[:, :1] * d + arr[:, 1:] * n


def _skeleton(ident: _Identity, p: dict) -> dict:
  """All figure geometry in FU with the mid-hip at the origin."""
  lean = _rot(p["lean"])
  up = lean @ np.array([0.0, -1.0])
  across = lean @ np.array([1.0, 0.0])  # towards the person's left (image right)
  neck = up * ident.torso
  g: dict = {"neck": neck}
  body = np.zeros((18, 2))
  body[1] = neck
  limbs = {}
  for side_name, side, (sh, el, wr, hp, kn, an) in (("right", -1, (2, 3, 4, 8, 9, 10)),
                                                     ("left", 1, (5, 6, 7, 11, 12, 13))):
    body[sh] = neck + side * ident.shoulder * across
    upper = lean @ _direction(p[f"{side_name}_shoulder"], side)
    fore = lean @ _direction(p[f"{side_name}_shoulder"] + p[f"{side_name}_elbow"], side)
    body[el] = body[sh] + upper * ident.upper_arm
    body[wr] = body[el] + fore * ident.forearm
    body[hp] = side * ident.hip * across
    thigh = _direction(p[f"{side_name}_hip"], side)
    shin = _direction(p[f"{side_name}_hip"] - p[f"{side_name}_knee"], side)
    body[kn] = body[hp] + thigh * ident.thigh
    body[an] = body[kn] + shin * ident.shin
    limbs[side_name] = _hand(body[wr], fore, side, p[f"{side_name}_spread"], p[f"{side_name}_curl"])
  mouth, eyes, tilt = (float(v) for v in p["expression"])
  head_angle = p["lean"] + tilt * MAX_TILT_DEG
  head_rot = _rot(head_angle)
  r = ident.head_r
  head_center = neck + head_rot @ np.array([0.0, -(0.18 + _HEAD_ASPECT * r)])
  face_base, face_eye, face_mouth = _face_template_at(float(ident.eye_scale))
  face = (face_base + eyes * face_eye + mouth * face_mouth) * r @ head_rot.T + head_center
  body[0] = face[30]
  body[14], body[15] = face[68], face[69]
  body[16] = head_center + head_rot @ (np.array([-_EAR_X, _EAR_Y]) * r)
  body[17] = head_center + head_rot @ (np.array([_EAR_X, _EAR_Y]) * r)
  g.update(body=body, hands=np.stack([limbs["left"], limbs["right"]]), face=face, head_center=head_center,
           head_angle=head_angle, head_rot=head_rot, up=up, across=across, mouth=mouth, eyes=eyes)
  return g


# ----------------------------------------------------------------------------------------------------------------
# Drawing (on a material-id map, in pixels)


def _fx(points: np.ndarray) -> np.ndarray:
  """Pixels -> OpenCV fixed-point integers (`_SHIFT` fractional bits)."""
  return np.round(np.asarray(points) * _ONE).astype(np.int32)


def _poly(canvas: np.ndarray, points: np.ndarray, material: str) -> None:
  cv2.fillPoly(canvas, [_fx(points)], _M[material], cv2.LINE_8, _SHIFT)


def _line(canvas: np.ndarray, a, b, thickness: float, material: str) -> None:
  """A thick line (round caps) between fixed-point points a and b."""
  cv2.line(canvas, a, b, _M[material], max(1, round(thickness)), cv2.LINE_8, _SHIFT)


def _ellipse(canvas: np.ndarray, center: np.ndarray, axes: tuple[float, float], angle: float, material: str) -> None:
  c = _fx(center).tolist()
  cv2.ellipse(canvas, c, (max(1, round(axes[0] * _ONE)), max(1, round(axes[1] * _ONE))), angle,
              0, 360, _M[material], -1, cv2.LINE_8, _SHIFT)


def _shirt_polygon(g: dict, ident: _Identity, scale: float) -> np.ndarray:
  """[4, 2] pixels: shoulders (widened, with a collar) to hips."""
  body, up, across = g["body"], g["up"], g["across"]
  t, collar, down = ident.limb * scale, 0.1 * scale * g["up"], -up
  return np.array([body[2] - 0.14 * t * across + collar, body[5] + 0.14 * t * across + collar,
                   body[11] + 0.12 * scale * across + 0.06 * scale * down,
                   body[8] - 0.12 * scale * across + 0.06 * scale * down])


_FINGERS = [np.array(c) for c in ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16), (17, 18, 19, 20))]


def _draw_figure(canvas: np.ndarray, ident: _Identity, g: dict, scale: float) -> None:
  """Draws back to front: long hair, legs, pelvis, neck, shirt, arms, hands, head."""
  body, up, across = g["body"], g["up"], g["across"]
  bf = _fx(body).tolist()
  r = ident.head_r * scale
  hc, ha, hrot = g["head_center"], g["head_angle"], g["head_rot"]
  if ident.hair_style == "long":
    w, top, bottom = 1.15 * r, -0.9 * _HEAD_ASPECT * r, 1.9 * r
    _poly(canvas, hc + np.array([[-w, top], [w, top], [w * 1.1, bottom], [-w * 1.1, bottom]]) @ hrot.T, "hair")
  t = ident.limb * scale
  for side, (hp, kn, an) in (("right", (8, 9, 10)), ("left", (11, 12, 13))):
    sign = -1 if side == "right" else 1
    _ellipse(canvas, body[an] + np.array([sign * 0.1, 0.1]) * scale, (0.2 * scale, 0.1 * scale), 0, f"{side}_shoe")
    _line(canvas, bf[hp], bf[kn], 0.4 * t, f"{side}_thigh")
    _line(canvas, bf[kn], bf[an], 0.32 * t, f"{side}_shin")
  pelvis_w = (ident.hip + 0.16) * scale
  down = -up
  _poly(canvas, np.array([-pelvis_w * across, pelvis_w * across, pelvis_w * across + 0.42 * scale * down,
                          -pelvis_w * across + 0.42 * scale * down]) + (body[8] + body[11]) / 2, "pelvis")
  _line(canvas, bf[1], _fx(body[1] + up * 0.5 * scale).tolist(), 0.36 * scale, "skin_head")
  _poly(canvas, _shirt_polygon(g, ident, scale), "shirt")
  for side, (sh, el, wr) in (("right", (2, 3, 4)), ("left", (5, 6, 7))):
    _line(canvas, bf[sh], bf[el], 0.3 * t, f"{side}_upper")
    _line(canvas, bf[el], bf[wr], 0.25 * t, f"{side}_fore")
  finger = max(1, round(0.05 * scale))
  for hand, side in zip(g["hands"], ("left", "right"), strict=True):
    hf = _fx(hand)
    m = _M[f"{side}_hand"]
    cv2.fillPoly(canvas, [hf[[0, 1, 5, 9, 13, 17]]], m, cv2.LINE_8, _SHIFT)
    cv2.polylines(canvas, [hf[c] for c in _FINGERS], False, m, finger, cv2.LINE_8, _SHIFT)
    # Thin fingers at small sizes can miss a keypoint's own pixel: cover the 2x2 pixels around each keypoint, so
    # its pixel is on the hand whichever way it is rounded.
    for x, y in np.floor(hand).astype(int).tolist():
      cv2.rectangle(canvas, (x, y), (x + 1, y + 1), m, -1)
  # Head: hair behind, face, fringe, then the features.
  if ident.hair_style == "bob":
    _ellipse(canvas, hc + hrot @ np.array([0, 0.15 * r]), (1.22 * r, 1.2 * _HEAD_ASPECT * r), ha, "hair")
  else:
    _ellipse(canvas, hc + hrot @ np.array([0, -0.12 * r]), (1.08 * r, 1.05 * _HEAD_ASPECT * r), ha, "hair")
  _ellipse(canvas, hc, (r, _HEAD_ASPECT * r), ha, "skin_head")
  _poly(canvas, (_FRINGE * r) @ hrot.T + hc, "hair")
  _draw_face(canvas, g["face"], r, g["eyes"], g["mouth"])


def _fringe() -> np.ndarray:
  """Hair over the forehead: the top of the head's ellipse (x1.05) above the brows, in head units [12, 2]."""
  t0 = math.asin(0.55 / (1.05 * _HEAD_ASPECT))
  arc = np.linspace(t0, math.pi - t0, 12)
  return np.stack([1.05 * np.cos(arc), -1.05 * _HEAD_ASPECT * np.sin(arc)], -1)


_FRINGE = _fringe()


def _draw_face(canvas: np.ndarray, face: np.ndarray, r: float, eyes: float, mouth: float) -> None:
  thin = max(1, round(0.07 * r))
  ff = _fx(face)
  fl = ff.tolist()
  for first, pupil in ((36, 68), (42, 69)):
    if eyes < EYES_CLOSED_AT:
      cv2.fillPoly(canvas, [ff[first:first + 6]], _M["eye_white"], cv2.LINE_8, _SHIFT)
      _ellipse(canvas, face[pupil], (0.07 * r, 0.07 * r * (1 - eyes)), 0, "eye_dark")
    else:
      _line(canvas, fl[first], fl[first + 3], thin, "eye_dark")
  cv2.polylines(canvas, [ff[17:22], ff[22:27]], False, _M["brow"], thin, cv2.LINE_8, _SHIFT)
  cv2.fillPoly(canvas, [ff[48:60]], _M["lips"], cv2.LINE_8, _SHIFT)
  if mouth > 0.1:
    cv2.fillPoly(canvas, [ff[60:68]], _M["mouth"], cv2.LINE_8, _SHIFT)
  else:
    _line(canvas, fl[60], fl[64], 1, "mouth")


def _compose(materials: np.ndarray, ident: _Identity, g: dict, scale: float, background: np.ndarray) -> np.ndarray:
  """uint8 [S, S, 3]: material colours over the background texture, with the shirt's pattern."""
  image = background.copy()
  cv2.copyTo(cv2.LUT(cv2.merge([materials] * 3), ident.colors), materials, image)  # figure pixels only
  if ident.pattern == "plain":
    return image
  size = materials.shape[0]
  lo = np.clip(np.floor(_shirt_polygon(g, ident, scale).min(0)) - 1, 0, size).astype(int)
  hi = np.clip(np.ceil(_shirt_polygon(g, ident, scale).max(0)) + 2, 0, size).astype(int)
  shirt = materials[lo[1]:hi[1], lo[0]:hi[0]] == _M["shirt"]
  ys, xs = np.mgrid[lo[1]:hi[1], lo[0]:hi[0]].astype(np.float32)
  period = ident.pattern_period * scale
  # Pattern coordinates move with the body: relative to the neck, along the torso's axes.
  dx, dy = xs - g["neck"][0], ys - g["neck"][1]
  u = (dx * g["across"][0] + dy * g["across"][1]) / period
  v = -(dx * g["up"][0] + dy * g["up"][1]) / period
  if ident.pattern == "stripes":
    on = np.floor(v * 2) % 2 == 0
  elif ident.pattern == "diagonal":
    on = np.floor(u + v) % 2 == 0
  elif ident.pattern == "checks":
    on = (np.floor(u) + np.floor(v)) % 2 == 0
  else:  # dots
    on = (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 < 0.09
  image[lo[1]:hi[1], lo[0]:hi[0]][shirt & on] = ident.pattern_color
  return image


def _identity_framing(seed: int, index: int) -> dict:
  """`_sample_params`' framing draws ("fill", "place") for a whole person: a stream of its own (the key's length
  differs from every frame's), so poses and expressions stay those of `camera="frame"`."""
  rng = np.random.default_rng([seed, index, 0, 1])
  return {"fill": rng.uniform(*FILL), "place": rng.uniform(0, 1, 2)}


def _place(g: dict, ident: _Identity, p: dict, size: int) -> tuple[float, np.ndarray]:
  """Scale and offset (pixels) that fit the figure's extent into the image, filling p['fill'] of its height."""
  r = ident.head_r
  head_extent = g["head_center"] + np.array([[-1.3, -1.3], [1.3, 1.3]]) * _HEAD_ASPECT * r
  points = np.concatenate([g["body"], g["hands"].reshape(-1, 2), head_extent, g["body"][[10, 13]] + [0, 0.25]])
  lo, hi = points.min(0) - 0.25, points.max(0) + 0.25
  extent = hi - lo
  scale = min(p["fill"] * size / extent[1], 0.96 * size / extent[0])
  margin = 0.02 * size
  room = size - 2 * margin - extent * scale
  offset = margin + np.maximum(room, 0) * p["place"] - lo * scale
  return scale, offset


def _to_pixels(g: dict, scale: float, offset: np.ndarray) -> dict:
  out = dict(g)
  for key in ("body", "hands", "face", "neck", "head_center"):
    out[key] = g[key] * scale + offset
  return out


class SyntheticSource:
  """Frame source of procedural figures: video = identity, frame = pose; see the module docstring.

  `frame(video, frame)` returns "image" (uint8 [S, S, 3] RGB), "pose_image" (uint8 [S, S, 3], `render(pose)` at
  `pose_scale`), "pose" (`Pose`, every keypoint confidence 1 except the pupils of closed eyes), "part_mask" (uint8
  [S, S], labels of `PART_NAMES`), "identity" (int), "expression" (float32 [3], `EXPRESSION_NAMES`), "video" and
  "frame" (names).
  """

  def __init__(self, config: SyntheticConfig):
    self.config = config

  @property
  def num_videos(self) -> int:
    return self.config.num_identities

  def num_frames(self, video: int) -> int:
    self._check_video(video)
    return self.config.frames_per_identity

  def _check_video(self, video: int) -> None:
    if not 0 <= video < self.config.num_identities:
      raise IndexError(f"SyntheticSource: video {video} out of range [0, {self.config.num_identities})")

  def palette(self, video: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """The colours person `video` is drawn with, for metrics that read parts back from images by colour.

    Returns:
      part name (every one of `PART_NAMES`) -> {colour name -> RGB}. Colour names: "skin", "hair", "eye_white",
      "eye_dark", "brow", "lips", "mouth" (head; the neck is "skin" of the head), "shirt", "pattern" (the shirt's
      pattern; absent for plain shirts), "pants", "shoes"; sleeveless arms and bare shins show "skin". The
      background has "background" and "background_2": its texture mixes these two (a gradient takes every mix in
      between, rounded down). Every figure pixel of `frame(video, f)["image"]` has exactly one colour of its part.
    """
    self._check_video(video)
    ident = _styled_identity(self.config.seed, video, self.config.detail, float(self.config.head_scale),
                              float(self.config.eye_scale))
    rgb = lambda m: tuple(int(c) for c in ident.colors[_M[m], 0])
    skin = rgb("skin_head")
    out: dict[str, dict[str, tuple[int, int, int]]] = {name: {} for name in PART_NAMES}
    for material, part, key in _MATERIALS:
      color = rgb(material)
      name = key
      if key in ("upper_arm", "forearm", "shin"):  # sleeves and shorts: named by what shows
        name = "skin" if color == skin else ("pants" if key == "shin" else "shirt")
      out[part][name] = color
    if ident.pattern != "plain":
      out["torso"]["pattern"] = tuple(int(c) for c in ident.pattern_color)
    out["background"]["background_2"] = tuple(int(c) for c in ident.background_colors[1])
    return out

  def pose_image(self, pose: Pose) -> np.ndarray:
    """uint8 [S, S, 3]: `pose` drawn as this source draws its frames' "pose_image" (`pose_scale`,
    `pose_supersample`), e.g. for poses between frames."""
    size = self.config.image_size
    return render(pose, size, size, scale=self.config.pose_scale, supersample=self.config.pose_supersample)

  def frame(self, video: int, frame: int) -> dict:
    self._check_video(video)
    if not 0 <= frame < self.config.frames_per_identity:
      raise IndexError(f"SyntheticSource: frame {frame} out of range [0, {self.config.frames_per_identity})")
    seed, size = self.config.seed, self.config.image_size
    ident = _styled_identity(seed, video, self.config.detail, float(self.config.head_scale),
                              float(self.config.eye_scale))
    params = _sample_params(seed, video, frame)
    if self.config.camera == "identity":
      params.update(_identity_framing(seed, video))
    g = _skeleton(ident, params)
    scale, offset = _place(g, ident, params, size)
    g = _to_pixels(g, scale, offset)
    materials = np.zeros((size, size), np.uint8)
    _draw_figure(materials, ident, g, scale)
    image = _compose(materials, ident, g, scale, _background(seed, video, size, self.config.detail))
    pose = _pose(g, params["expression"])
    return {
      "image": image,
      "pose_image": self.pose_image(pose),
      "pose": pose,
      "part_mask": cv2.LUT(materials, _MATERIAL_PART),
      "identity": video,
      "expression": params["expression"].copy(),
      "video": f"identity_{video:05d}",
      "frame": f"{frame:05d}",
    }


def _pose(g: dict, expression: np.ndarray) -> Pose:
  ones = lambda a: np.concatenate([a, np.ones((*a.shape[:-1], 1))], -1)
  face = ones(g["face"])
  if expression[1] >= EYES_CLOSED_AT:  # closed eyes: no pupils
    face[68:] = 0
  return Pose(ones(g["body"]), ones(g["hands"]), face)
