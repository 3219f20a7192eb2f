"""Training: configs and recipes, the LR schedule, checkpoints, the shared loop, DDP helpers."""
