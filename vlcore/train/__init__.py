"""vlcore's trainer (open_clip's ``open_clip_train`` counterpart): ``vlcore-train`` / ``python -m vlcore.train``
and ``vlcore-eval``, both in :mod:`vlcore.train.cli`.

Read it in this order; each module imports only the ones above it, never one below:

- :mod:`~vlcore.train.params`: the config dataclass, presets (``presets/*.json``), command-line overrides;
- :mod:`~vlcore.train.synthetic`: the embedded procedurally generated shapes dataset;
- :mod:`~vlcore.train.data`: synthetic, WebDataset and CSV sources, batching in workers, exact positions;
- :mod:`~vlcore.train.tasks`: batches and losses per model kind;
- :mod:`~vlcore.train.optim`, :mod:`~vlcore.train.checkpoint`, :mod:`~vlcore.train.fsdp`,
  :mod:`~vlcore.train.logs`: the optimizer recipe, atomic checkpoints, sharding, what the user sees;
- :mod:`~vlcore.train.metrics`: retrieval recall and the caption loss;
- :mod:`~vlcore.train.run`: the run object the loop takes;
- :mod:`~vlcore.train.builders`: config -> model, optimizer, schedule, data, precision, resume: a run;
- :mod:`~vlcore.train.loop`: the training loop;
- :mod:`~vlcore.train.cli`: the two command lines.

The trainer depends on :mod:`vlcore.models`, never the reverse.
"""
