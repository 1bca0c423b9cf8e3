"""benchmarks/memory_plan.py --real-devices: the planner on this machine's own devices compiles the step, runs it
and prints the measured step time beside the model (what it does on a lent GPU or TPU; here on the CPU)."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "model.unet=tiny", "--set", "model.vae=tiny", "--set", "model.text_encoder=tiny",
        "--set", "model.sample_size=16", "--set", "model.hint_channels=16,32", "--set", "sharding.min_size=1024",
        "--set", "dtype=float32"]


@pytest.fixture(scope="module")
def memory_plan():
  spec = importlib.util.spec_from_file_location("memory_plan", os.path.join(ROOT, "benchmarks", "memory_plan.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules["memory_plan"] = module  # its dataclasses resolve their annotations through it
  spec.loader.exec_module(module)
  return module


def test_real_devices_run_the_compiled_step_and_print_the_measured_time(memory_plan, tmp_path, capsys, monkeypatch):
  out = tmp_path / "plan.json"
  monkeypatch.setattr(sys, "argv", ["memory_plan.py", "--real-devices", "--devices", "1", "--attention", "xla",
                                    "--measure", "2", "--stages", "stage2", "--batch", "2", "--json", str(out), *TINY])
  memory_plan.main()
  printed = capsys.readouterr().out
  (plan,) = json.loads(out.read_text())
  assert plan["devices"] == 1 and plan["stage"] == "stage2" and plan["global_batch"] == 2
  assert plan["measured_seconds"] is not None and plan["measured_seconds"] > 0
  assert f"measured on the real devices: {plan['measured_seconds']:.3f} s per step" in printed
  assert "1 real cpu device(s)" in printed and "libtpu" not in printed.splitlines()[0]
