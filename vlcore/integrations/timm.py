"""``patch_timm``: vlcore's attention (and optionally ToMe and NVFP4) inside a timm ``VisionTransformer``.

Each block's ``timm.layers.Attention`` gets, in place, a subclass of its class whose forward runs
``vlcore.ops.attention`` (same parameters, same state-dict keys; masked or dropout-while-training calls go to
timm's own forward). ToMe follows ``tome.patch.timm``: after each block's attention, bipartite soft matching
on the keys averaged over heads merges ``r`` tokens by size-weighted average, the class token protected, and
the attention adds ``log(size)`` to every key's logit (proportional attention). The model's
``forward_features`` then threads the token sizes from block to block, where ToMe keeps them in a shared dict.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlcore.integrations._common import (PatchReport, apply_nvfp4, check_attention_op, dense_attention,
                                         patched_subclass, run_tome_blocks, size_bias, swap_class, tome_merge_step,
                                         tome_schedule)


class _VlcoreTimmAttention:
    """Mixin over ``timm.layers.Attention``."""

    def attend(self, x: torch.Tensor, *, causal: bool = False, key_bias: Optional[torch.Tensor] = None,
               return_keys: bool = False):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)  # [B, N, H, D] each
        q, k = self.q_norm(q), self.k_norm(k)  # per-head norms: layout-independent
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        y = dense_attention(q, k, v, causal=causal, key_bias=key_bias).flatten(-2)
        if getattr(self, "norm", None) is not None:  # scale_norm (older timm releases have no such attribute)
            y = self.norm(y)
        if gate is not None:
            y = y * gate
        y = self.proj_drop(self.proj(y))
        return (y, k.mean(dim=2)) if return_keys else y

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or (self.attn_drop.p > 0 and self.training):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.attend(x, causal=is_causal)


class _VlcoreToMeTimmBlock:
    """Mixin over timm's ``Block``: ToMe's merge between attention and MLP (``tome.patch.timm.ToMeBlock``)."""

    def forward_tome(self, x: torch.Tensor, size: Optional[torch.Tensor], r: int, class_token: bool):
        a, metric = self.attn.attend(self.norm1(x), key_bias=size_bias(size), return_keys=True)
        x = x + self.drop_path1(self.ls1(a))
        x, size = tome_merge_step(x, metric, size, r, class_token=class_token)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size


class _VlcoreToMeVisionTransformer:
    """Mixin over timm's ``VisionTransformer``: blocks run with ToMe's schedule ``self.tome_r`` (ToMe's ``r``),
    read at every forward like ``ToMeVisionTransformer``'s."""

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("timm VisionTransformer with ToMe: masks cannot follow merged tokens")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        class_token = self.cls_token is not None
        schedule = tome_schedule(len(self.blocks), self.tome_r, x.shape[1], int(class_token), "patch_timm")
        return self.norm(run_tome_blocks(self.blocks, x, schedule, class_token, self.grad_checkpointing))


def patch_timm(model: nn.Module, *, tome_r=None, nvfp4=None) -> PatchReport:
    """Patch a timm ``VisionTransformer`` in place; returns a :class:`PatchReport`.

    ``tome_r`` (ToMe's ``r``: int, per-block list, or ``(r, inflect)``; change it later through
    ``model.tome_r``) applies ToMe as ``tome.patch.timm`` does. ``nvfp4`` (True or a
    ``vlcore.nvfp4.NVFP4Policy``) converts the blocks' linear layers with ``vlcore.nvfp4.convert``.
    """
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    check_attention_op()
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"patch_timm: expected a timm VisionTransformer, got {type(model).__name__}")
    report = PatchReport("timm")
    for i, block in enumerate(model.blocks):
        name = f"blocks.{i}.attn"
        attn = getattr(block, "attn", None)
        if type(attn) is Attention or isinstance(attn, _VlcoreTimmAttention):
            swap_class(attn, patched_subclass(type(attn), _VlcoreTimmAttention))
            report.attention.append(name)
        else:
            report.leave(name, f"{type(attn).__name__} (rotary, relative-position or other attention variants "
                               "are not timm's plain Attention)")
    if getattr(model, "attn_pool", None) is not None:
        report.leave("attn_pool", "attention pooling head: learned queries, left to torch")

    if tome_r is not None:
        if model.num_prefix_tokens > int(model.cls_token is not None):
            raise ValueError("patch_timm: ToMe protects only a class token; this model has register / distillation "
                             f"tokens ({model.num_prefix_tokens} prefix tokens)")
        if len(report.attention) != len(model.blocks) or not all(isinstance(b, Block) for b in model.blocks):
            raise ValueError("patch_timm: tome_r needs timm's Block with a patched Attention in every block")
        num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        schedule = tome_schedule(len(model.blocks), tome_r, num_tokens, model.num_prefix_tokens, "patch_timm")
        for block in model.blocks:
            swap_class(block, patched_subclass(type(block), _VlcoreToMeTimmBlock))
        swap_class(model, patched_subclass(type(model), _VlcoreToMeVisionTransformer))
        model.tome_r = tome_r
        report.tome["blocks"] = schedule
        if model.global_pool == "avg":
            report.leave("pool", "global_pool='avg' averages merged tokens unweighted, as tome.patch.timm does")

    if nvfp4:
        report.nvfp4 = apply_nvfp4(model, nvfp4, "blocks")
    return report
