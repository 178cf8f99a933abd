"""Trainer throughput: the whole vlcore-train step (forward, backward, clipping, AdamW, logging) on random
tensors (``--synthetic-benchmark``), samples/s and peak memory, vlcore kernels vs plain torch.

GPU: CLIP ViT-B/16 (the ``clip-b16`` preset, bf16 autocast) at a per-GPU batch of 256; ``--quick`` on CPU:
the tiny CLIP. The matching comparison with open_clip's own training step is ``bench_models.py --part clip``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, device_name, make_parser, print_table, write_rows  # noqa: E402


def run_trainer(preset: str, impl: str, batch: int, steps: int, log_every: int, device: str, extra: list[str]) -> dict:
    from vlcore.train.main import main

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


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 256 on GPU, 16 with --quick)")
    parser.add_argument("--compile", action="store_true", help="also run the vlcore impl under torch.compile")
    args = parser.parse_args(argv)
    if args.quick:
        preset, batch, steps, log_every = "default", args.batch or 16, 6, 2
        extra = ["--model-overrides", '{"vision_cfg": {"image_size": 16, "patch_size": 8}}']
    else:
        preset, batch, steps, log_every = "clip-b16", args.batch or 256, 60, 10
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
    base = table[1][2]
    for line in table:
        line.append(line[2] / base)
    path = write_rows("bench_train", rows, args.csv)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; rows in {path}")
    print_table("vlcore-train step on synthetic tensors (bf16 on GPU)",
                ["preset/batch", "provider", "samples/s", "peak GiB", "vs torch"], table)


if __name__ == "__main__":
    main()
