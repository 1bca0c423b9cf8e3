"""Fidelity benchmark: the full MagicPose and the paper's four ablations, trained on the same synthetic figures and
budget, scored on held-out identities x held-out poses; writes benchmarks/results/fidelity.md.

    python benchmarks/fidelity.py [--out outputs/fidelity] [--scale 1.0] [--fresh] [--reuse outputs/demo]
        [--base-sd magicpose_jax/demo/pretrained_sd] [--seed 0] [--sampling-seeds 0 1 2]
    python benchmarks/fidelity.py --combine A.json B.json --results OUT.md   # several training seeds together

Variants (shared: the demo's autoencoder and the base UNet, made once, as in the demo):
  full            stage 1 then stage 2 (appearance + pose), sampled with guidance `Budget.guidance`;
  no_appearance   stage 2 without the Appearance Controller (pose net + frozen base), stage1 + stage2 steps;
  no_pose         stage 2 without the Pose Controller, from stage 1 (appearance only), same steps as full;
  no_cfg          the full model sampled with guidance 1 (no classifier-free guidance);
  no_augmentation stage 1 then stage 2 with `data.augment.enabled=False` (centre crops only).

`--scale` multiplies every diffusion training budget (1.0: about an hour on a quiet 2-core CPU; the VAE is
trained as in the demo whatever the scale). The Markdown table has the
commit, seed, budget and wall time; the paper's claims are checked and printed, not tuned for.

Spread: `--seed` is the training seed (`config.seed`: inits, data order, noise), `--sampling-seeds` re-sample
every variant from other initial noise (seed 0 is the demo's own draw). With several sampling seeds the table
shows mean (min..max), and each claim its smallest margin over the seeds against the larger seed-to-seed range
of the two variants compared. `--combine` reads the JSONs of runs at other training seeds (the same sampling
seeds) and judges each claim over every (training, sampling) seed pair the same way.
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
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from magicpose_jax import demo
from magicpose_jax.demo import retarget as rt
from magicpose_jax.diffusion.sampler import SamplerConfig
from magicpose_jax.eval import claims
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

  def evaluate_all(self, seeds: Sequence[int] = (0,)) -> dict[str, list[dict]]:
    """Every variant on the held-out pairs at each sampling seed: variant -> [`rt.report`, one per seed]."""
    b = self.budget
    pairs = rt.holdout_pairs(self.config.data, b.poses_per_identity, b.holdout_identities)
    source = rt.synthetic_source(self.config.data)
    guided = SamplerConfig(num_steps=b.sample_steps, guidance=b.guidance)
    runs = {**self.variants(), "no_cfg": self.path("runs", "stage2")}
    out = {}
    bar = tqdm.tqdm(total=len(ORDER) * len(pairs) * len(seeds), desc="evaluate", unit="identity",
                    dynamic_ncols=True)
    for name in ORDER:
      sampler = dataclasses.replace(guided, guidance=1.0) if name == "no_cfg" else guided
      model = rt.load_trained(runs[name])
      out[name] = [rt.report(rt.retarget(model, source, pairs, sampler, seed=rt.sampling_seed(seed),
                                         progress=bar.update).metrics) for seed in seeds]
    bar.close()
    return out


ORDER = ("full", "no_appearance", "no_pose", "no_cfg", "no_augmentation")


def _cell(values: list[float], digits: int) -> str:
  mean = f"{np.mean(values):.{digits}f}"
  return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def spread_table(runs: dict[str, list[dict]]) -> str:
  """A Markdown table: per variant the mean (min..max) over its runs of `rt.MARKDOWN_COLUMNS`."""
  lines = [rt.markdown_header(["variant"])]
  for name, reports in runs.items():
    columns = zip(*(rt.markdown_values(r) for r in reports), strict=True)
    cells = [_cell(list(values), 2 if i == 0 else 3) for i, values in enumerate(columns)]  # PSNR, then the rest
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


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


def write_markdown(path: str, runs: dict[str, list[dict]], budget: demo.Budget, seconds: float, seed: int,
                   scale: float | None, note: str = "", command: str = "",
                   sampling_seeds: Sequence[int] = (0,)) -> str:
  """Writes the table and claims of one training seed's `Fidelity.evaluate_all` to `path` (Markdown) and beside
  it the same with every report as JSON (`--combine` reads it); returns the Markdown."""
  judged = claims.judge(runs, claims.ABLATION_CLAIMS)
  commit = source_commit() or "unknown"
  lines = [
      "# Fidelity benchmark: MagicPose and its ablations on synthetic figures",
      "",
      f"`{command or f'python benchmarks/fidelity.py --scale {scale}'}` -- commit {commit}, training seed {seed}, "
      f"sampling seeds {list(sampling_seeds)}, {datetime.date.today().isoformat()}, wall time {seconds / 60:.1f} min "
      f"on {jax.default_backend()} ({os.cpu_count()} cores).",
      "",
      f"Held-out identities x held-out poses: {budget.holdout_identities} x {budget.poses_per_identity} images per "
      f"variant, DDIM {budget.sample_steps} steps, guidance {budget.guidance} (no_cfg: 1). Budget (steps, batch "
      f"{budget.batch_size}): VAE {budget.vae_steps}, base {budget.base_steps}, stage 1 {budget.stage1_steps}, "
      f"stage 2 {budget.stage2_steps}, no_appearance {budget.no_appearance_steps} (stage 2 from the base), no_pose "
      + (f"{budget.no_pose_steps} (stage 2 without pose, from stage 1)" if budget.no_pose_steps else
         "= the stage-1 model") + f", no_augmentation {budget.stage1_steps} + {budget.stage2_steps}."
      + (f" {note}." if note else ""),
      "",
      spread_table(runs),
      "",
      "Claims of the paper, as measured here" + (" (margins and spreads over the sampling seeds):"
                                                 if len(sampling_seeds) > 1 else ":"),
      "",
      *claims.verdict_lines(judged),
  ]
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    json.dump({"runs": runs, "claims": judged, "budget": dataclasses.asdict(budget), "seconds": seconds,
               "seed": seed, "sampling_seeds": list(sampling_seeds), "scale": scale, "commit": commit,
               "command": command}, f, indent=2)
  return text


def combine(paths: Sequence[str], out: str) -> str:
  """Judges the claims over the runs of several `write_markdown` JSONs (other training seeds, the same sampling
  seeds and budget); writes the Markdown to `out` and returns it."""
  records = []
  for path in paths:
    with open(path) as f:
      record = json.load(f)
    if "runs" not in record:
      raise ValueError(f"--combine {path}: no 'runs' (a JSON written by this script with --sampling-seeds)")
    records.append(record)
  for path, record in zip(paths[1:], records[1:], strict=True):
    for key in ("budget", "sampling_seeds"):
      if record[key] != records[0][key]:
        raise ValueError(f"--combine: {path} has {key} {record[key]}, {paths[0]} has {records[0][key]}")
  variants = list(records[0]["runs"])
  runs = {name: [r for record in records for r in record["runs"][name]] for name in variants}
  per_seed = [claims.judge(record["runs"], claims.ABLATION_CLAIMS) for record in records]
  within = [max(judged[i]["spread"] for judged in per_seed) for i in range(len(claims.ABLATION_CLAIMS))]
  judged = claims.judge(runs, claims.ABLATION_CLAIMS)
  seeds = [record["seed"] for record in records]
  lines = [
      "# Fidelity benchmark over training seeds",
      "",
      *(f"- training seed {r['seed']}: `{r.get('command', '')}` -- commit {r['commit']}, "
        f"{r['seconds'] / 60:.1f} min" for r in records),
      "",
      f"Every variant over training seeds {seeds} x sampling seeds {records[0]['sampling_seeds']}, mean (min..max):",
      "",
      spread_table(runs),
      "",
      "Claims of the paper: the smallest margin over all the runs against the larger range of the two variants over "
      "all the runs (the sampling-only range, the largest within one training seed, in brackets):",
      "",
      *(f"{line} [within one training seed: {spread:.3f}]"
        for line, spread in zip(claims.verdict_lines(judged), within, strict=True)),
  ]
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
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
  parser.add_argument("--seed", type=int, default=None,
                      help="the training seed (config.seed: inits, data order, noise); default configs/demo.py's")
  parser.add_argument("--sampling-seeds", type=int, nargs="+", default=[0],
                      help="sample every variant at each of these seeds (0: the demo's own draw)")
  parser.add_argument("--combine", nargs="+", default=[], metavar="JSON",
                      help="judge the claims over these runs' JSONs (other training seeds) into --results; trains "
                      "and samples nothing")
  args = parser.parse_args(argv)
  if args.combine:
    print(combine(args.combine, args.results))
    return
  if len(set(args.sampling_seeds)) != len(args.sampling_seeds) or min(args.sampling_seeds) < 0:
    parser.error(f"--sampling-seeds must be distinct and >= 0, got {args.sampling_seeds}")
  config = demo.load_config()
  if args.seed is not None:
    config.seed = args.seed
  os.makedirs(args.out, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.out), "jax_cache"))
  if args.budget == "bench":
    budget = scaled(BENCH, args.scale)
  else:
    budget = demo.DEMO if args.base_sd else demo.TRAINED_BASE
  t0 = time.perf_counter()
  bench = Fidelity(args.out, budget, config, fresh=args.fresh, base_sd=args.base_sd or None)
  note = reuse_demo(args.reuse, args.out, need_vae=not args.base_sd) if args.reuse else ""  # after --fresh's clean-up
  if not args.base_sd:
    bench.train_vae()
  bench.train_all()
  runs = bench.evaluate_all(args.sampling_seeds)
  command = " ".join(["python benchmarks/fidelity.py", *(sys.argv[1:] if argv is None else argv)])
  print(write_markdown(args.results, runs, budget, time.perf_counter() - t0, bench.config.seed,
                       args.scale if args.budget == "bench" else None, note, command, args.sampling_seeds))


if __name__ == "__main__":
  main()
