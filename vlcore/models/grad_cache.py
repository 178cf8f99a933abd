"""Gradient caching for contrastive training (GradCache, Gao et al. 2021): the loss of a large batch, and
exactly its gradients, with the activation memory of one micro-batch.

The contrastive loss couples every sample with every other one, so plain gradient accumulation changes the
loss (each micro-batch sees only its own negatives). Gradient caching keeps the full-batch loss:

1. encode the whole batch micro-batch by micro-batch *without* autograd (features only, ``[B, D]``);
2. compute the loss on the full feature matrices and backpropagate to the features (and logit scale/bias);
3. re-encode each micro-batch *with* autograd and backpropagate the cached feature gradients through it.

Step 3 recomputes the towers' forward once more (about a third more compute), which is the price of the
memory. Requires a deterministic forward (no dropout, or the same RNG state in both passes). Combines with
the distributed and chunked losses of :mod:`vlcore.models.losses`: pass one as ``loss_fn``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def grad_cache_backward(model: nn.Module, loss_fn: Callable, images: torch.Tensor, tokens: torch.Tensor,
                        micro_batch: int) -> torch.Tensor:
    """Accumulate into ``model``'s ``.grad`` the gradients of ``loss_fn`` on the full batch, holding the
    towers' activations for at most ``micro_batch`` samples at a time; returns the (detached) loss.

    ``model`` is a CLIP-style model: ``model(images, tokens)`` returns ``image_features``, ``text_features``,
    ``logit_scale`` and ``logit_bias``, and ``model(None, None)`` the last two alone. ``images [B, 3, H, W]``,
    ``tokens [B, L]``; ``loss_fn(image_features, text_features, logit_scale, logit_bias) -> loss``.
    """
    if micro_batch <= 0:
        raise ValueError(f"grad_cache_backward: micro_batch must be positive, got {micro_batch}")
    spans = [slice(start, start + micro_batch) for start in range(0, images.shape[0], micro_batch)]
    with torch.no_grad():
        encoded = [model(images[s], tokens[s]) for s in spans]
    image_features = torch.cat([e["image_features"] for e in encoded]).requires_grad_(True)
    text_features = torch.cat([e["text_features"] for e in encoded]).requires_grad_(True)
    scales = model(None, None)  # the logit scale / bias with their graph, for their own gradients
    loss = loss_fn(image_features, text_features, scales["logit_scale"], scales["logit_bias"])
    loss.backward()
    for s in spans:
        out = model(images[s], tokens[s])
        # d(loss)/d(params) through this micro-batch = <cached d(loss)/d(features), d(features)/d(params)>
        surrogate = (out["image_features"] * image_features.grad[s]).sum() + (out["text_features"] * text_features.grad[s]).sum()
        surrogate.backward()
    return loss.detach()
