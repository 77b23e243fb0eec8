"""The DeepSpeed trainer: typed config, models, engine, training loop, checkpoints, export."""
