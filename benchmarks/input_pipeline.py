"""Input pipeline throughput: preprocessing (frames/s) and grain training batches (samples/s, ms/sample).

    python benchmarks/input_pipeline.py                  # 512² frames, batch 8, workers 0 and 2
    python benchmarks/input_pipeline.py --size 256 --frames 48 --workers 0

Steps:
  1. writes a TikTok-layout folder of `--frames` frames (4 videos) of synthetic figures at `--size`, with
     Gaussian noise (sigma 8) so the PNGs are photo-like in size, and OpenPose JSON poses;
  2. `preprocess` to ArrayRecord shards (decode, centre crop, pose render from JSON, PNG encode): frames/s;
  3. `train_dataset` over the shards (PNG decode of reference, target and pose, random resized crops, flip with
     re-rendered poses at p=0.5, batching) for each worker count: samples/s and ms/sample;
  4. `train_dataset` over the synthetic source (figure + pose drawing, crops) at 64² (the demo) and `--size`.
Prints one line per measurement and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def write_folder(root: str, frames: int, size: int) -> float:
  """TikTok-layout frames from synthetic figures + noise; returns the mean PNG size in KiB."""
  import numpy as np  # noqa: PLC0415

  from magicpose_jax.data.records import encode_image  # noqa: PLC0415
  from magicpose_jax.data.synthetic import SyntheticConfig, SyntheticSource  # noqa: PLC0415
  from magicpose_jax.pose import write_openpose_json  # noqa: PLC0415

  source = SyntheticSource(SyntheticConfig(image_size=size, num_identities=4, frames_per_identity=frames))
  rng = np.random.default_rng(0)
  total = 0
  for i in range(frames):
    video, frame = i % 4, i // 4
    data = source.frame(video, frame)
    noisy = np.clip(data["image"] + rng.normal(0, 8, data["image"].shape), 0, 255).astype(np.uint8)
    folder = os.path.join(root, "train_set", f"video{video}")
    os.makedirs(folder, exist_ok=True)
    png = encode_image(noisy)
    total += len(png)
    with open(os.path.join(folder, f"{frame:04d}.png"), "wb") as f:
      f.write(png)
    write_openpose_json(os.path.join(folder, f"{frame:04d}.json"), [data["pose"]], canvas=(size, size))
  return total / frames / 1024


def time_batches(dataset, batch: int, steps: int, warmup: int = 2) -> float:
  """Samples/s over `steps` batches after `warmup` batches (worker start-up and first reads excluded)."""
  it = iter(dataset)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=512, help="stored and output image side")
  parser.add_argument("--frames", type=int, default=96, help="frames in the generated folder")
  parser.add_argument("--batch", type=int, default=8, help="batch size")
  parser.add_argument("--steps", type=int, default=12, help="timed batches per measurement")
  parser.add_argument("--workers", default="0,2", help="comma-separated worker-process counts to time")
  parser.add_argument("--threads", type=int, default=2, help="decode threads (preprocess and per reader)")
  args = parser.parse_args()
  from absl import flags  # noqa: PLC0415

  from magicpose_jax.data.pipeline import default_data_config, train_dataset  # noqa: PLC0415
  from magicpose_jax.data.preprocessing import PreprocessOptions, preprocess  # noqa: PLC0415

  flags.FLAGS.mark_as_parsed()
  results = {"cores": os.cpu_count(), "size": args.size, "batch": args.batch}
  with tempfile.TemporaryDirectory() as tmp:
    results["source_png_kib"] = round(write_folder(os.path.join(tmp, "src"), args.frames, args.size), 1)
    result = preprocess(PreprocessOptions(layout="tiktok", src=os.path.join(tmp, "src"), out=os.path.join(tmp, "out"),
                                          shards=4, size=args.size, threads=args.threads))
    results["preprocess_frames_per_s"] = round(result.frames_processed / result.seconds, 1)
    print(f"preprocess: {args.frames} frames at {args.size}², {results['preprocess_frames_per_s']} frames/s "
          f"(source PNGs {results['source_png_kib']} KiB)")

    config = default_data_config()
    config.update(source="arrayrecord", path=os.path.join(tmp, "out"), image_size=args.size,
                  read_threads=args.threads)
    config.augment.flip = True
    for workers in [int(w) for w in args.workers.split(",")]:
      config.num_workers = workers
      rate = time_batches(train_dataset(config, global_batch_size=args.batch, seed=0), args.batch, args.steps)
      results[f"arrayrecord_workers{workers}_samples_per_s"] = round(rate, 1)
      print(f"arrayrecord {args.size}², {workers} workers: {rate:.1f} samples/s, {1000 / rate:.1f} ms/sample")

    for size in sorted({64, args.size}):
      config = default_data_config()
      config.update(image_size=size, read_threads=args.threads)
      config.synthetic.image_size = size
      rate = time_batches(train_dataset(config, global_batch_size=args.batch, seed=0), args.batch, args.steps)
      results[f"synthetic{size}_samples_per_s"] = round(rate, 1)
      print(f"synthetic {size}², 0 workers: {rate:.1f} samples/s, {1000 / rate:.1f} ms/sample")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
