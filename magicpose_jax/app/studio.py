"""What the app does with a job: its inputs, the poses task and the animate task, on one loaded model.

    studio = Studio(AppConfig(checkpoint="outputs/demo/runs/stage2", outputs="outputs/app"))
    studio.start()                     # loads the model in the background; interrupted jobs are marked
    job = studio.store.create()
    studio.save_input(job["id"], "reference", "me.jpg", data)    # and "driving" (a video) or "pose" (JSON files)
    studio.worker.submit(job["id"], "animate", {"align": True, "steps": 20})

Results in the job's folder: reference.png (the reference at the model's size), poses.mp4 (extracted driving
poses), aligned.mp4 (aligned to the reference), animation.mp4 and side_by_side.mp4 (reference | pose | generated).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import threading
from typing import Any

import cv2
import jax.numpy as jnp
import numpy as np

from magicpose_jax import inference
from magicpose_jax.app import pipeline
from magicpose_jax.app.jobs import JobStore, Worker
from magicpose_jax.export import TrainedModel
from magicpose_jax.pose import read_openpose_json

ROLES = ("reference", "driving", "pose")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class AppConfig:
  """The server's choices (command line): the model, where jobs go, and the options' defaults."""

  checkpoint: str = "outputs/demo/runs/stage2"
  outputs: str = "outputs/app"
  ema: bool = False
  base: str | None = None
  base_vae: str | None = None
  steps: int = 20  # the demo's sampling (demo.phases.Budget)
  guidance: float = 2.0
  seed: int = 0
  fps: float = 8.0
  max_frames: int = 24
  align: bool = True
  batch_frames: int = 8

  def defaults(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in ("steps", "guidance", "seed", "fps", "max_frames", "align")}


def parse_options(raw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  """The task options a page sent, checked and typed (missing ones take `defaults`); ValueError names a bad one."""
  kinds = {"steps": (int, 1, 1000), "guidance": (float, 0.0, 50.0), "seed": (int, 0, 2**31 - 1),
           "fps": (float, 0.1, 60.0), "max_frames": (int, 1, 10_000)}
  unknown = set(raw) - set(kinds) - {"align"}
  if unknown:
    raise ValueError(f"unknown options {sorted(unknown)}; expected {sorted([*kinds, 'align'])}")
  out = dict(defaults)
  for key, (kind, low, high) in kinds.items():
    if key in raw:
      try:
        value = kind(raw[key])
      except (TypeError, ValueError):
        raise ValueError(f"option {key}={raw[key]!r}: expected a {kind.__name__}") from None
      if not low <= value <= high:
        raise ValueError(f"option {key}={value}: expected {low} to {high}")
      out[key] = value
  if "align" in raw:
    if not isinstance(raw["align"], bool):
      raise ValueError(f"option align={raw['align']!r}: expected true or false")
    out["align"] = raw["align"]
  return out


class Studio:
  """The model (loaded once, in the background), the job store and the worker that runs the tasks."""

  def __init__(self, config: AppConfig, log=print):
    self.config = config
    self.log = log
    self.store = JobStore(config.outputs)
    self.worker = Worker(self.store, self._run_task, log)
    self._model: TrainedModel | None = None
    self._model_error: str | None = None
    self._model_lock = threading.Lock()

  def start(self) -> None:
    for job_id in self.store.mark_interrupted():
      self.log(f"job {job_id}: interrupted by the last shutdown (marked as an error)")
    self.worker.start()
    threading.Thread(target=self._preload, name="magicpose-load", daemon=True).start()

  def _preload(self) -> None:
    try:
      self.model()
    except Exception as e:  # shown by /api/info and by every task
      self.log(f"the model could not be loaded: {e}")

  def model(self) -> TrainedModel:
    with self._model_lock:
      if self._model is None:
        if self._model_error is not None:
          raise ValueError(self._model_error)
        c = self.config
        try:
          self._model = inference.load_model(c.checkpoint, ema=c.ema, base=c.base, base_vae=c.base_vae)
        except (FileNotFoundError, ValueError) as e:
          self._model_error = f"the model ({c.checkpoint}) cannot be loaded: {e}"
          raise ValueError(self._model_error) from None
      return self._model

  def info(self) -> dict[str, Any]:
    """What the page shows about the model: its source, image size (None while loading) and the defaults."""
    model = self._model
    return {"checkpoint": os.path.abspath(self.config.checkpoint), "base": self.config.base,
            "image_size": list(model.image_size) if model else None,
            "model": "ready" if model else ("error" if self._model_error else "loading"), "error": self._model_error,
            "stage": model.info.get("stage") if model else None, "step": model.info.get("step") if model else None,
            "defaults": self.config.defaults()}

  # -------------------------------------------------------------------------------------------------------------
  # Inputs.

  def save_input(self, job_id: str, role: str, name: str, data: bytes) -> str:
    """Stores an upload in the job's `inputs/` after checking it (ValueError says what was expected)."""
    if role not in ROLES:
      raise ValueError(f"unknown input {role!r}; expected one of {ROLES}")
    inputs = os.path.join(self.store.folder(job_id), "inputs")
    ext = os.path.splitext(name)[1].lower()
    if role == "reference":
      if ext not in inference.IMAGE_SUFFIXES or cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None:
        raise ValueError(f"{name}: not a readable image (expected one of {', '.join(inference.IMAGE_SUFFIXES)})")
      target = "reference" + ext
    elif role == "driving":
      if ext not in inference.VIDEO_SUFFIXES:
        raise ValueError(f"{name}: expected a video ({', '.join(inference.VIDEO_SUFFIXES)}) or OpenPose .json files")
      target = "driving" + ext
    else:
      if ext != ".json":
        raise ValueError(f"{name}: expected an OpenPose .json file")
      target = os.path.join("poses", _SAFE_NAME.sub("_", os.path.basename(name)))
    for old in glob.glob(os.path.join(inputs, target.split(".")[0] + ".*")) if role != "pose" else []:
      os.remove(old)
    path = os.path.join(inputs, target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
    if role == "pose":
      try:
        read_openpose_json(path)
      except (ValueError, KeyError, TypeError) as e:
        os.remove(path)
        raise ValueError(f"{name}: not an OpenPose JSON file ({e})") from None
    return target

  def _inputs(self, job_id: str) -> tuple[str, str | None, list[str]]:
    inputs = os.path.join(self.store.folder(job_id), "inputs")
    reference = glob.glob(os.path.join(inputs, "reference.*"))
    driving = glob.glob(os.path.join(inputs, "driving.*"))
    jsons = sorted(glob.glob(os.path.join(inputs, "poses", "*.json")))
    if not reference:
      raise ValueError("no reference photo uploaded")
    if not driving and not jsons:
      raise ValueError("no driving video or OpenPose JSON files uploaded")
    return reference[0], (driving[0] if driving else None), jsons

  # -------------------------------------------------------------------------------------------------------------
  # Tasks (run by the worker thread).

  def _run_task(self, job_id: str, task: str, options: dict[str, Any], report) -> None:
    report(stage="loading the model")
    model = self.model()
    folder = self.store.folder(job_id)
    state = self.store.read(job_id)
    pose_keys = ("align", "fps", "max_frames")
    done = state.get("files", {}).get("poses") and all(state.get("pose_options", {}).get(k) == options[k]
                                                       for k in pose_keys)
    if task == "poses" or not done:
      self._poses(job_id, folder, model, options, report)
      self.store.update(job_id, pose_options={k: options[k] for k in pose_keys})
    if task == "animate":
      self._animate(folder, model, options, report)

  def _poses(self, job_id: str, folder: str, model: TrainedModel, options: dict[str, Any], report) -> None:
    reference_path, driving, jsons = self._inputs(job_id)
    reference = inference.read_image(reference_path)
    size = model.image_size
    pose_options = pipeline.PoseOptions(align=options["align"], fps=options["fps"], max_frames=options["max_frames"])
    report(stage="reading the driving poses")
    if driving is not None:
      source, _ = pipeline.video_frames(driving, pose_options)
    else:
      source = pipeline.json_poses(jsons, reference.shape[:2], pose_options)
    progress = lambda done, total: report(stage="extracting poses", done=done, total=total)
    result = pipeline.driving_poses(source, reference, size, pose_options, progress)
    cv2.imwrite(os.path.join(folder, "reference.png"), inference.fit(reference, size)[..., ::-1])
    inference.write_frames(os.path.join(folder, "poses.mp4"), result.extracted, options["fps"])
    files = {"reference": "reference.png", "poses": "poses.mp4", "aligned": None, "video": None,
             "side_by_side": None}
    if result.aligned is not None:
      inference.write_frames(os.path.join(folder, "aligned.mp4"), result.aligned, options["fps"])
      files["aligned"] = "aligned.mp4"
    np.save(os.path.join(folder, "poses.npy"), result.for_animation)
    self.store.update(job_id, files=files, report=result.report)

  def _animate(self, folder: str, model: TrainedModel, options: dict[str, Any], report) -> None:
    poses = np.load(os.path.join(folder, "poses.npy"))
    reference = inference.read_image(os.path.join(folder, "reference.png"))
    frames = len(poses)
    report(stage="animating (the first frames also compile)", done=0, total=frames)
    count = [0]

    def progress(n: int) -> None:
      count[0] += n
      report(stage="animating", done=count[0], total=frames)

    animate_options = inference.AnimateOptions(steps=options["steps"], guidance=options["guidance"],
                                               seed=options["seed"], batch_frames=self.config.batch_frames,
                                               dtype=jnp.float32)
    video = inference.animate(model, reference, poses, animate_options, progress=progress)
    report(stage="writing the video")
    # Written under temporary names, then renamed: a page never sees a half-written file.
    for name, frames_out in (("animation.mp4", video),
                             ("side_by_side.mp4", inference.side_by_side(reference, poses, video))):
      inference.write_frames(os.path.join(folder, "tmp_" + name), frames_out, options["fps"])
      shutil.move(os.path.join(folder, "tmp_" + name), os.path.join(folder, name))
    job_id = os.path.basename(folder)
    self.store.update(job_id, files={"video": "animation.mp4", "side_by_side": "side_by_side.mp4"})
