"""The demo's phases: data, the demo VAE, base/stage-1/stage-2/ablation training runs, evaluation and figures.

See the package docstring (`magicpose_jax.demo`) for what each phase does and what DIR holds.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from magicpose_jax import configs
from magicpose_jax.configs import config_path
from magicpose_jax.data.synthetic import PART_NAMES, SyntheticSource
from magicpose_jax.demo import autoencoder, pretrained
from magicpose_jax.demo import retarget as rt
from magicpose_jax.demo.figures import image_grid, save_animation, save_png
from magicpose_jax.diffusion.sampler import SamplerConfig
from magicpose_jax.diffusion.schedules import SD15_SCHEDULE
from magicpose_jax.eval import claims
from magicpose_jax.models.clip import CLIP_VARIANTS
from magicpose_jax.models.patch_vae import fit_patch_vae
from magicpose_jax.models.unet import VARIANTS, UNetConfig
from magicpose_jax.pose.keypoints import Pose
from magicpose_jax.pose.regions import eye_mask
from magicpose_jax.train import checkpoint as ckpt
from magicpose_jax.train import loop

# The noise schedule of the demo's base (written into base_sd; every stage over it trains and samples with it):
# SD 1.5's betas rescaled to zero terminal SNR, "trailing" inference steps and v-prediction (Lin et al. 2024,
# "Common Diffusion Noise Schedules and Sample Steps are Flawed"). SD's own schedule ends at SNR 0.0047: training
# at t = 999 still shows the model 7% of the image, which on these flat-coloured figures is their colours, so it
# learns to read colours off the "noise"; sampling then starts from pure noise, where there is nothing to read,
# and the colours come out as a cast. `config.model.prediction_type` (configs/demo.py) must say v_prediction too.
DEMO_SCHEDULE = SD15_SCHEDULE.replace(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing")
SETUP_FILE = "setup.json"  # in DIR: the setup its cached phases were trained with (`Demo.setup`)
CONFIG_FILE = config_path("demo")


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  """One `train.loop.train` run of the demo: header number, name (its folder under runs/), config, description and
  the phase it reads (its base or init run)."""

  index: int
  name: str
  config: ml_collections.ConfigDict
  text: str
  after: str | None  # None: it reads a pretrained base folder, no phase


AUTOENCODERS = ("patch", "trained")


@dataclasses.dataclass(frozen=True)
class Budget:
  """How much each phase does. `no_pose_steps=0`: the "no pose" ablation is the stage-1 model itself (appearance
  only, trained `stage1_steps`); otherwise stage 2 with `use_pose=False` continues it for that many steps."""

  # "trained": the tiny VAE (vae_steps); "patch": autoencoder.DEMO_PATCH_VAE (PCA, no training), measured worse
  # within this budget (its linear, patch-by-patch decoder shows every latent error as a 4x4 block; docs/demo.md).
  autoencoder: str = "trained"
  vae_steps: int = 800  # "trained" only
  vae_images: int = 2048  # training figures rendered for the autoencoder (random training identities)
  latent_channels: int = 4  # "trained" only: the tiny VAE's latent channels
  # The VAE and base phases run only for a demo that trains its own base (`Demo(base_sd=None)`).
  base_steps: int = 400
  base_reference_share: float = 0.0  # the base run's `config.base_reference_share` (train/config.py)
  # The pretrain command only (demo/pretrain.py): steps of the OpenPose ControlNet trained over the finished base
  # (0: none). The stages' pose nets then start from it (`pose_init="controlnet"`), as the release's start from
  # ControlNet 1.1 OpenPose.
  pose_steps: int = 0
  # The pretrain command only: steps of training the VAE's decoder alone, its encoder frozen, on `decoder_images`
  # training figures (0: none; `autoencoder.finetune_decoder`). The latent space, hence the base, stays the same.
  decoder_steps: int = 0
  decoder_images: int = 8192
  decoder_head_weight: float = 0.0  # `autoencoder.DecoderTraining.head_weight` of the decoder phase
  decoder_latent_noise: float = 0.0  # `autoencoder.DecoderTraining.latent_noise` of the decoder phase
  stage1_steps: int = 250
  stage2_steps: int = 250
  no_appearance_steps: int = 250  # stage 2 with use_appearance=False, from the base
  no_pose_steps: int = 0
  batch_size: int = 8
  sample_steps: int = 20  # DDIM steps
  guidance: float = 2.0
  holdout_identities: int = 8  # evaluated identities
  poses_per_identity: int = 4
  animation_keyframes: int = 4  # frames of the animated identity the motion passes through
  animation_inbetweens: int = 6  # interpolated poses from one keyframe to the next

  def __post_init__(self):
    if self.autoencoder not in AUTOENCODERS:
      raise ValueError(f"Budget.autoencoder: expected one of {AUTOENCODERS}, got {self.autoencoder!r}")
    if self.decoder_steps and self.autoencoder != "trained":
      raise ValueError(f"Budget.decoder_steps={self.decoder_steps}: only the trained VAE has a decoder to train "
                       f"further (autoencoder={self.autoencoder!r}); set decoder_steps=0")


# `make demo`: MagicPose's stages over the packaged pretrained base (demo/pretrained.py), in the time the VAE and
# base phases took when the demo trained its own.
DEMO = Budget(stage1_steps=500, stage2_steps=500, no_appearance_steps=500)
# `--train-base`: the demo trains its own VAE (800 steps) and plain base (400) first, and the stages for less.
TRAINED_BASE = Budget()
# The smoke test's size: every phase and output, a few steps each.
MICRO = Budget(vae_steps=2, vae_images=8, base_steps=1, stage1_steps=1, stage2_steps=1, no_appearance_steps=1,
               batch_size=2, sample_steps=2, holdout_identities=1, poses_per_identity=2, animation_keyframes=2,
               animation_inbetweens=1)
# ... with a one-level UNet whose only transformer is the mid block's (where the reference attention still runs):
# the micro run's time is compiling and tracing ~10 distinct programs, which scale with the graph's size, not its
# widths. One level without attention blocks took the four training phases from 61 s to 42 s (2-core CPU).
MICRO_UNET = UNetConfig(sample_size=16, block_out_channels=(16,), layers_per_block=1,
                        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                        norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2)


def training_figures(data: ml_collections.ConfigDict, count: int,
                     progress: Callable[[Any], Any] = lambda it: it) -> np.ndarray:
  """uint8 `[count, S, S, 3]`: the figures the demo fits its autoencoder on, `count` distinct (identity, frame)
  draws among the training identities of `data` (a training config's `data`; details included), always the
  same draw. `progress` wraps the iteration (e.g. a tqdm bar)."""
  return training_figures_and_heads(data, count, progress)[0]


def training_figures_and_heads(data: ml_collections.ConfigDict, count: int,
                               progress: Callable[[Any], Any] = lambda it: it) -> tuple[np.ndarray, np.ndarray]:
  """`training_figures` and each figure's head: (uint8 `[count, S, S, 3]`, bool `[count, S, S]`)."""
  images, heads, _ = training_figures_and_parts(data, count, progress)
  return images, heads


def training_figures_and_parts(data: ml_collections.ConfigDict, count: int,
                               progress: Callable[[Any], Any] = lambda it: it
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`training_figures`, each figure's head and its eyes (`pose.regions.eye_mask` of its face landmarks):
  (uint8 `[count, S, S, 3]`, bool `[count, S, S]`, bool `[count, S, S]`)."""
  source = rt.synthetic_source(data)
  frames = data.synthetic.frames_per_identity
  train_ids = data.synthetic.num_identities - data.synthetic.holdout_identities
  flat = np.random.default_rng(0).permutation(train_ids * frames)[:count]
  images, heads, eyes = [], [], []
  for i in progress(flat):
    frame = source.frame(int(i) // frames, int(i) % frames)
    images.append(frame["image"])
    heads.append(frame["part_mask"] == PART_NAMES.index("head"))
    eyes.append(eye_mask([frame["pose"]], *frame["image"].shape[:2]).astype(bool))
  return np.stack(images), np.stack(heads), np.stack(eyes)


def load_config(path: str = CONFIG_FILE) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (the packaged configs/demo.py by default)."""
  return configs.load_config(path)


def _phase_done(workdir: str, steps: int) -> bool:
  """A run is finished when its newest checkpoint is at `steps` (the train loop would only resume/skip)."""
  try:
    return int(os.path.basename(ckpt.latest_checkpoint_dir(workdir))) >= steps
  except (FileNotFoundError, ValueError):
    return False


class Demo:
  """The phases over one output folder; `run()` does them all."""

  def __init__(self, out: str, budget: Budget = DEMO, config: ml_collections.ConfigDict | None = None,
               fresh: bool = False, unet: UNetConfig | None = None, base_sd: str | None = None):
    """`unet`: the base UNet's architecture (default: `config.model.unet`'s variant), when the demo trains its
    own base. `base_sd`: a pretrained base SD folder (`demo.pretrained`: the packaged `PACKAGED_BASE` or one
    the pretrain command wrote) that the stages train over; then no VAE or base phase runs. None: the demo trains
    both (phases vae and base)."""
    self.out = os.path.abspath(out)
    self.budget = budget
    self.unet = unet
    self.config = config if config is not None else load_config()
    self.base_sd = os.path.abspath(base_sd) if base_sd else None
    # Checked before anything is removed or trained: a missing file or a changed weight is an error here.
    self.base_manifest = pretrained.check_base_sd(self.base_sd) if self.base_sd else None
    if self.config.model.prediction_type != DEMO_SCHEDULE.prediction_type:
      raise ValueError(f"config.model.prediction_type={self.config.model.prediction_type!r}: the demo's base trains "
                       f"with a zero-terminal-SNR schedule, which needs {DEMO_SCHEDULE.prediction_type!r}")
    self.timings: dict[str, float] = {}
    self.cached: list[str] = []
    os.makedirs(self.out, exist_ok=True)
    setup = self.setup()
    changed = self._changed_setup(setup)
    if changed:
      print(f"{self.out} holds phases trained with another setup ({', '.join(changed)} changed): retraining them all")
    if fresh or changed:
      for name in ("vae", "decoder", "base_sd", "runs", "tb"):  # decoder: the pretrain command's phase
        shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)
    with open(self.path(SETUP_FILE), "w") as f:
      json.dump(setup, f, indent=2, sort_keys=True)
    os.makedirs(os.path.join(self.out, "tb"), exist_ok=True)

  def setup(self) -> dict[str, Any]:
    """What the cached phases depend on (JSON-able): the training config, the budget, and the pretrained base's
    path and digest, or (training its own base) the VAE's and base UNet's architectures and the VAE's training
    settings."""
    as_json = lambda x: json.loads(json.dumps(x, default=str))
    if self.base_sd:
      return as_json({"config": self.config.to_dict(), "budget": dataclasses.asdict(self.budget),
                      "base_sd": {"path": self.base_sd, "sha256": self.base_manifest["sha256"]}})
    unet = self.unet or VARIANTS[self.config.model.unet]
    trained = self.budget.autoencoder == "trained"
    return as_json({"config": self.config.to_dict(), "budget": dataclasses.asdict(self.budget),
                    "unet": dataclasses.asdict(unet), "vae": dataclasses.asdict(self._vae_config()),
                    "vae_training": dataclasses.asdict(self._vae_training()) if trained else None,
                    "schedule": dataclasses.asdict(DEMO_SCHEDULE)})

  def _changed_setup(self, new: dict[str, Any]) -> list[str]:
    """The parts of `new` (a `setup()`) that differ from the one the folder's phases were trained with ([] if
    none/new)."""
    try:
      with open(self.path(SETUP_FILE)) as f:
        old = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
      # A folder from before setup.json existed, with phases in it, cannot be checked: retrain it.
      return ["unknown"] if os.path.isdir(self.path("runs")) or os.path.isdir(self.path("vae")) else []
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))

  def _vae_training(self) -> autoencoder.AutoencoderTraining:
    return autoencoder.AutoencoderTraining(steps=self.budget.vae_steps)

  def _vae_config(self) -> autoencoder.AnyVAEConfig:
    if self.budget.autoencoder == "patch":
      return autoencoder.DEMO_PATCH_VAE
    return dataclasses.replace(autoencoder.DEMO_VAE, latent_channels=self.budget.latent_channels)

  # -- paths and configs ---------------------------------------------------------------------------------------

  def path(self, *names: str) -> str:
    return os.path.join(self.out, *names)

  def run_config(self, stage: str, steps: int, **model: Any) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(self.config.to_dict())
    c.stage = stage
    c.total_steps = steps
    c.global_batch_size = self.budget.batch_size
    c.checkpoint_every = max(steps, 1)
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(steps // 5, 0))
    for k, v in model.items():
      c.model[k] = v
    return c

  def _header(self, index: int, name: str, text: str) -> None:
    print(f"\n[{index}/6] {name}: {text}", flush=True)

  # -- phases --------------------------------------------------------------------------------------------------

  def train_vae(self) -> None:
    b = self.budget
    self._header(1, "vae", f"tiny VAE, {b.vae_steps} steps on {b.vae_images} training figures"
                 if b.autoencoder == "trained" else f"patch autoencoder: PCA of the 4x4 patches of {b.vae_images} "
                 f"training figures")
    folder, pipeline = self.path("vae"), self.path("base_sd")
    marker = os.path.join(pipeline, "demo_base.json")
    if autoencoder.is_saved_autoencoder(folder) and os.path.isfile(marker):
      self.cached.append("vae")
      print(f"cached: {folder}")
      return
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(pipeline, ignore_errors=True)
    data = self.config.data
    images = training_figures(data, self.budget.vae_images,
                              lambda it: tqdm.tqdm(it, desc="render", unit="img", dynamic_ncols=True))
    if b.autoencoder == "trained":
      vae_config, params, metrics = self._train_tiny_vae(images)
    else:
      vae_config, params = fit_patch_vae(autoencoder.DEMO_PATCH_VAE, images)
      metrics = autoencoder.reconstruction_metrics(vae_config, params, images[:256])
    autoencoder.save_autoencoder(folder, vae_config, params, metrics)
    latent = data.image_size // vae_config.downsample_factor
    unet = (self.unet or VARIANTS[self.config.model.unet]).replace(
        sample_size=latent, in_channels=vae_config.latent_channels, out_channels=vae_config.latent_channels)
    autoencoder.write_base_pipeline(pipeline, vae_config, params, unet, CLIP_VARIANTS[self.config.model.text_encoder],
                                    seed=self.config.seed, scheduler=DEMO_SCHEDULE)
    with open(marker, "w") as f:
      json.dump({"vae": folder, "scaling_factor": vae_config.scaling_factor, "latents_mean": vae_config.latents_mean,
                 "latents_std": vae_config.latents_std, **metrics}, f, indent=2)
    scaling = f"scaling_factor {vae_config.scaling_factor:.3f}" if vae_config.latents_std is None else \
        "latents_std " + "/".join(f"{v:.3f}" for v in vae_config.latents_std)
    print(f"VAE: l1 {metrics.get('l1', float('nan')):.4f} (pixels in [-1, 1]), {scaling}; SD pipeline folder "
          f"{pipeline}")

  def _train_tiny_vae(self, images: np.ndarray) -> tuple[autoencoder.AnyVAEConfig, dict, dict[str, float]]:
    bar = tqdm.tqdm(total=self.budget.vae_steps, desc="vae", unit="step", dynamic_ncols=True)

    def progress(step: int, report: dict) -> None:
      bar.update(1)
      if report:
        bar.set_postfix(l1=f"{report['l1']:.4f}", kl=f"{report['kl']:.2f}", refresh=False)

    out = autoencoder.train_autoencoder(self._vae_config(), images, self._vae_training(), progress)
    bar.close()
    return out

  def train_run(self, index: int, name: str, config: ml_collections.ConfigDict, text: str) -> None:
    """One `train.loop.train` run in runs/<name> (TensorBoard under tb/<name>), skipped when finished."""
    workdir = self.path("runs", name)
    self._header(index, name, f"{text} ({config.total_steps} steps, batch {config.global_batch_size})")
    os.makedirs(workdir, exist_ok=True)
    link = self.path("tb", name)
    if not os.path.lexists(link):
      try:
        os.symlink(os.path.join("..", "runs", name, "tb"), link)
      except OSError:
        pass  # no symlinks here: the logs stay in runs/<name>/tb
    if _phase_done(workdir, config.total_steps):
      self.cached.append(name)
      print(f"cached: {workdir}")
      return
    loop.train(config, workdir)

  def training_runs(self) -> list[TrainingRun]:
    """The demo's training runs, in order (each after the phase it reads)."""
    b = self.budget
    runs = []
    if self.base_sd:
      base, base_phase = self.base_sd, None
    else:
      base, base_phase = self.path("runs", "base"), "base"
      c = self.run_config("base", b.base_steps)
      c.base.path = self.path("base_sd")
      c.base_reference_share = b.base_reference_share
      text = "tiny UNet trained as SD on the figures (then frozen)" + (
          f", {b.base_reference_share:.0%} of each batch reference-only" if b.base_reference_share else "")
      runs.append(TrainingRun(2, "base", c, text, "vae"))
    c = self.run_config("stage1", b.stage1_steps)
    c.base.path = base
    runs.append(TrainingRun(3, "stage1", c, "Appearance Controller over the frozen base", base_phase))
    # A base with an OpenPose ControlNet (the pretrain command's `pose_steps`): the pose nets start from it.
    controlnet = pretrained.controlnet_of(self.base_sd) if self.base_sd else None
    pose = {"pose_init": "controlnet", "pose_path": controlnet} if controlnet else {}
    start = " (pose net from the base's ControlNet)" if controlnet else ""
    c = self.run_config("stage2", b.stage2_steps, **pose)
    c.init_from = self.path("runs", "stage1")
    runs.append(TrainingRun(4, "stage2", c, "Appearance + Pose Controller, from stage 1" + start, "stage1"))
    c = self.run_config("stage2", b.no_appearance_steps, use_appearance=False, **pose)
    c.base.path = base
    runs.append(TrainingRun(5, "no_appearance", c, "ablation: pose net + frozen base, no Appearance Controller" +
                            start, base_phase))
    if b.no_pose_steps > 0:
      c = self.run_config("stage2", b.no_pose_steps, use_pose=False)
      c.init_from = self.path("runs", "stage1")
      runs.append(TrainingRun(5, "no_pose", c, "ablation: Appearance Controller only, stage 2 without the pose net",
                              "stage1"))
    return runs

  def train_all(self) -> None:
    for r in self.training_runs():
      self.train_run(r.index, r.name, r.config, r.text)

  def variants(self) -> dict[str, str]:
    """Evaluated model -> its run."""
    b = self.budget
    return {"full": self.path("runs", "stage2"), "no_appearance": self.path("runs", "no_appearance"),
            "no_pose": self.path("runs", "no_pose" if b.no_pose_steps > 0 else "stage1")}

  def _sampler(self) -> SamplerConfig:
    return SamplerConfig(num_steps=self.budget.sample_steps, guidance=self.budget.guidance)

  def retarget(self, name: str) -> tuple[rt.TrainedModel, rt.RetargetResult]:
    """One evaluated model (`variants()`) on the held-out pairs."""
    b = self.budget
    pairs = rt.holdout_pairs(self.config.data, b.poses_per_identity, b.holdout_identities)
    self._header(6, f"evaluate {name}", f"{len(pairs)} held-out identities x {b.poses_per_identity} new poses, "
                 f"DDIM {b.sample_steps} steps, guidance {b.guidance}")
    bar = tqdm.tqdm(total=len(pairs), desc=f"retarget {name}", unit="identity", dynamic_ncols=True)
    model = rt.load_trained(self.variants()[name])
    result = rt.retarget(model, rt.synthetic_source(self.config.data), pairs, self._sampler(), progress=bar.update)
    bar.close()
    return model, result

  def evaluate(self, retargeted: dict[str, tuple[rt.TrainedModel, rt.RetargetResult]] | None = None) -> dict:
    """Scores every variant (`retargeted`: those already done by `retarget`), animates the full model and writes
    the grid."""
    retargeted = dict(retargeted or {})
    for name in self.variants():
      if name not in retargeted:
        retargeted[name] = self.retarget(name)
    results = {name: retargeted[name][1] for name in self.variants()}
    summaries = {name: rt.summary(r.metrics) for name, r in results.items()}
    animation = self.animate(retargeted["full"][0], rt.synthetic_source(self.config.data), self._sampler())
    self.write_grid(results, summaries)
    return {"summaries": summaries, "results": results, "animation": animation}

  def animate(self, model: rt.TrainedModel, source: SyntheticSource, sampler: SamplerConfig) -> list[str]:
    b = self.budget
    identity = self.config.data.synthetic.num_identities - 1  # a held-out figure
    keyframes = [source.frame(identity, f) for f in range(1, b.animation_keyframes + 1)]
    poses = interpolate_poses([f["pose"] for f in keyframes], b.animation_inbetweens)
    pose_images = np.stack([source.pose_image(p) for p in poses])
    reference = source.frame(identity, 0)["image"]
    bar = tqdm.tqdm(total=1, desc="animate", unit="video", dynamic_ncols=True)
    frames = rt.animate(model, reference, pose_images, sampler, seed=identity, batch_frames=b.poses_per_identity)
    bar.update(1)
    bar.close()
    panels = [np.concatenate([reference, p, f], axis=1) for p, f in zip(pose_images, frames, strict=True)]
    panels = [np.repeat(np.repeat(p, 3, 0), 3, 1) for p in panels]
    return save_animation(panels, self.path("animation.gif"), fps=8)

  def write_grid(self, results: dict[str, rt.RetargetResult], summaries: dict[str, dict[str, float]]) -> None:
    rows, labels = [], []
    names = list(results)
    for i, row in enumerate(results["full"].rows):
      identity, reference, poses, generated, truth = row
      k = i % len(poses)  # walk through the poses so the grid shows several
      cells = [reference, poses[k], generated[k], truth[k]]
      cells += [results[n].rows[i][3][k] for n in names if n != "full"]
      rows.append(cells)
      labels.append(f"id {identity}")
    titles = ["reference", "target pose", "generated", "ground truth"] + [n.replace("_", "-") for n in names
                                                                           if n != "full"]
    caption = [f"{n}: " + "  ".join(f"{title} {summaries[n][key]:.3f}" for key, title, _ in rt.SUMMARY_KEYS)
               for n in names]
    save_png(image_grid(rows, column_titles=titles, row_labels=labels, caption=caption), self.path("retarget.png"))

  def phases(self) -> dict[str, tuple[Callable[[], Any], tuple[str, ...]]]:
    """name -> (what it does, the phases it needs), in the sequential order: the VAE, the training runs, and the
    retargeting of each evaluated model (`evaluate <variant>`, as soon as its run is trained)."""
    phases: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {} if self.base_sd else {
        "vae": (self.train_vae, ())}
    for r in self.training_runs():
      phases[r.name] = (functools.partial(self.train_run, r.index, r.name, r.config, r.text),
                        (r.after,) if r.after else ())
    for name, workdir in self.variants().items():
      phases[f"evaluate {name}"] = (functools.partial(self.retarget, name), (os.path.basename(workdir),))
    return phases

  def run(self, jobs: int = 1) -> dict:
    """All phases; returns (and writes) metrics.json's content. `jobs`: phases run at once (`run_phases`)."""
    t0 = time.perf_counter()
    done = run_phases(self.phases(), jobs, self.timings)
    start = time.perf_counter()
    evaluation = self.evaluate({name: done[f"evaluate {name}"] for name in self.variants()})
    self.timings["grid and animation"] = round(time.perf_counter() - start, 1)
    self.timings["total"] = round(time.perf_counter() - t0, 1)
    s = evaluation["summaries"]
    judged = claims.judge({name: [summary] for name, summary in s.items()}, claims.DEMO_CLAIMS)
    b = self.budget
    report = {
        "models": {n: rt.report(r.metrics) for n, r in evaluation["results"].items()},
        "runs": self.variants(),
        "ablations": f"trained in this demo: no_appearance {b.no_appearance_steps} steps of stage 2 from the base; "
                     + ("no_pose = the stage-1 model (appearance only, " + f"{b.stage1_steps} steps)"
                        if b.no_pose_steps == 0 else f"no_pose {b.no_pose_steps} steps of stage 2 without pose"),
        "claims": {j["claim"]: j["margin"] > 0 for j in judged},
        "budget": dataclasses.asdict(b), "seconds": self.timings, "cached_phases": self.cached,
        "outputs": {"grid": self.path("retarget.png"), "animation": evaluation["animation"]},
        "jax_backend": jax.default_backend(),
    }
    with open(self.path("metrics.json"), "w") as f:
      json.dump(report, f, indent=2)
    return report


def run_phases(phases: dict[str, tuple[Callable[[], Any], tuple[str, ...]]], jobs: int = 1,
               seconds: dict[str, float] | None = None) -> dict[str, Any]:
  """Runs every phase (name -> (fn, names it needs)) once after the phases it needs; returns name -> fn's result.

  `jobs=1`: one after another in the dict's order, in this thread. `jobs>1`: up to that many at once in threads,
  the earliest ready first. On a small model the phases are mostly tracing and compiling, and XLA compiles without
  holding the GIL: two at once use both cores of a 2-core machine where one leaves the second mostly idle. The
  first failure is raised once the phases already running end (none is started after it). `seconds`, if given,
  receives each phase's wall time.
  """
  unknown = {need for _, needs in phases.values() for need in needs} - set(phases)
  if unknown:
    raise ValueError(f"run_phases: phases need unknown phases {sorted(unknown)}")
  if jobs < 1:
    raise ValueError(f"jobs={jobs}: expected >= 1")
  seconds = {} if seconds is None else seconds

  def timed(name: str) -> Any:
    start = time.perf_counter()
    result = phases[name][0]()
    seconds[name] = round(time.perf_counter() - start, 1)
    return result

  results: dict[str, Any] = {}
  pending = list(phases)
  ready = lambda: [n for n in pending if all(need in results for need in phases[n][1])]
  if jobs == 1:
    while pending:
      if not ready():
        raise ValueError(f"run_phases: a cycle among {pending}")
      name = ready()[0]
      pending.remove(name)
      results[name] = timed(name)
    return results
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    running: dict[concurrent.futures.Future, str] = {}
    while pending or running:
      for name in ready()[: jobs - len(running)]:
        pending.remove(name)
        running[pool.submit(timed, name)] = name
      if not running:
        raise ValueError(f"run_phases: a cycle among {pending}")
      finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in finished:
        name = running.pop(future)
        if future.exception() is not None:
          pending.clear()  # start nothing more; the pool's exit waits for the running ones
          concurrent.futures.wait(running)
          raise future.exception()
        results[name] = future.result()
  return results


def interpolate_poses(keyframes: list[Pose], inbetweens: int) -> list[Pose]:
  """Linear motion through `keyframes` (and back to the first), `inbetweens` poses per segment: the face landmarks
  move too, so mouth opening, eye closure and head tilt change smoothly. A keypoint missing at either end of a
  segment is missing in between."""
  poses = []
  cycle = [*keyframes, keyframes[0]] if len(keyframes) > 1 else keyframes
  for a, b in itertools.pairwise(cycle):
    for i in range(inbetweens):
      w = i / inbetweens
      poses.append(Pose(_mix(a.body, b.body, w), _mix(a.hands, b.hands, w), _mix(a.face, b.face, w)))
  return poses or list(keyframes)


def _mix(x: np.ndarray, y: np.ndarray, w: float) -> np.ndarray:
  """Keypoints [..., 3] (x, y, confidence): positions blended, the lower confidence kept."""
  return np.concatenate([(1 - w) * x[..., :2] + w * y[..., :2], np.minimum(x[..., 2:], y[..., 2:])],
                        -1).astype(np.float32)
