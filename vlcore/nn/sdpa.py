"""Attention for ``impl="torch"``: PyTorch's ``scaled_dot_product_attention`` with the semantics of
:func:`vlcore.ops.attention` (docs/attention.md): flash-attn varlen packing, grouped K/V heads, bottom-right
causal masks, an additive per-key bias, and 0 for a query row that sees no key.

This is not a second reference of the op (that is :func:`vlcore.ops.attention.attention_ref`, a per-segment
loop that reads the segment table on the host). It is PyTorch's own attention kernel behind a mask, so the
models train with ``impl="torch"`` at PyTorch's speed and without host syncs: the dense form without mask
takes SDPA's fused path (flash / memory-efficient kernels on GPU); every other form builds one boolean mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["sdpa_attention"]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor] = None,
                   cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                   max_seqlen_k: Optional[int] = None, *, causal: bool = False, scale: Optional[float] = None,
                   key_bias: Optional[torch.Tensor] = None, key_lengths: Optional[torch.Tensor] = None,
                   kv_segment: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The arguments and layouts of :func:`vlcore.ops.attention` (dense when ``cu_seqlens_q`` is None).
    ``max_seqlen_*`` are accepted for the same call signature; the mask does not need them."""
    if cu_seqlens_q is None:
        return _dense(q, k, v, causal=causal, scale=scale, key_bias=key_bias, key_lengths=key_lengths)
    return _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, key_bias=key_bias,
                   key_lengths=key_lengths, kv_segment=kv_segment)


def _dense(q, k, v, *, causal, scale, key_bias, key_lengths):
    batch, len_q, heads_q, _ = q.shape
    len_k, heads_k = k.shape[1], k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    if key_bias is None and key_lengths is None and (not causal or len_q == len_k):
        # SDPA's own causal mask is top-left aligned, which equals bottom-right only for square masks.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=heads_q != heads_k)
        return out.transpose(1, 2)
    allowed = torch.ones(batch, 1, len_q, len_k, dtype=torch.bool, device=q.device)
    if key_lengths is not None:
        allowed = allowed & (torch.arange(len_k, device=q.device) < key_lengths.view(batch, 1, 1, 1))
    if causal:
        allowed = allowed & _bottom_right_causal(len_q, len_k, q.device)
    bias = torch.zeros((), dtype=q.dtype, device=q.device)
    if key_bias is not None:
        bias = (key_bias.unsqueeze(-1) if key_bias.dim() == 2 else key_bias).permute(0, 2, 1).unsqueeze(2)
    mask = torch.where(allowed, bias.to(q.dtype), torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
    return _masked_sdpa(q, k, v, mask, allowed, scale).transpose(1, 2)


def _bottom_right_causal(len_q: int, len_k: int, device) -> torch.Tensor:
    rows = torch.arange(len_q, device=device).unsqueeze(1) + (len_k - len_q)
    return torch.arange(len_k, device=device).unsqueeze(0) <= rows


def _masked_sdpa(q, k, v, mask, allowed, scale):
    """SDPA with an additive mask; query rows with no allowed key give 0 (flash-attn's convention)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[-3] != k.shape[-3])
    any_key = allowed.any(-1, keepdim=True)
    return torch.where(any_key, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, scale, key_bias, key_lengths, kv_segment):
    # One [total_q, total_k] mask: quadratic in the packed length, which is what a reference path can afford.
    seg_q, pos_q, len_q = _segment_coords(cu_seqlens_q, q.shape[0])
    seg_k, pos_k, len_k = _segment_coords(cu_seqlens_k, k.shape[0])
    target = seg_q if kv_segment is None else kv_segment.long()[seg_q]
    allowed = target.unsqueeze(1) == seg_k.unsqueeze(0)
    if key_lengths is not None:  # query segment i reads the first key_lengths[i] keys of its key segment
        allowed = allowed & (pos_k.unsqueeze(0) < key_lengths.long()[seg_q].unsqueeze(1))
    if causal:
        # bottom-right: query i of a length-lq segment sees keys j <= i + (lk - lq) of its key segment
        shift = len_k[target] - len_q[seg_q]
        allowed = allowed & (pos_k.unsqueeze(0) <= (pos_q + shift).unsqueeze(1))
    bias = torch.zeros((), dtype=q.dtype, device=q.device)
    if key_bias is not None:
        bias = (key_bias.unsqueeze(-1) if key_bias.dim() == 1 else key_bias).t().unsqueeze(1)  # [Hq, 1, total_k]
    mask = torch.where(allowed, bias.to(q.dtype), torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
    out = _masked_sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, allowed, scale)
    return out.transpose(0, 1)


def _segment_coords(cu_seqlens: torch.Tensor, total: int):
    """(segment id, position in segment) of every row, and every segment's length."""
    cu = cu_seqlens.long()
    lengths = cu.diff()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    return seg, torch.arange(total, device=cu.device) - cu[seg], lengths
