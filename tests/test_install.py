"""A non-editable install (`pip install .`) carries everything the CLIs need: configs, kernel sources.

The package is built from a copy of the checkout into a fresh target folder and run from another directory, so
nothing of the checkout is importable: a file the package reads by climbing out of itself would fail here.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from magicpose_jax.demo import pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
  src, site = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
  shutil.copytree(ROOT / "magicpose_jax", src / "magicpose_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                  "--target", str(site), str(src)], check=True, capture_output=True)
  shutil.rmtree(src)  # nothing of the source tree is left to fall back on
  return {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}


def run(env: dict[str, str], cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                        timeout=300, check=False)


def test_the_installed_copy_is_the_one_imported(installed, tmp_path):
  out = run(installed, tmp_path, "-c", "import magicpose_jax, sys; print(magicpose_jax.__file__)")
  assert out.stdout.startswith(installed["PYTHONPATH"]), out


def test_cli_help_from_an_installed_copy(installed, tmp_path):
  for args, expected in ((("-m", "magicpose_jax.demo", "--help"), "--micro"),
                         (("-m", "magicpose_jax.train", "--config", "stage1.py", "--help"),
                          "--config.global_batch_size=192"),
                         (("-m", "magicpose_jax.train", "--config", "stage2", "--help"), "--config.stage='stage2'")):
    out = run(installed, tmp_path, *args)
    assert out.returncode == 0 and expected in out.stdout, (args, out.stdout[-2000:], out.stderr[-2000:])


def test_packaged_files_are_installed(installed, tmp_path):
  code = ("import importlib.resources as r; p = r.files('magicpose_jax'); "
          "print(sorted(f.name for f in (p / 'configs').iterdir() if f.name.endswith('.py'))); "
          "print((p / 'models' / 'cpu_attention.cc').is_file(), (p / 'app' / 'static' / 'index.html').is_file())")
  out = run(installed, tmp_path, "-c", code)
  configs = "['__init__.py', 'demo.py', 'stage1.py', 'stage2.py', 'tiny.py']"
  assert out.stdout.split("\n")[:2] == [configs, "True True"], out


def test_the_pretrained_base_is_installed_whole(installed, tmp_path):
  # Every file its manifest lists, with the recorded sha256 (package-data patterns that miss one fail here).
  code = ("from magicpose_jax.demo import pretrained; "
          "print(pretrained.PACKAGED_BASE); print(len(pretrained.check_base_sd(pretrained.PACKAGED_BASE)['files']))")
  out = run(installed, tmp_path, "-c", code)
  assert out.returncode == 0 and out.stdout.startswith(installed["PYTHONPATH"]), (out.stdout, out.stderr[-2000:])
  assert int(out.stdout.split()[1]) >= len(pretrained.REQUIRED) + 3  # the configs and the three weight files


def test_a_training_run_from_an_installed_copy(installed, tmp_path):
  """One real step of the tiny config found by name: configs load, the run writes its checkpoint."""
  out = run(installed, tmp_path, "-m", "magicpose_jax.train", "--config", "tiny", "--config.total_steps=1",
            "--config.checkpoint_every=1", "--workdir", "run")
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
