"""Contrastive losses: InfoNCE (CLIP) and sigmoid (SigLIP), single-process or distributed, plain or
memory-bounded (chunked).

Conventions follow open_clip (docs/models.md, 'Contrastive losses'): features arrive L2-normalised, ``logit_scale`` arrives
exp'd, ``logit_bias`` is optional. With ``world_size > 1`` every rank passes its local batch:

- ``gather_with_grad=True`` all-gathers features with an autograd-aware gather, so every rank's loss sends
  gradients to every rank's features. With DDP's gradient averaging, the update then equals the
  single-process update on the concatenated batch, for ``local_loss`` both True and False.
- ``gather_with_grad=False`` (open_clip's default) gathers without gradient: each rank's loss reaches only
  its own features. With ``local_loss=False`` the averaged feature gradient is then ``1 / world_size`` of
  the single-process one (tested); with ``local_loss=True`` no gradient flows through the columns
  (features used as negatives) at all.
- ``local_loss=True`` computes only the local rows ``[B_local, B_global]`` (labels offset by
  ``rank * B_local``); the mean over ranks of the losses is the single-process loss.
- SigLIP always uses the local-rows form: ``-sum(logsigmoid(y * logits)) / B_local`` over
  ``[B_local, B_global]``, the sum over ranks of what open_clip's ring exchange adds up.

``chunk_size`` (> 0) switches to :class:`ChunkedContrastive`, which never holds more than
``chunk_size x B_global`` logits (forward or backward) and gives the same values and gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------------
# Gathering features across ranks


class _AllGatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward sums every rank's gradient and keeps this rank's slice
    (an all-reduce: works on gloo, which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int):
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, *, local_loss: bool,
                    gather_with_grad: bool, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' features, ``[B_global, D]`` each (rank order). Without ``gather_with_grad`` the gather
    carries no gradient; unless ``local_loss``, this rank's slice is then the local tensor itself so that
    local gradients survive (open_clip's behaviour)."""
    if gather_with_grad:
        return (_AllGatherWithGrad.apply(image_features, rank, world_size),
                _AllGatherWithGrad.apply(text_features, rank, world_size))
    gathered = []
    for x in (image_features, text_features):
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.detach().contiguous())
        if not local_loss:
            parts[rank] = x
        gathered.append(torch.cat(parts))
    return gathered[0], gathered[1]


# ---------------------------------------------------------------------------------------------------------
# The chunked loss


class ChunkedContrastive(torch.autograd.Function):
    """``mean over rows`` of a contrastive loss of ``logits = scale * rows @ cols.T + bias``, computed
    ``chunk_size`` rows at a time; the backward recomputes each chunk's logits instead of storing them.

    ``rows [R, D]``, ``cols [N, D]``, ``labels [R]`` int64 (the positive column of each row; SigLIP:
    ``-1`` for a row whose positive is not among ``cols``). ``kind``:

    - ``"softmax"``: cross-entropy over each row (InfoNCE, one direction); saves the row log-sum-exps;
    - ``"sigmoid"``: ``-sum_j logsigmoid(y_ij * logits_ij)`` per row, ``y = +1`` at the label else ``-1``.

    Peak extra memory: ``chunk_size x N`` logits, never ``R x N``.
    """

    @staticmethod
    def forward(ctx, rows, cols, labels, scale, bias, kind: str, chunk_size: int):
        # The logits are accumulated in fp32 (or fp64) whatever autocast says: no bf16 matmul here.
        with torch.autocast(rows.device.type, enabled=False):
            return ChunkedContrastive._forward(ctx, rows, cols, labels, scale, bias, kind, chunk_size)

    @staticmethod
    def _forward(ctx, rows, cols, labels, scale, bias, kind, chunk_size):
        acc = _accumulation_dtype(rows)
        total = rows.new_zeros((), dtype=acc)
        lse = rows.new_empty(rows.shape[0], dtype=acc)
        for start in range(0, rows.shape[0], chunk_size):
            end = min(start + chunk_size, rows.shape[0])
            logits = _chunk_logits(rows[start:end], cols, scale, bias, acc)
            chunk_labels = labels[start:end]
            if kind == "softmax":
                lse[start:end] = logits.logsumexp(dim=1)
                positive = logits.gather(1, chunk_labels[:, None])[:, 0]
                total += (lse[start:end] - positive).sum()
            else:
                total += -F.logsigmoid(logits * _sign(logits, chunk_labels)).sum()
        ctx.save_for_backward(rows, cols, labels, scale, bias if bias is not None else scale.new_zeros(()), lse)
        ctx.kind, ctx.chunk_size, ctx.has_bias = kind, chunk_size, bias is not None
        return (total / rows.shape[0]).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.autocast(grad_loss.device.type, enabled=False):
            return ChunkedContrastive._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        rows, cols, labels, scale, bias, lse = ctx.saved_tensors
        acc = _accumulation_dtype(rows)
        g = grad_loss.to(acc) / rows.shape[0]
        scale_acc = scale.to(acc)
        grad_rows = torch.empty_like(rows, dtype=acc)
        grad_cols = torch.zeros_like(cols, dtype=acc)
        grad_scale = torch.zeros((), dtype=acc, device=rows.device)
        grad_bias = torch.zeros((), dtype=acc, device=rows.device)
        cols_acc = cols.to(acc)
        for start in range(0, rows.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, rows.shape[0])
            chunk = rows[start:end].to(acc)
            dots = chunk @ cols_acc.t()
            logits = scale_acc * dots + (bias.to(acc) if ctx.has_bias else 0.0)
            chunk_labels = labels[start:end]
            if ctx.kind == "softmax":
                grad_logits = torch.exp(logits - lse[start:end, None])
                grad_logits[torch.arange(end - start, device=rows.device), chunk_labels] -= 1.0
            else:
                sign = _sign(logits, chunk_labels)
                grad_logits = -sign * torch.sigmoid(-sign * logits)
            grad_logits *= g
            grad_rows[start:end] = scale_acc * (grad_logits @ cols_acc)
            grad_cols += scale_acc * (grad_logits.t() @ chunk)
            grad_scale += (grad_logits * dots).sum()
            grad_bias += grad_logits.sum()
        return (grad_rows.to(rows.dtype), grad_cols.to(cols.dtype), None, grad_scale.to(scale.dtype),
                grad_bias.to(bias.dtype) if ctx.has_bias else None, None, None)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half types (the logits' softmax needs it), the input's own dtype for fp32 / fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_logits(rows, cols, scale, bias, acc):
    logits = scale.to(acc) * (rows.to(acc) @ cols.to(acc).t())
    return logits + bias.to(acc) if bias is not None else logits


def _sign(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SigLIP's targets for a chunk of rows: +1 at each row's label column (none when the label is -1)."""
    sign = torch.full_like(logits, -1.0)
    has_positive = labels >= 0
    rows = torch.arange(logits.shape[0], device=logits.device)[has_positive]
    sign[rows, labels[has_positive]] = 1.0
    return sign


def _row_loss(rows, cols, labels, scale, bias, kind: str, chunk_size: int) -> torch.Tensor:
    """Mean over ``rows`` of the contrastive row loss, plain (chunk_size <= 0) or chunked."""
    if chunk_size > 0:
        return ChunkedContrastive.apply(rows, cols, labels, scale, bias, kind, chunk_size)
    logits = scale * rows @ cols.t()
    if bias is not None:
        logits = logits + bias
    if kind == "softmax":
        return F.cross_entropy(logits, labels)
    return -F.logsigmoid(logits * _sign(logits, labels)).sum() / rows.shape[0]


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------------------
# The losses


class ClipLoss(nn.Module):
    """InfoNCE, ``½ (CE(logits_per_image) + CE(logits_per_text))`` (open_clip's ``ClipLoss``)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                 chunk_size: int = 0):
        super().__init__()
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size, self.chunk_size = rank, world_size, chunk_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale = _as_tensor(logit_scale, image_features)
        local = image_features.shape[0]
        if self.world_size > 1:
            all_images, all_texts = gather_features(
                image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size)
        else:
            all_images, all_texts = image_features, text_features
        if self.world_size > 1 and self.local_loss:
            rows_images, rows_texts = image_features, text_features
            labels = torch.arange(local, device=image_features.device) + local * self.rank
        else:
            rows_images, rows_texts = all_images, all_texts
            labels = torch.arange(all_images.shape[0], device=image_features.device)
        loss_images = _row_loss(rows_images, all_texts, labels, scale, logit_bias, "softmax", self.chunk_size)
        loss_texts = _row_loss(rows_texts, all_images, labels, scale, logit_bias, "softmax", self.chunk_size)
        return (loss_images + loss_texts) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss, ``-sum_ij logsigmoid(y_ij (s <x_i, t_j> + b)) / B_local`` with ``y = 2 I - 1``
    (open_clip's ``SigLipLoss``). Distributed: local images against all ranks' texts, gathered with grad (the
    same sum open_clip's ring exchange computes)."""

    def __init__(self, rank: int = 0, world_size: int = 1, chunk_size: int = 0):
        super().__init__()
        self.rank, self.world_size, self.chunk_size = rank, world_size, chunk_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale = _as_tensor(logit_scale, image_features)
        local = image_features.shape[0]
        texts = text_features
        if self.world_size > 1:
            texts = _AllGatherWithGrad.apply(text_features, self.rank, self.world_size)
        labels = torch.arange(local, device=image_features.device) + local * self.rank
        return _row_loss(image_features, texts, labels, scale, logit_bias, "sigmoid", self.chunk_size)
