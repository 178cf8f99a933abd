"""The one place where :mod:`vlcore.nn` and :mod:`vlcore.models` call the ops. Every function here only
dispatches on ``impl``:

- ``"vlcore"``: the op in :mod:`vlcore.ops` (C++ on CPU, CUDA kernels on GPU);
- ``"torch"``: the op family's own plain-PyTorch reference (``vlcore.ops.<family>.*_ref``), run in the
  model's dtype. Attention is the one exception: its torch path is PyTorch's SDPA with the op's semantics
  (:mod:`vlcore.nn.sdpa`), because the per-segment reference loop syncs with the host.

So every algorithm is written once in Python (the reference, which the op tests also score against, in
float64) and once per backend in C++/CUDA; ``impl="torch"`` and ``impl="vlcore"`` compute the same thing.
The ops are looked up on :mod:`vlcore.ops` at call time, so a test can stand in for one with ``monkeypatch``.
"""

from __future__ import annotations

import warnings
from typing import Literal, Optional, Sequence

import torch

import vlcore.ops
from vlcore.nn.sdpa import sdpa_attention
from vlcore.ops.seq_pack import scatter_image_embeds_ref
from vlcore.ops.token_grid import (patch_merge_2x2_ref, patch_merge_2x2_varlen_ref, token_pool_2d_ref,
                                   token_pool_2d_varlen_ref)
from vlcore.ops.tome import tome_match_ref, tome_merge_ref

Impl = Literal["vlcore", "torch"]
IMPLS = ("vlcore", "torch")


def check_impl(impl: str, where: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl must be 'vlcore' or 'torch', got {impl!r}")


def _is_vlcore(impl: str, where: str) -> bool:
    check_impl(impl, f"vlcore.nn.backend.{where}")
    return impl == "vlcore"


# ---------------------------------------------------------------------------------------------------------
# Attention (docs/attention.md)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
              max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
              causal: bool = False, scale: Optional[float] = None, key_bias: Optional[torch.Tensor] = None,
              key_lengths: Optional[torch.Tensor] = None, kv_segment: Optional[torch.Tensor] = None,
              impl: Impl = "torch") -> torch.Tensor:
    """Softmax attention, dense or packed, with grouped K/V heads (:func:`vlcore.ops.attention`).

    Dense: q ``[B, Lq, Hq, D]``, k/v ``[B, Lk, Hkv, D]``; ``key_lengths`` int32 ``[B]`` masks keys
    ``>= key_lengths[b]``; ``key_bias`` ``[B, Lk]`` or ``[B, Lk, Hq]`` is added to the logits.
    Packed: q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, int32 ``cu_seqlens_q [Sq+1]`` /
    ``cu_seqlens_k [Sk+1]``; query segment i attends to key segment ``kv_segment[i]`` (default i, then
    Sq == Sk); ``key_bias`` ``[total_k]`` or ``[total_k, Hq]``.
    ``Hq`` must be a multiple of ``Hkv``. ``causal`` aligns the mask bottom-right. Returns q's shape.
    """
    fn = vlcore.ops.attention if _is_vlcore(impl, "attention") else sdpa_attention
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, scale=scale,
              key_bias=key_bias, key_lengths=key_lengths, kv_segment=kv_segment)


def shared_context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_index: torch.Tensor, *,
                             context_lengths: Optional[torch.Tensor] = None, impl: Impl = "torch") -> torch.Tensor:
    """Dense attention where query row ``b`` (q ``[B, Lq, Hq, D]``) reads the keys and values of context row
    ``context_index[b]`` (k/v ``[Bc, Lk, Hkv, D]``), the first ``context_lengths[context_index[b]]`` of them.

    ``"vlcore"`` reads each context row in place (the packed form's ``kv_segment``, one segment per row);
    ``"torch"`` gathers a copy of K/V per query row and runs the dense form. Both only arrange layouts.
    """
    if not _is_vlcore(impl, "shared_context_attention"):
        lengths = None if context_lengths is None else context_lengths[context_index]
        return sdpa_attention(q, k[context_index], v[context_index], key_lengths=lengths)
    batch, len_q = q.shape[:2]
    num_context, len_k = k.shape[:2]
    cu_q = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * len_q
    cu_k = torch.arange(num_context + 1, device=q.device, dtype=torch.int32) * len_k
    segment = context_index.to(torch.int32)
    lengths = None if context_lengths is None else context_lengths[context_index].to(torch.int32)
    out = vlcore.ops.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, len_q, len_k,
                               kv_segment=segment, key_lengths=lengths)
    return out.unflatten(0, (batch, len_q))


# ---------------------------------------------------------------------------------------------------------
# Token merging (ToMe, docs/tome.md)


def tome_match(metric: torch.Tensor, r: int, *, class_token: bool = False, distill_token: bool = False,
               impl: Impl = "torch"):
    """Bipartite soft matching of ``metric [B, N, c]`` (keys averaged over heads): which ``r`` tokens merge
    into which, ``r`` capped at ``(N - protected) // 2``. The result is opaque; give it to :func:`tome_merge`
    with the same ``impl``. The torch reference scores in the metric's dtype, like ToMe."""
    if _is_vlcore(impl, "tome_match"):
        return vlcore.ops.tome_match(metric, r, class_token=class_token, distill_token=distill_token)
    return tome_match_ref(metric, r, class_token=class_token, distill_token=distill_token, compute_dtype=metric.dtype)


def tome_merge(x: torch.Tensor, match, *, size: Optional[torch.Tensor] = None,
               impl: Impl = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge (ToMe's ``merge_wavg``): ``x [B, N, C] -> [B, N - r, C]`` ordered
    ``[unmerged A tokens, all B tokens]``; ``size [B, N, 1]`` (ones when None) counts the patches behind
    each token and is returned merged."""
    fn = vlcore.ops.tome_merge if _is_vlcore(impl, "tome_merge") else tome_merge_ref
    return fn(x, match, size=size, mode="wavg")


# ---------------------------------------------------------------------------------------------------------
# Packing (docs/packing.md)


def scatter_image_embeds(text_embeds: torch.Tensor, image_embeds: torch.Tensor, image_positions: torch.Tensor,
                         *, impl: Impl = "torch") -> torch.Tensor:
    """``text_embeds [T, C]`` with rows ``image_positions [N]`` replaced by ``image_embeds [N, C]``."""
    fn = vlcore.ops.scatter_image_embeds if _is_vlcore(impl, "scatter_image_embeds") else scatter_image_embeds_ref
    return fn(text_embeds, image_embeds, image_positions)


# ---------------------------------------------------------------------------------------------------------
# Token grids: pooling and the 2x2 merger (docs/token_grid.md)


def token_pool_2d(x: torch.Tensor, grid_hw: Sequence[int], *, output_hw: Optional[Sequence[int]] = None,
                  stride: Optional[int] = None, mode: str = "avg", impl: Impl = "torch") -> torch.Tensor:
    """Pool a token grid ``x [B, H*W, C]`` (row-major) to ``[B, H'*W', C]``: ``mode="avg"`` is adaptive
    average pooling to ``output_hw`` (or ``ceil(H/stride)`` x ``ceil(W/stride)``), ``"bilinear"`` is
    ``F.interpolate`` (align_corners=False)."""
    if _is_vlcore(impl, "token_pool_2d"):
        return vlcore.ops.token_pool_2d(x, grid_hw, output_hw=output_hw, stride=stride, mode=mode)
    return token_pool_2d_ref(x, grid_hw, output_hw, mode, stride=stride)


def token_pool_2d_varlen(x: torch.Tensor, grids: Sequence[Sequence[int]], *, output_hw=None,
                         stride: Optional[int] = None, mode: str = "avg", impl: Impl = "torch") -> tuple[torch.Tensor, list]:
    """Packed grids ``x [T, C]`` (images of ``grids[b] = (h, w)`` tokens) pooled image by image; returns the
    packed pooled tokens and their grids."""
    fn = vlcore.ops.token_pool_2d_varlen if _is_vlcore(impl, "token_pool_2d_varlen") else token_pool_2d_varlen_ref
    return fn(x, grids, output_hw=output_hw, stride=stride, mode=mode)


def patch_merge_2x2(x: torch.Tensor, grid_hw: Sequence[int], *, impl: Impl = "torch") -> torch.Tensor:
    """Qwen2-VL's 2x2 merger layout: ``x [B, H*W, C] -> [B, (H/2)*(W/2), 4C]``, each output row the
    concatenation of a 2x2 cell's tokens in row-major order (H and W even)."""
    fn = vlcore.ops.patch_merge_2x2 if _is_vlcore(impl, "patch_merge_2x2") else patch_merge_2x2_ref
    return fn(x, grid_hw)


def patch_merge_2x2_varlen(x: torch.Tensor, grids: Sequence[Sequence[int]], *, impl: Impl = "torch") -> torch.Tensor:
    """The 2x2 merger on packed grids: ``x [T, C] -> [T / 4, 4C]``."""
    fn = vlcore.ops.patch_merge_2x2_varlen if _is_vlcore(impl, "patch_merge_2x2_varlen") else patch_merge_2x2_varlen_ref
    return fn(x, grids)


# ---------------------------------------------------------------------------------------------------------
# Names that moved: they still resolve, with a DeprecationWarning.


def _has_op(name: str) -> bool:
    return hasattr(vlcore.ops, name)


def _deprecated():
    from vlcore.nn.tome import parse_r
    from vlcore.ops.tome import TomeMatchRef

    return {
        "parse_r": (parse_r, "vlcore.nn.tome.parse_r"),
        "TorchTomeMatch": (TomeMatchRef, "vlcore.ops.tome.TomeMatchRef"),
        "has_op": (_has_op, "hasattr(vlcore.ops, name); every build has every op"),
    }


def __getattr__(name: str):
    moved = _deprecated()
    if name in moved:
        value, instead = moved[name]
        warnings.warn(f"vlcore.nn.backend.{name} is deprecated: use {instead}", DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module 'vlcore.nn.backend' has no attribute {name!r}")
