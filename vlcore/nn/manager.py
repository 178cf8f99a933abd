"""ManagerTower's *manager* (Xu et al., "ManagerTower: Aggregating the Insights of Uni-Modal Experts for
Vision-Language Representation Learning", ACL 2023): a learned, softmax-weighted mix of several layers' outputs
of one tower, used by :mod:`vlcore.models.managertower` to feed each cross-modal layer and by the captioner's
connector (``connector_cfg.manager_layers``) to aggregate the top vision layers before pooling.

For ``N`` normalised layer outputs ``LN_i(E_i)`` a manager computes ``sum_i w_i * LN_i(E_i)`` plus, when it
has a previous cross-modal output ``C_prev``, ``w_prev * LN(C_prev)`` with ``w_prev`` a learned per-channel
vector (init 1).

- **Static** managers (SAUE): ``w = softmax_i(S / tau)`` with ``S [N, d]`` learned per layer and channel,
  initialised uniform; the same weights for every token and sample.
- **Adaptive** managers (AAUE, the paper's best): the weights are generated per token from a *cross-modal
  fused query*: the token's previous cross-modal state ``q = LN(C_prev)`` attends (one head) to the other
  modality's previous cross-modal output ``c`` (padded keys masked), and
  ``w = softmax_i(Linear([attn(q, c); q]) / tau)``, one weight per layer for each token. Without a previous
  output or another modality (the captioner's connector), the query is the top layer's own token.

``tau`` is a learned temperature (init 1). In training, Gaussian noise of standard deviation ``1 / N`` is
added to the layer scores before the softmax, as in the authors' code. Departure: the adaptive manager masks
padded keys of the other modality (the authors' code attends to padding too).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class LayerManager(nn.Module):
    """Aggregates ``layers [N, B, L, d]`` (and, with ``with_previous``, the previous cross-modal output
    ``[B, L, d]``) into ``[B, L, d]``; see the module docstring. ``context_width`` (adaptive only) is the
    width of the other modality whose previous output joins the query; None: the query is the token alone
    (its previous output, or its top managed layer when there is none)."""

    def __init__(self, width: int, num_layers: int, *, adaptive: bool, with_previous: bool,
                 context_width: Optional[int] = None, norm_eps: float = 1e-5, noise: bool = True):
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"LayerManager: num_layers must be positive, got {num_layers}")
        if context_width is not None and not (adaptive and with_previous):
            raise ValueError("LayerManager: a cross-modal context needs an adaptive manager with a previous output")
        self.num_layers, self.adaptive, self.noise = num_layers, adaptive, noise
        self.layer_norms = nn.ModuleList([nn.LayerNorm(width, eps=norm_eps) for _ in range(num_layers)])
        self.temperature = nn.Parameter(torch.ones(1))
        if adaptive:
            self.context_width = context_width
            self.controller = nn.Linear(width + (context_width or 0), num_layers)
            # Small scores at initialisation: every layer starts with about the same weight.
            nn.init.normal_(self.controller.weight, std=0.02)
            nn.init.zeros_(self.controller.bias)
            if context_width is not None:
                self.context_norm = nn.LayerNorm(context_width, eps=norm_eps)
                self.query_proj = nn.Linear(width, width)
                self.key_proj = nn.Linear(context_width, width)
        else:
            self.layer_scores = nn.Parameter(torch.full((num_layers, width), 1.0 / num_layers))
        self.with_previous = with_previous
        if with_previous:
            self.previous_norm = nn.LayerNorm(width, eps=norm_eps)
            self.previous_weight = nn.Parameter(torch.ones(width))

    def _query(self, layers: torch.Tensor, previous: Optional[torch.Tensor], context: Optional[torch.Tensor],
               context_lengths: Optional[torch.Tensor]) -> torch.Tensor:
        query = previous if previous is not None else layers[-1]
        if context is None:
            return query
        context = self.context_norm(context)
        scores = self.query_proj(query) @ self.key_proj(context).transpose(-1, -2) / math.sqrt(query.shape[-1])
        if context_lengths is not None:
            padded = torch.arange(context.shape[1], device=context.device) >= context_lengths.view(-1, 1, 1)
            scores = scores.masked_fill(padded, float("-inf"))
            # Zero weight is not enough when a padded row holds inf / NaN: clear the rows themselves.
            context = context.masked_fill(padded.transpose(1, 2), 0.0)
        return torch.cat([scores.softmax(dim=-1) @ context, query], dim=-1)

    def layer_weights(self, layers: torch.Tensor, previous: Optional[torch.Tensor] = None,
                      context: Optional[torch.Tensor] = None,
                      context_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weights of the normalised layers: ``[N, 1, 1, d]`` (static) or ``[N, B, L, 1]`` (adaptive), or
        the full ``[N, B, L, d|1]`` with training noise. ``layers`` and ``previous`` come normalised."""
        if self.adaptive:
            scores = self.controller(self._query(layers, previous, context, context_lengths)).permute(2, 0, 1)[..., None]
        else:
            scores = self.layer_scores[:, None, None, :]
        if self.training and self.noise:
            scores = scores + torch.randn(torch.broadcast_shapes(scores.shape, (*layers.shape[:3], scores.shape[-1])),
                                          device=scores.device, dtype=scores.dtype) / self.num_layers
        return (scores / self.temperature).softmax(dim=0)

    def forward(self, layers: torch.Tensor, previous: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if layers.shape[0] != self.num_layers:
            raise ValueError(f"LayerManager: expected {self.num_layers} layers, got {layers.shape[0]}")
        if (previous is not None) != self.with_previous:
            raise ValueError("LayerManager: pass the previous cross-modal output exactly when built with_previous")
        if self.adaptive and (context is not None) != (self.context_width is not None):
            raise ValueError("LayerManager: pass the other modality's context exactly when built with context_width")
        normed = torch.stack([norm(h) for norm, h in zip(self.layer_norms, layers)])
        previous = self.previous_norm(previous) if previous is not None else None
        out = (self.layer_weights(normed, previous, context, context_lengths) * normed).sum(dim=0)
        if previous is not None:
            out = out + self.previous_weight * previous
        return out


__all__ = ["LayerManager"]
