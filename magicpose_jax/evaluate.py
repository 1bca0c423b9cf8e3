"""Evaluates generated frames against ground truth: `python -m magicpose_jax.evaluate --pred DIR --gt DIR`.

Frames pair by file name (path under the folder without suffix). Writes OUT/report.json and OUT/report.md
(means, per-frame values, resolution, frame count, frame rate, metric settings, package versions). LPIPS and FID
read local weights from --weights DIR and are skipped with a message naming the files when those are missing.
"""

from __future__ import annotations

import argparse
import sys

from magicpose_jax.eval.report import DEFAULT_METRICS, METRICS, evaluate_folders, write_report
from magicpose_jax.train.validate import user_path


def build_parser() -> argparse.ArgumentParser:
  """The command line (also parsed by the README test)."""
  parser = argparse.ArgumentParser(prog="python -m magicpose_jax.evaluate", description=__doc__.splitlines()[0])
  parser.add_argument("--pred", required=True, type=user_path, help="folder of generated frames")
  parser.add_argument("--gt", required=True, type=user_path, help="folder of ground-truth frames (same names)")
  parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                      help=f"comma-separated, of {','.join(METRICS)} (default: %(default)s)")
  parser.add_argument("--weights", default=None, type=user_path, help="folder with the LPIPS / FID weight files")
  parser.add_argument("--out", default="report", type=user_path,
                      help="output folder for report.json and report.md (default: %(default)s)")
  parser.add_argument("--fps", type=float, default=None, help="frame rate of the videos, recorded in the report")
  parser.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"), help="LPIPS backbone (default: "
                      "%(default)s)")
  parser.add_argument("--batch-size", type=int, default=16, help="frames per metric batch (default: %(default)s)")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    report = evaluate_folders(args.pred, args.gt, [m.strip() for m in args.metrics.split(",") if m.strip()],
                              weights_dir=args.weights, fps=args.fps, lpips_net=args.lpips_net,
                              batch_size=args.batch_size)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, why in report["skipped"].items():
    print(f"{name}: {why}", file=sys.stderr)
  json_path, md_path = write_report(report, args.out)
  print(", ".join(f"{k} {v:.6g}" for k, v in report["metrics"].items()) + f" ({report['num_frames']} frames)")
  print(f"wrote {json_path} and {md_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
