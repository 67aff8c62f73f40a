"""The distillation run: building its parts from a config, the training loop, checkpoints and resume."""
