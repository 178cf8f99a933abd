"""Trainer throughput: the whole vlcore-train step (forward, backward, clipping, AdamW, logging) on random
tensors (``--synthetic-benchmark``), samples/s and peak memory, vlcore kernels vs plain torch, and
open_clip's own training step where open_clip imports.

    python3 benchmarks/bench_train.py            # clip-b16, batch 256, 60 steps per provider (GPU)
    python3 benchmarks/bench_train.py --check    # the device check: 24 steps per provider
    python3 benchmarks/bench_train.py --quick    # the tiny CLIP on CPU, seconds

GPU: CLIP ViT-B/16 (the ``clip-b16`` preset, bf16 autocast) at a per-GPU batch of 256; ``--quick`` on CPU:
the tiny CLIP. The open_clip row is its model, ``ClipLoss`` and fused AdamW in a plain loop with the same
batch, autocast and step count (no data, clipping or logging: a slightly easier step than the trainer's).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, device_name, make_parser, print_table, write_rows  # noqa: E402

OPEN_CLIP_MODEL = {"clip-b16": "ViT-B-16", "clip-b32": "ViT-B-32"}


def run_trainer(preset: str, impl: str, batch: int, steps: int, log_every: int, device: str, extra: list[str]) -> dict:
    from vlcore.train.cli import main

    with tempfile.TemporaryDirectory() as out:
        summary = main(["--preset", preset, "--synthetic-benchmark", "--impl", impl, "--batch-size", str(batch),
                        "--steps", str(steps), "--warmup-steps", "1", "--log-every", str(log_every),
                        "--progress", "false", "--tensorboard", "false", "--plot", "false", "--device", device,
                        "--resume", "none", "--out-dir", out, *extra])
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    # Skip the first interval: it holds the warm-up (allocator, autotuning, compilation).
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    summary["steady_samples_per_s"] = statistics.median(rates) if rates else summary["samples_per_s"]
    return summary


def run_open_clip(preset: str, batch: int, steps: int, log_every: int, device: str) -> dict | None:
    """open_clip's own step on random tensors: samples/s over the steps after the first interval."""
    try:
        import open_clip
    except Exception:  # not installed, or its torchvision does not import beside this torch
        return None
    if preset not in OPEN_CLIP_MODEL:
        return None
    dev = torch.device(device)
    model = open_clip.create_model(OPEN_CLIP_MODEL[preset], output_dict=True).to(dev)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    size = getattr(model.visual, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, device=dev)
    # CLIP's BPE vocabulary and context length, open_clip's defaults for these models
    tokens = torch.randint(1, getattr(model, "vocab_size", 49408), (batch, getattr(model, "context_length", 77)), device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = model(images, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(log_every):  # the first interval: warm-up, as the trainer rows skip it
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps - log_every):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"steady_samples_per_s": batch * (steps - log_every) / seconds, "peak_memory_gb": peak}


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 256 on GPU, 16 with --quick)")
    parser.add_argument("--compile", action="store_true", help="also run the vlcore impl under torch.compile")
    args = parser.parse_args(argv)
    if args.quick:
        preset, batch, steps, log_every = "default", args.batch or 16, 6, 2
        extra = ["--model-overrides", '{"vision_cfg": {"image_size": 16, "patch_size": 8}}']
    else:
        preset, batch, steps, log_every = ("clip-b16", args.batch or 256) + ((24, 8) if args.check else (60, 10))
        extra = []
    providers = [("vlcore", []), ("torch", [])] + ([("vlcore+compile", ["--compile"])] if args.compile else [])
    rows, table = [], []
    for provider, flags in providers:
        impl = provider.split("+")[0]
        s = run_trainer(preset, impl, batch, steps, log_every, args.device, extra + flags)
        peak = s.get("peak_memory_gb", s.get("peak_rss_gb"))
        peak_name = "peak_memory" if "peak_memory_gb" in s else "peak_rss"
        x = f"{preset}/{batch}"
        rows.append(Row("train_step", provider, "full", "samples_per_s", "samples/s", "preset/batch", x,
                        s["steady_samples_per_s"], device_name=device_name(args.device)))
        rows.append(Row("train_step", provider, "full", peak_name, "GiB", "preset/batch", x, peak,
                        device_name=device_name(args.device)))
        table.append([x, provider, s["steady_samples_per_s"], peak])
    s = run_open_clip(preset, batch, steps, log_every, args.device)
    if s is not None:
        x = f"{preset}/{batch}"
        rows.append(Row("train_step", "open_clip", "full", "samples_per_s", "samples/s", "preset/batch", x,
                        s["steady_samples_per_s"], device_name=device_name(args.device)))
        if s["peak_memory_gb"] is not None:
            rows.append(Row("train_step", "open_clip", "full", "peak_memory", "GiB", "preset/batch", x,
                            s["peak_memory_gb"], device_name=device_name(args.device)))
        table.append([x, "open_clip", s["steady_samples_per_s"], s["peak_memory_gb"] or "-"])
    base = table[1][2]
    for line in table:
        line.append(line[2] / base)
    path = write_rows("bench_train", rows, args.csv)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; rows in {path}")
    print_table("vlcore-train step on synthetic tensors (bf16 on GPU)",
                ["preset/batch", "provider", "samples/s", "peak GiB", "vs torch"], table)


if __name__ == "__main__":
    main()
