"""The training loop, top to bottom: step, log, evaluate and save, repeat; then the final report.

:func:`train` is the whole loop on one screen; each stage is a function below it, in the order it runs.
Everything is set up beforehand by :func:`vlcore.train.builders.build_run`, which hands over one
:class:`~vlcore.train.run.Run`: the loop only reads the run's parts and advances ``run.state``.

Host synchronisation is kept to the log steps: the loss stays a device tensor between log lines, and
``.item()`` is called only when a line is written (as nanoGPT does), so a GPU never waits on the host in
between.
"""

from __future__ import annotations

import json
import resource
import signal
import textwrap
import time
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist

from vlcore.evaluation import report_lines
from vlcore.models.grad_cache import grad_cache_backward
from vlcore.peft import peft_report
from vlcore.peft.tuning import CONFIG_ATTR as PEFT_CONFIG_ATTR
from vlcore.train import fsdp as fsdp_lib
from vlcore.train.checkpoint import rng_state, save_checkpoint
from vlcore.train.logs import plot_curves, report
from vlcore.train.metrics import evaluate
from vlcore.train.run import Run
from vlcore.train.tasks import compute_loss, to_device


def train(run: Run) -> dict:
    """Train ``run`` to ``cfg.steps`` (or until Ctrl-C / SIGTERM); returns the end-of-run summary."""
    cfg, state = run.cfg, run.state
    announce(run)
    stop = StopRequest()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    try:
        # A resumed run starts at its checkpoint's step; one that already reached cfg.steps goes straight to
        # the final evaluation and report.
        while state.step < cfg.steps:
            loss, grad_norm, loss_terms = train_step(run)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                log_step(run, loss, grad_norm, loss_terms)
            # Checked after the step, never inside it: an interrupted optimizer step would leave weights and
            # optimizer state out of step with each other.
            stopping = all_agree_to_stop(run, stop)
            if not cfg.synthetic_benchmark:  # a benchmark neither evaluates nor saves
                evaluate_and_save(run, stopping)
            if stopping:
                run.logger.print(f"interrupted: stopped at step {state.step}"
                                 + (", checkpoint saved; run again to resume" if not cfg.synthetic_benchmark else ""))
                state.interrupted = True
                break
    finally:
        stop.restore()
    return finish(run)


# ---------------------------------------------------------------------------------------------------------
# Start


def announce(run: Run) -> None:
    """The config (also written to ``config.json``), the model, the batch split, and where we resume from."""
    if not run.is_main:
        return
    cfg, logger = run.cfg, run.logger
    (run.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    fields = " ".join(f"{k}={v}" for k, v in cfg.to_dict().items())
    logger.print("config: " + "\n        ".join(textwrap.wrap(fields, 110)))
    params = sum(p.numel() for p in run.model.parameters())
    mode = "FSDP2" if run.fsdp else "DDP" if run.world_size > 1 else "one process"
    logger.print(f"model {cfg.model} ({run.model_cfg.kind}, {params / 1e6:.2f} M parameters) on {run.device}, "
                 f"world size {run.world_size} ({mode}), global batch {cfg.batch_size} = {run.world_size} ranks x "
                 f"{cfg.grad_accum} micro-batches x {run.local_batch}")
    for note in run.notes:
        logger.print(note)
    if run.resumed_from is not None:
        logger.print(f"resumed from {run.resumed_from} at step {run.state.step}")


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


# ---------------------------------------------------------------------------------------------------------
# One optimizer step


def train_step(run: Run) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """One optimizer step over ``grad_accum`` micro-batches; returns ``(mean loss, grad norm or None, mean
    loss terms)``, all still on the device."""
    cfg, model = run.cfg, run.model
    loss, loss_terms = grad_cache_step(run) if cfg.grad_cache else accumulate_step(run)
    if run.fsdp:  # FSDP reduces only the sharded parameters' gradients; the replicated ones are ours to average
        fsdp_lib.all_reduce_replicated_grads(model, run.world_size)
    grad_norm = None
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        # Under FSDP the norm is a DTensor over the shards: the full norm is what the log should show.
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        note_nonfinite(run.state, grad_norm)  # clipping by a NaN norm would turn every weight into NaN
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes instead of adding
    if hasattr(model, "clamp_logit_scale"):
        model.clamp_logit_scale()  # open_clip: keep the temperature's inverse in [1, 100]
    run.state.step += 1
    run.state.meters.interval_steps += 1
    run.state.meters.run_steps += 1
    return loss, grad_norm, loss_terms


def accumulate_step(run: Run) -> tuple[torch.Tensor, dict]:
    """Forward and backward of each micro-batch in turn; their gradients add up in ``.grad``. Returns the
    mean loss and the mean of each loss term over the micro-batches."""
    cfg, state = run.cfg, run.state
    loss_sum, terms_sum = torch.zeros((), device=run.device), {}
    for micro in range(cfg.grad_accum):
        batch = next_batch(run)
        # DDP all-reduces gradients in backward; skip that on all but the last micro-batch.
        last = micro == cfg.grad_accum - 1
        sync = nullcontext() if last or run.world_size == 1 or run.fsdp else run.train_model.no_sync()
        with sync:
            with run.autocast():
                loss, terms = compute_loss(run.train_model, run.model_cfg.kind, batch, run.contrastive_loss)
            (loss / cfg.grad_accum).backward()  # each backward adds to .grad: average the micro-batches
        loss_sum += loss.detach() / cfg.grad_accum
        for name, term in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + term.float() / cfg.grad_accum
    note_nonfinite(state, loss_sum)
    return loss_sum, terms_sum


def grad_cache_step(run: Run) -> tuple[torch.Tensor, dict]:
    """GradCache: the loss over all micro-batches together (every sample is a negative for every other),
    with one micro-batch's activations at a time (:mod:`vlcore.models.grad_cache`). CLIP only: no terms."""
    # Only inputs are held for the whole batch (small); activations live for one micro-batch at a time.
    micro_batches = [next_batch(run) for _ in range(run.cfg.grad_accum)]
    images = torch.cat([b["images"] for b in micro_batches])
    tokens = torch.cat([b["tokens"] for b in micro_batches])
    with run.autocast():
        loss = grad_cache_backward(run.model, run.contrastive_loss, images, tokens, run.local_batch)
    if run.world_size > 1:  # the plain model ran, not DDP: average the gradients ourselves
        fsdp_lib.all_reduce_replicated_grads(run.model, run.world_size)
    note_nonfinite(run.state, loss)
    return loss, {}


def next_batch(run: Run) -> dict:
    """The next micro-batch on the device; counts the time spent waiting for it and records its position."""
    meters = run.state.meters
    fetch_start = time.perf_counter()
    batch, batch_position = next(run.batches)  # the workers prepare the following batches meanwhile
    meters.data_wait += time.perf_counter() - fetch_start
    if batch_position is not None:
        for shard in run.state.position.update(batch_position):
            run.logger.print(f"data: {shard} is truncated (no end-of-archive marker) or could not be read after "
                             f"its retries: what it held past the last good sample is lost; counted as skipped")
    if "padding_avoided" in batch:
        meters.padding_avoided += batch.pop("padding_avoided")
        meters.padding_batches += 1
    return to_device(batch, run.device)


def note_nonfinite(state, value: torch.Tensor) -> None:
    """Remember (on the device, without a sync) the first step whose loss or gradient norm is NaN or
    infinite; :func:`check_finite` reads it when the loop logs or saves."""
    step = torch.full((), state.step + 1, device=value.device)
    bad = ~torch.isfinite(value.detach())
    if state.first_nonfinite is None:
        state.first_nonfinite = torch.zeros((), dtype=step.dtype, device=value.device)
    state.first_nonfinite = torch.where(bad & (state.first_nonfinite == 0), step, state.first_nonfinite)


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients became NaN or infinite: the run stops and keeps its last good checkpoint."""


def check_finite(run: Run, parameters: bool = False) -> None:
    """Stop the run if a step since the start produced a non-finite loss or gradient norm, or (before a
    save, ``parameters=True``) if a weight is no longer finite. Stopping rather than skipping such steps:
    once one appears the weights are usually already damaged, and a checkpoint of them would replace a
    good one. Every rank reaches the same verdict (one all-reduce), so no rank waits for one that left."""
    state = run.state
    first = int(state.first_nonfinite) if state.first_nonfinite is not None else 0
    weights_ok = True
    if parameters:
        # One reduction over every parameter (the local shard under FSDP): a sync per save, not per step.
        local = [p.to_local() if hasattr(p, "to_local") else p for p in run.model.parameters()]
        weights_ok = bool(torch.stack([torch.isfinite(p.detach()).all() for p in local]).all())
    if run.world_size > 1:
        verdict = torch.tensor([first, int(not weights_ok)], device=run.device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        first, weights_ok = int(verdict[0]), not bool(verdict[1])
    if first == 0 and weights_ok:
        return
    where = f"at step {first}" if first else f"by step {state.step}"
    kept = (f"the last good checkpoint is {state.checkpoint_path}" if state.checkpoint_path is not None
            else "no checkpoint was written")
    raise NonFiniteLoss(f"the training diverged: the loss or gradients became NaN or infinite {where}; stopped "
                        f"without saving, {kept}. Lower --lr, keep --grad-clip on, or look for bad data.")


# ---------------------------------------------------------------------------------------------------------
# Logging


def all_mean(value: torch.Tensor, world_size: int) -> float:
    """The mean of a scalar over the ranks, as a Python float (a host sync: called only when logging)."""
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size
    return value.item()


def all_sum(value: int, run: Run) -> int:
    if run.world_size == 1:
        return value
    total = torch.tensor([value], device=run.device)
    dist.all_reduce(total)
    return int(total.item())


def log_step(run: Run, loss: torch.Tensor, grad_norm: Optional[torch.Tensor], loss_terms: dict) -> None:
    """One metrics record (metrics.jsonl, TensorBoard, the bar); every tenth a printed line."""
    cfg, state, meters, logger = run.cfg, run.state, run.state.meters, run.logger
    # The logged loss is the mean over ranks of the last step's loss (not an average over the interval):
    # the exact-resume tests compare it step by step.
    loss_value = all_mean(loss, run.world_size)
    skipped = all_sum(state.position.skipped, run)
    elapsed = time.perf_counter() - meters.interval_start
    samples_per_s = meters.interval_steps * cfg.batch_size / elapsed
    record = {"step": state.step, "loss": loss_value, "lr": run.scheduler.get_last_lr()[0],
              "samples_per_s": samples_per_s, "data_wait": meters.data_wait / elapsed, "skipped": skipped}
    for name, term in loss_terms.items():  # a fusion model's ITC / ITM / MLM: which objective is learning
        record[f"loss_{name}"] = all_mean(term, run.world_size)
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if hasattr(run.model, "logit"):
        record["logit_scale"] = float(run.model.logit.logit_scale.detach().exp())
    logger.log(record)  # logged even when not finite: the record shows where it went wrong
    check_finite(run)
    logger.progress(meters.interval_steps, loss=f"{loss_value:.3f}", samples_s=f"{samples_per_s:.0f}",
                    data_wait=f"{100 * record['data_wait']:.0f}%")
    # With a progress bar the bar carries the numbers; a printed line every ten records is enough.
    if state.step % (cfg.log_every * 10) == 0 or state.step == cfg.steps or logger.bar is None:
        terms = ", ".join(f"{name} {record['loss_' + name]:.3f}" for name in loss_terms)
        loss_text = f"{loss_value:.4f} ({terms})" if terms else f"{loss_value:.4f}"
        logger.print(f"step {state.step:>6}/{cfg.steps} | loss {loss_text} | lr {record['lr']:.2e} | "
                     f"{samples_per_s:,.0f} samples/s | data wait {100 * record['data_wait']:.0f}% | "
                     f"{1e3 * elapsed / meters.interval_steps:.1f} ms/step | skipped {skipped}")
    meters.restart_interval()


# ---------------------------------------------------------------------------------------------------------
# Evaluation and checkpoints


def all_agree_to_stop(run: Run, stop: StopRequest) -> bool:
    """Whether to stop after this step: every rank must agree to stop at the same step, or a collective of
    the next step would wait forever for the ranks that left."""
    stopping = stop.requested
    if run.world_size > 1:
        flag = torch.tensor([int(stopping)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = bool(flag.item())
    return stopping


def evaluate_and_save(run: Run, stopping: bool) -> None:
    """Evaluate every ``eval_every`` steps (the last step is evaluated by :func:`finish`); save every
    ``checkpoint_every`` steps, at the last step, and when stopping."""
    cfg, step = run.cfg, run.state.step
    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        run_evaluation(run)
    if stopping or step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
        check_finite(run, parameters=True)  # never replace a good checkpoint by a diverged one
        save(run)


def run_evaluation(run: Run) -> None:
    """Every metric of the model's kind on the held-out set (:func:`vlcore.train.metrics.evaluate`): one
    record in metrics.jsonl and TensorBoard (``eval/...``), one log line with the headline figures, and the
    report lines (sample captions included) kept for report.txt."""
    state = run.state
    if run.eval_set is not None and (run.is_main or run.fsdp):
        result = evaluate(run.model, run.model_cfg, run.eval_set, run.device, run.autocast, run.cfg)
        state.last_eval = result.metrics
        state.last_eval_lines = report_lines(result)
        # Unreadable evaluation samples change what the metrics mean: they travel with every result.
        state.last_eval["eval_skipped"] = run.eval_set[2]
    if run.is_main and run.eval_set is not None:
        run.logger.log({"step": state.step, **state.last_eval}, tensorboard_prefix="eval/")
        headline = ("R@1", "R@5", "R@10", "_loss", "cider", "bleu_4", "top1_accuracy", "mir")
        shown = {k: v for k, v in state.last_eval.items() if k.endswith(headline) and isinstance(v, float)}
        run.logger.print(f"step {state.step}: eval " + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
                         + f" ({state.last_eval['eval_images']} images, {run.eval_set[2]} unreadable skipped)")
        for line in state.last_eval_lines:
            if line.startswith(("sample captions", "  ")):
                run.logger.print(f"step {state.step}: {line}")
    if run.world_size > 1:  # the other ranks wait here while rank 0 evaluates
        dist.barrier()


def save(run: Run) -> None:
    """A checkpoint of this step: weights, optimizer, schedule, every rank's RNG and data position."""
    state = run.state
    # Every rank's RNG state and data position travel to rank 0, which alone writes.
    ranks_rng, ranks_data = [rng_state()], [state.position.state_dict()]
    model_state, optimizer_state = None, None
    if run.fsdp:  # gather the shards (every rank takes part; rank 0 receives)
        model_state, optimizer_state = fsdp_lib.full_state_dicts(run.model, run.optimizer)
    if run.world_size > 1:
        gathered_rng, gathered_data = [None] * run.world_size, [None] * run.world_size
        dist.all_gather_object(gathered_rng, ranks_rng[0])
        dist.all_gather_object(gathered_data, ranks_data[0])
        ranks_rng, ranks_data = gathered_rng, gathered_data
    if run.is_main:
        checkpoint = {"step": state.step, "optimizer": optimizer_state if run.fsdp else run.optimizer.state_dict(),
                      "scheduler": run.scheduler.state_dict(), "rng": ranks_rng, "data": ranks_data,
                      "world_size": run.world_size, "fsdp": run.fsdp, "config": run.cfg.to_dict()}
        state.checkpoint_path = save_checkpoint(run.out_dir / "checkpoints", state.step, run.model, checkpoint,
                                                run.cfg.keep_checkpoints, model_state=model_state)
        run.logger.print(f"step {state.step}: checkpoint {state.checkpoint_path}")
    if run.world_size > 1:  # nobody runs ahead into the next step's collectives while rank 0 writes
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# The end: final evaluation, plot, report


def finish(run: Run) -> dict:
    """Final evaluation, then the summary (returned, and written by rank 0 as report.txt, summary.json and
    curves.png). The summary is what a user reads first: throughput, memory, metrics, skipped data."""
    cfg, state, meters = run.cfg, run.state, run.state.meters
    total_time = time.perf_counter() - meters.run_start
    check_finite(run)
    if state.step == cfg.steps and not cfg.synthetic_benchmark:
        run_evaluation(run)
    summary = {"steps": state.step, "interrupted": state.interrupted,
               "samples_per_s": meters.run_steps * cfg.batch_size / max(total_time, 1e-9), "train_time_s": total_time}
    if run.device.type == "cuda":
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2 ** 30
    else:
        summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    summary.update(state.last_eval)
    if state.last_eval.get("i2t_chance_R@1"):
        summary["i2t_R@1_vs_chance"] = state.last_eval["i2t_R@1"] / state.last_eval["i2t_chance_R@1"]
    summary["skipped_samples"] = state.position.skipped
    if state.position.truncated_shards:
        summary["truncated_shards"] = len(state.position.truncated_shards)
    if meters.padding_batches:
        # Packed batches carry no padding at all; the padded layout is what they are compared against.
        summary["packing_padding_ratio"] = 0.0
        summary["padded_batch_padding_ratio"] = meters.padding_avoided / meters.padding_batches
    if state.checkpoint_path is not None:
        summary["checkpoint"] = str(state.checkpoint_path)
    summary.update(tuning_summary(run.model))
    if run.is_main:
        write_report(run, summary)
    return summary


def tuning_summary(model: torch.nn.Module) -> dict:
    """A ``--peft`` run's trainable parameters, for the report: the method and the fraction that trained."""
    if getattr(model, PEFT_CONFIG_ATTR, None) is None:
        return {}
    report = peft_report(model)
    return {"peft": str(report), "trainable_fraction": report.fraction}


def write_report(run: Run, summary: dict) -> None:
    # final_loss comes from the log, not from memory, so a resumed run that had nothing left to train still
    # reports the loss its last step had.
    logger = run.logger
    losses = [r["loss"] for r in logger.records if "loss" in r]
    if losses:
        summary["final_loss"] = losses[-1]
    if run.cfg.plot and logger.records:
        summary["plot"] = str(plot_curves(logger.records, run.out_dir / "curves.png"))
    text = report(summary, run.state.last_eval_lines)
    (run.out_dir / "report.txt").write_text(text.strip() + "\n")
    (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.close()
    print(text, flush=True)
