"""Token reduction: ToMe matching + merge against ToMe's PyTorch algorithm, token pooling and the 2x2 merger
against the copy ceiling, and a 12-layer ViT-B/16 with and without ToMe.

    python benchmarks/bench_tokens.py                 # full sizes (GPU, bf16)
    python benchmarks/bench_tokens.py --quick         # tiny sizes, seconds on CPU
    python benchmarks/bench_tokens.py --part tome     # one part: tome | pool | vit

Peers, measured in the same run: ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` in plain PyTorch
(``vlcore.nn.backend`` with ``impl="torch"``, the same code as facebookresearch/ToMe), and PyTorch's
``F.adaptive_avg_pool2d`` / ``F.interpolate`` / reshape-permute for the pooling connectors.
Byte floors: ToMe reads the metric and x (and size) once and writes the merged x and size; the backward
reads grad_out, x, out and writes grad_x. Pooling reads the grid once and writes the pooled grid; the
merger moves every byte once (read + write), like a copy. "% of copy" compares the floor bandwidth with a
device-to-device copy of the same size measured in the same run (goal >= 80 % for pooling / merger).
Goals (issue 4): ViT-B/16 B 256 r 16 match + merge forward >= 5x the PyTorch version, forward + backward
>= 4x, ViT-L/14@336 B 128 r 40 forward >= 5x.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vlcore  # noqa: E402
from common import Row, bench, copy_bandwidth, device_name, gbps, make_parser, print_table, write_rows  # noqa: E402
from vlcore.models.config import VisionConfig  # noqa: E402
from vlcore.models.vision import VisionTransformer  # noqa: E402
from vlcore.nn import backend  # noqa: E402


def tome_cases(quick):
    # (name, B, N, C, r, metric dim)
    if quick:
        return [("ViT-B/16 (quick)", 4, 197, 64, 16, 16)]
    return [("ViT-B/16", 256, 197, 768, 16, 64), ("ViT-L/14@336", 128, 577, 1024, 40, 64)]


def bench_tome(args, rows, table):
    device, rep = torch.device(args.device), (3 if args.quick else 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.finfo(dtype).bits // 8
    for name, batch, n, c, r, d in tome_cases(args.quick):
        metric = torch.randn(batch, n, d, device=device, dtype=dtype)
        x = torch.randn(batch, n, c, device=device, dtype=dtype)
        size = torch.randint(1, 4, (batch, n, 1), device=device).to(dtype)
        n_out = n - r

        def ours():
            return vlcore.ops.tome_merge(x, vlcore.ops.tome_match(metric, r, class_token=True), size=size)

        def theirs():
            match = backend.tome_match(metric, r, class_token=True, impl="torch")
            return backend.tome_merge(x, match, size=size, impl="torch")

        xg = x.detach().requires_grad_()
        grad = torch.randn(batch, n_out, c, device=device, dtype=dtype)

        def ours_full():
            out, _ = vlcore.ops.tome_merge(xg, vlcore.ops.tome_match(metric, r, class_token=True), size=size)
            return torch.autograd.grad(out, xg, grad)

        def theirs_full():
            match = backend.tome_match(metric, r, class_token=True, impl="torch")
            out, _ = backend.tome_merge(xg, match, size=size, impl="torch")
            return torch.autograd.grad(out, xg, grad)

        # Floors: forward reads metric, x, size and writes out, size; backward reads grad, x, out, writes grad_x.
        floor_fwd = (batch * n * (d + c + 1) + batch * n_out * (c + 1)) * elem
        floor_full = floor_fwd + (2 * batch * n_out * c + 2 * batch * n * c) * elem
        ceiling = copy_bandwidth(device, batch * n * c * elem, rep=rep)
        config = f"{dtype} B={batch} N={n} C={c} r={r} metric_dim={d} class_token"
        for mode, floor, ours_fn, theirs_fn in (("forward", floor_fwd, ours, theirs),
                                                 ("full", floor_full, ours_full, theirs_full)):
            t_ours = bench(ours_fn, device=device, rep=rep)
            t_torch = bench(theirs_fn, device=device, rep=rep)
            bw = gbps(floor, t_ours[0])
            for provider, t in (("vlcore", t_ours), ("torch", t_torch)):
                rows.append(Row("tome_match_merge", provider, mode, "time", "ms", "case", name, *t,
                                extra_benchmark_config_str=config, device_name=device_name(device)))
            table.append([name, mode, f"{t_ours[0]:.3f}", f"{t_torch[0]:.3f}", f"{t_torch[0] / t_ours[0]:.2f}x",
                          f"{bw:.0f}", f"{100 * bw / ceiling:.0f}%"])
        # The matching alone (index work, no feature bytes) and the merge alone.
        t_match = bench(lambda: vlcore.ops.tome_match(metric, r, class_token=True), device=device, rep=rep)
        t_match_torch = bench(lambda: backend.tome_match(metric, r, class_token=True, impl="torch"), device=device, rep=rep)
        table.append([name, "match only", f"{t_match[0]:.3f}", f"{t_match_torch[0]:.3f}",
                      f"{t_match_torch[0] / t_match[0]:.2f}x", "", ""])
        rows.append(Row("tome_match", "vlcore", "forward", "time", "ms", "case", name, *t_match,
                        extra_benchmark_config_str=config, device_name=device_name(device)))
        rows.append(Row("tome_match", "torch", "forward", "time", "ms", "case", name, *t_match_torch,
                        extra_benchmark_config_str=config, device_name=device_name(device)))
        table.append([name, "copy (ceiling)", "", "", "", f"{ceiling:.0f}", "100%"])


def pool_cases(quick):
    # (name, B, H, W, C, kind, output grid)
    if quick:
        return [("bilinear 27->14", 2, 27, 27, 64, "bilinear", (14, 14)), ("avg 24->12", 2, 24, 24, 64, "avg", (12, 12)),
                ("merge 2x2", 2, 16, 16, 64, "merge_2x2", None)]
    return [("LLaVA-OV video: bilinear 27->14", 256, 27, 27, 1152, "bilinear", (14, 14)),
            ("Open-Qwen2VL: avg 27->12", 256, 27, 27, 1152, "avg", (12, 12)),
            ("LLaVA-NeXT-Video: avg 24->12", 256, 24, 24, 1024, "avg", (12, 12)),
            ("Qwen2-VL merger 2x2", 64, 32, 32, 1280, "merge_2x2", None)]


def bench_pool(args, rows, table):
    device, rep = torch.device(args.device), (3 if args.quick else 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.finfo(dtype).bits // 8
    for name, batch, h, w, c, kind, out_hw in pool_cases(args.quick):
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


def bench_vit(args, rows, table):
    device, rep = torch.device(args.device), (2 if args.quick else 20)
    if args.quick:
        cfg = dict(image_size=32, patch_size=8, width=64, layers=2, heads=2)
        batch, r = 4, 2
    else:
        cfg = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12)
        batch, r = 256, 8
    images = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    results = {}
    for impl in ("vlcore", "torch"):
        for tome_r in (0, r):
            torch.manual_seed(0)
            tower = VisionTransformer(VisionConfig(**cfg, tome_r=tome_r), None, impl=impl).to(device)

            def step():
                with autocast:
                    tokens, size = tower.forward_tokens(images)
                    loss = tower.pool(tokens, size).float().square().mean()
                loss.backward()

            t = bench(step, device=device, rep=rep, warmup=2 if args.quick else 5)
            results[impl, tome_r] = t[0]
            rows.append(Row("vit_b16_train_step", impl, "full", "time", "ms", "tome_r", str(tome_r), *t,
                            extra_benchmark_config_str=f"B={batch} {cfg} bf16 autocast on GPU",
                            device_name=device_name(device)))
    for impl in ("vlcore", "torch"):
        plain, merged = results[impl, 0], results[impl, r]
        table.append([impl, f"{plain:.2f}", f"{merged:.2f}", f"{batch * 1000 / plain:.0f}", f"{batch * 1000 / merged:.0f}",
                      f"{plain / merged:.2f}x"])


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "tome", "pool", "vit"], default="all")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not vlcore.cuda_available():
        raise SystemExit("bench_tokens: this vlcore build has no CUDA kernels (vlcore.cuda_available() is False)")
    rows, tome_table, pool_table, vit_table = [], [], [], []
    if args.part in ("all", "tome"):
        bench_tome(args, rows, tome_table)
    if args.part in ("all", "pool"):
        bench_pool(args, rows, pool_table)
    if args.part in ("all", "vit"):
        bench_vit(args, rows, vit_table)
    path = write_rows("bench_tokens", rows, args.csv)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; rows in {path}")
    if tome_table:
        print_table("ToMe match + merge (class token, size-weighted) vs ToMe's PyTorch algorithm "
                    "(goals: B/16 fwd >= 5x, fwd+bwd >= 4x; L/14@336 fwd >= 5x)",
                    ["case", "pass", "vlcore ms", "torch ms", "speed-up", "floor GB/s", "of copy"], tome_table)
    if pool_table:
        print_table("token pooling / 2x2 merger forward (floor = read grid + write output; goal >= 80% of copy)",
                    ["case", "vlcore ms", "torch ms", "speed-up", "floor GB/s", "of copy", "fwd+bwd ms"], pool_table)
    if vit_table:
        print_table("ViT train step (forward + backward) with ToMe vs without",
                    ["impl", "ms (r=0)", "ms (ToMe)", "img/s (r=0)", "img/s (ToMe)", "throughput ratio"], vit_table)


if __name__ == "__main__":
    main()
