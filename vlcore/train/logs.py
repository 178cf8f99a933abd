"""What the user sees: a tqdm bar, one line per log interval, metrics.jsonl + TensorBoard, and at the end a
PNG of the curves and a short text report. Only rank 0 writes anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional


class RunLogger:
    def __init__(self, out_dir: Path, cfg, enabled: bool, start_step: int):
        self.enabled, self.out_dir = enabled, out_dir
        self.bar, self.tb, self.records = None, None, []
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        # On resume, forget records past the checkpoint: those steps run again and are logged again.
        if self.metrics_path.exists():
            with open(self.metrics_path) as f:
                self.records = [r for r in map(json.loads, f) if r.get("step", 0) <= start_step]
        with open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                print("vlcore-train: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        if cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def progress(self, steps: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(records: list[dict], path: Path) -> Optional[Path]:
    """Training loss (left) and evaluation metrics (right) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    chance = [r["i2t_chance_R@1"] for r in evals if "i2t_chance_R@1" in r]
    if chance:
        right.axhline(chance[-1], color="gray", ls=":", label="chance (i2t R@1)")
    right.set(xlabel="step", title="held-out evaluation")
    right.grid(alpha=0.3)
    if keys:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(summary: dict) -> str:
    """The end-of-run text report."""
    lines = ["", "=== vlcore-train report ==="]
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"{key:>22}: {value}")
    return "\n".join(lines)
