"""The names of the evaluation protocols and encoder feature pools (no torch import, so the command
line is built without it)."""

#: protocols of :mod:`pacofr.eval.evaluate`, the frozen-feature ones first
PROTOCOLS: tuple[str, ...] = ("linear", "knn", "mlp", "finetune")
#: encoder feature pools of :mod:`pacofr.eval.features`
POOLS: tuple[str, ...] = ("cls", "mean", "cls+mean", "tokens")
