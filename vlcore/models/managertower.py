"""ManagerTower (Xu et al., "ManagerTower: Aggregating the Insights of Uni-Modal Experts for Vision-Language
Representation Learning", ACL 2023): BridgeTower's cross-modal encoder, but each cross-modal layer is fed by
a *manager* that aggregates the outputs of the top ``N`` layers of its unimodal tower (the "experts") instead
of one bridge per layer.

For one modality, with ``E_i = W norm(h_i) + type + layer_i`` the ``i``-th managed layer's output (the
tower's final norm, one projection shared by all layers, a token-type and a per-layer embedding), a manager
computes ``sum_i w_i * LN_i(E_i)`` plus, from the second cross-modal layer on, ``w_prev * LN(C_prev)`` with
``C_prev`` the previous cross-modal layer's output and ``w_prev`` a learned per-channel vector (init 1).

- **Static** managers (SAUE): ``w = softmax_i(S / tau)`` with ``S [N, d]`` learned per layer and channel,
  initialised uniform; the same weights for every token and sample.
- **Adaptive** managers (AAUE, the paper's best): the weights are generated per token from a *cross-modal
  fused query*: the token's previous cross-modal state ``q = LN(C_prev)`` attends (one head) to the other
  modality's previous cross-modal output ``c`` (padded text keys masked), and
  ``w = softmax_i(Linear([attn(q, c); q]) / tau)``, one weight per layer for each token. The first layer
  has no previous output and uses a static manager, as the paper does.

``tau`` is a learned temperature (init 1). In training, Gaussian noise of standard deviation ``1 / N`` is
added to the layer scores before the softmax, as in the authors' code. Heads and objectives (ITC on the
unimodal towers, ITM with hard negatives, MLM) are :class:`~vlcore.models.fusion.FusionModel`'s; the
cross-modal layers are the same blocks as BridgeTower's (fused cross-attention with key padding, and the
first layer's K/V shared between ITM pairs through ``context_index``).

:class:`LayerManager` is also the captioner's connector plug-in (``connector_cfg.manager_layers``): it
aggregates the top vision layers before pooling, with no previous output; its adaptive form takes the query
from the top layer's own tokens (there is no other modality before the language model).

Departures: the adaptive manager masks padded keys of the other modality (the authors' code attends to
padding too); both modalities keep their own widths (the paper projects both to one hidden size).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from vlcore.models.config import ModelConfig
from vlcore.models.fusion import BridgeTowerModel, FusionModel
from vlcore.nn.transformer import Block


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


class ManagerCrossTower(nn.Module):
    """One modality's side of ManagerTower's cross-modal encoder: the shared projection, type and layer
    embeddings of the managed layers, one manager and one cross-attention block per cross-modal layer."""

    def __init__(self, width: int, heads: int, context_width: int, layers: int, managed_layers: int, *,
                 adaptive: bool, mlp_ratio: float, act: str, norm_eps: float, impl):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.type_embedding = nn.Parameter(torch.zeros(width))
        self.layer_embedding = nn.Parameter(0.02 * torch.randn(managed_layers, width))
        self.managers = nn.ModuleList([
            LayerManager(width, managed_layers, adaptive=adaptive and i > 0, with_previous=i > 0,
                         context_width=context_width if adaptive and i > 0 else None, norm_eps=norm_eps)
            for i in range(layers)])
        self.blocks = nn.ModuleList([
            Block(width, heads, mlp_ratio=mlp_ratio, act=act, norm_eps=norm_eps, context_dim=context_width,
                  gated=False, impl=impl) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=norm_eps)

    def expert_states(self, states: Sequence[torch.Tensor], final_norm: nn.Module) -> torch.Tensor:
        """``[N, B, L, d]``: each managed layer through the tower's final norm, the shared projection, and the
        type and layer embeddings."""
        x = self.proj(torch.stack([final_norm(h) for h in states]))
        return x + (self.type_embedding + self.layer_embedding[:, None, None, :]).to(x.dtype)


class ManagerTowerModel(FusionModel):
    """ManagerTower on the same towers, blocks and objectives as :class:`BridgeTowerModel`; the towers hand
    their top ``managed_layers`` outputs to the managers of a ``fusion_cfg.layers``-deep cross-modal encoder."""

    # The towers' top-N outputs, as BridgeTower collects them (N = self.num_fused, set below).
    lower_image = BridgeTowerModel.lower_image
    lower_text = BridgeTowerModel.lower_text

    def __init__(self, cfg: ModelConfig, itc_loss: Optional[nn.Module] = None):
        super().__init__(cfg, itc_loss)
        vision, text, fusion = cfg.vision_cfg, cfg.text_cfg, cfg.fusion_cfg
        managed = fusion.managed_layers or min(vision.layers, text.layers)
        self.num_fused = managed
        adaptive = fusion.manager == "adaptive"
        self.image_cross = ManagerCrossTower(vision.width, vision.heads, text.width, fusion.layers, managed,
                                             adaptive=adaptive, mlp_ratio=vision.mlp_ratio, act=vision.act,
                                             norm_eps=vision.norm_eps, impl=cfg.impl)
        self.text_cross = ManagerCrossTower(text.width, text.heads, vision.width, fusion.layers, managed,
                                            adaptive=adaptive, mlp_ratio=text.mlp_ratio, act=text.act,
                                            norm_eps=text.norm_eps, impl=cfg.impl)

    def upper(self, image_states, text_states, text_lengths, *, fuse, image_index=None, text_index=None):
        if not fuse:
            return self.visual.norm_post(image_states[-1]), self.text.norm_final(text_states[-1])
        image_experts = self.image_cross.expert_states(image_states, self.visual.norm_post)
        text_experts = self.text_cross.expert_states(text_states, self.text.norm_final)
        # Layer 0's static managers run once per image / text; the pairs read their K/V through context_index.
        image_in, text_in = self.image_cross.managers[0](image_experts), self.text_cross.managers[0](text_experts)
        image_context, text_context, text_context_lengths = image_in, text_in, text_lengths
        if image_index is not None:
            image_in, image_experts = image_in[image_index], image_experts[:, image_index]
        if text_index is not None:
            text_in, text_lengths, text_experts = text_in[text_index], text_lengths[text_index], text_experts[:, text_index]
        layers = zip(self.image_cross.managers, self.text_cross.managers, self.image_cross.blocks, self.text_cross.blocks)
        for layer, (image_manager, text_manager, image_block, text_block) in enumerate(layers):
            if layer > 0:
                adaptive = image_manager.adaptive
                image_in = image_manager(image_experts, image_out, context=text_out if adaptive else None,
                                         context_lengths=text_lengths if adaptive else None)
                text_in = text_manager(text_experts, text_out, context=image_out if adaptive else None)
                image_context, text_context, text_context_lengths = image_in, text_in, text_lengths
                image_index = text_index = None
            image_out = image_block(image_in, context=text_context, context_lengths=text_context_lengths,
                                    context_index=text_index)
            text_out = text_block(text_in, key_lengths=text_lengths, context=image_context, context_index=image_index)
        return self.image_cross.norm(image_out), self.text_cross.norm(text_out)


__all__ = ["LayerManager", "ManagerCrossTower", "ManagerTowerModel"]
