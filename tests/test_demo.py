"""The demo end to end at its micro size (a few steps per phase): every output is written, the metrics are finite
and in range, and a second run reuses the finished phases."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from magicpose_jax import demo
from magicpose_jax.data.synthetic import SyntheticConfig, SyntheticSource
from magicpose_jax.viz import image_grid

# The micro run compiles 4 training steps and 3 samplers: ~5 min on an idle 2-core CPU, so `make test-slow`.
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo"))
  report = demo.Demo(out, demo.MICRO).run()
  return out, report


@SLOW
def test_writes_every_output(micro):
  out, report = micro
  for name in ("retarget.png", "animation.gif", "metrics.json"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  for phase in ("base", "stage1", "stage2", "no_appearance"):
    assert os.listdir(os.path.join(out, "tb", phase)), phase  # TensorBoard events of every training phase
  with Image.open(os.path.join(out, "animation.gif")) as gif:
    budget = demo.MICRO
    assert gif.n_frames == budget.animation_keyframes * budget.animation_inbetweens
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f)["models"].keys() == report["models"].keys()


@SLOW
def test_metrics_are_finite_and_in_range(micro):
  _, report = micro
  assert set(report["models"]) == {"full", "no_appearance", "no_pose"}
  for name, m in report["models"].items():
    assert all(math.isfinite(m[k]) for k in ("l1", "psnr", "ssim", "mean_iou", "identity_error")), name
    assert 0 <= m["l1"] <= 1 and 0 <= m["mean_iou"] <= 1 and 0 <= m["identity_error"] <= 1, name
    assert -1 <= m["ssim"] <= 1 and 0 < m["psnr"] <= 100, name
    assert m["num_images"] == demo.MICRO.holdout_identities * demo.MICRO.poses_per_identity
  assert all(isinstance(v, bool) for v in report["claims"].values())


@SLOW
def test_second_run_reuses_finished_phases(micro):
  out, _ = micro
  d = demo.Demo(out, demo.MICRO)
  d.train_vae()
  d.train_all()
  assert d.cached == ["vae", "base", "stage1", "stage2", "no_appearance"]


def test_interpolated_poses_pass_through_the_keyframes():
  source = SyntheticSource(SyntheticConfig(num_identities=1, frames_per_identity=2))
  a, b = (source.frame(0, f)["pose"] for f in range(2))
  poses = demo.interpolate_poses([a, b], 4)
  assert len(poses) == 8
  np.testing.assert_allclose(poses[0].body, a.body)
  np.testing.assert_allclose(poses[4].body, b.body)
  np.testing.assert_allclose(poses[2].face[:, :2], (a.face[:, :2] + b.face[:, :2]) / 2, atol=1e-4)


def test_image_grid_shape():
  cell = np.zeros((8, 8, 3), np.uint8)
  grid = image_grid([[cell, cell], [cell, cell]], column_titles=("a", "b"), row_labels=("x", "y"),
                    caption="L1 0.1", scale=2, gap=4)
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[1] >= 2 * 16 + 3 * 4
