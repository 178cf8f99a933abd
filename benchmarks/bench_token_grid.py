"""Token grids: token pooling (bilinear / average) and the 2x2 patch merger against PyTorch and the copy ceiling.

    python3 benchmarks/bench_token_grid.py            # full sizes (GPU, bf16)
    python3 benchmarks/bench_token_grid.py --check    # the device check: one shape per goal row, few reps
    python3 benchmarks/bench_token_grid.py --quick    # tiny sizes, seconds on CPU

Peers, measured in the same run: PyTorch's ``F.adaptive_avg_pool2d`` / ``F.interpolate`` / reshape-permute
(``vlcore.nn.backend`` with ``impl="torch"``). Byte floor: pooling reads the grid once and writes the pooled
grid; the merger moves every byte once (read + write), like a copy. "% of copy" compares the floor bandwidth
with a device-to-device copy of the same size measured in the same run (goal >= 80 %).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vlcore  # noqa: E402
from common import Row, bench, copy_bandwidth, device_name, gbps, make_parser, print_table, write_rows  # noqa: E402
from vlcore.nn import backend  # noqa: E402


def pool_cases(quick, check):
    # (name, B, H, W, C, kind, output grid)
    if quick:
        return [("bilinear 27->14", 2, 27, 27, 64, "bilinear", (14, 14)), ("avg 24->12", 2, 24, 24, 64, "avg", (12, 12)),
                ("merge 2x2", 2, 16, 16, 64, "merge_2x2", None)]
    cases = [("LLaVA-OV video: bilinear 27->14", 256, 27, 27, 1152, "bilinear", (14, 14)),
             ("Open-Qwen2VL: avg 27->12", 256, 27, 27, 1152, "avg", (12, 12)),
             ("LLaVA-NeXT-Video: avg 24->12", 256, 24, 24, 1024, "avg", (12, 12)),
             ("Qwen2-VL merger 2x2", 64, 32, 32, 1280, "merge_2x2", None)]
    return [c for c in cases if not (check and c[0].startswith("LLaVA-NeXT"))]  # --check: the goal rows


def bench_pool(args, rows, table):
    device, rep = torch.device(args.device), (3 if args.quick else 5 if args.check else 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.finfo(dtype).bits // 8
    for name, batch, h, w, c, kind, out_hw in pool_cases(args.quick, args.check):
        x = torch.randn(batch, h * w, c, device=device, dtype=dtype)
        if kind == "merge_2x2":
            ours = lambda: vlcore.ops.patch_merge_2x2(x, (h, w))  # noqa: E731
            theirs = lambda: backend.patch_merge_2x2(x, (h, w), impl="torch")  # noqa: E731
            out_tokens = h * w // 4 * 4
        else:
            ours = lambda: vlcore.ops.token_pool_2d(x, (h, w), output_hw=out_hw, mode=kind)  # noqa: E731
            theirs = lambda: backend.token_pool_2d(x, (h, w), output_hw=out_hw, mode=kind, impl="torch")  # noqa: E731
            out_tokens = out_hw[0] * out_hw[1]
        floor = batch * (h * w + out_tokens) * c * elem
        ceiling = copy_bandwidth(device, floor // 2, rep=rep)
        xg = x.detach().requires_grad_()
        if kind == "merge_2x2":
            fwd_bwd = lambda: torch.autograd.grad(vlcore.ops.patch_merge_2x2(xg, (h, w)).sum(), xg)  # noqa: E731
        else:
            fwd_bwd = lambda: torch.autograd.grad(  # noqa: E731
                vlcore.ops.token_pool_2d(xg, (h, w), output_hw=out_hw, mode=kind).sum(), xg)
        t_ours = bench(ours, device=device, rep=rep)
        t_torch = bench(theirs, device=device, rep=rep)
        bw = gbps(floor, t_ours[0])
        config = f"{dtype} B={batch} grid={h}x{w} C={c} out={out_hw}"
        for provider, t in (("vlcore", t_ours), ("torch", t_torch)):
            rows.append(Row("token_pool", provider, "forward", "time", "ms", "case", name, *t,
                            extra_benchmark_config_str=config, device_name=device_name(device)))
        t_full = bench(fwd_bwd, device=device, rep=rep)
        rows.append(Row("token_pool", "vlcore", "full", "time", "ms", "case", name, *t_full,
                        extra_benchmark_config_str=config, device_name=device_name(device)))
        table.append([name, f"{t_ours[0]:.3f}", f"{t_torch[0]:.3f}", f"{t_torch[0] / t_ours[0]:.2f}x", f"{bw:.0f}",
                      f"{100 * bw / ceiling:.0f}%", f"{t_full[0]:.3f}"])



def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not vlcore.cuda_available():
        raise SystemExit("bench_token_grid: this vlcore build has no CUDA kernels (vlcore.cuda_available() is False)")
    rows, table = [], []
    bench_pool(args, rows, table)
    path = write_rows("bench_token_grid", rows, args.csv)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; rows in {path}")
    print_table("token pooling / 2x2 merger forward (floor = read grid + write output; goal >= 80% of copy)",
                ["case", "vlcore ms", "torch ms", "speed-up", "floor GB/s", "of copy", "fwd+bwd ms"], table)


if __name__ == "__main__":
    main()
