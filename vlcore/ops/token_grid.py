"""Token-grid ops: 2D pooling of patch tokens (adaptive average, bilinear with ``align_corners=False``) and
Qwen2-VL's 2x2 patch merger, on dense ``[B, H*W, C]`` batches or packed grids of different sizes
(docs/token_grid.md).

Grids are host ints because they fix the output shapes; nothing is read back from the device. Every op has
a CPU reference and a CUDA kernel, and is differentiable: the backward kernels gather (every input token sums
the output tokens that read it), so they are deterministic.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["token_pool_2d", "token_pool_2d_varlen", "patch_merge_2x2", "patch_merge_2x2_varlen",
           "token_pool_2d_ref", "token_pool_2d_varlen_ref", "patch_merge_2x2_ref", "patch_merge_2x2_varlen_ref"]

POOL_MODES = ("avg", "bilinear")


def _as_hw(hw, where, name):
    """``(h, w)`` as two Python ints >= 1 from any pair of integers (numpy and 0-d tensor ints included)."""
    try:
        out = tuple(operator.index(v) for v in hw)
    except TypeError:
        raise ValueError(f"{where}: {name} must be a pair of integers (h, w), got {hw!r}") from None
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"{where}: {name} must be (h, w) with h, w >= 1, got {hw!r}")
    return out


def _is_hw(v) -> bool:
    """Whether ``v`` is one ``(h, w)`` pair rather than a list of pairs."""
    try:
        return len(v) == 2 and all(operator.index(e) is not None for e in v)
    except TypeError:
        return False


def _pool_out_hw(hw, output_hw, stride, where):
    if (output_hw is None) == (stride is None):
        raise ValueError(f"{where}: give exactly one of output_hw and stride")
    if stride is not None:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"{where}: stride must be an int >= 1, got {stride!r}")
        return (math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
    return _as_hw(output_hw, where, "output_hw")


def _check_grid(hw, where, name="grid_hw"):
    return _as_hw(hw, where, name)


def token_pool_2d(x: torch.Tensor, grid_hw: tuple[int, int], *, output_hw: Optional[tuple[int, int]] = None,
                  stride: Optional[int] = None, mode: str = "avg", class_token: bool = False) -> torch.Tensor:
    """Pool a row-major token grid ``x [B, H*W, C]`` to ``[B, H'*W', C]``.

    ``mode="avg"`` is adaptive average pooling (``F.adaptive_avg_pool2d``'s windows), ``"bilinear"`` is
    ``F.interpolate(mode="bilinear", align_corners=False)``. The target is ``output_hw`` or, with ``stride``,
    ``(ceil(H / stride), ceil(W / stride))`` as LLaVA-OneVision. ``class_token=True``: ``x`` is
    ``[B, 1 + H*W, C]`` and the class token is kept first. Differentiable."""
    where = "vlcore.ops.token_pool_2d"
    if mode not in POOL_MODES:
        raise ValueError(f"{where}: mode must be one of {POOL_MODES}, got {mode!r}")
    hw = _check_grid(grid_hw, where)
    out_hw = _pool_out_hw(hw, output_hw, stride, where)
    extra = int(class_token)
    if x.dim() != 3 or x.shape[1] != hw[0] * hw[1] + extra:
        raise ValueError(f"{where}: x must have shape (B, {'1 + ' if extra else ''}H*W, C) = (B, {hw[0] * hw[1] + extra}, C) "
                         f"for the {hw[0]}x{hw[1]} grid, got {tuple(x.shape)}")
    batch, n, c = x.shape
    out = torch.ops.vlcore.token_pool_2d(x.reshape(batch * n, c), list(hw) * batch, list(out_hw) * batch, mode,
                                         class_token)
    return out.view(batch, out_hw[0] * out_hw[1] + extra, c)


def token_pool_2d_varlen(x: torch.Tensor, grids: Sequence[tuple[int, int]], *, output_hw=None, stride: Optional[int] = None,
                         mode: str = "avg", class_token: bool = False) -> tuple[torch.Tensor, list]:
    """Packed grids: ``x [T, C]`` holds images of ``grids[b] = (h, w)`` tokens (each after its class token
    when ``class_token``). ``output_hw`` is one ``(h, w)`` for every image or one per image; ``stride`` pools
    each grid to ``ceil(h / stride) x ceil(w / stride)``. Returns the packed pooled tokens and their grids."""
    where = "vlcore.ops.token_pool_2d_varlen"
    if mode not in POOL_MODES:
        raise ValueError(f"{where}: mode must be one of {POOL_MODES}, got {mode!r}")
    grids = [_check_grid(g, where, "grids[i]") for g in grids]
    if output_hw is not None and _is_hw(output_hw):
        output_hw = [output_hw] * len(grids)
    if output_hw is not None and len(output_hw) != len(grids):
        raise ValueError(f"{where}: output_hw must be one (h, w) or one per image ({len(grids)}), got {len(output_hw)}")
    outs = [_pool_out_hw(g, None if output_hw is None else output_hw[i], stride, where) for i, g in enumerate(grids)]
    if x.dim() != 2 or x.shape[0] != sum(h * w + int(class_token) for h, w in grids):
        raise ValueError(f"{where}: x must have shape (T, C) with T = {sum(h * w + int(class_token) for h, w in grids)} "
                         f"tokens for the grids, got {tuple(x.shape)}")
    flat = [v for g in grids for v in g]
    flat_out = [v for g in outs for v in g]
    return torch.ops.vlcore.token_pool_2d(x, flat, flat_out, mode, class_token), outs


def patch_merge_2x2(x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Qwen2-VL's 2x2 merger layout: ``x [B, H*W, C]`` (row-major grid, H and W even) ->
    ``[B, (H/2)*(W/2), 4C]``, each output row the concatenation of a 2x2 cell's tokens in row-major order
    ((0,0), (0,1), (1,0), (1,1)). Differentiable."""
    where = "vlcore.ops.patch_merge_2x2"
    hw = _check_grid(grid_hw, where)
    if hw[0] % 2 or hw[1] % 2:
        raise ValueError(f"{where}: grid_hw must be even (the merger takes 2x2 cells), got {hw}")
    if x.dim() != 3 or x.shape[1] != hw[0] * hw[1]:
        raise ValueError(f"{where}: x must have shape (B, H*W, C) = (B, {hw[0] * hw[1]}, C) for the {hw[0]}x{hw[1]} "
                         f"grid, got {tuple(x.shape)}")
    batch, n, c = x.shape
    out = torch.ops.vlcore.patch_merge_2x2(x.reshape(batch * n, c), list(hw) * batch)
    return out.view(batch, n // 4, 4 * c)


def patch_merge_2x2_varlen(x: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Packed grids (Qwen2-VL's varlen vision batch): ``x [T, C]`` with images of ``grids[b] = (h, w)`` tokens
    -> ``[T / 4, 4C]``."""
    where = "vlcore.ops.patch_merge_2x2_varlen"
    grids = [_check_grid(g, where, "grids[i]") for g in grids]
    if any(h % 2 or w % 2 for h, w in grids):
        raise ValueError(f"{where}: every grid must be even (the merger takes 2x2 cells), got {grids}")
    if x.dim() != 2 or x.shape[0] != sum(h * w for h, w in grids):
        raise ValueError(f"{where}: x must have shape (T, C) with T = {sum(h * w for h, w in grids)}, got {tuple(x.shape)}")
    return torch.ops.vlcore.patch_merge_2x2(x, [v for g in grids for v in g])


# ---------------------------------------------------------------------------------------------------------
# Fakes: shapes only, contiguous outputs like the kernels. They repeat the C++ checks with torch._check.


def _check(cond, op, msg):
    torch._check_value(cond, lambda: f"vlcore::{op}: {msg}")


def _grid_totals(grids, out_grids, class_token):
    extra = int(class_token)
    total_in = sum(grids[i] * grids[i + 1] + extra for i in range(0, len(grids), 2))
    total_out = sum(out_grids[i] * out_grids[i + 1] + extra for i in range(0, len(out_grids), 2))
    return total_in, total_out


@torch.library.register_fake("vlcore::token_pool_2d")
def _(x, grids, out_grids, mode, class_token):
    _check(x.dim() == 2, "token_pool_2d", "x must have shape (total_tokens, C)")
    _check(len(grids) % 2 == 0 and len(out_grids) == len(grids), "token_pool_2d", "grids must be (h, w) pairs, one per image")
    total_in, total_out = _grid_totals(grids, out_grids, class_token)
    _check(x.shape[0] == total_in, "token_pool_2d", "x rows must match the grids")
    return x.new_empty((total_out, x.shape[1]))


@torch.library.register_fake("vlcore::token_pool_2d_backward")
def _(grad_out, grids, out_grids, mode, class_token):
    total_in, total_out = _grid_totals(grids, out_grids, class_token)
    _check(grad_out.dim() == 2 and grad_out.shape[0] == total_out, "token_pool_2d_backward", "grad_out rows must match the output grids")
    return grad_out.new_empty((total_in, grad_out.shape[1]))


@torch.library.register_fake("vlcore::patch_merge_2x2")
def _(x, grids):
    _check(x.dim() == 2, "patch_merge_2x2", "x must have shape (total_tokens, C)")
    _check(all(v % 2 == 0 for v in grids), "patch_merge_2x2", "grids must be even")
    total = sum(grids[i] * grids[i + 1] for i in range(0, len(grids), 2))
    _check(x.shape[0] == total, "patch_merge_2x2", "x rows must match the grids")
    return x.new_empty((total // 4, 4 * x.shape[1]))


@torch.library.register_fake("vlcore::patch_merge_2x2_backward")
def _(grad_out, grids):
    total = sum(grids[i] * grids[i + 1] for i in range(0, len(grids), 2))
    _check(grad_out.dim() == 2 and grad_out.shape[0] == total // 4, "patch_merge_2x2_backward", "grad_out rows must match the grids")
    return grad_out.new_empty((total, grad_out.shape[1] // 4))


# ---------------------------------------------------------------------------------------------------------
# Autograd: the backward kernels are ops of their own (and the merger's backward is a permutation, so its
# backward is the forward).


def _pool_setup_context(ctx, inputs, output):
    x, grids, out_grids, mode, class_token = inputs
    ctx.args = (grids, out_grids, mode, class_token)


def _pool_backward(ctx, grad):
    return torch.ops.vlcore.token_pool_2d_backward(grad, *ctx.args), None, None, None, None


def _merger_setup_context(ctx, inputs, output):
    ctx.grids = inputs[1]


def _merger_backward(ctx, grad):
    return torch.ops.vlcore.patch_merge_2x2_backward(grad, ctx.grids), None


def _merger_backward_backward(ctx, grad):
    return torch.ops.vlcore.patch_merge_2x2(grad, ctx.grids), None


torch.library.register_autograd("vlcore::token_pool_2d", _pool_backward, setup_context=_pool_setup_context)
torch.library.register_autograd("vlcore::patch_merge_2x2", _merger_backward, setup_context=_merger_setup_context)
torch.library.register_autograd("vlcore::patch_merge_2x2_backward", _merger_backward_backward,
                                setup_context=_merger_setup_context)



# ---------------------------------------------------------------------------------------------------------
# References: PyTorch's own resampling on the grid, for tests and impl="torch".


def token_pool_2d_ref(x: torch.Tensor, grid_hw, output_hw=None, mode: str = "avg", class_token: bool = False, *,
                      stride: Optional[int] = None) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` / ``F.interpolate(bilinear, align_corners=False)`` on the token grid, to
    ``output_hw`` or ``ceil(H / stride) x ceil(W / stride)``."""
    where = "vlcore.ops.token_grid.token_pool_2d_ref"
    if mode not in POOL_MODES:
        raise ValueError(f"{where}: mode must be one of {POOL_MODES}, got {mode!r}")
    grid_hw = _check_grid(grid_hw, where)
    output_hw = _pool_out_hw(grid_hw, output_hw, stride, where)
    head, x = (x[:, :1], x[:, 1:]) if class_token else (None, x)
    batch, _, c = x.shape
    if batch == 0 or c == 0:  # nothing to resample (PyTorch's pooling rejects empty inputs)
        out = x.new_zeros((batch, output_hw[0] * output_hw[1], c))
        return out if head is None else torch.cat([head, out], 1)
    grid = x.transpose(1, 2).reshape(batch, c, *grid_hw)
    if mode == "avg":
        pooled = F.adaptive_avg_pool2d(grid, output_hw)
    else:
        pooled = F.interpolate(grid, size=output_hw, mode="bilinear", align_corners=False)
    out = pooled.flatten(2).transpose(1, 2)
    return out if head is None else torch.cat([head, out], 1)


def token_pool_2d_varlen_ref(x: torch.Tensor, grids, *, output_hw=None, stride: Optional[int] = None,
                             mode: str = "avg", class_token: bool = False) -> tuple[torch.Tensor, list]:
    """:func:`token_pool_2d_ref` image by image over packed grids; returns the packed tokens and their grids."""
    where = "vlcore.ops.token_grid.token_pool_2d_varlen_ref"
    grids = [_check_grid(g, where, "grids[i]") for g in grids]
    if output_hw is None or _is_hw(output_hw):
        output_hw = [output_hw] * len(grids)
    outs = [_pool_out_hw(g, o, stride, where) for g, o in zip(grids, output_hw)]
    pieces, start = [], 0
    for g, o in zip(grids, outs):
        n = g[0] * g[1] + int(class_token)
        pieces.append(token_pool_2d_ref(x[start:start + n].unsqueeze(0), g, o, mode, class_token)[0])
        start += n
    return (torch.cat(pieces) if pieces else x.new_empty((0, x.shape[-1]))), outs


def patch_merge_2x2_ref(x: torch.Tensor, grid_hw) -> torch.Tensor:
    """Qwen2-VL's merger as a reshape: ``[B, H*W, C] -> [B, (H/2)*(W/2), 4C]``."""
    h, w = grid_hw
    batch, _, c = x.shape
    cells = x.reshape(batch, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return cells.reshape(batch, (h // 2) * (w // 2), 4 * c)


def patch_merge_2x2_varlen_ref(x: torch.Tensor, grids) -> torch.Tensor:
    """:func:`patch_merge_2x2_ref` image by image over packed grids."""
    pieces, start = [], 0
    for h, w in grids:
        pieces.append(patch_merge_2x2_ref(x[start:start + h * w].unsqueeze(0), (h, w))[0])
        start += h * w
    return torch.cat(pieces) if pieces else x.new_empty((0, 4 * x.shape[-1]))
