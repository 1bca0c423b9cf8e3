"""Evaluation: per-image metrics (L1, PSNR, SSIM), pose and identity metrics against synthetic ground truth."""

from magicpose_jax.eval.figure_metrics import (
  REGIONS,
  evaluate_figures,
  palette_from_frame,
  part_iou,
  recover_parts,
  region_errors,
  region_map,
)
from magicpose_jax.eval.image_metrics import l1, psnr, ssim

__all__ = [
  "REGIONS",
  "evaluate_figures",
  "l1",
  "palette_from_frame",
  "part_iou",
  "psnr",
  "recover_parts",
  "region_errors",
  "region_map",
  "ssim",
]
