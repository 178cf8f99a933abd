"""Evaluation results as JSON lines: one line per metric, ``{"step", "metric", "value", ...}``, appended, so
that a run's evaluations over time are one file that ``pandas.read_json(path, lines=True)`` reads."""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Optional

__all__ = ["write_metrics_jsonl", "read_metrics_jsonl"]


def write_metrics_jsonl(path: str, metrics: dict, *, step: int, checkpoint: Optional[str] = None, **fields) -> int:
    """Append one line per numeric entry of ``metrics`` (bools and non-numbers skipped; NaN / inf written as
    null) with the checkpoint's ``step``, its path and any extra ``fields`` (e.g. ``dataset="coco"``).
    Returns the number of lines written."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValueError(f"write_metrics_jsonl: step must be an int, got {step!r}")
    lines = []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value) if not isinstance(value, numbers.Integral) else int(value)
        row = {"step": int(step), "metric": str(name), "value": value if math.isfinite(value) else None}
        if checkpoint is not None:
            row["checkpoint"] = str(checkpoint)
        row.update(fields)
        lines.append(json.dumps(row, sort_keys=False))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return len(lines)


def read_metrics_jsonl(path: str) -> list[dict]:
    """The rows of a metrics file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
