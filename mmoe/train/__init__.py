"""The training engine (DeepSpeed), checkpoints and tasks."""
