"""Shared pieces of the trainer tests: a tiny configuration and small WebDataset / CSV fixtures."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vlcore.train import cli

# A tiny CLIP on the embedded dataset: a few ms per step on CPU.
TINY = ["--model", "clip-tiny", "--model-overrides", '{"text_cfg": {"context_length": 64}, "vision_cfg": {"image_size": 16, "patch_size": 8}}',
        "--batch-size", "8", "--synthetic-size", "64", "--synthetic-eval-size", "16", "--warmup-steps", "2",
        "--log-every", "1", "--progress", "false", "--tensorboard", "false", "--plot", "false", "--workers", "0",
        "--cpu-threads", "1", "--eval-every", "0", "--checkpoint-every", "0"]


def read_metrics(out_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (the last record of each step)."""
    losses = {}
    with open(out_dir / "metrics.jsonl") as f:
        for record in map(json.loads, f):
            if "loss" in record:
                losses[record["step"]] = record["loss"]
    return losses


def png_bytes(seed: int, size: int = 20) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, bytes, str, bytes]]) -> Path:
    """``samples``: (key, image bytes, caption extension, caption bytes)."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption_ext, caption in samples:
            _add(tar, f"{key}.png", image)
            _add(tar, f"{key}.{caption_ext}", caption)
    return path


def clean_samples(n: int, start: int = 0, caption_ext: str = "txt") -> list:
    out = []
    for i in range(start, start + n):
        caption = f"sample number {i}"
        data = json.dumps({"caption": caption}).encode() if caption_ext == "json" else caption.encode()
        out.append((f"s{i:05d}", png_bytes(i), caption_ext, data))
    return out


def cli_error(monkeypatch, capsys, argv, entry=cli.train_cli) -> tuple[int, str]:
    """Run a console entry point with ``argv`` that must fail: its exit code and what it wrote to stderr."""
    monkeypatch.setattr("sys.argv", ["prog", *argv])
    with pytest.raises(SystemExit) as e:
        entry()
    return e.value.code, capsys.readouterr().err


def assert_one_line(err: str, *needles: str) -> None:
    """A command-line error is one line, no traceback, and names what ``needles`` give."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
