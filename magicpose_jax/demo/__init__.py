"""`python -m magicpose_jax.demo [--out DIR] [--fresh] [--micro] [--base-sd DIR | --train-base]`: MagicPose end to end
on a CPU (`make demo`).

MagicPose trains over a frozen, pretrained SD 1.5; the demo's stand-in is a tiny SD pretrained on the synthetic
figures and packaged with the code (`demo/pretrained.py`, made by `python -m magicpose_jax.demo.pretrain`, about an
hour). Phases (each cached in DIR; a second run skips finished ones unless --fresh, or unless DIR/setup.json says
they were trained with another config, budget, base or architecture: then every phase is retrained):

  1. stage1     the Appearance Controller over the frozen base (`train.loop.train`, configs/demo.py);
  2. stage2     appearance + Pose Controller, from stage 1;
  3. ablations  "no appearance" (pose net + base, stage 2 from the base) and "no pose" (appearance only), at the
                budget below (see `Budget`);
  4. evaluate   held-out identities (never trained on) retargeted to new poses and expressions, scored against
                ground truth (`demo/retarget.py`); retarget.png, animation.gif, metrics.json and a table.

`--train-base` (and `--micro`, the smoke test's size) trains the base in the run first instead, for less time:

  vae   a tiny VAE (factor 4: 64 px figures -> 16 x 16 latents) trained on the training figures
        (`demo/autoencoder.py`; or `Budget(autoencoder="patch")`: the principal components of their 4 x 4
        patches, `models/patch_vae.py`), written with a random tiny UNet + text encoder as an SD pipeline folder;
  base  the tiny UNet trained as SD on the figures (`Budget.base_reference_share` of each batch reference-only).

Outputs in DIR: retarget.png, animation.gif and .mp4, metrics.json, tb/ (TensorBoard:
`tensorboard --logdir DIR/tb`), runs/<phase>/ (training workdirs), and with --train-base vae/, base_sd/.

Modules: `phases` (the phase graph and the `Demo` runner), `pretrained` (the packaged base: its folder, manifest
and checks), `pretrain` (the command that trains one), `autoencoder` (the demo VAE), `retarget` (held-out
retargeting and its scores, shared with benchmarks/fidelity.py), `figures` (image grids and animations),
`__main__` (the command line).
"""

from magicpose_jax.demo.phases import (
  CONFIG_FILE,
  DEMO,
  MICRO,
  MICRO_UNET,
  TRAINED_BASE,
  Budget,
  Demo,
  TrainingRun,
  interpolate_poses,
  load_config,
  run_phases,
)

__all__ = ["CONFIG_FILE", "DEMO", "MICRO", "MICRO_UNET", "TRAINED_BASE", "Budget", "Demo", "TrainingRun",
           "interpolate_poses", "load_config", "run_phases"]
