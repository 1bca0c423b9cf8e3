"""Runs `python -m magicpose_jax.train` in subprocesses for the training tests (shared by several test files)."""

import json
import os
import signal
import subprocess
import sys

from simulated_devices import with_device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(cache_dir: str, devices: int | None = None) -> dict:
  """A subprocess environment: this checkout importable, and a shared persistent compilation cache, so the
  runs of one test compile the (identical) step once."""
  e = dict(os.environ)
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  e["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  e["JAX_PLATFORMS"] = "cpu"
  if devices:
    e["XLA_FLAGS"] = with_device_count(e.get("XLA_FLAGS", ""), devices)
  return e


def command(workdir: str, config: str = "tiny.py", **overrides) -> list[str]:
  args = [sys.executable, "-m", "magicpose_jax.train", "--config", config, "--workdir", workdir]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def run(workdir: str, cache_dir: str, timeout: float = 600, **overrides) -> subprocess.CompletedProcess:
  result = subprocess.run(command(workdir, **overrides), env=env(cache_dir), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)
  if result.returncode != 0:
    raise AssertionError(f"training exited with {result.returncode}:\n{result.stderr[-4000:]}")
  return result


def _interruptible_child() -> None:
  """The child's SIGINT as a terminal gives it: a disposition of SIG_IGN or a blocked mask is inherited across
  exec, and a process started so ignores Ctrl-C (seen in the full suite: the Ctrl-C test's run trained on)."""
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(workdir: str, cache_dir: str, **overrides) -> subprocess.Popen:
  return subprocess.Popen(command(workdir, **overrides), env=env(cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          preexec_fn=_interruptible_child)  # noqa: PLW1509 (two signal calls, no locks taken)


def metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def steps_saved(workdir: str) -> list[int]:
  """Finalised checkpoint steps (orbax renames `<step>.orbax-checkpoint-tmp...` to `<step>` when complete)."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())
