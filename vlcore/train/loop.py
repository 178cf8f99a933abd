"""The training loop, top to bottom: fetch, forward, backward, step, log, evaluate, checkpoint.

Everything else (building the model, the data, resuming) happens in :mod:`vlcore.train.main` before this runs.
"""

from __future__ import annotations

import json
import resource
import signal
import textwrap
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from vlcore.models.grad_cache import grad_cache_backward
from vlcore.train.checkpoint import rng_state, save_checkpoint
from vlcore.train.data import DataPosition, make_loader
from vlcore.train.evaluate import evaluate
from vlcore.train.fsdp import all_reduce_replicated_grads
from vlcore.train.logs import RunLogger, plot_curves, report
from vlcore.train.main import autocast_for
from vlcore.train.tasks import compute_loss, to_device


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop finishes the current step, saves a checkpoint and exits. (Raising
    in the middle of ``optimizer.step()`` could leave half-updated weights.) A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.previous:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def synthetic_benchmark_batches(model_cfg, local_batch: int, device: torch.device):
    """Random images and tokens, made once on the device: the step's throughput without any input pipeline."""
    vision, text = model_cfg.vision_cfg, model_cfg.text_cfg
    images = torch.randn(local_batch, 3, vision.image_size, vision.image_size, device=device)
    tokens = torch.randint(1, text.vocab_size - 1, (local_batch, text.context_length), device=device)
    tokens[:, -1] = text.vocab_size - 1  # an end-of-text token for the argmax pooling
    while True:
        yield {"images": images, "tokens": tokens}, None


def all_mean(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size
    return value.item()  # .item() is a host-device sync point: only when logging


def train(cfg, *, model, train_model, model_cfg, optimizer, scheduler, contrastive_loss, spec, eval_set, device,
          rank, world_size, local_batch, start_step, data_state, resumed_from, fsdp=False) -> dict:
    is_main = rank == 0
    out_dir = Path(cfg.out_dir)
    logger = RunLogger(out_dir, cfg, is_main, start_step)
    if is_main:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        fields = " ".join(f"{k}={v}" for k, v in cfg.to_dict().items())
        logger.print("config: " + "\n        ".join(textwrap.wrap(fields, 110)))
        params = sum(p.numel() for p in model.parameters())
        logger.print(f"model {cfg.model} ({model_cfg.kind}, {params / 1e6:.2f} M parameters) on {device}, "
                     f"world size {world_size} ({'FSDP2' if fsdp else 'DDP' if world_size > 1 else 'one process'}), global batch {cfg.batch_size} = {world_size} ranks x "
                     f"{cfg.grad_accum} micro-batches x {local_batch}")
        if resumed_from is not None:
            logger.print(f"resumed from {resumed_from} at step {start_step}")
    autocast = autocast_for(cfg, device)
    kind = model_cfg.kind
    position = DataPosition(cfg.workers, data_state)
    if cfg.synthetic_benchmark:
        batches = synthetic_benchmark_batches(model_cfg, local_batch, device)
    else:
        batches = iter(make_loader(spec, cfg.workers, data_state))
    stop = StopRequest()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    step, last_eval, checkpoint_path, interrupted = start_step, {}, resumed_from, False
    padding_avoided, padding_batches = 0.0, 0
    interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0
    run_start, run_steps = time.perf_counter(), 0

    def save(step: int) -> None:
        nonlocal checkpoint_path
        # Every rank's RNG state and data position travel to rank 0, which alone writes.
        ranks_rng, ranks_data = [rng_state()], [position.state_dict()]
        model_state, optimizer_state = None, None
        if fsdp:  # gather the shards (every rank takes part; rank 0 receives)
            from vlcore.train.fsdp import full_state_dicts
            model_state, optimizer_state = full_state_dicts(model, optimizer)
        if world_size > 1:
            gathered_rng, gathered_data = [None] * world_size, [None] * world_size
            dist.all_gather_object(gathered_rng, ranks_rng[0])
            dist.all_gather_object(gathered_data, ranks_data[0])
            ranks_rng, ranks_data = gathered_rng, gathered_data
        if is_main:
            state = {"step": step, "optimizer": optimizer_state if fsdp else optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": ranks_rng, "data": ranks_data,
                     "world_size": world_size, "fsdp": fsdp, "config": cfg.to_dict()}
            checkpoint_path = save_checkpoint(out_dir / "checkpoints", step, model, state, cfg.keep_checkpoints,
                                              model_state=model_state)
            logger.print(f"step {step}: checkpoint {checkpoint_path}")
        if world_size > 1:
            dist.barrier()

    def run_eval(step: int) -> None:
        nonlocal last_eval
        if eval_set is not None and (is_main or fsdp):
            last_eval = evaluate(model, model_cfg, eval_set, device, autocast)
        if is_main and eval_set is not None:
            logger.log({"step": step, **last_eval})
            shown = {k: v for k, v in last_eval.items() if k.endswith(("R@1", "R@5", "R@10", "_loss"))}
            logger.print(f"step {step}: eval " + " ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        if world_size > 1:
            dist.barrier()

    def fetch() -> dict:
        """The next micro-batch on the device; counts the time spent waiting for it."""
        nonlocal data_wait, padding_avoided, padding_batches
        fetch_start = time.perf_counter()
        batch, batch_position = next(batches)  # the workers prepare the following batches meanwhile
        data_wait += time.perf_counter() - fetch_start
        if batch_position is not None:
            position.update(batch_position)
        if "padding_avoided" in batch:
            padding_avoided, padding_batches = padding_avoided + batch.pop("padding_avoided"), padding_batches + 1
        return to_device(batch, device)

    try:
        while step < cfg.steps:
            # ---- one optimizer step: grad_accum micro-batches, each forward + backward ----------------------
            if cfg.grad_cache:
                # GradCache: the loss over all micro-batches together (every sample is a negative for every
                # other), with one micro-batch's activations at a time (vlcore.models.grad_cache).
                micro_batches = [fetch() for _ in range(cfg.grad_accum)]
                images = torch.cat([b["images"] for b in micro_batches])
                tokens = torch.cat([b["tokens"] for b in micro_batches])
                with autocast():
                    loss_sum = grad_cache_backward(model, contrastive_loss, images, tokens, local_batch)
                if world_size > 1:  # the plain model ran, not DDP: average the gradients ourselves
                    all_reduce_replicated_grads(model, world_size)
            else:
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    batch = fetch()
                    # DDP all-reduces gradients in backward; skip that on all but the last micro-batch.
                    last = micro == cfg.grad_accum - 1
                    sync = nullcontext() if last or world_size == 1 or fsdp else train_model.no_sync()
                    with sync:
                        with autocast():
                            loss = compute_loss(train_model, kind, batch, contrastive_loss)
                        (loss / cfg.grad_accum).backward()  # each backward adds to .grad: average the micro-batches
                    loss_sum += loss.detach() / cfg.grad_accum
            if fsdp:
                all_reduce_replicated_grads(model, world_size)
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(model, "clamp_logit_scale"):
                model.clamp_logit_scale()  # open_clip: keep the temperature's inverse in [1, 100]
            step += 1
            interval_steps += 1
            run_steps += 1

            # ---- logging ------------------------------------------------------------------------------------
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss_value = all_mean(loss_sum, world_size)
                skipped = position.skipped
                if world_size > 1:
                    counts = torch.tensor([skipped], device=device)
                    dist.all_reduce(counts)
                    skipped = int(counts.item())
                elapsed = time.perf_counter() - interval_start
                samples_per_s = interval_steps * cfg.batch_size / elapsed
                record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": samples_per_s, "data_wait": data_wait / elapsed, "skipped": skipped}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if hasattr(model, "logit"):
                    record["logit_scale"] = float(model.logit.logit_scale.detach().exp())
                logger.log(record)
                logger.progress(interval_steps, loss=f"{loss_value:.3f}", samples_s=f"{samples_per_s:.0f}",
                                data_wait=f"{100 * record['data_wait']:.0f}%")
                if step % (cfg.log_every * 10) == 0 or step == cfg.steps or cfg.progress is False:
                    logger.print(f"step {step:>6}/{cfg.steps} | loss {loss_value:.4f} | lr {record['lr']:.2e} | "
                                 f"{samples_per_s:,.0f} samples/s | data wait {100 * record['data_wait']:.0f}% | "
                                 f"{1e3 * elapsed / interval_steps:.1f} ms/step | skipped {skipped}")
                interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0

            # ---- evaluation and checkpoints -----------------------------------------------------------------
            stopping = stop.requested
            if world_size > 1:  # every rank must agree to stop at the same step
                flag = torch.tensor([int(stopping)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            if cfg.synthetic_benchmark:
                continue
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                run_eval(step)
            if stopping or step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save(step)
            if stopping:
                logger.print(f"interrupted: stopped at step {step}, checkpoint saved; run again to resume")
                interrupted = True
                break
    finally:
        stop.restore()

    # ---- the end: final evaluation, plot, report -------------------------------------------------------------
    total_time = time.perf_counter() - run_start
    if step == cfg.steps and not cfg.synthetic_benchmark:
        run_eval(step)
    summary = {"steps": step, "interrupted": interrupted, "samples_per_s": run_steps * cfg.batch_size / max(total_time, 1e-9),
               "train_time_s": total_time}
    if device.type == "cuda":
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    summary.update({k: v for k, v in last_eval.items()})
    if last_eval.get("i2t_chance_R@1"):
        summary["i2t_R@1_vs_chance"] = last_eval["i2t_R@1"] / last_eval["i2t_chance_R@1"]
    summary["skipped_samples"] = position.skipped
    if padding_batches:
        summary["packing_padding_ratio"] = 0.0
        summary["padded_batch_padding_ratio"] = padding_avoided / padding_batches
    if checkpoint_path is not None:
        summary["checkpoint"] = str(checkpoint_path)
    if is_main:
        losses = [r["loss"] for r in logger.records if "loss" in r]
        if losses:
            summary["final_loss"] = losses[-1]
        if cfg.plot and logger.records:
            summary["plot"] = str(plot_curves(logger.records, out_dir / "curves.png"))
        text = report(summary)
        (out_dir / "report.txt").write_text(text.strip() + "\n")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        logger.close()
        print(text, flush=True)
    return summary
