"""Tiny dataset folders for the data tests: a TikTok-layout tree with known good and bad frames."""

from __future__ import annotations

import os

import cv2
import numpy as np

from magicpose_jax.pose import Pose, render, write_openpose_json

HEIGHT, WIDTH = 48, 40  # not square: preprocessing centre-crops


def frame_image(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
  """A distinct, textured uint8 RGB frame."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def frame_pose(seed: int, height: int = HEIGHT, width: int = WIDTH) -> Pose:
  """A pose with every body joint inside the image's central square, hands and face missing."""
  rng = np.random.default_rng(1000 + seed)
  side = min(height, width)
  x0, y0 = (width - side) // 2, (height - side) // 2
  xy = rng.uniform(4, side - 5, (18, 2)) + [x0, y0]
  body = np.concatenate([xy, np.ones((18, 1))], axis=1)
  return Pose(body, np.zeros((2, 21, 3)), np.zeros((70, 3)))


def write_tiny_vae(folder: str):
  """A random tiny diffusers VAE folder; returns (config, params).

  Random normal params: `AutoencoderKL.init` compiles for ~20 s on 2 cores, this takes a second.
  """
  import jax  # noqa: PLC0415

  from magicpose_jax.convert.vae import save_vae  # noqa: PLC0415
  from magicpose_jax.models.vae import VAE_VARIANTS, abstract_vae_params  # noqa: PLC0415

  config = VAE_VARIANTS["tiny"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype), abstract_vae_params(config))
  save_vae(config, params, folder)
  return config, params


def write_image(path: str, image: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)), path


def write_tiktok(root: str, split: str = "train_set") -> dict:
  """Writes the fixture tree; returns what a reader must find.

  Videos (frames are PNG, except v1's JPEGs):
    v0: 4 frames with OpenPose JSON beside them, plus `f4.png`, a near-constant grey frame with a JSON;
    v1: 3 frames with pose maps in pose_map_<split>/, plus `f3.jpg`, corrupt bytes with a pose map;
    v2: 3 frames, two with JSON, one with a pose map, plus `f3.png` with no pose at all;
    v3: an empty folder.
  Returns:
    {"good": [(video, stem)], "skipped": {reason: [relative path]}}.
  """
  good, seed = [], 0
  split_dir, pose_dir = os.path.join(root, split), os.path.join(root, f"pose_map_{split}")

  def add(video: str, stem: str, pose_kind: str, suffix: str = ".png") -> None:
    nonlocal seed
    seed += 1
    write_image(os.path.join(split_dir, video, stem + suffix), frame_image(seed))
    pose = frame_pose(seed)
    if pose_kind == "json":
      write_openpose_json(os.path.join(split_dir, video, stem + ".json"), [pose], canvas=(HEIGHT, WIDTH))
    else:
      write_image(os.path.join(pose_dir, video, stem + ".png"), render(pose, HEIGHT, WIDTH))
    good.append((video, stem))

  for i in range(4):
    add("v0", f"f{i}", "json")
  grey = os.path.join(split_dir, "v0", "f4.png")
  write_image(grey, np.full((HEIGHT, WIDTH, 3), 128, np.uint8))
  write_openpose_json(os.path.join(split_dir, "v0", "f4.json"), [frame_pose(99)], canvas=(HEIGHT, WIDTH))
  for i in range(3):
    add("v1", f"f{i}", "map", ".jpg")
  corrupt = os.path.join(split_dir, "v1", "f3.jpg")
  with open(corrupt, "wb") as f:
    f.write(b"\xff\xd8 this is not a jpeg")
  write_image(os.path.join(pose_dir, "v1", "f3.png"), render(frame_pose(98), HEIGHT, WIDTH))
  add("v2", "f0", "json")
  add("v2", "f1", "map")
  add("v2", "f2", "json")
  no_pose = os.path.join(split_dir, "v2", "f3.png")
  write_image(no_pose, frame_image(97))
  os.makedirs(os.path.join(split_dir, "v3"))
  rel = lambda p: os.path.relpath(p, root)
  return {"good": good, "skipped": {"near_constant": [rel(grey)], "corrupt_image": [rel(corrupt)],
                                    "missing_pose": [rel(no_pose)], "empty_video": [f"{split}/v3"]}}
