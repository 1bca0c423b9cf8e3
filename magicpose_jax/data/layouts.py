"""Frame sources over dataset folders: the TikTok layout and Everybody Dance Now subject folders.

TikTok (as released with DisCo/MagicPose), `split` e.g. `train_set`, `val_set`, `test_set`, `disco_test_set`:

  ROOT/<split>/<video>/<frame>.png|jpg             the frames
  ROOT/pose_map_<split>/<video>/<frame>.png         pose renders, same file stem as the frame, and/or
  ROOT/<split>/<video>/<frame>.json                 OpenPose JSON beside the frame (`<frame>_keypoints.json`,
                                                    OpenPose's own naming, is accepted too)

Everybody Dance Now (one subject = one video), `split` e.g. `train`, `val`:

  ROOT/<subject>/<split>/<frame>.png|jpg
  ROOT/<subject>/<split>/pose_map/<frame>.png       and/or   ROOT/<subject>/<split>/<frame>.json

Frames and poses are matched by file stem. When a frame has both a pose map and a JSON, the map is the pose image
(the release trained on its maps) and the JSON gives the keypoints. Frames are ordered by natural sort of their
stems (`frame2` before `frame10`); videos likewise.

Nothing is dropped silently: a frame without any pose and a video folder without frames are listed in `skipped`
with their path and reason (`missing_pose`, `empty_video`); problems found only on decoding raise `FrameError`
with a reason (`corrupt_image`, `corrupt_pose`) for the caller to record (see `data/preprocessing.py`).
Files that are neither images nor JSON (e.g. `.txt`, `.DS_Store`) are not frames and are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from magicpose_jax.pose.openpose_json import read_openpose_json
from magicpose_jax.pose.render import render

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
JSON_SUFFIXES = ("_keypoints.json", ".json")


class FrameError(ValueError):
  """A frame whose files exist but cannot be used; `reason` is a manifest key, `path` the offending file."""

  def __init__(self, reason: str, path: str, detail: str):
    super().__init__(f"{path}: {reason} ({detail})")
    self.reason, self.path, self.detail = reason, path, detail


@dataclasses.dataclass(frozen=True)
class FrameFiles:
  """The files of one frame: its image and at least one of a pose map and an OpenPose JSON."""

  video: str
  frame: str  # the file stem
  image: str
  pose_map: str | None = None
  pose_json: str | None = None

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(p for p in (self.image, self.pose_map, self.pose_json) if p)


@dataclasses.dataclass(frozen=True)
class SkippedFrame:
  """A frame (or folder) left out, and why. `reason` is the manifest key; `path` the file or folder."""

  reason: str
  path: str
  detail: str = ""


def natural_key(name: str) -> tuple:
  """Sort key that orders embedded numbers numerically: `f2` < `f10`."""
  return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def read_image(path: str) -> np.ndarray:
  """An image file -> uint8 RGB [H, W, 3]; raises `FrameError("corrupt_image")` when it cannot be decoded."""
  with open(path, "rb") as f:
    data = f.read()
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
  if image is None:
    raise FrameError("corrupt_image", path, f"{len(data)} bytes that OpenCV cannot decode")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FolderSource:
  """A frame source (the contract's interface) over frame files found by a layout scanner.

  Attributes:
    root: the dataset folder.
    videos: video names, sorted.
    skipped: frames and folders the scan left out, with reasons.
  """

  def __init__(self, root: str, videos: Sequence[tuple[str, Sequence[FrameFiles]]], skipped: Sequence[SkippedFrame]):
    self.root = root
    self.videos = [name for name, _ in videos]
    self._frames = [list(frames) for _, frames in videos]
    self.skipped = list(skipped)

  @property
  def num_videos(self) -> int:
    return len(self.videos)

  def num_frames(self, video: int) -> int:
    return len(self._frames[video])

  def files(self, video: int, frame: int) -> FrameFiles:
    return self._frames[video][frame]

  def frame(self, video: int, frame: int) -> dict:
    """Decodes frame `frame` of video `video`.

    Returns:
      "image": uint8 [H, W, 3] RGB; "pose_image": uint8 [H, W, 3] (the pose map resized to the image if its size
      differs, or the JSON's people rendered); "pose": the first person's `Pose` or None without JSON;
      "poses": every person of the JSON (None without JSON); "video", "frame": names.
    Raises:
      FrameError: "corrupt_image" or "corrupt_pose", naming the file.
    """
    files = self.files(video, frame)
    image = read_image(files.image)
    height, width = image.shape[:2]
    poses = None
    if files.pose_json:
      try:
        poses = read_openpose_json(files.pose_json)
      except (ValueError, KeyError, TypeError) as e:
        raise FrameError("corrupt_pose", files.pose_json, str(e)) from None
    if files.pose_map:
      try:
        pose_image = read_image(files.pose_map)
      except FrameError as e:
        raise FrameError("corrupt_pose", e.path, e.detail) from None
      if pose_image.shape[:2] != (height, width):
        pose_image = cv2.resize(pose_image, (width, height), interpolation=cv2.INTER_AREA)
    else:
      pose_image = render(poses, height, width)
    return {"image": image, "pose_image": pose_image, "pose": poses[0] if poses else None, "poses": poses,
            "video": files.video, "frame": files.frame}


def _list_dir(folder: str) -> list[str]:
  return sorted((e for e in os.listdir(folder) if not e.startswith(".")), key=natural_key)


def _pose_json_by_stem(names: Sequence[str]) -> dict[str, str]:
  out = {}
  for name in names:
    for suffix in JSON_SUFFIXES:
      if name.lower().endswith(suffix):
        out.setdefault(name[:-len(suffix)], name)
        break
  return out


def scan_video(video: str, image_dir: str, pose_map_dir: str | None) -> tuple[list[FrameFiles], list[SkippedFrame]]:
  """The frames of one video folder, matched with pose maps in `pose_map_dir` and JSON beside the images."""
  names = _list_dir(image_dir)
  images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(image_dir, n))]
  if not images:
    return [], [SkippedFrame("empty_video", image_dir, "no .png/.jpg frames")]
  jsons = _pose_json_by_stem(names)
  maps = {}
  if pose_map_dir and os.path.isdir(pose_map_dir):
    maps = {os.path.splitext(n)[0]: n for n in reversed(_list_dir(pose_map_dir)) if n.lower().endswith(IMAGE_SUFFIXES)}
  frames, skipped, seen = [], [], set()
  for name in images:
    stem = os.path.splitext(name)[0]
    path = os.path.join(image_dir, name)
    if stem in seen:
      skipped.append(SkippedFrame("duplicate_frame", path, f"another image has the stem {stem!r}"))
      continue
    seen.add(stem)
    pose_map = os.path.join(pose_map_dir, maps[stem]) if stem in maps else None
    pose_json = os.path.join(image_dir, jsons[stem]) if stem in jsons else None
    if pose_map is None and pose_json is None:
      wanted = ([os.path.join(pose_map_dir, stem + ".png")] if pose_map_dir else []) + [f"{stem}.json beside it"]
      skipped.append(SkippedFrame("missing_pose", path, "no " + " or ".join(wanted)))
      continue
    frames.append(FrameFiles(video, stem, path, pose_map, pose_json))
  return frames, skipped


def _scan(root: str, entries: Sequence[tuple[str, str, str | None]],
          skipped: Sequence[SkippedFrame] = ()) -> FolderSource:
  videos, skipped = [], list(skipped)
  for video, image_dir, pose_map_dir in entries:
    frames, missed = scan_video(video, image_dir, pose_map_dir)
    skipped += missed
    if frames:
      videos.append((video, frames))
  return FolderSource(root, videos, skipped)


def _require_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such folder ({what})")


def tiktok_source(root: str | os.PathLike, split: str = "train_set") -> FolderSource:
  """`ROOT/<split>/<video>/<frame>` with `ROOT/pose_map_<split>/<video>/<frame>.png` and/or JSON beside."""
  root = os.fspath(root)
  split_dir = os.path.join(root, split)
  _require_dir(split_dir, f"TikTok layout: ROOT/{split}/<video>/<frame>")
  pose_root = os.path.join(root, f"pose_map_{split}")
  entries = [(video, os.path.join(split_dir, video), os.path.join(pose_root, video))
             for video in _list_dir(split_dir) if os.path.isdir(os.path.join(split_dir, video))]
  return _scan(root, entries)


def edn_source(root: str | os.PathLike, split: str = "train") -> FolderSource:
  """`ROOT/<subject>/<split>/<frame>` with `ROOT/<subject>/<split>/pose_map/<frame>.png` and/or JSON beside."""
  root = os.fspath(root)
  _require_dir(root, "Everybody Dance Now layout: ROOT/<subject>/<split>/<frame>")
  entries, skipped = [], []
  for subject in _list_dir(root):
    if not os.path.isdir(os.path.join(root, subject)):
      continue
    frames_dir = os.path.join(root, subject, split)
    if os.path.isdir(frames_dir):
      entries.append((subject, frames_dir, os.path.join(frames_dir, "pose_map")))
    else:  # a subject without this split is an empty video, reported like any other
      skipped.append(SkippedFrame("empty_video", frames_dir, f"the subject has no {split}/ folder"))
  return _scan(root, entries, skipped)


LAYOUTS: dict[str, Callable[..., FolderSource]] = {"tiktok": tiktok_source, "edn": edn_source}
DEFAULT_SPLITS = {"tiktok": "train_set", "edn": "train"}


def open_layout(layout: str, root: str | os.PathLike, split: str | None = None) -> FolderSource:
  """The frame source of `layout` ("tiktok" or "edn") at `root`; `split` defaults per layout."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
  return LAYOUTS[layout](root, split or DEFAULT_SPLITS[layout])
