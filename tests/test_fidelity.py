"""benchmarks/fidelity.py over seeds: the table of means and ranges, the per-seed JSON and --combine (the claims' own
rules: tests/test_claims.py).

The reports are written by hand here, so every expected margin and spread below is worked out from the numbers in
the test, not from the code under test.
"""

import dataclasses
import importlib.util
import json
import os

import pytest

from magicpose_jax import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fidelity():
  spec = importlib.util.spec_from_file_location("fidelity", os.path.join(ROOT, "benchmarks", "fidelity.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _report(identity=0.2, iou=0.3, face=0.2, ssim=0.5, psnr=15.0, hair=0.3):
  return {"l1": 0.1, "psnr": psnr, "ssim": ssim, "mean_iou": iou, "identity_error": identity, "face_l1": face,
          "eye_state": 0.5, "region_error": {"skin": 0.1, "hair": hair, "clothes": 0.1, "background": 0.01},
          "part_iou": {}, "num_images": 4}


def _runs(full_identity, other_identity, ssims=(0.83, 0.82, 0.81)):
  """Three seeds: the full model at `full_identity` [3] and SSIM `ssims`, every ablation at `other_identity` [3],
  SSIM 0.5 and pose/face clearly worse."""
  full = [_report(identity=i, iou=0.6, face=0.14, ssim=s, psnr=22.0) for i, s in zip(full_identity, ssims,
                                                                                       strict=True)]
  other = [_report(identity=i) for i in other_identity]
  return {"full": full, **{name: [dict(r) for r in other] for name in ("no_appearance", "no_pose", "no_cfg",
                                                                      "no_augmentation")}}


def test_the_table_shows_mean_and_range(fidelity):
  table = fidelity.spread_table(_runs([0.07, 0.08, 0.075], [0.25, 0.26, 0.20]))
  full = next(line for line in table.splitlines() if line.startswith("| full |"))
  assert "22.00 (22.00..22.00)" in full and "0.075 (0.070..0.080)" in full and "0.820 (0.810..0.830)" in full
  one = fidelity.spread_table({"full": [_report(psnr=21.5)]})
  assert "| full | 21.50 |" in one  # one run: no range


def _write(fidelity, tmp_path, seed, full_identity, other_identity, sampling_seeds=(0, 1, 2)):
  path = str(tmp_path / f"seed{seed}.md")
  fidelity.write_markdown(path, _runs(full_identity, other_identity), demo.DEMO, 60.0, seed, None,
                          command=f"python benchmarks/fidelity.py --seed {seed}", sampling_seeds=sampling_seeds)
  return path


def test_combine_judges_every_training_and_sampling_seed(fidelity, tmp_path):
  a = _write(fidelity, tmp_path, 0, [0.07, 0.08, 0.075], [0.25, 0.26, 0.20])
  b = _write(fidelity, tmp_path, 1, [0.10, 0.09, 0.095], [0.24, 0.25, 0.26])
  text = open(a).read()
  assert "training seed 0, sampling seeds [0, 1, 2]" in text
  assert "holds beyond the spread: identity: full < no_appearance (smallest margin 0.125, spread 0.060)" in text
  record = json.load(open(a.replace(".md", ".json")))
  assert record["seed"] == 0 and len(record["runs"]["full"]) == 3 and record["sampling_seeds"] == [0, 1, 2]
  out = str(tmp_path / "both.md")
  text = fidelity.combine([a.replace(".md", ".json"), b.replace(".md", ".json")], out)
  assert open(out).read() == text
  # six runs: margins 0.18 0.18 0.125 0.14 0.16 0.165 -> 0.125; full 0.07..0.10, ablation 0.20..0.26 -> spread
  # 0.06; within one training seed the largest range is seed 0's 0.06
  assert ("holds beyond the spread: identity: full < no_appearance (smallest margin 0.125, spread 0.060) "
          "[within one training seed: 0.060]") in text
  assert "training seeds [0, 1] x sampling seeds [0, 1, 2]" in text
  assert "0.085 (0.070..0.100)" in text  # the full model's identity error over all six


def test_combine_refuses_runs_that_do_not_match(fidelity, tmp_path):
  a = _write(fidelity, tmp_path, 0, [0.07, 0.08, 0.075], [0.25, 0.26, 0.20])
  b = _write(fidelity, tmp_path, 1, [0.07, 0.08, 0.075], [0.25, 0.26, 0.20], sampling_seeds=(3, 4, 5))
  with pytest.raises(ValueError, match=r"seed1\.json has sampling_seeds \[3, 4, 5\]"):
    fidelity.combine([a.replace(".md", ".json"), b.replace(".md", ".json")], str(tmp_path / "x.md"))
  old = tmp_path / "old.json"
  old.write_text(json.dumps({"results": {}}))
  with pytest.raises(ValueError, match="old.json: no 'runs'"):
    fidelity.combine([str(old)], str(tmp_path / "x.md"))
  other = dataclasses.replace(demo.DEMO, stage1_steps=demo.DEMO.stage1_steps + 1)
  c = str(tmp_path / "c.md")
  fidelity.write_markdown(c, _runs([0.07, 0.08, 0.075], [0.25, 0.26, 0.20]), other, 1.0, 2, None,
                          sampling_seeds=(0, 1, 2))
  with pytest.raises(ValueError, match="c.json has budget"):
    fidelity.combine([a.replace(".md", ".json"), c.replace(".md", ".json")], str(tmp_path / "x.md"))


def test_sampling_seeds_must_be_distinct(fidelity, tmp_path):
  with pytest.raises(SystemExit):
    fidelity.main(["--out", str(tmp_path), "--sampling-seeds", "0", "0"])
