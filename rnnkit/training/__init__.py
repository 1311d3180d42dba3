"""The one training loop shared by every task, its schedules and checkpoints."""
