"""Animation with a trained MagicPose model: inputs at the model's size, guided DDIM per frame, video files.

    model = load_model("runs/stage2")                       # a training run or an export folder
    reference = load_reference("me.png", model.image_size)  # uint8 [H, W, 3], centre square resized
    poses = load_poses("poses/", model.image_size)          # uint8 [F, H, W, 3] pose renders
    frames = animate(model, reference, poses, AnimateOptions(steps=50))
    write_frames("out.mp4", frames); write_frames("out_side_by_side.mp4", side_by_side(reference, poses, frames))

Images are prepared as the training data were (`data.augment`): the largest centred square, resized to the
model's side (area-averaging when shrinking). OpenPose JSON keypoints follow the same crop of their canvas:
the `canvas_height`/`canvas_width` the file records, else the reference image's original size (a driving
video and its reference usually share the frame size; render the poses yourself when they do not).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from magicpose_jax.data.augment import center_box, crop_poses, crop_resize_image
from magicpose_jax.diffusion.sampler import SamplerConfig, precompute_reference_states, sample, step_times
from magicpose_jax.diffusion.schedules import make_schedule
from magicpose_jax.export import TrainedModel, is_export, load_export, load_run, with_base
from magicpose_jax.models.magicpose import MagicPose
from magicpose_jax.models.patch_vae import PatchVAE, make_vae
from magicpose_jax.models.vae import AutoencoderKL, scale_latents, unscale_latents
from magicpose_jax.pose import read_openpose_canvas, read_openpose_json, render
from magicpose_jax.train import stages

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
OUTPUT_SUFFIXES = (".mp4", ".gif", ".png")


@dataclasses.dataclass(frozen=True)
class AnimateOptions:
  """Sampling choices. `per_frame_noise=False` is the release's (one initial noise shared by every frame)."""

  steps: int = 50
  guidance: float = 7.0
  seed: int = 0
  batch_frames: int = 8  # frames denoised together (one device batch, times 2 for guidance)
  per_frame_noise: bool = False
  cache: bool = True  # appearance states computed once for all steps (see diffusion.sampler for the memory)
  dtype: Any = jnp.float32

  def __post_init__(self):
    # Checked here, before a model is loaded: a negative guidance pushes away from the reference and pose (noise).
    if not 0 <= self.guidance < float("inf"):
      raise ValueError(f"guidance {self.guidance}: expected a finite number >= 0 (0: unconditional, 1: conditional "
                       f"alone, the release uses 7)")
    for name in ("steps", "batch_frames"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name.replace('_', '-')} {value!r}: expected an integer >= 1")


def load_model(path: str | os.PathLike, ema: bool = False, base: str | os.PathLike | None = None,
               base_vae: str | os.PathLike | None = None) -> TrainedModel:
  """A training workdir / step folder (its raw params, or EMA with `ema`) or a `convert` export folder.

  `base` / `base_vae`: another SD 1.5 derivative's UNet / VAE in place of the trained base's (`export.with_base`).
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))  # orbax reads absolute paths only
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint {path}: no such folder (a training workdir or an export folder)")
  if is_export(path):
    if ema:
      raise ValueError(f"{path}: an export holds one set of weights (its magicpose.json says which); --ema applies "
                       f"to training runs")
    model = load_export(path)
  else:
    model = load_run(path, ema=ema)
  if not model.model.use_appearance or model.model.pose is None:
    missing = "an appearance" if not model.model.use_appearance else "a pose"
    raise ValueError(f"{path}: a {model.info.get('stage')!r} model without {missing} net cannot animate a reference "
                     f"with poses; use a stage-2 run")
  return with_base(model, base, base_vae)


def read_image(path: str | os.PathLike) -> np.ndarray:
  """uint8 [H, W, 3] RGB; a clear error for a missing or unreadable file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such image")
  image = cv2.imread(path, cv2.IMREAD_COLOR)
  if image is None:
    raise ValueError(f"{path}: cannot be read as an image (expected one of {', '.join(IMAGE_SUFFIXES)})")
  return np.ascontiguousarray(image[..., ::-1])


def fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """The largest centred square of `image` [H, W, 3], resized to `size` (H, W) (square models only)."""
  if size[0] != size[1]:
    raise ValueError(f"model image size {size}: only square models are supported")
  return crop_resize_image(image, center_box(*image.shape[:2]), size[0])


def load_reference(path: str | os.PathLike, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
  """(uint8 [H, W, 3] at the model's size, the image's original (H, W))."""
  image = read_image(path)
  return fit(image, size), image.shape[:2]


def _render_json(path: str, size: tuple[int, int], canvas: tuple[int, int]) -> np.ndarray:
  canvas = read_openpose_canvas(path) or canvas
  poses = crop_poses(read_openpose_json(path), center_box(*canvas), size[0])
  return render(poses, *size)


def _sorted_files(folder: str, suffixes: Sequence[str]) -> list[str]:
  return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(tuple(suffixes)))


def pose_files(path: str | os.PathLike, pose_model: str | None = None) -> list[str]:
  """The files `load_poses` reads (cheap: checks the source before a model is loaded).

  A folder gives its OpenPose JSON files (preferred when it has both) or else its pose images, by name.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    jsons = [p for p in _sorted_files(path, (".json",)) if os.path.basename(p) != "extract_report.json"]
    files = jsons or _sorted_files(path, IMAGE_SUFFIXES)
    if not files:
      raise ValueError(f"--poses {path}: no pose images ({', '.join(IMAGE_SUFFIXES)}) or OpenPose .json files")
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--poses {path}: no such folder or file")
  lower = path.lower()
  if lower.endswith(VIDEO_SUFFIXES):
    _check_pose_model(path, pose_model)
  elif not lower.endswith((".json", *IMAGE_SUFFIXES)):
    raise ValueError(f"--poses {path}: expected a folder, a .json, an image or a video ({', '.join(VIDEO_SUFFIXES)})")
  return [path]


def load_poses(path: str | os.PathLike, size: tuple[int, int], canvas: tuple[int, int] | None = None,
               pose_model: str | None = None) -> np.ndarray:
  """Pose renders uint8 `[F, H, W, 3]` at the model's size `(H, W)`.

  Args:
    path: a folder of OpenPose JSON files (rendered here) or of pose images, one JSON or image file, or a video
      (its poses extracted with MediaPipe's models, or with `pose_model`, a whole-body ONNX model; one person per
      frame, a frame without one renders blank).
    canvas: (H, W) the JSON keypoints are in when a file records no canvas (default: the model size).
  """
  files = pose_files(path, pose_model)
  canvas = canvas or size
  if files[0].lower().endswith(VIDEO_SUFFIXES):
    poses = _video_poses(files[0], size, pose_model)
  elif files[0].lower().endswith(".json"):
    poses = np.stack([_render_json(p, size, canvas) for p in files])
  else:
    frames = [read_image(p) for p in files]
    shapes = sorted({f.shape[:2] for f in frames})
    if len(shapes) > 1:
      raise ValueError(f"--poses {os.fspath(path)}: pose images of different sizes {shapes}; one sequence's frames "
                       f"must share a size")
    poses = np.stack([fit(f, size) for f in frames])
  warn_blank_poses(poses, files)
  return poses


def blank_pose_frames(poses: np.ndarray) -> list[int]:
  """Indices of the renders `[F, H, W, 3]` that are all black: frames where no person was drawn."""
  return [int(i) for i in np.flatnonzero(~poses.reshape(len(poses), -1).any(axis=1))]


def warn_blank_poses(poses: np.ndarray, files: Sequence[str]) -> list[int]:
  """Logs a warning naming the frames without a person (the model animates them with no pose to follow: noise or a
  copy of the reference, not the person), by file name, or by index for a video; returns their indices."""
  blank = blank_pose_frames(poses)
  if blank:
    names = [os.path.basename(files[i]) if len(files) == len(poses) else f"frame {i}" for i in blank]
    shown = ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
    where = os.path.dirname(files[0]) if len(files) == len(poses) else files[0]
    log.warning("%d of %d pose frames of %s show no person (nothing to follow: the model generates them "
                "unguided): %s", len(blank), len(poses), where, shown)
  return blank


def _check_pose_model(path: str, pose_model: str | None) -> None:
  """Cheap checks that a video's poses can be extracted (before any model is loaded)."""
  from magicpose_jax.pose import extract, models  # noqa: PLC0415

  if pose_model is None:
    try:
      models.check_installed()
    except models.MissingModelError as e:
      raise FileNotFoundError(f"--poses {path}: a video's poses are extracted with MediaPipe's models; {e}") from None
    return
  if importlib.util.find_spec("onnxruntime") is None:
    raise ValueError(f"--poses {path}: --pose-model needs onnxruntime, which is not installed, or extract the "
                     f"poses first with python -m magicpose_jax.pose.extract and pass the folder.\n"
                     f"{extract.NO_MODEL_MESSAGE}")
  if not os.path.isfile(pose_model):
    raise FileNotFoundError(f"--pose-model {pose_model}: no such file")


def _video_keypoints(path: str, pose_model: str | None) -> tuple[list, tuple[int, int], dict]:
  """(one Pose or None per frame, the frames' (H, W), extraction report) of a video."""
  from magicpose_jax.pose import extract  # noqa: PLC0415  (the extractor's runtime, imported only for videos)

  estimate = extract.make_estimator(pose_model)
  shape: list[tuple[int, int]] = []

  def frames():
    for _, frame in extract.iter_frames(path):
      if frame is not None:
        shape.append(frame.shape[:2])
      yield frame

  poses, report = extract.extract_poses(frames(), estimate)
  if not shape:
    raise ValueError(f"--poses {path}: the video has no readable frames")
  return poses, shape[0], report


def _video_poses(path: str, size: tuple[int, int], pose_model: str | None) -> np.ndarray:
  poses, canvas, _ = _video_keypoints(path, pose_model)
  box = center_box(*canvas)
  return np.stack([render(crop_poses([p] if p is not None else [], box, size[0]), *size) for p in poses])


def _json_keypoints(files: Sequence[str], canvas: tuple[int, int]) -> tuple[list, tuple[int, int]]:
  """(first person of each OpenPose JSON file or None, the files' canvas (H, W))."""
  poses, canvases = [], set()
  for f in files:
    people = read_openpose_json(f)
    poses.append(people[0] if people else None)
    canvases.add(read_openpose_canvas(f) or canvas)
  if len(canvases) > 1:
    raise ValueError(f"--poses: OpenPose JSON files with different canvases {sorted(canvases)}; one sequence's "
                     f"frames must share a size")
  return poses, canvases.pop()


def check_alignable(path: str | os.PathLike, pose_model: str | None = None) -> list[str]:
  """`pose_files(path)`, after checking they hold keypoints (a video or OpenPose JSON) that alignment can move."""
  files = pose_files(path, pose_model)
  if not files[0].lower().endswith((*VIDEO_SUFFIXES, ".json")):
    raise ValueError(f"--poses {os.fspath(path)}: alignment needs keypoints (a video or OpenPose JSON files), not "
                     f"pose images")
  return files


def load_aligned_poses(path: str | os.PathLike, size: tuple[int, int], reference: np.ndarray,
                       pose_model: str | None = None,
                       canvas: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
  """Pose renders uint8 `[F, H, W, 3]` of the driving poses aligned to the reference person (`pose.align`).

  The reference's own pose is extracted from `reference` (uint8 [H, W, 3], the original image) with the same
  extractor as a video's frames; the aligned poses are drawn on the reference's canvas and cropped like it.

  Args:
    path: a video, or a folder of / one OpenPose JSON file (keypoints are needed: pose images cannot be aligned).
    canvas: (H, W) of JSON files that record none (default: the reference image's size).

  Returns:
    (renders, report): the alignment report (`no_person` frames, `scales`, ...) with the extraction report of a
    video under `extract`. Frames without a person render blank and are listed, never dropped.
  """
  from magicpose_jax.pose import extract  # noqa: PLC0415
  from magicpose_jax.pose.align import align_poses  # noqa: PLC0415

  files = check_alignable(path, pose_model)
  if files[0].lower().endswith(VIDEO_SUFFIXES):
    driving, _, extract_report = _video_keypoints(files[0], pose_model)
  else:
    driving, _ = _json_keypoints(files, canvas or reference.shape[:2])
    extract_report = None
  (ref_pose,), _ = extract.extract_poses([reference], extract.make_estimator(pose_model))
  if ref_pose is None:
    raise ValueError("--reference: no person found in the reference image, so its proportions are unknown; "
                     "animate without alignment")
  aligned, report = align_poses(driving, ref_pose)
  report["extract"] = extract_report
  box = center_box(*reference.shape[:2])
  renders = np.stack([render(crop_poses([p], box, size[0]), *size) for p in aligned])
  return renders, report


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the jitted functions close over (hashable)."""

  model: MagicPose
  vae: AutoencoderKL | PatchVAE
  sampler: SamplerConfig
  schedule_config: Any


def _encode(static: _Static, vae_params: Any, image: jax.Array) -> jax.Array:
  x = image.astype(jnp.float32) / 127.5 - 1.0
  return scale_latents(static.vae.apply({"params": vae_params}, x, method="encode").mode(), static.vae.config)


def _decode(static: _Static, vae_params: Any, z: jax.Array) -> jax.Array:
  x = static.vae.apply({"params": vae_params}, unscale_latents(z, static.vae.config), method="decode")
  return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _chunk(static: _Static, params: Any, vae_params: Any, x_T: jax.Array, text: jax.Array, z_ref: jax.Array,
           poses: jax.Array, cached: Any) -> jax.Array:
  """uint8 frames `[n, H, W, 3]` for uint8 `poses [n, H, W, 3]`."""
  schedule = make_schedule(static.schedule_config)
  pose_image = poses.astype(jnp.float32) / 255.0
  z = sample(static.model, params, schedule, static.schedule_config, static.sampler, x_T, text, z_ref, pose_image,
             cached_states=cached)
  return _decode(static, vae_params, z)


_encode_jit = jax.jit(_encode, static_argnums=0)
_chunk_jit = jax.jit(_chunk, static_argnums=0)
_states_jit = jax.jit(precompute_reference_states, static_argnums=0)


def animate(model: TrainedModel, reference: np.ndarray, poses: np.ndarray, options: AnimateOptions = AnimateOptions(),
            progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Generated frames uint8 `[F, H, W, 3]` for `reference [H, W, 3]` and `poses [F, H, W, 3]` (the model's size).

  `progress(n)` is called after each chunk of n frames. Chunks are padded to `batch_frames` so every chunk
  reuses one compilation.
  """
  size = model.image_size
  if reference.shape != (*size, 3) or poses.shape[1:] != (*size, 3):
    raise ValueError(f"reference {reference.shape} and poses {poses.shape[1:]} must be the model's size {(*size, 3)} "
                     f"(load_reference / load_poses prepare them)")
  if len(poses) == 0:
    raise ValueError("no poses to animate")
  mp = MagicPose(model.model, dtype=options.dtype)
  static = _Static(mp, make_vae(model.sd.vae, options.dtype),
                   SamplerConfig(num_steps=options.steps, guidance=options.guidance), model.sd.scheduler)
  # The ablations (demo/retarget.py) lack one controller: sample with the nets the model has.
  params = {k: model.params[k] for k in ("unet", "appearance", "pose") if k in model.params}
  vae = model.params["vae"]
  text = jnp.asarray(stages.text_context(model.sd, model.params["text_encoder"]))  # [1, L, D]
  z_ref = _encode_jit(static, vae, jnp.asarray(reference)[None])  # [1, h, w, 4]
  cached = None
  if options.cache and model.model.use_appearance:
    cached = _states_jit(mp, params, z_ref, text, step_times(model.sd.scheduler, options.steps)[0])
  frames, n = len(poses), min(options.batch_frames, len(poses))
  key = jax.random.key(options.seed)
  latent = (*z_ref.shape[1:3], model.model.unet.out_channels)
  noise = jax.random.normal(key, (frames if options.per_frame_noise else 1, *latent), jnp.float32)
  texts = jnp.broadcast_to(text, (n, *text.shape[1:]))
  out = []
  for start in range(0, frames, n):
    chunk = poses[start:start + n]
    pad = n - len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
    x_T = noise[start:start + n] if options.per_frame_noise else jnp.broadcast_to(noise, (n, *latent))
    if x_T.shape[0] < n:
      x_T = jnp.concatenate([x_T, jnp.broadcast_to(x_T[-1:], (pad, *latent))])
    images = _chunk_jit(static, params, vae, x_T, texts, z_ref, jnp.asarray(chunk), cached)
    out.append(np.asarray(images)[: n - pad])
    if progress is not None:
      progress(n - pad)
  return np.concatenate(out)


def side_by_side(reference: np.ndarray, poses: np.ndarray, frames: np.ndarray) -> np.ndarray:
  """uint8 `[F, H, 3W, 3]`: reference | pose | generated, per frame."""
  refs = np.broadcast_to(reference, frames.shape)
  return np.concatenate([refs, poses, frames], axis=2)


def side_by_side_path(out: str | os.PathLike) -> str:
  stem, ext = os.path.splitext(os.fspath(out))
  return f"{stem}_side_by_side{ext}"


def check_output(path: str | os.PathLike) -> str:
  """The output suffix, after checking it is writable here (an mp4 needs imageio and imageio-ffmpeg's ffmpeg)."""
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext not in OUTPUT_SUFFIXES:
    raise ValueError(f"--out {path}: expected a {', '.join(OUTPUT_SUFFIXES)} file")
  if ext == ".mp4" and (importlib.util.find_spec("imageio") is None
                        or importlib.util.find_spec("imageio_ffmpeg") is None):
    raise ValueError(f"--out {path}: writing .mp4 needs imageio and imageio-ffmpeg, which requirements.txt pins "
                     f"(pip install -r requirements.txt); or write a .gif (pillow) or a .png strip")
  return ext


def write_frames(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> None:
  """Writes uint8 `[F, H, W, 3]` as an mp4, a gif (pillow) or a png strip (frames side by side).

  The mp4 is H.264 in yuv420p (what browsers play) with the index up front (`+faststart`, so a page plays it while
  it loads), encoded by the ffmpeg binary that imageio-ffmpeg ships; H and W must be even (model sizes are).
  """
  path = os.fspath(path)
  ext = check_output(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if ext == ".png":
    cv2.imwrite(path, np.concatenate(list(frames), axis=1)[..., ::-1])
  elif ext == ".gif":
    from PIL import Image  # noqa: PLC0415

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
  else:
    import imageio.v2 as imageio  # noqa: PLC0415  (only for videos)

    if frames.shape[1] % 2 or frames.shape[2] % 2:
      raise ValueError(f"{path}: frames {frames.shape[1]}x{frames.shape[2]}: H.264 in yuv420p needs even sizes; "
                       f"write a .gif or .png")
    with warnings.catch_warnings():
      # JAX warns on any fork; this one is subprocess's fork+exec of the ffmpeg binary (no Python in the child).
      warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
      imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1,
                       ffmpeg_params=["-movflags", "+faststart"])
