"""Exact resume: a run killed with SIGKILL and resumed logs the same per-step losses as an uninterrupted one;
checkpoints are atomic; a changed world size is refused with a clear message."""

import errno
import json
import os
import shutil
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

    # A failed write of state.pt (a full disk) leaves the previous latest checkpoint intact and complete, and
    # removes its own temporary directory.
    def crash(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="No space left on device .checkpoint step_00000004 not written") as e:
        ckpt.save_checkpoint(directory, 4, model, {"step": 4}, keep=2)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(directory)
    assert latest.name == "step_00000003"
    assert ckpt.load_checkpoint(latest, model)["step"] == 3
    assert sorted(p.name for p in directory.iterdir()) == ["step_00000002", "step_00000003"]

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


def test_torn_metrics_tail_never_blocks_a_resume(tmp_path, capsys):
    """A crash or a full disk during an append leaves a torn last line (and maybe bytes that are not UTF-8):
    the resume drops it, says so, and the log ends up with every step exactly once."""
    argv = TINY + ["--checkpoint-every", "2", "--out-dir", str(tmp_path)]
    main(argv + ["--steps", "4"])
    reference = read_metrics(tmp_path)
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "loss": 2.1\n\xff\xfe garbage\n{"step": 6, "lo')
    summary = main(argv + ["--steps", "6"])
    assert summary["steps"] == 6
    assert "metrics.jsonl: dropped 3 unreadable line(s)" in capsys.readouterr().out
    losses = read_metrics(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(losses[step] == reference[step] for step in reference)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line parses again


def test_leftovers_of_interrupted_saves_are_tidied_on_start(tmp_path, capsys):
    """.tmp-* directories (a save killed midway) are removed; an .old-* directory whose step_* is missing
    (killed between the two renames of a re-save) is the only complete copy and is renamed back."""
    main(TINY + ["--steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "3", "--out-dir", str(tmp_path)])
    checkpoints = tmp_path / "checkpoints"
    os.rename(checkpoints / "step_00000002", checkpoints / ".old-step_00000002-4242")
    orphan = checkpoints / ".tmp-step_00000003-4243"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"\0" * 2 ** 20)
    stale_old = checkpoints / ".old-step_00000001-4244"  # step_00000001 exists: a leftover
    shutil.copytree(checkpoints / "step_00000001", stale_old)
    capsys.readouterr()
    summary = main(TINY + ["--steps", "3", "--keep-checkpoints", "3", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "checkpoints: restored step_00000002 from .old-step_00000002-4242" in out
    assert "checkpoints: removed .tmp-step_00000003-4243 (1.0 MiB)" in out
    assert "resumed from" in out and "at step 2" in out  # from the restored checkpoint
    assert summary["steps"] == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001", "step_00000002", "step_00000003"]
