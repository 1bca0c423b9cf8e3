"""The app's work on one job's inputs: a driving video (or OpenPose JSON files) -> pose renders -> an animation.

    frames, fps = video_frames("dance.mp4", PoseOptions(fps=8, max_frames=24))
    result = driving_poses(frames_or_json, reference_image, (H, W), PoseOptions(align=True))

Long videos are subsampled: a driving frame every `round(video fps / options.fps)` frames, at most
`options.max_frames` of them; the animation plays at `options.fps`, so its timing follows the video's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from magicpose_jax.data.augment import center_box, crop_poses
from magicpose_jax.pose import Pose, extract, read_openpose_canvas, read_openpose_json, render
from magicpose_jax.pose.align import align_poses

Progress = Callable[[int, int], None]  # (done, total)


@dataclasses.dataclass(frozen=True)
class PoseOptions:
  """How driving poses are taken: `fps` driving frames per second of video (also the output's frame rate), at most
  `max_frames`, and whether they are aligned to the reference person's proportions (`pose.align`)."""

  align: bool = True
  fps: float = 8.0
  max_frames: int = 24

  def __post_init__(self):
    if not (0 < self.fps <= 60) or not (0 < self.max_frames <= 10_000):
      raise ValueError(f"pose options: fps {self.fps} must be in (0, 60] and max_frames {self.max_frames} in "
                       f"[1, 10000]")


@dataclasses.dataclass(frozen=True)
class DrivingPoses:
  """Renders uint8 [F, H, W, 3] at the model's size: `extracted` on the driving frames' centre crop, `aligned` (or
  None) on the reference's; `report`: frame counts, frames without a person, the alignment's limb scales."""

  extracted: np.ndarray
  aligned: np.ndarray | None
  report: dict

  @property
  def for_animation(self) -> np.ndarray:
    return self.aligned if self.aligned is not None else self.extracted


def video_frames(path: str, options: PoseOptions) -> tuple[list[np.ndarray | None], float]:
  """(the subsampled frames, uint8 [H, W, 3] RGB or None where unreadable; the video's frame rate)."""
  capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    raise ValueError(f"{path}: cannot be opened as a video (OpenCV)")
  video_fps = capture.get(cv2.CAP_PROP_FPS) or options.fps
  capture.release()
  stride = max(1, round(video_fps / options.fps))
  frames = []
  for i, (_, frame) in enumerate(extract.iter_frames(path)):
    if i % stride == 0:
      frames.append(frame)
      if len(frames) == options.max_frames:
        break
  if not any(f is not None for f in frames):
    raise ValueError(f"{path}: no readable frames")
  return frames, video_fps


def json_poses(files: Sequence[str], canvas: tuple[int, int],
               options: PoseOptions) -> tuple[list[Pose | None], tuple[int, int]]:
  """(first person of each OpenPose JSON file or None, their canvas (H, W)): the files' own canvas, else `canvas`."""
  files = sorted(files)[: options.max_frames]
  poses, canvases = [], set()
  for f in files:
    people = read_openpose_json(f)
    poses.append(people[0] if people else None)
    canvases.add(read_openpose_canvas(f) or tuple(canvas))
  if len(canvases) > 1:
    raise ValueError(f"OpenPose JSON files with different canvases {sorted(canvases)}; one sequence's frames must "
                     f"share a size")
  return poses, canvases.pop()


def render_poses(poses: Sequence[Pose | None], canvas: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
  """uint8 [F, H, W, 3]: each pose drawn on the centre square of its `canvas` (H, W), at `size` (blank: None)."""
  box = center_box(*canvas)
  return np.stack([render(crop_poses([p] if p is not None else [], box, size[0]), *size) for p in poses])


def _extract(frames: Sequence[np.ndarray | None], estimate, progress: Progress | None,
             offset: int = 0, total: int | None = None) -> tuple[list[Pose | None], dict]:
  total = total or len(frames)

  def counted():
    for i, frame in enumerate(frames):
      if progress is not None:
        progress(offset + i, total)
      yield frame

  return extract.extract_poses(counted(), estimate)


def driving_poses(source: list[np.ndarray | None] | tuple[list[Pose | None], tuple[int, int]],
                  reference: np.ndarray, size: tuple[int, int], options: PoseOptions,
                  progress: Progress | None = None) -> DrivingPoses:
  """Pose renders of the driving sequence, extracted and (with `options.align`) aligned to the reference person.

  Args:
    source: the driving video's frames (`video_frames`), or `(poses, canvas)` from OpenPose JSON (`json_poses`).
    reference: uint8 [H, W, 3], the original reference image (its person's pose is extracted for alignment).
    size: the model's (H, W).
    progress: called with (frames done, frames to do) while poses are extracted.
  """
  estimate = extract.make_estimator()
  if isinstance(source, tuple):
    driving, canvas = source
    report = {"frames": len(driving), "no_person": [i for i, p in enumerate(driving) if p is None]}
  else:
    canvas = next(f for f in source if f is not None).shape[:2]
    driving, report = _extract(source, estimate, progress, total=len(source) + options.align)
  if not any(p is not None for p in driving):
    raise ValueError(f"no person found in any of the {len(driving)} driving frames")
  aligned = None
  if options.align:
    (ref_pose,), _ = _extract([reference], estimate, progress, offset=len(driving), total=len(driving) + 1)
    if ref_pose is None:
      raise ValueError("no person found in the reference photo, so its proportions are unknown: animate without "
                       "alignment (untick 'align')")
    moved, align_report = align_poses(driving, ref_pose)
    report["align"] = {k: v for k, v in align_report.items() if k in ("anchor_frame", "no_person", "scales")}
    aligned = render_poses(moved, reference.shape[:2], size)
  if progress is not None:
    progress(len(driving) + options.align, len(driving) + options.align)
  return DrivingPoses(render_poses(driving, canvas, size), aligned, report)
