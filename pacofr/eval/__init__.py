"""Evaluation of pre-trained encoders and classic baselines (``pacofr eval``).

Modules, one job each:

- :mod:`~pacofr.eval.splits`: hash splits, split columns, the validation split carved from train;
- :mod:`~pacofr.eval.labelled`: labelled sets (images, targets of one kind, split) and their checks;
- :mod:`~pacofr.eval.readers`: a user's folder, CSV (+ zip) or npz; :mod:`~pacofr.eval.proxy`: offline proxy sets;
- :mod:`~pacofr.eval.face_protocols`: face sets with fixed protocols (FER-2013, UTKFace, Olivetti, Yale B, landmarks);
- :mod:`~pacofr.eval.encoders`: encoders from a checkpoint, an export folder or ``random:PRESET``;
- :mod:`~pacofr.eval.baselines`: raw pixels, PCA, HOG, LBP;
- :mod:`~pacofr.eval.features`, :mod:`~pacofr.eval.extractors`: streamed images to features, for any row;
- :mod:`~pacofr.eval.probe_heads`, :mod:`~pacofr.eval.probe_protocols`, :mod:`~pacofr.eval.finetune`: linear probe,
  ridge, MLP head, k-NN and fine-tune, hyper-parameters picked on val;
- :mod:`~pacofr.eval.metrics`: scores per target kind and the final-epoch summary over seeds;
- :mod:`~pacofr.eval.evaluate`: the one code path of a row on labelled sets; :mod:`~pacofr.eval.grid`: many rows;
- :mod:`~pacofr.eval.study`: pre-training variants at equal steps and equal compute, then the grid
  (its parts: :mod:`~pacofr.eval.study_variants`, :mod:`~pacofr.eval.compute_budget`, :mod:`~pacofr.eval.study_report`);
- :mod:`~pacofr.eval.report`: JSON, markdown tables and the plot;
- :mod:`~pacofr.eval.task_registry`: the registry behind ``pacofr eval <task>`` (:mod:`~pacofr.eval.user_data_commands`,
  :mod:`~pacofr.eval.face_protocol_commands` register the tasks).
"""
