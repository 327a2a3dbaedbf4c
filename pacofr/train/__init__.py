"""Pre-training: the configuration, the training loop, its run folder and checkpoints, export.

The command-line entry point is ``pacofr pretrain`` (:mod:`pacofr.commands.pretrain`).
"""
