"""Fidelity benchmark: the full MagicPose and the paper's four ablations, trained on the same synthetic figures and
budget, scored on held-out identities x held-out poses; writes benchmarks/results/fidelity.md.

    python benchmarks/fidelity.py [--out outputs/fidelity] [--scale 1.0] [--fresh] [--reuse outputs/demo]

Variants (shared: the demo's autoencoder and the base UNet, made once, as in the demo):
  full            stage 1 then stage 2 (appearance + pose), sampled with guidance `Budget.guidance`;
  no_appearance   stage 2 without the Appearance Controller (pose net + frozen base), stage1 + stage2 steps;
  no_pose         stage 2 without the Pose Controller, from stage 1 (appearance only), same steps as full;
  no_cfg          the full model sampled with guidance 1 (no classifier-free guidance);
  no_augmentation stage 1 then stage 2 with `data.augment.enabled=False` (centre crops only).

`--scale` multiplies every diffusion training budget (1.0: about an hour on a quiet 2-core CPU; the VAE is
trained as in the demo whatever the scale). The Markdown table has the
commit, seed, budget and wall time; the paper's claims are checked and printed, not tuned for.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time

import jax
import ml_collections
import tqdm

from magicpose_jax import demo
from magicpose_jax.demo import retarget as rt
from magicpose_jax.diffusion.sampler import SamplerConfig
from magicpose_jax.eval.report import source_commit

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fidelity.md")
BENCH = dataclasses.replace(demo.TRAINED_BASE, base_steps=1200, stage1_steps=800, stage2_steps=800,
                            no_appearance_steps=1600, no_pose_steps=800, sample_steps=25, holdout_identities=8,
                            poses_per_identity=8)


def scaled(budget: demo.Budget, scale: float) -> demo.Budget:
  """The diffusion training budgets times `scale`. The autoencoder keeps the demo's budget (the patch autoencoder
  has none; a trained VAE limits every variant by its reconstructions, so a shorter benchmark should not get a
  blurrier one than the demo's)."""
  steps = {f: max(1, round(getattr(budget, f) * scale)) for f in ("base_steps", "stage1_steps", "stage2_steps",
                                                                   "no_appearance_steps", "no_pose_steps")}
  return dataclasses.replace(budget, **steps)


class Fidelity(demo.Demo):
  """The demo's phases plus the no-augmentation runs; every variant evaluated on the same pairs."""

  def training_runs(self) -> list[demo.TrainingRun]:
    runs = super().training_runs()
    # The main stage runs' configs (base, pose net start) with augmentation off.
    (main_stage1,) = [r for r in runs if r.name == "stage1"]
    (main_stage2,) = [r for r in runs if r.name == "stage2"]
    c = ml_collections.ConfigDict(main_stage1.config.to_dict())
    c.data.augment.enabled = False
    stage1 = demo.TrainingRun(5, "no_augmentation_stage1", c, "ablation: stage 1 without data augmentation",
                              main_stage1.after)
    c = ml_collections.ConfigDict(main_stage2.config.to_dict())
    c.init_from = self.path("runs", "no_augmentation_stage1")
    c.data.augment.enabled = False
    stage2 = demo.TrainingRun(5, "no_augmentation", c, "ablation: stage 2 without data augmentation",
                              "no_augmentation_stage1")
    return [*runs, stage1, stage2]

  def variants(self) -> dict[str, str]:
    return {**super().variants(), "no_augmentation": self.path("runs", "no_augmentation")}

  def evaluate_all(self) -> dict[str, dict]:
    b = self.budget
    pairs = rt.holdout_pairs(self.config.data, b.poses_per_identity, b.holdout_identities)
    source = rt.synthetic_source(self.config.data)
    guided = SamplerConfig(num_steps=b.sample_steps, guidance=b.guidance)
    runs = {**self.variants(), "no_cfg": self.path("runs", "stage2")}
    order = ["full", "no_appearance", "no_pose", "no_cfg", "no_augmentation"]
    out = {}
    bar = tqdm.tqdm(total=len(order) * len(pairs), desc="evaluate", unit="identity", dynamic_ncols=True)
    for name in order:
      sampler = dataclasses.replace(guided, guidance=1.0) if name == "no_cfg" else guided
      result = rt.retarget(rt.load_trained(runs[name]), source, pairs, sampler, progress=bar.update)
      out[name] = rt.report(result.metrics)
    bar.close()
    return out


def claims(results: dict[str, dict]) -> dict[str, bool]:
  full = results["full"]
  out = {"identity error: full < no_appearance": full["identity_error"] < results["no_appearance"]["identity_error"],
         "pose mIoU: full > no_pose": full["mean_iou"] > results["no_pose"]["mean_iou"],
         "face L1: full < no_pose": full["face_l1"] < results["no_pose"]["face_l1"]}
  for name in results:
    if name != "full":
      out[f"SSIM: full >= {name}"] = full["ssim"] >= results[name]["ssim"]
  return out


REUSABLE = ("vae", "base_sd", *(os.path.join("runs", n) for n in ("base", "stage1", "stage2", "no_appearance",
                                                                    "no_pose")))


def reuse_demo(demo_out: str, out: str, need_vae: bool = True) -> str:
  """Copies a finished demo's phases (`python -m magicpose_jax.demo --out demo_out`, the same configs/demo.py) into
  `out`: the VAE, the base run and the stage-1/stage-2/ablation runs it has. A copied run counts as done when it
  has at least the budget's steps (`Demo.train_run`), otherwise it is trained further. Copied runs still read their
  base from `demo_out` (runs record absolute paths): keep that folder. `need_vae=False`: the demo trained over a
  pretrained base (no vae/ to copy). Returns a note for the table."""
  copied = []
  for name in REUSABLE:
    src, dst = os.path.join(demo_out, name), os.path.join(out, name)
    if os.path.isdir(src) and not os.path.exists(dst):
      shutil.copytree(src, dst)
      copied.append(os.path.basename(name))
  if need_vae and "vae" not in copied and not os.path.isdir(os.path.join(out, "vae")):
    raise FileNotFoundError(f"--reuse {demo_out}: no vae/ (run the demo there first)")
  return f"Phases taken from the demo run in {demo_out}: {', '.join(copied) or 'none new'}"


def write_markdown(path: str, results: dict[str, dict], budget: demo.Budget, seconds: float, seed: int,
                   scale: float | None, note: str = "", command: str = "") -> str:
  checked = claims(results)
  commit = source_commit() or "unknown"
  lines = [
      "# Fidelity benchmark: MagicPose and its ablations on synthetic figures",
      "",
      f"`{command or f'python benchmarks/fidelity.py --scale {scale}'}` -- commit {commit}, seed {seed}, "
      f"{datetime.date.today().isoformat()}, wall time {seconds / 60:.1f} min on {jax.default_backend()} "
      f"({os.cpu_count()} cores).",
      "",
      f"Held-out identities x held-out poses: {budget.holdout_identities} x {budget.poses_per_identity} images per "
      f"variant, DDIM {budget.sample_steps} steps, guidance {budget.guidance} (no_cfg: 1). Budget (steps, batch "
      f"{budget.batch_size}): VAE {budget.vae_steps}, base {budget.base_steps}, stage 1 {budget.stage1_steps}, "
      f"stage 2 {budget.stage2_steps}, no_appearance {budget.no_appearance_steps} (stage 2 from the base), no_pose "
      + (f"{budget.no_pose_steps} (stage 2 without pose, from stage 1)" if budget.no_pose_steps else
         "= the stage-1 model") + f", no_augmentation {budget.stage1_steps} + {budget.stage2_steps}."
      + (f" {note}." if note else ""),
      "",
      rt.metrics_table({n: {k: r[k] for k, _, _ in rt.SUMMARY_KEYS} for n, r in results.items()}, markdown=True),
      "",
      "Claims of the paper, as measured here:",
      "",
  ]
  lines += [f"- {'holds' if ok else '**does not hold**'}: {claim}" for claim, ok in checked.items()]
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    json.dump({"results": results, "claims": checked, "budget": dataclasses.asdict(budget), "seconds": seconds,
               "seed": seed, "scale": scale, "commit": commit}, f, indent=2)
  return text


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="outputs/fidelity", help="training workdirs (phases are cached here)")
  parser.add_argument("--scale", type=float, default=1.0, help="multiplies every diffusion training budget")
  parser.add_argument("--results", default=RESULTS, help="the Markdown table to write")
  parser.add_argument("--fresh", action="store_true")
  parser.add_argument("--reuse", default="", help="a finished demo output folder whose phases to copy instead of "
                      "training them (each when it has at least the budget's steps)")
  parser.add_argument("--budget", choices=("bench", "demo"), default="bench",
                      help="bench: the benchmark's budget times --scale; demo: the demo's budget (with --reuse of "
                      "the demo's folder only the no-augmentation runs are trained)")
  parser.add_argument("--base-sd", default="",
                      help="train the variants over this pretrained base (`magicpose_jax.demo.pretrain`; e.g. the "
                      "packaged magicpose_jax/demo/pretrained_sd) instead of training a VAE and base here")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.out), "jax_cache"))
  if args.budget == "bench":
    budget = scaled(BENCH, args.scale)
  else:
    budget = demo.DEMO if args.base_sd else demo.TRAINED_BASE
  t0 = time.perf_counter()
  bench = Fidelity(args.out, budget, demo.load_config(), fresh=args.fresh, base_sd=args.base_sd or None)
  note = reuse_demo(args.reuse, args.out, need_vae=not args.base_sd) if args.reuse else ""  # after --fresh's clean-up
  if not args.base_sd:
    bench.train_vae()
  bench.train_all()
  results = bench.evaluate_all()
  command = " ".join(["python benchmarks/fidelity.py", *(sys.argv[1:] if argv is None else argv)])
  print(write_markdown(args.results, results, budget, time.perf_counter() - t0, bench.config.seed,
                       args.scale if args.budget == "bench" else None, note, command))


if __name__ == "__main__":
  main()
