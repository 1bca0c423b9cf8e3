"""The demo's pretrained base: a tiny Stable Diffusion (VAE, UNet, text encoder, scheduler) in diffusers' layout.

MagicPose trains over a frozen, pretrained SD 1.5. The demo's stand-in ships with the package in
`magicpose_jax/demo/pretrained_sd/`, trained on the synthetic figures by `python -m magicpose_jax.demo.pretrain`
(`demo/pretrain.py`), so `make demo` trains only MagicPose's own stages, as a user of the method does. The folder
is a plain diffusers pipeline (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `scheduler/`), an OpenPose
ControlNet trained over it (`controlnet/`, a diffusers ControlNetModel folder; the stages' pose nets start from it)
and `pretrain.json`: how it was made, what it measured, and the sha256 of every file, checked before a demo trains
over it (a truncated file or a Git LFS pointer is an error naming the file, not a silently different base).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

PACKAGED_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained_sd")
MANIFEST = "pretrain.json"
# What a folder must hold besides the manifest (the files a diffusers pipeline of the demo's SD has).
REQUIRED = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
            "text_encoder/config.json")


# The optional OpenPose ControlNet (a diffusers ControlNetModel folder) inside a base folder: what the stages' pose
# nets start from, as the release's start from ControlNet 1.1 OpenPose over SD 1.5.
CONTROLNET = "controlnet"


def controlnet_of(folder: str) -> str | None:
  """`folder`'s OpenPose ControlNet folder, or None when the base has none."""
  path = os.path.join(folder, CONTROLNET)
  return path if os.path.isfile(os.path.join(path, "config.json")) else None


def file_hashes(folder: str) -> dict[str, str]:
  """Relative path (POSIX separators) -> sha256 hex of every file under `folder` except the manifest."""
  hashes = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder).replace(os.sep, "/")
      if rel == MANIFEST:
        continue
      with open(path, "rb") as f:
        hashes[rel] = hashlib.file_digest(f, "sha256").hexdigest()
  return dict(sorted(hashes.items()))


def digest(hashes: dict[str, str]) -> str:
  """One sha256 over a `file_hashes` dict: what a demo's setup records of its base."""
  return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: str, info: dict[str, Any]) -> dict[str, Any]:
  """Writes `folder/pretrain.json`: `info` plus the sha256 of every file now in `folder`; returns it."""
  manifest = {**info, "files": file_hashes(folder)}
  with open(os.path.join(folder, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest


def check_base_sd(folder: str) -> dict[str, Any]:
  """The manifest of a pretrained base folder, with `"sha256"` (its `digest`), after checking every file.

  Raises FileNotFoundError for a missing folder, manifest or pipeline file, and ValueError for a file whose
  contents or presence differ from the manifest's record (each names the file).
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"pretrained base {folder}: no such folder (expected a folder written by "
                            f"`python -m magicpose_jax.demo.pretrain`)")
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"pretrained base {folder}: no {MANIFEST} (expected a folder written by "
                            f"`python -m magicpose_jax.demo.pretrain`)")
  with open(path) as f:
    manifest = json.load(f)
  recorded = manifest.get("files")
  if not isinstance(recorded, dict) or not recorded:
    raise ValueError(f"{path}: no 'files' table of sha256 sums")
  for rel in REQUIRED:
    if rel not in recorded:
      raise ValueError(f"{path}: 'files' does not list {rel}, which a diffusers pipeline of the demo's SD has")
  actual = file_hashes(folder)
  for rel, sha in recorded.items():
    if rel not in actual:
      raise FileNotFoundError(f"pretrained base {folder}: {rel} is missing ({MANIFEST} lists it)")
    if actual[rel] != sha:
      size = os.path.getsize(os.path.join(folder, rel))
      hint = " (a Git LFS pointer? run `git lfs pull`)" if size < 1024 and rel.endswith(".safetensors") else ""
      raise ValueError(f"pretrained base {folder}: {rel} has sha256 {actual[rel][:12]}..., {MANIFEST} records "
                       f"{sha[:12]}... ({size} bytes){hint}")
  unlisted = sorted(set(actual) - set(recorded))
  if unlisted:
    raise ValueError(f"pretrained base {folder}: files {unlisted} are not in {MANIFEST} (a folder mixed from "
                     f"two bases?)")
  return {**manifest, "sha256": digest(recorded)}
