"""benchmarks/device_check.sh in its CPU dry run: the budget is enforced (a step past its slice is killed and
reported, a step with no budget left is skipped and reported), results stay within 8 files under $OUT, and
the summary comes last. CI runs the whole dry run (.ci/run); these tests run a few steps of it."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
ALLOWED = {"summary.txt", "build.log", "tests.log", "sanitizer.log", "bench.csv", "bench.log", "sass.txt"}


def dry_run(out: Path, steps: str, budget: int, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DEVICE_CHECK_STEPS=steps)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--budget", str(budget)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def summary_rows(out: Path) -> dict[str, list[str]]:
    """step name -> [status, seconds, slice, detail] from summary.txt."""
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        parts = line.split(None, 4)
        if len(parts) >= 4 and parts[0].replace("_", "").isalnum() and parts[2].isdigit():
            rows[parts[0]] = parts[1:]
    return rows


def test_device_check_dry_run_steps(tmp_path):
    result = dry_run(tmp_path, "build env collect test_seq_pack bench_seq_pack sass", budget=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert files <= ALLOWED and len(files) <= 8, files
    rows = summary_rows(tmp_path)
    assert rows["budget_probe"][0] == "ok" and "killed at its 3 s slice" in rows["budget_probe"][3]
    assert rows["build"][0] == "ok" and "imports" in rows["build"][3]
    assert rows["test_seq_pack"][0] == "ok" and "2 passed" in rows["test_seq_pack"][3]
    assert rows["sass"][0] == "skipped"
    for name in ("build", "collect", "test_seq_pack", "bench_seq_pack"):
        assert int(rows[name][1]) <= int(rows[name][2]), rows[name]  # within its slice
    with (tmp_path / "bench.csv").open() as f:
        bench = list(csv.DictReader(f))
    assert {r["kernel_name"] for r in bench} >= {"pack", "unpack", "packing_plan"}
    # the summary is printed last
    assert result.stdout.rstrip().splitlines()[-1].startswith("benchmark rows:")
    assert "total:" in result.stdout and "of the 400 s budget" in result.stdout


def test_device_check_reports_steps_without_budget(tmp_path):
    result = dry_run(tmp_path, "build env", budget=4, timeout=120)
    assert result.returncode == 1, result.stdout[-3000:]
    rows = summary_rows(tmp_path)
    assert rows["budget_probe"][0] == "ok"
    assert rows["build"][0] == "SKIPPED" and rows["build"][3] == "no budget left"
    assert "NOT all ok" in (tmp_path / "summary.txt").read_text()
