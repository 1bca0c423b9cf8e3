"""`python -m magicpose_jax.demo.pretrain [--out DIR] [--continue-from PREV] [--micro]`: trains the demo's
"pretrained SD" from scratch (or PREV's further); `--finetune-decoder SD_DIR --out DIR` trains only the VAE decoder
of a finished base folder further (`finetune_decoder_of`).

What made the packaged base (`demo/pretrained.py`, `magicpose_jax/demo/pretrained_sd/`), and what makes another:

  1. vae      the tiny VAE (factor 4: 64 px figures -> 16 x 16 latents) on `PRETRAIN.vae_images` training figures;
  2. decoder  the VAE's decoder trained further alone, its encoder frozen (`PRETRAIN.decoder_steps` on
              `PRETRAIN.decoder_images` figures, the heads' pixels weighted `1 + decoder_head_weight`, the latents
              noised by `decoder_latent_noise`), as SD's ft-MSE VAE was: sharper reconstructions in the same
              latent space (`autoencoder.finetune_decoder`);
  3. base     the tiny UNet trained as SD on the figures (`PRETRAIN.base_steps`), `PRETRAIN.base_reference_share`
              of each batch reference-only (`train/config.py` `base_reference_share`): the UNet's self-attention
              also reads its own states of another frame of the same person. A plain base never learns to match
              body parts across images, which is what the Appearance Controller's attention needs from SD
              (docs/demo.md);
  4. pose     an OpenPose ControlNet over the exported, frozen base (`PRETRAIN.pose_steps`): pose image -> figure,
              no reference (the demo's no-appearance run). The stages' pose nets start from it (`pose_init=
              "controlnet"`), as the release's start from ControlNet 1.1 OpenPose over SD 1.5;
  5. export   DIR/sd: the trained base, with the decoder phase's VAE, as a diffusers pipeline folder, its ControlNet
              in DIR/sd/controlnet, and `pretrain.json` (how it was made, its VAE's reconstruction scores, the
              sha256 of every file).

Then `python -m magicpose_jax.demo --base-sd DIR/sd` trains MagicPose's stages over it (the demo's default is the
packaged one). Phases are cached in DIR as the demo's are (`--fresh` retrains). The packaged base is three runs:
one from scratch, then `--continue-from` it twice (VAE and decoder reused, base 10000 more steps from the previous
UNet each time, a new ControlNet; the decoder phase, newer than the first two runs, ran in the third). On 2 CPU
cores its VAE took 18 minutes (beside a second pretrain), its decoder 23, its base 47 + 38 + about 29 minutes, its
ControlNet 16 minutes. Its ControlNet then trained 2 x 5000 more steps on the supersampled pose maps that
configs/demo.py draws since (`pretrain.json`'s `controlnet_continued` has the commands); a new pretrain's pose
phase trains on those maps from the start. Its decoder phase ran before the head weight and the latent noise; the
decoder then trained 3000 more steps with the head weight, then 3000 with both (`--finetune-decoder`,
`decoder_continued`), as a new pretrain's decoder phase trains from the start. Last, since configs/demo.py draws
1.6x heads, its UNet trained 2 x 10000 more steps on them (`unet_continued`; 56 + 50 minutes), its ControlNet
2 x 5000 (17 + 19 minutes) and its decoder 2 x 3000 (12 + 17 minutes); a new pretrain draws them from the start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import ml_collections
import tqdm

from magicpose_jax.convert.controlnet import save_controlnet
from magicpose_jax.convert.stable_diffusion import COMPONENTS, save_stable_diffusion
from magicpose_jax.convert.vae import load_vae, save_vae
from magicpose_jax.demo import autoencoder, pretrained
from magicpose_jax.demo.phases import (
    MICRO,
    MICRO_UNET,
    SETUP_FILE,
    Budget,
    Demo,
    load_config,
    training_figures_and_heads,
    training_figures_and_parts,
)
from magicpose_jax.eval.report import source_commit
from magicpose_jax.export import load_run
from magicpose_jax.models.unet import UNetConfig

# The packaged base's budget: ~4x the demo's former in-demo VAE training and 25x its former 400-step plain base.
# Its decoder phase weighs the loss inside the heads 5x and learns from noisy latents (`decoder_head_weight`,
# `decoder_latent_noise`; the packaged decoder was trained without them, then `--finetune-decoder` with them).
PRETRAIN = Budget(vae_steps=3000, vae_images=4096, decoder_steps=10000, decoder_head_weight=4.0,
                  decoder_latent_noise=0.2, base_steps=10000, base_reference_share=0.5, pose_steps=5000)
MICRO_PRETRAIN = dataclasses.replace(MICRO, base_reference_share=0.5, pose_steps=1, decoder_steps=2, decoder_images=8,
                                     decoder_head_weight=4.0, decoder_latent_noise=0.2)
# `--finetune-decoder`: a finished base's decoder trained this much more (3000 steps: 10 minutes on 2 CPU cores).
FINETUNE_DECODER = dataclasses.replace(PRETRAIN, decoder_steps=3000)
MICRO_FINETUNE_DECODER = dataclasses.replace(MICRO_PRETRAIN, decoder_steps=2)


# `--tune-encoder`: a finished base's encoder and decoder trained together on 4096 figures, the heads' pixels
# weighted 1 + 4 and the eyes' 1 + 4 + 20, the latents anchored (`autoencoder.tune_autoencoder`; 3000 steps: 17
# minutes on 2 CPU cores). The 4-channel latents of an encoder trained by the plain mean drop a 64 px figure's eyes.
TUNE_ENCODER = autoencoder.EncoderTuning(steps=3000)
MICRO_TUNE_ENCODER = autoencoder.EncoderTuning(steps=2, batch_size=2)
TUNE_ENCODER_IMAGES, MICRO_TUNE_ENCODER_IMAGES = 4096, 8
TUNE_HEAD_WEIGHT, TUNE_EYE_WEIGHT = 4.0, 20.0


def pretrain_config() -> ml_collections.ConfigDict:
  """The demo's training config (configs/demo.py), whose learning rate decays to 0 by cosine over each run's
  steps: the shipped weights are a finished model, not a snapshot at the peak rate."""
  c = load_config()
  c.optimizer.schedule = "cosine"  # configs/demo.py's too; stated here because the packaged base depends on it
  return c


CONTINUATION = "continue.json"  # in DIR: the folder a continued pretrain started from (`--continue-from`)
# Budget fields that make the VAE phase: a continuation reuses its folder's VAE only when they are the same.
VAE_FIELDS = ("autoencoder", "vae_steps", "vae_images", "latent_channels")
# ... and the decoder phase's: a continuation reuses the fine-tuned decoder too when they are also the same.
DECODER_FIELDS = ("decoder_steps", "decoder_images", "decoder_head_weight", "decoder_latent_noise")
DECODER = "decoder"  # in DIR: the VAE with its fine-tuned decoder (an `autoencoder.save_autoencoder` folder)


def check_continuation(demo: Demo, previous: str) -> None:
  """Refuses a folder whose trained base phase continued another pretrain than `previous` ("": none), so a cached
  base run is never reused under the wrong provenance; then records `previous` in DIR/continue.json."""
  path = demo.path(CONTINUATION)
  if os.path.isdir(demo.path("runs", "base")):  # a base phase (finished or not) is there to be reused
    recorded = ""
    if os.path.isfile(path):
      with open(path) as f:
        recorded = json.load(f)["from"]
    if recorded != previous:
      raise ValueError(f"{demo.out}: its base phase continued {recorded or 'nothing (trained from scratch)'}; this "
                       f"command continues {previous or 'nothing'}: use another --out, or --fresh")
  with open(path, "w") as f:
    json.dump({"from": previous}, f)


def continue_from_folder(demo: Demo, previous: str) -> dict[str, Any]:
  """Sets `demo`'s folder up to continue the pretrain in `previous` (a folder this command finished): checks that
  its VAE budget is this one's and copies its VAE phase. Returns `previous`'s manifest."""
  manifest = pretrained.check_base_sd(os.path.join(previous, "sd"))
  with open(os.path.join(previous, SETUP_FILE)) as f:
    before = json.load(f)["budget"]
  changed = [k for k in VAE_FIELDS if before.get(k) != getattr(demo.budget, k)]
  if changed:
    raise ValueError(f"--continue-from {previous}: its VAE was trained with another budget ({', '.join(changed)}); a "
                     f"continuation keeps the VAE its base was trained over")
  names = ["vae", "base_sd"]
  # A folder from before a field existed was trained at its default.
  if all(before.get(k, getattr(Budget(), k)) == getattr(demo.budget, k) for k in DECODER_FIELDS):
    names.append(DECODER)
  for name in names:
    if os.path.isdir(os.path.join(previous, name)) and not os.path.isdir(demo.path(name)):
      shutil.copytree(os.path.join(previous, name), demo.path(name))
  return manifest


def train_decoder(demo: Demo) -> tuple[dict[str, Any], dict[str, float]]:
  """The decoder phase: DIR/vae's VAE with its decoder trained `budget.decoder_steps` more steps alone (cached in
  DIR/decoder); returns (VAE params, {"loss": the last steps' mean}). With `decoder_steps=0`, DIR/vae's own."""
  folder = demo.path(DECODER)
  if not demo.budget.decoder_steps:
    return autoencoder.load_autoencoder(demo.path("vae"))[1], {}
  if autoencoder.is_saved_autoencoder(folder):
    demo.cached.append(DECODER)
    with open(os.path.join(folder, "training.json")) as f:
      return autoencoder.load_autoencoder(folder)[1], json.load(f)
  config, params = autoencoder.load_autoencoder(demo.path("vae"))
  params, metrics = _finetune_decoder(config, params, demo.config.data, demo.budget)
  shutil.rmtree(folder, ignore_errors=True)
  autoencoder.save_autoencoder(folder, config, params, metrics)
  return params, metrics


def _finetune_decoder(config: autoencoder.VAEConfig, params: dict[str, Any], data: ml_collections.ConfigDict,
                      budget: Budget) -> tuple[dict[str, Any], dict[str, float]]:
  """`autoencoder.finetune_decoder` on `budget.decoder_images` training figures of `data`, with a progress bar."""
  images, heads = training_figures_and_heads(data, budget.decoder_images)
  bar = tqdm.tqdm(total=budget.decoder_steps, desc="decoder", unit="step", dynamic_ncols=True)

  def progress(step: int, report: dict) -> None:
    bar.update(1)
    if report:
      bar.set_postfix(loss=f"{report['loss']:.4f}", refresh=False)

  training = autoencoder.DecoderTraining(steps=budget.decoder_steps, head_weight=budget.decoder_head_weight,
                                         latent_noise=budget.decoder_latent_noise)
  params, metrics = autoencoder.finetune_decoder(config, params, images, training, progress, heads)
  bar.close()
  return params, metrics


def finetune_decoder_of(base_sd: str, out: str, budget: Budget = FINETUNE_DECODER,
                        config: ml_collections.ConfigDict | None = None, command: str = "") -> str:
  """Writes `out/sd`: a copy of the pretrained base folder `base_sd` whose VAE decoder trained `budget.
  decoder_steps` more steps alone (`decoder_head_weight`, `decoder_latent_noise`, `decoder_images`); returns its
  path.

  The encoder (the latent space), the UNet and the ControlNet stay bit for bit, so every model trained over
  `base_sd` (the demo's stages) still fits it, as the decoder phase's own. The manifest keeps `base_sd`'s record
  and adds the run to `decoder_continued`, with the sha256 of every file as it now is.
  """
  manifest, config, folder = _new_vae_folder(base_sd, out, config)
  start = time.perf_counter()
  vae_config, params = load_vae(os.path.join(base_sd, "vae"))
  params, scores = _finetune_decoder(vae_config, params, config.data, budget)
  _write_vae_folder(base_sd, folder, manifest, vae_config, params, "decoder_continued", {
      "command": command or f"python -m magicpose_jax.demo.pretrain --finetune-decoder {base_sd} --out {out}",
      "commit": source_commit(), "steps": budget.decoder_steps, "images": budget.decoder_images,
      "head_weight": budget.decoder_head_weight, "latent_noise": budget.decoder_latent_noise,
      "head_scale": float(config.data.synthetic.head_scale), "eye_scale": float(config.data.synthetic.eye_scale),
      "loss": scores.get("loss"),
      "seconds": round(time.perf_counter() - start, 1)})
  return folder


def _new_vae_folder(base_sd: str, out: str, config: ml_collections.ConfigDict | None
                    ) -> tuple[dict[str, Any], ml_collections.ConfigDict, str]:
  """(`base_sd`'s checked manifest, `config` or the pretrain's, `out/sd`) for a command that rewrites only the VAE
  of a finished base; an existing `out/sd` is refused before any training."""
  manifest = pretrained.check_base_sd(base_sd)
  config = config if config is not None else pretrain_config()
  folder = os.path.join(out, "sd")
  if os.path.exists(folder):
    raise FileExistsError(f"{folder} exists: pass another --out (nothing is overwritten)")
  return manifest, config, folder


def _write_vae_folder(base_sd: str, folder: str, manifest: dict[str, Any], vae_config: autoencoder.VAEConfig,
                      params: dict[str, Any], record: str, run: dict[str, Any]) -> None:
  """Writes `folder`: a copy of `base_sd` with the VAE `params`, its manifest `manifest`'s record plus `run`
  appended to the list `record`, and the sha256 of every file as it now is."""
  shutil.copytree(base_sd, folder)
  written = save_vae(vae_config, params, os.path.join(folder, "vae"))
  stale = set(os.listdir(os.path.join(folder, "vae"))) - set(written)
  if stale:
    raise ValueError(f"{folder}/vae: {sorted(stale)} from {base_sd} not rewritten by save_vae")
  info = {k: v for k, v in manifest.items() if k not in ("files", "sha256")}
  info[record] = [*info.get(record, []), run]
  pretrained.write_manifest(folder, info)


def tune_encoder_of(base_sd: str, out: str, training: autoencoder.EncoderTuning = TUNE_ENCODER,
                    images: int = TUNE_ENCODER_IMAGES, config: ml_collections.ConfigDict | None = None,
                    command: str = "") -> str:
  """Writes `out/sd`: a copy of the pretrained base folder `base_sd` whose VAE (encoder and decoder) trained
  `training.steps` more steps with the heads and eyes weighted (`TUNE_HEAD_WEIGHT`, `TUNE_EYE_WEIGHT`) and the
  latents anchored; returns its path.

  The latent space moves by a few percent, so the UNet and ControlNet should be continued on it (`train --config
  configs/demo.py --config.stage=base --config.base.path=OUT/sd ...`) before the demo's stages train over it. The
  manifest keeps `base_sd`'s record and adds the run to `encoder_tuned`, with the sha256 of every file as it now is.
  """
  manifest, config, folder = _new_vae_folder(base_sd, out, config)
  start = time.perf_counter()
  vae_config, params = load_vae(os.path.join(base_sd, "vae"))
  figures, heads, eyes = training_figures_and_parts(config.data, images)
  weights = 1.0 + TUNE_HEAD_WEIGHT * heads + TUNE_EYE_WEIGHT * eyes
  bar = tqdm.tqdm(total=training.steps, desc="encoder", unit="step", dynamic_ncols=True)

  def progress(step: int, report: dict) -> None:
    bar.update(1)
    if report:
      bar.set_postfix(loss=f"{report['loss']:.4f}", drift=f"{report['drift']:.3f}", refresh=False)

  params, scores = autoencoder.tune_autoencoder(vae_config, params, figures, weights, training, progress)
  bar.close()
  _write_vae_folder(base_sd, folder, manifest, vae_config, params, "encoder_tuned", {
      "command": command or f"python -m magicpose_jax.demo.pretrain --tune-encoder {base_sd} --out {out}",
      "commit": source_commit(), "steps": training.steps, "images": images, "lr": training.lr,
      "anchor": training.anchor, "head_weight": TUNE_HEAD_WEIGHT, "eye_weight": TUNE_EYE_WEIGHT,
      "head_scale": float(config.data.synthetic.head_scale), "eye_scale": float(config.data.synthetic.eye_scale),
      **scores, "seconds": round(time.perf_counter() - start, 1)})
  return folder


def pretrain(out: str, budget: Budget = PRETRAIN, config: ml_collections.ConfigDict | None = None,
             fresh: bool = False, unet: UNetConfig | None = None, command: str = "", continue_from: str = "") -> str:
  """Trains (or reuses) the VAE, base and pose phases in `out` and writes `out/sd`; returns that folder's path.

  `unet`: the base UNet's architecture (default: `config.model.unet`'s variant). `command`: recorded in the
  manifest. `continue_from`: a folder this command wrote before, with the same VAE budget: its VAE is reused and
  the base run starts from its trained UNet (`init_from`) for `budget.base_steps` more steps, the learning rate
  warmed up and decayed again (a warm restart); the ControlNet trains from scratch over the continued base.
  """
  config = config if config is not None else pretrain_config()
  demo = Demo(out, budget, config, fresh, unet)
  continue_from = os.path.abspath(continue_from) if continue_from else ""
  check_continuation(demo, continue_from)
  previous = continue_from_folder(demo, continue_from) if continue_from else None
  seconds = {}
  start = time.perf_counter()
  demo.train_vae()
  seconds["vae"] = round(time.perf_counter() - start, 1)
  start = time.perf_counter()
  vae_params, decoder_scores = train_decoder(demo)
  seconds["decoder"] = round(time.perf_counter() - start, 1)
  (base,) = [r for r in demo.training_runs() if r.name == "base"]
  if previous is not None:
    base.config.init_from = os.path.join(continue_from, "runs", "base")
  start = time.perf_counter()
  demo.train_run(base.index, base.name, base.config, base.text)
  seconds["base"] = round(time.perf_counter() - start, 1)
  model = load_run(demo.path("runs", "base"))
  folder = demo.path("sd")
  shutil.rmtree(folder, ignore_errors=True)
  # The base run trained over DIR/vae's VAE; its encoder (the latent space) is the fine-tuned decoder's.
  save_stable_diffusion(model.sd, {**{k: model.params[k] for k in COMPONENTS}, "vae": vae_params}, folder)
  if budget.pose_steps:
    # The ControlNet trains over the exported base (bit-identical to the run's), as ControlNet 1.1 OpenPose
    # trained over the released SD 1.5: pose image -> figure, the empty prompt, no reference.
    c = demo.run_config("stage2", budget.pose_steps, use_appearance=False)
    c.base.path = folder
    start = time.perf_counter()
    demo.train_run(3, "pose", c, "OpenPose ControlNet over the frozen base (pose -> figure, no reference)")
    seconds["pose"] = round(time.perf_counter() - start, 1)
    pose = load_run(demo.path("runs", "pose"))
    save_controlnet(pose.model.pose, pose.params["pose"], os.path.join(folder, pretrained.CONTROLNET))
  with open(demo.path("base_sd", "demo_base.json")) as f:
    vae_scores = {k: v for k, v in json.load(f).items() if k in ("l1", "mse", "kl")}
  pretrained.write_manifest(folder, {
      "what": "the magicpose_jax demo's pretrained tiny SD (demo/pretrained.py)",
      "command": command or f"python -m magicpose_jax.demo.pretrain --out {out}",
      "commit": source_commit(), "jax": jax.__version__, "backend": jax.default_backend(),
      "budget": {k: v for k, v in dataclasses.asdict(budget).items()
                 if k in ("vae_steps", "vae_images", "latent_channels", "base_steps", "base_reference_share",
                          "pose_steps", "decoder_steps", "decoder_images", "decoder_head_weight",
                          "decoder_latent_noise", "batch_size", "autoencoder")},
      "config": config.to_dict(), "step": model.info["step"], "vae_reconstruction": vae_scores,
      "decoder_training": decoder_scores,
      # The chain of base runs this one continued, oldest first, and the UNet's training steps in all.
      "continued_from": [*previous.get("continued_from", []), {k: previous[k] for k in (
          "command", "commit", "step") if k in previous}] if previous else [],
      "base_steps_total": model.info["step"] + (previous.get("base_steps_total", previous["step"]) if previous else 0),
      "seconds": seconds if not demo.cached else {**seconds, "cached": demo.cached}})
  return folder


def build_parser() -> argparse.ArgumentParser:
  """The command line (also parsed by the README test)."""
  parser = argparse.ArgumentParser(prog="python -m magicpose_jax.demo.pretrain", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="outputs/pretrain", help="output folder (phases cached here; the base in sd/)")
  parser.add_argument("--fresh", action="store_true", help="retrain every phase instead of reusing DIR's")
  parser.add_argument("--micro", action="store_true", help="a few steps per phase (the tests' size)")
  parser.add_argument("--continue-from", default="", metavar="DIR",
                      help="a folder this command wrote: reuse its VAE and train its base UNet for more steps")
  parser.add_argument("--finetune-decoder", default="", metavar="SD_DIR",
                      help="only train the VAE decoder of the pretrained base folder SD_DIR further (head-weighted, "
                           "on noisy latents); "
                           "writes DIR/sd, the rest of SD_DIR unchanged")
  parser.add_argument("--tune-encoder", default="", metavar="SD_DIR",
                      help="only train the VAE (encoder and decoder) of the pretrained base folder SD_DIR further, "
                           "heads and eyes weighted, latents anchored; writes DIR/sd, the rest of SD_DIR unchanged")
  return parser


def main(argv: list[str] | None = None) -> str:
  args = build_parser().parse_args(argv)
  command = "python -m magicpose_jax.demo.pretrain " + " ".join(sys.argv[1:] if argv is None else argv)
  if args.tune_encoder:
    if args.continue_from or args.fresh or args.finetune_decoder:
      raise SystemExit("--tune-encoder trains only a finished base's VAE: no --continue-from, --fresh or "
                       "--finetune-decoder")
    folder = tune_encoder_of(args.tune_encoder, args.out, MICRO_TUNE_ENCODER if args.micro else TUNE_ENCODER,
                             MICRO_TUNE_ENCODER_IMAGES if args.micro else TUNE_ENCODER_IMAGES,
                             command=command.strip())
    print(f"pretrained base with the tuned VAE: {folder}\n  continue its UNet and ControlNet on it (docs/demo.md)")
    return folder
  if args.finetune_decoder:
    if args.continue_from or args.fresh:
      raise SystemExit("--finetune-decoder trains only a finished base's decoder: no --continue-from or --fresh")
    folder = finetune_decoder_of(args.finetune_decoder, args.out,
                                 MICRO_FINETUNE_DECODER if args.micro else FINETUNE_DECODER, command=command.strip())
    print(f"pretrained base with the new decoder: {folder}\n  python -m magicpose_jax.demo --base-sd {folder}")
    return folder
  folder = pretrain(args.out, MICRO_PRETRAIN if args.micro else PRETRAIN, fresh=args.fresh,
                    unet=MICRO_UNET if args.micro else None, command=command.strip(),
                    continue_from=args.continue_from)
  print(f"pretrained base: {folder}\n  python -m magicpose_jax.demo --base-sd {folder}")
  return folder


if __name__ == "__main__":
  main()
