"""Where the main UNet's self-attention looks in the reference, for trained demo runs (configs/demo.py's figures).

    python benchmarks/reference_attention.py outputs/demo/runs/stage2 [more runs] [--same] [--timesteps 900 500 200]

For the held-out pairs the demo evaluates (8 identities x 4 target poses, reference frame 0; `--same`: the
reference is the target frame itself), noises each target to each timestep, runs the run's Appearance and Pose
Controllers and its main UNet, and prints per reference self-attention layer (in the order the layers run) the
share of attention on the reference, its entropy over the reference's tokens (1 = uniform) and over the image's
own, and how much of the reference's share lands on the same body part, against chance
(`eval.reference_attention`). A copy of the reference's clothes needs part_match well above chance; uniform
attention reads the reference's average colour, which is mostly background.
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.configs import load_config
from magicpose_jax.demo import retarget as rt
from magicpose_jax.diffusion.schedules import add_noise, make_schedule
from magicpose_jax.eval.reference_attention import attention_stats, reference_layers, token_labels
from magicpose_jax.eval.report import source_commit
from magicpose_jax.models.magicpose import MagicPose
from magicpose_jax.models.patch_vae import make_vae
from magicpose_jax.models.vae import scale_latents
from magicpose_jax.train import stages


def run_rows(workdir: str, timesteps: list[int], same: bool, poses: int) -> list[str]:
  """Table rows of one trained run (module docstring)."""
  m = rt.load_trained(workdir)
  if not m.model.use_appearance:
    raise SystemExit(f"{workdir}: this run has no Appearance Controller, so no reference attention")
  model, vae = MagicPose(m.model), make_vae(m.sd.vae)
  data = load_config("demo").data
  source = rt.synthetic_source(data)
  pairs = rt.holdout_pairs(data, poses_per_identity=poses)
  targets = [source.frame(i, t) for i, _, ts in pairs for t in ts]
  refs = targets if same else [source.frame(i, r) for i, r, ts in pairs for _ in ts]
  b = len(targets)

  def encode(frames: list[dict]) -> jax.Array:
    images = jnp.asarray(np.stack([f["image"] for f in frames]), jnp.float32) / 127.5 - 1
    return scale_latents(vae.apply({"params": m.params["vae"]}, images, method="encode").mode(), vae.config)

  z0, z_ref = encode(targets), encode(refs)
  pose = jnp.asarray(np.stack([f["pose_image"] for f in targets]), jnp.float32) / 255
  text = jnp.asarray(stages.text_context(m.sd, m.params["text_encoder"]))  # [1, L, D]
  text = jnp.broadcast_to(text, (b, *text.shape[1:]))
  schedule = make_schedule(m.sd.scheduler)
  noise = jax.random.normal(jax.random.key(0), z0.shape)
  rows = []
  for t in timesteps:
    tt = jnp.full((b,), t)
    z_t = add_noise(schedule, z0, noise, tt)
    states = model.reference_states(m.params, z_ref, tt, text)
    down, mid = model.pose_residuals(m.params, z_t, tt, text, pose) if m.model.pose is not None else (None, None)
    _, sown = model.unet.apply({"params": m.params["unet"]}, z_t, tt, text, down, mid, states,
                               mutable=["intermediates"])
    for layer, (q, k) in enumerate(reference_layers(sown["intermediates"])):
      n = q.shape[1]
      side = math.isqrt(n)  # the demo's latents are square
      s = attention_stats(q, k, np.stack([token_labels(f["part_mask"], side) for f in targets]),
                          np.stack([token_labels(f["part_mask"], side) for f in refs]))
      rows.append(f"| {workdir} | {t} | {layer} ({side}x{side}) | {s['reference_mass']:.3f} | {s['entropy']:.3f} | "
                  f"{s['own_entropy']:.3f} | {s['part_match']:.3f} | {s['chance']:.3f} |")
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", help="trained stage1/stage2 workdirs (the demo's outputs/demo/runs/...)")
  parser.add_argument("--timesteps", type=int, nargs="+", default=[900, 500, 200])
  parser.add_argument("--same", action="store_true", help="the reference is the target frame itself")
  parser.add_argument("--poses", type=int, default=4, help="target poses per held-out identity")
  args = parser.parse_args(argv)
  command = " ".join(["python benchmarks/reference_attention.py", *(sys.argv[1:] if argv is None else argv)])
  print(f"`{command}` -- commit {source_commit() or 'unknown'}\n")
  print("| run | t | layer (tokens) | on reference | entropy | own entropy | part match | chance |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|")
  for workdir in args.runs:
    for row in run_rows(workdir, args.timesteps, args.same, args.poses):
      print(row, flush=True)


if __name__ == "__main__":
  main()
