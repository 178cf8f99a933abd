"""The run object: everything one training run holds, built once by :func:`vlcore.train.builders.build_run`
and handed whole to :func:`vlcore.train.loop.train`.

Why one object rather than keyword arguments: the loop's helpers (step, log, evaluate, save) each need a
different slice of the same dozen things. Passing the run keeps their signatures short and makes the state
that changes during training (:class:`TrainState`) one visible place instead of closures over ``nonlocal``
variables. This module imports nothing else from the trainer, so both the builders and the loop can
depend on it without depending on each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from torch import nn


@dataclass
class Meters:
    """Throughput counters. The ``interval_*`` ones restart at every log line; ``run_*`` cover the run."""

    interval_start: float = field(default_factory=time.perf_counter)
    interval_steps: int = 0
    data_wait: float = 0.0  # seconds spent waiting for the dataloader in this interval
    run_start: float = field(default_factory=time.perf_counter)
    run_steps: int = 0
    # The captioner's packed batches: how much padding a padded batch would have had (averaged at the end).
    padding_avoided: float = 0.0
    padding_batches: int = 0

    def restart_interval(self) -> None:
        self.interval_start, self.interval_steps, self.data_wait = time.perf_counter(), 0, 0.0


@dataclass
class TrainState:
    """What changes while the loop runs. ``step`` counts optimizer steps done; ``position`` is the data
    position (a :class:`vlcore.train.data.DataPosition`) that the next checkpoint stores."""

    step: int
    position: Any
    meters: Meters = field(default_factory=Meters)
    last_eval: dict = field(default_factory=dict)
    last_eval_lines: list = field(default_factory=list)  # the last evaluation's report lines (samples included)
    checkpoint_path: Optional[Path] = None
    interrupted: bool = False
    # The first step whose loss was not finite, kept on the device (a tensor) so that the check costs no
    # host synchronisation per step; it is read only when the loop logs or saves.
    first_nonfinite: Optional[torch.Tensor] = None


@dataclass
class Run:
    """A training run ready to go: model, optimizer, schedule, data, config, logger and state."""

    cfg: Any  # vlcore.train.params.TrainConfig
    model: nn.Module  # the plain module: its weights are what checkpoints and evaluation use
    train_model: nn.Module  # what the training step calls: ``model`` under DDP and/or torch.compile
    model_cfg: Any  # vlcore.models.ModelConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    contrastive_loss: nn.Module  # CLIP's loss (a fusion model holds its own copy, passed at construction)
    batches: Iterator  # endless (batch, data position) pairs; the position is None for benchmark tensors
    eval_set: Optional[tuple]  # (images, captions, skipped) or None when this rank does not evaluate
    autocast: Callable[[], ContextManager]  # a fresh autocast (or null) context per forward
    device: torch.device
    rank: int
    world_size: int
    local_batch: int  # samples per micro-batch on this rank
    fsdp: bool
    logger: Any  # vlcore.train.logs.RunLogger
    state: TrainState
    resumed_from: Optional[Path] = None
    notes: list = field(default_factory=list)  # what the setup did that the user should read (logged at start)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs and checkpoints."""
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)
