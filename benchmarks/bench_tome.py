"""ToMe (token merging): matching + merge against ToMe's PyTorch algorithm, and a 12-layer ViT-B/16 train step
with and without ToMe.

    python3 benchmarks/bench_tome.py                 # full sizes (GPU, bf16)
    python3 benchmarks/bench_tome.py --check         # the device check: one shape per goal row, few reps
    python3 benchmarks/bench_tome.py --quick         # tiny sizes, seconds on CPU
    python3 benchmarks/bench_tome.py --part tome     # one part: tome | vit

Peer, measured in the same run: ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` in plain PyTorch
(``vlcore.nn.backend`` with ``impl="torch"``, the same code as facebookresearch/ToMe).
Byte floors: ToMe reads the metric and x (and size) once and writes the merged x and size; the backward
reads grad_out, x, out and writes grad_x. "% of copy" compares the floor bandwidth with a device-to-device
copy of the same size measured in the same run. Goals: ViT-B/16 B 256 r 16 match + merge forward >= 5x the
PyTorch version, forward + backward >= 4x, ViT-L/14@336 B 128 r 40 forward >= 5x; the ViT step with ToMe
r = 8 against none is a reported ratio. --check times the goal rows alone (not the matching alone, the
ViT-L/14 backward or the ViT's torch impl) with few reps.
"""

from __future__ import annotations

import contextlib
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


def reps(args, full: int) -> int:
    return 3 if args.quick else 5 if args.check else full


def bench_tome(args, rows, table):
    device, rep = torch.device(args.device), reps(args, 50)
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
        modes = [("forward", floor_fwd, ours, theirs), ("full", floor_full, ours_full, theirs_full)]
        if args.check and name.startswith("ViT-L"):  # its goal row is the forward alone
            modes = modes[:1]
        for mode, floor, ours_fn, theirs_fn in modes:
            t_ours = bench(ours_fn, device=device, rep=rep)
            t_torch = bench(theirs_fn, device=device, rep=rep)
            bw = gbps(floor, t_ours[0])
            for provider, t in (("vlcore", t_ours), ("torch", t_torch)):
                rows.append(Row("tome_match_merge", provider, mode, "time", "ms", "case", name, *t,
                                extra_benchmark_config_str=config, device_name=device_name(device)))
            table.append([name, mode, f"{t_ours[0]:.3f}", f"{t_torch[0]:.3f}", f"{t_torch[0] / t_ours[0]:.2f}x",
                          f"{bw:.0f}", f"{100 * bw / ceiling:.0f}%"])
        table.append([name, "copy (ceiling)", "", "", "", f"{ceiling:.0f}", "100%"])
        if args.check:
            continue
        # The matching alone (index work, no feature bytes).
        t_match = bench(lambda: vlcore.ops.tome_match(metric, r, class_token=True), device=device, rep=rep)
        t_match_torch = bench(lambda: backend.tome_match(metric, r, class_token=True, impl="torch"), device=device, rep=rep)
        table.append([name, "match only", f"{t_match[0]:.3f}", f"{t_match_torch[0]:.3f}",
                      f"{t_match_torch[0] / t_match[0]:.2f}x", "", ""])
        rows.append(Row("tome_match", "vlcore", "forward", "time", "ms", "case", name, *t_match,
                        extra_benchmark_config_str=config, device_name=device_name(device)))
        rows.append(Row("tome_match", "torch", "forward", "time", "ms", "case", name, *t_match_torch,
                        extra_benchmark_config_str=config, device_name=device_name(device)))


def bench_vit(args, rows, table):
    device, rep = torch.device(args.device), (2 if args.quick else 3 if args.check else 20)
    if args.quick:
        cfg = dict(image_size=32, patch_size=8, width=64, layers=2, heads=2)
        batch, r = 4, 2
    else:
        cfg = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12)
        batch, r = 256, 8
    images = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    results = {}
    impls = ("vlcore",) if args.check else ("vlcore", "torch")
    for impl in impls:
        for tome_r in (0, r):
            torch.manual_seed(0)
            tower = VisionTransformer(VisionConfig(**cfg, tome_r=tome_r), None, impl=impl).to(device)

            def step():
                with autocast:
                    tokens, size = tower.forward_tokens(images)
                    loss = tower.pool(tokens, size).float().square().mean()
                loss.backward()

            t = bench(step, device=device, rep=rep, warmup=2 if args.quick or args.check else 5)
            results[impl, tome_r] = t[0]
            rows.append(Row("vit_b16_train_step", impl, "full", "time", "ms", "tome_r", str(tome_r), *t,
                            extra_benchmark_config_str=f"B={batch} {cfg} bf16 autocast on GPU",
                            device_name=device_name(device)))
    for impl in impls:
        plain, merged = results[impl, 0], results[impl, r]
        table.append([impl, f"{plain:.2f}", f"{merged:.2f}", f"{batch * 1000 / plain:.0f}", f"{batch * 1000 / merged:.0f}",
                      f"{plain / merged:.2f}x"])


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "tome", "vit"], default="all")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not vlcore.cuda_available():
        raise SystemExit("bench_tome: this vlcore build has no CUDA kernels (vlcore.cuda_available() is False)")
    rows, tome_table, vit_table = [], [], []
    if args.part in ("all", "tome"):
        bench_tome(args, rows, tome_table)
    if args.part in ("all", "vit"):
        bench_vit(args, rows, vit_table)
    path = write_rows("bench_tome", rows, args.csv)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; rows in {path}")
    if tome_table:
        print_table("ToMe match + merge (class token, size-weighted) vs ToMe's PyTorch algorithm "
                    "(goals: B/16 fwd >= 5x, fwd+bwd >= 4x; L/14@336 fwd >= 5x)",
                    ["case", "pass", "vlcore ms", "torch ms", "speed-up", "floor GB/s", "of copy"], tome_table)
    if vit_table:
        print_table("ViT train step (forward + backward) with ToMe vs without",
                    ["impl", "ms (r=0)", "ms (ToMe)", "img/s (r=0)", "img/s (ToMe)", "throughput ratio"], vit_table)


if __name__ == "__main__":
    main()
