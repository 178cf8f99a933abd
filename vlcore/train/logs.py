"""What the user sees: a tqdm bar, one line per log interval, metrics.jsonl + TensorBoard, and at the end a
PNG of the curves and a short text report. Only rank 0 writes anything.

``metrics.jsonl`` is append-only while the run lives; a crash or a full disk can cut its last line short.
A log must never stop a resume, so on start the file is read line by line, unreadable lines are dropped
(and counted in the log), records past the resumed step are forgotten (those steps run again and are logged
again), and the file is rewritten atomically.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm


def show_progress_bar(setting: Optional[bool], stream) -> bool:
    """``--progress true`` / ``false`` force the bar on or off. Unset (the default), it is shown only when
    ``stream`` is a terminal: under a job scheduler, or with the output sent to a file, every redraw of the
    bar (a carriage return and a new frame) would land in the log between the log lines."""
    if setting is not None:
        return setting
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def read_records(path: Path, last_step: int) -> tuple[list[dict], int]:
    """``(records up to last_step, unreadable lines)`` of a metrics.jsonl; a missing file has neither."""
    if not path.exists():
        return [], 0
    records, unreadable = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            unreadable += 1  # a torn write: the tail of a line that never reached the disk
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            unreadable += 1
            continue
        if record["step"] <= last_step:
            records.append(record)
    return records, unreadable


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a crash leaves the old file or the new one, never a mix: write a
    temporary file beside it (same file system, so the rename is atomic), sync it, rename it over."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunLogger:
    """The run's outputs on rank 0 (every method is a no-op on the other ranks, so the loop never asks
    which rank it is on before logging). ``notes`` collects what the start-up found, for the first lines."""

    def __init__(self, out_dir: Path, cfg, enabled: bool, start_step: int):
        self.enabled, self.out_dir = enabled, out_dir
        self.bar, self.tb, self.records, self.notes = None, None, [], []
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        self.records, unreadable = read_records(self.metrics_path, start_step)
        if unreadable:
            self.notes.append(f"metrics.jsonl: dropped {unreadable} unreadable line(s), the tail of a write cut "
                              f"short (a crash or a full disk)")
        write_atomically(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))
        if cfg.tensorboard:
            # purge_step drops events past the resumed step, which would otherwise show two curves.
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                print("vlcore-train: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        if show_progress_bar(cfg.progress, sys.stderr):
            self.bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def print(self, line: str) -> None:
        """One log line on stdout. With a bar, through tqdm: it erases the bar, writes the line whole and
        redraws the bar below it, so a line never shares a terminal row (or a log-file line) with a frame."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (and TensorBoard). Opened per record rather than kept open:
        each record reaches the file system at once, so a killed run loses at most the line being written."""
        if not self.enabled:
            return
        self.records.append(record)
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: say which file; the next start repairs a torn last line
            raise OSError(e.errno, f"{e.strerror or e} (appending to {self.metrics_path}; the checkpoints are "
                          f"intact: free space and run again to resume)") from e
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def progress(self, steps: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(postfix, refresh=False)  # drawn with the next update: one redraw, not two

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(records: list[dict], path: Path) -> Optional[Path]:
    """Training loss (left) and evaluation metrics (right) against the step."""
    # Imported here, not at the top: matplotlib takes a second to import and is needed once, at the end.
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node: render straight to the PNG
    import matplotlib.pyplot as plt

    # One list of records holds both kinds: training records carry "loss", evaluation records the metrics.
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith(("i2t_R@", "t2i_R@", "caption_loss")) for k in r)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    left.set(xlabel="step", ylabel="training loss", title="loss")
    left.grid(alpha=0.3)
    keys = sorted({k for r in evals for k in r if k.startswith(("i2t_R@", "t2i_R@", "caption_loss"))})
    for key in keys:
        points = [(r["step"], r[key]) for r in evals if key in r]
        right.plot(*zip(*points), marker="o", label=key)
    # A recall curve means little without the floor random scores would reach on this evaluation set.
    chance = [r["i2t_chance_R@1"] for r in evals if "i2t_chance_R@1" in r]
    if chance:
        right.axhline(chance[-1], color="gray", ls=":", label="chance (i2t R@1)")
    right.set(xlabel="step", title="held-out evaluation")
    right.grid(alpha=0.3)
    if keys:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # figures stay alive in pyplot's registry until closed: a long-lived caller would leak
    return path


def report(summary: dict) -> str:
    """The end-of-run text report: one right-aligned ``key: value`` per line, floats to 4 significant digits,
    so that two runs' reports can be compared side by side with diff."""
    lines = ["", "=== vlcore-train report ==="]
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"{key:>22}: {value}")
    return "\n".join(lines)
