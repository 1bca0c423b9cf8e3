"""Datasets: frame sources (synthetic figures, TikTok-style folders), pairs, augmentation, grain pipelines."""
