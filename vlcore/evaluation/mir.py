"""Modality Integration Rate (MIR): how far apart image tokens and text tokens sit inside a language model.

Huang et al., "Deciphering Cross-Modal Alignment in Large Vision-Language Models with Modality Integration
Rate" (2024). For every layer ``k`` of the language model, take the hidden states of the image tokens and of
the text tokens over a fixed set of samples, then

1. **normalise**: multiply both sets by ``1 / mean_t ||text_t||_2`` (the text tokens' mean L2 norm at that
   layer), so that layers whose states grow in magnitude do not dominate the sum;
2. **remove outliers**, each modality on its own: a token whose L2 norm is more than 3 standard deviations
   away from the median norm is replaced by the per-channel median token;
3. **Fréchet distance** between Gaussians fitted to the two sets (means and unbiased covariances):
   ``FD = ||mu_i - mu_t||^2 + tr(S_i) + tr(S_t) - 2 tr((S_i S_t)^{1/2})``;

and ``MIR = log10(sum_k FD_k)`` over the layers' outputs (the embedding output is left out, as in the
authors' evaluation). Lower is better: the image tokens' distribution is closer to the text tokens'.

Two details follow the authors' reference code rather than a looser reading of the paper: the median is
the lower median of an even count (``torch.median``), and the standard deviation of the norms is the
unbiased one. The trace of the matrix square root is computed exactly (eigenvalues of
``S_i^{1/2} S_t S_i^{1/2}``, which has the eigenvalues of ``S_i S_t``, in float64), not with the reference's
fast five-step Newton-Schulz iteration.

``modality_integration_rate(hidden_states, image_mask, text_mask)`` works for any model that exposes its
per-layer hidden states; :func:`captioner_mir` runs a captioner on a fixed held-out set of packed batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch


@dataclass
class MirResult:
    """``per_layer[k]``: the Fréchet distance at the ``k``-th layer scored; ``mir = log10(sum(per_layer))``."""

    per_layer: list[float]
    mir: float

    def to_dict(self) -> dict:
        return {"mir": self.mir, "mir_per_layer": list(self.per_layer)}


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})`` for symmetric PSD covariances.

    ``S_a S_b`` is not symmetric, but it is similar to ``S_a^{1/2} S_b S_a^{1/2}``, which is symmetric PSD: the
    trace of the square root is the sum of the square roots of that matrix's (clamped) eigenvalues."""
    mean_a, cov_a, mean_b, cov_b = (t.double() for t in (mean_a, cov_a, mean_b, cov_b))
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(distance)


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of ``features [n, C]`` (n >= 2), in float64."""
    features = features.double()
    mean = features.mean(dim=0)
    centered = features - mean
    return mean, centered.T @ centered / (features.shape[0] - 1)


def replace_outliers(features: torch.Tensor, num_std: float = 3.0) -> torch.Tensor:
    """Tokens whose L2 norm is more than ``num_std`` standard deviations from the median norm become the
    per-channel median token (the reference's outlier rule; returns a new tensor)."""
    norms = features.norm(dim=-1)
    outliers = (norms - norms.median()).abs() > num_std * norms.std()
    return torch.where(outliers[:, None], features.median(dim=0).values, features)


def layer_distance(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """One layer's term: scale both sets by the text tokens' mean norm, replace outliers, Fréchet distance."""
    image_features, text_features = image_features.double(), text_features.double()
    scale = 1.0 / text_features.norm(dim=-1).mean()
    image_features = replace_outliers(image_features * scale)
    text_features = replace_outliers(text_features * scale)
    return frechet_distance(*gaussian_statistics(image_features), *gaussian_statistics(text_features))


def _check_masks(hidden_states: Sequence[torch.Tensor], image_mask: torch.Tensor, text_mask: torch.Tensor) -> None:
    if len(hidden_states) == 0:
        raise ValueError("modality_integration_rate: hidden_states is empty")
    token_shape = hidden_states[0].shape[:-1]
    for name, mask in (("image_mask", image_mask), ("text_mask", text_mask)):
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(token_shape):
            raise ValueError(f"modality_integration_rate: {name} must be a bool tensor of shape {tuple(token_shape)} "
                             f"(the hidden states' token dimensions), got {mask.dtype} {tuple(mask.shape)}")
    for k, h in enumerate(hidden_states):
        if h.shape[:-1] != token_shape:
            raise ValueError(f"modality_integration_rate: hidden_states[{k}] has shape {tuple(h.shape)}, "
                             f"hidden_states[0] has {tuple(hidden_states[0].shape)}")
    if bool((image_mask & text_mask).any()):
        raise ValueError("modality_integration_rate: a token is in both image_mask and text_mask")
    for name, mask in (("image_mask", image_mask), ("text_mask", text_mask)):
        if int(mask.sum()) < 2:
            raise ValueError(f"modality_integration_rate: {name} selects {int(mask.sum())} tokens; a covariance "
                             "needs at least 2")


def select_tokens(hidden_states: Sequence[torch.Tensor], image_mask: torch.Tensor, text_mask: torch.Tensor,
                  *, skip_embedding: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per scored layer, the image tokens ``[n_img, C]`` and text tokens ``[n_txt, C]`` (detached, float64,
    on the CPU), so that several batches of a held-out set can be concatenated before scoring."""
    _check_masks(hidden_states, image_mask, text_mask)
    layers = hidden_states[1:] if skip_embedding else hidden_states
    if len(layers) == 0:
        raise ValueError("modality_integration_rate: skip_embedding=True leaves no layer to score")
    image = [h.detach()[image_mask].double().cpu() for h in layers]
    text = [h.detach()[text_mask].double().cpu() for h in layers]
    return image, text


def mir_from_tokens(image_tokens: Sequence[torch.Tensor], text_tokens: Sequence[torch.Tensor]) -> MirResult:
    """MIR from per-layer image and text token sets (each ``[n, C]``)."""
    if len(image_tokens) != len(text_tokens) or len(image_tokens) == 0:
        raise ValueError(f"mir_from_tokens: {len(image_tokens)} image layers and {len(text_tokens)} text layers "
                         "(must be equal and non-zero)")
    per_layer = [layer_distance(i, t) for i, t in zip(image_tokens, text_tokens)]
    total = sum(per_layer)
    return MirResult(per_layer=per_layer, mir=math.log10(total) if total > 0 else float("-inf"))


def modality_integration_rate(hidden_states: Sequence[torch.Tensor], image_mask: torch.Tensor,
                              text_mask: torch.Tensor, *, skip_embedding: bool = True) -> MirResult:
    """MIR of one batch of hidden states.

    ``hidden_states``: one tensor per layer, Hugging Face's ``output_hidden_states`` convention (the embedding
    output first, then each layer's output), each ``[T, C]`` (packed) or ``[B, L, C]``; ``image_mask`` /
    ``text_mask``: bool, the hidden states' token shape, disjoint. ``skip_embedding`` leaves out entry 0, as
    the paper does. Tokens in neither mask (padding, special rows) are ignored.
    """
    return mir_from_tokens(*select_tokens(hidden_states, image_mask, text_mask, skip_embedding=skip_embedding))


@torch.no_grad()
def captioner_mir(model, batches: Iterable[tuple], *, text_mask_fn: Optional[callable] = None) -> MirResult:
    """MIR of a :class:`~vlcore.models.captioner.Captioner` over a fixed held-out set.

    ``batches`` yields ``(packed_batch, images)`` pairs (the trainer's caption collate). Image tokens are the
    placeholder rows (``input_ids == image_token_id``); text tokens are all other rows, or
    ``text_mask_fn(packed_batch)`` when given. The tokens of all batches are pooled per layer before scoring,
    as the paper pools its evaluation samples. The model runs in eval mode and is restored afterwards.
    """
    was_training = model.training
    model.eval()
    image_layers: list[list[torch.Tensor]] = []
    text_layers: list[list[torch.Tensor]] = []
    try:
        for packed, images in batches:
            out = model(packed, images, output_hidden_states=True)
            image_mask = packed.input_ids == model.image_token_id
            text_mask = text_mask_fn(packed) if text_mask_fn is not None else ~image_mask
            image, text = select_tokens(out["hidden_states"], image_mask, text_mask & ~image_mask)
            if not image_layers:
                image_layers, text_layers = [[t] for t in image], [[t] for t in text]
            else:
                for k in range(len(image)):
                    image_layers[k].append(image[k])
                    text_layers[k].append(text[k])
    finally:
        model.train(was_training)
    if not image_layers:
        raise ValueError("captioner_mir: batches is empty")
    return mir_from_tokens([torch.cat(p) for p in image_layers], [torch.cat(p) for p in text_layers])


__all__ = ["MirResult", "modality_integration_rate", "captioner_mir", "mir_from_tokens", "select_tokens",
           "layer_distance", "frechet_distance", "gaussian_statistics", "replace_outliers"]
