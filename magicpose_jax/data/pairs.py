"""Reference/target pairs: which frames of a video make one training example.

The training set is enumerated by *target* frame (every frame of every video once per epoch, which is what makes
an epoch and per-host sharding well defined); the reference is then drawn uniformly from the target's video,
independently of the target, as the release does. Enumerating targets draws videos in proportion to their frame
count, the same distribution as "draw a video by frame count, then a target uniformly in it".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PairConfig:
  """How a reference frame is drawn for a target frame.

  Attributes:
    min_gap: references closer than this many frames to the target (|r - t| < min_gap) are not drawn. 0 = any.
    allow_same: whether the reference may be the target frame itself (the release: yes, frames are drawn
      independently). `allow_same=False` is `min_gap=max(min_gap, 1)`.
  """

  min_gap: int = 0
  allow_same: bool = True

  def __post_init__(self):
    if self.min_gap < 0:
      raise ValueError(f"PairConfig.min_gap must be >= 0, got {self.min_gap}")


class FrameIndex:
  """Flat target index <-> (video, frame position), over videos of given lengths.

  Args:
    counts: frames per video; videos with no frames are allowed (they hold no index).
  """

  def __init__(self, counts: Sequence[int]):
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 1 or (counts < 0).any():
      raise ValueError(f"FrameIndex: counts must be a list of non-negative ints, got {counts!r}")
    self.counts = counts
    self._ends = np.cumsum(counts)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def locate(self, index: int) -> tuple[int, int]:
    """Flat index -> (video, frame position in the video)."""
    if not 0 <= index < len(self):
      raise IndexError(f"frame index {index} out of range [0, {len(self)})")
    video = int(np.searchsorted(self._ends, index, side="right"))
    start = int(self._ends[video - 1]) if video else 0
    return video, index - start


def sample_reference(rng: np.random.Generator, num_frames: int, target: int, config: PairConfig) -> int:
  """A reference frame position for `target` in a video of `num_frames` frames, uniform over the allowed frames.

  When no frame is allowed (a video shorter than the gap), the frame farthest from the target is returned, so a
  short video still yields examples instead of an error mid-training.
  """
  if not 0 <= target < num_frames:
    raise IndexError(f"target frame {target} out of range [0, {num_frames})")
  gap = max(config.min_gap, 0 if config.allow_same else 1)
  if gap == 0:
    return int(rng.integers(num_frames))
  # Allowed frames are [0, target - gap] and [target + gap, num_frames): draw one position over both runs.
  below = max(target - gap + 1, 0)
  above = max(num_frames - (target + gap), 0)
  if below + above == 0:
    return 0 if target >= num_frames - 1 - target else num_frames - 1
  k = int(rng.integers(below + above))
  return k if k < below else target + gap + (k - below)
