"""`python -m magicpose_jax.animate --checkpoint DIR --reference IMAGE --poses DIR|FILE --out FILE.(mp4|gif|png)`.

Animates one reference image with a pose sequence using a stage-2 MagicPose model: DIR is a training workdir
(its newest step), one step's checkpoint folder, or a `python -m magicpose_jax.convert` export folder. Poses:
a folder of OpenPose JSON files (rendered at the model's size) or of pose images, one such file, or a video
(poses extracted with MediaPipe's models, installed once by `python -m magicpose_jax.pose.models install`, or
with --pose-model, a whole-body ONNX model; see `python -m magicpose_jax.pose.extract`). --align rescales the
driving skeleton to the reference person's proportions (`magicpose_jax.pose.align`; needs a video or JSON poses).
Writes FILE and FILE's `<stem>_side_by_side.<ext>` (reference | pose | generated). A .png output is a strip
of the frames.
Every frame starts from the same noise (the release's behaviour) unless --per-frame-noise.
--base PATH puts the trained controllers over another SD 1.5 derivative's UNet (--base-vae: and its VAE).
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
from tqdm import tqdm

from magicpose_jax import inference
from magicpose_jax.train.validate import user_path


def build_parser() -> argparse.ArgumentParser:
  """The command line (also parsed by the README test)."""
  parser = argparse.ArgumentParser(prog="python -m magicpose_jax.animate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, type=user_path,
                      help="training workdir, step folder, or export folder")
  parser.add_argument("--reference", required=True, type=user_path,
                      help="the reference image (centre square, resized)")
  parser.add_argument("--poses", required=True, type=user_path,
                      help="folder of OpenPose JSON / pose images, one file, or a video")
  parser.add_argument("--out", required=True, type=user_path, help="output .mp4 (H.264, by imageio-ffmpeg's own "
                      "ffmpeg), .gif or .png strip")
  parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
  parser.add_argument("--guidance", type=float, default=7.0,
                      help="classifier-free guidance scale, >= 0 (1: no guidance; default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="initial noise seed (default: %(default)s)")
  parser.add_argument("--batch-frames", type=int, default=8, help="frames denoised together (default: %(default)s)")
  parser.add_argument("--per-frame-noise", action="store_true", help="a different initial noise for each frame")
  parser.add_argument("--no-cache", action="store_true", help="recompute the reference states for every chunk")
  parser.add_argument("--ema", action="store_true", help="a training run's EMA weights (default: raw params)")
  parser.add_argument("--fps", type=float, default=8.0, help="output frame rate (default: %(default)s)")
  parser.add_argument("--pose-model", default=None, type=user_path, help="whole-body ONNX pose model for a video "
                      "--poses (default: MediaPipe's models)")
  parser.add_argument("--align", action="store_true", help="rescale the driving poses to the reference person's "
                      "proportions and place them on the reference")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype (default: %(default)s)")
  add_base_arguments(parser)
  return parser


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
  """--base / --base-vae (animate, convert and the app): another SD 1.5 under the trained controllers."""
  parser.add_argument("--base", default=None, type=user_path, help="another SD 1.5 (a diffusers or our pipeline "
                      "folder, an LDM single file, or a UNet folder) whose UNet replaces the trained base's main "
                      "UNet; the controllers are kept; a different architecture is an error naming the difference")
  parser.add_argument("--base-vae", nargs="?", const="", default=None, metavar="PATH", type=user_path,
                      help="also replace the VAE: with no PATH, --base's; else a VAE folder or an SD pipeline/file")


def base_sources(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str | None, str | None]:
  """(UNet source, VAE source) of --base / --base-vae (a bare --base-vae is --base's VAE)."""
  if args.base_vae == "" and args.base is None:
    parser.error("--base-vae without a PATH takes --base's VAE: give --base, or a PATH to --base-vae")
  return args.base, (args.base if args.base_vae == "" else args.base_vae)


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  base, base_vae = base_sources(parser, args)
  try:
    # The inputs are checked before the (slow) model load.
    options = inference.AnimateOptions(steps=args.steps, guidance=args.guidance, seed=args.seed,
                                       batch_frames=args.batch_frames, per_frame_noise=args.per_frame_noise,
                                       cache=not args.no_cache, dtype=jnp.dtype(args.dtype))
    if args.fps <= 0:
      raise ValueError(f"--fps {args.fps}: expected a frame rate > 0")
    inference.check_output(args.out)
    inference.read_image(args.reference)
    (inference.check_alignable if args.align else inference.pose_files)(args.poses, args.pose_model)
    model = inference.load_model(args.checkpoint, ema=args.ema, base=base, base_vae=base_vae)
    size = model.image_size
    reference, original = inference.load_reference(args.reference, size)
    if args.align:
      poses, report = inference.load_aligned_poses(args.poses, size, inference.read_image(args.reference),
                                                   pose_model=args.pose_model)
      print(f"aligned {report['frames']} frames on frame {report['anchor_frame']}'s proportions; frames without a "
            f"person (drawn blank): {report['no_person'] or 'none'}")
    else:
      poses = inference.load_poses(args.poses, size, canvas=original, pose_model=args.pose_model)
    with tqdm(total=len(poses), unit="frame", desc="animate") as bar:
      frames = inference.animate(model, reference, poses, options, progress=bar.update)
    inference.write_frames(args.out, frames, args.fps)
    side = inference.side_by_side_path(args.out)
    inference.write_frames(side, inference.side_by_side(reference, poses, frames), args.fps)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{len(frames)} frames at {size[0]}x{size[1]}: wrote {args.out} and {side}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
