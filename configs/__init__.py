"""ml_collections configs (demo, tiny, stage1, stage2) land with the training issue."""
