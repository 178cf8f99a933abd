"""Text transformer: token embedding, learned positions, causal (CLIP, decoder LM) or bidirectional
(BERT/RoBERTa-style) pre-LN blocks, ``ln_final``, end-of-text / CLS pooling, projection, and an MLM head."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlcore.models.config import TextConfig
from vlcore.nn.backend import Impl
from vlcore.nn.transformer import Block, make_activation


class TextTransformer(nn.Module):
    """Tokens ``[B, L]`` int64 -> token states ``[B, L, width]`` and pooled, projected features.

    Bidirectional towers mask the right padding (``pad_id``) of each row; causal towers need no mask for
    pooling at the end-of-text token, which sees only real tokens (open_clip does the same).
    ``context_dim`` gives the top ``fusion_layers`` blocks FIBER's cross-attention.
    """

    def __init__(self, cfg: TextConfig, embed_dim: Optional[int], *, impl: Impl = "torch",
                 fusion_layers: int = 0, context_dim: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        first_fused = cfg.layers - fusion_layers
        self.blocks = nn.ModuleList([
            Block(width, cfg.heads, mlp_ratio=cfg.mlp_ratio, causal=cfg.causal, act=cfg.act, norm_eps=cfg.norm_eps,
                  context_dim=context_dim if i >= first_fused else None, impl=impl)
            for i in range(cfg.layers)])
        self.norm_final = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.proj = nn.Linear(width, embed_dim, bias=cfg.proj_bias) if embed_dim else None

    def key_lengths(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """int32 ``[B]`` real-token counts for a bidirectional tower (right padding), None for a causal one."""
        if self.cfg.causal:
            return None
        return (tokens != self.cfg.pad_id).sum(dim=1, dtype=torch.int32).clamp_min(1)

    def embed(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token + position embeddings; positions ``0..L-1`` of ``tokens [B, L]``, or ``position_ids`` (same
        shape as ``tokens``; packed sequences restart them per sample)."""
        if position_ids is None:
            if tokens.shape[-1] > self.cfg.context_length:
                raise ValueError(f"TextTransformer: {tokens.shape[-1]} tokens exceed context_length {self.cfg.context_length}")
            return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[-1]]
        return self.token_embedding(tokens) + self.positional_embedding[position_ids]

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """All blocks, no fusion: ``[B, L, width]`` after ``norm_final``."""
        x, lengths = self.embed(tokens), self.key_lengths(tokens)
        for block in self.blocks:
            x = block(x, key_lengths=lengths)
        return self.norm_final(x)

    def pool(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, width] -> [B, width]``: the end-of-text token (highest id, CLIP's argmax), the first or the last."""
        if self.cfg.pool == "argmax":
            return states[torch.arange(states.shape[0], device=states.device), tokens.argmax(dim=-1)]
        if self.cfg.pool == "first":
            return states[:, 0]
        if self.cfg.pool == "last":
            return states[:, -1]
        raise ValueError("TextTransformer: pool='none' towers have no pooled output")

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.proj is None else self.proj(pooled)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled, projected (not normalised) text features ``[B, embed_dim]``."""
        return self.project(self.pool(self.forward_tokens(tokens), tokens))


class MlmHead(nn.Module):
    """BERT's prediction head: ``decoder(LN(GELU(dense(x))))``, ``[..., width] -> [..., vocab]``."""

    def __init__(self, width: int, vocab_size: int, norm_eps: float = 1e-5):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = make_activation("gelu")
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))
