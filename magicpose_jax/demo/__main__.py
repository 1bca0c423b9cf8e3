"""The demo's command line: `python -m magicpose_jax.demo [--out DIR] [--fresh] [--micro]` (also `make demo`)."""

from __future__ import annotations

import argparse
import os

import jax

import magicpose_jax.demo as demo_package
from magicpose_jax.demo import pretrained
from magicpose_jax.demo import retarget as rt
from magicpose_jax.demo.phases import CONFIG_FILE, DEMO, MICRO, MICRO_UNET, TRAINED_BASE, Demo, load_config


def print_report(report: dict) -> None:
  print("\nHeld-out identities retargeted to new poses (mean over images; * = best):")
  print(rt.metrics_table({n: {k: m[k] for k, _, _ in rt.SUMMARY_KEYS} for n, m in report["models"].items()}))
  print(f"ablations: {report['ablations']}")
  for claim, holds in report["claims"].items():
    print(f"  {'holds' if holds else 'DOES NOT HOLD'}: {claim}")
  print("seconds per phase: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items())
        + (f" (cached: {', '.join(report['cached_phases'])})" if report["cached_phases"] else ""))
  print(f"outputs: {report['outputs']['grid']}, {', '.join(report['outputs']['animation'])}")


def build_parser() -> argparse.ArgumentParser:
  """The command line (also parsed by the README test)."""
  parser = argparse.ArgumentParser(prog="python -m magicpose_jax.demo", description=demo_package.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="outputs/demo", help="output folder (phases are cached here)")
  parser.add_argument("--fresh", action="store_true", help="retrain every phase instead of reusing DIR's")
  parser.add_argument("--micro", action="store_true", help="a few steps per phase (the smoke test's size)")
  parser.add_argument("--base-sd", default=None,
                      help="the pretrained tiny SD the stages train over: a folder written by `python -m "
                      "magicpose_jax.demo.pretrain` (default: the packaged one, magicpose_jax/demo/pretrained_sd; "
                      "with --micro: none, the micro run trains its own)")
  parser.add_argument("--train-base", action="store_true",
                      help="train the VAE and base in this run instead (phases vae and base), for less time each")
  parser.add_argument("--config", default=CONFIG_FILE, help="training config file or packaged name (default: demo)")
  parser.add_argument("--jobs", type=int, default=2,
                      help="phases run at once where they do not depend on each other (the no-appearance ablation "
                      "beside stage 1/2, each evaluation beside training; their output interleaves). One training "
                      "process keeps ~1.4 of 2 cores busy: the full demo's phases took 10.1 min with 2 against "
                      "12.2 with 1 (default: 2)")
  parser.add_argument("--jax-cache", default="", help="persistent compilation cache folder (default DIR/jax_cache)")
  parser.add_argument("--no-jax-cache", action="store_true",
                      help="no persistent compilation cache (writing it costs ~2 s a run that only pays back later)")
  return parser


def main(argv: list[str] | None = None) -> dict:
  args = build_parser().parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if not args.no_jax_cache:
    # A compilation cache in the output folder: a second run (or the next phase of the same shape) compiles less.
    jax.config.update("jax_compilation_cache_dir", args.jax_cache or os.path.join(os.path.abspath(args.out),
                                                                                    "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if args.train_base and args.base_sd:
    raise SystemExit("--train-base and --base-sd: choose one (train the base here, or train over a pretrained one)")
  config = load_config(args.config)
  if args.micro:  # the packaged base's UNet compiles for longer than a micro run over its own micro base takes
    demo = Demo(args.out, MICRO, config, args.fresh, MICRO_UNET, base_sd=args.base_sd)
  elif args.train_base:
    demo = Demo(args.out, TRAINED_BASE, config, args.fresh)
  else:
    demo = Demo(args.out, DEMO, config, args.fresh, base_sd=args.base_sd or pretrained.PACKAGED_BASE)
  report = demo.run(args.jobs)
  print_report(report)
  return report


if __name__ == "__main__":
  main()
