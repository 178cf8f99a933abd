"""Sequence packing ops: padded <-> packed token rows, and the LLaVA image-embedding scatter.

Layouts follow flash-attn's varlen convention:

- padded: ``[B, L, *row]``, sample ``b`` valid in rows ``0 .. len_b - 1``;
- packed: ``[T, *row]`` with ``T = sum(len_b)``, sample ``b`` in rows ``cu_seqlens[b] .. cu_seqlens[b+1] - 1``;
- ``cu_seqlens``: int32 ``[B + 1]`` with a leading 0, on the same device as the data.

``*row`` is any trailing shape (none for token ids, ``C`` for embeddings) and any dtype: the kernels move
whole rows of bytes. Sizes that only the data knows (``T``, ``L``) are passed as Python ints, computed
once when the batch is built (see :mod:`vlcore.packing`), never read back from the GPU.

An empty batch (``B = 0``, ``cu_seqlens = [0]``) gives empty results.

Value checks: the CPU kernels check every value of ``cu_seqlens`` / ``image_positions``. The CUDA kernels
check what the shapes alone tell (``T <= B * L``), never read or write out of bounds, and write every
output element whatever the values: a row that bad values leave without a source (a sample longer than
``padded_len``, ``total_tokens`` above ``cu_seqlens[-1]``, a duplicate or out-of-range image position)
comes out as zeros (the pad value in ``unpack``), and of duplicate image positions the last one wins.
Checking the values themselves there would need a host sync, so pass ``validate=True`` to check on the host
(a sync on GPU; use it when debugging a data pipeline): it raises the CPU kernels' ValueError for each such case.
"""

import torch

from vlcore.ops._validate import check_cu_seqlens, check_image_positions

__all__ = ["pack", "unpack", "scatter_image_embeds", "pack_ref", "unpack_ref", "scatter_image_embeds_ref"]


def pack(padded: torch.Tensor, cu_seqlens: torch.Tensor, total_tokens: int, *, validate: bool = False) -> torch.Tensor:
    """Pack ``padded [B, L, *row]`` into ``[total_tokens, *row]``, dropping each sample's padding.

    ``total_tokens`` must equal ``cu_seqlens[-1]``. Differentiable with respect to ``padded``.
    """
    if validate:
        check_cu_seqlens(cu_seqlens, total_tokens, padded.shape[1] if padded.dim() >= 2 else None,
                         op="vlcore.ops.pack", max_len_name="padded_len (padded.shape[1])", min_batch=0)
    return torch.ops.vlcore.seq_pack(padded, cu_seqlens, total_tokens)


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, padded_len: int, pad_value: float | int | bool = 0, *,
           validate: bool = False) -> torch.Tensor:
    """Unpack ``packed [T, *row]`` into ``[B, padded_len, *row]``, filling padding with ``pad_value``.

    Every sample must fit: ``cu_seqlens[b+1] - cu_seqlens[b] <= padded_len``. Differentiable with respect
    to ``packed``.
    """
    if validate:
        check_cu_seqlens(cu_seqlens, packed.shape[0] if packed.dim() >= 1 else None, padded_len,
                         op="vlcore.ops.unpack", max_len_name="padded_len", min_batch=0)
    return torch.ops.vlcore.seq_unpack(packed, cu_seqlens, padded_len, pad_value)


def scatter_image_embeds(text_embeds: torch.Tensor, image_embeds: torch.Tensor, image_positions: torch.Tensor, *,
                         validate: bool = False) -> torch.Tensor:
    """The LLaVA merge step: ``out = text_embeds`` with ``out[image_positions[j]] = image_embeds[j]``.

    ``text_embeds [T, *row]`` are the packed text embeddings (image placeholders included),
    ``image_embeds [N, *row]`` the vision tokens in order, ``image_positions [N]`` (int64 or int32) the
    unique packed rows they replace. Differentiable with respect to both embeddings; a replaced text
    row receives zero gradient.
    """
    if validate:
        check_image_positions(image_positions, text_embeds.shape[0], op="vlcore.ops.scatter_image_embeds")
    return torch.ops.vlcore.scatter_image_embeds(text_embeds, image_embeds, image_positions)


# ---------------------------------------------------------------------------------------------------------
# Fakes: shapes only, contiguous outputs like the kernels.


def _check_cu_seqlens_meta(op: str, cu_seqlens: torch.Tensor, data: torch.Tensor) -> int:
    torch._check(cu_seqlens.dtype == torch.int32, lambda: f"vlcore::{op}: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    torch._check(cu_seqlens.dim() == 1, lambda: f"vlcore::{op}: cu_seqlens must be 1-D")
    torch._check(cu_seqlens.shape[0] >= 1, lambda: f"vlcore::{op}: cu_seqlens needs batch + 1 >= 1 entries")
    torch._check(cu_seqlens.device == data.device, lambda: f"vlcore::{op}: cu_seqlens must be on {data.device}")
    return cu_seqlens.shape[0] - 1


@torch.library.register_fake("vlcore::seq_pack")
def _(padded, cu_seqlens, total_tokens):
    torch._check(padded.dim() >= 2, lambda: "vlcore::seq_pack: padded must have shape (batch, padded_len, ...)")
    batch = _check_cu_seqlens_meta("seq_pack", cu_seqlens, padded)
    torch._check(batch == padded.shape[0], lambda: "vlcore::seq_pack: cu_seqlens must have batch + 1 entries")
    torch._check(total_tokens >= 0, lambda: "vlcore::seq_pack: total_tokens must be >= 0")
    torch._check(total_tokens <= batch * padded.shape[1],
                 lambda: "vlcore::seq_pack: total_tokens cannot fit batch samples of at most padded_len tokens")
    return padded.new_empty((total_tokens, *padded.shape[2:]))


@torch.library.register_fake("vlcore::seq_unpack")
def _(packed, cu_seqlens, padded_len, pad_value):
    torch._check(packed.dim() >= 1, lambda: "vlcore::seq_unpack: packed must have shape (total_tokens, ...)")
    batch = _check_cu_seqlens_meta("seq_unpack", cu_seqlens, packed)
    torch._check(padded_len >= 0, lambda: "vlcore::seq_unpack: padded_len must be >= 0")
    torch._check(packed.shape[0] <= batch * padded_len,
                 lambda: "vlcore::seq_unpack: packed has more tokens than batch samples of padded_len hold")
    return packed.new_empty((batch, padded_len, *packed.shape[1:]))


@torch.library.register_fake("vlcore::scatter_image_embeds")
def _(text_embeds, image_embeds, image_positions):
    torch._check(image_embeds.shape[1:] == text_embeds.shape[1:],
                 lambda: "vlcore::scatter_image_embeds: image_embeds rows must match text_embeds rows")
    torch._check(image_positions.shape == (image_embeds.shape[0],),
                 lambda: "vlcore::scatter_image_embeds: image_positions must have shape (num_image_tokens,)")
    return text_embeds.new_empty(text_embeds.shape)


@torch.library.register_fake("vlcore::scatter_image_embeds_backward")
def _(grad_out, image_positions):
    torch._check(image_positions.dim() == 1, lambda: "vlcore::scatter_image_embeds_backward: image_positions must be 1-D")
    return grad_out.new_empty(grad_out.shape), grad_out.new_empty((image_positions.shape[0], *grad_out.shape[1:]))


# ---------------------------------------------------------------------------------------------------------
# Autograd: pack and unpack are each other's backward; the scatter has a fused backward op.


def _pack_setup_context(ctx, inputs, output):
    padded, cu_seqlens, total_tokens = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.padded_len = padded.shape[1]


def _pack_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return torch.ops.vlcore.seq_unpack(grad, cu_seqlens, ctx.padded_len, 0), None, None


def _unpack_setup_context(ctx, inputs, output):
    packed, cu_seqlens, padded_len, pad_value = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.total_tokens = packed.shape[0]


def _unpack_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    return torch.ops.vlcore.seq_pack(grad, cu_seqlens, ctx.total_tokens), None, None, None


def _scatter_setup_context(ctx, inputs, output):
    text_embeds, image_embeds, image_positions = inputs
    ctx.save_for_backward(image_positions)


def _scatter_backward(ctx, grad):
    (image_positions,) = ctx.saved_tensors
    grad_text, grad_image = torch.ops.vlcore.scatter_image_embeds_backward(grad, image_positions)
    return grad_text, grad_image, None


torch.library.register_autograd("vlcore::seq_pack", _pack_backward, setup_context=_pack_setup_context)
torch.library.register_autograd("vlcore::seq_unpack", _unpack_backward, setup_context=_unpack_setup_context)
torch.library.register_autograd("vlcore::scatter_image_embeds", _scatter_backward, setup_context=_scatter_setup_context)


# ---------------------------------------------------------------------------------------------------------
# References: the plainest PyTorch that computes the same thing, for tests and the benchmark's peer.


def pack_ref(padded: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    lengths = cu_seqlens.diff().tolist()
    rows = [padded[b, :n] for b, n in enumerate(lengths)]
    return torch.cat(rows) if rows else padded.new_empty((0, *padded.shape[2:]))


def unpack_ref(packed: torch.Tensor, cu_seqlens: torch.Tensor, padded_len: int, pad_value=0) -> torch.Tensor:
    cu = cu_seqlens.tolist()
    out = packed.new_full((len(cu) - 1, padded_len, *packed.shape[1:]), pad_value)
    for b in range(len(cu) - 1):
        out[b, : cu[b + 1] - cu[b]] = packed[cu[b] : cu[b + 1]]
    return out


def scatter_image_embeds_ref(text_embeds: torch.Tensor, image_embeds: torch.Tensor,
                             image_positions: torch.Tensor) -> torch.Tensor:
    replaced = torch.zeros(text_embeds.shape[0], dtype=torch.bool, device=text_embeds.device)
    replaced[image_positions.long()] = True
    replaced = replaced.reshape(-1, *([1] * (text_embeds.dim() - 1)))
    # where(), not a multiply by 0: replaced rows then get zero gradient even when they hold inf/nan
    out = torch.where(replaced, torch.zeros((), dtype=text_embeds.dtype, device=text_embeds.device), text_embeds)
    return out.index_put((image_positions.long(),), image_embeds)
