"""Captioner evaluation: greedy captions of held-out images, CIDEr-D / BLEU against their references, and on
the embedded shapes data the accuracy of each attribute the captions name (docs/evaluation.md, 'Captioning').

The attribute accuracy reads captions with the embedded data's own vocabulary (``vlcore.train.synthetic``): a
caption is ``<object> <relation> <object>`` or ``<object> at the <region>`` / ``in the centre``, an object
``a <size> <colour> <shape>``. A two-object image has two equally right captions (the relation read from
either object); the generated caption is compared slot by slot with the reading it agrees with most. Each
object slot counts towards the held-out group when the reference object's (colour, shape) pair never occurs
in training, else towards the seen group, so a model that composes attributes scores alike on both and one
that memorises pairs fails on the held-out group (e.g. "red cross" for a red circle: colour right, shape wrong).
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from vlcore.evaluation.caption_metrics import bleu, cider_d, tokenize_caption

__all__ = ["generate_captions", "ShapesCaption", "parse_shapes_caption", "attribute_accuracy", "caption_metrics",
           "evaluate_captioning"]


@torch.no_grad()
def generate_captions(model, images: torch.Tensor, tokenizer, *, prompt: str = "", max_new_tokens: Optional[int] = None,
                      num_beams: int = 1, batch_size: int = 32, device: Optional[torch.device] = None,
                      autocast=nullcontext) -> list[str]:
    """Captions of ``images [N, 3, H, W]``: greedy (the captioner's ``generate``) or, with ``num_beams > 1``,
    beam search (``beam_search``, length penalty 1); decoding stops at the tokenizer's end-of-text. The
    trainer's sequences are ``[image tokens] caption <eot>``, so the default prompt is empty;
    ``max_new_tokens`` defaults to what the context leaves after the image tokens."""
    if batch_size < 1 or num_beams < 1:
        raise ValueError(f"generate_captions: batch_size and num_beams must be >= 1, got {batch_size}, {num_beams}")
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    if max_new_tokens is None:
        max_new_tokens = model.config.text_cfg.context_length - model.num_image_tokens - len(prompt_ids)
    captions = []
    with autocast():
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size]
            chunk = chunk.to(device) if device is not None else chunk
            prompts = [prompt_ids] * chunk.shape[0]
            if num_beams > 1:
                ids = [seq for seq, _ in model.beam_search(chunk, prompts, num_beams=num_beams,
                                                           max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eot_id)]
            else:
                ids = model.generate(chunk, prompts, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eot_id)
            captions.extend(tokenizer.decode(seq).strip() for seq in ids)
    return captions


# --- the embedded shapes data's captions ----------------------------------------------------------------------


@dataclass
class ShapesCaption:
    """A caption read with the shapes vocabulary. ``objects``: ``(size, colour, shape)`` per object slot, any
    of them None where the caption names no such word; ``relation``: the relation (``"left of"``) or the
    place (``"top left"``, ``"centre"``), None if absent."""

    objects: list = field(default_factory=list)
    relation: Optional[str] = None


def _vocabulary():
    from vlcore.train import synthetic

    return synthetic.SIZES, synthetic.COLOUR_NAMES, synthetic.SHAPES, synthetic.RELATIONS, synthetic.REGIONS


def _first_word(words: list[str], vocabulary) -> Optional[str]:
    return next((w for w in words if w in vocabulary), None)


def parse_shapes_caption(text: str) -> ShapesCaption:
    """Split at the relation or place phrase; in each part take the first size, colour and shape word.
    Lenient on purpose: a caption with one wrong or garbled word loses only that attribute."""
    sizes, colours, shapes, relations, regions = _vocabulary()
    text = tokenize_caption(text)
    phrases = sorted(relations, key=len, reverse=True)
    places = [f"at the {r}" for r in regions if r != "centre"] + ["in the centre"]
    found = re.search(r"\b(" + "|".join(map(re.escape, phrases + places)) + r")\b", text)
    if found is None:
        parts, relation = [text], None
    elif found.group(1) in relations:
        parts, relation = [text[: found.start()], text[found.end():]], found.group(1)
    else:
        parts, relation = [text[: found.start()]], found.group(1).replace("at the ", "").replace("in the ", "")
    objects = []
    for part in parts:
        words = part.split()
        objects.append((_first_word(words, sizes), _first_word(words, colours), _first_word(words, shapes)))
    return ShapesCaption(objects, relation)


ATTRIBUTES = ("size", "colour", "shape")


def attribute_accuracy(generated: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Per-attribute accuracy of generated shapes captions against their references.

    Returns ``attr_{size,colour,shape,pair}_{held_out,seen}`` (``pair``: colour and shape both right) over
    object slots grouped by the reference object's (colour, shape) pair, ``attr_relation`` over images (the
    relation, or the place of a one-object image), and the slot counts ``attr_objects_{held_out,seen}``. A
    group without objects is left out.
    """
    from vlcore.train import synthetic

    if len(generated) != len(references):
        raise ValueError(f"attribute_accuracy: {len(generated)} generated captions but references has {len(references)}")
    hits = {(a, g): [] for a in ATTRIBUTES + ("pair",) for g in ("held_out", "seen")}
    relation_hits = []
    for text, refs in zip(generated, references):
        got = parse_shapes_caption(text)
        best = None
        for ref in map(parse_shapes_caption, refs):
            slots = [(want, got.objects[i] if i < len(got.objects) else (None, None, None))
                     for i, want in enumerate(ref.objects)]
            agreement = sum(w == g for want, have in slots for w, g in zip(want, have)) + (got.relation == ref.relation)
            if best is None or agreement > best[0]:
                best = (agreement, slots, ref.relation)
        _, slots, relation = best
        for want, have in slots:
            group = "held_out" if (want[1], want[2]) in synthetic.HELD_OUT else "seen"
            for attribute, w, g in zip(ATTRIBUTES, want, have):
                hits[(attribute, group)].append(w == g)
            hits[("pair", group)].append(want[1:] == have[1:])
        relation_hits.append(got.relation == relation)
    metrics = {f"attr_{a}_{g}": sum(v) / len(v) for (a, g), v in hits.items() if v}
    metrics["attr_relation"] = sum(relation_hits) / max(len(relation_hits), 1)
    for group in ("held_out", "seen"):
        metrics[f"attr_objects_{group}"] = len(hits[("size", group)])
    return metrics


# --- all caption metrics --------------------------------------------------------------------------------------


def caption_metrics(generated: Sequence[str], references: Sequence[Sequence[str]], *, shapes: bool = False) -> dict:
    """``cider`` (CIDEr-D), ``bleu_1`` .. ``bleu_4`` and ``caption_exact`` (the share of generated captions
    equal to one of their references after tokenisation) of generated captions; with ``shapes``, also the
    attribute accuracies of :func:`attribute_accuracy`."""
    candidates = [tokenize_caption(c) for c in generated]
    refs = [[tokenize_caption(r) for r in rs] for rs in references]
    metrics = {"cider": cider_d(candidates, refs)[0]}
    metrics.update({f"bleu_{n + 1}": value for n, value in enumerate(bleu(candidates, refs))})
    metrics["caption_exact"] = sum(c in rs for c, rs in zip(candidates, refs)) / len(candidates)
    if shapes:
        metrics.update(attribute_accuracy(generated, references))
    metrics["caption_images"] = len(candidates)
    return metrics


def evaluate_captioning(model, images: torch.Tensor, references: Sequence[Sequence[str]], tokenizer, *,
                        shapes: bool = False, prompt: str = "", max_new_tokens: Optional[int] = None,
                        num_beams: int = 1, batch_size: int = 32, device: Optional[torch.device] = None,
                        autocast=nullcontext) -> tuple[dict, list[str]]:
    """:func:`generate_captions` of ``images`` and their :func:`caption_metrics`: ``(metrics, captions)``."""
    if images.shape[0] != len(references):
        raise ValueError(f"evaluate_captioning: {images.shape[0]} images but references has {len(references)} entries")
    generated = generate_captions(model, images, tokenizer, prompt=prompt, max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, batch_size=batch_size, device=device, autocast=autocast)
    return caption_metrics(generated, references, shapes=shapes), generated
