"""``patch_open_clip``: vlcore's attention (and optionally ToMe and NVFP4) inside an open_clip ``CLIP``.

open_clip's blocks (``ResidualAttentionBlock``) hold a ``nn.MultiheadAttention``, its
``CustomResidualAttentionBlock`` open_clip's own ``Attention``. Each such module gets, in place, a subclass of
its own class whose forward runs ``vlcore.ops.attention`` (``swap_class``): the parameters are the same
objects, so the state dict keeps every key, and whatever call the patched path does not cover (attention
weights asked for, a key-padding or arbitrary mask, attention dropout while training) goes to the original
forward unchanged. The text tower's mask is open_clip's causal buffer: it is checked once at patch time and
then becomes the op's ``causal=True`` instead of an ``[L, L]`` additive mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.integrations._common import (PatchReport, apply_nvfp4, check_attention_op, dense_attention,
                                         patched_subclass, run_tome_blocks, size_bias, swap_class, tome_merge_step,
                                         tome_schedule)


class _VlcoreMultiheadAttention:
    """Mixin over ``nn.MultiheadAttention`` (batch-first self-attention with one packed ``in_proj``)."""

    _vlcore_causal: bool = False  # set on the text tower's modules: a 2D attn_mask there is the causal mask

    def attend(self, x: torch.Tensor, *, causal: bool = False, key_bias: Optional[torch.Tensor] = None,
               return_keys: bool = False):
        """``x [B, L, C]`` -> ``[B, L, C]``; with ``return_keys`` also the keys averaged over heads (ToMe's metric)."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        y = self.out_proj(dense_attention(q, k, v, causal=causal, key_bias=key_bias).flatten(-2))
        return (y, k.mean(dim=2)) if return_keys else y

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        causal_mask = attn_mask is not None and self._vlcore_causal and attn_mask.dim() == 2
        covered = (query is key and key is value and key_padding_mask is None and not need_weights
                   and (attn_mask is None or causal_mask) and (self.dropout == 0.0 or not self.training))
        if not covered:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        y = self.attend(x, causal=causal_mask or is_causal)
        return (y if self.batch_first else y.transpose(0, 1)), None


class _VlcoreOpenClipAttention:
    """Mixin over open_clip's ``Attention`` (``in_proj_weight``, optional q/k norms, head scale, inner norm)."""

    _vlcore_causal: bool = False

    def attend(self, x: torch.Tensor, *, causal: bool = False, key_bias: Optional[torch.Tensor] = None,
               return_keys: bool = False):
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        # ln_q / ln_k normalise each head's vector, so the [B, L, H, D] layout is as good as open_clip's [B, H, L, D]
        q, k = self.ln_q(q), self.ln_k(k)
        y = dense_attention(q, k, v, causal=causal, key_bias=key_bias)
        if self.head_scale is not None:  # [H, 1, 1] in open_clip's layout -> [H, 1] here
            y = y * self.head_scale.view(self.num_heads, 1)
        y = self.out_drop(self.out_proj(self.ln_inner(y.flatten(-2))))
        return (y, k.mean(dim=2)) if return_keys else y

    def forward(self, x, attn_mask=None):
        causal_mask = attn_mask is not None and self._vlcore_causal and attn_mask.dim() == 2
        if (attn_mask is not None and not causal_mask) or (self.attn_drop.p > 0 and self.training):
            return super().forward(x, attn_mask=attn_mask)
        return self.attend(x, causal=causal_mask)


class _VlcoreToMeBlock:
    """Mixin over open_clip's residual blocks: ToMe's merge between the attention and the MLP, the attention
    seeing ``log(size)`` on every key (proportional attention)."""

    def forward_tome(self, x: torch.Tensor, size: Optional[torch.Tensor], r: int, class_token: bool):
        a, metric = self.attn.attend(self.ln_1(x), key_bias=size_bias(size), return_keys=True)
        x = x + self.ls_1(getattr(self, "ln_attn", nn.Identity())(a))
        x, size = tome_merge_step(x, metric, size, r, class_token=class_token)
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x, size


class _VlcoreToMeTransformer:
    """Mixin over open_clip's ``Transformer`` of the image tower: blocks with ToMe's schedule. The schedule is
    ``self.tome_r`` (ToMe's ``r``: an int, a list, or ``(r, inflect)``), read at every forward like ToMe's."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
        if attn_mask is not None:
            raise ValueError("open_clip image tower with ToMe: an attn_mask cannot follow merged tokens")
        if not self.batch_first:
            x = x.transpose(0, 1)
        schedule = tome_schedule(len(self.resblocks), self.tome_r, x.shape[1], 1, "patch_open_clip")
        x = run_tome_blocks(self.resblocks, x, schedule, True, self.grad_checkpointing)
        return x if self.batch_first else x.transpose(0, 1)


def _is_causal_mask(mask: Optional[torch.Tensor]) -> bool:
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    n = mask.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    return bool((mask[upper] == float("-inf")).all() and (mask[~upper] == 0).all())


def _patch_attention(tower_name: str, transformer: nn.Module, causal: bool, report: PatchReport) -> list:
    from open_clip.transformer import Attention

    patched = []
    for i, block in enumerate(transformer.resblocks):
        name = f"{tower_name}.resblocks.{i}.attn"
        attn = getattr(block, "attn", None)
        if isinstance(attn, nn.MultiheadAttention):
            if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                report.leave(name, "nn.MultiheadAttention with separate k/v dims, bias_k/bias_v or add_zero_attn")
                continue
            if hasattr(block, "ln_1_kv"):
                report.leave(name, "cross-attention block (ln_1_kv)")
                continue
            swap_class(attn, patched_subclass(type(attn), _VlcoreMultiheadAttention))
            # NonDynamicallyQuantizableLinear is nn.Linear in all but name; a plain nn.Linear lets
            # vlcore.nvfp4.convert (which takes exact nn.Linear only) convert the output projection
            if type(attn.out_proj) is not nn.Linear and isinstance(attn.out_proj, nn.Linear):
                swap_class(attn.out_proj, nn.Linear)
        elif isinstance(attn, Attention):
            if attn.logit_scale is not None:
                report.leave(name, "scaled cosine attention (logits are not q k^T / sqrt(d))")
                continue
            swap_class(attn, patched_subclass(type(attn), _VlcoreOpenClipAttention))
        else:
            report.leave(name, f"attention type {type(attn).__name__} is not one open_clip's blocks use")
            continue
        attn._vlcore_causal = causal
        report.attention.append(name)
        patched.append(block)
    return patched


def patch_open_clip(model: nn.Module, *, tome_r=None, nvfp4=None) -> PatchReport:
    """Patch an open_clip ``CLIP`` / ``CustomTextCLIP`` in place; returns a :class:`PatchReport`.

    ``tome_r`` (ToMe's ``r``: int, per-block list, or ``(r, inflect)``, see ``vlcore.nn.tome.parse_r``) merges
    image tokens after each image block's attention, with proportional attention and the class token
    protected; it can be changed later through ``model.visual.transformer.tome_r``. ``nvfp4`` (True or a
    ``vlcore.nvfp4.NVFP4Policy``) converts the blocks' linear layers with ``vlcore.nvfp4.convert``.
    """
    check_attention_op()
    report = PatchReport("open_clip")
    visual = getattr(model, "visual", None)
    towers = []  # (name, transformer, causal)
    if visual is not None and hasattr(getattr(visual, "transformer", None), "resblocks"):
        towers.append(("visual.transformer", visual.transformer, False))
    elif visual is not None:
        report.leave("visual", f"image tower {type(visual).__name__} is not open_clip's VisionTransformer "
                               "(a timm trunk: patch it with vlcore.integrations.patch_timm)")
    text = getattr(model, "text", None)
    if text is not None and hasattr(getattr(text, "transformer", None), "resblocks"):
        towers.append(("text.transformer", text.transformer, _is_causal_mask(getattr(text, "attn_mask", None))))
    elif text is not None:
        report.leave("text", f"text tower {type(text).__name__} is not open_clip's TextTransformer")
    elif hasattr(getattr(model, "transformer", None), "resblocks"):
        towers.append(("transformer", model.transformer, _is_causal_mask(getattr(model, "attn_mask", None))))
    for name, transformer, causal in towers:
        _patch_attention(name, transformer, causal, report)
    if visual is not None and getattr(visual, "attn_pool", None) is not None:
        report.leave("visual.attn_pool", "attentional pooler: learned queries over the tokens, left to torch")

    if tome_r is not None:
        transformer = visual.transformer if towers and towers[0][0] == "visual.transformer" else None
        if transformer is None:
            raise ValueError("patch_open_clip: tome_r needs open_clip's VisionTransformer image tower")
        if not all(isinstance(b.attn, (_VlcoreMultiheadAttention, _VlcoreOpenClipAttention))
                   for b in transformer.resblocks):
            raise ValueError("patch_open_clip: tome_r needs every image block's attention patched; see the report")
        num_tokens = visual.grid_size[0] * visual.grid_size[1] + 1
        schedule = tome_schedule(len(transformer.resblocks), tome_r, num_tokens, 1, "patch_open_clip")
        for block in transformer.resblocks:
            swap_class(block, patched_subclass(type(block), _VlcoreToMeBlock))
        swap_class(transformer, patched_subclass(type(transformer), _VlcoreToMeTransformer))
        transformer.tome_r = tome_r
        report.tome["visual.transformer"] = schedule
        if getattr(visual, "pool_type", "tok") == "avg":
            report.leave("visual (pool)", "pool_type='avg' averages merged tokens unweighted, as ToMe's patches do")

    if nvfp4:
        report.nvfp4 = apply_nvfp4(model, nvfp4, "resblocks")
        if report.attention:
            report.leave("*.attn.in_proj_weight", "a packed parameter, not an nn.Linear: stays high precision")
    return report
