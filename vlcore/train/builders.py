"""Builders: turn a :class:`~vlcore.train.params.TrainConfig` into the parts of a run, and assemble them.

Read :func:`build_run` first: it is the setup in order (devices, model, resume, sharding, optimizer, data,
logger). Each part has its own small builder below, which ``vlcore-eval`` reuses for the model and the
evaluation set. Nothing here trains and nothing here parses a command line: the loop is in
:mod:`vlcore.train.loop`, the command lines in :mod:`vlcore.train.cli`.

The order of the setup matters for exact resume and for sharding:

1. the seed, then the model: every rank builds the same initial weights;
2. the checkpoint's weights go into the plain model on every rank, before any wrapper or shard (a run
   that has no checkpoint of its own starts from ``--init-from`` instead; PEFT comes after either, so
   that its modules exist before a checkpoint that holds them loads);
3. FSDP shards the model; the optimizer is built over the (possibly sharded) parameters, then its state is
   loaded; the RNG state is restored last, so that nothing in the setup consumes the restored stream.
"""

from __future__ import annotations

import json
import os
import random
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from vlcore.evaluation.formats import FORMATS, load_caption_set
from vlcore.models import build_model as build_model_from_config
from vlcore.models import get_model_config
from vlcore.models.losses import ClipLoss, SigLipLoss
from vlcore.models.pretrained import LoadReport, load_pretrained
from vlcore.nn.transformer import Block
from vlcore.nvfp4 import convert
from vlcore.peft import apply_peft
from vlcore.train import data as D
from vlcore.train import fsdp as fsdp_lib
from vlcore.train import synthetic
from vlcore.train.checkpoint import latest_checkpoint, load_checkpoint, set_rng_state, tidy_checkpoint_dir
from vlcore.train.logs import RunLogger
from vlcore.train.optim import make_optimizer, make_scheduler
from vlcore.train.params import ConfigError, TrainConfig, nvfp4_policy
from vlcore.train.run import Run, TrainState
from vlcore.train.tasks import make_collate


class ResumeError(RuntimeError):
    """The checkpoint cannot continue this run (another world size, another sharding)."""


# ---------------------------------------------------------------------------------------------------------
# Devices and processes


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; initialises the process group under torchrun (``WORLD_SIZE`` > 1)."""
    # torchrun describes the job in the environment; a plain `python -m vlcore.train` is rank 0 of 1.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    # One GPU per process: a bare "cuda" means this process's GPU, not GPU 0 for every rank.
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    check_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif cfg.cpu_threads:
        # On a small CPU, OpenMP threads that outnumber the free cores spin against the data workers (and
        # anything else running): fewer threads can be several times faster.
        torch.set_num_threads(cfg.cpu_threads)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.ddp_backend if cfg.ddp_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend)
    return rank, world_size, device


def check_device(device: torch.device) -> None:
    """Fail with the reason when the device cannot be used (a CPU-only torch, no GPU visible, a bad index),
    instead of torch's internal error from the first call that touches it."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"config field 'device': {device} requested but {why}; use --device cpu or auto")
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"config field 'device': {device} requested but only {torch.cuda.device_count()} "
                              f"GPU(s) are visible")
        return
    try:  # other backends (mps, xpu, ...): the cheapest test is to allocate on them
        torch.empty(0, device=device)
    except Exception as e:  # each backend fails differently (RuntimeError, AssertionError, ...)
        raise ConfigError(f"config field 'device': {device} cannot be used: {str(e).splitlines()[0]}") from None


def prepare_out_dir(cfg: TrainConfig) -> list[str]:
    """Create ``out_dir`` and prove it writable now, rather than after the first hour of training; then
    tidy what killed runs left in its checkpoint directory. Returns what was tidied, for the log."""
    out_dir = Path(cfg.out_dir)
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"vlcore")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"config field 'out_dir': cannot write to {out_dir}: {e.strerror or e}") from None
    return tidy_checkpoint_dir(out_dir / "checkpoints")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def local_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Samples per micro-batch on one rank: the global batch split over ranks and accumulation steps."""
    micro = world_size * cfg.grad_accum
    if cfg.batch_size % micro:
        raise ConfigError(f"config field 'batch_size': {cfg.batch_size} must be a multiple of world_size x "
                          f"grad_accum = {world_size} x {cfg.grad_accum}")
    return cfg.batch_size // micro


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA by default, fp32 (no autocast) on CPU.

    Returns a factory, not a context: a context manager is single use, and the loop enters one per forward.
    """
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# The model


def model_overrides(cfg: TrainConfig) -> dict:
    """The create_model overrides the trainer's switches add to ``cfg.model_overrides``."""
    overrides = json.loads(json.dumps(cfg.model_overrides))  # a deep copy: the config stays as the user gave it
    overrides["impl"] = cfg.impl
    vision = dict(overrides.get("vision_cfg") or {})
    if cfg.tome_r is not None:
        # tome_r arrives as a string from the command line; it may be an int, [r, inflect] or a list.
        try:
            r = json.loads(cfg.tome_r)
        except json.JSONDecodeError:
            raise ConfigError(f"config field 'tome_r': expected an int, [r, inflect] or a list, got {cfg.tome_r!r}") from None
        vision["tome_r"] = r
    if cfg.pool is not None:
        vision["pool"] = cfg.pool
    if vision:
        overrides["vision_cfg"] = vision
    if cfg.tokenizer is not None:
        overrides["text_cfg"] = {**(overrides.get("text_cfg") or {}), "tokenizer": cfg.tokenizer}
    return overrides


def build_contrastive_loss(cfg: TrainConfig, rank: int, world_size: int) -> torch.nn.Module:
    """CLIP's InfoNCE or SigLIP's sigmoid loss, distributed.

    ``local_loss`` with ``gather_with_grad`` (open_clip's recommended pair): each rank scores its own rows
    against every rank's features and the gradient flows back through the gather, so the update equals the
    single-process one at a fraction of the logits memory.
    """
    if cfg.loss == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)


def build_model(cfg: TrainConfig, contrastive_loss: Optional[torch.nn.Module] = None,
                notes: Optional[list[str]] = None, init_from: Optional[str] = None):
    """``(model, model_cfg)`` with the config's switches (impl, ToMe, pooling, NVFP4, PEFT, checkpointing)
    applied.

    The model JSON is read once, into ``model_cfg``, and the model is built from that parsed config. A
    fusion model receives ``contrastive_loss`` as its ITC loss through its constructor. ``init_from`` (the
    run's ``--init-from``, unless it resumes) loads pre-trained weights into the plain model, before PEFT
    adds its modules: the source has none of them. PEFT is applied here rather than in :func:`build_run`
    so that every path that rebuilds a run's model (resume, ``vlcore-eval``) gets the same parameter names
    before it loads a checkpoint. What the switches did is appended to ``notes`` for the log.
    """
    try:
        model_cfg = get_model_config(cfg.model, **model_overrides(cfg))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config field 'model' / 'model_overrides': {e}") from None
    if model_cfg.text_cfg.tokenizer == "clip_bpe" and not cfg.synthetic_benchmark:
        raise ConfigError(f"config field 'tokenizer': model {cfg.model!r} uses CLIP's BPE; pass --tokenizer "
                          "/path/to/bpe_simple_vocab_16e6.txt.gz (shipped in the open_clip wheel; nothing is downloaded)")
    itc_loss = contrastive_loss if model_cfg.kind == "fusion" else None
    model = build_model_from_config(model_cfg, itc_loss=itc_loss)
    if init_from is not None:
        report = load_init_weights(model, init_from)
        if notes is not None:
            notes.append(f"--init-from: {report}")
    if cfg.nvfp4 is not None:
        # In place: the converted layers share the original parameters (same names in the state dict) and
        # add their stochastic-rounding state as buffers, which checkpoints carry for exact resume.
        report = convert(model, nvfp4_policy(cfg.nvfp4))
        if notes is not None:
            notes.append(f"--nvfp4 {cfg.nvfp4}: {report}")
    if cfg.peft != "none":
        # After the weights are in: the base is frozen as loaded, and LoRA / adapters start as the identity.
        try:
            report = apply_peft(model, cfg.peft, **cfg.peft_options)
        except ValueError as e:  # e.g. a trainable pattern or LoRA target this model does not have
            raise ConfigError(f"config field 'peft_options': {e}") from None
        if notes is not None:
            notes.append(f"--peft: {report}")
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    return model, model_cfg


def load_init_weights(model: torch.nn.Module, path: str) -> LoadReport:
    """``--init-from``: the weights at ``path`` into ``model``. A missing or unreadable path, or weights of
    another architecture, is the user's error: one line naming the field."""
    if not os.path.exists(path):
        raise ConfigError(f"config field 'init_from': {path} does not exist")
    if os.path.isdir(os.path.join(path, "checkpoints")):  # a run directory: its latest checkpoint
        path = str(latest_checkpoint(Path(path) / "checkpoints") or path)
    try:
        return load_pretrained(model, path)
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and torch each raise their own type for a bad file
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config field 'init_from': cannot load {path}: {message}") from None


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every transformer block in the backward pass instead of storing its activations."""
    for block in model.modules():
        if isinstance(block, Block):
            # Only under grad: evaluation (no_grad) runs the block plainly, with nothing to recompute.
            def forward(*args, _forward=block.forward, **kwargs):
                if torch.is_grad_enabled():
                    return activation_checkpoint(_forward, *args, use_reentrant=False, **kwargs)
                return _forward(*args, **kwargs)
            block.forward = forward


def check_model_switches(cfg: TrainConfig, model_cfg) -> None:
    """Switches that only some model kinds support."""
    if model_cfg.kind == "captioner" and cfg.compile:
        raise ConfigError("config field 'compile': the captioner's packed batches change shape every step; "
                          "compile the CLIP or fusion presets")
    if cfg.synthetic_benchmark and model_cfg.kind == "captioner":
        raise ConfigError("config field 'synthetic_benchmark': times the CLIP and fusion steps; the captioner's "
                          "packed batches come from data (train it on the embedded dataset instead)")
    if cfg.grad_cache and (model_cfg.kind != "clip" or cfg.fsdp):
        raise ConfigError("config field 'grad_cache': GradCache needs a CLIP model (model kind 'clip', got "
                          f"{model_cfg.kind!r}) and no --fsdp")


# ---------------------------------------------------------------------------------------------------------
# Data


def image_transform(model_cfg, train: bool, cfg: TrainConfig) -> D.ImageTransform:
    vision = model_cfg.vision_cfg
    return D.ImageTransform(vision.image_size, vision.image_mean, vision.image_std, random_crop=train and cfg.random_crop)


def build_stream_spec(cfg: TrainConfig, model_cfg, rank: int, world_size: int, local_batch: int) -> D.StreamSpec:
    """What the dataloader workers need to build this rank's training batches (a picklable description)."""
    transform = image_transform(model_cfg, True, cfg)
    if cfg.data == "synthetic":
        # Rendered at the model's resolution: the random crop then only jitters the framing a little.
        source = D.SyntheticSource(cfg.seed, synthetic.TRAIN, cfg.synthetic_size, model_cfg.vision_cfg.image_size)
        kind, tar_reader = "map", None
    elif cfg.data == "csv":
        source = D.CsvSource(existing_file(cfg.train_data, "train_data"), cfg.csv_image_key, cfg.csv_caption_key)
        kind, tar_reader = "map", None
    else:
        source = D.expand_braces(cfg.train_data)
        # Streamed shards (pipe: commands, URLs) cannot be checked up front: an unreadable one is retried, then
        # skipped and counted while training.
        missing = [p for p in source if not D.is_stream(p) and not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"config field 'train_data': {len(missing)} of {len(source)} shards do not exist, "
                              f"e.g. {missing[0]}")
        kind, tar_reader = "tar", D.TarReader(cfg.wds_image_keys.split(";"), cfg.wds_caption_key, cfg.json_caption_field)
    if kind == "map" and len(source) < local_batch * world_size:
        # Every batch of a map-style source is a slice of one epoch's order: one batch must fit in an epoch.
        field = "synthetic_size" if cfg.data == "synthetic" else "train_data"
        raise ConfigError(f"config field '{field}': {len(source)} samples are fewer than one batch "
                          f"({local_batch * world_size} = batch_size / grad_accum)")
    return D.StreamSpec(kind, source, local_batch, rank, world_size, cfg.seed, transform, make_collate(model_cfg, True),
                        tar_reader=tar_reader, train=True, shuffle=cfg.shuffle)


def existing_file(path: str, field: str) -> str:
    if not os.path.isfile(path):
        why = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"config field '{field}': {path} {why}")
    return path


def build_eval_set(cfg: TrainConfig, model_cfg):
    """``(images, captions, skipped)`` of the held-out synthetic split or of ``val_data``; None if neither."""
    transform = image_transform(model_cfg, False, cfg)
    if cfg.val_data:
        kind = cfg.val_data_type or cfg.data
        if kind == "csv":
            source = D.CsvSource(existing_file(cfg.val_data, "val_data"), cfg.csv_image_key, cfg.csv_caption_key)
            return D.load_eval_set(source, transform)
        if kind == "wds":
            reader = D.TarReader(cfg.wds_image_keys.split(";"), cfg.wds_caption_key, cfg.json_caption_field)
            shards = [p if D.is_stream(p) else existing_file(p, "val_data") for p in D.expand_braces(cfg.val_data)]
            return D.load_eval_set([reader, shards], transform)
        if kind in FORMATS:  # a benchmark's caption file: Karpathy, CLIP_benchmark or COCO JSON
            return load_caption_set(kind, existing_file(cfg.val_data, "val_data"), transform, cfg.val_image_root,
                                    cfg.val_split)
        raise ConfigError(f"config field 'val_data_type': give 'wds', 'csv' or one of {list(FORMATS)} for val_data")
    if cfg.data == "synthetic":
        source = D.SyntheticSource(cfg.seed, synthetic.EVAL, cfg.synthetic_eval_size, model_cfg.vision_cfg.image_size)
        return D.load_eval_set(source, transform)
    return None


def synthetic_benchmark_batches(model_cfg, local_batch: int, device: torch.device):
    """Random images and tokens, made once on the device: the step's throughput without any input pipeline."""
    vision, text = model_cfg.vision_cfg, model_cfg.text_cfg
    images = torch.randn(local_batch, 3, vision.image_size, vision.image_size, device=device)
    tokens = torch.randint(1, text.vocab_size - 1, (local_batch, text.context_length), device=device)
    tokens[:, -1] = text.vocab_size - 1  # an end-of-text token for the argmax pooling
    while True:
        yield {"images": images, "tokens": tokens}, None


# ---------------------------------------------------------------------------------------------------------
# Resume


def find_resume(cfg: TrainConfig) -> Optional[Path]:
    """The checkpoint to continue from: the latest in ``out_dir`` (``auto``), none, or an explicit path."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
    path = Path(cfg.resume)
    if (path / "checkpoints").is_dir():  # a run directory: its latest checkpoint
        return latest_checkpoint(path / "checkpoints")
    if not path.exists():
        raise ConfigError(f"config field 'resume': {path} does not exist")
    return path


def load_weights(checkpoint: Path, model: torch.nn.Module, world_size: int) -> dict:
    """Load the checkpoint's weights into the plain model; return the rest of its state."""
    try:
        state = load_checkpoint(checkpoint, model)
    except RuntimeError as e:  # torch lists every mismatched key; the first line says what kind of mismatch
        raise ResumeError(f"{checkpoint} does not fit this model ({str(e).strip().splitlines()[0].rstrip(':')}): "
                          f"it was written with other model settings (--model, --model-overrides, --nvfp4, "
                          f"--peft, --peft-options, --tome-r ...); resume with the same ones, or pass --resume none with a new --out-dir") from None
    if state["world_size"] != world_size:
        raise ResumeError(f"{checkpoint} was written by a run with world_size {state['world_size']}; this run "
                          f"has {world_size}. Exact resume needs the same world size (the data order and "
                          f"per-rank batches depend on it): relaunch with --nproc-per-node matching, or pass "
                          f"--resume none with a new --out-dir to start over")
    return state


def restore_training_state(state: dict, checkpoint: Path, model, optimizer, scheduler, rank: int,
                           use_fsdp: bool) -> None:
    """Optimizer, schedule and RNG from a checkpoint (the weights are already in: :func:`load_weights`)."""
    if state.get("fsdp", False) != use_fsdp:
        raise ResumeError(f"{checkpoint}: its optimizer state was saved {'with' if state.get('fsdp') else 'without'} "
                          f"FSDP; resume with the same --fsdp setting")
    if use_fsdp:  # a full (unsharded) state dict: scatter it back to this rank's shards
        fsdp_lib.load_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # Each rank saved its own RNG (dropout, masking and the like differ per rank); older single-process
    # checkpoints stored one state rather than a list.
    set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])


# ---------------------------------------------------------------------------------------------------------
# The whole run


def build_run(cfg: TrainConfig) -> Run:
    """Everything :func:`vlcore.train.loop.train` needs, in the order the module docstring explains."""
    rank, world_size, device = setup_distributed(cfg)
    local_batch = local_batch_size(cfg, world_size)
    # Rank 0 alone writes; it checks out_dir before any work and removes what killed runs left there.
    notes = prepare_out_dir(cfg) if rank == 0 else []

    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    contrastive_loss = build_contrastive_loss(cfg, rank, world_size)
    # A run that resumes continues from its own checkpoint: --init-from only seeds the first start.
    checkpoint = find_resume(cfg)
    if checkpoint is not None and cfg.init_from is not None:
        notes.append(f"--init-from {cfg.init_from} ignored: resuming from {checkpoint}, which already holds the "
                     "fine-tuned weights")
    init_from = cfg.init_from if checkpoint is None else None
    model, model_cfg = build_model(cfg, contrastive_loss, notes, init_from=init_from)
    model.to(device)
    check_model_switches(cfg, model_cfg)

    start_step, data_state, state = 0, None, None
    if checkpoint is not None:
        state = load_weights(checkpoint, model, world_size)
    use_fsdp = cfg.fsdp and world_size > 1
    if use_fsdp:
        fsdp_lib.shard_model(model)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    if state is not None:
        restore_training_state(state, checkpoint, model, optimizer, scheduler, rank, use_fsdp)
        start_step, data_state = state["step"], state["data"][rank]

    # The wrappers come last: DDP registers gradient hooks on the final parameters, and torch.compile
    # traces whatever it wraps.
    train_model = model
    if world_size > 1 and not use_fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    spec = build_stream_spec(cfg, model_cfg, rank, world_size, local_batch) if not cfg.synthetic_benchmark else None
    # Evaluation runs on rank 0 alone; under FSDP every rank must take part in the forward passes.
    evaluating = (rank == 0 or use_fsdp) and not cfg.synthetic_benchmark
    eval_set = build_eval_set(cfg, model_cfg) if evaluating else None

    logger = RunLogger(Path(cfg.out_dir), cfg, rank == 0, start_step)
    if eval_set is not None and eval_set[2]:
        notes.append(f"evaluation set: {len(eval_set[1])} images; {eval_set[2]} unreadable samples skipped")
    if cfg.synthetic_benchmark:
        batches = synthetic_benchmark_batches(model_cfg, local_batch, device)
    else:
        # Starting the iterator starts the worker processes; the DataLoader draws their base seed from the
        # (restored) torch RNG, so this comes after the restore, as it did in the run that saved it.
        batches = iter(D.make_loader(spec, cfg.workers, data_state))
    return Run(cfg=cfg, model=model, train_model=train_model, model_cfg=model_cfg, optimizer=optimizer,
               scheduler=scheduler, contrastive_loss=contrastive_loss, batches=batches, eval_set=eval_set,
               autocast=autocast_for(cfg, device), device=device, rank=rank, world_size=world_size,
               local_batch=local_batch, fsdp=use_fsdp, logger=logger,
               state=TrainState(step=start_step, position=D.DataPosition(cfg.workers, data_state),
                                checkpoint_path=checkpoint),
               resumed_from=checkpoint, notes=notes + logger.notes)
