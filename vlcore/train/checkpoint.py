"""Checkpoints: ``<out_dir>/checkpoints/step_00000100/{model.safetensors, state.pt}``.

``model.safetensors`` holds the weights (loadable without this package); ``state.pt`` the optimizer,
scheduler, RNG states, data position, step, world size and the config. A checkpoint is written into a
temporary directory, every file fsync'ed, then renamed into place (an atomic rename on POSIX), so a crash at
any moment leaves either the previous checkpoints or the complete new one, never a half-written latest.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

STEP_DIR = re.compile(r"^step_(\d{8})$")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: Path) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: Path, step: int, model: nn.Module, state: dict, keep: int,
                    model_state: Optional[dict] = None) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``. ``model_state`` (a full
    state dict gathered from FSDP shards) replaces ``model``'s own."""
    from safetensors.torch import save_file, save_model

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:08d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if model_state is not None:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    else:
        save_model(unwrap(model), str(tmp / "model.safetensors"))  # handles tied weights (shared storage)
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save): replace it
        old = directory / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(directory)
    for stale in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Optional[nn.Module] = None) -> dict:
    """Load the weights into ``model`` (if given) and return ``state.pt``'s dict."""
    from safetensors.torch import load_model

    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / "state.pt").exists() or not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (model.safetensors + state.pt)")
    if model is not None:
        load_model(unwrap(model), str(path / "model.safetensors"))
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
