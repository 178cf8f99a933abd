"""torchrun with 2 CPU processes (gloo) trains like one process on the same global batch."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from vlcore.train.cli import main

from .helpers import TINY, read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "ddp+grad_cache"])
def test_two_process_run_equals_single_process(tmp_path, sharding):
    steps = 4
    argv = TINY + ["--steps", str(steps), "--batch-size", "8", "--random-crop", "false"]
    main(argv + ["--out-dir", str(tmp_path / "single")])
    # 2 ranks x 4 samples; with GradCache 2 ranks x 2 micro-batches x 2 samples, still the full batch's loss
    argv += {"ddp": [], "fsdp": ["--fsdp"], "ddp+grad_cache": ["--grad-accum", "2", "--grad-cache"]}[sharding]
    single = read_metrics(tmp_path / "single")

    if sharding == "fsdp":
        argv += ["--checkpoint-every", "2", "--keep-checkpoints", "3"]
    result = _torchrun(argv + ["--out-dir", str(tmp_path / "ddp")])
    mode = "FSDP2" if sharding == "fsdp" else "DDP"
    split = "2 micro-batches x 2" if "grad_cache" in sharding else "1 micro-batches x 4"
    assert f"world size 2 ({mode}), global batch 8 = 2 ranks x {split}" in result.stdout + result.stderr
    ddp = read_metrics(tmp_path / "ddp")
    assert sorted(ddp) == sorted(single) == list(range(1, steps + 1))
    for step in single:  # the same samples, split over 2 ranks; the loss gathers features across them
        assert ddp[step] == pytest.approx(single[step], rel=1e-4, abs=1e-5), step
    # Only rank 0 writes: the checkpoints and one metrics file; the weights match the single-process run's.
    assert len(list((tmp_path / "ddp" / "checkpoints").iterdir())) == (2 if sharding == "fsdp" else 1)
    from safetensors.torch import load_file

    final = "checkpoints/step_00000004/model.safetensors"
    single_weights, ddp_weights = load_file(tmp_path / "single" / final), load_file(tmp_path / "ddp" / final)
    assert single_weights.keys() == ddp_weights.keys()
    for name, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)

    if sharding == "fsdp":
        # Resuming an FSDP run (full state dicts scattered back to the shards) continues exactly.
        shutil.rmtree(tmp_path / "ddp" / "checkpoints" / "step_00000004")
        result = _torchrun(argv + ["--out-dir", str(tmp_path / "ddp")])
        assert "resumed from" in result.stdout + result.stderr
        resumed = read_metrics(tmp_path / "ddp")
        assert [resumed[step] for step in (3, 4)] == [ddp[step] for step in (3, 4)]


def _torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "vlcore.train", *argv]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result
