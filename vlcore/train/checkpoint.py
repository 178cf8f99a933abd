"""Checkpoints: ``<out_dir>/checkpoints/step_00000100/{model.safetensors, state.pt}``.

``model.safetensors`` holds the weights (loadable without this package), ``peft.safetensors`` (a run with
``--peft``) the tuned parameters alone; ``state.pt`` the optimizer,
scheduler, RNG states, data position, step, world size and the config. A checkpoint is written into a
temporary directory, every file fsync'ed, then renamed into place (an atomic rename on POSIX), so a crash at
any moment leaves either the previous checkpoints or the complete new one, never a half-written latest.

What a crash can leave behind, and what :func:`tidy_checkpoint_dir` does with it on the next start:

- ``.tmp-step_N-PID``: a checkpoint being written. Incomplete by definition: removed.
- ``.old-step_N-PID``: a checkpoint being replaced by a new save of the same step. If the crash came between
  the two renames, ``step_N`` is missing and this is the only complete copy: it is renamed back; otherwise
  it is a leftover and removed.

A write that fails (a full disk) removes its temporary directory before raising, so a failed save never
costs disk space and never touches the previous checkpoints.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from vlcore.peft import save_peft
from vlcore.peft.tuning import CONFIG_ATTR as PEFT_CONFIG_ATTR

STEP_DIR = re.compile(r"^step_(\d{8})$")
LEFTOVER_DIR = re.compile(r"^\.(tmp|old)-(step_\d{8})-\d+$")


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
    """Every random stream the step may draw from (dropout, masking, negatives), for exact resume. The
    dataloader's randomness is not here: it is seeded per sample from the data position instead."""
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
    """Flush a file, or a directory's entries (the renames), to the disk: without it a power cut after the
    rename can leave a "complete" checkpoint whose files are empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not directory.is_dir():
        return []
    # state.pt is written after the weights: a directory that has it is complete.
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: Path) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: Path, step: int, model: nn.Module, state: dict, keep: int,
                    model_state: Optional[dict] = None) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``. ``model_state`` (a full
    state dict gathered from FSDP shards) replaces ``model``'s own. A failed write raises :class:`OSError`
    with the cause's errno (ENOSPC for a full disk) and leaves the directory as it was."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:08d}"
    # The pid in the name keeps two processes that share an out_dir by mistake from writing into one directory.
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_files(tmp, model, state, model_state)
    except BaseException as e:  # a full disk, or Ctrl-C twice: nothing half-written may stay behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"{e.strerror or e} (checkpoint {final.name} not written; the previous "
                          f"checkpoints are intact)", e.filename) from e
        io_error = _as_os_error(e, final.name)
        if io_error is not None:
            raise io_error from e
        raise
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save): replace it
        old = directory / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(directory)  # the renames themselves must reach the disk before we call the checkpoint done
    # Older checkpoints go only now, once the new one is safely in place.
    for stale in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write_files(tmp: Path, model: nn.Module, state: dict, model_state: Optional[dict]) -> None:
    if model_state is not None:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    else:
        save_model(unwrap(model), str(tmp / "model.safetensors"))  # handles tied weights (shared storage)
        if getattr(unwrap(model), PEFT_CONFIG_ATTR, None) is not None:
            # The tuned parameters alone, with their method: a few MB that vlcore.peft.load_peft applies to
            # any copy of the base model (model.safetensors above stays the complete model, for resume).
            save_peft(unwrap(model), tmp / "peft.safetensors")
    # torch.save reports a failed write as a RuntimeError without the errno; serialising to memory first and
    # writing the bytes ourselves turns a full disk into the OSError(ENOSPC) it is.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with open(tmp / "state.pt", "wb") as f:
        f.write(buffer.getbuffer())
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)


def _as_os_error(error: BaseException, name: str) -> Optional[OSError]:
    """safetensors reports I/O failures as its own exception type with ``(os error N)`` in the text; None
    for anything else (a bug must keep its own type and traceback)."""
    match = re.search(r"os error (\d+)", str(error))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, f"{os.strerror(code)} (checkpoint {name} not written; the previous checkpoints are intact)")


def tidy_checkpoint_dir(directory: Path) -> list[str]:
    """Remove the temporary directories of interrupted saves, restoring a checkpoint whose replacement was
    interrupted (see the module docstring). Returns one line per action, for the log."""
    if not directory.is_dir():
        return []
    actions = []
    for path in sorted(directory.iterdir()):
        match = LEFTOVER_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        kind, step_name = match.groups()
        if kind == "old" and not (directory / step_name).exists() and (path / "state.pt").exists():
            os.rename(path, directory / step_name)
            actions.append(f"checkpoints: restored {step_name} from {path.name} (a save of it was interrupted)")
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        actions.append(f"checkpoints: removed {path.name} ({size / 2 ** 20:.1f} MiB) left by an interrupted save")
    if actions:
        _fsync(directory)
    return actions


def load_checkpoint(path: Path, model: Optional[nn.Module] = None) -> dict:
    """Load the weights into ``model`` (if given) and return ``state.pt``'s dict."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / "state.pt").exists() or not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (model.safetensors + state.pt)")
    if model is not None:
        load_model(unwrap(model), str(path / "model.safetensors"))
    # map_location="cpu": the optimizer moves its state to the parameters' device when it loads it, and a
    # checkpoint from GPU 3 must load on a machine without one. weights_only=False: the state holds numpy
    # and Python RNG states; load only checkpoints you trust (as with any pickle).
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
