"""`python -m magicpose_jax.app --checkpoint RUN [--port 7860] [--outputs outputs/app]`: the web app (docs/app.md).

Serves a page at http://HOST:PORT/ to upload a reference photo and a driving video (or OpenPose JSON files), see
the extracted and aligned poses next to the reference, animate with a progress bar, and play or download the
mp4. Jobs and their results are kept under --outputs (`jobs/<id>/`); a job's page is `/?job=<id>`. The model is
loaded once, in the background; one job runs at a time, the others wait in order.
"""

from __future__ import annotations

import argparse
import os
import sys

from magicpose_jax.animate import add_base_arguments, base_sources
from magicpose_jax.app.server import AppServer
from magicpose_jax.app.studio import AppConfig, Studio

DEFAULTS = AppConfig()


def build_parser() -> argparse.ArgumentParser:
  """The command line (also parsed by the README test)."""
  parser = argparse.ArgumentParser(prog="python -m magicpose_jax.app", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=DEFAULTS.checkpoint,
                      help="stage-2 training workdir, step folder, or export folder (default: the demo's model)")
  parser.add_argument("--outputs", default=DEFAULTS.outputs, help="where jobs and their results are kept")
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
  parser.add_argument("--port", type=int, default=7860)
  parser.add_argument("--ema", action="store_true", help="a training run's EMA weights")
  parser.add_argument("--steps", type=int, default=DEFAULTS.steps, help="the page's default DDIM steps")
  parser.add_argument("--guidance", type=float, default=DEFAULTS.guidance, help="the page's default guidance")
  parser.add_argument("--fps", type=float, default=DEFAULTS.fps, help="default driving frames per second")
  parser.add_argument("--max-frames", type=int, default=DEFAULTS.max_frames, help="default frame limit")
  parser.add_argument("--batch-frames", type=int, default=DEFAULTS.batch_frames, help="frames denoised together")
  parser.add_argument("--verbose", action="store_true", help="log every request")
  add_base_arguments(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  base, base_vae = base_sources(parser, args)
  if not os.path.isdir(args.checkpoint):
    print(f"error: --checkpoint {args.checkpoint}: no such folder (a stage-2 training workdir or export folder; "
          f"`make demo` trains outputs/demo/runs/stage2)", file=sys.stderr)
    return 2
  config = AppConfig(checkpoint=args.checkpoint, outputs=args.outputs, ema=args.ema, base=base, base_vae=base_vae,
                     steps=args.steps, guidance=args.guidance, fps=args.fps, max_frames=args.max_frames,
                     batch_frames=args.batch_frames)
  studio = Studio(config)
  server = AppServer(studio, args.host, args.port, verbose=args.verbose)
  studio.start()
  print(f"serving {server.url} (model {args.checkpoint}; jobs in {os.path.abspath(args.outputs)}); Ctrl-C stops",
        flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
