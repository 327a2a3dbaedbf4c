"""Models of pacofr: the PaCo-FR encoder/decoder, codebook and Belief Predictor, and the MAE-face control."""
