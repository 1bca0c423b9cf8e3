"""`python -m magicpose_jax.preprocess --layout tiktok|edn --src DIR --out DIR --shards N [...]`.

Writes ArrayRecord shards of the dataset's frames (images or, with --vae, VAE latent moments; pose images and
keypoints; video/frame names) and `manifest.json` (counts, skipped frames with reasons and paths, source hashes,
per-video record index) for `data.source="arrayrecord"`. Deterministic and resumable: re-running the same command
skips the shards it finished. The logic lives in `magicpose_jax/data/preprocessing.py`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from magicpose_jax.convert.vae import latent_encoder
from magicpose_jax.data.preprocessing import PreprocessError, PreprocessOptions, preprocess


def build_parser() -> argparse.ArgumentParser:
  """The command line (also parsed by the README test)."""
  p = argparse.ArgumentParser(prog="python -m magicpose_jax.preprocess", description=__doc__.split("\n\n")[1])
  p.add_argument("--layout", required=True, choices=("tiktok", "edn"), help="dataset folder layout")
  p.add_argument("--src", required=True, help="dataset root (e.g. TikTok-v4/)")
  p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
  p.add_argument("--shards", type=int, required=True, help="number of ArrayRecord files")
  p.add_argument("--split", default=None, help="split folder (default: train_set for tiktok, train for edn)")
  p.add_argument("--size", type=int, default=512, help="side of the stored square images (default 512)")
  p.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder: store latent moments, not images")
  p.add_argument("--strict", action="store_true", help="fail if any frame or folder is unusable")
  p.add_argument("--image-format", default="png", choices=("png", "jpg"), help="stored image encoding")
  p.add_argument("--threads", type=int, default=4, help="frames decoded/encoded in parallel")
  return p


def parse_args(argv: list[str] | None = None) -> PreprocessOptions:
  a = build_parser().parse_args(argv)
  return PreprocessOptions(layout=a.layout, src=a.src, out=a.out, shards=a.shards, split=a.split, size=a.size,
                           vae=a.vae, strict=a.strict, image_format=a.image_format, threads=a.threads)


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  options = parse_args(argv)
  try:
    result = preprocess(options, latent_encoder)
  except (PreprocessError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  counts = result.manifest["counts"]
  print(f"{counts['records']} records from {counts['frames']} frames of {counts['videos']} videos in "
        f"{len(result.manifest['shards'])} shards ({len(result.written)} written, {len(result.reused)} reused), "
        f"skipped: {counts['skipped'] or 'none'}; {result.frames_processed / max(result.seconds, 1e-9):.1f} frames/s")
  print(f"wrote {options.out}/manifest.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
