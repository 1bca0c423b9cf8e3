"""Where the main UNet's self-attention looks in the reference, for trained demo runs (configs/demo.py's figures).

    python benchmarks/reference_attention.py outputs/demo/runs/stage2 [more runs] [--same] [--timesteps 900 500 200]
        [--figure attention.png]

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
from PIL import Image

from magicpose_jax.configs import load_config
from magicpose_jax.data.synthetic import PART_NAMES
from magicpose_jax.demo import retarget as rt
from magicpose_jax.diffusion.schedules import add_noise, make_schedule
from magicpose_jax.eval.reference_attention import (
  attention_stats,
  part_token,
  query_map,
  reference_layers,
  token_labels,
)
from magicpose_jax.eval.report import source_commit
from magicpose_jax.models.magicpose import MagicPose
from magicpose_jax.models.patch_vae import make_vae
from magicpose_jax.models.vae import scale_latents
from magicpose_jax.train import stages

FIGURE_PARTS = ("head", "torso", "left_leg")  # one query token each, nearest the part's centroid in the target


def figure_strip(target: dict, reference: dict, q: np.ndarray, k: np.ndarray, scale: int = 3) -> np.ndarray:
  """uint8 `[S*scale, 4*S*scale, 3]`: the target with its query tokens marked, then the reference with each
  query's attention (example 0 of `q`/`k`) as a red overlay, brightest where it attends most."""
  side = math.isqrt(q.shape[1])
  cell = target["image"].shape[0] // side
  labels = token_labels(target["part_mask"], side)
  marked = target["image"].copy()
  panels = []
  for name, colour in zip(FIGURE_PARTS, ((255, 255, 0), (0, 255, 255), (255, 0, 255)), strict=True):
    token = part_token(labels, PART_NAMES.index(name))
    heat = np.zeros((side, side)) if token is None else query_map(q, k, 0, token).reshape(side, side)
    heat = np.kron(heat / max(heat.max(), 1e-12), np.ones((cell, cell)))[..., None]
    panels.append((reference["image"] * (1 - 0.7 * heat) + np.array([255, 0, 0]) * 0.7 * heat).astype(np.uint8))
    if token is not None:
      y, x = divmod(token, side)
      marked[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell] = colour
  strip = np.concatenate([marked, *panels], axis=1)
  return np.kron(strip, np.ones((scale, scale, 1), np.uint8))


def run_rows(workdir: str, timesteps: list[int], same: bool, poses: int,
             figure_t: int | None = None) -> tuple[list[str], np.ndarray | None]:
  """Table rows of one trained run (module docstring) and, at `figure_t`, the `figure_strip` of its first pair
  from its last reference layer."""
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
  labels: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per grid side: (targets', references') token labels

  def labels_at(side: int) -> tuple[np.ndarray, np.ndarray]:
    if side not in labels:
      labels[side] = tuple(np.stack([token_labels(f["part_mask"], side) for f in frames]) for frames in (targets, refs))
    return labels[side]

  rows, strip = [], None
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
      s = attention_stats(q, k, *labels_at(side))
      rows.append(f"| {workdir} | {t} | {layer} ({side}x{side}) | {s['reference_mass']:.3f} | {s['entropy']:.3f} | "
                  f"{s['own_entropy']:.3f} | {s['part_match']:.3f} | {s['chance']:.3f} |")
    if t == figure_t:
      strip = figure_strip(targets[0], refs[0], q, k)
  return rows, strip


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", help="trained stage1/stage2 workdirs (the demo's outputs/demo/runs/...)")
  parser.add_argument("--timesteps", type=int, nargs="+", default=[900, 500, 200])
  parser.add_argument("--same", action="store_true", help="the reference is the target frame itself")
  parser.add_argument("--poses", type=int, default=4, help="target poses per held-out identity")
  parser.add_argument("--figure", help="write a PNG: per run, the first pair's target with a query token on its "
                      "head, torso and left leg, and where each attends in the reference (last layer)")
  parser.add_argument("--figure-t", type=int, default=500, help="the timestep of --figure (one of --timesteps)")
  args = parser.parse_args(argv)
  if args.figure and args.figure_t not in args.timesteps:
    raise SystemExit(f"--figure-t {args.figure_t} is not one of --timesteps {args.timesteps}")
  command = " ".join(["python benchmarks/reference_attention.py", *(sys.argv[1:] if argv is None else argv)])
  print(f"`{command}` -- commit {source_commit() or 'unknown'}\n")
  print("| run | t | layer (tokens) | on reference | entropy | own entropy | part match | chance |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|")
  strips = []
  for workdir in args.runs:
    rows, strip = run_rows(workdir, args.timesteps, args.same, args.poses, args.figure_t if args.figure else None)
    print("\n".join(rows), flush=True)
    strips.append(strip)
  if args.figure:
    Image.fromarray(np.concatenate(strips, axis=0)).save(args.figure)
    print(f"\nwrote {args.figure}: a row per run (target, then its head, torso and left-leg queries' attention)")


if __name__ == "__main__":
  main()
