"""ManagerTower (Xu et al., "ManagerTower: Aggregating the Insights of Uni-Modal Experts for Vision-Language
Representation Learning", ACL 2023): BridgeTower's cross-modal encoder, but each cross-modal layer is fed by
a *manager* (:class:`vlcore.nn.manager.LayerManager`, where the static and adaptive forms are written out)
that aggregates the outputs of the top ``N`` layers of its unimodal tower (the "experts") instead of one
bridge per layer.

For one modality, the ``i``-th managed layer's output enters its manager as ``E_i = W norm(h_i) + type +
layer_i`` (the tower's final norm, one projection shared by all layers, a token-type and a per-layer
embedding). From the second cross-modal layer on, the manager also takes the previous cross-modal layer's
output, and an adaptive manager reads the other modality's previous output (padded text keys masked) to
weight the layers per token. The first layer has no previous output and uses a static manager, as the paper
does.

Heads and objectives (ITC on the unimodal towers, ITM with hard negatives, MLM) are
:class:`~vlcore.models.fusion.FusionModel`'s; the cross-modal layers are the same blocks as BridgeTower's
(fused cross-attention with key padding, and the first layer's K/V shared between ITM pairs through
``context_index``). Departure: both modalities keep their own widths (the paper projects both to one hidden
size).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from vlcore.models.config import ModelConfig
from vlcore.models.fusion import BridgeTowerModel, FusionModel
from vlcore.nn.manager import LayerManager
from vlcore.nn.transformer import Block


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


__all__ = ["LayerManager", "ManagerCrossTower", "ManagerTowerModel"]  # LayerManager re-exported from vlcore.nn
