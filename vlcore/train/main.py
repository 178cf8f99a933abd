"""Deprecated: the command line is :mod:`vlcore.train.cli`, the setup :mod:`vlcore.train.builders`.

``from vlcore.train.main import main`` keeps working and warns (a ``DeprecationWarning``).
"""

from vlcore.train._moved import moved_getattr

_CLI, _BUILDERS = "vlcore.train.cli", "vlcore.train.builders"
__getattr__ = moved_getattr(__name__, {
    "main": _CLI, "cli": _CLI + ":train_cli",
    "build_model": _BUILDERS, "model_overrides": _BUILDERS, "enable_grad_checkpointing": _BUILDERS,
    "autocast_for": _BUILDERS, "image_transform": _BUILDERS, "build_stream_spec": _BUILDERS,
    "build_eval_set": _BUILDERS, "setup_distributed": _BUILDERS, "seed_everything": _BUILDERS,
    "find_resume": _BUILDERS,
})
