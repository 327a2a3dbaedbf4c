"""Evaluation of pre-trained encoders (``pacofr eval``).

Modules, one job each:

- :mod:`~pacofr.eval.labelled`: labelled sets (class folders, CSV) and the fixed hash split;
- :mod:`~pacofr.eval.proxy`: offline proxy sets (``proxy:lfw-face-vs-nonface``);
- :mod:`~pacofr.eval.encoders`: encoders from a checkpoint, an export folder or ``random:PRESET``;
- :mod:`~pacofr.eval.features`: images, normalisation, pooled features;
- :mod:`~pacofr.eval.metrics`: accuracy, losses, the final-epoch summary over seeds;
- :mod:`~pacofr.eval.linear_probe`, :mod:`~pacofr.eval.finetune`: the two classifiers;
- :mod:`~pacofr.eval.evaluate`: both applied to a loaded encoder and a labelled set;
- :mod:`~pacofr.eval.tasks`: the registry behind ``pacofr eval <task>``
  (:mod:`~pacofr.eval.classification` registers ``linear-probe`` and ``finetune``);
- :mod:`~pacofr.eval.compare`, :mod:`~pacofr.eval.report`: PaCo-FR vs MAE-face vs random init,
  written as JSON, a markdown table and a bar plot.
"""
