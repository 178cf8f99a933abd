"""CLIP dual encoder (open_clip's ``CLIP``): image and text towers, projections, a learned logit scale
(clamped to 100, open_clip's ``clamp_(0, log 100)``) and an optional logit bias (SigLIP)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.models.config import ModelConfig
from vlcore.models.text import TextTransformer
from vlcore.models.vision import VisionTransformer

MAX_LOGIT_SCALE = math.log(100.0)


class LogitScale(nn.Module):
    """``log`` of the contrastive temperature's inverse, learned; ``forward`` returns the exp'd scale,
    clamped to ``[1, 100]`` (also in the graph, so a step that overshoots never yields a larger scale)."""

    def __init__(self, init_logit_scale: float, init_logit_bias: Optional[float]):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    @torch.no_grad()
    def clamp_(self) -> None:
        """open_clip's post-step clamp: keep the stored parameter in ``[0, log 100]``."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def forward(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp(), self.logit_bias


class CLIP(nn.Module):
    """``encode_image([B, 3, H, W])``, ``encode_text([B, L] int64)`` -> ``[B, embed_dim]`` (L2-normalised by
    default); ``forward(images, tokens)`` -> dict(image_features, text_features, logit_scale, logit_bias)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision_cfg, cfg.embed_dim, impl=cfg.impl)
        self.text = TextTransformer(cfg.text_cfg, cfg.embed_dim, impl=cfg.impl)
        self.logit = LogitScale(cfg.init_logit_scale, cfg.init_logit_bias)

    @property
    def image_size(self) -> int:
        return self.config.vision_cfg.image_size

    @property
    def context_length(self) -> int:
        return self.config.text_cfg.context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def clamp_logit_scale(self) -> None:
        """Call after every optimizer step (open_clip's ``clamp_logit_scale``)."""
        self.logit.clamp_()

    def forward(self, images: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None) -> dict:
        logit_scale, logit_bias = self.logit()
        return {
            "image_features": self.encode_image(images) if images is not None else None,
            "text_features": self.encode_text(tokens) if tokens is not None else None,
            "logit_scale": logit_scale,
            "logit_bias": logit_bias,
        }


@torch.no_grad()
def zero_shot_classifier(model: CLIP, class_tokens: torch.Tensor) -> torch.Tensor:
    """Class embeddings ``[C, embed_dim]`` from ``class_tokens [C, T, L]`` (T prompt templates per class):
    the normalised mean of each class's normalised prompt embeddings (CLIP's prompt ensembling)."""
    num_classes, num_templates, length = class_tokens.shape
    prompts = model.encode_text(class_tokens.reshape(-1, length)).reshape(num_classes, num_templates, -1)
    return F.normalize(prompts.mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot_classify(model: CLIP, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Predicted class ``[B]`` int64 for ``images`` against a :func:`zero_shot_classifier`."""
    return (model.encode_image(images) @ classifier.t()).argmax(dim=-1)


@torch.no_grad()
def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark's retrieval metrics (docs/evaluation.md, 'Retrieval recall'): hit rate at k.

    ``image_features [N_img, D]``, ``text_features [N_txt, D]`` (normalised), ``text_to_image [N_txt]`` int64:
    the image each caption belongs to. ``image_retrieval_recall@k``: per caption, is its image in the top k;
    ``text_retrieval_recall@k``: per image, is any of its captions in the top k.
    """
    scores = text_features @ image_features.t()  # [N_txt, N_img]
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(scores.shape[0], device=scores.device), text_to_image] = True
    metrics = {}
    for k in ks:
        top_images = scores.topk(min(k, scores.shape[1]), dim=1).indices
        metrics[f"image_retrieval_recall@{k}"] = positive.gather(1, top_images).any(1).float().mean().item()
        top_texts = scores.t().topk(min(k, scores.shape[0]), dim=1).indices
        metrics[f"text_retrieval_recall@{k}"] = positive.t().gather(1, top_texts).any(1).float().mean().item()
    return metrics
