"""Exact resume: a run killed with SIGKILL and resumed logs the same per-step losses as an uninterrupted one;
checkpoints are atomic; a changed world size is refused with a clear message."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlcore.train import checkpoint as ckpt
from vlcore.train.cli import main

from .helpers import TINY, clean_samples, read_metrics, write_shard

STEPS = 12


def _run(out_dir: Path, extra: list[str]) -> subprocess.Popen:
    argv = TINY + ["--steps", str(STEPS), "--checkpoint-every", "5", "--out-dir", str(out_dir)] + extra
    return subprocess.Popen([sys.executable, "-m", "vlcore.train", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def _finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err.decode()[-3000:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    return [str(write_shard(root / f"shard-{i}.tar", clean_samples(11, start=11 * i))) for i in range(4)]


@pytest.mark.parametrize("data", ["synthetic", "wds"])
def test_sigkill_then_resume_gives_the_same_losses(tmp_path, data, shards):
    # Two workers: the resumed DataLoader must continue the round robin at the right worker.
    extra = ["--workers", "2"]
    if data == "wds":
        extra += ["--data", "wds", "--train-data", "::".join(shards), "--val-data", shards[0], "--val-data-type", "wds"]
    main(TINY + ["--steps", str(STEPS), "--out-dir", str(tmp_path / "straight")] + extra)  # uninterrupted
    reference = read_metrics(tmp_path / "straight")
    assert sorted(reference) == list(range(1, STEPS + 1))

    victim = _run(tmp_path / "killed", extra)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 180
    while ckpt.latest_checkpoint(checkpoints) is None or ckpt.latest_checkpoint(checkpoints).name < "step_00000005":
        assert victim.poll() is None, "the run finished before it could be killed; " + victim.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = int(ckpt.latest_checkpoint(checkpoints).name.split("_")[1])
    assert killed_at < STEPS

    _finish(_run(tmp_path / "killed", extra))  # resume="auto" continues from the latest checkpoint
    resumed = read_metrics(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == reference[step], f"step {step} (resumed after step {killed_at})"


def test_ctrl_c_finishes_the_step_and_saves(tmp_path):
    run = _run(tmp_path, ["--steps", "100000", "--checkpoint-every", "4"])
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(tmp_path / "checkpoints") is None:
        assert run.poll() is None and time.time() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err.decode()[-2000:]
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    steps = read_metrics(tmp_path)
    assert int(latest.name.split("_")[1]) == max(steps)  # saved at the step it stopped after
    assert ckpt.load_checkpoint(latest)["step"] == max(steps)


def test_checkpoint_write_is_atomic_and_keeps_the_last_k(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    directory = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(directory, step, model, {"step": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["step_00000002", "step_00000003"]

    # A crash while state.pt is being written leaves the previous latest checkpoint intact and complete.
    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(directory, 4, model, {"step": 4}, keep=2)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(directory)
    assert latest.name == "step_00000003"
    assert ckpt.load_checkpoint(latest, model)["step"] == 3
    assert not (directory / "step_00000004").exists()  # only a temporary directory, which is ignored

    # Saving the same step again replaces it completely.
    with torch.no_grad():
        model.weight.fill_(7.0)
    ckpt.save_checkpoint(directory, 3, model, {"step": 3, "again": True}, keep=2)
    fresh = torch.nn.Linear(3, 2)
    assert ckpt.load_checkpoint(directory / "step_00000003", fresh)["again"]
    assert torch.equal(fresh.weight, torch.full((2, 3), 7.0))


def test_resume_with_another_world_size_is_refused(tmp_path):
    main(TINY + ["--steps", "1", "--out-dir", str(tmp_path)])
    state_path = ckpt.latest_checkpoint(tmp_path / "checkpoints") / "state.pt"
    state = torch.load(state_path, weights_only=False)
    state["world_size"] = 2
    torch.save(state, state_path)
    with pytest.raises(RuntimeError, match="written by a run with world_size 2; this run has 1"):
        main(TINY + ["--steps", "2", "--out-dir", str(tmp_path)])
