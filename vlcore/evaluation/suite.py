"""Everything that applies to one model kind, in one call, and the report lines a researcher reads first.

``evaluate_model`` is what ``vlcore-eval`` and the trainer's evaluation step call: retrieval for dual
encoders, plus ITM re-ranked retrieval for fusion models, captions and caption metrics for captioners, and
zero-shot classification when asked. It returns flat numeric metrics (for logs, curves and the JSON-lines
file) and the captioned sample (for the report).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from vlcore.evaluation.captioning import evaluate_captioning
from vlcore.evaluation.retrieval import evaluate_retrieval
from vlcore.evaluation.zeroshot import evaluate_shapes_zero_shot, evaluate_zero_shot, image_folder_set

__all__ = ["EvalOptions", "EvalResult", "evaluate_model", "report_lines", "KINDS"]

KINDS = ("clip", "fusion", "captioner")


@dataclass
class EvalOptions:
    """What to evaluate beyond the kind's default."""

    ks: Sequence[int] = (1, 5, 10)
    #: fusion models: re-rank each query's ITC top k with the ITM head (0: ITC only)
    itm_rerank_k: int = 16
    #: captioners: how many evaluation images (the first ones, a fixed sample) are captioned and scored
    caption_samples: int = 64
    num_beams: int = 1
    max_new_tokens: Optional[int] = None
    #: the evaluation set is the embedded shapes data: add the captions' attribute accuracies
    shapes: bool = False
    #: zero-shot classification: None (off), "shapes" (the embedded (colour, shape) classes) or the path of a
    #: folder-per-class image set
    zeroshot: Optional[str] = None
    #: prompt templates for a folder set (CLIP_benchmark writes the class name into each, then ensembles)
    zeroshot_templates: Sequence[str] = ("a photo of a {}.", "a {}.", "a picture of a {}.")
    zeroshot_size: int = 240
    batch_size: int = 256

    def __post_init__(self):
        for name in ("itm_rerank_k", "caption_samples", "zeroshot_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalOptions: {name} must be >= 0, got {getattr(self, name)}")
        if self.num_beams < 1 or self.batch_size < 1:
            raise ValueError(f"EvalOptions: num_beams and batch_size must be >= 1, got {self.num_beams}, {self.batch_size}")


@dataclass
class EvalResult:
    metrics: dict
    #: ``(generated, references)`` per captioned image, in evaluation-set order
    captions: list = field(default_factory=list)


@torch.no_grad()
def evaluate_model(model, kind: str, images: torch.Tensor, captions: Sequence[Sequence[str]], tokenizer,
                   context_length: int, *, options: Optional[EvalOptions] = None, transform: Optional[Callable] = None,
                   device: Optional[torch.device] = None, autocast=nullcontext) -> EvalResult:
    """Metrics of ``model`` of ``kind`` (one of :data:`KINDS`) on preprocessed ``images`` and their captions.
    ``transform`` (raw image -> ``[3, S, S]``) is needed only for zero-shot classification."""
    options = options or EvalOptions()
    if kind not in KINDS:
        raise ValueError(f"evaluate_model: kind must be one of {KINDS}, got {kind!r}")
    was_training = model.training
    model.eval()
    try:
        if kind == "captioner":
            n = min(options.caption_samples, images.shape[0])
            if n == 0:
                return EvalResult({})
            metrics, generated = evaluate_captioning(
                model, images[:n], captions[:n], tokenizer, shapes=options.shapes, num_beams=options.num_beams,
                max_new_tokens=options.max_new_tokens, device=device, autocast=autocast)
            return EvalResult(metrics, list(zip(generated, [list(c) for c in captions[:n]])))
        rerank = options.itm_rerank_k if kind == "fusion" else 0
        metrics = evaluate_retrieval(model, images, captions, tokenizer, context_length, device=device, ks=options.ks,
                                     rerank_k=rerank, batch_size=options.batch_size, autocast=autocast)
        if options.zeroshot:
            metrics.update(_zero_shot(model, options, tokenizer, context_length, transform, device, autocast))
        return EvalResult(metrics)
    finally:
        model.train(was_training)


def _zero_shot(model, options, tokenizer, context_length, transform, device, autocast) -> dict:
    if transform is None:
        raise ValueError("evaluate_model: zero-shot classification needs the image transform")
    kwargs = dict(device=device, batch_size=options.batch_size, autocast=autocast)
    if options.zeroshot == "shapes":
        return evaluate_shapes_zero_shot(model, transform, tokenizer, context_length, size=options.zeroshot_size, **kwargs)
    images, labels, classnames = image_folder_set(options.zeroshot, transform)
    return evaluate_zero_shot(model, images, labels, classnames, list(options.zeroshot_templates), tokenizer,
                              context_length, **kwargs)


def _recall_line(metrics: dict, prefix: str, ks) -> str:
    def row(direction):
        return "/".join(f"{metrics[f'{direction}{prefix}_R@{k}']:.3f}" for k in ks)
    return f"i2t R@{'/'.join(map(str, ks))} {row('i2t')}, t2i {row('t2i')}"


def report_lines(result: EvalResult, *, ks: Sequence[int] = (1, 5, 10), max_samples: int = 12) -> list[str]:
    """Human-readable lines for ``report.txt`` and the log: the metrics that are present, then up to
    ``max_samples`` generated captions beside their first reference."""
    m, lines = result.metrics, []
    ks = [k for k in ks if f"i2t_R@{k}" in m]
    if ks:
        lines.append(f"retrieval (ITC, {m.get('eval_images', '?')} images): " + _recall_line(m, "", ks))
    if "itm_rerank_k" in m:
        lines.append(f"retrieval (ITM re-ranked ITC top {m['itm_rerank_k']}): " + _recall_line(m, "_itm", ks))
    if "itm_pair_accuracy" in m:
        lines.append(f"ITM pair accuracy (each text's image scored above the ITC-hardest other; chance 0.5): "
                     f"{m['itm_pair_accuracy']:.3f}")
    if "cider" in m:
        lines.append(f"captions ({m['caption_images']} images): CIDEr {m['cider']:.3f}, BLEU-4 {m['bleu_4']:.3f}, "
                     f"exact {m['caption_exact']:.3f}")
    if "attr_relation" in m:
        parts = []
        for attribute in ("colour", "shape", "size", "pair"):
            pair = [m.get(f"attr_{attribute}_{g}") for g in ("held_out", "seen")]
            parts.append(f"{attribute} " + "/".join("-" if v is None else f"{v:.3f}" for v in pair))
        lines.append("attribute accuracy (held-out pairs / seen pairs): " + ", ".join(parts)
                     + f"; relation {m['attr_relation']:.3f}")
    if "top1_accuracy" in m:
        line = (f"zero-shot ({m['zeroshot_classes']} classes, {m['zeroshot_images']} images): "
                f"top-1 {m['top1_accuracy']:.3f}, top-5 {m.get('top5_accuracy', float('nan')):.3f}, "
                f"mean per-class recall {m['mean_per_class_recall']:.3f}")
        if "top1_accuracy_held_out" in m:
            line += f"; top-1 held-out pairs {m['top1_accuracy_held_out']:.3f}, seen {m['top1_accuracy_seen']:.3f}"
        lines.append(line)
    if result.captions:
        lines.append("sample captions (generated | reference):")
        lines += [f"  {generated!r} | {references[0]!r}" for generated, references in result.captions[:max_samples]]
    return lines
