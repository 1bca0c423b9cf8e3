"""The pose extractor's model files: Google's MediaPipe TFLite models, taken out of the `mediapipe` wheel on PyPI.

    python -m magicpose_jax.pose.models install [--dir DIR] [--wheel FILE.whl]

`mediapipe` up to 0.10.21 ships its `.tflite` models inside the wheel (`mediapipe/modules/*/*.tflite`); its Python
code needs protobuf < 5 and numpy < 2, which clash with this project's pins, so it is never installed or imported:
`install` runs `pip download --no-deps mediapipe==0.10.21` (a registry download, like any dependency) into a
temporary folder, unzips only the `.tflite` members, flat, into DIR and writes `manifest.json` (file -> sha256).
With every required file present it returns at once without touching the network. The models are run with
`ai-edge-litert` (`holistic.py`); at run time nothing is downloaded.

DIR: `--dir`, else `$MAGICPOSE_POSE_MODELS`, else `~/.cache/magicpose_jax/pose_models`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence

MEDIAPIPE_WHEEL = "mediapipe==0.10.21"
ENV_DIR = "MAGICPOSE_POSE_MODELS"
DEFAULT_DIR = os.path.join("~", ".cache", "magicpose_jax", "pose_models")
MANIFEST = "manifest.json"
MODULES_PREFIX = "mediapipe/modules/"
# What the extractor runs (holistic.py); the wheel's other .tflite files are kept too (a few MB).
REQUIRED = (
  "pose_detection.tflite",
  "pose_landmark_full.tflite",
  "hand_recrop.tflite",
  "hand_landmark_full.tflite",
  "face_landmark.tflite",
)
INSTALL_COMMAND = "python -m magicpose_jax.pose.models install"
# Any platform's wheel holds the same .tflite files; this one is tried when pip finds none for this machine.
FALLBACK_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--only-binary=:all:")


class MissingModelError(FileNotFoundError):
  """A model file of the pose extractor is not installed; the message says the command that installs it."""


def models_dir(path: str | os.PathLike | None = None) -> str:
  """The model folder: `path`, else $MAGICPOSE_POSE_MODELS, else ~/.cache/magicpose_jax/pose_models."""
  return os.path.abspath(os.path.expanduser(os.fspath(path) if path is not None else
                                            os.environ.get(ENV_DIR) or DEFAULT_DIR))


def missing(path: str | os.PathLike | None = None) -> list[str]:
  """The required model files not in the folder."""
  folder = models_dir(path)
  return [name for name in REQUIRED if not os.path.isfile(os.path.join(folder, name))]


def model_path(name: str, path: str | os.PathLike | None = None) -> str:
  """The path of one installed model file, or MissingModelError with the command that installs it."""
  folder = models_dir(path)
  file = os.path.join(folder, name)
  if not os.path.isfile(file):
    flag = "" if path is None else f" --dir {folder}"
    raise MissingModelError(f"pose model {file} is not installed; run once:  {INSTALL_COMMAND}{flag}\n"
                            f"(it takes the MediaPipe .tflite files out of the {MEDIAPIPE_WHEEL} wheel from PyPI; "
                            f"set ${ENV_DIR} or --models-dir to use another folder)")
  return file


def check_installed(path: str | os.PathLike | None = None) -> str:
  """The model folder, after checking every required file is there (MissingModelError naming the first absent)."""
  for name in REQUIRED:
    model_path(name, path)
  return models_dir(path)


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def unpack_wheel(wheel: str | os.PathLike, folder: str | os.PathLike) -> dict[str, str]:
  """Writes the wheel's `mediapipe/modules/**.tflite` members flat into folder, plus `manifest.json`.

  Returns the manifest's files (name -> sha256). Raises ValueError when the wheel lacks a required model or two
  members share a file name.
  """
  wheel, folder = os.fspath(wheel), os.fspath(folder)
  try:
    archive = zipfile.ZipFile(wheel)
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{wheel}: not a wheel (zip) file ({e})") from None
  with archive:
    members = [m for m in archive.namelist() if m.startswith(MODULES_PREFIX) and m.endswith(".tflite")]
    names = [os.path.basename(m) for m in members]
    if len(set(names)) != len(names):
      raise ValueError(f"{wheel}: two .tflite members share a file name: {sorted(names)}")
    absent = [n for n in REQUIRED if n not in names]
    if absent:
      raise ValueError(f"{wheel}: no {', '.join(absent)} under {MODULES_PREFIX} (expected the {MEDIAPIPE_WHEEL} "
                       f"wheel, which ships them)")
    os.makedirs(folder, exist_ok=True)
    files = {}
    for member, name in zip(members, names, strict=True):
      target = os.path.join(folder, name)
      partial = f"{target}.partial"  # a crash never leaves a truncated model under its real name
      with archive.open(member) as src, open(partial, "wb") as dst:
        while block := src.read(1 << 20):
          dst.write(block)
      os.replace(partial, target)
      files[name] = _sha256(target)
  with open(os.path.join(folder, MANIFEST), "w") as f:
    json.dump({"source": os.path.basename(wheel), "files": files}, f, indent=1)
  return files


def download_wheel(dest: str) -> str:
  """`pip download --no-deps` of the mediapipe wheel into dest (this platform's, else a manylinux one)."""
  base = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", dest, MEDIAPIPE_WHEEL]
  for extra in ((), FALLBACK_PLATFORM):
    result = subprocess.run([*base, *extra], capture_output=True, text=True, check=False)
    wheels = [n for n in os.listdir(dest) if n.endswith(".whl")]
    if result.returncode == 0 and wheels:
      return os.path.join(dest, wheels[0])
  raise RuntimeError(f"pip download {MEDIAPIPE_WHEEL} failed (needs PyPI): {result.stderr.strip()[-2000:]}")


def install(path: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
            force: bool = False) -> tuple[str, bool]:
  """Installs the models into the folder; returns (folder, whether anything was written).

  Does nothing when every required file is present (unless `force`). `wheel`: a local mediapipe wheel to
  unpack instead of downloading one.
  """
  folder = models_dir(path)
  if not force and not missing(folder):
    return folder, False
  if wheel is not None:
    unpack_wheel(wheel, folder)
  else:
    with tempfile.TemporaryDirectory(prefix="mediapipe_wheel_") as tmp:
      unpack_wheel(download_wheel(tmp), folder)
  return folder, True


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m magicpose_jax.pose.models", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  inst = sub.add_parser("install", help="take the .tflite models out of the mediapipe wheel (once)")
  inst.add_argument("--dir", default=None, help=f"model folder (default ${ENV_DIR} or {DEFAULT_DIR})")
  inst.add_argument("--wheel", default=None, help="a local mediapipe wheel instead of pip download")
  inst.add_argument("--force", action="store_true", help="reinstall even when the files are present")
  args = parser.parse_args(argv)
  try:
    folder, wrote = install(args.dir, args.wheel, args.force)
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"pose models {'installed in' if wrote else 'already in'} {folder}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
