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
from typing import Optional, Sequence

from tqdm import tqdm

from vlcore.train.tasks import FUSION_LOSS_TERMS


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

    def log(self, record: dict, tensorboard_prefix: str = "") -> None:
        """Append one record to metrics.jsonl (and TensorBoard, each tag after ``tensorboard_prefix``; a list
        such as ``mir_per_layer`` becomes one scalar per entry, ``mir_layer_0``, ...). Opened per record rather
        than kept open: each record reaches the file system at once, so a killed run loses at most the line
        being written."""
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
                    self.tb.add_scalar(tensorboard_prefix + key, value, record["step"])
                elif isinstance(value, list):
                    name = key.removesuffix("_per_layer")
                    for k, item in enumerate(value):
                        self.tb.add_scalar(f"{tensorboard_prefix}{name}_layer_{k}", item, record["step"])

    def progress(self, steps: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(postfix, refresh=False)  # drawn with the next update: one redraw, not two

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


#: a curve: ``(label, steps, values, line style)``
Curve = tuple


def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def curve_panels(records: list[dict]) -> dict[str, list[Curve]]:
    """What the end-of-run plot draws: panel title -> curves. Panels without data are left out.

    - loss: the training loss, a fusion model's ITC / ITM / MLM terms (dotted) and the held-out caption loss;
    - MIR: the captioner's modality integration rate, beside the loss it should fall with;
    - retrieval: ITC recall solid, ITM re-ranked recall (fusion models) dashed, and the chance level;
    - captions: CIDEr, and shape / (colour, shape) pair accuracy on held-out pairs (solid) and seen (dashed);
    - zero-shot: top-1 accuracy overall, on held-out pairs' classes and on seen ones.
    """
    panels: dict[str, list[Curve]] = {}

    def add(panel: str, label: str, key: str, style: str = "-", source=records) -> None:
        steps, values = _series(source, key)
        if steps:
            panels.setdefault(panel, []).append((label, steps, values, style))

    add("loss", "training loss", "loss")
    for term in FUSION_LOSS_TERMS:
        add("loss", f"{term.upper()} term", f"loss_{term}", ":")
    add("MIR (lower: image tokens closer to text)", "MIR", "mir")
    add("loss", "held-out caption loss", "caption_loss", "--")
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            add("retrieval recall", f"{direction} R@{k} (ITC)", f"{direction}_R@{k}")
        add("retrieval recall", f"{direction} R@1 (ITM re-ranked)", f"{direction}_itm_R@1", "--")
    add("retrieval recall", "chance i2t R@1", "i2t_chance_R@1", ":")
    add("captions", "CIDEr", "cider")
    for attribute in ("shape", "pair"):
        add("captions", f"{attribute} accuracy, held-out pairs", f"attr_{attribute}_held_out")
        add("captions", f"{attribute} accuracy, seen pairs", f"attr_{attribute}_seen", "--")
    add("zero-shot top-1", "all classes", "top1_accuracy", ":")
    add("zero-shot top-1", "held-out pairs' classes", "top1_accuracy_held_out")
    add("zero-shot top-1", "seen pairs' classes", "top1_accuracy_seen", "--")
    return panels


def plot_curves(records: list[dict], path: Path) -> Optional[Path]:
    """The panels of :func:`curve_panels` side by side, against the step."""
    # Imported here, not at the top: matplotlib takes a second to import and is needed once, at the end.
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node: render straight to the PNG
    import matplotlib.pyplot as plt

    panels = curve_panels(records)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for axis, (title, curves) in zip(axes[0], panels.items()):
        for label, steps, values, style in curves:
            # A lone point (an evaluation at the end only) needs a marker to be seen at all.
            axis.plot(steps, values, style, marker="o" if len(steps) < 20 else None, lw=1, label=label)
        axis.set(xlabel="step", title=title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # figures stay alive in pyplot's registry until closed: a long-lived caller would leak
    return path


def report(summary: dict, eval_lines: Sequence[str] = ()) -> str:
    """The end-of-run text report: one right-aligned ``key: value`` per line, floats to 4 significant digits,
    so that two runs' reports can be compared side by side with diff; then the final evaluation as a reader
    wants it (recall lines, caption metrics, attribute accuracy, zero-shot, MIR, sample captions)."""
    lines = ["", "=== vlcore-train report ==="]
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list) and all(isinstance(v, float) for v in value):
            value = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
        lines.append(f"{key:>22}: {value}")
    if eval_lines or "mir" in summary:
        lines += ["", "=== final evaluation ==="]
    if "mir" in summary:
        per_layer = ", ".join(f"{v:.3g}" for v in summary.get("mir_per_layer", []))
        lines.append(f"MIR {summary['mir']:.4f} (log10 of the summed per-layer Frechet distances: {per_layer})")
    lines += list(eval_lines)
    return "\n".join(lines)
