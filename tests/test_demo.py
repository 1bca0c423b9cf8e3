"""The demo end to end at its micro size (a few steps per phase): every output is written, the metrics are finite
and in range, and a second run reuses the finished phases."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from magicpose_jax import demo
from magicpose_jax.data.synthetic import SyntheticConfig, SyntheticSource
from magicpose_jax.demo import phases, pretrained
from magicpose_jax.demo import retarget as rt
from magicpose_jax.demo.figures import image_grid

# The micro run's time is tracing and compiling ~10 programs (4 training steps, the VAE's, 3 samplers...), not
# running them. XLA compiles fast there as in every test (conftest.py's FAST_COMPILE): LLVM at -O0 (without it,
# 160 s wall / 130 s compiling against 47 s / 19 s), XLA's older elemental emitters instead of the MLIR fusion
# emitters and one LLVM module per program (back to back on the 2-core CPU: 40.5 s compiling / 75 s wall with -O0
# alone, 17.7-18.6 s / 47-49 s with all three). `--jobs 2`: the ablation and the evaluations run beside the main
# chain of phases (XLA compiles one while Python traces another). No persistent compilation cache: CI is always
# cold, and writing one costs ~2 s. XLA's --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE does not help (slower
# than -O0 alone, no gain with it).


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",  # XLA_FLAGS: conftest's FAST_COMPILE
         "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        os.environ.get("PYTHONPATH", "")])}
  subprocess.run([sys.executable, "-m", "magicpose_jax.demo", "--micro", "--out", out, "--no-jax-cache", "--jobs", "2"],
                 env=env, check=True, stdout=subprocess.DEVNULL)
  with open(os.path.join(out, "metrics.json")) as f:
    return out, json.load(f)


def test_writes_every_output(micro):
  out, report = micro
  for name in ("retarget.png", "animation.gif", "metrics.json"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  for phase in ("base", "stage1", "stage2", "no_appearance"):
    assert os.listdir(os.path.join(out, "tb", phase)), phase  # TensorBoard events of every training phase
  with Image.open(os.path.join(out, "animation.gif")) as gif:
    budget = demo.MICRO
    assert gif.n_frames == budget.animation_keyframes * budget.animation_inbetweens
  assert report["outputs"]["grid"] == os.path.join(out, "retarget.png")
  with open(os.path.join(out, "base_sd", "vae", "config.json")) as f:
    assert json.load(f)["_class_name"] == "AutoencoderKL"  # the default autoencoder: the trained tiny VAE


def test_metrics_are_finite_and_in_range(micro):
  _, report = micro
  assert set(report["models"]) == {"full", "no_appearance", "no_pose"}
  for name, m in report["models"].items():
    assert all(math.isfinite(m[k]) for k in ("l1", "psnr", "ssim", "mean_iou", "identity_error", "face_l1")), name
    assert 0 <= m["l1"] <= 1 and 0 <= m["mean_iou"] <= 1 and 0 <= m["identity_error"] <= 1, name
    assert 0 < m["face_l1"] <= 1, name
    assert -1 <= m["ssim"] <= 1 and 0 < m["psnr"] <= 100, name
    assert m["num_images"] == demo.MICRO.holdout_identities * demo.MICRO.poses_per_identity
  assert all(isinstance(v, bool) for v in report["claims"].values())


def test_second_run_reuses_finished_phases(micro):
  out, _ = micro
  d = demo.Demo(out, demo.MICRO, unet=demo.MICRO_UNET)
  d.train_vae()
  d.train_all()
  assert d.cached == ["vae", "base", "stage1", "stage2", "no_appearance"]


def _cells(row):
  return [float(c) for c in row.strip("| ").split(" | ")[1:]]


def test_appearance_ceiling_rows(micro, monkeypatch):
  """benchmarks/appearance_ceiling.py on the micro run: three rows of finite scores. With a stand-in sampler that
  returns its reference, the copy row is the ground truth itself (so each copy pair's reference is its target
  frame) and the retarget row is not (its reference is another frame)."""
  out, _ = micro
  ceiling = _benchmark("appearance_ceiling")
  assert ceiling.copy_pairs([(7, 0, [1, 3])]) == [(7, 1, [1]), (7, 3, [3])]
  model = rt.load_trained(os.path.join(out, "runs", "stage2"))
  data = demo.load_config().data
  rows = [_cells(r) for r in ceiling.ceiling_rows(model, data, demo.MICRO)]
  assert len(rows) == 3 and all(math.isfinite(v) for row in rows for v in row)
  monkeypatch.setattr(rt, "animate", lambda _, reference, poses, *a, **k: np.stack([reference] * len(poses)))
  retarget, copy, _ = (_cells(r) for r in ceiling.ceiling_rows(model, data, demo.MICRO))
  psnr, ssim, miou, identity, face, _, *regions = copy
  assert psnr >= 99 and ssim == 1.0 and miou == 1.0 and identity == 0.0 and face == 0.0 and regions == [0.0] * 4
  assert retarget[0] < 40 and retarget[2] < 1.0


def test_budget_names_a_known_autoencoder():
  with pytest.raises(ValueError, match=r"Budget.autoencoder: expected one of \('patch', 'trained'\), got 'pca'"):
    demo.Budget(autoencoder="pca")
  with pytest.raises(ValueError, match=r"Budget.decoder_steps=5: only the trained VAE has a decoder"):
    demo.Budget(autoencoder="patch", decoder_steps=5)


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


def test_image_grid_wraps_a_caption_wider_than_the_grid():
  """A caption line wider than the grid wraps at its double spaces instead of running off the edge: the strip gains
  rows, and no ink reaches the last pixel columns."""
  cell = np.zeros((64, 64, 3), np.uint8)  # a grid 268 px wide
  short = image_grid([[cell, cell]], caption="full: L1 0.032", scale=2)
  metrics = "  ".join(f"metric{i} 0.{i}00" for i in range(8))
  long = image_grid([[cell, cell]], caption=f"full: {metrics}", scale=2)
  assert long.shape[1] == short.shape[1] and long.shape[0] >= short.shape[0] + 2 * 22
  strip = long[short.shape[0] - 22:]  # the caption rows (the body above is the same)
  assert (strip[:, -4:] == 255).all()  # nothing cut at the right edge


def test_phases_trained_with_another_setup_are_retrained(tmp_path):
  out = str(tmp_path)
  d = demo.Demo(out, demo.MICRO, unet=demo.MICRO_UNET)
  os.makedirs(os.path.join(out, "runs", "base"))
  same = demo.Demo(out, demo.MICRO, unet=demo.MICRO_UNET)
  assert same._changed_setup(same.setup()) == []
  assert os.path.isdir(os.path.join(out, "runs", "base"))  # same setup: the phases stay cached
  other = dataclasses.replace(demo.MICRO, base_steps=d.budget.base_steps + 1)
  changed = demo.Demo(out, other, unet=demo.MICRO_UNET)
  assert changed._changed_setup(changed.setup()) == []  # it rewrote setup.json ...
  assert not os.path.exists(os.path.join(out, "runs", "base"))  # ... after removing the stale phases
  os.makedirs(os.path.join(out, "vae"))
  os.remove(os.path.join(out, phases.SETUP_FILE))  # a folder from before setup.json: cannot be checked
  assert demo.Demo(out, other, unet=demo.MICRO_UNET) and not os.path.exists(os.path.join(out, "vae"))


def _recording_phases(log, fail=None, sleep=0.0):
  """The demo's dependency shape: a -> b -> c, a -> d, c -> e, d -> f; each phase logs its start and end."""
  needs = {"a": (), "b": ("a",), "c": ("b",), "d": ("a",), "e": ("c",), "f": ("d",)}

  def phase(name):
    def fn():
      log.append(("start", name, threading.get_ident()))
      time.sleep(sleep)
      if name == fail:
        raise RuntimeError(f"{name} failed")
      log.append(("end", name, threading.get_ident()))
      return name.upper()
    return fn

  return {n: (phase(n), deps) for n, deps in needs.items()}, needs


def test_run_phases_in_order_in_this_thread():
  log, seconds = [], {}
  phases, _ = _recording_phases(log)
  assert demo.run_phases(phases, 1, seconds) == {n: n.upper() for n in phases}
  assert [e[1] for e in log if e[0] == "start"] == list(phases)  # the dict's order
  assert {e[2] for e in log} == {threading.get_ident()} and set(seconds) == set(phases)


def test_run_phases_two_at_once_respect_what_each_needs():
  log = []
  phases, needs = _recording_phases(log, sleep=0.05)
  assert demo.run_phases(phases, 2) == {n: n.upper() for n in phases}
  order = [(kind, name) for kind, name, _ in log]
  for name, deps in needs.items():
    for dep in deps:
      assert order.index(("end", dep)) < order.index(("start", name)), (dep, name)
  running, most = set(), 0
  for kind, name in order:
    running = running | {name} if kind == "start" else running - {name}
    most = max(most, len(running))
  assert most == 2  # b and d (then c/e beside d/f) overlap, never more than two


def test_run_phases_stop_at_the_first_failure():
  for jobs in (1, 2):
    log = []
    phases, _ = _recording_phases(log, fail="b", sleep=0.05)
    with pytest.raises(RuntimeError, match="b failed"):
      demo.run_phases(phases, jobs)
    started = {name for kind, name, _ in log if kind == "start"}
    assert not started & {"c", "e"}, jobs  # nothing that needs the failed phase ran
  with pytest.raises(ValueError, match="unknown phases.*'z'"):
    demo.run_phases({"a": (lambda: 0, ("z",))})
  with pytest.raises(ValueError, match="cycle"):
    demo.run_phases({"a": (lambda: 0, ("b",)), "b": (lambda: 0, ("a",))}, 2)


def _benchmark(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _fidelity_module():
  return _benchmark("fidelity")


def test_every_phase_needs_only_known_phases(tmp_path):
  """The demo's and the fidelity benchmark's phase graphs: every run and evaluation after what it reads."""
  fidelity = _fidelity_module()
  for cls in (demo.Demo, fidelity.Fidelity):
    d = cls(str(tmp_path / cls.__name__), demo.MICRO, unet=demo.MICRO_UNET)
    phases = d.phases()
    order = list(phases)
    for name, (_, needs) in phases.items():
      assert all(order.index(n) < order.index(name) for n in needs), (cls.__name__, name, needs)
    assert phases["stage2"][1] == ("stage1",) and phases["evaluate full"][1] == ("stage2",)
    assert phases["evaluate no_pose"][1] == ("stage1",)  # no_pose_steps=0: the stage-1 model
  assert fidelity.Fidelity(str(tmp_path / "f"), demo.MICRO, unet=demo.MICRO_UNET).phases()["no_augmentation"][1] \
      == ("no_augmentation_stage1",)


def test_over_a_pretrained_base_no_phase_trains_a_vae_or_a_base(tmp_path):
  base = tmp_path / "sd"
  for rel in (*pretrained.REQUIRED, "controlnet/config.json"):  # the checks read the manifest and hashes only
    (base / rel).parent.mkdir(parents=True, exist_ok=True)
    (base / rel).write_text("{}")
  pretrained.write_manifest(str(base), {"command": "test"})
  fidelity = _fidelity_module()
  for cls in (demo.Demo, fidelity.Fidelity):
    d = cls(str(tmp_path / cls.__name__), demo.MICRO, base_sd=str(base))
    phases = d.phases()
    assert "vae" not in phases and "base" not in phases, cls.__name__
    runs = {r.name: r for r in d.training_runs()}
    for name in ("stage1", "no_appearance", "no_augmentation_stage1"):
      if name in runs:
        assert phases[name][1] == () and runs[name].config.base.path == str(base), (cls.__name__, name)
    assert phases["stage2"][1] == ("stage1",)
    # Every pose net starts from the base's ControlNet; the no-augmentation runs differ from the main ones only there.
    for name in ("stage2", "no_appearance", "no_augmentation"):
      if name in runs:
        model = runs[name].config.model
        assert (model.pose_init, model.pose_path) == ("controlnet", str(base / "controlnet")), (cls.__name__, name)
    for name in ("stage1", "stage2"):
      if f"no_augmentation{'_stage1' if name == 'stage1' else ''}" in runs:
        plain = runs[name].config.to_dict()
        ablation = runs[f"no_augmentation{'_stage1' if name == 'stage1' else ''}"].config.to_dict()
        assert not ablation["data"]["augment"]["enabled"] and plain["data"]["augment"]["enabled"]
        plain["data"]["augment"]["enabled"] = False
        plain["init_from"] = ablation["init_from"]
        assert ablation == plain, name
