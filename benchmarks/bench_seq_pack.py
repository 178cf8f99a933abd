"""Sequence packing: op bandwidth against the copy ceiling, and planner padding waste.

    python3 benchmarks/bench_seq_pack.py            # full sizes (GPU)
    python3 benchmarks/bench_seq_pack.py --check    # the device check: C = 4096 alone, few reps
    python3 benchmarks/bench_seq_pack.py --quick    # seconds, on CPU
    python3 benchmarks/bench_seq_pack.py --part planner   # the planner alone (host-only, any machine)

Ops are bandwidth-bound, so each is reported against its byte floor (every byte it must read or write,
once) as GB/s and as a fraction of a device-to-device copy of the same size measured in the same run
(goal >= 80 %). The peer is the plain PyTorch a user writes instead: boolean-mask indexing for pack and
unpack, ``clone`` + ``index_copy_`` for the image scatter.

The planner's figure is its padding waste on a realistic VLP length mix (captions lognormal over 5-77
tokens plus a 144- or 576-token image, max_len 4096) against padded batching (goal < 3 %).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vlcore  # noqa: E402
from common import Row, bench, copy_bandwidth, device_name, gbps, make_parser, print_table, write_rows  # noqa: E402
from vlcore.packing import padded_waste, plan, vlp_length_mix  # noqa: E402


def op_cases(device, quick, check):
    """(padded batch, cu_seqlens, total, image positions) for LLaVA-like packs."""
    lengths = vlp_length_mix(64 if quick else 4096, seed=0)
    p = plan(lengths, 4096)
    channels = [64] if quick else [4096] if check else [1024, 4096]
    packs = 1 if quick else 8  # 8 packs of <= 4096 tokens: ~32k tokens per step
    for c in channels:
        sample_ids = [i for b in p.bins[:packs] for i in b]
        lens = torch.tensor([lengths[i] for i in sample_ids])
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        total = int(cu[-1])
        image_tokens = torch.where(lens > 576 + 4, 576, 144)
        starts = cu[:-1].long()
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), image_tokens.tolist())])
        yield c, lens, cu.to(device), total, positions.to(device)


def bench_ops(args, rows, table):
    device, rep = torch.device(args.device), (3 if args.quick else 10 if args.check else 50)
    dtype = torch.bfloat16
    for c, lens, cu, total, positions in op_cases(device, args.quick, args.check):
        batch, padded_len = len(lens), int(lens.max())
        row_bytes = c * torch.finfo(dtype).bits // 8
        padded = torch.randn(batch, padded_len, c, device=device, dtype=dtype)
        packed = torch.randn(total, c, device=device, dtype=dtype)
        image = torch.randn(positions.numel(), c, device=device, dtype=dtype)
        mask = (torch.arange(padded_len, device=device) < lens.to(device)[:, None])
        ceiling = copy_bandwidth(device, total * row_bytes, rep=rep)
        n_image = positions.numel()

        cases = {
            # name: (floor bytes, vlcore fn, torch fn)
            "pack": (2 * total * row_bytes,
                     lambda: vlcore.ops.pack(padded, cu, total),
                     lambda: padded[mask]),
            "unpack": ((total + batch * padded_len) * row_bytes,
                       lambda: vlcore.ops.unpack(packed, cu, padded_len),
                       lambda: packed.new_zeros(batch, padded_len, c).index_put_((mask,), packed)),
            "scatter_image_embeds": (2 * total * row_bytes,
                                     lambda: vlcore.ops.scatter_image_embeds(packed, image, positions),
                                     lambda: packed.clone().index_copy_(0, positions, image)),
            "scatter_image_embeds_backward": ((2 * total + n_image) * row_bytes,
                                              lambda: torch.ops.vlcore.scatter_image_embeds_backward(packed, positions),
                                              lambda: (packed.clone().index_fill_(0, positions, 0), packed[positions])),
        }
        config = f"bf16 C={c} B={batch} L={padded_len} T={total} N_image={n_image}"
        for name, (floor, ours, theirs) in cases.items():
            t_ours = bench(ours, device=device, rep=rep)
            t_torch = bench(theirs, device=device, rep=rep)
            bw = gbps(floor, t_ours[0])
            for provider, t in (("vlcore", t_ours), ("torch", t_torch)):
                rows.append(Row(name, provider, "forward", "time", "ms", "C", str(c), *t,
                                extra_benchmark_config_str=config, device_name=device_name(device)))
            table.append([name, c, total, f"{t_ours[0]:.3f}", f"{bw:.0f}", f"{100 * bw / ceiling:.0f}%",
                          f"{t_torch[0] / t_ours[0]:.2f}x"])
        table.append(["copy (ceiling)", c, total, "", f"{ceiling:.0f}", "100%", ""])


def bench_planner(args, rows, table):
    n = 5_000 if args.quick else 100_000
    lengths = vlp_length_mix(n, seed=1)
    for algorithm in ("first_fit",) if args.check else ("first_fit", "best_fit"):
        t0 = time.perf_counter()
        p = plan(lengths, 4096, algorithm=algorithm)
        seconds = time.perf_counter() - t0
        rows.append(Row("packing_plan", algorithm, "plan", "waste", "%", "samples", str(n), 100 * p.waste,
                        extra_benchmark_config_str=f"max_len=4096 packs={len(p.bins)} plan_s={seconds:.3f}",
                        device_name="host CPU"))
        table.append([algorithm, n, f"{100 * p.waste:.2f}%", len(p.bins), f"{seconds:.2f}"])
    for batch_size in (32,) if args.check else (8, 32, 128):
        waste = padded_waste(lengths, batch_size)
        rows.append(Row("padded_batching", f"batch_{batch_size}", "plan", "waste", "%", "samples", str(n), 100 * waste,
                        device_name="host CPU"))
        table.append([f"padded, batch {batch_size}", n, f"{100 * waste:.2f}%", "", ""])


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "ops", "planner"], default="all")
    args = parser.parse_args(argv)
    rows, op_table, plan_table = [], [], []
    if args.part in ("all", "ops"):
        if args.device == "cuda" and not vlcore.cuda_available():
            raise SystemExit("bench_seq_pack: this vlcore build has no CUDA kernels (vlcore.cuda_available() is False)")
        bench_ops(args, rows, op_table)
    if args.part in ("all", "planner"):
        bench_planner(args, rows, plan_table)
    path = write_rows("bench_seq_pack", rows, args.csv)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; rows in {path}")
    if op_table:
        print_table("seq_pack ops (bf16; floor = bytes that must move once; goal >= 80% of copy)",
                    ["op", "C", "tokens", "ms", "GB/s", "of copy", "vs torch"], op_table)
    if plan_table:
        print_table("packing planner, VLP mix, max_len 4096 (goal < 3% waste)",
                    ["planner", "samples", "waste", "packs", "seconds"], plan_table)


if __name__ == "__main__":
    main()
