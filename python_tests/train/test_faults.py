"""Fault injection: one run is killed and starved again and again on its way to the last step, and must end
exactly where an undisturbed run ends.

The faults, in one out_dir: SIGKILL inside a checkpoint write (at a point drawn at random), SIGKILL at a
random moment, a metrics line torn by a full disk, a checkpoint write failing on a full disk, then a clean
finish. Asserted: every step's loss and skip count bitwise equal to the undisturbed run's, each step logged
once, the same final weights, the same number of skipped (corrupt) samples, no leftover temporary
directories, and every failure reported in one line with a non-zero exit. The data has corrupt samples so
that "no lost or uncounted data" has something to count. ``VLCORE_FAULT_SEED`` replays a draw.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlcore.train import checkpoint as ckpt
from vlcore.train.cli import main

from .helpers import TINY, clean_samples, png_bytes, write_shard

STEPS = 12
DRIVER = Path(__file__).with_name("fault_driver.py")


def _records(out_dir: Path) -> dict[int, dict]:
    """step -> its training record; every step must appear exactly once."""
    steps = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            assert record["step"] not in steps, f"step {record['step']} logged twice"
            steps[record["step"]] = record
    return steps


def _start(out_dir: Path, argv: list[str], fault: str = "") -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLCORE_FAULT": fault, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(DRIVER), *argv, "--out-dir", str(out_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    """``(exit code, stdout + stderr)``."""
    out, err = p.communicate(timeout=240)
    return p.returncode, out + err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("vlcore-train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards, 30 good samples and 2 corrupt ones (a truncated PNG, a caption that is not JSON)."""
    root = tmp_path_factory.mktemp("faults")
    bad = [("bad0", png_bytes(1)[:40], "json", b'{"caption": "truncated image"}'),
           ("bad1", png_bytes(2), "json", b'{"caption": "no closing brace"')]
    paths = [write_shard(root / "s-0.tar", clean_samples(10, caption_ext="json")),
             write_shard(root / "s-1.tar", bad[:1] + clean_samples(10, start=100, caption_ext="json") + bad[1:]),
             write_shard(root / "s-2.tar", clean_samples(10, start=200, caption_ext="json"))]
    return "::".join(str(p) for p in paths)


def test_killed_and_starved_run_resumes_exactly(tmp_path, shards):
    rng = random.Random(int(os.environ.get("VLCORE_FAULT_SEED", "0")))
    argv = TINY + ["--data", "wds", "--train-data", shards, "--wds-caption-key", "json", "--batch-size", "4",
                   "--workers", "1", "--steps", str(STEPS), "--checkpoint-every", "2", "--keep-checkpoints", "2"]
    reference_summary = main(argv + ["--out-dir", str(tmp_path / "reference")])
    reference = _records(tmp_path / "reference")
    assert sorted(reference) == list(range(1, STEPS + 1)) and reference_summary["skipped_samples"] > 0

    out = tmp_path / "victim"
    checkpoints = out / "checkpoints"

    def latest_step() -> int:
        latest = ckpt.latest_checkpoint(checkpoints)
        return int(latest.name.split("_")[1]) if latest else 0

    # 1. SIGKILL inside the second checkpoint write (step 4), at a point drawn at random.
    point = rng.choice(["after_weights", "before_rename"])
    code, err = _finish(_start(out, argv, f"kill_in_checkpoint=2:{point}"))
    assert code == -signal.SIGKILL, err[-3000:]
    assert latest_step() == 2 and list(checkpoints.glob(".tmp-step_00000004-*")), point

    # 2. SIGKILL at a random moment: once a step drawn at random is logged, plus a random few milliseconds
    # (anywhere in the next step: data, forward, backward, optimizer, logging, or a checkpoint write).
    victim = _start(out, argv)
    # Past step 4, the last one the killed run of 1. logged (the file still shows it until the run starts).
    target, deadline = rng.randint(5, STEPS - 3), time.time() + 120
    while max(_records_loose(out), default=0) < target:
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.02))
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL

    # 3. The disk fills up while a metrics line is appended: half a line stays behind.
    torn_step = latest_step() + 1
    code, err = _finish(_start(out, argv, f"enospc_in_metrics={torn_step}"))
    assert code == 1
    _one_line_error(err, "No space left on device", "metrics.jsonl")
    assert (out / "metrics.jsonl").read_text().endswith('{"step": %d, "loss": 1.2' % torn_step)

    # 4. The disk fills up while the next checkpoint is written. (Starting, the run dropped the torn line.)
    before = latest_step()
    code, err = _finish(_start(out, argv, "enospc_in_checkpoint=1"))
    assert code == 1
    assert "metrics.jsonl: dropped 1 unreadable line(s)" in err
    _one_line_error(err, "No space left on device", "not written; the previous checkpoints are intact")
    assert latest_step() == before and not list(checkpoints.glob(".tmp-*"))

    # 5. Space again: the run finishes.
    code, log = _finish(_start(out, argv))
    assert code == 0, log[-3000:]

    resumed = _records(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step} ({point})"
        assert resumed[step]["skipped"] == reference[step]["skipped"], f"step {step}: skipped samples differ"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_samples"] == reference_summary["skipped_samples"]
    final = f"step_{STEPS:08d}/model.safetensors"
    theirs, ours = load_file(tmp_path / "reference" / "checkpoints" / final), load_file(checkpoints / final)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step_{STEPS - 2:08d}", f"step_{STEPS:08d}"]


def _records_loose(out_dir: Path) -> list[int]:
    """Steps logged so far by a live run (its last line may be mid-write)."""
    steps = []
    if not (out_dir / "metrics.jsonl").exists():
        return steps
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps
