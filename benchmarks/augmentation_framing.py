"""Does the paper's data augmentation help when a training pair's reference and target share their framing?

    python benchmarks/augmentation_framing.py [--out outputs/augmentation_framing] [--base-sd DIR] [--seeds 0 1 2]

In the demo's data every frame is framed on its own (`data.synthetic.camera="frame"`: the figure's size and place
drawn per frame), so the training pairs already differ in framing as much as any test pair, and the paper's random
crops (scale 0.9-1.0, reference and target cropped independently) add nothing: the no-augmentation ablation ties
(benchmarks/results/fidelity.md). MagicPose trains on TikTok videos, one fixed camera per video, where the crops are
the only framing change between a pair's reference and target. This trains the demo's full model (stage 1 then
stage 2, the demo's budget, over the packaged base) with and without augmentation on figures framed like that
(`camera="identity"`: one framing per person), then scores both on the held-out pairs framed both ways:
"identity" (reference framed as its targets, as in training) and "frame" (reference framed differently), over
sampling seeds. Prints a Markdown table with the command and commit. About 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time

import ml_collections
import numpy as np
from fidelity import Fidelity  # benchmarks/fidelity.py, beside this script

from magicpose_jax import demo
from magicpose_jax.demo import pretrained
from magicpose_jax.demo import retarget as rt
from magicpose_jax.diffusion.sampler import SamplerConfig
from magicpose_jax.eval.report import source_commit

COLUMNS = ("psnr", "ssim", "mean_iou", "identity_error", "face_l1")


def train(d: Fidelity) -> dict[str, str]:
  """The fidelity benchmark's stage 1 and 2 runs with and without augmentation (not its no-appearance run) in `d`'s
  folder; returns variant -> run folder."""
  for r in d.training_runs():
    if r.name in ("stage1", "stage2", "no_augmentation_stage1", "no_augmentation"):
      d.train_run(r.index, r.name, r.config, r.text)
  return {"full": d.path("runs", "stage2"), "no_augmentation": d.path("runs", "no_augmentation")}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="outputs/augmentation_framing", help="training workdirs (cached here)")
  parser.add_argument("--base-sd", default=pretrained.PACKAGED_BASE, help="pretrained base SD folder")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  config = demo.load_config()
  config.data.synthetic.camera = "identity"
  d = Fidelity(args.out, demo.DEMO, config, base_sd=args.base_sd)
  runs = train(d)
  b = d.budget
  sampler = SamplerConfig(num_steps=b.sample_steps, guidance=b.guidance)
  rows = {}
  for camera in ("identity", "frame"):
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.synthetic.camera = camera
    pairs = rt.holdout_pairs(data, b.poses_per_identity, b.holdout_identities)
    source = rt.synthetic_source(data)
    for name, workdir in runs.items():
      model = rt.load_trained(workdir)
      scores = [rt.summary(rt.retarget(model, source, pairs, sampler, seed=s).metrics) for s in args.seeds]
      rows[camera, name] = {k: [m[k] for m in scores] for k in COLUMNS}
  command = " ".join(["python benchmarks/augmentation_framing.py", *(sys.argv[1:] if argv is None else argv)])
  print(f"\n`{command}` -- commit {source_commit() or 'unknown'}; trained on camera='identity', "
        f"{len(args.seeds)} sampling seeds, mean (min..max); {time.perf_counter() - start:.0f} s\n")
  print("| test framing | model | " + " | ".join(COLUMNS) + " |\n|---|---|" + "---:|" * len(COLUMNS))
  for (camera, name), cols in rows.items():
    cells = [f"{np.mean(v):.3f} ({min(v):.3f}..{max(v):.3f})" for v in cols.values()]
    print(f"| {camera} | {name} | " + " | ".join(cells) + " |")
  for camera in ("identity", "frame"):
    full, plain = rows[camera, "full"], rows[camera, "no_augmentation"]
    margin = min(full["ssim"]) - max(plain["ssim"])
    print(f"- {camera}: SSIM full - no_augmentation, smallest margin over seeds: {margin:+.4f}")


if __name__ == "__main__":
  main()
