"""Host-side value checks that the CUDA kernels cannot do without a device synchronisation."""

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None, max_len: int | None = None,
                     *, op: str = "vlcore", max_len_name: str = "max_len", min_batch: int = 1) -> None:
    """Raise ValueError unless ``cu_seqlens`` is int32, 1-D with at least ``min_batch + 1`` entries, starts
    at 0, is non-decreasing, ends at ``total`` and has no segment longer than ``max_len``. Reads the values:
    syncs when on a GPU."""
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{op}: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < min_batch + 1:
        raise ValueError(f"{op}: cu_seqlens must be 1-D with batch + 1 >= {min_batch + 1} entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu[0])}")
    lengths = cu.diff()
    if (lengths < 0).any():
        b = int((lengths < 0).nonzero()[0])
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got cu_seqlens[{b}] = {int(cu[b])} > "
                         f"cu_seqlens[{b + 1}] = {int(cu[b + 1])}")
    if max_len is not None and (lengths > max_len).any():
        b = int((lengths > max_len).nonzero()[0])
        raise ValueError(f"{op}: sample {b} has length {int(lengths[b])} > {max_len_name} = {max_len}")
    if total is not None and cu[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must end at the total token count {total}, got "
                         f"cu_seqlens[-1] = {int(cu[-1])}")


def check_image_positions(image_positions: torch.Tensor, total: int, *, op: str = "vlcore") -> None:
    """Raise ValueError unless every position is in ``[0, total)`` and unique (syncs when on a GPU)."""
    pos = image_positions.detach().to("cpu", torch.int64)
    bad = (pos < 0) | (pos >= total)
    if bad.any():
        j = int(bad.nonzero()[0])
        raise ValueError(f"{op}: image_positions[{j}] = {int(pos[j])} is out of range for {total} packed tokens")
    if pos.unique().numel() != pos.numel():
        raise ValueError(f"{op}: image_positions must be unique")
