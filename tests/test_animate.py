"""`python -m magicpose_jax.animate` on the tiny stage-2 run of test_export_run.py (2 DDIM steps)."""

from __future__ import annotations

import logging
import os

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image
from test_export_run import make_tiny_run

from magicpose_jax import inference
from magicpose_jax.animate import main as animate_main
from magicpose_jax.export import convert
from magicpose_jax.pose import Pose, write_openpose_json

CANVAS = (64, 48)  # (H, W) of the pose files' frames; the model makes 32 x 32


def _pose(rng: np.random.Generator) -> Pose:
  body = np.concatenate([rng.uniform((4, 10), (44, 60), size=(18, 2)), np.ones((18, 1))], axis=1)
  return Pose(body=body.astype(np.float32), hands=np.zeros((2, 21, 3), np.float32), face=np.zeros((70, 3), np.float32))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("animate")
  rng = np.random.default_rng(0)
  poses = root / "poses"
  poses.mkdir()
  for i in range(3):
    write_openpose_json(poses / f"{i:03d}.json", [_pose(rng)], canvas=CANVAS)
  reference = root / "reference.png"
  Image.fromarray(rng.integers(0, 256, (*CANVAS, 3), dtype=np.uint8)).save(reference)
  return root, poses, reference


def _frames(path) -> list[np.ndarray]:
  with Image.open(path) as gif:
    out = []
    for i in range(gif.n_frames):
      gif.seek(i)
      out.append(np.asarray(gif.convert("RGB")))
  return out


def test_animate_writes_three_frames_and_the_side_by_side(inputs, capsys, monkeypatch):
  root, poses, _ = inputs
  out = root / "out.gif"
  monkeypatch.chdir(root)  # every path relative, as a user types them (orbax itself needs absolute ones)
  args = ["--checkpoint", os.path.relpath(make_tiny_run()), "--reference", "reference.png", "--poses", "poses",
          "--out", "out.gif", "--steps", "2", "--batch-frames", "2"]  # 2 + 1 frames: a padded last chunk
  assert animate_main(args) == 0, capsys.readouterr().err
  frames = _frames(out)
  assert len(frames) == 3 and all(f.shape == (32, 32, 3) for f in frames)
  side = _frames(root / "out_side_by_side.gif")
  assert len(side) == 3 and all(f.shape == (32, 96, 3) for f in side)
  # The pose column is the JSON render at the model's size (a centre crop of the canvas).
  renders = inference.load_poses(poses, (32, 32), canvas=CANVAS)
  assert renders.shape == (3, 32, 32, 3) and renders.any()
  assert not np.array_equal(frames[0], frames[1])  # the pose drives the frames

  # The diffusers export of the run animates to the same frames (same weights, one compilation).
  export = root / "export"
  convert(os.path.relpath(make_tiny_run()), "export", "diffusers")
  assert (export / "magicpose.json").is_file()
  args = ["--checkpoint", "export"] + args[2:]
  args[args.index("--out") + 1] = "from_export.gif"
  assert animate_main(args) == 0, capsys.readouterr().err
  for ours, theirs in zip(_frames(root / "from_export.gif"), frames, strict=True):
    np.testing.assert_array_equal(ours, theirs)


def test_clear_errors(inputs, capsys, monkeypatch):
  root, poses, reference = inputs
  monkeypatch.setenv("MAGICPOSE_POSE_MODELS", str(root / "no_models"))  # the extractor's models are missing
  base = ["--checkpoint", make_tiny_run(), "--steps", "2"]
  bad = root / "bad.png"
  bad.write_bytes(b"not an image")
  empty = root / "empty"
  empty.mkdir()
  mixed = root / "mixed"
  mixed.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(mixed / "a.png")
  Image.fromarray(np.zeros((40, 32, 3), np.uint8)).save(mixed / "b.png")
  video = root / "video.mp4"
  video.write_bytes(b"")
  cases = [
      (["--reference", str(bad), "--poses", str(poses), "--out", str(root / "x.gif")], "cannot be read as an image"),
      (["--reference", str(reference), "--poses", str(empty), "--out", str(root / "x.gif")], "no pose images"),
      (["--reference", str(reference), "--poses", str(mixed), "--out", str(root / "x.gif")], "different sizes"),
      (["--reference", str(reference), "--poses", str(poses), "--out", str(root / "x.avi")], "expected a .mp4"),
      (["--reference", str(reference), "--poses", str(root / "clip.mp4"), "--out", str(root / "x.gif")],
       "no such folder or file"),
      (["--reference", str(reference), "--poses", str(video), "--out", str(root / "x.gif")],
       "run once:  python -m magicpose_jax.pose.models install"),
      (["--reference", str(reference), "--poses", str(mixed), "--out", str(root / "x.gif"), "--align"],
       "alignment needs keypoints"),
      (["--reference", str(reference), "--poses", str(poses), "--out", str(root / "x.gif"), "--guidance", "-5"],
       "guidance -5.0: expected a finite number >= 0"),
      (["--reference", str(reference), "--poses", str(poses), "--out", str(root / "x.gif"), "--guidance", "nan"],
       "guidance nan: expected a finite number >= 0"),
      (["--reference", str(reference), "--poses", str(poses), "--out", str(root / "x.gif"), "--batch-frames", "0"],
       "batch-frames 0: expected an integer >= 1"),
      (["--reference", str(reference), "--poses", str(poses), "--out", str(root / "x.gif"), "--fps", "0"],
       "--fps 0.0: expected a frame rate > 0"),
  ]
  for args, message in cases:
    assert animate_main(base + args) == 2
    assert message in capsys.readouterr().err


def test_a_pose_frame_without_a_person_is_named_in_a_warning(inputs, tmp_path, caplog):
  _, poses, _ = inputs
  folder = tmp_path / "poses"
  folder.mkdir()
  for name in ("000.json", "001.json"):
    (folder / name).write_bytes((poses / name).read_bytes())
  write_openpose_json(folder / "002.json", [], canvas=CANVAS)  # a frame where the detector found nobody
  with caplog.at_level(logging.WARNING):
    renders = inference.load_poses(folder, (32, 32), canvas=CANVAS)
  assert inference.blank_pose_frames(renders) == [2]
  assert f"1 of 3 pose frames of {folder} show no person" in caplog.text and caplog.text.rstrip().endswith("002.json")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    inference.load_poses(poses, (32, 32), canvas=CANVAS)
  assert "show no person" not in caplog.text


def test_png_strip(tmp_path):
  frames = np.random.default_rng(1).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
  inference.write_frames(tmp_path / "strip.png", frames)
  assert np.array_equal(np.asarray(Image.open(tmp_path / "strip.png")), np.concatenate(list(frames), axis=1))


def read_mp4(path) -> np.ndarray:
  """uint8 [F, H, W, 3] decoded by imageio with imageio-ffmpeg's ffmpeg (not the writer's code path)."""
  with imageio.get_reader(path, "ffmpeg") as reader:
    return np.stack(list(reader.iter_data()))  # list(reader) would size itself by its len(): inf


def test_mp4_decodes_to_the_frames_written(tmp_path):
  # Smooth moving gradients: H.264 keeps them within a few levels (random noise it would not).
  y, x = np.mgrid[0:32, 0:48]
  frames = np.stack([np.stack([(x * 5 + 12 * i) % 256, (y * 7) % 256, np.full_like(x, 40 * i)], -1)
                     for i in range(5)]).astype(np.uint8)
  inference.write_frames(tmp_path / "clip.mp4", frames, fps=8)
  decoded = read_mp4(tmp_path / "clip.mp4")
  assert decoded.shape == frames.shape
  assert np.abs(decoded.astype(int) - frames).mean() < 6
  with pytest.raises(ValueError, match="even sizes"):
    inference.write_frames(tmp_path / "odd.mp4", frames[:, :31])
