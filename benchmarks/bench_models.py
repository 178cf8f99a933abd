"""Model-level benchmarks: CLIP train step (with and without ToMe), FIBER fusion step with ITM hard
negatives (shared K/V vs copied negatives), and the chunked contrastive loss's peak memory at a 32k batch.

    python3 benchmarks/bench_models.py                  # full sizes (GPU): ViT-B/16 batch 256 bf16, fiber-base, 32k loss
    python3 benchmarks/bench_models.py --check          # the device check: the goal rows, eager peers, few reps
    python3 benchmarks/bench_models.py --quick          # tiny sizes, seconds on CPU
    python3 benchmarks/bench_models.py --part clip      # one part: clip | fusion | loss

The full run compiles ViT-B/16 twice (torch and open_clip peers), which takes minutes. ``--check`` fits the
device check's budget: it compiles nothing, so its CLIP peers are open_clip (where it imports) and the torch
impl in eager mode (``open_clip`` / ``torch`` rows, a lower bar than the goal's compiled peer), ToMe runs for
vlcore alone (its ratio is to the no-ToMe peers of the same run), and every step is timed 3 times.

Providers, all measured in the same run: ``vlcore`` (``impl="vlcore"``: vlcore kernels where the build has
them), ``torch`` (``impl="torch"``: plain PyTorch, open_clip's architecture), ``torch_compiled`` (that under
``torch.compile``: the open_clip-compiled stand-in when open_clip does not import) and
``open_clip_compiled`` where open_clip imports. Compiled peers run at no ToMe only (the goals compare ToMe
runs with the compiled no-ToMe peer). Peak memory is ``torch.cuda.max_memory_allocated`` of one step (GPU
only). Train steps use bf16 autocast on GPU and AdamW (fused on GPU), as open_clip trains (docs/benchmarks.md, 'Peers').
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import Row, bench, device_name, make_parser, print_table, write_rows  # noqa: E402
from vlcore.models import create_model, get_model_config  # noqa: E402
from vlcore.models.losses import ClipLoss  # noqa: E402


@dataclass(frozen=True)
class ClipCase:
    model: str
    batch: int
    tome_r: int = 0


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _peak_mib(step, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _train_step(params, loss_of, device):
    """One optimizer step of ``loss_of()``; ``params`` are what the optimizer updates."""
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step():
        with _autocast(device):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _open_clip_model(name: str, device):
    try:
        import open_clip
        return open_clip.create_model(name, output_dict=True).to(device)
    except Exception:  # not installed, or its torchvision does not import beside this torch
        return None


def _clip_models(case: ClipCase, device, compiled: bool, check: bool):
    """provider -> (module called in the step, module whose parameters train)."""
    overrides = {"vision_cfg": {"tome_r": case.tome_r}} if case.tome_r else {}
    impls = ("vlcore",) if check and case.tome_r else ("vlcore", "torch")
    models = {p: create_model(case.model, impl=p, **overrides).to(device) for p in impls}
    providers = {p: (m, m) for p, m in models.items()}
    peer = _open_clip_model(case.model, device) if compiled or (check and not case.tome_r) else None
    if compiled:
        providers["torch_compiled"] = (torch.compile(models["torch"]), models["torch"])
        if peer is not None:
            providers["open_clip_compiled"] = (torch.compile(peer), peer)
    elif peer is not None:
        providers["open_clip"] = (peer, peer)
    return providers


def bench_clip(args, rows, table):
    device = torch.device(args.device)
    cases = [ClipCase("clip-tiny", 8), ClipCase("clip-tiny", 8, 2)] if args.quick else \
        [ClipCase("ViT-B-16", 256), ClipCase("ViT-B-16", 256, 8)]
    warmup, rep = (1, 3) if args.quick else (2, 3) if args.check else (3, 10)
    peer_rate = None  # samples/s of the best no-ToMe peer, the denominator of every ratio
    for case in cases:
        cfg = get_model_config(case.model)
        size, context, vocab = cfg.vision_cfg.image_size, cfg.text_cfg.context_length, cfg.text_cfg.vocab_size
        images = torch.randn(case.batch, 3, size, size, device=device)
        tokens = torch.randint(1, vocab, (case.batch, context), device=device)
        loss_fn = ClipLoss()
        # Compiling on CPU takes minutes: compiled peers only on the GPU, at no ToMe.
        compiled = not args.quick and not args.check and case.tome_r == 0
        for provider, (runnable, model) in _clip_models(case, device, compiled, args.check).items():
            def loss_of(runnable=runnable):
                out = runnable(images, tokens)
                return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
            step = _train_step(model.parameters(), loss_of, device)
            ms, p20, p80 = bench(step, device=device, warmup=warmup, rep=rep)
            peak = _peak_mib(step, device)
            rate = case.batch / ms * 1e3
            x = f"{case.model}/{case.batch}/r{case.tome_r}"
            rows.append(Row("clip_train_step", provider, "full", "throughput", "samples/s", "model/batch/tome_r", x,
                            rate, case.batch / p80 * 1e3, case.batch / p20 * 1e3, device_name=device_name(device)))
            if peak is not None:
                rows.append(Row("clip_train_step", provider, "full", "peak_memory", "MiB", "model/batch/tome_r", x,
                                peak, device_name=device_name(device)))
            if case.tome_r == 0 and provider != "vlcore":
                peer_rate = max(peer_rate or 0.0, rate)
            table.append([x, provider, ms, rate, peak if peak is not None else "-", ""])
            del runnable, model, step
    for line in table:
        if line[1] == "vlcore" and peer_rate:
            line[5] = f"{line[3] / peer_rate:.2f}x"


def bench_fusion(args, rows, table):
    device = torch.device(args.device)
    name, batch = ("fiber-tiny", 4) if args.quick else ("fiber-base", 32)
    warmup, rep = (1, 3) if args.quick or args.check else (3, 10)
    for provider, impl in (("vlcore_kv_segment", "vlcore"), ("torch_copied_negatives", "torch")):
        torch.manual_seed(0)
        model = create_model(name, impl=impl).to(device)
        with torch.no_grad():  # gates open, as after some training, so the fused blocks do their full work
            for param_name, p in model.named_parameters():
                if param_name.endswith("cross.alpha"):
                    p.fill_(0.5)
        images = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
        tokens = torch.randint(1, 257, (batch, model.context_length), device=device)  # no pad, no specials
        step = _train_step(model.parameters(), lambda model=model: model(images, tokens)["loss"], device)
        ms, p20, p80 = bench(step, device=device, warmup=warmup, rep=rep)
        peak = _peak_mib(step, device)
        x = f"{name}/{batch}"
        rows.append(Row("fusion_train_step", provider, "full", "time", "ms", "model/batch", x, ms, p20, p80,
                        device_name=device_name(device)))
        if peak is not None:
            rows.append(Row("fusion_train_step", provider, "full", "peak_memory", "MiB", "model/batch", x, peak,
                            device_name=device_name(device)))
        table.append([x, provider, ms, peak if peak is not None else "-"])
        del model, step


def bench_loss(args, rows, table):
    device = torch.device(args.device)
    global_batch, dim, chunk = (512, 64, 64) if args.quick else (32768, 512, 1024)
    warmup, rep = (1, 3) if args.quick or args.check else (2, 5)
    images = F.normalize(torch.randn(global_batch, dim, device=device), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(global_batch, dim, device=device), dim=-1).requires_grad_()
    scale = torch.tensor(14.0, device=device, requires_grad=True)
    for provider, chunk_size in (("plain", 0), (f"chunked_{chunk}", chunk)):
        loss_fn = ClipLoss(chunk_size=chunk_size)

        def step(loss_fn=loss_fn):
            loss_fn(images, texts, scale).backward()
            images.grad = texts.grad = scale.grad = None

        ms, p20, p80 = bench(step, device=device, warmup=warmup, rep=rep)
        peak = _peak_mib(step, device)
        x = f"{global_batch}/{dim}"
        rows.append(Row("clip_loss", provider, "full", "time", "ms", "global_batch/dim", x, ms, p20, p80,
                        device_name=device_name(device)))
        if peak is not None:
            rows.append(Row("clip_loss", provider, "full", "peak_memory", "MiB", "global_batch/dim", x, peak,
                            device_name=device_name(device)))
        table.append([x, provider, ms, peak if peak is not None else "-"])


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "clip", "fusion", "loss"], default="all")
    args = parser.parse_args(argv)
    rows, clip_table, fusion_table, loss_table = [], [], [], []
    if args.part in ("all", "clip"):
        bench_clip(args, rows, clip_table)
    if args.part in ("all", "fusion"):
        bench_fusion(args, rows, fusion_table)
    if args.part in ("all", "loss"):
        bench_loss(args, rows, loss_table)
    path = write_rows("bench_models", rows, args.csv)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; rows in {path}")
    if clip_table:
        print_table("CLIP train step (bf16 on GPU; peers: torch impl, compiled, open_clip where it imports; "
                    "vs peer = samples/s over the fastest no-ToMe peer's)",
                    ["model/batch/r", "provider", "ms", "samples/s", "peak MiB", "vs peer"], clip_table)
    if fusion_table:
        print_table("fusion train step, ITM hard negatives (shared K/V vs copied)",
                    ["model/batch", "provider", "ms", "peak MiB"], fusion_table)
    if loss_table:
        print_table("InfoNCE forward + backward (plain vs chunked)", ["batch/dim", "provider", "ms", "peak MiB"],
                    loss_table)


if __name__ == "__main__":
    main()
