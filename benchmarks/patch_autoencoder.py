"""How well the demo's patch autoencoder reconstructs held-out figures, per number of kept components.

    python benchmarks/patch_autoencoder.py [--fit-images 2048] [--components 3 6 8 12 16 24 48]

Fits `models.patch_vae.fit_patch_vae` (PCA of 4 x 4 patches) on random training figures of the demo's data
(configs/demo.py: 64 px, plain) and reconstructs the demo's held-out pairs (8 identities x frames 1-4, the frames
the demo scores). Prints a Markdown table (PSNR on uint8 pixels, L1 in [0, 1]) with the command and commit. A few
seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from magicpose_jax.configs import load_config
from magicpose_jax.demo import retarget as rt
from magicpose_jax.demo.autoencoder import reconstruction_metrics
from magicpose_jax.eval.report import source_commit
from magicpose_jax.models.patch_vae import PatchVAEConfig, fit_patch_vae


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--fit-images", type=int, default=2048, help="training figures the PCA is fitted on")
  parser.add_argument("--components", type=int, nargs="+", default=[3, 6, 8, 12, 16, 24, 48])
  args = parser.parse_args(argv)
  data = load_config("demo").data
  source = rt.synthetic_source(data)
  rng = np.random.default_rng(0)
  train_ids = data.synthetic.num_identities - data.synthetic.holdout_identities
  start = time.perf_counter()
  fit = np.stack([source.frame(int(i), int(rng.integers(data.synthetic.frames_per_identity)))["image"]
                  for i in rng.integers(train_ids, size=args.fit_images)])
  pairs = rt.holdout_pairs(data, poses_per_identity=4)
  held_out = np.stack([source.frame(identity, t)["image"] for identity, _, targets in pairs for t in targets])
  commit = source_commit() or "unknown"
  command = " ".join(["python benchmarks/patch_autoencoder.py", *(sys.argv[1:] if argv is None else argv)])
  print(f"`{command}` -- commit {commit}; fitted on {len(fit)} training figures, scored on {len(held_out)} "
        f"held-out frames\n")
  print("| components | latents | held-out PSNR (dB) | held-out L1 |\n|---:|---|---:|---:|")
  for k in args.components:
    config, params = fit_patch_vae(PatchVAEConfig(latent_channels=k), fit)
    m = reconstruction_metrics(config, params, held_out)
    print(f"| {k} | 16x16x{k} | {m['psnr']:.2f} | {m['l1'] / 2:.4f} |")
  print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
