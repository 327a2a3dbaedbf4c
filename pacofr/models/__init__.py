"""Models of pacofr: PaCo-FR (:class:`PaCoFR`), the MAE-face control (:class:`MAEFace`, whose encoder,
decoder and reconstruction loss every method shares), and the MCF-style and FRA-style peers;
:func:`build_model` builds the one ``cfg.method`` names."""

import logging

from torch import nn

from pacofr.models.config import ModelConfig
from pacofr.models.fra import FRA
from pacofr.models.mcf import MCF
from pacofr.models.mae import MAEFace
from pacofr.models.output import ModelOutput
from pacofr.models.paco import PaCoFR

logger = logging.getLogger(__name__)

#: model class of every ``ModelConfig.method``
MODEL_CLASSES: dict[str, type[nn.Module]] = {"paco": PaCoFR, "mae": MAEFace, "mcf": MCF, "fra": FRA}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The pre-training model of ``cfg.method``: PaCo-FR (:class:`PaCoFR`), the MAE-face control
    (:class:`MAEFace`), MCF-style (:class:`MCF`) or FRA-style (:class:`FRA`); each satisfies
    :class:`pacofr.train.contract.PretrainingModel`."""
    if cfg.method not in MODEL_CLASSES:
        raise ValueError(f"model.method must be one of {sorted(MODEL_CLASSES)}, got {cfg.method!r}")
    model = MODEL_CLASSES[cfg.method](cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s (method=%s): %.2fM trainable parameters, %d patches of %d px", type(model).__name__,
                cfg.method, trainable / 1e6, cfg.num_patches, cfg.patch_size)
    return model


__all__ = ["FRA", "MAEFace", "MCF", "MODEL_CLASSES", "ModelConfig", "ModelOutput", "PaCoFR", "build_model"]
