"""Training: optimizer and schedule, atomic checkpoints, the trainer loop."""
from zoo.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
