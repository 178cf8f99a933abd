"""Token reduction ops: ToMe's bipartite soft matching and size-weighted merge (vlp.md §2), its unmerge and
source tracking, 2D pooling of patch tokens and Qwen2-VL's 2x2 patch merger (vlp.md §3).

ToMe, for one image of ``N`` tokens with ``p = class_token + distill_token`` protected leading tokens:

1. ``r`` is capped at ``(N - p) // 2``; with ``r == 0`` the image passes through unchanged.
2. Cosine similarity of the metric (the attention keys averaged over heads) between the even tokens (set A)
   and the odd tokens (set B); the class token (A 0) is never a source, the distillation token (B 0) never
   a destination.
3. Each A token's best B partner (the highest score; **ties go to the lower B index**), then the ``r``
   A tokens with the highest best score merge into their partner (**ties go to the lower A index**:
   a stable descending sort, as ``argsort(descending=True, stable=True)``).
4. The output is ``[unmerged A..., all B...]``: the unmerged A tokens in edge order (score descending),
   or ascending when a class token is protected so that it stays first (ToMe's order exactly).

Non-finite scores follow ToMe's PyTorch code exactly: a metric row that is all zero or holds an Inf or NaN
scores NaN against every token (``metric / metric.norm()`` is 0/0 or Inf/Inf), and NaN is the highest score
both in the partner search (``max`` propagates NaN and takes the first NaN's index) and in the edge order
(``argsort(descending=True)`` puts NaN first). So such tokens merge first (a zero B token attracts every
source), while the protected class token always sorts after every other token and never merges.

The CPU kernel scores in float64, the CUDA kernel in float32 (it never stores the score matrix: one CTA per
image keeps B in shared memory and each thread streams over it for its A tokens; every row is scaled by a
power of two before squaring, so that no finite float32 row overflows or underflows, and float64 metrics are
rounded to float32 first). The CUDA scores carry float32 rounding (``rsqrtf`` and the c-term dot products,
about 1e-6 relative for c ~ 100), so the two backends can disagree on edges whose scores are that close.

Layouts: dense ``[B, N, C]`` batches, or varlen ``[T, C]`` batches of images with ``seqlens[b]`` tokens
each (the flash-attn packing without the tensor: lengths, r and grids are host ints because they fix the
output shapes; nothing is read back from the device). Every op has a CPU reference and a CUDA kernel;
merge, unmerge, pooling and the merger are differentiable (backward kernels gather, so they are
deterministic).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "TomeMatch", "tome_match", "tome_match_varlen", "tome_merge", "tome_unmerge", "tome_source", "tome_track",
    "token_pool_2d", "token_pool_2d_varlen", "patch_merge_2x2", "patch_merge_2x2_varlen",
    "tome_cap", "tome_match_ref", "tome_merge_ref", "tome_unmerge_ref", "token_pool_2d_ref", "patch_merge_2x2_ref",
]

MERGE_MODES = ("wavg", "mean", "sum", "amax")
POOL_MODES = ("avg", "bilinear")


class TomeMatch(NamedTuple):
    """The result of :func:`tome_match` / :func:`tome_match_varlen`: which tokens merge into which.

    ``unmerged``, ``src``, ``dst`` are ToMe's index maps into the A (even) / B (odd) halves of each image
    (dense: ``[B, Na - r, 1]``, ``[B, r, 1]``, ``[B, r, 1]`` int64 like ToMe; varlen: flat, image after
    image). ``dest [T]`` is the output row of every input row, ``offsets [T' + 1]`` / ``sources [T]`` its
    inverse (output row j gathers ``sources[offsets[j]:offsets[j+1]]``, destination first). Rows are global
    over the flattened batch. ``r`` holds each image's r after capping."""

    unmerged: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    dest: torch.Tensor
    offsets: torch.Tensor
    sources: torch.Tensor
    r: tuple
    seqlens: tuple
    dense: bool

    @property
    def out_seqlens(self) -> tuple:
        """Tokens per image after the merge."""
        return tuple(n - r for n, r in zip(self.seqlens, self.r))

    @property
    def is_identity(self) -> bool:
        return not any(self.r)

    def out_cu_seqlens(self) -> torch.Tensor:
        """``cu_seqlens`` (int32, flash-attn's convention) of the merged batch, on the match's device, built from
        host ints (a host-to-device copy, no sync): the packing for varlen attention after the merge."""
        return torch.tensor([0, *itertools.accumulate(self.out_seqlens)], dtype=torch.int32, device=self.dest.device)


def tome_cap(n: int, r: int, class_token: bool = False, distill_token: bool = False) -> int:
    """ToMe's cap: ``max(0, min(r, (n - protected) // 2))``."""
    return max(0, min(r, (n - int(class_token) - int(distill_token)) // 2))


def _check_r(r, where: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{where}: r must be a Python int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"{where}: r must be >= 0, got {r}")


def tome_match(metric: torch.Tensor, r: int, *, class_token: bool = False, distill_token: bool = False) -> TomeMatch:
    """Bipartite soft matching of ``metric [B, N, c]`` (keys averaged over heads): which ``r`` tokens of each
    image merge into which (see the module docstring). ``r`` is capped at ``(N - protected) // 2``; when
    that leaves 0 the match is the identity (:func:`tome_merge` returns its input). Not differentiable."""
    _check_r(r, "vlcore.ops.tome_match")
    if metric.dim() != 3:
        raise ValueError(f"vlcore.ops.tome_match: metric must have shape (B, N, c), got {tuple(metric.shape)}")
    batch, n, c = metric.shape
    unmerged, src, dst, dest, offsets, sources = torch.ops.vlcore.tome_match(
        metric.detach().reshape(batch * n, c), [n] * batch, [r], class_token, distill_token)
    rc = tome_cap(n, r, class_token, distill_token)
    na = (n + 1) // 2
    return TomeMatch(unmerged.view(batch, na - rc, 1), src.view(batch, rc, 1), dst.view(batch, rc, 1), dest, offsets,
                     sources, (rc,) * batch, (n,) * batch, True)


def tome_match_varlen(metric: torch.Tensor, seqlens: Sequence[int], r, *, class_token: bool = False,
                      distill_token: bool = False) -> TomeMatch:
    """Varlen matching: ``metric [T, c]`` holds images of ``seqlens[b]`` tokens back to back (host ints,
    ``sum(seqlens) == T``); ``r`` is one int or one per image, each capped for its image. The merged batch
    has ``match.out_seqlens`` tokens per image, in the same packing."""
    seqlens = [int(n) for n in seqlens]
    rs = [r] * len(seqlens) if isinstance(r, int) else list(r)
    for v in rs:
        _check_r(v, "vlcore.ops.tome_match_varlen")
    if len(rs) != len(seqlens):
        raise ValueError(f"vlcore.ops.tome_match_varlen: r must be an int or one per image ({len(seqlens)}), got {len(rs)}")
    if metric.dim() != 2:
        raise ValueError(f"vlcore.ops.tome_match_varlen: metric must have shape (T, c), got {tuple(metric.shape)}")
    if any(n < 0 for n in seqlens) or sum(seqlens) != metric.shape[0]:
        raise ValueError(f"vlcore.ops.tome_match_varlen: seqlens must be >= 0 and add up to metric.shape[0] = "
                         f"{metric.shape[0]}, got {seqlens}")
    out = torch.ops.vlcore.tome_match(metric.detach(), seqlens, rs, class_token, distill_token)
    capped = tuple(tome_cap(n, v, class_token, distill_token) for n, v in zip(seqlens, rs))
    return TomeMatch(*out, capped, tuple(seqlens), False)


def _flat_tokens(t: torch.Tensor, match: TomeMatch, name: str, where: str, *, merged: bool, channels: bool = True):
    """Checks ``t`` against the match's layout and returns it as rows ``[rows, C]`` (or ``[rows]``)."""
    seqlens = match.out_seqlens if merged else match.seqlens
    rows = sum(seqlens)
    if match.dense:
        batch, n = len(seqlens), (seqlens[0] if seqlens else 0)
        want = f"(B, N{' - r' if merged else ''}{', C' if channels else ', 1'}) = ({batch}, {n}, {'C' if channels else 1})"
        ok = t.dim() == 3 and t.shape[0] == batch and t.shape[1] == n and (channels or t.shape[2] == 1)
    else:
        want = f"(T{'_merged' if merged else ''}{', C' if channels else ', 1'}) = ({rows}, {'C' if channels else 1})"
        ok = t.dim() == 2 and t.shape[0] == rows and (channels or t.shape[1] == 1)
    if not ok:
        raise ValueError(f"{where}: {name} must have shape {want} to match the match, got {tuple(t.shape)}")
    return t.reshape(rows, t.shape[-1]) if channels else t.reshape(rows)


def tome_merge(x: torch.Tensor, match: TomeMatch, *, size: Optional[torch.Tensor] = None,
               mode: str = "wavg") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` (dense ``[B, N, C]`` or varlen ``[T, C]``) as ``match`` says, in ToMe's output order.

    ``mode="wavg"`` is ToMe's ``merge_wavg``: ``x <- merge(x * size, sum) / merge(size, sum)``; ``"mean"``,
    ``"sum"``, ``"amax"`` reduce each destination with the tokens merged into it (``scatter_reduce`` with
    ``include_self``). ``size`` (``[B, N, 1]`` / ``[T, 1]``, x's dtype; ones when None) counts the patches behind
    each token; it is returned merged by sum in every mode. Differentiable with respect to ``x`` and ``size``.
    An identity match returns ``(x, size)`` unchanged."""
    where = "vlcore.ops.tome_merge"
    if mode not in MERGE_MODES:
        raise ValueError(f"{where}: mode must be one of {MERGE_MODES}, got {mode!r}")
    rows = _flat_tokens(x, match, "x", where, merged=False)
    flat_size = None if size is None else _flat_tokens(size, match, "size", where, merged=False, channels=False)
    if match.is_identity:
        return x, (torch.ones_like(x[..., :1]) if size is None else size)
    out, out_size = torch.ops.vlcore.tome_merge(rows, flat_size, match.dest, match.offsets, match.sources, mode)
    if match.dense:
        batch, n_out = len(match.seqlens), match.out_seqlens[0]
        return out.view(batch, n_out, x.shape[-1]), out_size.view(batch, n_out, 1)
    return out, out_size.view(-1, 1)


def tome_unmerge(x: torch.Tensor, match: TomeMatch) -> torch.Tensor:
    """The inverse mapping (ToMe's ``unmerge``, tomesd style): merged tokens ``[B, N - r, C]`` / ``[T', C]`` back
    to the original count, every token taking the value of the token it was merged into. Differentiable."""
    where = "vlcore.ops.tome_unmerge"
    rows = _flat_tokens(x, match, "x", where, merged=True)
    if match.is_identity:
        return x
    out = torch.ops.vlcore.tome_unmerge(rows, match.dest, match.offsets, match.sources)
    return out.view(len(match.seqlens), match.seqlens[0], x.shape[-1]) if match.dense else out


def tome_source(match: TomeMatch, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ToMe's ``merge_source`` (dense batches): the adjacency ``[B, N_cur, N_orig]`` of merged tokens over the
    original patches, starting from the identity; merged with ``amax`` (a token covers the union)."""
    if not match.dense:
        raise ValueError("vlcore.ops.tome_source: the dense adjacency is for dense matches; use tome_track for varlen")
    batch, n = len(match.seqlens), match.seqlens[0]
    if source is None:
        source = torch.eye(n, dtype=torch.float32, device=match.dest.device).expand(batch, n, n)
    return tome_merge(source, match, mode="amax")[0]


def tome_track(match: TomeMatch, origin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Compact source tracking: ``origin`` maps every original token to the current token that covers it
    (dense ``[B, N_orig]`` indices within the image; varlen ``[T_orig]`` global rows; the identity when None,
    i.e. before the first merge). Returns the map after this merge: chain it layer after layer, then unmerge
    to full resolution with ``x.gather``."""
    if match.dense:
        batch, n = len(match.seqlens), match.seqlens[0]
        n_out = match.out_seqlens[0]
        local = match.dest.view(batch, n) - torch.arange(batch, device=match.dest.device).view(batch, 1) * n_out
        if origin is None:
            return local
        return local.gather(1, origin)
    return match.dest if origin is None else match.dest[origin]


# ---------------------------------------------------------------------------------------------------------
# Token grids


def _pool_out_hw(hw, output_hw, stride, where):
    if (output_hw is None) == (stride is None):
        raise ValueError(f"{where}: give exactly one of output_hw and stride")
    if stride is not None:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"{where}: stride must be an int >= 1, got {stride!r}")
        return (math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
    out = tuple(int(v) for v in output_hw)
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"{where}: output_hw must be (h, w) with h, w >= 1, got {output_hw!r}")
    return out


def _check_grid(hw, where, name="grid_hw"):
    hw = tuple(int(v) for v in hw)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"{where}: {name} must be (h, w) with h, w >= 1, got {hw!r}")
    return hw


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
    batch, _, c = x.shape
    out = torch.ops.vlcore.token_pool_2d(x.reshape(-1, c), list(hw) * batch, list(out_hw) * batch, mode, class_token)
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
    if output_hw is not None and len(output_hw) == 2 and all(isinstance(v, int) for v in output_hw):
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
    out = torch.ops.vlcore.patch_merge_2x2(x.reshape(-1, c), list(hw) * batch)
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


@torch.library.register_fake("vlcore::tome_match")
def _(metric, seqlens, r, class_token, distill_token):
    _check(metric.dim() == 2, "tome_match", "metric must have shape (total_tokens, c)")
    _check(len(r) in (1, len(seqlens)), "tome_match", "r must hold one value or one per image")
    _check(all(v >= 0 for v in r), "tome_match", "r must be >= 0")
    _check(metric.shape[0] == sum(seqlens), "tome_match", "metric rows must add up to sum(seqlens)")
    rs = [tome_cap(n, r[0] if len(r) == 1 else r[b], class_token, distill_token) for b, n in enumerate(seqlens)]
    total_in, total_r = sum(seqlens), sum(rs)
    total_unmerged = sum((n + 1) // 2 for n in seqlens) - total_r
    new = lambda k: metric.new_empty((k,), dtype=torch.long)  # noqa: E731
    return new(total_unmerged), new(total_r), new(total_r), new(total_in), new(total_in - total_r + 1), new(total_in)


def _fake_maps(op, x, dest, offsets, sources):
    for t, name in ((dest, "dest"), (offsets, "offsets"), (sources, "sources")):
        _check(t.dtype == torch.long and t.dim() == 1, op, f"{name} must be 1-D int64")
    _check(dest.shape[0] == sources.shape[0], op, "dest and sources must have one entry per input token")


@torch.library.register_fake("vlcore::tome_merge")
def _(x, size, dest, offsets, sources, mode):
    _check(x.dim() == 2, "tome_merge", "x must have shape (total_tokens, C)")
    _check(mode in MERGE_MODES, "tome_merge", f"mode must be one of {MERGE_MODES}")
    _fake_maps("tome_merge", x, dest, offsets, sources)
    _check(dest.shape[0] == x.shape[0], "tome_merge", "dest must have one entry per token of x")
    if size is not None:
        _check(size.shape == (x.shape[0],) and size.dtype == x.dtype, "tome_merge", "size must be (total_tokens,) of x's dtype")
    total_out = offsets.shape[0] - 1
    return x.new_empty((total_out, x.shape[1])), x.new_empty((total_out,))


@torch.library.register_fake("vlcore::tome_merge_backward")
def _(grad_out, grad_size, x, size, out, dest, offsets, sources, mode):
    _fake_maps("tome_merge_backward", x, dest, offsets, sources)
    _check(grad_out.shape == out.shape, "tome_merge_backward", "grad_out must have out's shape")
    _check(grad_out.dtype == x.dtype and out.dtype == x.dtype, "tome_merge_backward",
           "grad_out and out must have the dtype of x")
    return x.new_empty(x.shape), x.new_empty((x.shape[0] if size is not None else 0,))


@torch.library.register_fake("vlcore::tome_unmerge")
def _(x, dest, offsets, sources):
    _check(x.dim() == 2, "tome_unmerge", "x must have shape (merged_tokens, C)")
    _fake_maps("tome_unmerge", x, dest, offsets, sources)
    _check(offsets.shape[0] == x.shape[0] + 1, "tome_unmerge", "x rows must match the match's output tokens")
    return x.new_empty((dest.shape[0], x.shape[1]))


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
# Autograd: backward kernels are ops of their own; unmerge and merge-by-sum are each other's adjoint.


def _merge_setup_context(ctx, inputs, output):
    x, size, dest, offsets, sources, mode = inputs
    ctx.mode = mode
    ctx.has_size = size is not None
    ctx.save_for_backward(x, size, output[0], dest, offsets, sources)


def _merge_backward(ctx, grad_out, grad_size):
    x, size, out, dest, offsets, sources = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_x, grad_sz = torch.ops.vlcore.tome_merge_backward(grad_out, grad_size, x, size, out, dest, offsets, sources,
                                                           ctx.mode)
    return grad_x, (grad_sz if ctx.has_size else None), None, None, None, None


def _unmerge_setup_context(ctx, inputs, output):
    x, dest, offsets, sources = inputs
    ctx.save_for_backward(dest, offsets, sources)


def _unmerge_backward(ctx, grad):
    dest, offsets, sources = ctx.saved_tensors
    grad_x, _ = torch.ops.vlcore.tome_merge(grad, None, dest, offsets, sources, "sum")
    return grad_x, None, None, None


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


torch.library.register_autograd("vlcore::tome_merge", _merge_backward, setup_context=_merge_setup_context)
torch.library.register_autograd("vlcore::tome_unmerge", _unmerge_backward, setup_context=_unmerge_setup_context)
torch.library.register_autograd("vlcore::token_pool_2d", _pool_backward, setup_context=_pool_setup_context)
torch.library.register_autograd("vlcore::patch_merge_2x2", _merger_backward, setup_context=_merger_setup_context)
torch.library.register_autograd("vlcore::patch_merge_2x2_backward", _merger_backward_backward,
                                setup_context=_merger_setup_context)


# ---------------------------------------------------------------------------------------------------------
# References: ToMe's algorithm transcribed in plain PyTorch (scores in float64), for tests and benchmarks.


def tome_match_ref(metric: torch.Tensor, r: int, *, class_token: bool = False, distill_token: bool = False):
    """ToMe's ``bipartite_soft_matching`` on ``[B, N, c]``: ``(unmerged, src, dst)`` ``[B, *, 1]`` int64, or
    None when nothing merges (r capped at ``(N - protected) // 2``)."""
    r = tome_cap(metric.shape[1], r, class_token, distill_token)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric.double()
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
            unmerged = unmerged.sort(dim=1).values
    return unmerged, src, dst


def tome_merge_ref(x: torch.Tensor, match, *, size: Optional[torch.Tensor] = None, mode: str = "wavg"):
    """ToMe's ``merge`` / ``merge_wavg`` with the ``(unmerged, src, dst)`` of :func:`tome_match_ref`."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    if match is None:
        return x, size

    def merge(t, reduce):
        unmerged, src, dst = match
        a, b = t[..., ::2, :], t[..., 1::2, :]
        c = t.shape[-1]
        kept = a.gather(-2, unmerged.expand(-1, -1, c))
        moved = a.gather(-2, src.expand(-1, -1, c))
        b = b.scatter_reduce(-2, dst.expand(-1, -1, c), moved, reduce=reduce)
        return torch.cat([kept, b], dim=1)

    if mode == "wavg":
        merged_size = merge(size, "sum")
        return merge(x * size, "sum") / merged_size, merged_size
    return merge(x, mode), merge(size, "sum")


def tome_unmerge_ref(x: torch.Tensor, match, n: int) -> torch.Tensor:
    """ToMe's ``unmerge``: ``[B, N - r, C] -> [B, N, C]``."""
    if match is None:
        return x
    unmerged, src, dst = match
    batch, _, c = x.shape
    kept_count = unmerged.shape[1]
    kept, b = x[..., :kept_count, :], x[..., kept_count:, :]
    moved = b.gather(-2, dst.expand(-1, -1, c))
    out = x.new_zeros(batch, n, c)
    out[..., 1::2, :] = b
    out.scatter_(-2, (2 * unmerged).expand(-1, -1, c), kept)
    out.scatter_(-2, (2 * src).expand(-1, -1, c), moved)
    return out


def token_pool_2d_ref(x: torch.Tensor, grid_hw, output_hw, mode: str = "avg", class_token: bool = False) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` / ``F.interpolate(bilinear, align_corners=False)`` on the token grid."""
    head, x = (x[:, :1], x[:, 1:]) if class_token else (None, x)
    batch, _, c = x.shape
    grid = x.transpose(1, 2).reshape(batch, c, *grid_hw)
    if mode == "avg":
        pooled = F.adaptive_avg_pool2d(grid, output_hw)
    else:
        pooled = F.interpolate(grid, size=output_hw, mode="bilinear", align_corners=False)
    out = pooled.flatten(2).transpose(1, 2)
    return out if head is None else torch.cat([head, out], 1)


def patch_merge_2x2_ref(x: torch.Tensor, grid_hw) -> torch.Tensor:
    h, w = grid_hw
    batch, _, c = x.shape
    cells = x.reshape(batch, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return cells.reshape(batch, (h // 2) * (w // 2), 4 * c)
