"""Multi-head attention modules: self-attention (fused qkv projection) and gated cross-attention.

Both run on dense ``[B, L, C]`` or packed ``[T, C]`` tokens (flash-attn varlen layout with int32
``cu_seqlens``), support grouped K/V heads (GQA: ``num_kv_heads`` dividing ``num_heads``) and an additive
per-key bias (ToMe's proportional attention adds ``log(size)``). Every projection is a plain ``nn.Linear`` so
that ``vlcore.nvfp4.convert`` can swap it. The kernel call goes through :mod:`vlcore.nn.backend`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlcore.nn import backend
from vlcore.nn.backend import Impl


def check_heads(dim: int, num_heads: int, num_kv_heads: Optional[int], where: str) -> int:
    """Validate a head layout at construction time; returns the number of K/V heads."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads <= 0 or dim % num_heads:
        raise ValueError(f"{where}: num_heads ({num_heads}) must be positive and divide the width ({dim})")
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"{where}: num_kv_heads ({num_kv_heads}) must be positive and divide num_heads ({num_heads})")
    return num_kv_heads


class KVCache:
    """Preallocated keys and values of one attention layer for incremental decoding, ``[B, L_max, Hkv, D]``."""

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, dtype, device):
        self.k = torch.empty(batch, max_len, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        if end > self.k.shape[1]:
            raise ValueError(f"KVCache: {end} positions exceed the cache's max_len {self.k.shape[1]}")
        self.k[:, self.length:end] = k
        self.v[:, self.length:end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


class SelfAttention(nn.Module):
    """``out(Attn(q, k, v))`` with ``[q; k; v] = qkv(x)``; causal or bidirectional.

    Dense ``x [B, L, C]`` (optional ``key_lengths`` int32 ``[B]``, ``key_bias [B, L]``, ``kv_cache``) or
    packed ``x [T, C]`` with ``cu_seqlens`` / ``max_seqlen``. ``return_keys=True`` also returns the keys
    averaged over heads, ``[..., L, D]`` (ToMe's similarity metric).
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None, causal: bool = False,
                 qkv_bias: bool = True, impl: Impl = "torch"):
        super().__init__()
        backend.check_impl(impl, "SelfAttention")
        self.num_kv_heads = check_heads(dim, num_heads, num_kv_heads, "SelfAttention")
        self.num_heads, self.head_dim, self.causal, self.impl = num_heads, dim // num_heads, causal, impl
        self.qkv = nn.Linear(dim, (num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, key_lengths: Optional[torch.Tensor] = None,
                key_bias: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, kv_cache: Optional[KVCache] = None, return_keys: bool = False):
        q_heads, kv_heads = self.num_heads, self.num_kv_heads
        q, k, v = self.qkv(x).unflatten(-1, (q_heads + 2 * kv_heads, self.head_dim)).split(
            [q_heads, kv_heads, kv_heads], dim=-2)
        keys = k
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        y = backend.attention(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                              max_seqlen_k=max_seqlen, causal=self.causal, key_bias=key_bias,
                              key_lengths=key_lengths, impl=self.impl)
        y = self.out(y.flatten(-2))
        return (y, keys.mean(dim=-2)) if return_keys else y


class CrossAttention(nn.Module):
    """``out(Attn(q(x), kv(context)))``, optionally gated: ``alpha * ...`` with a scalar ``alpha``
    initialised to 0 (FIBER), so that a freshly built fusion block leaves its input unchanged.

    ``x [B, Lq, C]`` queries, ``context [Bc, Lk, C_ctx]``. Batch row i reads context row
    ``context_index[i]`` (default i; ITM hard negatives): K/V are projected once per context row, then
    :func:`vlcore.nn.backend.shared_context_attention` shares them (vlcore) or gathers copies (torch).
    ``context_lengths`` int32 ``[Bc]`` masks padded context tokens.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 gated: bool = False, qkv_bias: bool = True, impl: Impl = "torch"):
        super().__init__()
        backend.check_impl(impl, "CrossAttention")
        self.num_kv_heads = check_heads(dim, num_heads, num_kv_heads, "CrossAttention")
        self.num_heads, self.head_dim, self.impl = num_heads, dim // num_heads, impl
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, x: torch.Tensor, context: torch.Tensor, *, context_lengths: Optional[torch.Tensor] = None,
                context_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim))
        k, v = self.kv(context).unflatten(-1, (2 * self.num_kv_heads, self.head_dim)).chunk(2, dim=-2)
        if context_index is None:
            y = backend.attention(q, k, v, key_lengths=context_lengths, impl=self.impl)
        else:
            y = backend.shared_context_attention(q, k, v, context_index, context_lengths=context_lengths,
                                                 impl=self.impl)
        y = self.out(y.flatten(-2))
        return y if self.alpha is None else self.alpha.to(y.dtype) * y
