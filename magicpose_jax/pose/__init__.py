"""Poses: OpenPose keypoint arrays, OpenPose JSON files, ControlNet-style rendering, optional ONNX extraction."""

from magicpose_jax.pose.keypoints import (
  BODY25_NAMES,
  BODY25_TO_COCO18,
  COCO18_NAMES,
  Pose,
  body25_to_coco18,
  crop_resize,
  flip_horizontal,
  from_wholebody,
  to_wholebody,
)
from magicpose_jax.pose.openpose_json import read_openpose_canvas, read_openpose_json, write_openpose_json
from magicpose_jax.pose.render import render

__all__ = [
  "BODY25_NAMES",
  "BODY25_TO_COCO18",
  "COCO18_NAMES",
  "Pose",
  "body25_to_coco18",
  "crop_resize",
  "flip_horizontal",
  "from_wholebody",
  "read_openpose_canvas",
  "read_openpose_json",
  "render",
  "to_wholebody",
  "write_openpose_json",
]
