"""The demo's table over several sampling seeds: is each ablation claim's margin larger than the seed spread?

    python benchmarks/seed_spread.py --demo outputs/demo [--seeds 0 1 2]

Re-samples the held-out pairs of a finished demo (`python -m magicpose_jax.demo --out DIR`) with every evaluated
model (full, no_appearance, no_pose) and each sampling seed (seed 0 is the demo's own draw), and prints per model
and metric the mean and the range (min..max) over seeds, then the demo's claims with their smallest margin over
the seeds against the largest seed-to-seed range of the two models compared (`magicpose_jax.eval.claims`).
Training is not repeated: this is the sampling spread only. Sampling only: ~1 minute per model and seed on a
quiet 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from magicpose_jax.demo import DEMO, load_config
from magicpose_jax.demo import retarget as rt
from magicpose_jax.diffusion.sampler import SamplerConfig
from magicpose_jax.eval import claims
from magicpose_jax.eval.report import source_commit


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--demo", default="outputs/demo", help="a finished demo's output folder")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  args = parser.parse_args(argv)
  # Read-only: the demo's default config and budget, its runs by path (a `Demo` would clean a folder whose setup
  # differs from today's).
  data = load_config().data
  pairs = rt.holdout_pairs(data, DEMO.poses_per_identity, DEMO.holdout_identities)
  source = rt.synthetic_source(data)
  sampler = SamplerConfig(num_steps=DEMO.sample_steps, guidance=DEMO.guidance)
  runs = {"full": "stage2", "no_appearance": "no_appearance", "no_pose": "stage1"}  # DEMO.no_pose_steps == 0
  reports: dict[str, list[dict[str, float]]] = {}  # model -> one summary per seed
  for name, run in runs.items():
    model = rt.load_trained(os.path.join(args.demo, "runs", run))
    for seed in args.seeds:
      summary = rt.summary(rt.retarget(model, source, pairs, sampler, seed=rt.sampling_seed(seed)).metrics)
      reports.setdefault(name, []).append(summary)
      print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()), flush=True)
  commit = source_commit() or "unknown"
  command = " ".join(["python benchmarks/seed_spread.py", *(sys.argv[1:] if argv is None else argv)])
  print(f"\n`{command}` -- commit {commit}, sampling seeds {args.seeds}\n")
  print("| model | " + " | ".join(title for _, title, _ in rt.SUMMARY_KEYS) + " |")
  print("|---|" + "---:|" * len(rt.SUMMARY_KEYS))
  for name, summaries in reports.items():
    columns = ([s[k] for s in summaries] for k, _, _ in rt.SUMMARY_KEYS)
    cells = [f"{np.mean(v):.3f} ({min(v):.3f}..{max(v):.3f})" for v in columns]
    print(f"| {name} | " + " | ".join(cells) + " |")
  print()
  print("\n".join(claims.verdict_lines(claims.judge(reports, claims.DEMO_CLAIMS))))


if __name__ == "__main__":
  main()
