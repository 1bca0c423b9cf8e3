"""The evaluate CLI and its report: pairing by name, clear errors, metrics equal to the library's, LPIPS/FID on
tiny random networks (the plumbing), skips with messages when weights are missing, report.json + report.md."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from magicpose_jax import evaluate
from magicpose_jax.eval.fid import random_inception
from magicpose_jax.eval.folders import pair_frames
from magicpose_jax.eval.image_metrics import l1, psnr, ssim
from magicpose_jax.eval.lpips import random_lpips
from magicpose_jax.eval.report import evaluate_folders, write_report


def _write(folder, names, images, suffix=".png"):
  for name, image in zip(names, images, strict=True):
    path = os.path.join(folder, name + suffix)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture
def folders(tmp_path):
  """3 frames of two videos; generated = ground truth + noise; PNG against lossless WebP ground truth."""
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  pred = np.clip(gt + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)
  names = ["video_a/0001", "video_a/0002", "video_b/0001"]
  _write(tmp_path / "pred", names, pred)
  for name, image in zip(names, gt, strict=True):
    os.makedirs(tmp_path / "gt" / os.path.dirname(name), exist_ok=True)
    Image.fromarray(image).save(tmp_path / "gt" / f"{name}.webp", lossless=True)
  return str(tmp_path / "pred"), str(tmp_path / "gt"), pred, gt, names


def test_metrics_match_the_library_and_report_is_written(folders, tmp_path):
  pred_dir, gt_dir, pred, gt, names = folders
  report = evaluate_folders(pred_dir, gt_dir, ["l1", "psnr", "ssim"], fps=30)
  assert [row["name"] for row in report["per_frame"]] == names
  for metric, fn in (("l1", l1), ("psnr", psnr), ("ssim", ssim)):
    np.testing.assert_allclose([row[metric] for row in report["per_frame"]], fn(pred, gt), rtol=1e-12)
    assert report["metrics"][metric] == pytest.approx(float(np.mean(fn(pred, gt))))
  assert report["num_frames"] == 3 and report["resolution"] == [64, 64] and report["fps"] == 30
  assert {"jax", "numpy", "python"} <= set(report["versions"]) and "sigma 1.5" in report["settings"]["ssim"]
  json_path, md_path = write_report(report, str(tmp_path / "out"))
  assert json.load(open(json_path))["metrics"] == report["metrics"]
  md = open(md_path).read()
  assert "| ssim |" in md and "frame rate: 30" in md and "| jax |" in md


def test_lpips_and_fid_plumbing_on_random_networks(folders):
  pred_dir, gt_dir, *_ = folders
  kwargs = dict(lpips_model=random_lpips("alex"), inception=random_inception(), batch_size=4)
  report = evaluate_folders(pred_dir, gt_dir, ["lpips", "fid"], **kwargs)
  assert report["skipped"] == {}
  assert all(row["lpips"] > 0 for row in report["per_frame"]) and report["metrics"]["fid"] > 0
  assert report["settings"]["fid"]["num_images"] == 3 and report["settings"]["lpips"]["net"] == "alex"
  same = evaluate_folders(gt_dir, gt_dir, ["lpips", "fid"], **kwargs)
  assert same["metrics"]["lpips"] == pytest.approx(0, abs=1e-6) and same["metrics"]["fid"] == pytest.approx(0, abs=1e-6)


def test_cli_skips_with_messages_without_weights(folders, tmp_path, capsys):
  pred_dir, gt_dir, *_ = folders
  out = tmp_path / "report"
  code = evaluate.main(["--pred", pred_dir, "--gt", gt_dir, "--metrics", "l1,psnr,lpips,fid,fvd", "--out", str(out),
                        "--weights", str(tmp_path)])
  assert code == 0
  err = capsys.readouterr().err
  assert "alexnet-owt-7be5be79.pth" in err and "pt_inception-2015-12-05-6726825d.pth" in err and "fvd" in err
  report = json.load(open(out / "report.json"))
  assert set(report["metrics"]) == {"l1", "psnr"} and set(report["skipped"]) == {"lpips", "fid", "fvd"}
  assert "## Skipped" in open(out / "report.md").read()


def test_pairing_errors(tmp_path, capsys):
  image = np.zeros((16, 16, 3), np.uint8)
  _write(tmp_path / "pred", ["a", "b", "c"], [image] * 3)
  _write(tmp_path / "gt", ["a", "b", "d"], [image] * 3, suffix=".jpg")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match=r"(?s)2 match.*only in --pred.*: c\n.*only in --gt.*: d"):
    pair_frames(str(tmp_path / "pred"), str(tmp_path / "gt"))
  with pytest.raises(ValueError, match="--gt .*empty: no images"):
    pair_frames(str(tmp_path / "pred"), str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="frame folder not found"):
    pair_frames(str(tmp_path / "missing"), str(tmp_path / "gt"))
  _write(tmp_path / "small", ["a", "b", "c"], [image[:8]] * 3)
  with pytest.raises(ValueError, match=r"frame 'a': size mismatch, .*16x16 but .*16x8"):
    evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "small"), ["l1"])
  with pytest.raises(ValueError, match="unknown \\['mse'\\]"):
    evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "pred"), ["l1", "mse"])
  assert evaluate.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--metrics", "l1"]) == 2
  assert "only in --gt" in capsys.readouterr().err
