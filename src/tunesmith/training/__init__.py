"""Training: the loop (:mod:`.loop`), batching, schedules, checkpoints, hooks and the loss.

Import the submodules directly (``from tunesmith.training.loop import Trainer``).
"""
