"""ToMe token merging: bipartite soft matching and size-weighted merge, its unmerge and source tracking
(docs/tome.md).

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
each (the flash-attn packing without the tensor: lengths and r are host ints because they fix the output
shapes; nothing is read back from the device). Every op has a CPU reference and a CUDA kernel; merge and
unmerge are differentiable (backward kernels gather, so they are deterministic).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional, Sequence

import torch

__all__ = [
    "TomeMatch", "tome_match", "tome_match_varlen", "tome_merge", "tome_unmerge", "tome_source", "tome_track",
    "tome_cap", "TomeMatchRef", "tome_match_ref", "tome_merge_ref", "tome_unmerge_ref",
]

MERGE_MODES = ("wavg", "mean", "sum", "amax")


class TomeMatch(NamedTuple):
    """The result of :func:`tome_match` / :func:`tome_match_varlen`: which tokens merge into which.

    ``unmerged``, ``src``, ``dst`` are ToMe's index maps into the A (even) / B (odd) halves of each image
    (dense: ``[B, Na - r, 1]``, ``[B, r, 1]``, ``[B, r, 1]`` int64 like ToMe; varlen: flat, image after
    image). ``dest [T]`` is the output row of every input row, ``offsets [T' + 1]`` / ``sources [T]`` its
    inverse (output row j gathers ``sources[offsets[j]:offsets[j+1]]``, destination first). Rows are global
    over the flattened batch. ``r`` holds each image's r after capping. ``dense_nr`` is ``(N, r)`` of a dense
    match (every image's tokens and capped r, known even for an empty batch), ``()`` for a varlen one."""

    unmerged: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    dest: torch.Tensor
    offsets: torch.Tensor
    sources: torch.Tensor
    r: tuple
    seqlens: tuple
    dense: bool
    dense_nr: tuple = ()

    @property
    def out_seqlens(self) -> tuple:
        """Tokens per image after the merge."""
        return tuple(n - r for n, r in zip(self.seqlens, self.r))

    @property
    def is_identity(self) -> bool:
        """Nothing merges: outputs keep their inputs' shapes (a dense empty batch still merges r per image)."""
        return not any(self.r) and not (self.dense and self.dense_nr[1])

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
                     sources, (rc,) * batch, (n,) * batch, True, (n, rc))


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
        batch, n = len(seqlens), match.dense_nr[0] - (match.dense_nr[1] if merged else 0)
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
        batch, n_out = len(match.seqlens), match.dense_nr[0] - match.dense_nr[1]
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
    return out.view(len(match.seqlens), match.dense_nr[0], x.shape[-1]) if match.dense else out


def tome_source(match: TomeMatch, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ToMe's ``merge_source`` (dense batches): the adjacency ``[B, N_cur, N_orig]`` of merged tokens over the
    original patches, starting from the identity; merged with ``amax`` (a token covers the union)."""
    if not match.dense:
        raise ValueError("vlcore.ops.tome_source: the dense adjacency is for dense matches; use tome_track for varlen")
    batch, n = len(match.seqlens), match.dense_nr[0]
    if source is None:
        source = torch.eye(n, dtype=torch.float32, device=match.dest.device).expand(batch, n, n)
    return tome_merge(source, match, mode="amax")[0]


def tome_track(match: TomeMatch, origin: Optional[torch.Tensor] = None, *, validate: bool = False) -> torch.Tensor:
    """Compact source tracking: ``origin`` maps every original token to the current token that covers it
    (dense ``[B, N_orig]`` indices within the image; varlen ``[T_orig]`` global rows; the identity when None,
    i.e. before the first merge). Returns the map after this merge: chain it layer after layer, then unmerge
    to full resolution with ``x.gather``.

    ``origin`` must index the match's input tokens: ``[0, N)`` (dense) or ``[0, T)`` (varlen). Its values are
    checked when it is on the CPU, or anywhere with ``validate=True`` (a host sync on a GPU). Unchecked on a
    GPU, an out-of-range value trips ``gather``'s device-side assertion; it never wraps around."""
    where = "vlcore.ops.tome_track"
    dest = match.dest
    if match.dense:
        batch, n = len(match.seqlens), match.dense_nr[0]
        local = dest.view(batch, n) - torch.arange(batch, device=dest.device).view(batch, 1) * (n - match.dense_nr[1])
        if origin is None:
            return local
        _check_origin(origin, 2, batch, n, where, validate)
        return local.gather(1, origin.long())
    if origin is None:
        return dest
    _check_origin(origin, 1, None, dest.shape[0], where, validate)
    return dest.gather(0, origin.long())


def _check_origin(origin, dims, batch, limit, where, validate):
    if not isinstance(origin, torch.Tensor) or origin.dtype not in (torch.int64, torch.int32) or origin.dim() != dims:
        layout = "[B, N_orig] (dense match)" if dims == 2 else "[T_orig] (varlen match)"
        got = f"{origin.dtype} {tuple(origin.shape)}" if isinstance(origin, torch.Tensor) else type(origin).__name__
        raise ValueError(f"{where}: origin must be an int64 or int32 tensor {layout}, got {got}")
    if batch is not None and origin.shape[0] != batch:
        raise ValueError(f"{where}: origin must have the match's batch size {batch}, got {tuple(origin.shape)}")
    if origin.device != torch.device("cpu") and not validate:
        return
    values = origin.detach().cpu()
    bad = (values < 0) | (values >= limit)
    if bad.any():
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{where}: origin{list(at)} = {int(values[at])} is out of range: the match has {limit} "
                         f"input tokens{' per image' if dims == 2 else ''}")


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

torch.library.register_autograd("vlcore::tome_merge", _merge_backward, setup_context=_merge_setup_context)
torch.library.register_autograd("vlcore::tome_unmerge", _unmerge_backward, setup_context=_unmerge_setup_context)


# ---------------------------------------------------------------------------------------------------------
# References: ToMe's algorithm transcribed in plain PyTorch. The tests score the kernels against them in
# float64; vlcore.nn.backend runs them as impl="torch" in the model's dtype.


class TomeMatchRef(NamedTuple):
    """The reference matching: ToMe's index maps into the A (even) / B (odd) halves, each ``[B, *, 1]`` int64."""

    unmerged: torch.Tensor  # A tokens kept, [B, N_a - r, 1], ascending when a class token is protected
    src: torch.Tensor  # A tokens merged away, [B, r, 1]
    dst: torch.Tensor  # the B token each src merges into, [B, r, 1]


def tome_match_ref(metric: torch.Tensor, r: int, *, class_token: bool = False, distill_token: bool = False,
                   compute_dtype: torch.dtype = torch.float64) -> Optional[TomeMatchRef]:
    """ToMe's ``bipartite_soft_matching`` on ``[B, N, c]``, scoring in ``compute_dtype``: a
    :class:`TomeMatchRef`, or None when nothing merges (r capped at ``(N - protected) // 2``)."""
    r = tome_cap(metric.shape[1], r, class_token, distill_token)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric.to(compute_dtype)
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
    return TomeMatchRef(unmerged, src, dst)


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
