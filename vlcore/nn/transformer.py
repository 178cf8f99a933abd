"""Pre-LN transformer blocks, with the two optional pieces the VLP models need:

- **fusion** (FIBER, docs/models.md): a gated cross-attention on the self-attention output,
  ``A = SelfAttn(LN1(x)); A = A + alpha * CrossAttn(LN_q(A), LN_ctx(other)); x = x + A``, with ``alpha``
  initialised to 0 so a fused block starts as its unimodal self;
- **ToMe** (docs/tome.md): token merging between the attention and the MLP, on the attention's keys, with
  proportional attention (``+ log(size)`` on every key's logit).

Every linear layer is a plain ``nn.Linear`` (NVFP4-convertible).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlcore.nn import backend
from vlcore.nn.attention import CrossAttention, KVCache, SelfAttention
from vlcore.nn.backend import Impl

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation of OpenAI's CLIP weights (open_clip's ``-quickgelu``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``, ``dim -> hidden -> out_dim``."""

    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, dim if out_dim is None else out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One pre-LN transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    ``context_dim`` (not None) adds a cross-attention reading another tower's tokens: FIBER's, gated by a
    scalar initialised to 0 (``gated=True``), or BridgeTower's plain one (``gated=False``).
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, num_kv_heads: Optional[int] = None,
                 causal: bool = False, act: str = "gelu", norm_eps: float = 1e-5, qkv_bias: bool = True,
                 context_dim: Optional[int] = None, gated: bool = True, impl: Impl = "torch"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, num_kv_heads=num_kv_heads, causal=causal, qkv_bias=qkv_bias, impl=impl)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.cross = None
        if context_dim is not None:
            self.cross_norm = nn.LayerNorm(dim, eps=norm_eps)
            self.context_norm = nn.LayerNorm(context_dim, eps=norm_eps)
            self.cross = CrossAttention(dim, context_dim, num_heads, num_kv_heads=num_kv_heads, gated=gated,
                                        qkv_bias=qkv_bias, impl=impl)

    def forward(self, x: torch.Tensor, *, key_lengths: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                key_bias: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                context: Optional[torch.Tensor] = None,
                context_lengths: Optional[torch.Tensor] = None, context_index: Optional[torch.Tensor] = None,
                tome_r: int = 0, size: Optional[torch.Tensor] = None, class_token: bool = False):
        """Dense ``x [B, L, C]`` or packed ``x [T, C]`` (``cu_seqlens``). ``context [Bc, Lc, C_ctx]`` switches the
        fusion on (ignored by blocks without one). ``size [B, L, 1]`` is ToMe's token size: when given (or
        ``tome_r > 0``) the block returns ``(x, size)`` instead of ``x``; its ``log`` joins ``key_bias``
        (``[B, L_keys]``, additive on every query's logit for that key)."""
        tome = tome_r > 0 or size is not None
        if size is not None:
            key_bias = size.log()[..., 0] if key_bias is None else key_bias + size.log()[..., 0]
        a = self.attn(self.norm1(x), key_lengths=key_lengths, key_bias=key_bias, cu_seqlens=cu_seqlens,
                      max_seqlen=max_seqlen, kv_cache=kv_cache, return_keys=tome_r > 0)
        if tome_r > 0:
            a, metric = a
        if self.cross is not None and context is not None:
            a = a + self.cross(self.cross_norm(a), self.context_norm(context), context_lengths=context_lengths,
                               context_index=context_index)
        x = x + a
        if tome_r > 0:
            match = backend.tome_match(metric, tome_r, class_token=class_token, impl=self.attn.impl)
            x, size = backend.tome_merge(x, match, size=size, impl=self.attn.impl)
        x = x + self.mlp(self.norm2(x))
        return (x, size) if tome else x


def check_tome_schedule(num_tokens: int, schedule: list[int], class_token: bool, where: str) -> None:
    """Raise when a layer asks to merge more than half of its mergeable tokens (ToMe's bound)."""
    for layer, r in enumerate(schedule):
        limit = (num_tokens - int(class_token)) // 2
        if r < 0 or r > limit:
            raise ValueError(f"{where}: ToMe r = {r} at layer {layer} must be in [0, {limit}] "
                             f"(half of the {num_tokens - int(class_token)} mergeable tokens)")
        num_tokens -= r


__all__ = ["Block", "Mlp", "QuickGELU", "make_activation", "check_tome_schedule", "ACTIVATIONS"]
