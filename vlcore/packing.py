"""Multimodal sequence packing without padding and without cross-sample attention.

Two steps, both on the host, so that nothing in the training step has to read sizes back from the GPU:

1. :func:`plan` groups samples by length into packs of at most ``max_len`` tokens (first-fit or
   best-fit decreasing, O(n log n)).
2. :func:`build_packed_batch` concatenates one pack's samples into a :class:`PackedBatch`: flat tokens,
   ``cu_seqlens`` (flash-attn's int32 convention), ``max_seqlen`` as a host int, per-sample positions
   that restart at 0, labels with ``-100`` on each sample's first token and on image placeholders, and
   the packed rows the vision tokens go to (for :func:`vlcore.ops.scatter_image_embeds`).

Labels are unshifted (Hugging Face's convention): the loss pairs ``logits[t - 1]`` with ``labels[t]``.
Masking each sample's first label is what stops the last token of one sample from being trained to
predict the first token of the next.
"""

from __future__ import annotations

import bisect
import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal, Sequence

import torch

__all__ = ["PackingPlan", "plan", "padded_waste", "PackedBatch", "build_packed_batch", "pack_samples", "vlp_length_mix"]

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class PackingPlan:
    """Which samples go into which pack. ``bins[k]`` lists sample indices in ascending order."""

    bins: list[list[int]]
    lengths: list[int]  # per sample, after truncation
    max_len: int
    truncated: list[int] = field(default_factory=list)  # samples cut to max_len (truncate=True only)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def efficiency(self) -> float:
        """Fraction of the ``len(bins) * max_len`` token slots that hold real tokens."""
        return self.num_tokens / (len(self.bins) * self.max_len) if self.bins else 1.0

    @property
    def waste(self) -> float:
        return 1.0 - self.efficiency

    def bin_lengths(self) -> list[int]:
        return [sum(self.lengths[i] for i in b) for b in self.bins]


def plan(lengths: Sequence[int] | torch.Tensor, max_len: int, *,
         algorithm: Literal["first_fit", "best_fit"] = "first_fit", truncate: bool = False) -> PackingPlan:
    """Pack samples of the given lengths into as few bins of ``max_len`` tokens as the heuristic finds.

    ``algorithm="first_fit"`` is first-fit decreasing (each sample, longest first, goes to the first
    bin with room); ``"best_fit"`` is best-fit decreasing (the bin it fills most tightly). Both take
    O(n log n) comparisons and O(n) memory whatever ``max_len`` is, and never exceed ``max_len``. A sample
    longer than ``max_len`` raises ``ValueError`` unless ``truncate=True``, which cuts it to ``max_len`` and
    records it in ``PackingPlan.truncated``. Zero-length samples are valid and take no room.

    ``lengths`` is a 1-D sequence, tensor or array of integers and ``max_len`` an integer (Python, numpy or
    0-d tensor; a float only when it holds an integer); anything else raises ``ValueError`` naming it.
    """
    if getattr(lengths, "ndim", 1) != 1:
        raise ValueError(f"plan: lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    lengths = [_as_int(n, f"lengths[{i}]") for i, n in enumerate(lengths)]
    max_len = _as_int(max_len, "max_len")
    if max_len <= 0:
        raise ValueError(f"plan: max_len must be positive, got {max_len}")
    truncated = []
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"plan: lengths[{i}] = {n} is negative")
        if n > max_len:
            if not truncate:
                raise ValueError(f"plan: lengths[{i}] = {n} exceeds max_len = {max_len}; "
                                 "pass truncate=True to cut such samples to max_len")
            truncated.append(i)
            lengths[i] = max_len
    # Longest first; ties by index so that the plan is deterministic.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if algorithm == "first_fit":
        assignment = _first_fit(order, lengths, max_len)
    elif algorithm == "best_fit":
        assignment = _best_fit(order, lengths, max_len)
    else:
        raise ValueError(f"plan: algorithm must be 'first_fit' or 'best_fit', got {algorithm!r}")
    bins: list[list[int]] = [[] for _ in range(max(assignment, default=-1) + 1)]
    for i, b in enumerate(assignment):
        bins[b].append(i)
    return PackingPlan(bins=bins, lengths=lengths, max_len=max_len, truncated=truncated)


def _first_fit(order: list[int], lengths: list[int], max_len: int) -> list[int]:
    # A max-segment tree over bins' free space. Bins not opened yet are empty (free = max_len), so the
    # leftmost bin with room is exactly first fit, opening a new bin when no open one has room.
    size = 1
    while size < max(len(order), 1):
        size *= 2
    free = [max_len] * (2 * size)
    assignment = [0] * len(lengths)
    for i in order:
        need, node = lengths[i], 1
        while node < size:  # descend to the leftmost leaf with free >= need
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        assignment[i] = node - size
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return assignment


def _as_int(value, name: str) -> int:
    """``value`` as a Python int (a copy: never an alias of the caller's tensor), or ValueError naming it."""
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ValueError(f"plan: {name} must be an integer, got {value!r}")


def _best_fit(order: list[int], lengths: list[int], max_len: int) -> list[int]:
    # The open bins as a sorted list of (free space, stamp, bin); the best bin is the first entry with
    # free >= need (a bisection). Among bins with equal free space the most recently filled one (highest
    # stamp) wins, which makes the plan deterministic. Memory is O(bins), whatever max_len is.
    open_bins: list[tuple[int, int, int]] = []
    assignment = [0] * len(lengths)
    num_bins = 0
    for stamp, i in enumerate(order):
        need = lengths[i]
        at = bisect.bisect_left(open_bins, (need,))
        if at == len(open_bins):  # no open bin has room: open one
            b, free = num_bins, max_len
            num_bins += 1
        else:
            last_with_that_free = bisect.bisect_left(open_bins, (open_bins[at][0] + 1,)) - 1
            free, _, b = open_bins.pop(last_with_that_free)
        assignment[i] = b
        bisect.insort(open_bins, (free - need, stamp, b))
    return assignment


def padded_waste(lengths: Sequence[int], batch_size: int) -> float:
    """Padding waste of ordinary batching: consecutive batches of ``batch_size`` samples, each padded to
    its longest sample. The baseline that :func:`plan` is measured against."""
    lengths = [int(n) for n in lengths]
    slots = sum(batch_size * max(lengths[k : k + batch_size]) for k in range(0, len(lengths), batch_size))
    return 1.0 - sum(lengths) / slots if slots else 0.0


# ---------------------------------------------------------------------------------------------------------
# Building a packed batch


@dataclass
class PackedBatch:
    """One pack of samples laid end to end. T = total tokens, B = samples, N = image tokens."""

    input_ids: torch.Tensor  # [T] int64, image placeholders included
    labels: torch.Tensor  # [T] int64, -100 where no loss is taken
    position_ids: torch.Tensor  # [T] int64, restarting at 0 in every sample
    sample_ids: torch.Tensor  # [T] int32, index of each token's sample in this pack (0..B-1)
    cu_seqlens: torch.Tensor  # [B + 1] int32, leading 0 (flash-attn varlen convention)
    image_positions: torch.Tensor  # [N] int64, packed rows of the image placeholders, ascending
    image_spans: torch.Tensor  # [num_images, 2] int64, (first row, length) of each run of placeholders
    max_seqlen: int  # longest sample, a host int computed once here
    sample_index: list[int]  # the dataset index of each sample

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def to(self, device, non_blocking: bool = True) -> PackedBatch:
        """Move every tensor; host ints stay host ints. Pin the batch first for truly async copies."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(**{f.name: (v.pin_memory() if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                              for f in fields(self)})


def build_packed_batch(samples: Sequence[dict], image_token_id: int | None = None, *,
                       sample_index: Sequence[int] | None = None) -> PackedBatch:
    """Concatenate samples into a :class:`PackedBatch`.

    Each sample is a dict with ``input_ids`` (1-D int64, image placeholders already expanded to one
    token per vision embedding) and optionally ``labels`` (same shape, ``-100`` where no loss is wanted,
    e.g. on a prompt). Placeholders equal to ``image_token_id`` become ``image_positions`` and get
    label ``-100``; so does each sample's first token.
    """
    if len(samples) == 0:
        raise ValueError("build_packed_batch: empty batch (no samples)")
    ids, labels, lengths = [], [], []
    for k, s in enumerate(samples):
        if not isinstance(s, Mapping) or "input_ids" not in s:
            raise ValueError(f"build_packed_batch: samples[{k}] must be a dict with 'input_ids' (and optionally "
                             f"'labels'), got {type(s).__name__}")
        x = torch.as_tensor(s["input_ids"])
        if x.dim() != 1 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"build_packed_batch: samples[{k}]['input_ids'] must be a 1-D integer tensor, "
                             f"got shape {tuple(x.shape)} dtype {x.dtype}")
        y = torch.as_tensor(s["labels"]) if "labels" in s else x
        if y.shape != x.shape:
            raise ValueError(f"build_packed_batch: samples[{k}]['labels'] has shape {tuple(y.shape)}, "
                             f"expected {tuple(x.shape)} like its input_ids")
        y = y.to(torch.int64).clone()
        if y.numel():
            y[0] = IGNORE_INDEX
        ids.append(x.to(torch.int64))
        labels.append(y)
        lengths.append(x.numel())
    input_ids = torch.cat(ids)
    label = torch.cat(labels)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    cu_seqlens = torch.zeros(len(samples) + 1, dtype=torch.int32)
    torch.cumsum(lengths_t, 0, out=cu_seqlens[1:])
    sample_ids = torch.repeat_interleave(torch.arange(len(samples), dtype=torch.int32), lengths_t)
    position_ids = torch.arange(input_ids.numel(), dtype=torch.int64) - cu_seqlens[:-1].long().repeat_interleave(lengths_t)
    if image_token_id is not None:
        image_positions = (input_ids == image_token_id).nonzero().flatten()
        label[image_positions] = IGNORE_INDEX
    else:
        image_positions = torch.empty(0, dtype=torch.int64)
    return PackedBatch(
        input_ids=input_ids, labels=label, position_ids=position_ids, sample_ids=sample_ids, cu_seqlens=cu_seqlens,
        image_positions=image_positions, image_spans=_runs(image_positions, sample_ids),
        max_seqlen=max(lengths), sample_index=list(sample_index) if sample_index is not None else list(range(len(samples))))


def _runs(positions: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    """(start, length) of each run of consecutive positions; a run never crosses a sample boundary."""
    if positions.numel() == 0:
        return torch.empty(0, 2, dtype=torch.int64)
    breaks = (positions.diff() != 1) | (sample_ids[positions[1:]] != sample_ids[positions[:-1]])
    starts_at = torch.cat([torch.zeros(1, dtype=torch.int64), breaks.nonzero().flatten() + 1])
    ends_at = torch.cat([starts_at[1:], torch.tensor([positions.numel()])])
    return torch.stack([positions[starts_at], ends_at - starts_at], dim=1)


def pack_samples(samples: Sequence[dict], max_len: int, image_token_id: int | None = None, *,
                 algorithm: Literal["first_fit", "best_fit"] = "first_fit") -> tuple[list[PackedBatch], PackingPlan]:
    """Plan and build: every sample of ``samples`` lands in exactly one returned :class:`PackedBatch`."""
    p = plan([len(s["input_ids"]) for s in samples], max_len, algorithm=algorithm)
    batches = [build_packed_batch([samples[i] for i in b], image_token_id, sample_index=b) for b in p.bins]
    return batches, p


# ---------------------------------------------------------------------------------------------------------
# A realistic length mix, for the demo and the benchmark


def vlp_length_mix(n: int, image_tokens: Sequence[int] = (144, 576), seed: int = 0) -> list[int]:
    """A realistic pre-training mix: captions lognormal over 5..77 tokens plus one image of 144 or 576
    tokens (LLaVA-style pooled or 24x24 grids)."""
    g = torch.Generator().manual_seed(seed)
    captions = torch.exp(torch.randn(n, generator=g) * 0.6 + math.log(18.0)).round().clamp(5, 77).long()
    images = torch.tensor(image_tokens)[torch.randint(len(image_tokens), (n,), generator=g)]
    return (captions + images).tolist()
