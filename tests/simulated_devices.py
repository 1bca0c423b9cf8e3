"""Runs a Python script in a subprocess that sees N simulated CPU devices (shared by several test files).

XLA fixes the device count when JAX starts, so multi-device tests cannot run in the pytest process itself.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_device_count(xla_flags: str, devices: int) -> str:
  """`xla_flags` (conftest's fast-compile flags, the user's) plus `devices` simulated host CPU devices."""
  return f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip()


def run_script(script: str, devices: int = 8, timeout: float = 300) -> str:
  """Runs `script` (Python source) with `devices` CPU devices and this checkout importable; returns its stdout.

  Raises AssertionError with the script's stderr tail when it exits non-zero.
  """
  env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), devices), JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                        cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout
