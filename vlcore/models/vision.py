"""Vision transformer (open_clip's layout): patch embedding, class token, learned positions, ``ln_pre``,
pre-LN blocks with optional ToMe merging per layer, ``ln_post``, pooling and a projection."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlcore.models.config import VisionConfig
from vlcore.nn.attention import CrossAttention
from vlcore.nn.backend import Impl
from vlcore.nn.transformer import Block, Mlp


class VisionTransformer(nn.Module):
    """Images ``[B, 3, H, W]`` -> tokens ``[B, N, width]`` and pooled, projected features ``[B, embed_dim]``.

    With ToMe (``cfg.tome_r``) the tokens are merged after every block's attention; each token carries a
    ``size`` (patches merged into it) used for proportional attention and the size-weighted ``avg`` pool.
    ``context_dim`` gives the top ``fusion_layers`` blocks FIBER's cross-attention (see ``vlcore.nn.Block``).
    """

    def __init__(self, cfg: VisionConfig, embed_dim: Optional[int], *, impl: Impl = "torch",
                 fusion_layers: int = 0, context_dim: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width)) if cfg.class_token else None
        if cfg.pos_embed == "learned":
            self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_tokens, width))
        else:  # a buffer, not a parameter: nothing to learn, and nothing for the optimizer to decay
            self.register_buffer("positional_embedding", sincos_2d_positions(cfg.grid_size, width, cfg.class_token),
                                 persistent=False)
        self.norm_pre = nn.LayerNorm(width, eps=cfg.norm_eps) if cfg.norm_pre else nn.Identity()
        first_fused = cfg.layers - fusion_layers
        self.blocks = nn.ModuleList([
            Block(width, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, norm_eps=cfg.norm_eps,
                  context_dim=context_dim if i >= first_fused else None, impl=impl)
            for i in range(cfg.layers)])
        self.norm_post = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.head = AttentionPoolHead(width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps, impl) if cfg.pool == "map" else None
        self.proj = nn.Linear(width, embed_dim, bias=False) if embed_dim else None
        self.tome_schedule = cfg.tome_schedule

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, N, width]``: patches (+ class token first) + positions, then ``norm_pre``."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        return self.norm_pre(x + self.positional_embedding.to(x.dtype))

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """All blocks, no fusion: ``(tokens [B, N', width] after norm_post, size [B, N', 1] or None)``."""
        x, size = self.embed(images), None
        for block, r in zip(self.blocks, self.tome_schedule):
            if r > 0 or size is not None:
                x, size = block(x, tome_r=r, size=size, class_token=self.cfg.class_token)
            else:
                x = block(x)
        return self.norm_post(x), size

    def pool(self, tokens: torch.Tensor, size: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, N, width] -> [B, width]``: the class token, the (size-weighted) mean of the patch tokens, or the
        attention-pooling head's output."""
        if self.cfg.pool == "tok":
            return tokens[:, 0]
        if self.cfg.pool == "map":
            return self.head(tokens)
        patches = tokens[:, int(self.cfg.class_token):]
        if size is None:
            return patches.mean(dim=1)
        weights = size[:, int(self.cfg.class_token):]
        return (patches * weights).sum(dim=1) / weights.sum(dim=1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.proj is None else self.proj(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, projected (not normalised) image features ``[B, embed_dim]``."""
        tokens, size = self.forward_tokens(images)
        return self.project(self.pool(tokens, size))


class AttentionPoolHead(nn.Module):
    """SigLIP's multihead attention pooling ("MAP"): one learned query attends to every token, then a
    pre-LN residual MLP: ``a = Attn(probe, x); a + MLP(LN(a))``, ``[B, N, C] -> [B, C]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, norm_eps: float, impl: Impl):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.attn = CrossAttention(width, width, heads, impl=impl)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.probe.to(x.dtype).expand(x.shape[0], -1, -1), x)
        return (a + self.mlp(self.norm(a)))[:, 0]


def sincos_2d_positions(grid_size: int, width: int, class_token: bool) -> torch.Tensor:
    """Fixed 2D positions ``[N, width]`` (MAE / ViT-22B style): the first half of the channels encodes the
    patch's row, the second half its column, each as ``[sin(p w_k), cos(p w_k)]`` with
    ``w_k = 10000^(-k / (width/4))``; a class token, if any, gets zeros and comes first."""
    quarter = width // 4
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # row-major, as patch_embed flattens

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    positions = torch.cat([encode(rows), encode(cols)], dim=1)
    if class_token:
        positions = torch.cat([positions.new_zeros(1, width), positions])
    return positions.float()
