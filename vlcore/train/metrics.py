"""Evaluation metrics: zero-shot retrieval (CLIP_benchmark's protocol), the captioning loss and MIR, and
:func:`evaluate`, which adds :func:`vlcore.evaluation.evaluate_model` (ITM re-ranking, captions and their
metrics, zero-shot classification) as the run's config asks.

Retrieval follows CLIP_benchmark (docs/evaluation.md): normalised image and text embeddings, all captions of
every image, cosine scores ``[N_txt, N_img]`` without the logit scale, and hit rate at k:
``image_retrieval_recall@k`` (text->image: is the caption's image in its top k) and
``text_retrieval_recall@k`` (image->text: is *any* of the image's captions in its top k). Reported here as
``t2i_R@k`` and ``i2t_R@k``; ``i2t_chance_R@1`` is what random scores would give (captions per image / N_txt).

The metrics take a model and tensors and know nothing of checkpoints or command lines: the training loop and
``vlcore-eval`` (:mod:`vlcore.train.cli`) both call :func:`evaluate`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from vlcore.evaluation import EvalOptions, EvalResult, evaluate_model
from vlcore.evaluation.mir import captioner_mir
from vlcore.models.clip import retrieval_recall
from vlcore.train.builders import image_transform
from vlcore.train.tasks import CaptionCollate, get_tokenizer


@torch.no_grad()
def retrieval_metrics(model, images: torch.Tensor, captions: list[list[str]], tokenizer: str, context_length: int,
                      device: torch.device, autocast=nullcontext, batch_size: int = 256,
                      ks: Sequence[int] = (1, 5, 10)) -> dict:
    # Flatten the captions; text_to_image[t] is the image caption t belongs to (an image may have several).
    texts = [c for caps in captions for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], device=device)
    tok = get_tokenizer(tokenizer)
    image_features, text_features = [], []
    with autocast():
        # Encode in chunks so that an evaluation set of any size fits in memory; features go to fp32 before
        # the similarity so that bf16 rounding cannot reorder near-ties.
        for start in range(0, images.shape[0], batch_size):
            image_features.append(model.encode_image(images[start : start + batch_size].to(device)).float())
        for start in range(0, len(texts), batch_size):
            tokens = tok(texts[start : start + batch_size], context_length).to(device)
            text_features.append(model.encode_text(tokens).float())
    image_features = torch.nn.functional.normalize(torch.cat(image_features), dim=-1)
    text_features = torch.nn.functional.normalize(torch.cat(text_features), dim=-1)
    recall = retrieval_recall(image_features, text_features, text_to_image, ks=tuple(ks))
    metrics = {}
    for k in ks:
        metrics[f"i2t_R@{k}"] = recall[f"text_retrieval_recall@{k}"]
        metrics[f"t2i_R@{k}"] = recall[f"image_retrieval_recall@{k}"]
    # Random scores hit one of an image's captions with probability (its captions) / (all captions).
    metrics["i2t_chance_R@1"] = len(texts) / len(captions) / len(texts)
    metrics["eval_images"] = len(captions)
    return metrics


@torch.no_grad()
def caption_loss(model, images: torch.Tensor, captions: list[list[str]], model_cfg, device: torch.device,
                 autocast=nullcontext, batch_size: int = 64) -> dict:
    """The held-out captioning loss, averaged over predicted tokens (not over batches, which differ in size)."""
    collate = CaptionCollate(model_cfg.text_cfg.tokenizer, model_cfg.text_cfg.context_length,
                             model_cfg.connector_cfg.num_tokens(model_cfg.vision_cfg),
                             model_cfg.connector_cfg.image_token_id, train=False)
    total, count = 0.0, 0
    with autocast():
        for start in range(0, images.shape[0], batch_size):
            batch = collate(images[start : start + batch_size], captions[start : start + batch_size], None)
            out = model(batch["packed"].to(device), batch["images"].to(device))
            n = int(out["num_targets"])
            total, count = total + float(out["loss"]) * n, count + n
    return {"caption_loss": total / max(count, 1), "eval_images": images.shape[0]}


def eval_options(cfg, model_cfg) -> EvalOptions:
    """What an evaluation of this run measures, from the config's evaluation fields."""
    on_shapes = cfg.data == "synthetic" and not cfg.val_data  # the embedded data, whose captions have attributes
    zeroshot = {"auto": "shapes" if on_shapes else None, "none": None}.get(cfg.zeroshot, cfg.zeroshot)
    if model_cfg.kind == "captioner":
        zeroshot = None  # no text tower to embed class prompts with
    return EvalOptions(itm_rerank_k=cfg.itm_rerank_k, caption_samples=cfg.caption_samples, num_beams=cfg.num_beams,
                       shapes=on_shapes, zeroshot=zeroshot)


@torch.no_grad()
def held_out_mir(model, images: torch.Tensor, captions: list[list[str]], model_cfg, device: torch.device,
                 autocast=nullcontext, samples: int = 64, batch_size: int = 32) -> dict:
    """The captioner's MIR (docs/evaluation.md, 'Modality Integration Rate') on the first ``samples`` evaluation images with their
    first caption: a fixed set, so that successive evaluations of a run are comparable."""
    n = min(samples, images.shape[0])
    collate = CaptionCollate(model_cfg.text_cfg.tokenizer, model_cfg.text_cfg.context_length,
                             model_cfg.connector_cfg.num_tokens(model_cfg.vision_cfg),
                             model_cfg.connector_cfg.image_token_id, train=False)

    def batches():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = collate(images[start:stop], [c[:1] for c in captions[start:stop]], None)
            yield batch["packed"].to(device), batch["images"].to(device)

    with autocast():
        result = captioner_mir(model, batches())
    return {"mir": result.mir, "mir_per_layer": result.per_layer}


def evaluate(model, model_cfg, eval_set, device: torch.device, autocast=nullcontext, cfg=None) -> EvalResult:
    """Every metric of ``model`` on ``eval_set = (images, captions, skipped)`` for its kind, as measured by
    :func:`vlcore.evaluation.evaluate_model` with the options of ``cfg`` (a TrainConfig; None: the library's
    defaults), plus the held-out caption loss and MIR for a captioner."""
    images, captions, _ = eval_set
    options = eval_options(cfg, model_cfg) if cfg is not None else EvalOptions()
    tokenizer = get_tokenizer(model_cfg.text_cfg.tokenizer)
    transform = image_transform(model_cfg, False, cfg) if cfg is not None and options.zeroshot else None
    result = evaluate_model(model, model_cfg.kind, images, captions, tokenizer, model_cfg.text_cfg.context_length,
                            options=options, transform=transform, device=device, autocast=autocast)
    if model_cfg.kind == "captioner":
        # Evaluation switches dropout and the like off; the caller's mode is restored even if a metric fails.
        was_training = model.training
        model.eval()
        try:
            result.metrics.update(caption_loss(model, images, captions, model_cfg, device, autocast))
        finally:
            model.train(was_training)
        mir_samples = cfg.mir_samples if cfg is not None else 64
        if mir_samples:
            result.metrics.update(held_out_mir(model, images, captions, model_cfg, device, autocast, mir_samples))
    return result
