"""Every benchmark script still runs: each bench_*.py with --quick on CPU (seconds). Smoke only: the
figures themselves are measured on the GPU machine, never asserted in tests."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_runs_quick_on_cpu(script, tmp_path):
    result = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu", "--csv", str(tmp_path / "rows.csv")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (tmp_path / "rows.csv").stat().st_size > 0
