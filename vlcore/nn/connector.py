"""Vision-to-language connectors (docs/token_grid.md): reduce a vision tower's patch-token grid before (or after) the
MLP projector that maps it into the language model's width.

- ``avg_pool``: adaptive average pooling to a grid (Open-Qwen2VL's ``AdaptiveAvgPool2d((12, 12))``);
- ``bilinear``: bilinear resize, align_corners=False (LLaVA-OneVision's video pooling, ``ceil(H / 2)``);
- ``merge_2x2``: Qwen2-VL's merger, each 2x2 cell concatenated into ``4C`` channels, then LayerNorm;
- ``none``: the tokens as they are (e.g. after ToMe in the tower).

:class:`TokenPooler` holds no parameters (the captioner composes it with its own norm and projector);
:class:`TokenConnector` is pooler + norm + MLP projector in one module. Both run on dense batches
``[B, H*W, C]`` of one grid or on packed batches ``[T, C]`` of images with their own grids (Qwen2-VL /
LLaVA-OneVision any-resolution inputs), through :mod:`vlcore.nn.backend` (``impl="vlcore"`` uses the ops).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from vlcore.nn import backend
from vlcore.nn.backend import Impl
from vlcore.nn.transformer import Mlp

CONNECTOR_KINDS = ("avg_pool", "bilinear", "merge_2x2", "none")


class TokenPooler(nn.Module):
    """Parameter-free token reduction of a patch grid: ``kind`` in ``avg_pool`` / ``bilinear`` (to
    ``output_hw``, or ``ceil(h / stride) x ceil(w / stride)``), ``merge_2x2`` or ``none``.

    ``forward(x, grid_hw)``: dense ``x [B, h*w, C]`` -> ``[B, h'*w', C']``. ``forward_varlen(x, grids)``:
    packed ``x [T, C]`` with ``grids[b] = (h, w)`` -> (packed reduced tokens, their grids)."""

    def __init__(self, kind: str, *, output_hw: Optional[Sequence[int]] = None, stride: Optional[int] = None,
                 impl: Impl = "torch"):
        super().__init__()
        if kind not in CONNECTOR_KINDS:
            raise ValueError(f"TokenPooler: kind must be one of {CONNECTOR_KINDS}, got {kind!r}")
        if kind in ("avg_pool", "bilinear") and (output_hw is None) == (stride is None):
            raise ValueError(f"TokenPooler: kind {kind!r} needs exactly one of output_hw and stride")
        backend.check_impl(impl, "TokenPooler")
        self.kind, self.impl = kind, impl
        self.output_hw = None if output_hw is None else tuple(int(v) for v in output_hw)
        self.stride = stride

    def channels_out(self, channels: int) -> int:
        return 4 * channels if self.kind == "merge_2x2" else channels

    def output_grid(self, grid_hw: Sequence[int]) -> tuple[int, int]:
        h, w = grid_hw
        if self.kind == "merge_2x2":
            return h // 2, w // 2
        if self.kind == "none":
            return h, w
        if self.output_hw is not None:
            return self.output_hw
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    def forward(self, x: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
        grid_hw = tuple(grid_hw)
        if self.kind == "none":
            return x
        if self.kind == "merge_2x2":
            return backend.patch_merge_2x2(x, grid_hw, impl=self.impl)
        mode = "avg" if self.kind == "avg_pool" else "bilinear"
        return backend.token_pool_2d(x, grid_hw, output_hw=self.output_grid(grid_hw), mode=mode, impl=self.impl)

    def forward_varlen(self, x: torch.Tensor, grids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list]:
        out_grids = [self.output_grid(g) for g in grids]
        if self.kind == "none":
            return x, out_grids
        if self.kind == "merge_2x2":
            return backend.patch_merge_2x2_varlen(x, grids, impl=self.impl), out_grids
        mode = "avg" if self.kind == "avg_pool" else "bilinear"
        return backend.token_pool_2d_varlen(x, grids, output_hw=out_grids, mode=mode, impl=self.impl)[0], out_grids


class TokenConnector(nn.Module):
    """Pooler, then (for ``merge_2x2``, as Qwen2-VL) a LayerNorm over the merged channels, then a 2-layer GELU
    MLP projector from the vision width into ``out_width`` (the language model's width)."""

    def __init__(self, kind: str, in_width: int, out_width: int, *, output_hw: Optional[Sequence[int]] = None,
                 stride: Optional[int] = None, norm_eps: float = 1e-6, impl: Impl = "torch"):
        super().__init__()
        self.pooler = TokenPooler(kind, output_hw=output_hw, stride=stride, impl=impl)
        width = self.pooler.channels_out(in_width)
        self.merge_norm = nn.LayerNorm(width, eps=norm_eps) if kind == "merge_2x2" else None
        self.projector = Mlp(width, out_width, out_width, act="gelu")

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.merge_norm is not None:
            tokens = self.merge_norm(tokens)
        return self.projector(tokens)

    def forward(self, x: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
        """``x [B, h*w, C] -> [B, tokens, out_width]``."""
        return self._project(self.pooler(x, grid_hw))

    def forward_varlen(self, x: torch.Tensor, grids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list]:
        """Packed ``x [T, C]`` -> (``[T', out_width]``, the reduced grids)."""
        tokens, out_grids = self.pooler.forward_varlen(x, grids)
        return self._project(tokens), out_grids


__all__ = ["TokenPooler", "TokenConnector", "CONNECTOR_KINDS"]
