"""The ceiling an autoencoder puts on the demo's scores: its own reconstructions of the held-out frames, scored
with the demo's metrics.

    python benchmarks/autoencoder_ceiling.py [--vae DIR ...] [--train-latent-channels 4 8] [--components 8 12 16]
                                             [--shifts 0.5 1 2]

Every generated image of the demo is a decoded latent, so with a decoder trained on exact latents no diffusion model
can score better than the autoencoder's reconstruction of the ground truth itself (a decoder trained on noisy
latents, `DecoderTraining.latent_noise`, trades some of that for drawing a sampler's estimates better). This
scores, on the frames the demo evaluates (8 held-out identities x frames 1-4 of configs/demo.py's data), the
reconstructions of:

* `--vae DIR`: autoencoders saved by the demo's pretrain (`PRETRAIN_DIR/vae`) or diffusers VAE folders (the
  packaged base's, `magicpose_jax/demo/pretrained_sd/vae`);
* `--train-latent-channels K`: the demo's tiny VAE (`demo.autoencoder.DEMO_VAE`) with K latent channels, trained
  here exactly as the demo trains it (2048 training figures, `AutoencoderTraining()` with the demo's steps);
  ~3 minutes each on 2 CPU cores;
* `--components K`: the patch autoencoder (PCA of 4 x 4 patches, `models.patch_vae.fit_patch_vae`), seconds.

and, with `--shifts S`, no autoencoder at all: the ground truth itself moved by S pixels down, then right (bilinear
for fractional S, edges repeated). At 64 px these say what the pixel metrics make of a figure drawn perfectly but a
pixel off, which is as close as a pose map drawn on ControlNet's integer grid places it.

`--set KEY=VALUE` changes configs/demo.py's data for the run (e.g. `--set data.synthetic.head_scale=1.5`).

Prints a Markdown table (PSNR, SSIM, pose mIoU, identity colour error, face L1, eye state, and the colour error per
region: the demo's columns, `eval.figure_metrics`) with the command and commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import cv2
import numpy as np

from magicpose_jax.configs import apply_overrides, load_config
from magicpose_jax.convert.flax_checkpoint import is_flax_model
from magicpose_jax.convert.vae import load_vae
from magicpose_jax.demo import autoencoder
from magicpose_jax.demo import retarget as rt
from magicpose_jax.demo.phases import DEMO, training_figures
from magicpose_jax.eval.figure_metrics import evaluate_figures
from magicpose_jax.eval.report import source_commit
from magicpose_jax.models.patch_vae import PatchVAEConfig, fit_patch_vae


def score_row(name: str, config: autoencoder.AnyVAEConfig, params: dict, frames: list, palettes: list) -> str:
  """The table row of an autoencoder: its reconstructions of `frames` (`SyntheticSource.frame` dicts) scored."""
  images = np.stack([f["image"] for f in frames])
  h, w = images.shape[1] // config.downsample_factor, images.shape[2] // config.downsample_factor
  return table_row(name, f"{h}x{w}x{config.latent_channels}", autoencoder.reconstruct(config, params, images), frames,
                   palettes)


def load_any_vae(folder: str) -> tuple[autoencoder.AnyVAEConfig, dict]:
  """A pretrain's saved autoencoder (`config.json` + `params/`) or a diffusers `AutoencoderKL` folder."""
  if is_flax_model(folder):
    return autoencoder.load_autoencoder(folder)
  return load_vae(folder)


def shifted(images: np.ndarray, dy: float, dx: float) -> np.ndarray:
  """uint8 `[N, H, W, 3]` moved by (dy, dx) pixels: bilinear, edge pixels repeated into the uncovered border."""
  m = np.array([[1, 0, dx], [0, 1, dy]], np.float64)
  return np.stack([cv2.warpAffine(i, m, i.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                   for i in images])


def table_row(name: str, latents: str, generated: np.ndarray, frames: list, palettes: list) -> str:
  """The table row of images `generated [N, H, W, 3]` standing in for `frames`' ground truth."""
  return rt.markdown_row([name, latents], evaluate_figures(generated, frames, palettes))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vae", nargs="*", default=[], help="saved autoencoder folders (the demo's outputs/demo/vae)")
  parser.add_argument("--train-latent-channels", type=int, nargs="*", default=[],
                      help="train the demo's tiny VAE with these latent channel counts, as the demo does")
  parser.add_argument("--components", type=int, nargs="*", default=[8, 12, 16], help="patch autoencoder sizes")
  parser.add_argument("--fit-images", type=int, default=DEMO.vae_images, help="training figures to fit on")
  parser.add_argument("--shifts", type=float, nargs="*", default=[],
                      help="also score the ground truth moved by these many pixels (down, then right)")
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                      help="configs/demo.py fields to change, e.g. data.synthetic.head_scale=1.5")
  args = parser.parse_args(argv)
  data = apply_overrides(load_config("demo"), args.set).data
  source = rt.synthetic_source(data)
  start = time.perf_counter()
  fit = training_figures(data, args.fit_images)  # the demo's own draw (Demo.train_vae)
  pairs = rt.holdout_pairs(data, poses_per_identity=4)
  frames = [source.frame(identity, t) for identity, _, targets in pairs for t in targets]
  palettes = [source.palette(identity) for identity, _, targets in pairs for _ in targets]
  command = " ".join(["python benchmarks/autoencoder_ceiling.py", *(sys.argv[1:] if argv is None else argv)])
  print(f"`{command}` -- commit {source_commit() or 'unknown'}; scored on {len(frames)} held-out frames\n")
  print(rt.markdown_header(["autoencoder", "latents"]))
  for folder in args.vae:
    config, params = load_any_vae(folder)
    print(score_row(folder, config, params, frames, palettes), flush=True)
  training = autoencoder.AutoencoderTraining(steps=DEMO.vae_steps)
  for k in args.train_latent_channels:
    config, params, _ = autoencoder.train_autoencoder(
        dataclasses.replace(autoencoder.DEMO_VAE, latent_channels=k), fit, training)
    print(score_row(f"tiny VAE, {training.steps} steps", config, params, frames, palettes), flush=True)
  for k in args.components:
    config, params = fit_patch_vae(PatchVAEConfig(latent_channels=k), fit)
    print(score_row("patch (PCA)", config, params, frames, palettes), flush=True)
  truth = np.stack([f["image"] for f in frames])
  for s in args.shifts:
    for name, (dy, dx) in (("down", (s, 0)), ("right", (0, s))):
      print(table_row(f"none: the ground truth moved {s:g} px {name}", "-", shifted(truth, dy, dx), frames, palettes))
  print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
