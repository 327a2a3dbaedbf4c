"""Evaluation of pre-trained encoders: linear probe (and fine-tuning) on labelled face sets."""
