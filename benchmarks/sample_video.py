"""Video sampling with and without reference-state caching, side by side in one run.

    python benchmarks/sample_video.py                       # tiny model, 16 frames, 50 steps
    python benchmarks/sample_video.py --size mid --steps 20 # an SD-shaped model at 32×32 latents

Modes: `per-frame` is the release (frame by frame, appearance net run for every frame and step);
`cached` precomputes the appearance states once per video and reuses them for every frame;
`cached+batched` also runs `--batch-frames` frames per call. Prints frames/s, the speed-up over
per-frame (goal >= 1.4x at 50 steps) and the cache's size.
"""

from __future__ import annotations

import argparse
import os
import time

SIZES = {  # (block_out_channels, latent size, heads)
    "tiny": ((32, 64, 64), 16, 4),
    "mid": ((64, 128, 256, 256), 32, 8),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--batch-frames", type=int, default=8)
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from magicpose_jax.diffusion.sampler import SamplerConfig, precompute_reference_states, sample_video  # noqa: PLC0415
  from magicpose_jax.diffusion.schedules import SD15_SCHEDULE, make_schedule  # noqa: PLC0415
  from magicpose_jax.models.magicpose import MagicPose, MagicPoseConfig, init_params  # noqa: PLC0415
  from magicpose_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: PLC0415

  channels, latent, heads = SIZES[args.size]
  n = len(channels)
  unet = UNetConfig(block_out_channels=channels, layers_per_block=2, attention_head_dim=heads, norm_num_groups=16,
                    cross_attention_dim=64, down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))
  config = MagicPoseConfig.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
  model = MagicPose(config)
  key = jax.random.key(0)
  x_T = jax.random.normal(key, (1, latent, latent, 4))
  text = jax.random.normal(key, (1, 77, 64))
  unet_params = jax.jit(UNet2DConditionModel(unet).init)(key, x_T, jnp.zeros((1,)), text)["params"]
  params = init_params(config, unet_params, key)
  z_ref = jax.random.normal(jax.random.key(1), (1, latent, latent, 4))
  poses = jax.random.uniform(jax.random.key(2), (args.frames, 8 * latent, 8 * latent, 3))
  schedule = make_schedule(SD15_SCHEDULE)
  sampler = SamplerConfig(num_steps=args.steps)

  def run(batch_frames: int, cache: bool) -> float:
    go = lambda: sample_video(model, params, schedule, SD15_SCHEDULE, sampler, x_T, text, z_ref, poses,
                              batch_frames=batch_frames, cache=cache).block_until_ready()
    go()  # compile
    start = time.perf_counter()
    go()
    return args.frames / (time.perf_counter() - start)

  times_cache = jax.eval_shape(lambda: precompute_reference_states(
      model, params, z_ref, text, list(range(args.steps))))
  cache_mb = sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(times_cache)) / 2**20
  per_frame = run(1, cache=False)
  cached = run(1, cache=True)
  batched = run(args.batch_frames, cache=True)
  print(f"MagicPose video sampling: size={args.size} (latents {latent}², channels {channels}), {args.frames} frames, "
        f"{args.steps} DDIM steps, guidance 7, fp32, {jax.devices()[0].platform}")
  print(f"  per-frame (release)       : {per_frame:8.3f} frames/s")
  print(f"  cached                    : {cached:8.3f} frames/s   {cached / per_frame:5.2f}x")
  print(f"  cached + batched ({args.batch_frames:>2})     : {batched:8.3f} frames/s   {batched / per_frame:5.2f}x"
        f"   (goal >= 1.4x)")
  print(f"  reference-state cache     : {cache_mb:8.1f} MB for {args.steps} steps")


if __name__ == "__main__":
  main()
