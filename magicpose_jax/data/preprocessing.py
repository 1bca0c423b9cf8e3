"""Dataset folders -> ArrayRecord shards + manifest (the logic of `python -m magicpose_jax.preprocess`).

Every frame of the layout (`data/layouts.py`) is centre-cropped to a square, resized to `size` and written as one
record (`data/records.py`): the image as PNG/JPEG, or with a VAE its latent moments; the pose image (the released
pose map, or the OpenPose JSON rendered at `size`); the keypoints when the frame has a JSON. Frames are split into
`shards` contiguous runs of the sorted frame list (the global record id is the position in the shards'
concatenation).

Deterministic: sorted listings, fixed encoders, no timestamps, so the same input gives the same bytes.
Resumable: a shard is written to a temporary file and renamed, then a `<shard>.done` marker records its contents
and a fingerprint (options, VAE weights, and the sha256 of every input file of the shard); a later run with the
same fingerprint skips it. The manifest is rebuilt from the markers at the end of every run.

Skipped frames, each listed in the manifest with its path: problems (`missing_pose`, `empty_video`,
`corrupt_image`, `corrupt_pose`, `duplicate_frame`), which `strict` turns into an error, and the release's
filter `near_constant` (pixel std < 0.02 on [0, 1] images), which is data selection, not an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from magicpose_jax.data import records
from magicpose_jax.data.augment import center_box, crop_poses, crop_resize_image
from magicpose_jax.data.layouts import DEFAULT_SPLITS, FolderSource, FrameError, SkippedFrame, open_layout
from magicpose_jax.pose.render import render

log = logging.getLogger(__name__)

PROBLEMS = ("missing_pose", "empty_video", "corrupt_image", "corrupt_pose", "duplicate_frame")
NEAR_CONSTANT_STD = 0.02
CHUNK_FRAMES = 64  # frames decoded at a time: bounds memory on shards of any length


class PreprocessError(RuntimeError):
  """Raised by `strict` runs that met problem frames (after the manifest listing them was written)."""


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  """Attributes:
    layout: "tiktok" or "edn" (see `data/layouts.py`).
    src: the dataset root; out: the output folder (created).
    shards: number of shard files.
    split: the layout's split (default "train_set" for tiktok, "train" for edn).
    size: side of the stored square images.
    vae: a diffusers `AutoencoderKL` folder: store latent moments instead of images.
    strict: raise `PreprocessError` when any frame or folder was skipped for a problem.
    image_format: "png" (lossless) or "jpg" (quality 95) for the stored images (pose images are always PNG).
    threads: frames decoded and encoded in parallel (results are ordered, so output does not depend on it).
    vae_batch: frames per VAE call.
  """

  layout: str
  src: str
  out: str
  shards: int
  split: str | None = None
  size: int = 512
  vae: str | None = None
  strict: bool = False
  image_format: str = "png"
  threads: int = 4
  vae_batch: int = 8

  def __post_init__(self):
    if self.shards <= 0:
      raise ValueError(f"--shards must be positive, got {self.shards}")
    if self.size <= 0:
      raise ValueError(f"--size must be positive, got {self.size}")
    if self.image_format not in ("png", "jpg"):
      raise ValueError(f"--image-format must be png or jpg, got {self.image_format!r}")


@dataclasses.dataclass
class PreprocessResult:
  manifest: dict
  written: list[int]  # shard indices written by this run
  reused: list[int]  # shard indices finished by an earlier run and skipped
  seconds: float
  frames_processed: int  # frames decoded by this run (skipped shards not counted)


def is_near_constant(image: np.ndarray, threshold: float = NEAR_CONSTANT_STD) -> bool:
  """The release's blank-frame filter: pixel std of the uint8 image scaled to [0, 1] below `threshold`."""
  return float(np.std(image, dtype=np.float64)) / 255.0 < threshold


def split_runs(count: int, parts: int) -> list[range]:
  """`count` items into `parts` contiguous runs whose lengths differ by at most one (earlier runs longer)."""
  base, extra = divmod(count, parts)
  runs, start = [], 0
  for i in range(parts):
    stop = start + base + (i < extra)
    runs.append(range(start, stop))
    start = stop
  return runs


def _sha256_file(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def tree_hash(paths: Sequence[str], root: str) -> str:
  """sha256 over (path relative to `root`, sha256 of the file) of every path, in the given order."""
  digest = hashlib.sha256()
  for path in paths:
    digest.update(os.path.relpath(path, root).encode() + b"\0" + _sha256_file(path).encode() + b"\n")
  return digest.hexdigest()


def _folder_hash(folder: str) -> str:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--vae {folder}: no such folder (expected a diffusers AutoencoderKL folder)")
  files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
  return tree_hash(files, folder)


class LatentEncoder(Protocol):
  """Images uint8 `[n, S, S, 3]` -> VAE latent moments (mean ++ logvar, unscaled) `[n, S/f, S/f, 2C]` float32.

  `config` is the VAE's (`downsample_factor`, `latent_channels`, `scaling_factor`, `latents_mean`, `latents_std`
  go into the manifest). The data layer does not build VAEs: `preprocess` takes a factory, e.g.
  `convert.vae.latent_encoder`, from its caller.
  """

  config: Any

  def __call__(self, images: np.ndarray) -> np.ndarray: ...


EncoderFactory = Callable[[str, int], LatentEncoder]  # (VAE folder, frames per call) -> encoder


def _prepare_frame(source: FolderSource, video: int, frame: int, options: PreprocessOptions,
                   encode: bool) -> dict | SkippedFrame:
  """One frame -> its record fields (the image encoded, or with `encode=False` a uint8 array), or why it is skipped."""
  files = source.files(video, frame)
  try:
    data = source.frame(video, frame)
  except FrameError as e:
    return SkippedFrame(e.reason, e.path, e.detail)
  image = data["image"]
  if is_near_constant(image):
    return SkippedFrame("near_constant", files.image, f"pixel std {np.std(image) / 255:.4f} < {NEAR_CONSTANT_STD}")
  box, size = center_box(*image.shape[:2]), options.size
  poses = crop_poses(data["poses"], box, size)
  # A JSON-only frame is rendered at the stored size (as poses are at inference), not resized from a render.
  pose_image = crop_resize_image(data["pose_image"], box, size) if files.pose_map else render(poses, size, size)
  fields = {"video": files.video, "frame": files.frame, "path": os.path.relpath(files.image, options.src),
            "pose_image": records.encode_image(pose_image), "image": crop_resize_image(image, box, size)}
  if encode:
    fields["image"] = records.encode_image(fields["image"], options.image_format)
  if poses is not None:
    fields.update(records.pose_fields(poses))
  return fields


def _shard_fingerprint(options: PreprocessOptions, index: int, source_hash: str, vae_hash: str | None) -> str:
  spec = {"format": records.MANIFEST_FORMAT, "layout": options.layout, "split": options.split, "size": options.size,
          "image_format": None if options.vae else options.image_format, "vae_sha256": vae_hash,
          "shard": [index, options.shards], "source_sha256": source_hash}
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _write_shard(source: FolderSource, frames: Sequence[tuple[int, int]], options: PreprocessOptions,
                 encoder: LatentEncoder | None, path: str) -> tuple[list[list[str]], list[SkippedFrame]]:
  kept, skipped = [], []

  def encoded_records():
    with concurrent.futures.ThreadPoolExecutor(max(1, options.threads)) as pool:
      for start in range(0, len(frames), CHUNK_FRAMES):
        prepared = list(pool.map(lambda vf: _prepare_frame(source, *vf, options, encode=encoder is None),
                                 frames[start:start + CHUNK_FRAMES]))
        chunk = [p for p in prepared if isinstance(p, dict)]
        skipped.extend(p for p in prepared if isinstance(p, SkippedFrame))
        if encoder is not None and chunk:
          for fields, latent in zip(chunk, encoder(np.stack([p.pop("image") for p in chunk])), strict=True):
            fields["latent"] = latent
        for fields in chunk:
          kept.append([fields["video"], fields["frame"]])
          yield records.encode_example(fields)

  records.write_shard(path, encoded_records())
  return kept, skipped


def _skipped_entry(skip: SkippedFrame, root: str) -> dict:
  # Paths relative to the source root, in the detail too, so the manifest does not depend on where the data lie.
  return {"reason": skip.reason, "path": os.path.relpath(skip.path, root),
          "detail": skip.detail.replace(root + os.sep, "")}


def preprocess(options: PreprocessOptions, encoder_factory: EncoderFactory | None = None) -> PreprocessResult:
  """Writes (or completes) `options.out`: shards, `.done` markers and `manifest.json`. See the module docstring.

  `encoder_factory` builds the latent encoder for `options.vae` (required then; `convert.vae.latent_encoder`).
  """
  if options.vae and encoder_factory is None:
    raise ValueError("preprocess: options.vae is set but no encoder_factory was given (pass "
                     "magicpose_jax.convert.vae.latent_encoder)")
  start = time.perf_counter()
  options = dataclasses.replace(options, src=os.path.abspath(options.src), out=os.path.abspath(options.out))
  source = open_layout(options.layout, options.src, options.split)
  options = dataclasses.replace(options, split=options.split or DEFAULT_SPLITS[options.layout])
  os.makedirs(options.out, exist_ok=True)
  frames = [(v, f) for v in range(source.num_videos) for f in range(source.num_frames(v))]
  vae_hash = _folder_hash(options.vae) if options.vae else None
  encoder = None
  written, reused, processed, shard_infos = [], [], 0, []
  for index, run in enumerate(split_runs(len(frames), options.shards)):
    shard_frames = [frames[i] for i in run]
    name = records.shard_name(index, options.shards)
    path, marker_path = os.path.join(options.out, name), os.path.join(options.out, name + ".done")
    source_hash = tree_hash([p for v, f in shard_frames for p in source.files(v, f).paths], options.src)
    fingerprint = _shard_fingerprint(options, index, source_hash, vae_hash)
    marker = _read_marker(marker_path)
    if marker and marker.get("fingerprint") == fingerprint and os.path.isfile(path):
      log.info("%s: finished by an earlier run, skipped", name)
      reused.append(index)
    else:
      if options.vae and encoder is None:
        encoder = encoder_factory(options.vae, options.vae_batch)
      shard_start = time.perf_counter()
      kept, skipped = _write_shard(source, shard_frames, options, encoder, path)
      processed += len(shard_frames)
      marker = {"file": name, "fingerprint": fingerprint, "source_sha256": source_hash, "records": len(kept),
                "frames": kept, "skipped": [_skipped_entry(s, options.src) for s in skipped]}
      _write_json(marker_path, marker)
      written.append(index)
      log.info("%s: %d records, %d skipped, %.1f frames/s", name, len(kept), len(skipped),
               len(shard_frames) / max(time.perf_counter() - shard_start, 1e-9))
    shard_infos.append(marker)
  # Frames found = frames with a pose + frame files the listing left out (not folders).
  found = len(frames) + sum(s.reason != "empty_video" for s in source.skipped)
  if options.vae and encoder is None:  # every shard reused: the manifest still records the VAE's latent layout
    encoder = encoder_factory(options.vae, options.vae_batch)
  manifest = build_manifest(options, source, shard_infos, encoder, vae_hash, found)
  _write_json(os.path.join(options.out, records.MANIFEST), manifest)
  problems = {k: v for k, v in manifest["counts"]["skipped"].items() if k in PROBLEMS and v}
  if manifest["counts"]["records"] == 0:
    why = (f"no records: {os.path.join(options.src, options.split)} holds no usable frame (expected "
           f"{options.split}/<video>/ folders of images with their poses; skipped: "
           f"{manifest['counts']['skipped'] or 'nothing'})")
    if options.strict:
      raise PreprocessError(f"--strict: {why}")
    log.warning("%s", why)
  if options.strict and problems:
    listed = "; ".join(f"{reason}: {count} (e.g. {manifest['skipped'][reason][0]['path']})"
                       for reason, count in sorted(problems.items()))
    raise PreprocessError(f"--strict: {sum(problems.values())} frames or folders of {options.src} could not be "
                          f"used: {listed}. Every one is listed with its path under 'skipped' in "
                          f"{os.path.join(options.out, records.MANIFEST)}")
  return PreprocessResult(manifest, written, reused, time.perf_counter() - start, processed)


def build_manifest(options: PreprocessOptions, source: FolderSource, shard_infos: Sequence[dict],
                   encoder: LatentEncoder | None, vae_hash: str | None, num_frames: int) -> dict:
  """The manifest: options, counts, skipped frames by reason, shards, the per-video record index, source hashes.

  `counts.frames` is every image file found: `records` + the frame-level `skipped` entries (all but
  `empty_video`, which names folders).
  `videos` maps each video to its global record ids in frame order (what pair sampling reads); `shards[i]`
  gives the file, its record count, its first global record id and the sha256 tree hash of its input files.
  """
  skipped: dict[str, list[dict]] = {}
  for entry in [_skipped_entry(s, options.src) for s in source.skipped] + [
      e for info in shard_infos for e in info["skipped"]]:
    skipped.setdefault(entry["reason"], []).append({"path": entry["path"], "detail": entry["detail"]})
  videos: dict[str, list[int]] = {}
  shards, first = [], 0
  for info in shard_infos:
    for offset, (video, _) in enumerate(info["frames"]):
      videos.setdefault(video, []).append(first + offset)
    shards.append({"file": info["file"], "records": info["records"], "first_record": first,
                   "source_sha256": info["source_sha256"]})
    first += info["records"]
  latent = None
  if options.vae:
    config = encoder.config
    f = config.downsample_factor
    latent = {"vae": options.vae, "vae_sha256": vae_hash, "downsample_factor": f,
              "shape": [options.size // f, options.size // f, 2 * config.latent_channels],
              "scaling_factor": config.scaling_factor, "latents_mean": config.latents_mean,
              "latents_std": config.latents_std,
              "moments": "mean ++ logvar on the channel axis, unscaled (scale samples with models.vae.scale_latents)"}
  listing = hashlib.sha256(json.dumps([s["source_sha256"] for s in shards]).encode()).hexdigest()
  return {
      "format": records.MANIFEST_FORMAT,
      "layout": options.layout, "split": options.split,
      "src": options.src, "size": options.size, "image_format": None if options.vae else options.image_format,
      "latent": latent,
      "counts": {"videos": len(videos), "frames": num_frames, "records": first,
                 "skipped": {reason: len(entries) for reason, entries in sorted(skipped.items())}},
      "skipped": dict(sorted(skipped.items())),
      "shards": shards,
      "videos": videos,
      "source_sha256": listing,
  }


def _read_marker(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, value: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
