"""vlcore's trainer (open_clip's ``open_clip_train`` counterpart): ``vlcore-train`` / ``python -m vlcore.train``
(entry point :func:`vlcore.train.main.main`), ``vlcore-eval`` (:func:`vlcore.train.evaluate.eval_main`).

- :mod:`~vlcore.train.params`: the config dataclass, presets (``presets/*.json``), command-line overrides;
- :mod:`~vlcore.train.synthetic`: the embedded procedurally generated shapes dataset;
- :mod:`~vlcore.train.data`: synthetic, WebDataset and CSV sources, batching in workers, exact positions;
- :mod:`~vlcore.train.tasks`: batches and losses per model kind;
- :mod:`~vlcore.train.loop`: the training loop; :mod:`~vlcore.train.main`: setup and entry point;
- :mod:`~vlcore.train.optim`, :mod:`~vlcore.train.checkpoint`, :mod:`~vlcore.train.evaluate`,
  :mod:`~vlcore.train.logs`.

The trainer depends on :mod:`vlcore.models`, never the reverse.
"""
