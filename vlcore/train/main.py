"""``vlcore-train``: set up (config, devices, distributed, model, optimizer, data, resume), then run the loop.

    vlcore-train                                    # default preset: tiny CLIP on the embedded shapes
    vlcore-train --preset clip-b16 --train-data '/data/laion-{00000..09999}.tar' --data wds
    torchrun --nproc-per-node 8 -m vlcore.train --preset clip-b16 ...
    vlcore-train --help                             # every field, its default and what it does
"""

from __future__ import annotations

import json
import os
import random
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from vlcore.models import create_model, get_model_config
from vlcore.models.losses import ClipLoss, SigLipLoss
from vlcore.train import data as D
from vlcore.train import synthetic
from vlcore.train.checkpoint import latest_checkpoint, load_checkpoint, set_rng_state
from vlcore.train.params import ConfigError, TrainConfig, help_text, load_config
from vlcore.train.tasks import make_collate


def model_overrides(cfg: TrainConfig) -> dict:
    """The create_model overrides the trainer's switches add to ``cfg.model_overrides``."""
    overrides = json.loads(json.dumps(cfg.model_overrides))  # a deep copy
    overrides["impl"] = cfg.impl
    vision = dict(overrides.get("vision_cfg") or {})
    if cfg.tome_r is not None:
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


def build_model(cfg: TrainConfig):
    """``(model, model_cfg)`` with the config's switches (impl, ToMe, pooling, NVFP4, checkpointing) applied."""
    overrides = model_overrides(cfg)
    try:
        model_cfg = get_model_config(cfg.model, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config field 'model' / 'model_overrides': {e}") from None
    if model_cfg.text_cfg.tokenizer == "clip_bpe" and not cfg.synthetic_benchmark:
        raise ConfigError(f"config field 'tokenizer': model {cfg.model!r} uses CLIP's BPE; pass --tokenizer "
                          "/path/to/bpe_simple_vocab_16e6.txt.gz (shipped in the open_clip wheel; nothing is downloaded)")
    model = create_model(cfg.model, **overrides)
    if cfg.nvfp4:
        try:
            from vlcore.nvfp4 import convert
        except ImportError:
            raise ConfigError("config field 'nvfp4': this vlcore build has no vlcore.nvfp4.convert; "
                              "train without --nvfp4 or install a vlcore with the NVFP4 module") from None
        model = convert(model, cfg.nvfp4) or model
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    return model, model_cfg


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every transformer block in the backward pass instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    from vlcore.nn.transformer import Block

    for block in model.modules():
        if isinstance(block, Block):
            def forward(*args, _forward=block.forward, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
                return _forward(*args, **kwargs)
            block.forward = forward


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA by default, fp32 (no autocast) on CPU."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def image_transform(model_cfg, train: bool, cfg: TrainConfig) -> D.ImageTransform:
    vision = model_cfg.vision_cfg
    return D.ImageTransform(vision.image_size, vision.image_mean, vision.image_std, random_crop=train and cfg.random_crop)


def build_stream_spec(cfg: TrainConfig, model_cfg, rank: int, world_size: int, local_batch: int) -> D.StreamSpec:
    transform = image_transform(model_cfg, True, cfg)
    if cfg.data == "synthetic":
        # Rendered at the model's resolution: the random crop then only jitters the framing a little.
        source = D.SyntheticSource(cfg.seed, synthetic.TRAIN, cfg.synthetic_size, model_cfg.vision_cfg.image_size)
        kind, tar_reader = "map", None
    elif cfg.data == "csv":
        source = D.CsvSource(cfg.train_data, cfg.csv_image_key, cfg.csv_caption_key)
        kind, tar_reader = "map", None
    else:
        source = D.expand_braces(cfg.train_data)
        missing = [p for p in source if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"train_data: {len(missing)} shards do not exist, e.g. {missing[0]}")
        kind, tar_reader = "tar", D.TarReader(cfg.wds_image_keys.split(";"), cfg.wds_caption_key, cfg.json_caption_field)
    return D.StreamSpec(kind, source, local_batch, rank, world_size, cfg.seed, transform, make_collate(model_cfg, True),
                        tar_reader=tar_reader, train=True, shuffle=cfg.shuffle)


def build_eval_set(cfg: TrainConfig, model_cfg):
    """``(images, captions, skipped)`` of the held-out synthetic split or of ``val_data``; None if neither."""
    transform = image_transform(model_cfg, False, cfg)
    if cfg.val_data:
        kind = cfg.val_data_type or cfg.data
        if kind == "csv":
            return D.load_eval_set(D.CsvSource(cfg.val_data, cfg.csv_image_key, cfg.csv_caption_key), transform)
        if kind == "wds":
            reader = D.TarReader(cfg.wds_image_keys.split(";"), cfg.wds_caption_key, cfg.json_caption_field)
            return D.load_eval_set([reader, D.expand_braces(cfg.val_data)], transform)
        raise ConfigError("config field 'val_data_type': give 'wds' or 'csv' for val_data")
    if cfg.data == "synthetic":
        source = D.SyntheticSource(cfg.seed, synthetic.EVAL, cfg.synthetic_eval_size, model_cfg.vision_cfg.image_size)
        return D.load_eval_set(source, transform)
    return None


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; initialises the process group under torchrun (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def find_resume(cfg: TrainConfig) -> Optional[Path]:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
    path = Path(cfg.resume)
    if (path / "checkpoints").is_dir():
        return latest_checkpoint(path / "checkpoints")
    if not path.exists():
        raise ConfigError(f"config field 'resume': {path} does not exist")
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train as configured by ``argv`` (default: ``sys.argv[1:]``); returns the final summary."""
    from vlcore.train.loop import train
    from vlcore.train.optim import make_optimizer, make_scheduler

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return {}
    cfg = load_config(argv)
    threads = torch.get_num_threads()
    rank, world_size, device = setup_distributed(cfg)
    try:
        global_batch, micro = cfg.batch_size, world_size * cfg.grad_accum
        if global_batch % micro:
            raise ConfigError(f"config field 'batch_size': {global_batch} must be a multiple of world_size x "
                              f"grad_accum = {world_size} x {cfg.grad_accum}")
        local_batch = global_batch // micro

        seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
        model, model_cfg = build_model(cfg)
        model.to(device)
        if model_cfg.kind == "captioner" and cfg.compile:
            raise ConfigError("config field 'compile': the captioner's packed batches change shape every step; "
                              "compile the CLIP or fusion presets")
        if cfg.synthetic_benchmark and model_cfg.kind == "captioner":
            raise ConfigError("config field 'synthetic_benchmark': times the CLIP and fusion steps; the captioner's "
                              "packed batches come from data (train it on the embedded dataset instead)")
        if cfg.grad_cache and (model_cfg.kind != "clip" or cfg.fsdp):
            raise ConfigError("config field 'grad_cache': GradCache needs a CLIP model (model kind 'clip', got "
                              f"{model_cfg.kind!r}) and no --fsdp")
        loss_cls = SigLipLoss if cfg.loss == "siglip" else partial(ClipLoss, local_loss=True, gather_with_grad=True)
        contrastive_loss = loss_cls(rank=rank, world_size=world_size)
        if model_cfg.kind == "fusion":
            model.itc_loss = contrastive_loss  # FIBER's ITC gathers across ranks like CLIP's loss

        # Weights first (into the plain model, on every rank), then sharding, then the optimizer over the
        # (possibly sharded) parameters, then its state.
        start_step, data_state, resumed_from, state = 0, None, None, None
        checkpoint = find_resume(cfg)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, model)
            if state["world_size"] != world_size:
                raise RuntimeError(f"{checkpoint} was written by a run with world_size {state['world_size']}; this run "
                                   f"has {world_size}. Exact resume needs the same world size (the data order and "
                                   f"per-rank batches depend on it): relaunch with --nproc-per-node matching, or pass "
                                   f"--resume none with a new --out-dir to start over")
        use_fsdp = cfg.fsdp and world_size > 1
        if use_fsdp:
            from vlcore.train.fsdp import load_optimizer_state, shard_model
            shard_model(model)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg)
        if state is not None:
            if state.get("fsdp", False) != use_fsdp:
                raise RuntimeError(f"{checkpoint}: its optimizer state was saved {'with' if state.get('fsdp') else 'without'} "
                                   f"FSDP; resume with the same --fsdp setting")
            if use_fsdp:
                load_optimizer_state(model, optimizer, state["optimizer"])
            else:
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
            start_step, data_state, resumed_from = state["step"], state["data"][rank], checkpoint

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
        return train(cfg, model=model, train_model=train_model, model_cfg=model_cfg, optimizer=optimizer,
                     scheduler=scheduler, contrastive_loss=contrastive_loss, spec=spec, eval_set=eval_set,
                     device=device, rank=rank, world_size=world_size, local_batch=local_batch,
                     start_step=start_step, data_state=data_state, resumed_from=resumed_from, fsdp=use_fsdp)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger program (the tests)
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def cli() -> None:
    """Console entry point: config errors print one line instead of a traceback."""
    try:
        summary = main()
    except (ConfigError, D.DataSchemaError) as e:
        print(f"vlcore-train: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if summary.get("interrupted"):
        raise SystemExit(130)  # the shell's code for "stopped by Ctrl-C"
