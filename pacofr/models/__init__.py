"""Models of pacofr: the PaCo-FR encoder/decoder, codebook and Belief Predictor, and the MAE-face control."""

from pacofr.models.config import ModelConfig
from pacofr.models.paco import ModelOutput, PaCoFR

__all__ = ["ModelConfig", "ModelOutput", "PaCoFR"]
