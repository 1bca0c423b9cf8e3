"""Pictures of results: labelled image grids with a caption strip, and GIF (and, if available, MP4) animations.

    grid = image_grid([[ref, pose, generated, truth], ...], column_titles=("reference", ...), caption="L1 0.08")
    save_png(grid, "retarget.png"); save_animation(frames, "animation.gif")

Images are uint8 [H, W, 3] RGB. Small images (64 px) are enlarged by an integer factor with nearest-neighbour
sampling, so the pixels stay sharp and the text stays readable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BACKGROUND = 255
_INK = (20, 20, 20)


def enlarge(image: np.ndarray, factor: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [H*factor, W*factor, 3], nearest neighbour."""
  return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _wrap(line: str, width: int, scale: float) -> list[str]:
  """`line` cut at its double spaces (the caption's field separators) into rows no wider than `width` pixels; a
  field wider than that alone keeps a row of its own."""
  fits = lambda text: cv2.getTextSize(text, _FONT, scale, 1)[0][0] <= width
  if fits(line):
    return [line]
  rows: list[str] = []
  for field in line.split("  "):
    if rows and fits(rows[-1] + "  " + field):
      rows[-1] += "  " + field
    else:
      rows.append(field if not rows else "    " + field)  # continuation rows indented
  return rows


def _text_strip(lines: Sequence[str], width: int, scale: float = 0.45, pad: int = 6) -> np.ndarray:
  """A white strip [h, width, 3] with `lines` of text, one per row; a line wider than the strip wraps at its
  double spaces."""
  line_h = round(22 * scale / 0.45)
  rows = [row for line in lines for row in _wrap(line, width - 2 * pad, scale)]
  strip = np.full((pad * 2 + line_h * len(rows), width, 3), _BACKGROUND, np.uint8)
  for i, row in enumerate(rows):
    cv2.putText(strip, row, (pad, pad + line_h * (i + 1) - 6), _FONT, scale, _INK, 1, cv2.LINE_AA)
  return strip


def image_grid(rows: Sequence[Sequence[np.ndarray]], *, column_titles: Sequence[str] = (),
               row_labels: Sequence[str] = (), caption: Sequence[str] | str = (), scale: int = 2,
               gap: int = 4) -> np.ndarray:
  """Rows of equally sized images, with optional column titles, row labels and a caption strip below.

  Args:
    rows: R rows of C uint8 [H, W, 3] images each.
    column_titles: C titles above the columns.
    row_labels: R labels on the left (e.g. the identity).
    caption: line(s) of text under the grid (e.g. the metrics).
    scale: integer enlargement of every image.
    gap: white pixels between cells.

  Returns:
    uint8 [H', W', 3].
  """
  if not rows or not rows[0]:
    raise ValueError("image_grid: expected at least one row with one image")
  cols = len(rows[0])
  if any(len(r) != cols for r in rows):
    raise ValueError(f"image_grid: every row must have {cols} images, got {[len(r) for r in rows]}")
  h, w = rows[0][0].shape[:2]
  cell_h, cell_w = h * scale, w * scale
  label_w = 0
  if row_labels:
    label_w = max(cv2.getTextSize(label, _FONT, 0.45, 1)[0][0] for label in row_labels) + 2 * gap
  width = label_w + cols * cell_w + (cols + 1) * gap
  body = np.full((len(rows) * cell_h + (len(rows) + 1) * gap, width, 3), _BACKGROUND, np.uint8)
  for r, row in enumerate(rows):
    y = gap + r * (cell_h + gap)
    for c, image in enumerate(row):
      if image.shape[:2] != (h, w):
        raise ValueError(f"image_grid: row {r} column {c} is {image.shape[:2]}, expected {(h, w)}")
      x = label_w + gap + c * (cell_w + gap)
      body[y:y + cell_h, x:x + cell_w] = enlarge(np.asarray(image, np.uint8)[..., :3], scale)
    if row_labels:
      cv2.putText(body, row_labels[r], (gap, y + cell_h // 2 + 5), _FONT, 0.45, _INK, 1, cv2.LINE_AA)
  parts = []
  if column_titles:
    header = np.full((24, width, 3), _BACKGROUND, np.uint8)
    for c, title in enumerate(column_titles):
      size = cv2.getTextSize(title, _FONT, 0.45, 1)[0][0]
      x = label_w + gap + c * (cell_w + gap) + max(0, (cell_w - size) // 2)
      cv2.putText(header, title, (x, 17), _FONT, 0.45, _INK, 1, cv2.LINE_AA)
    parts.append(header)
  parts.append(body)
  lines = [caption] if isinstance(caption, str) else list(caption)
  if lines:
    parts.append(_text_strip(lines, width))
  return np.concatenate(parts, axis=0)


def save_png(image: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def save_animation(frames: Sequence[np.ndarray], path: str, fps: float = 8.0) -> list[str]:
  """Writes `frames` (uint8 [H, W, 3] each) as a looping GIF at `path` and as `path` with .mp4 (imageio-ffmpeg's
  ffmpeg). Returns the paths written."""
  if not frames:
    raise ValueError(f"save_animation: no frames for {path}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
  written = [path]
  import imageio_ffmpeg  # noqa: PLC0415 (only for videos)

  mp4 = os.path.splitext(path)[0] + ".mp4"
  h, w = frames[0].shape[:2]
  writer = imageio_ffmpeg.write_frames(mp4, (w, h), fps=fps, macro_block_size=1)
  writer.send(None)
  for f in frames:
    writer.send(np.ascontiguousarray(np.asarray(f, np.uint8)))
  writer.close()
  written.append(mp4)
  return written
