"""`python -m magicpose_jax.demo [--out DIR] [--fresh] [--micro]`: MagicPose end to end on a CPU (`make demo`).

Phases (each cached in DIR; a second run skips finished ones unless --fresh, or unless DIR/setup.json says they were
trained with another config, budget or architecture: then every phase is retrained):

  1. vae        a tiny VAE (factor 4: 64 px figures -> 16 x 16 latents) trained on the training figures
                (`demo/autoencoder.py`; or `Budget(autoencoder="patch")`: the principal components of their 4 x 4
                patches, `models/patch_vae.py`), written with a random tiny UNet + text encoder as an SD pipeline
                folder;
  2. base       the tiny UNet trained as plain (empty-prompt) SD on the figures: the "pretrained SD" MagicPose
                freezes;
  3. stage1     the Appearance Controller over the frozen base (`train.loop.train`, configs/demo.py);
  4. stage2     appearance + Pose Controller, from stage 1;
  5. ablations  "no appearance" (pose net + base, stage 2 from the base) and "no pose" (appearance only), at the
                budget below (see `Budget`);
  6. evaluate   held-out identities (never trained on) retargeted to new poses and expressions, scored against
                ground truth (`demo/retarget.py`); retarget.png, animation.gif, metrics.json and a table.

Outputs in DIR: retarget.png, animation.gif and .mp4, metrics.json, tb/ (TensorBoard:
`tensorboard --logdir DIR/tb`), runs/<phase>/ (training workdirs), vae/, base_sd/.

Modules: `phases` (the phase graph and the `Demo` runner), `autoencoder` (the demo VAE), `retarget` (held-out
retargeting and its scores, shared with benchmarks/fidelity.py), `figures` (image grids and animations), `__main__`
(the command line).
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
