"""Fused varlen attention: TFLOP/s against every SDPA backend, FlexAttention and varlen_attn, same run.

    python benchmarks/bench_attention.py            # every shape, every mode (GPU, bf16)
    python benchmarks/bench_attention.py --check    # the device check: one shape per goal row, fwd+bwd, few reps
    python benchmarks/bench_attention.py --quick    # tiny shapes, seconds, on CPU (a smoke run)

FLOPs are counted as flash-attn counts them: 4 * B * H * Lq * Lk * D forward, x 3.5 forward+backward
(packed documents: useful in-document work only, sum over documents). Each provider is timed on the same
inputs; "vs best peer" divides the best peer's time by vlcore's. The short-query fusion shapes are bound by
memory and occupancy, so they also report the byte floor (q, k, v, out, lse read or written once forward;
q, k, v, out, dout, lse read and dq, dk, dv written once backward) as a share of the time a device copy of
that many bytes takes in the same run. The ITM case compares kv_segment (one K/V per image, three text
segments reading it) with materialised copies of K/V (what plain SDPA needs), time and peak memory.

"vlcore" is the public op with its default dispatch (backend="auto"); the long self-attention row also
times "vlcore kernels" (backend="vlcore"), which places the switch point LIBRARY_MIN_SEQLEN of
vlcore/ops/attention.py. --check keeps FlexAttention only on the rows where it is the goal's peer (its
compilation costs device time) and leaves out the ITM case and the per-document SDPA loop.
"""

from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vlcore  # noqa: E402
from common import Row, bench, copy_bandwidth, device_name, make_parser, print_table, write_rows  # noqa: E402


@dataclass
class Dense:
    name: str
    batch: int
    heads: int
    len_q: int
    len_k: int
    head_dim: int
    modes: tuple[str, ...] = ("fwd+bwd",)
    goal: str = ""
    floor: bool = False

    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.len_q * self.len_k * self.head_dim


def dense_shapes(quick: bool, check: bool = False) -> list[Dense]:
    if quick:
        return [Dense("text->image (tiny)", 2, 2, 5, 13, 32, ("fwd", "fwd+bwd"), floor=True)]
    modes = ("fwd+bwd",) if check else ("fwd", "fwd+bwd")
    return [
        Dense("text->image ViT-B/16", 256, 12, 40, 197, 64, modes, ">= 2.5x best peer", True),
        Dense("image->text ViT-B/16", 256, 12, 197, 40, 64, modes, ">= 2.5x best peer", True),
        Dense("text->image ViT-L/14@336", 128, 16, 64, 577, 64, modes, ">= 2x best peer", True),
        Dense("self-attn L 4096", 8, 16, 4096, 4096, 128, ("fwd+bwd",), ">= 0.95x best SDPA (dispatch)"),
    ]


def run_mode(fn, inputs, mode):
    """fn() -> out; for fwd+bwd also the gradients of <out, dout> with respect to inputs."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn()
        return step
    grad = {}

    def step():
        out = fn()
        if "dout" not in grad:
            grad["dout"] = torch.randn_like(out)
        return torch.autograd.grad(out, inputs, grad["dout"])
    return step


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"sdpa cuDNN": SDPBackend.CUDNN_ATTENTION, "sdpa flash": SDPBackend.FLASH_ATTENTION,
            "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa math": SDPBackend.MATH}


def sdpa_provider(backend):
    from torch.nn.attention import sdpa_kernel

    def make(q, k, v, **kw):  # q/k/v [B, L, H, D] -> SDPA's [B, H, L, D] as strided views, no copies
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def fn():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, kt, vt, **kw)
        return fn
    return make


def flex_dense_provider():
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def make(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return lambda: compiled(qt, kt, vt)
    return make


def bytes_floor(shape: Dense, elem: int, mode: str) -> int:
    q = shape.batch * shape.len_q * shape.heads * shape.head_dim * elem
    kv = 2 * shape.batch * shape.len_k * shape.heads * shape.head_dim * elem
    lse = shape.batch * shape.heads * shape.len_q * 4
    fwd = q + kv + q + lse  # read q, k, v; write out, lse
    bwd = (q + kv + 2 * q + lse) + (q + kv)  # read q, k, v, out, dout, lse; write dq, dk, dv
    return fwd if mode == "fwd" else fwd + bwd


def timed(step, device, rep):
    return bench(step, device=device, rep=rep, warmup=1 if rep < 10 else 10)


def time_providers(providers, inputs, mode, device, rep):
    times = {}
    for name, make in providers.items():
        try:
            step = run_mode(make(), inputs, mode)
            step()  # compile / select kernels outside the timed region; errors mean "not supported here"
            times[name] = timed(step, device, rep)
        except Exception as error:  # noqa: BLE001 - a peer that cannot run this shape is reported, not fatal
            times[name] = f"n/a ({type(error).__name__}: {str(error).splitlines()[0][:60]})"
    return times


def report(rows, table, label, mode, flops, times, device, floor_ms=None):
    ours = times.get("vlcore")
    peers = {n: t for n, t in times.items() if not n.startswith("vlcore") and not isinstance(t, str)}
    best = min(peers.items(), key=lambda kv: kv[1][0]) if peers else None
    for name, t in times.items():
        if isinstance(t, str):
            table.append([label, mode, name, t, "", "", ""])
            continue
        tflops = flops / t[0] / 1e9
        rows.append(Row("attention", name, mode, "TFLOP/s", "TFLOP/s", "shape", label, tflops,
                        flops / t[2] / 1e9, flops / t[1] / 1e9, device_name=device_name(device)))
        ratio = f"{best[1][0] / t[0]:.2f}x" if name.startswith("vlcore") and best else ""
        floor = f"{100 * floor_ms / t[0]:.0f}%" if floor_ms and name.startswith("vlcore") else ""
        table.append([label, mode, name, f"{t[0]:.3f}", f"{tflops:.2f}", ratio, floor])
    if best and not isinstance(ours, tuple):
        table.append([label, mode, "best peer", best[0], "", "", ""])


def reps(args) -> int:
    return 3 if args.quick else 5 if args.check else 30


def bench_dense(args, rows, table, dtype):
    device, rep = torch.device(args.device), reps(args)
    copy_gbps = copy_bandwidth(device, 1 << (20 if args.quick else 28), rep=rep)
    for shape in dense_shapes(args.quick, args.check):
        b, lq, lk, h, d = shape.batch, shape.len_q, shape.len_k, shape.heads, shape.head_dim
        q = torch.randn(b, lq, h, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, lk, h, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, lk, h, d, device=device, dtype=dtype, requires_grad=True)
        providers = {"vlcore": lambda: (lambda: vlcore.ops.attention(q, k, v))}
        if min(lq, lk) >= 1024:  # where dispatch may hand over: the vlcore kernels alone, for the switch point
            providers["vlcore kernels"] = lambda: (lambda: vlcore.ops.attention(q, k, v, backend="vlcore"))
        backends = sdpa_backends() if device.type == "cuda" else {"sdpa (CPU default)": None}
        for name, backend in backends.items():
            if backend is None:
                providers[name] = lambda: (lambda: F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
            elif name != "sdpa math" or shape.len_q * shape.len_k <= 1 << 20:  # math: O(L^2) memory
                providers[name] = (lambda m: (lambda: m(q, k, v)))(sdpa_provider(backend))
        if device.type == "cuda" and not args.check:
            providers["flex (compiled)"] = lambda: flex_dense_provider()(q, k, v)
        for mode in shape.modes:
            times = time_providers(providers, (q, k, v), mode, device, rep)
            flops = shape.flops() * (3.5 if mode == "fwd+bwd" else 1.0)
            floor_ms = bytes_floor(shape, q.element_size(), mode) / copy_gbps / 1e6 if shape.floor else None
            report(rows, table, f"{shape.name} B{b} H{h} Lq{lq} Lk{lk} D{d}", mode, flops, times, device, floor_ms)


def document_lengths(total: int, low: int, high: int, seed: int = 0) -> list[int]:
    rng, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(low, high), total - sum(lengths)))
    return lengths


def bench_packed(args, rows, table, dtype):
    device, rep = torch.device(args.device), reps(args)
    total, heads, d = (96, 2, 32) if args.quick else (8192, 16, 64)
    lengths = document_lengths(total, 8 if args.quick else 64, 40 if args.quick else 1024)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    cu, max_len = cu.to(device), max(lengths)
    q, k, v = (torch.randn(total, heads, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    providers = {"vlcore": lambda: (lambda: vlcore.ops.attention(q, k, v, cu, cu, max_len, max_len)),
                 # dispatch may hand these long documents to varlen_attn: the vlcore kernels alone too
                 "vlcore kernels": lambda: (lambda: vlcore.ops.attention(q, k, v, cu, cu, max_len, max_len,
                                                                         backend="vlcore"))}
    if device.type == "cuda":
        with contextlib.suppress(ImportError):
            from torch.nn.attention.varlen import varlen_attn
            providers["varlen_attn"] = lambda: (lambda: varlen_attn(q, k, v, cu, cu, max_len, max_len))

        def flex():
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
            mask = create_block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], 1, 1, total, total, device=device)
            compiled = torch.compile(flex_attention, dynamic=False)
            qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            return lambda: compiled(qt, kt, vt, block_mask=mask)
        providers["flex (compiled, document mask)"] = flex

        def per_document_sdpa():  # a host loop over documents: slow, and not a goal's peer
            splits = [(int(a), int(b)) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]

            def fn():
                outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))) for a, b in splits]
                return torch.cat([o.transpose(0, 1) for o in outs])
            return fn
        if not args.check:
            providers["sdpa per document"] = per_document_sdpa
    flops = sum(4.0 * heads * n * n * d for n in lengths)
    label = f"packed self-attn T{total} ({len(lengths)} docs) H{heads} D{d}"
    for mode in ("fwd", "fwd+bwd"):
        times = time_providers(providers, (q, k, v), mode, device, rep)
        report(rows, table, label, mode, flops * (3.5 if mode == "fwd+bwd" else 1.0), times, device)


def bench_tome(args, rows, table, dtype):
    """ToMe'd ViT-B/16 self-attention with proportional attention: key_bias = log(size), which needs a gradient.
    Peers that give the bias a gradient: FlexAttention with a score_mod, SDPA with an additive attn_mask."""
    device, rep = torch.device(args.device), reps(args)
    batch, tokens, heads, d = (2, 11, 2, 32) if args.quick else (128, 133, 12, 64)  # 197 tokens after ToMe r = 8 x 8
    q, k, v = (torch.randn(batch, tokens, heads, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    sizes = torch.randint(1, 5, (batch, tokens), device=device).to(dtype)
    bias = sizes.log().requires_grad_()
    inputs = (q, k, v, bias)
    providers = {"vlcore": lambda: (lambda: vlcore.ops.attention(q, k, v, key_bias=bias))}

    def sdpa_mask():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias[:, None, None, :]).transpose(1, 2)
    providers["sdpa attn_mask (default backend)"] = sdpa_mask
    if device.type == "cuda":
        def flex():
            from torch.nn.attention.flex_attention import flex_attention
            compiled = torch.compile(flex_attention, dynamic=False)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[b, kv_idx]
            return lambda: compiled(qt, kt, vt, score_mod=score_mod).transpose(1, 2)
        providers["flex (compiled, score_mod bias)"] = flex
    flops = 4.0 * batch * heads * tokens * tokens * d * 3.5
    times = time_providers(providers, inputs, "fwd+bwd", device, rep)
    report(rows, table, f"ToMe'd ViT-B/16 + log-size key_bias B{batch} H{heads} L{tokens} D{d}", "fwd+bwd", flops,
           times, device)


def bench_itm(args, rows, table, dtype):
    """ITM with hard negatives: each image's K/V read by 3 text segments, shared vs copied."""
    device, rep = torch.device(args.device), reps(args)
    images, per_image, heads, d, len_q, len_k = (2, 3, 2, 32, 5, 13) if args.quick else (128, 3, 12, 64, 40, 197)
    texts = images * per_image
    q = torch.randn(texts * len_q, heads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(images * len_k, heads, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(images * len_k, heads, d, device=device, dtype=dtype, requires_grad=True)
    cu_q = torch.arange(texts + 1, device=device, dtype=torch.int32) * len_q
    cu_k = torch.arange(images + 1, device=device, dtype=torch.int32) * len_k
    cu_copies = torch.arange(texts + 1, device=device, dtype=torch.int32) * len_k
    kv_segment = torch.arange(texts, device=device, dtype=torch.int32) // per_image
    rows_idx = (kv_segment.long().view(-1, 1) * len_k + torch.arange(len_k, device=device)).flatten()
    cases = {
        "vlcore kv_segment (shared K/V)": lambda: vlcore.ops.attention(q, k, v, cu_q, cu_k, len_q, len_k,
                                                                       kv_segment=kv_segment),
        "vlcore on copied K/V": lambda: vlcore.ops.attention(q, k[rows_idx], v[rows_idx], cu_q, cu_copies, len_q, len_k),
    }
    if device.type == "cuda":
        def sdpa_copies():
            kc, vc = (t[rows_idx].view(texts, len_k, heads, d).transpose(1, 2) for t in (k, v))
            return F.scaled_dot_product_attention(q.view(texts, len_q, heads, d).transpose(1, 2), kc, vc)
        cases["best SDPA backend on copied K/V"] = sdpa_copies
    flops = 4.0 * texts * heads * len_q * len_k * d * 3.5
    for name, fn in cases.items():
        step = run_mode(lambda fn=fn: fn(), (q, k, v), "fwd+bwd")
        peak = ""
        try:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step()
                torch.cuda.synchronize()
                peak = f"{(torch.cuda.max_memory_allocated(device) - base) / 2**20:.1f}"
            t = timed(step, device, rep)
        except Exception as error:  # noqa: BLE001
            table.append([name, "fwd+bwd", f"n/a ({type(error).__name__})", "", ""])
            continue
        rows.append(Row("attention_itm", name, "full", "time", "ms", "texts", str(texts), *t,
                        extra_benchmark_config_str=f"images={images} per_image={per_image} Lq={len_q} Lk={len_k} "
                                                   f"H={heads} D={d} peak_MiB={peak}", device_name=device_name(device)))
        table.append([name, "fwd+bwd", f"{t[0]:.3f}", f"{flops / t[0] / 1e9:.2f}", peak or "n/a (CPU)"])


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "dense", "packed", "tome", "itm"], default="all")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not vlcore.cuda_available():
        raise SystemExit("bench_attention: this vlcore build has no CUDA kernels (vlcore.cuda_available() is False)")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows, table, itm = [], [], []
    torch.manual_seed(0)
    if args.part in ("all", "dense"):
        bench_dense(args, rows, table, dtype)
    if args.part in ("all", "packed"):
        bench_packed(args, rows, table, dtype)
    if args.part in ("all", "tome"):
        bench_tome(args, rows, table, dtype)
    if args.part == "itm" or (args.part == "all" and not args.check):
        bench_itm(args, rows, itm, dtype)
    path = write_rows("bench_attention", rows, args.csv)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; {dtype}; rows in {path}")
    print_table("attention TFLOP/s (4·B·H·Lq·Lk·D fwd, x3.5 fwd+bwd); vs best peer = best peer time / vlcore time",
                ["shape", "mode", "provider", "ms", "TFLOP/s", "vs best peer", "% of byte floor"], table)
    if itm:
        print_table("ITM with hard negatives: kv_segment vs materialised K/V copies (fwd+bwd)",
                    ["provider", "mode", "ms", "TFLOP/s", "peak extra MiB"], itm)


if __name__ == "__main__":
    main()
