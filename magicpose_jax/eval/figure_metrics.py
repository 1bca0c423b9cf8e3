"""Pose and identity metrics against synthetic ground truth (`magicpose_jax.data.synthetic`).

Synthetic figures are drawn without anti-aliasing in a few flat colours per person, so a generated image can be
read back by colour:

- **Pose (part IoU).** Every pixel of the generated image gets a part label (`PART_NAMES`): the colour candidates
  are the figure's colours (each knows the parts drawn with it) and the background, whose texture mixes two colours
  (the candidate is the RGB segment between them, so every texture and gradient counts, wherever it lies). The
  nearest candidate wins; candidates within `tolerance` of the nearest also count. Colours shared by several parts
  (skin on head, hands, bare arms; shirt on torso and sleeves; left and right limbs) cannot say which part they are:
  the pixel takes the allowed part whose ground-truth region is nearest (0 inside it). So a limb drawn where it
  belongs scores, one drawn elsewhere counts against the part it is nearest to, and left/right swaps of
  identically coloured limbs go unnoticed (colour cannot see them). IoU per part against the ground-truth
  `part_mask`; the image's mean IoU averages the parts present in either mask.
- **Identity (colour error).** Regions of the ground truth: skin (face, neck, hands, bare arms and legs), hair,
  clothes (every non-skin colour of torso, arms and legs: shirt, its pattern, trousers, shoes) and background. Per
  region, the distance between the mean colours of the generated and the ground-truth image inside the
  ground-truth region; RGB in [0, 1], Euclidean, divided by sqrt(3) so that black vs white is 1. Eye, brow and mouth
  colours belong to no region (too few pixels to weigh).
- **Face (face L1).** The mean absolute error (RGB in [0, 1]) over the ground truth's head pixels: hair, skin,
  eyes, brows and mouth. At 64 px a face is ~8 px wide, so open or closed eyes and mouth are a few pixels each;
  this is where they count, with the head's place and colours (a head drawn elsewhere scores as badly as none).
- **Expression (eye state).** Open eyes are drawn with their whites, shut ones as a dark line. Inside the target's
  eye outlines (face landmarks 36-47, filled, plus each eye's centre pixel) a generated eye reads open when at least
  `EYE_OPEN_SHARE` of the pixels are nearest to the person's eye white among the head's colours. `eye_state` is the
  balanced accuracy of that reading against the target's expression (eye_closure < `EYES_CLOSED_AT`): the mean of
  the shares of open and of shut targets read right, so 0.5 is chance (or always the same answer) and 1 every eye
  right. On ground-truth frames it reads 0.99 of eyes right with 1.6x heads (`head_scale`), 0.85 with adult ones,
  whose 1-2 px eyes blur into the skin. The mouth is not read: a shut mouth is drawn as a line in the mouth's colour,
  which at 64 px covers about as many pixels as an open one.

A palette (part name -> {colour name -> RGB}, as `SyntheticSource.palette(video)` returns) says which colours the
figure is drawn with. Without one it is read from the ground-truth frame, which is exact: each part's colours are
the ones its pixels show; skin is the hands' most common colour, hair the head's most common other colour; the
background segment runs between its two most distant colours. On 2,400 frames (300 identities, 64x64) this reads
the same skin and hair as the palette.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from magicpose_jax.data.synthetic import EYES_CLOSED_AT, PART_NAMES
from magicpose_jax.eval.image_metrics import as_batch, image_metrics

Palette = Mapping[str, Mapping[str, Sequence[int]]]  # part name -> {colour name -> RGB}

REGIONS = ("skin", "hair", "clothes", "background")
COLOUR_TOLERANCE = 10.0  # RGB units (0..255, Euclidean): nearer candidates than this are told apart by place
EYE_OUTLINES = (slice(36, 42), slice(42, 48))  # iBUG-68 landmarks of the right and left eye's outline
EYE_OPEN_SHARE = 0.15  # white share from which an eye reads open (ground truth, 1.6x heads: open 0.44 +- 0.11, shut 0)
_FIXED_POINT = 4  # fractional bits of the outline's points in cv2.fillPoly, as the figures are drawn
_CLOTHED_PARTS = frozenset(("torso", "left_arm", "right_arm", "left_leg", "right_leg"))
_NUM_PARTS = len(PART_NAMES)


# ----------------------------------------------------------------------------------------------------------------
# Palettes


def palette_from_frame(image: np.ndarray, part_mask: np.ndarray) -> dict[str, dict[str, tuple[int, int, int]]]:
  """The palette a ground-truth frame shows (see the module docstring), in `SyntheticSource.palette`'s format.

  Args:
    image: uint8 [H, W, 3], an exact synthetic render.
    part_mask: uint8 [H, W] labels of `PART_NAMES`.

  Returns:
    part name -> {colour name -> RGB}: "skin" and "hair" where found, "background"/"background_2" (the ends of the
    background's colour segment), every other colour as "other_<i>".
  """
  packed = _pack(image)
  colours = {}
  for label, name in enumerate(PART_NAMES):
    unique, counts = np.unique(packed[part_mask == label], return_counts=True)
    colours[name] = [_unpack(unique[i]) for i in np.argsort(-counts, kind="stable")]
  hands = np.isin(part_mask, [PART_NAMES.index("left_hand"), PART_NAMES.index("right_hand")])
  skin = _most_common(image, hands) if hands.any() else next(iter(colours["head"]), None)
  hair = next((c for c in colours["head"] if c != skin), None)
  out: dict[str, dict[str, tuple[int, int, int]]] = {}
  for name, found in colours.items():
    if name == "background":
      out[name] = _segment_ends(np.array(found, np.float64).reshape(-1, 3))
      continue
    named = {}
    for i, c in enumerate(found):
      key = "skin" if c == skin else ("hair" if c == hair and name == "head" else f"other_{i}")
      named[key] = c
    out[name] = named
  return out


def _pack(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> int32 [...]: one integer per colour, so that np.unique works on 1D arrays (fast)."""
  rgb = image.astype(np.int32)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _unpack(value: int) -> tuple[int, int, int]:
  value = int(value)
  return value >> 16, (value >> 8) & 255, value & 255


def _most_common(image: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
  unique, counts = np.unique(_pack(image[mask]), return_counts=True)
  return _unpack(unique[counts.argmax()])


def _segment_ends(colours: np.ndarray) -> dict[str, tuple[int, int, int]]:
  """The two most distant of `colours` [K, 3] (approximately: the farthest from the mean, then from that one)."""
  if len(colours) == 0:
    return {}
  a = colours[np.linalg.norm(colours - colours.mean(0), axis=-1).argmax()]
  b = colours[np.linalg.norm(colours - a, axis=-1).argmax()]
  return {"background": tuple(int(c) for c in a), "background_2": tuple(int(c) for c in b)}


def _check_palette(palette: Palette) -> None:
  missing = [name for name in PART_NAMES if name not in palette]
  if missing:
    raise ValueError(f"palette: expected an entry for every part of PART_NAMES, missing {missing}")
  extra = set(palette) - set(PART_NAMES)
  if extra:
    raise ValueError(f"palette: unknown parts {sorted(extra)}; expected names of PART_NAMES")


# ----------------------------------------------------------------------------------------------------------------
# Reading parts back


def _segment_distance(pixels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Euclidean distance of each colour [..., 3] to the RGB segment [a, b]: [...]."""
  ab = b - a
  t = np.clip(((pixels - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
  return np.linalg.norm(pixels - (a + t[..., None] * ab), axis=-1)


def recover_parts(image: np.ndarray, palette: Palette, part_mask: np.ndarray, *,
                  tolerance: float = COLOUR_TOLERANCE) -> np.ndarray:
  """Part labels read from an image's colours (see the module docstring).

  Args:
    image: uint8 [H, W, 3], e.g. a generated image.
    palette: the figure's colours (`SyntheticSource.palette` or `palette_from_frame`).
    part_mask: uint8 [H, W], the ground-truth labels: they only decide between parts that share a colour.
    tolerance: RGB units; candidates this close to the nearest one count as ties.

  Returns:
    uint8 [H, W] labels of `PART_NAMES`.
  """
  _check_palette(palette)
  height, width = part_mask.shape
  if image.shape != (height, width, 3):
    raise ValueError(f"recover_parts: image {image.shape} does not match part_mask {part_mask.shape} (+ RGB)")
  pixels = image.astype(np.float32)  # colour distances need no more
  # Unique figure colours and the parts each one is drawn on.
  members: dict[tuple[int, ...], set[int]] = {}
  for label, name in enumerate(PART_NAMES[1:], start=1):
    for colour in palette[name].values():
      members.setdefault(tuple(int(c) for c in colour), set()).add(label)
  distances, allowed_parts = [], []
  if members:
    colours = np.array(list(members), np.float32)  # [K, 3]
    distances.append(np.linalg.norm(pixels[:, :, None, :] - colours, axis=-1))  # [H, W, K]
    allowed_parts += [sorted(parts) for parts in members.values()]
  background = list(palette["background"].values())
  if background:
    ends = np.array(background, np.float32)
    distances.append(_segment_distance(pixels, ends[0], ends[-1])[..., None])  # [H, W, 1]
    allowed_parts.append([0])
  if not distances:
    raise ValueError("palette: no colours at all")
  distance = np.concatenate(distances, -1)  # [H, W, K + 1]
  membership = np.zeros((len(allowed_parts), _NUM_PARTS), bool)  # candidate -> parts
  for k, parts in enumerate(allowed_parts):
    membership[k, parts] = True
  near = distance <= distance.min(-1, keepdims=True) + tolerance  # [H, W, K + 1]
  allowed = (near.reshape(-1, len(allowed_parts)).astype(np.int32) @ membership.astype(np.int32)) > 0
  allowed = allowed.reshape(height, width, _NUM_PARTS)
  # Distance (pixels) to each part's ground-truth region; absent parts lose to present ones.
  place = np.full((height, width, _NUM_PARTS), float(height + width), np.float32)
  for label in range(_NUM_PARTS):
    outside = (part_mask != label).astype(np.uint8)
    if not outside.all():
      place[..., label] = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
  return np.where(allowed, place, np.inf).argmin(-1).astype(np.uint8)


def part_iou(labels: np.ndarray, part_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-part intersection over union of two label maps [H, W].

  Returns:
    (iou float64 [P] in [0, 1], present bool [P]): a part in neither map is not present and has IoU 1.
  """
  ious, present = np.ones(_NUM_PARTS), np.zeros(_NUM_PARTS, bool)
  for label in range(_NUM_PARTS):
    a, b = labels == label, part_mask == label
    union = np.count_nonzero(a | b)
    if union:
      ious[label], present[label] = np.count_nonzero(a & b) / union, True
  return ious, present


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.count_nonzero(a | b)
  return np.count_nonzero(a & b) / union if union else 1.0


# ----------------------------------------------------------------------------------------------------------------
# Identity colours


def _nearest_colour(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
  """int [N]: index of the nearest of `colours` [K, 3] (RGB, Euclidean) for each of `pixels` [N, 3]."""
  return np.linalg.norm(pixels.astype(np.float64)[:, None] - colours, axis=-1).argmin(-1)


def region_map(image: np.ndarray, part_mask: np.ndarray, palette: Palette) -> np.ndarray:
  """int8 [H, W]: index into `REGIONS` of each ground-truth pixel, -1 for none (eyes, brows, mouth).

  A figure pixel takes the nearest colour of its own part's palette; background is part 0.
  """
  _check_palette(palette)
  regions = np.full(part_mask.shape, -1, np.int8)
  regions[part_mask == 0] = REGIONS.index("background")
  for label, name in enumerate(PART_NAMES[1:], start=1):
    inside = part_mask == label
    if not inside.any() or not palette[name]:
      continue
    names = list(palette[name])
    colours = np.array([palette[name][n] for n in names], np.float64)
    nearest = _nearest_colour(image[inside], colours)
    region = np.array([_region_of(name, n) for n in names], np.int8)
    regions[inside] = region[nearest]
  return regions


def _region_of(part: str, colour_name: str) -> int:
  if colour_name == "skin":
    return REGIONS.index("skin")
  if colour_name == "hair" and part == "head":
    return REGIONS.index("hair")
  if part in _CLOTHED_PARTS:
    return REGIONS.index("clothes")
  return -1


def region_errors(generated: np.ndarray, target: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean-colour distance per region (see the module docstring).

  Returns:
    (errors float64 [len(REGIONS)] in [0, 1], present bool [...]): an absent region has error 0.
  """
  errors, present = np.zeros(len(REGIONS)), np.zeros(len(REGIONS), bool)
  for r in range(len(REGIONS)):
    inside = regions == r
    if inside.any():
      mean_gen = generated[inside].astype(np.float64).mean(0) / 255.0
      mean_gt = target[inside].astype(np.float64).mean(0) / 255.0
      errors[r], present[r] = np.linalg.norm(mean_gen - mean_gt) / np.sqrt(3.0), True
  return errors, present


def face_l1(generated: np.ndarray, target: np.ndarray, part_mask: np.ndarray) -> float:
  """Mean absolute difference (RGB in [0, 1]) of two uint8 [H, W, 3] images over the head pixels of `part_mask`
  [H, W]; NaN when the mask has no head."""
  head = part_mask == PART_NAMES.index("head")
  if not head.any():
    return float("nan")
  return float(np.mean(np.abs(generated[head].astype(np.float64) - target[head].astype(np.float64))) / 255.0)


def eye_white_share(image: np.ndarray, face: np.ndarray, palette: Palette) -> float:
  """Share of the pixels inside the eye outlines of `face` whose nearest head colour is the eye white.

  Args:
    image: uint8 [H, W, 3].
    face: [70, 3] face keypoints (x, y, confidence) in pixels, `Pose.face`.
    palette: the person's colours; `palette["head"]` must name "eye_white" (`SyntheticSource.palette`).

  Returns:
    [0, 1]; NaN when no eye outline has all its points (confidence > 0) or it lies outside the image.
  """
  head = palette["head"]
  if "eye_white" not in head:
    raise ValueError(f"eye_white_share: the palette's head has no 'eye_white' colour (has {sorted(head)}); pass "
                     f"SyntheticSource.palette(identity)")
  h, w = image.shape[:2]
  mask = np.zeros((h, w), np.uint8)
  for outline in EYE_OUTLINES:
    points = np.asarray(face, np.float64)[outline]
    if (points[:, 2] <= 0).any():
      continue
    cv2.fillPoly(mask, [np.round(points[:, :2] * (1 << _FIXED_POINT)).astype(np.int32)], 1, cv2.LINE_8, _FIXED_POINT)
    x, y = np.floor(points[:, :2].mean(0)).astype(int)  # a shut eye's outline encloses no pixel: its centre does
    if 0 <= x < w and 0 <= y < h:
      mask[y, x] = 1
  inside = mask.astype(bool)
  if not inside.any():
    return float("nan")
  names = list(head)
  colours = np.array([head[n] for n in names], np.float64)
  return float(np.mean(_nearest_colour(image[inside], colours) == names.index("eye_white")))


def eye_state_accuracy(shares: Sequence[float], closures: Sequence[float]) -> float:
  """Balanced accuracy of eyes read open (share >= `EYE_OPEN_SHARE`) against targets' `eye_closure` (open below
  `EYES_CLOSED_AT`): the mean over the states present of the share read right; NaN shares are left out, and NaN
  comes back when nothing is left."""
  shares, closures = np.asarray(shares, np.float64), np.asarray(closures, np.float64)
  keep = np.isfinite(shares)
  read_open, is_open = shares[keep] >= EYE_OPEN_SHARE, closures[keep] < EYES_CLOSED_AT
  recalls = [np.mean(read_open[is_open == state] == state) for state in (True, False) if (is_open == state).any()]
  return float(np.mean(recalls)) if recalls else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# The benchmark's entry point


def _masked_mean(values: np.ndarray, present: np.ndarray, empty: float) -> np.ndarray:
  """Mean over axis 0 of `values` [N, K] where `present`; `empty` for columns never present."""
  count = present.sum(0)
  total = np.where(present, values, 0.0).sum(0)
  return np.where(count > 0, total / np.maximum(count, 1), empty)


def evaluate_figures(generated: np.ndarray, frames: Sequence[Mapping], palettes: Sequence[Palette] | None = None, *,
                     tolerance: float = COLOUR_TOLERANCE) -> dict:
  """Image, pose and identity metrics of generated images against synthetic ground-truth frames.

  Args:
    generated: uint8 [N, H, W, 3] (or one [H, W, 3]).
    frames: N ground-truth frames, `SyntheticSource.frame` dicts (needs "image" and "part_mask").
    palettes: N palettes (`SyntheticSource.palette(frame["identity"])`); default: read from each frame
      (`palette_from_frame`).
    tolerance: see `recover_parts`.

  Returns:
    A JSON-ready dict of floats (all finite):
    - "l1" [0, 1] (0 best), "psnr" dB (at most 100), "ssim" [-1, 1] (1 best): means over images.
    - "mean_iou" [0, 1]: mean over images of the mean IoU over parts present in the image (1 best).
    - "figure_iou" [0, 1]: figure-vs-background silhouette IoU (1 best).
    - "part_iou": {part name: [0, 1]}: mean over the images where the part is present (1 where never present).
    - "identity_error" [0, 1]: mean over images of the mean region colour error (0 best).
    - "region_error": {"skin", "hair", "clothes", "background": [0, 1]}: mean over images where present.
    - "face_l1" [0, 1]: mean over images (with a head) of the L1 inside the ground-truth head (0 best).
    - "eye_state" [0, 1]: balanced accuracy of the eyes read open or shut against the targets' expressions (0.5
      chance, 1 best; 0.5 when no frame shows an eye); only with `palettes` and frames that have "pose" and
      "expression".
    - "per_image": {"l1", "psnr", "ssim", "mean_iou", "figure_iou", "identity_error", "face_l1" (NaN without a
      head): [N] lists;
      "part_iou": [N][P] (parts in neither map: 1); "region_error": [N][4] (absent regions: 0)}.
    - "num_images", "parts" (PART_NAMES), "regions" (REGIONS), "tolerance".
  """
  generated = as_batch(generated, "generated")
  if len(frames) != len(generated):
    raise ValueError(f"evaluate_figures: {len(generated)} generated images but {len(frames)} frames")
  if palettes is not None and len(palettes) != len(frames):
    raise ValueError(f"evaluate_figures: {len(frames)} frames but {len(palettes)} palettes")
  for i, frame in enumerate(frames):
    for key in ("image", "part_mask"):
      if key not in frame:
        raise ValueError(f"evaluate_figures: frames[{i}] has no {key!r} (expected SyntheticSource.frame dicts)")
  targets = np.stack([np.asarray(frame["image"]) for frame in frames])
  if targets.shape != generated.shape:
    raise ValueError(f"evaluate_figures: generated {generated.shape} vs ground-truth images {targets.shape}")
  per_image = {key: value.tolist() for key, value in image_metrics(generated, targets).items()}
  ious, parts_present, errors, regions_present = [], [], [], []
  for i, frame in enumerate(frames):
    mask = np.asarray(frame["part_mask"])
    palette = palettes[i] if palettes is not None else palette_from_frame(targets[i], mask)
    labels = recover_parts(generated[i], palette, mask, tolerance=tolerance)
    iou, present = part_iou(labels, mask)
    err, has = region_errors(generated[i], targets[i], region_map(targets[i], mask, palette))
    ious.append(iou), parts_present.append(present), errors.append(err), regions_present.append(has)
    per_image.setdefault("figure_iou", []).append(_iou(labels != 0, mask != 0))
    per_image.setdefault("face_l1", []).append(face_l1(generated[i], targets[i], mask))
  ious, parts_present = np.array(ious), np.array(parts_present)
  errors, regions_present = np.array(errors), np.array(regions_present)
  per_image["mean_iou"] = _masked_mean(ious.T, parts_present.T, 1.0).tolist()
  per_image["identity_error"] = _masked_mean(errors.T, regions_present.T, 0.0).tolist()
  per_image["part_iou"] = ious.tolist()
  per_image["region_error"] = errors.tolist()
  out = {key: float(np.mean(per_image[key])) for key in ("l1", "psnr", "ssim", "mean_iou", "figure_iou",
                                                          "identity_error")}
  faces = np.array(per_image["face_l1"])
  out["face_l1"] = float(np.nanmean(faces)) if np.isfinite(faces).any() else 0.0
  per_image["face_l1"] = [None if np.isnan(v) else v for v in faces.tolist()]  # JSON has no NaN
  out["part_iou"] = dict(zip(PART_NAMES, _masked_mean(ious, parts_present, 1.0).tolist(), strict=True))
  out["region_error"] = dict(zip(REGIONS, _masked_mean(errors, regions_present, 0.0).tolist(), strict=True))
  if palettes is not None and all("pose" in f and "expression" in f for f in frames):
    shares = [eye_white_share(generated[i], f["pose"].face, palettes[i]) for i, f in enumerate(frames)]
    accuracy = eye_state_accuracy(shares, [float(f["expression"][1]) for f in frames])
    out["eye_state"] = accuracy if np.isfinite(accuracy) else 0.5  # no eye on any frame: nothing told, chance
    per_image["eye_white_share"] = [None if np.isnan(v) else v for v in shares]
  out.update(per_image=per_image, num_images=len(generated), parts=list(PART_NAMES), regions=list(REGIONS),
             tolerance=float(tolerance))
  return out
