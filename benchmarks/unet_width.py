"""The demo's training step with the tiny UNet against wider ones, side by side: what a larger base would cost.

    python benchmarks/unet_width.py                        # tiny (32/64) against 2x wide (64/128), 12 rounds
    python benchmarks/unet_width.py --widths 2 3 --iters 8

Each UNet is `configs/demo.py`'s stage-1 and stage-2 step (`loop.setup`, the compiled step, a fixed batch of 8)
over a random base: the tiny UNet with its widths times k, its heads times k (the same head size). The random
base's tiny VAE downsamples by 2, so the images are 32 px to give the demo's 16 x 16 latents (the demo's own VAE
downsamples 64 px by 4); the UNets see what they see in the demo. Steps run in shuffled rounds
(`timing.shuffled_samples`), so drifting load hits every model alike; prints each median and its ratio to tiny.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np
from timing import shuffled_samples

from magicpose_jax.demo import load_config
from magicpose_jax.models import unet as unet_models
from magicpose_jax.train import loop, sharding

BATCH = 8


def widened(k: int) -> str:
  """Registers the tiny UNet k times as wide (and with k times the heads) in `unet.VARIANTS`; returns its name."""
  if k == 1:
    return "tiny"
  tiny = unet_models.VARIANTS["tiny"]
  name = f"tiny_x{k}"
  unet_models.VARIANTS[name] = tiny.replace(block_out_channels=tuple(c * k for c in tiny.block_out_channels),
                                            attention_head_dim=tiny.attention_head_dim * k)
  return name


def step_fn(unet: str, stage: str):
  """(the compiled step as a no-argument callable, trainable parameter count) for `unet` at `stage`."""
  c = load_config()
  c.stage, c.model.unet = stage, unet
  c.model.hint_channels = (16, 32)  # downsamples by 2, as the random base's VAE
  c.data.image_size = 32
  run = loop.setup(c)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({k: rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
                                 for k in ("reference", "target", "pose")}, run.batch_sharding)
  compiled = loop.compile_step(run, batch)
  state = [run.state]

  def step():
    state[0], metrics = compiled(state[0], run.frozen, batch)
    jax.block_until_ready((state[0], metrics))

  return step, sum(x.size for x in jax.tree.leaves(run.state.params))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--widths", type=int, nargs="+", default=[2], help="width multiples of the tiny UNet to time")
  parser.add_argument("--iters", type=int, default=12, help="shuffled rounds")
  args = parser.parse_args(argv)
  if min(args.widths) < 1:
    parser.error(f"--widths must be >= 1, got {args.widths}")
  fns = {}
  for k in sorted({1, *args.widths}):
    for stage in ("stage1", "stage2"):
      fns[(k, stage)], params = step_fn(widened(k), stage)
      print(f"x{k} {stage}: {params / 1e6:.2f} M trainable parameters", flush=True)
  times = {key: statistics.median(t) for key, t in shuffled_samples(fns, args.iters).items()}
  for (k, stage), t in times.items():
    print(f"x{k} {stage}: {t * 1e3:.0f} ms/step, {t / times[(1, stage)]:.2f}x tiny's")


if __name__ == "__main__":
  main()
