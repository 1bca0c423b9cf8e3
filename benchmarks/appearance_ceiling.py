"""How much of the reference can a trained run carry at all? Its retargeting against two ceilings, on one table.

    python benchmarks/appearance_ceiling.py --run outputs/demo/runs/stage2

Scores, on the demo's held-out targets (8 identities x frames 1-4 of configs/demo.py's data, sampled as the demo
samples them):

* **retarget**: the run as the demo evaluates it, the reference being each identity's frame 0;
* **copy**: the same targets, each with the target frame itself as the reference. Nothing has to move, so what
  is still wrong here (a region's colour, the face) the run cannot carry from a reference even without a pose
  change: the limit is the appearance path (the Appearance Controller reading through the frozen base's attention)
  or the base, not the pose;
* **autoencoder**: the run's own VAE's reconstructions of the targets, no diffusion at all: what exact latents
  give (a decoder trained on noisy latents, as the demo's packaged one, gives up a little of it to draw the UNet's
  estimates better).

A region whose error stays high in the copy row while the autoencoder keeps it is lost in the diffusion model.
Prints a Markdown table (the demo's columns, `eval.figure_metrics`) with the command and commit; about two minutes
on a quiet 2-core CPU for the demo's run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import ml_collections
import numpy as np

from magicpose_jax.demo import DEMO, Budget, load_config
from magicpose_jax.demo import retarget as rt
from magicpose_jax.demo.autoencoder import reconstruct
from magicpose_jax.diffusion.sampler import SamplerConfig
from magicpose_jax.eval.figure_metrics import evaluate_figures
from magicpose_jax.eval.report import source_commit


def copy_pairs(pairs: Sequence[tuple[int, int, list[int]]]) -> list[tuple[int, int, list[int]]]:
  """`rt.holdout_pairs`' (identity, reference frame, targets) as one pair per target whose reference is the target
  frame itself."""
  return [(identity, t, [t]) for identity, _, targets in pairs for t in targets]


def ceiling_rows(model: rt.TrainedModel, data: ml_collections.ConfigDict, budget: Budget = DEMO,
                 seed: int = 0) -> list[str]:
  """The three rows (retarget, copy, autoencoder) of `model` on the held-out targets of `data` (a training config's
  data), sampled and chosen as the demo does at `budget`."""
  source = rt.synthetic_source(data)
  sampler = SamplerConfig(num_steps=budget.sample_steps, guidance=budget.guidance)
  pairs = rt.holdout_pairs(data, budget.poses_per_identity, budget.holdout_identities)
  rows = [rt.markdown_row(["retarget: frame 0"], rt.retarget(model, source, pairs, sampler, seed=seed).metrics),
          rt.markdown_row(["copy: the target frame"], rt.retarget(model, source, copy_pairs(pairs), sampler,
                                                                  seed=seed).metrics)]
  frames = [source.frame(identity, t) for identity, _, targets in pairs for t in targets]
  palettes = [source.palette(identity) for identity, _, targets in pairs for _ in targets]
  truth = np.stack([f["image"] for f in frames])
  recon = reconstruct(model.sd.vae, model.params["vae"], truth)
  rows.append(rt.markdown_row(["none: the VAE's reconstruction"], evaluate_figures(recon, frames, palettes)))
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", default="outputs/demo/runs/stage2", help="a finished stage-1 or stage-2 run")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed (0: the demo's own draw)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  model = rt.load_trained(args.run)
  command = " ".join(["python benchmarks/appearance_ceiling.py", *(sys.argv[1:] if argv is None else argv)])
  print(f"`{command}` -- commit {source_commit() or 'unknown'}, sampling seed {args.seed}\n")
  print(rt.markdown_header(["reference"]))
  for row in ceiling_rows(model, load_config().data, seed=args.seed):
    print(row, flush=True)
  print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
