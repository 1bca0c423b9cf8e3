"""Pose extraction from images or a video: MediaPipe's models by default (no download at run time), or a local
DWPose / RTMPose whole-body ONNX model.

    python -m magicpose_jax.pose.models install          # once: the MediaPipe .tflite files (from PyPI)
    python -m magicpose_jax.pose.extract --src FRAMES_OR_VIDEO --out DIR
    python -m magicpose_jax.pose.extract --pose-model dw-ll_ucoco_384.onnx [--det yolox_l.onnx] --src ... --out DIR

Writes, per kept frame, `DIR/<stem>.json` (OpenPose JSON) and `DIR/<stem>.png` (the ControlNet-style pose
render), where `<stem>` is the image's file stem (or the frame number, `00000`, for a video); and
`DIR/extract_report.json` with the count of frames dropped by each filter. The filters are the release's: exactly
one person, more than 6 body keypoints above the confidence threshold, and a body bounding box over 4 % of the
image; frames that cannot be read are counted too ("unreadable"), never a crash (`--strict`: exit 1 after writing
everything when there is one). The report is written even when extraction stops early (`"complete": false` and the
`"error"`).

Backends: the default runs MediaPipe's BlazePose, hand and face-mesh models with ai-edge-litert (`holistic.py`;
one person per frame). `--pose-model` runs a SimCC whole-body ONNX model with onnxruntime (imported only then)
top-down: on each person box of the detector (`--det`, needs rtmlib), or without a detector on the whole frame.

In Python: `poses, report = extract_poses(frames)` for uint8 frames [T, H, W, 3] (or any iterable of images).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from magicpose_jax.pose.keypoints import Pose, from_wholebody
from magicpose_jax.pose.openpose_json import write_openpose_json
from magicpose_jax.pose.render import DEFAULT_THRESHOLD, render

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
REPORT_NAME = "extract_report.json"
FILTER_REASONS = ("unreadable", "no_person", "several_people", "few_keypoints", "small_person")
NO_MODEL_MESSAGE = """\
A DWPose / RTMW whole-body pose model in ONNX format (--pose-model) needs onnxruntime.
  Install the optional extra:   pip install onnxruntime rtmlib
  Get a model by hand (nothing is downloaded for you), then pass its path:
    - DWPose: dw-ll_ucoco_384.onnx (pose) and yolox_l.onnx (person detector, for --det), published by the
      DWPose project (IDEA-Research/DWPose; the files are in the Hugging Face repository yzd-v/DWPose);
    - or an RTMW / RTMPose-WholeBody "onnx_sdk" model from OpenMMLab's mmpose RTMPose pages (rtmlib's
      Wholebody.MODE lists them), with a YOLOX human detector for --det.
  The model must output the 133 COCO-WholeBody keypoints as SimCC vectors (DWPose and RTMW do)."""


@dataclasses.dataclass(frozen=True)
class FrameFilter:
  """Which frames get a pose (the release's filters)."""

  threshold: float = DEFAULT_THRESHOLD  # a keypoint counts (and is drawn) when its confidence is above this
  min_keypoints: int = 7  # "more than 6 body keypoints"
  min_area_fraction: float = 0.04  # body keypoints' bounding box over this fraction of the image


def body_box(pose: Pose, threshold: float) -> tuple[float, float, float, float] | None:
  """(x0, y0, x1, y1) of the body keypoints above threshold, or None when there is none."""
  visible = pose.body[pose.body[:, 2] > threshold]
  if not len(visible):
    return None
  return (float(visible[:, 0].min()), float(visible[:, 1].min()), float(visible[:, 0].max()),
          float(visible[:, 1].max()))


def filter_reason(poses: Sequence[Pose], height: int, width: int, filt: FrameFilter = FrameFilter()) -> str | None:
  """Why a frame is dropped (one of FILTER_REASONS), or None to keep it.

  People are the poses with at least one body keypoint above the threshold.
  """
  people = [p for p in poses if body_box(p, filt.threshold) is not None]
  if not people:
    return "no_person"
  if len(people) > 1:
    return "several_people"
  pose = people[0]
  if int((pose.body[:, 2] > filt.threshold).sum()) < filt.min_keypoints:
    return "few_keypoints"
  x0, y0, x1, y1 = body_box(pose, filt.threshold)
  if (x1 - x0) * (y1 - y0) <= filt.min_area_fraction * height * width:
    return "small_person"
  return None


def write_frame(out_dir: str, stem: str, pose: Pose, height: int, width: int, threshold: float) -> None:
  """Writes `<stem>.json` (OpenPose JSON with the canvas size) and `<stem>.png` (pose render) into out_dir."""
  write_openpose_json(os.path.join(out_dir, f"{stem}.json"), [pose], canvas=(height, width))
  image = render(pose, height, width, threshold=threshold)
  cv2.imwrite(os.path.join(out_dir, f"{stem}.png"), image[..., ::-1])  # RGB -> OpenCV's BGR


def extract_frames(frames: Iterable[tuple[str, np.ndarray | None]], estimate: Callable[[np.ndarray], list[Pose]],
                   out_dir: str, filt: FrameFilter = FrameFilter()) -> dict:
  """Runs `estimate` on each (stem, uint8 [H, W, 3] RGB image or None: unreadable), filters, writes kept frames and
  the report.

  Returns:
    The report also written to `out_dir/extract_report.json`: frame counts (`frames`, `kept`), `filtered`
    (reason -> count, every reason listed), `filtered_frames` (stem -> reason), the filter settings, and
    `complete`. Written also when an exception stops the loop (then `complete` is false, `error` says why, the
    counts cover the frames before it) and re-raised.
  """
  os.makedirs(out_dir, exist_ok=True)
  counts: Counter = Counter()
  dropped: dict[str, str] = {}
  total = kept = 0
  error = None
  try:
    for stem, image in frames:
      total += 1
      if image is None:
        counts["unreadable"] += 1
        dropped[stem] = "unreadable"
        continue
      height, width = image.shape[:2]
      poses = estimate(image)
      reason = filter_reason(poses, height, width, filt)
      if reason is None:
        (pose,) = [p for p in poses if body_box(p, filt.threshold) is not None]
        write_frame(out_dir, stem, pose, height, width, filt.threshold)
        kept += 1
      else:
        counts[reason] += 1
        dropped[stem] = reason
  except BaseException as e:  # the report still says how far it got (and why it stopped), then the error goes on
    error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    raise
  finally:
    report = {"frames": total, "kept": kept, "filtered": {r: counts[r] for r in FILTER_REASONS},
              "filtered_frames": dropped, "filter": dataclasses.asdict(filt), "complete": error is None}
    if error is not None:
      report["error"] = error
    with open(os.path.join(out_dir, REPORT_NAME), "w") as f:
      json.dump(report, f, indent=1)
  return report


def extract_poses(frames: np.ndarray | Iterable[np.ndarray | None],
                  estimate: Callable[[np.ndarray], list[Pose]] | None = None,
                  threshold: float = DEFAULT_THRESHOLD) -> tuple[list[Pose | None], dict]:
  """One pose per frame (None: no person or unreadable), and a report; no file is written.

  Args:
    frames: uint8 RGB [T, H, W, 3], or an iterable of [H, W, 3] images (None for a frame that failed to read).
    estimate: image -> poses (default: the MediaPipe extractor, `make_estimator()`).
    threshold: a person is a pose with a body keypoint above this confidence.

  Returns:
    (poses, report): `frames` (count), `with_person`, `no_person` and `unreadable` (frame indices) and
    `several_people` (indices of frames where the largest of several people was kept).
  """
  estimate = estimate or make_estimator()
  poses: list[Pose | None] = []
  report = {"frames": 0, "with_person": 0, "no_person": [], "unreadable": [], "several_people": []}
  for i, image in enumerate(frames):
    report["frames"] += 1
    if image is None:
      report["unreadable"].append(i)
      poses.append(None)
      continue
    people = [(p, body_box(p, threshold)) for p in estimate(image)]
    people = [(p, (x1 - x0) * (y1 - y0)) for p, box in people if box is not None for x0, y0, x1, y1 in [box]]
    if not people:
      report["no_person"].append(i)
      poses.append(None)
      continue
    if len(people) > 1:
      report["several_people"].append(i)
    poses.append(max(people, key=lambda pa: pa[1])[0])
    report["with_person"] += 1
  return poses, report


def make_estimator(pose_model: str | None = None, det: str | None = None, models_dir: str | None = None,
                   device: str = "cpu") -> Callable[[np.ndarray], list[Pose]]:
  """image -> poses: MediaPipe's models (default; MissingModelError says how to install them) or, with
  `pose_model`, a whole-body ONNX model (onnxruntime; `det`: an optional YOLOX person detector)."""
  if pose_model is None:
    from magicpose_jax.pose.holistic import Holistic  # noqa: PLC0415

    return Holistic(models_dir)
  if importlib.util.find_spec("onnxruntime") is None:
    raise ValueError(f"--pose-model {pose_model}: onnxruntime is not installed.\n{NO_MODEL_MESSAGE}")
  if not os.path.isfile(pose_model):
    raise FileNotFoundError(f"--pose-model {pose_model}: no such file.\n{NO_MODEL_MESSAGE}")
  return WholebodyEstimator(pose_model, det, device)


def iter_frames(src: str) -> Iterator[tuple[str, np.ndarray | None]]:
  """(stem, uint8 [H, W, 3] RGB, or None where a frame cannot be read) of a folder of images (sorted by name), one
  image, or a video's frames."""
  if os.path.isdir(src):
    paths = sorted(os.path.join(src, n) for n in os.listdir(src) if n.lower().endswith(IMAGE_SUFFIXES))
  elif src.lower().endswith(IMAGE_SUFFIXES):
    if not os.path.isfile(src):
      raise FileNotFoundError(f"--src {src}: no such image")
    paths = [src]
  else:
    yield from _video_frames(src)
    return
  for path in paths:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    yield os.path.splitext(os.path.basename(path))[0], (None if image is None else image[..., ::-1])


def _video_frames(path: str) -> Iterator[tuple[str, np.ndarray | None]]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--src {path}: no such image folder, image or video")
  capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    raise ValueError(f"{path}: OpenCV cannot open it as a video")
  declared = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
  index = 0
  try:
    while True:
      ok, frame = capture.read()
      if not ok:
        break
      yield f"{index:05d}", frame[..., ::-1]
      index += 1
  finally:
    capture.release()
  # A stream that stops before the frame count its header declares: the rest could not be read.
  for missing in range(index, declared):
    yield f"{missing:05d}", None


# ----------------------------------------------------------------------------------------------------------------
# Top-down SimCC inference (RTMPose / DWPose), the steps rtmlib takes, on onnxruntime.

MEAN = (123.675, 116.28, 103.53)  # applied to BGR input, as rtmlib and DWPose do with these models
STD = (58.395, 57.12, 57.375)
BOX_PADDING = 1.25
SIMCC_SPLIT_RATIO = 2.0


def box_to_input(box: Sequence[float], input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Affine [2, 3] from image to model input for a person box, and the [2] box size (w, h) it covers.

  The box (x0, y0, x1, y1) is padded by 1.25 and widened or heightened to the model's aspect ratio, centred.
  """
  in_h, in_w = input_hw
  x0, y0, x1, y1 = (float(v) for v in box)
  center = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
  w, h = (x1 - x0) * BOX_PADDING, (y1 - y0) * BOX_PADDING
  w, h = (w, w * in_h / in_w) if w > h * in_w / in_h else (h * in_w / in_h, h)
  s = in_w / w
  warp = np.array([[s, 0.0, in_w / 2 - s * center[0]], [0.0, s, in_h / 2 - s * center[1]]])
  return warp, np.array([w, h])


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, warp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """SimCC vectors [K, Wx], [K, Wy] -> image keypoints [K, 2] and scores [K] (mean of the two maxima)."""
  locs = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], axis=-1) / SIMCC_SPLIT_RATIO  # [K, 2] input pixels
  scores = 0.5 * (simcc_x.max(-1) + simcc_y.max(-1))
  s = warp[0, 0]
  keypoints = (locs - warp[:, 2]) / s
  return keypoints.astype(np.float32), scores.astype(np.float32)


class WholebodyEstimator:
  """RGB image -> list of Pose with a SimCC whole-body ONNX model (and optionally a YOLOX person detector)."""

  def __init__(self, model: str, det: str | None = None, device: str = "cpu"):
    import onnxruntime as ort  # noqa: PLC0415  (optional dependency)

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    self.session = ort.InferenceSession(model, providers=providers)
    shape = self.session.get_inputs()[0].shape  # [1, 3, H, W]
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
      raise ValueError(f"{model}: expected a fixed [1, 3, H, W] input, found {shape}")
    self.input_hw = (shape[2], shape[3])
    self.detector = None
    if det is not None:
      import rtmlib  # noqa: PLC0415  (optional dependency, for its YOLOX pre/post-processing)

      det_shape = ort.InferenceSession(det, providers=providers).get_inputs()[0].shape
      self.detector = rtmlib.YOLOX(det, model_input_size=(det_shape[3], det_shape[2]), backend="onnxruntime",
                                   device=device)

  def __call__(self, image: np.ndarray) -> list[Pose]:
    bgr = np.ascontiguousarray(image[..., ::-1])
    boxes = [(0, 0, image.shape[1], image.shape[0])] if self.detector is None else list(self.detector(bgr))
    keypoints, scores = [], []
    for box in boxes:
      warp, _ = box_to_input(box, self.input_hw)
      crop = cv2.warpAffine(bgr, warp, self.input_hw[::-1], flags=cv2.INTER_LINEAR)
      x = ((crop - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)[None].astype(np.float32)  # [1, 3, H, W]
      simcc_x, simcc_y = self.session.run(None, {self.session.get_inputs()[0].name: x})[:2]
      kp, sc = decode_simcc(simcc_x[0], simcc_y[0], warp)
      keypoints.append(kp)
      scores.append(sc)
    return from_wholebody(np.stack(keypoints), np.stack(scores)) if boxes else []


def build_parser() -> argparse.ArgumentParser:
  """The command line (also parsed by the README test)."""
  parser = argparse.ArgumentParser(prog="python -m magicpose_jax.pose.extract", description=__doc__.split("\n\n")[0])
  parser.add_argument("--pose-model", "--model", dest="pose_model", default=None,
                      help="whole-body ONNX model (DWPose or RTMW) instead of the default MediaPipe models")
  parser.add_argument("--det", help="optional YOLOX person detector (.onnx) for --pose-model; needs rtmlib")
  parser.add_argument("--models-dir", default=None, help="MediaPipe model folder (default: $MAGICPOSE_POSE_MODELS "
                      "or ~/.cache/magicpose_jax/pose_models)")
  parser.add_argument("--src", required=True, help="folder of images, one image, or a video file")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="onnxruntime device (--pose-model)")
  parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                      help="keypoint confidence threshold (default: %(default)s)")
  parser.add_argument("--strict", action="store_true", help="exit 1 when any frame cannot be read (the report is "
                      "written either way)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if not os.path.exists(args.src):
      raise FileNotFoundError(f"--src {args.src}: no such image folder, image or video")
    frames = iter_frames(args.src)
    estimator = make_estimator(args.pose_model, args.det, args.models_dir, args.device)
    report = extract_frames(frames, estimator, args.out, FrameFilter(threshold=args.threshold))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  where = os.path.join(args.out, REPORT_NAME)
  if report["frames"] == 0:
    print(f"error: --src {args.src}: no frames (images {', '.join(IMAGE_SUFFIXES)} or a video); report in {where}",
          file=sys.stderr)
    return 2
  print(f"{report['kept']} of {report['frames']} frames kept; filtered: {report['filtered']}; report in {where}")
  unreadable = [stem for stem, why in report["filtered_frames"].items() if why == "unreadable"]
  if unreadable:
    print(f"warning: {len(unreadable)} frames could not be read: {', '.join(unreadable[:10])}"
          f"{' ...' if len(unreadable) > 10 else ''}", file=sys.stderr)
    if args.strict:
      print("error: --strict: unreadable frames (listed in the report)", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
