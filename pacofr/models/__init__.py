"""Models of pacofr: the PaCo-FR encoder/decoder, codebook and Belief Predictor, the MAE-face control,
and the MCF-style and FRA-style peers; :func:`build_model` builds the one ``cfg.method`` names."""

from torch import nn

from pacofr.models.config import ModelConfig
from pacofr.models.fra import FRA
from pacofr.models.mcf import MCF
from pacofr.models.paco import ModelOutput, PaCoFR

#: model class of every ``ModelConfig.method``
MODEL_CLASSES: dict[str, type[nn.Module]] = {"paco": PaCoFR, "mae": PaCoFR, "mcf": MCF, "fra": FRA}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The pre-training model of ``cfg.method``: PaCo-FR and the MAE-face control (:class:`PaCoFR`),
    MCF-style (:class:`MCF`) or FRA-style (:class:`FRA`); all follow the trainer's model contract."""
    if cfg.method not in MODEL_CLASSES:
        raise ValueError(f"model.method must be one of {sorted(MODEL_CLASSES)}, got {cfg.method!r}")
    return MODEL_CLASSES[cfg.method](cfg)


__all__ = ["FRA", "MCF", "MODEL_CLASSES", "ModelConfig", "ModelOutput", "PaCoFR", "build_model"]
