"""The one place where ``vlcore.nn`` and ``vlcore.models`` call vlcore's kernels.

Every function takes ``impl``: ``"vlcore"`` uses the vlcore op when this build has it
(``hasattr(vlcore.ops, name)``) and the plain-PyTorch path below otherwise; ``"torch"`` always uses plain
PyTorch. The torch paths are the readable references the models are tested with, and they compute the same
thing as the ops (same layouts, same conventions: flash-attn varlen packing, bottom-right causal masks,
fully masked query rows give 0, ToMe's bipartite soft matching of vlp.md §2).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F

import vlcore

Impl = Literal["vlcore", "torch"]
IMPLS = ("vlcore", "torch")


def check_impl(impl: str, where: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl must be 'vlcore' or 'torch', got {impl!r}")


def has_op(name: str) -> bool:
    """Whether this vlcore build provides ``vlcore.ops.<name>``."""
    return hasattr(vlcore.ops, name)


def _use_vlcore(impl: str, name: str) -> bool:
    return impl == "vlcore" and has_op(name)


# ---------------------------------------------------------------------------------------------------------
# Attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
              max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
              causal: bool = False, scale: Optional[float] = None, key_bias: Optional[torch.Tensor] = None,
              key_lengths: Optional[torch.Tensor] = None, kv_segment: Optional[torch.Tensor] = None,
              impl: Impl = "torch") -> torch.Tensor:
    """Softmax attention, dense or packed, with grouped K/V heads.

    Dense: q ``[B, Lq, Hq, D]``, k/v ``[B, Lk, Hkv, D]``; ``key_lengths`` int32 ``[B]`` masks keys
    ``>= key_lengths[b]``; ``key_bias`` ``[B, Lk]`` or ``[B, Lk, Hq]`` is added to the logits.
    Packed: q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, int32 ``cu_seqlens_q [Sq+1]`` /
    ``cu_seqlens_k [Sk+1]``; query segment i attends to key segment ``kv_segment[i]`` (default i, then
    Sq == Sk); ``key_bias`` ``[total_k]`` or ``[total_k, Hq]``.
    ``Hq`` must be a multiple of ``Hkv``. ``causal`` aligns the mask bottom-right. Returns q's shape.
    """
    if _use_vlcore(impl, "attention"):
        kwargs = dict(causal=causal, scale=scale, key_bias=key_bias)
        if cu_seqlens_q is None and key_bias is not None:
            return _dense_as_packed_vlcore(q, k, v, key_lengths=key_lengths, **kwargs)
        if cu_seqlens_q is None:
            if key_lengths is not None:
                kwargs["key_lengths"] = key_lengths
            return vlcore.ops.attention(q, k, v, **kwargs)
        return vlcore.ops.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    kv_segment=kv_segment, **kwargs)
    if cu_seqlens_q is None:
        return _dense_attention_torch(q, k, v, causal=causal, scale=scale, key_bias=key_bias, key_lengths=key_lengths)
    return _packed_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                   key_bias=key_bias, kv_segment=kv_segment)


def _dense_as_packed_vlcore(q, k, v, *, key_lengths, key_bias, **kwargs):
    # The op takes key_bias in the packed layout: view the dense batch as equal-length segments.
    batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
    steps = torch.arange(batch + 1, device=q.device, dtype=torch.int32)
    if key_lengths is not None:
        padded = torch.arange(len_k, device=q.device) >= key_lengths.view(batch, 1)
        padded = padded.view(batch, len_k, *([1] * (key_bias.dim() - 2)))
        key_bias = key_bias.masked_fill(padded, float("-inf"))
    out = vlcore.ops.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), steps * len_q, steps * len_k,
                               len_q, len_k, key_bias=key_bias.flatten(0, 1), **kwargs)
    return out.unflatten(0, (batch, len_q))


def _dense_attention_torch(q, k, v, *, causal, scale, key_bias, key_lengths):
    batch, len_q, heads_q, _ = q.shape
    len_k, heads_k = k.shape[1], k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    if key_bias is None and key_lengths is None and (not causal or len_q == len_k):
        # The fast path (flash / memory-efficient SDPA kernels on GPU): no additive mask needed.
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


def _packed_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, scale, key_bias, kv_segment):
    # One [total_q, total_k] mask: the plainest statement of the varlen semantics (the reference path).
    seg_q, pos_q, len_q = _segment_coords(cu_seqlens_q, q.shape[0])
    seg_k, pos_k, len_k = _segment_coords(cu_seqlens_k, k.shape[0])
    target = seg_q if kv_segment is None else kv_segment.long()[seg_q]
    allowed = target.unsqueeze(1) == seg_k.unsqueeze(0)
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


# ---------------------------------------------------------------------------------------------------------
# Token merging (ToMe, vlp.md §2)


class TorchTomeMatch(NamedTuple):
    """The plain-PyTorch matching: indices into the A (even) / B (odd) halves, each ``[B, *, 1]`` int64."""

    unmerged: torch.Tensor  # A tokens kept, [B, N_a - r, 1], ascending when a class token is protected
    src: torch.Tensor  # A tokens merged away, [B, r, 1]
    dst: torch.Tensor  # the B token each src merges into, [B, r, 1]


def tome_match(metric: torch.Tensor, r: int, *, class_token: bool = False, distill_token: bool = False,
               impl: Impl = "torch"):
    """Bipartite soft matching of ``metric [B, N, c]`` (keys averaged over heads): which ``r`` tokens merge
    into which. ``r`` is clamped to ``(N - protected) // 2`` (None when that leaves nothing to merge).
    The result is opaque; give it to :func:`tome_merge` with the same ``impl``."""
    if _use_vlcore(impl, "tome_match"):
        return vlcore.ops.tome_match(metric, r, class_token=class_token, distill_token=distill_token)
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return None  # nothing to merge: the tokens stay as they are, in their order
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unmerged, src = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst = node_idx[..., None].gather(dim=-2, index=src)
        if class_token:
            unmerged = unmerged.sort(dim=1).values  # keeps the class token at index 0
    return TorchTomeMatch(unmerged, src, dst)


def tome_merge(x: torch.Tensor, match, *, size: Optional[torch.Tensor] = None,
               impl: Impl = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge (ToMe's ``merge_wavg``): ``x [B, N, C] -> [B, N - r, C]`` ordered
    ``[unmerged A tokens, all B tokens]``; ``size [B, N, 1]`` (ones when None) counts the patches behind
    each token and is returned merged."""
    if _use_vlcore(impl, "tome_merge"):
        return vlcore.ops.tome_merge(x, match, size=size, mode="wavg")
    if size is None:
        size = torch.ones_like(x[..., :1])
    if match is None:
        return x, size
    weighted = _tome_merge_sum(x * size, match)
    size = _tome_merge_sum(size, match)
    return weighted / size, size


def _tome_merge_sum(x: torch.Tensor, match: TorchTomeMatch) -> torch.Tensor:
    a, b = x[..., ::2, :], x[..., 1::2, :]
    channels = x.shape[-1]
    unmerged = a.gather(dim=-2, index=match.unmerged.expand(-1, -1, channels))
    src = a.gather(dim=-2, index=match.src.expand(-1, -1, channels))
    b = b.scatter_reduce(-2, match.dst.expand(-1, -1, channels), src, reduce="sum")
    return torch.cat([unmerged, b], dim=1)


def parse_r(num_layers: int, r) -> list[int]:
    """Tokens to merge per layer (ToMe's ``parse_r``): an int (constant), a list (padded with 0), or
    ``(r, inflect)``: linear from ``first = int(r (1 - inflect))`` at the first layer to ``2r - first`` at the
    last, so ``(r, -1)`` is 2r at the first layer and 0 at the last."""
    try:
        from vlcore.nn.tome import parse_r as vlcore_parse_r
    except ImportError:
        vlcore_parse_r = None
    if vlcore_parse_r is not None:
        return vlcore_parse_r(num_layers, r)
    if isinstance(r, list):
        return list(r) + [0] * (num_layers - len(r))
    r, inflect = r if isinstance(r, tuple) else (r, 0.0)
    first = int(r * (1.0 - inflect))
    step = (2 * r - 2 * first) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(first + step * i) for i in range(num_layers)]


# ---------------------------------------------------------------------------------------------------------
# Packing (vlcore.ops.seq_pack, on main)


def scatter_image_embeds(text_embeds: torch.Tensor, image_embeds: torch.Tensor, image_positions: torch.Tensor,
                         *, impl: Impl = "torch") -> torch.Tensor:
    """``text_embeds [T, C]`` with rows ``image_positions [N]`` replaced by ``image_embeds [N, C]``."""
    if _use_vlcore(impl, "scatter_image_embeds"):
        return vlcore.ops.scatter_image_embeds(text_embeds, image_embeds, image_positions)
    return text_embeds.index_put((image_positions.long(),), image_embeds)


# ---------------------------------------------------------------------------------------------------------
# Pooling connectors (vlp.md §3)


def token_pool_2d(x: torch.Tensor, grid_hw: tuple[int, int], *, output_hw: Optional[tuple[int, int]] = None,
                  stride: Optional[int] = None, mode: str = "avg", impl: Impl = "torch") -> torch.Tensor:
    """Pool a token grid ``x [B, H*W, C]`` (row-major) to ``[B, H'*W', C]``: ``mode="avg"`` is adaptive
    average pooling to ``output_hw`` (or ``ceil(H/stride)`` x ``ceil(W/stride)``), ``"bilinear"`` is
    ``F.interpolate`` (align_corners=False)."""
    if _use_vlcore(impl, "token_pool_2d"):
        return vlcore.ops.token_pool_2d(x, grid_hw, output_hw=output_hw, stride=stride, mode=mode)
    height, width = grid_hw
    if output_hw is None:
        output_hw = (math.ceil(height / stride), math.ceil(width / stride))
    grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
    if mode == "avg":
        pooled = F.adaptive_avg_pool2d(grid, output_hw)
    elif mode == "bilinear":
        pooled = F.interpolate(grid, size=output_hw, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"token_pool_2d: mode must be 'avg' or 'bilinear', got {mode!r}")
    return pooled.flatten(2).transpose(1, 2)


def patch_merge_2x2(x: torch.Tensor, grid_hw: tuple[int, int], *, impl: Impl = "torch") -> torch.Tensor:
    """Qwen2-VL's 2x2 merger layout: ``x [B, H*W, C] -> [B, (H/2)*(W/2), 4C]``, each output row the
    concatenation of a 2x2 cell's tokens in row-major order (H and W even)."""
    if _use_vlcore(impl, "patch_merge_2x2"):
        return vlcore.ops.patch_merge_2x2(x, grid_hw)
    height, width = grid_hw
    batch, _, channels = x.shape
    cells = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 2, 4, 5)
    return cells.reshape(batch, (height // 2) * (width // 2), 4 * channels)
