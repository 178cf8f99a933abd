"""The command lines: ``vlcore-train`` (also ``python -m vlcore.train``) and ``vlcore-eval``.

    vlcore-train                                    # default preset: tiny CLIP on the embedded shapes
    vlcore-train --preset clip-b16 --train-data '/data/laion-{00000..09999}.tar' --data wds
    torchrun --nproc-per-node 8 -m vlcore.train --preset clip-b16 ...
    vlcore-train --help                             # every field, its default and what it does
    vlcore-eval --checkpoint runs/default           # the latest checkpoint of a run, on its evaluation set

This module only parses, calls the builders and the loop, and turns the errors a user can cause into one
line on stderr and a non-zero exit. :func:`main` and :func:`eval_main` are the same programs as functions
(they raise instead of exiting), which is how the tests and other Python programs call them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from vlcore.evaluation import report_lines, write_metrics_jsonl
from vlcore.train.builders import ResumeError, autocast_for, build_eval_set, build_model, build_run
from vlcore.train.checkpoint import latest_checkpoint, load_checkpoint
from vlcore.train.data import DataSchemaError
from vlcore.train.logs import report
from vlcore.train.loop import NonFiniteLoss, train
from vlcore.train.metrics import evaluate
from vlcore.train.params import ConfigError, TrainConfig, apply, help_text, load_config, split_argv

#: errors caused by the configuration or the data rather than by a bug: one line, exit code 2
USER_ERRORS = (ConfigError, DataSchemaError, ResumeError)
#: failures of the environment or of the training itself (a full or read-only disk, a diverged loss): one
#: line, exit code 1. The checkpoints written before are intact, so the run can be resumed.
RUN_ERRORS = (OSError, NonFiniteLoss)


def one_line(error: BaseException) -> str:
    """The error's message on one line. An error raised in a dataloader worker arrives with the worker's
    traceback folded into its message; its last line is the original message."""
    if isinstance(error, OSError) and error.strerror:  # "No space left on device: path", not "[Errno 28] ..."
        return error.strerror + (f": {error.filename}" if error.filename else "")
    lines = [line for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    if len(lines) == 1:
        return lines[0]
    last = lines[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def run_cli(program: str, function) -> object:
    """Run ``function()``; a user or run error becomes ``program: error: ...`` on stderr and an exit code."""
    try:
        return function()
    except USER_ERRORS as e:
        print(f"{program}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2)
    except RUN_ERRORS as e:
        print(f"{program}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train as configured by ``argv`` (default: ``sys.argv[1:]``); returns the final summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return {}
    cfg = load_config(argv)
    threads = torch.get_num_threads()
    try:
        return train(build_run(cfg))
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger program (the tests)
        # Only a group this run created (torchrun's WORLD_SIZE > 1); a caller's own group is left alone.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train_cli() -> None:
    """Console entry point of ``vlcore-train``: errors print one line instead of a traceback."""
    summary = run_cli("vlcore-train", main)
    if summary.get("interrupted"):
        raise SystemExit(130)  # the shell's code for "stopped by Ctrl-C"


def eval_main(argv: Optional[Sequence[str]] = None) -> dict:
    """``vlcore-eval --checkpoint RUN/checkpoints/step_N [--output FILE.jsonl] [--field value ...]``: the run's
    config from the checkpoint, overridden by the given fields (e.g. ``--val-data my.csv --val-data-type csv``,
    or ``--val-data dataset_coco.json --val-data-type karpathy --val-image-root images/``). Prints the report
    lines and appends the metrics, one JSON line each with the checkpoint's step, to ``--output`` (default:
    ``eval_metrics.jsonl`` in the checkpoint's directory)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "--help" in argv or "-h" in argv:
        print(eval_main.__doc__)
        return {}
    pairs = dict(split_argv(argv))
    path = pairs.pop("checkpoint", None)
    output = pairs.pop("output", None)
    if path is None:
        raise ConfigError("--checkpoint PATH is required (a step_* directory or a run's out_dir)")
    if "output" in dict(split_argv(argv)) and not output:
        raise ConfigError("--output needs a value (--output FILE.jsonl)")
    if (Path(path) / "checkpoints").is_dir():  # a run directory: its latest checkpoint
        path = latest_checkpoint(Path(path) / "checkpoints") or path
    try:
        # The checkpoint's own config rebuilds the same model; the command line may change the data only.
        state = load_checkpoint(Path(path))
    except FileNotFoundError as e:
        raise ConfigError(f"--checkpoint: {e}") from None
    cfg = TrainConfig()
    apply(cfg, state["config"], "checkpoint config")
    apply(cfg, pairs, "command line")
    cfg.check()
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    model, model_cfg = build_model(cfg)
    load_checkpoint(Path(path), model)
    model.to(device)
    eval_set = build_eval_set(cfg, model_cfg)
    if eval_set is None:
        raise ConfigError("config field 'val_data': this run's data has no held-out split; give --val-data")
    result = evaluate(model, model_cfg, eval_set, device, autocast_for(cfg, device), cfg)
    metrics = result.metrics
    metrics["eval_skipped"] = eval_set[2]
    print(report(metrics, report_lines(result)).replace("vlcore-train report", "vlcore-eval report").strip())
    output = output or str(Path(path) / "eval_metrics.jsonl")
    written = write_metrics_jsonl(output, metrics, step=int(state["step"]), checkpoint=str(path),
                                  val_data=cfg.val_data or cfg.data)
    print(f"{written} metrics of step {state['step']} appended to {output}")
    metrics["checkpoint"], metrics["step"], metrics["output"] = str(path), int(state["step"]), output
    return metrics


def eval_cli() -> None:
    """Console entry point of ``vlcore-eval``."""
    run_cli("vlcore-eval", eval_main)
