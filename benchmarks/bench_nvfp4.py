"""NVFP4: quantize bandwidth, GEMM throughput, NVFP4Linear time and memory, and a convergence comparison.

    python benchmarks/bench_nvfp4.py                       # quantize + GEMM + linear, full sizes (GPU)
    python benchmarks/bench_nvfp4.py --quick               # seconds, on CPU
    python benchmarks/bench_nvfp4.py --check               # the device check: one shape per goal row, few reps
    python benchmarks/bench_nvfp4.py --part convergence --model ViT-B-16 --steps 2000 --batch 128   # GPU
    python benchmarks/bench_nvfp4.py --part convergence --model clip-tiny --steps 300 --device cpu  # CPU

Cases (figures are same-run ratios):

- quantize 8192x8192 bf16, rowwise + columnwise, RHT on the columnwise copy, stochastic rounding (the
  gradient quantizer dY), with the amax computed in the op and given: effective bandwidth = the byte floor
  (x read twice when the op computes the amax, once when it is given; codes and scales written once) /
  time, against a device copy measured in the same run (goal >= 80 %); torchao's Hopper-capable
  ``NVFP4Tensor.to_nvfp4`` (1x16, rowwise only) as the peer when torchao is importable.
- 16x16 weight quantize, both orientations, same accounting.
- NVFP4 GEMM 8192^3, decode included: time against cuBLAS bf16 (``torch.matmul``, goal >= 0.85x) and the
  dequantize-then-bf16 matmul emulation (what torchao does on Hopper), all in the same run.
- NVFP4Linear forward + backward, 8192 tokens x 4096 -> 4096, against bf16 ``nn.Linear``: time, and the
  bytes each saves for backward (measured with saved-tensor hooks).
- convergence: a CLIP model on a synthetic image-text task (each caption's words add fixed random
  patterns to its image), ``vlcore.nvfp4.convert`` (default policy) against the same model and batches
  in full precision; the final loss gap (mean of the last 10 % of steps). Goal within 2 %.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vlcore  # noqa: E402
from common import Row, bench, copy_bandwidth, device_name, gbps, make_parser, print_table, write_rows  # noqa: E402
from vlcore.nvfp4 import NVFP4Linear, convert  # noqa: E402
from vlcore.ops.nvfp4 import nvfp4_dequantize, nvfp4_gemm, nvfp4_quantize  # noqa: E402


def quantized_bytes(rows, cols, orientations, reads=1):
    """Floor of a quantize: read x (bf16) `reads` times, write codes (1/2 B) and scales (1/16 B) per element
    per copy."""
    return reads * rows * cols * 2 + orientations * rows * cols * (0.5 + 1 / 16)


def torchao_quantize():
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except Exception as e:  # noqa: BLE001 - any import failure means: no peer in this run
        return None, f"torchao not importable ({type(e).__name__})"
    return (lambda x: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().max()))), "torchao"


def bench_quantize(args, rows, table, dev, rep):
    n = 256 if args.quick else 8192
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ceiling = copy_bandwidth(dev, n * n * 2, rep=rep)
    amax = x.float().abs().amax()
    amax_t = nvfp4_quantize(x, rowwise=False, columnwise=True, rht_columnwise=True).columnwise.amax
    dy = dict(columnwise=True, rht_columnwise=True, stochastic=True, seed=1, offset=2)
    # name: (copies written, reads of x, fn); the goal rows of BENCHMARKS.md first
    cases = {
        "dY: row SR + col RHT SR, amax in op": (2, 2, lambda: nvfp4_quantize(x, **dy)),
        "dY: the same, amax given": (2, 1, lambda: nvfp4_quantize(x, amax_rowwise=amax, amax_columnwise=amax_t, **dy)),
        "W: 16x16 both orientations, amax in op": (2, 2, lambda: nvfp4_quantize(x, columnwise=True, block_2d=True)),
    }
    if not args.check:
        cases["X: row + col RHT, amax in op"] = (2, 2, lambda: nvfp4_quantize(x, columnwise=True, rht_columnwise=True))
        cases["row only (1x16), amax in op"] = (1, 2, lambda: nvfp4_quantize(x))
    config = f"bf16 {n}x{n}"
    row_only_ms = None
    for name, (orient, reads, fn) in cases.items():
        t = bench(fn, device=dev, rep=rep)
        bw = gbps(quantized_bytes(n, n, orient, reads), t[0])
        row_only_ms = t[0] if orient == 1 else row_only_ms
        rows.append(Row("nvfp4_quantize", "vlcore", "forward", "effective GB/s", "GB/s", "case", name, bw,
                        extra_benchmark_config_str=f"{config} ms={t[0]:.4f}", device_name=device_name(dev)))
        table.append([name, n, f"{t[0]:.3f}", f"{bw:.0f}", f"{100 * bw / ceiling:.0f}%", ""])
    peer, peer_name = torchao_quantize() if not args.check else (None, "not run by --check")
    if peer is not None and row_only_ms is not None:
        try:
            t = bench(lambda: peer(x), device=dev, rep=rep)
            bw = gbps(quantized_bytes(n, n, 1), t[0])
            rows.append(Row("nvfp4_quantize", "torchao", "forward", "effective GB/s", "GB/s", "case", "row only (1x16)", bw,
                            extra_benchmark_config_str=config, device_name=device_name(dev)))
            table.append(["torchao to_nvfp4 (row only)", n, f"{t[0]:.3f}", f"{bw:.0f}", f"{100 * bw / ceiling:.0f}%",
                          f"vlcore {t[0] / row_only_ms:.1f}x faster"])
        except Exception as e:  # noqa: BLE001
            table.append([f"torchao to_nvfp4: failed ({type(e).__name__}: {str(e)[:60]})", n, "", "", "", ""])
    else:
        table.append([f"peer: {peer_name}", n, "", "", "", ""])
    table.append(["copy (ceiling)", n, "", f"{ceiling:.0f}", "100%", ""])


def bench_gemm(args, rows, table, dev, rep):
    m = n = k = 128 if args.quick else 8192
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    qa, qb = nvfp4_quantize(a).rowwise, nvfp4_quantize(b).rowwise
    flop = 2 * m * n * k
    cases = {
        "vlcore nvfp4_gemm (bf16 out, decode included)": lambda: nvfp4_gemm(qa, qb, out_dtype=torch.bfloat16),
        "bf16 matmul (cuBLAS on GPU)": lambda: a @ b.t(),
    }
    if not args.check:
        cases["vlcore nvfp4_gemm (fp32 out)"] = lambda: nvfp4_gemm(qa, qb, out_dtype=torch.float32)
        cases["dequantize + bf16 matmul (emulation)"] = lambda: (nvfp4_dequantize(qa, torch.bfloat16)
                                                                 @ nvfp4_dequantize(qb, torch.bfloat16).t())
    times = {name: bench(fn, device=dev, rep=rep) for name, fn in cases.items()}
    ours = times["vlcore nvfp4_gemm (bf16 out, decode included)"][0]
    exact = a.double() @ b.double().t()
    got = nvfp4_gemm(qa, qb, out_dtype=torch.float32).double()
    sqnr = (20 * torch.log10(exact.norm() / (exact - got).norm())).item()
    for name, t in times.items():
        tflops = flop / t[0] / 1e9
        rows.append(Row("nvfp4_gemm", name, "forward", "TFLOP/s", "TFLOP/s", "mnk", str(m), tflops,
                        extra_benchmark_config_str=f"ms={t[0]:.4f}", device_name=device_name(dev)))
        table.append([name, m, f"{t[0]:.3f}", f"{tflops:.1f}", f"{t[0] / ours:.2f}x"])
    table.append([f"SQNR of NVFP4 GEMM vs bf16 inputs' exact product: {sqnr:.1f} dB", m, "", "", ""])


def saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(total)


def bench_linear(args, rows, table, dev, rep):
    tokens, k, n = (256, 128, 128) if args.quick else (8192, 4096, 4096)
    x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16)
    ref = nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
    ours = NVFP4Linear.from_linear(nn.Linear(k, n, device=dev, dtype=torch.float32), seed=0)  # fp32 master weights

    def step(layer):
        def run():
            x.grad = None
            layer.weight.grad = None
            y = layer(x)
            y.backward(grad)
        return run

    for name, layer in (("bf16 nn.Linear", ref), ("NVFP4Linear (fp32 master)", ours)):
        t = bench(step(layer), device=dev, rep=rep)
        _, nbytes = saved_bytes(lambda: layer(x))
        rows.append(Row("nvfp4_linear", name, "full", "time", "ms", "tokens", str(tokens), t[0],
                        extra_benchmark_config_str=f"{k}->{n} saved_bytes={nbytes}", device_name=device_name(dev)))
        table.append([name, f"{tokens}x{k}->{n}", f"{t[0]:.3f}", f"{nbytes / 2**20:.1f}"])
    base_ms = float(table[-2][2])
    table.append(["NVFP4Linear / nn.Linear time (goal <= 1.2x)", "", f"{float(table[-1][2]) / base_ms:.2f}x", ""])


def synthetic_batches(model, batch, steps, device, seed=0, words=16, per_caption=3):
    """Images are the sum of fixed random patterns of their caption's words plus noise: learnable pairs."""
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    patterns = torch.randn(words, 3, size, size, generator=g)
    vocab = [f"w{i}" for i in range(words)]
    from vlcore.models.tokenizer import get_tokenizer

    tok = get_tokenizer("byte")
    for _ in range(steps):
        ids = torch.randint(words, (batch, per_caption), generator=g)
        images = patterns[ids].sum(1) / per_caption**0.5 + 0.3 * torch.randn(batch, 3, size, size, generator=g)
        captions = [" ".join(vocab[i] for i in row) for row in ids.tolist()]
        yield images.to(device), tok(captions, model.context_length).to(device)


def train_clip(name, steps, batch, device, nvfp4, lr, layers=None):
    from vlcore.models import create_model
    from vlcore.models.losses import ClipLoss

    torch.manual_seed(0)
    overrides = {"vision_cfg": {"layers": layers}, "text_cfg": {"layers": layers}} if layers else {}
    model = create_model(name, **overrides).to(device)
    report = convert(model) if nvfp4 else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    loss_fn = ClipLoss()
    losses = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.perf_counter()
    for images, tokens in synthetic_batches(model, batch, steps, device):
        with autocast:
            out = model(images, tokens)
            loss = loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"],
                           out.get("logit_bias"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "clamp_logit_scale"):
            model.clamp_logit_scale()
        losses.append(loss.detach())
    losses = torch.stack(losses).float().cpu()
    return losses, time.perf_counter() - t0, report


def bench_convergence(args, rows, table, dev):
    steps = 4 if args.quick else args.steps
    model = "clip-tiny" if args.quick else args.model
    tail = max(1, steps // 10)
    results = {}
    for label, nvfp4 in (("full precision" if dev.type == "cpu" else "bf16 autocast", False), ("NVFP4 recipe", True)):
        losses, seconds, report = train_clip(model, steps, args.batch, dev, nvfp4, args.lr, args.layers)
        final = losses[-tail:].mean().item()
        results[label] = final
        extra = f"layers={args.layers} steps={steps} batch={args.batch} lr={args.lr} first={losses[:tail].mean().item():.4f} s={seconds:.1f}"
        if report is not None:
            extra += f" converted={len(report.converted)} frac={report.fraction_converted:.2f} guard={report.guard}"
        rows.append(Row("nvfp4_convergence", label, "full", "final loss", "loss", "model", model, final,
                        extra_benchmark_config_str=extra, device_name=device_name(dev)))
        table.append([label, model, steps, f"{losses[:tail].mean().item():.4f}", f"{final:.4f}", f"{seconds:.1f}"])
    base, ours = list(results.values())
    table.append(["final loss gap", "", "", "", f"{100 * (ours - base) / base:+.2f}%", ""])


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "quantize", "gemm", "linear", "convergence"], default="all",
                        help="'all' is quantize + gemm + linear (+ a 4-step convergence smoke run with --quick)")
    parser.add_argument("--model", default="ViT-B-16", help="convergence: a vlcore CLIP config")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=None, help="convergence: override both towers' depth")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not vlcore.cuda_available():
        raise SystemExit("bench_nvfp4: this vlcore build has no CUDA kernels (vlcore.cuda_available() is False)")
    rep = 3 if args.quick else (5 if args.check else 30)
    if args.quick and dev.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: OpenMP fork/join would dominate a smoke run
    rows, tables = [], {}
    if args.check and args.part == "convergence":
        raise SystemExit("bench_nvfp4: the convergence row is its own command (see the module docstring), not --check")
    parts = ["quantize", "gemm", "linear"] + (["convergence"] if args.quick else []) if args.part == "all" else [args.part]
    for part in parts:
        tables[part] = []
        if part == "quantize":
            bench_quantize(args, rows, tables[part], dev, rep)
        elif part == "gemm":
            bench_gemm(args, rows, tables[part], dev, rep)
        elif part == "linear":
            bench_linear(args, rows, tables[part], dev, rep)
        else:
            bench_convergence(args, rows, tables[part], dev)
    path = write_rows("bench_nvfp4", rows, args.csv)
    print(f"device: {device_name(dev)}; torch {torch.__version__}; rows in {path}")
    headers = {
        "quantize": ("NVFP4 quantize (effective = byte floor / time: x read once, twice when the op computes the "
                     "amax, + codes/scales written; goal >= 80% of copy)",
                     ["case", "n", "ms", "GB/s", "of copy", "peer"]),
        "gemm": ("NVFP4 GEMM (goal: cuBLAS bf16 time / NVFP4 time >= 0.85)",
                 ["provider", "m=n=k", "ms", "TFLOP/s", "this time / vlcore time"]),
        "linear": ("NVFP4Linear forward + backward vs bf16 nn.Linear", ["layer", "shape", "ms", "saved MiB"]),
        "convergence": ("convergence, synthetic image-text CLIP (goal: final loss within 2 %)",
                        ["run", "model", "steps", "first loss", "final loss", "seconds"]),
    }
    for part, table in tables.items():
        print_table(headers[part][0], headers[part][1], table)


if __name__ == "__main__":
    main()
