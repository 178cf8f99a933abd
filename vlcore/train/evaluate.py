"""Deprecated: the metrics are :mod:`vlcore.train.metrics`, ``vlcore-eval`` is :mod:`vlcore.train.cli`.

``from vlcore.train.evaluate import retrieval_metrics`` keeps working and warns (a ``DeprecationWarning``).
"""

from vlcore.train._moved import moved_getattr

_CLI, _METRICS = "vlcore.train.cli", "vlcore.train.metrics"
__getattr__ = moved_getattr(__name__, {
    "retrieval_metrics": _METRICS, "caption_loss": _METRICS, "evaluate": _METRICS,
    "eval_main": _CLI, "eval_cli": _CLI,
})
