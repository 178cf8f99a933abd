"""Shared benchmark harness: timing, bandwidth and FLOP accounting, one CSV schema, a short table.

Every bench_<family>.py builds its cases, times each provider with :func:`bench`, and reports figures as
ratios to peers measured in the same run (machines are noisy; absolute times from another day are not
comparable). Rows go to ``benchmarks/results/<bench>.csv`` with Liger-Kernel's columns plus the device,
torch version and git sha.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def make_parser(description: str) -> argparse.ArgumentParser:
    """The flags every bench takes; a bench may add its own before parsing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few reps: a smoke run on CPU")
    parser.add_argument("--check", action="store_true",
                        help="the device check: one shape per goal row of BENCHMARKS.md, few reps, within a time "
                             "budget (benchmarks/device_check.sh runs every bench this way)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", default=None, help="where to write rows (default benchmarks/results/<bench>.csv)")
    return parser


def _flush_l2(device: torch.device, _cache={}) -> None:
    # Write 256 MiB, more than any L2 (50 MiB on H100), so each rep starts from DRAM like real training.
    if device not in _cache:
        _cache[device] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    _cache[device].zero_()


def bench(fn: Callable[[], object], *, device: str | torch.device = "cuda", warmup: int = 10, rep: int = 50,
          flush_l2: bool = True) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``fn()``'s time in milliseconds.

    On CUDA each rep is timed with CUDA events around ``fn`` alone, after an L2 flush; on CPU with
    ``time.perf_counter``.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(rep):
            if flush_l2:
                _flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def copy_bandwidth(device: str | torch.device, nbytes: int, *, rep: int = 50) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), measured now on ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = bench(lambda: dst.copy_(src), device=device, rep=rep)
    return 2 * nbytes / ms / 1e6


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} threads visible)"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class Row:
    """One measurement, in Liger-Kernel's CSV schema."""

    kernel_name: str
    kernel_provider: str
    kernel_operation_mode: str  # forward | backward | full | plan
    metric_name: str  # e.g. "GB/s", "% of copy", "waste %"
    metric_unit: str
    x_name: str
    x_value: str
    y_value_50: float
    y_value_20: float | None = None
    y_value_80: float | None = None
    extra_benchmark_config_str: str = ""
    device_name: str = ""
    torch_version: str = field(default_factory=lambda: torch.__version__)
    git_sha: str = field(default_factory=git_sha)
    timestamp: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def write_rows(name: str, rows: list[Row], path: str | None = None) -> Path:
    out = Path(path) if path else RESULTS_DIR / f"{name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else [])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    return out


def print_table(title: str, header: list[str], lines: list[list[object]]) -> None:
    """A short aligned table, the shape device_check.sh gathers into its output."""
    cells = [[str(h) for h in header]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in line] for line in lines]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
