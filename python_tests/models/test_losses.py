"""Contrastive losses: against the formulas written out, chunked == plain (values and gradients), and
2-process gloo == single process on the concatenated batch (values and gradients)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlcore.models.losses import ChunkedContrastive, ClipLoss, SigLipLoss


def _features(batch, dim=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    texts = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    return images, texts


def _info_nce_formula(images, texts, scale, bias=None):
    # L = 1/2 (mean_i -log softmax_j(s <x_i, t_j> + b)_ii + mean_j -log softmax_i(...)_jj), loops over rows
    total = 0.0
    n = images.shape[0]
    for i in range(n):
        row = scale * texts @ images[i] + (bias if bias is not None else 0.0)
        col = scale * images @ texts[i] + (bias if bias is not None else 0.0)
        total = total - torch.log_softmax(row, 0)[i] / (2 * n) - torch.log_softmax(col, 0)[i] / (2 * n)
    return total


def _siglip_formula(images, texts, scale, bias):
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(label * (scale * images[i] @ texts[j] + bias))
    return total / n


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_clip_loss_matches_the_formula(batch):
    images, texts = _features(batch)
    scale = torch.tensor(14.3, dtype=torch.float64)
    torch.testing.assert_close(ClipLoss()(images, texts, scale), _info_nce_formula(images, texts, scale))
    bias = torch.tensor(-0.7, dtype=torch.float64)
    torch.testing.assert_close(ClipLoss()(images, texts, scale, bias), _info_nce_formula(images, texts, scale, bias))


@pytest.mark.parametrize("batch", [1, 5])
def test_siglip_loss_matches_the_formula(batch):
    images, texts = _features(batch)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    torch.testing.assert_close(SigLipLoss()(images, texts, scale, bias), _siglip_formula(images, texts, scale, bias))


def _grads(loss_fn, images, texts, scale, bias):
    leaves = [t.detach().clone().requires_grad_(True) for t in (images, texts, scale, bias)]
    loss = loss_fn(leaves[0], leaves[1], leaves[2], leaves[3])
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
@pytest.mark.parametrize("batch, chunk", [(1, 1), (7, 1), (7, 3), (13, 5), (6, 64)])
def test_chunked_loss_equals_plain_loss_values_and_gradients(loss_cls, batch, chunk):
    images, texts = _features(batch, dtype=torch.float32, seed=batch)
    scale, bias = torch.tensor(12.0), torch.tensor(-3.0)
    plain, plain_grads = _grads(loss_cls(), images, texts, scale, bias)
    chunked, chunked_grads = _grads(loss_cls(chunk_size=chunk), images, texts, scale, bias)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_loss_keeps_fp32_logits_under_autocast():
    images, texts = _features(33, dim=32, dtype=torch.float32)
    want = ClipLoss()(images, texts, torch.tensor(50.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ClipLoss(chunk_size=8)(images, texts, torch.tensor(50.0))
        lossy = ClipLoss()(images, texts, torch.tensor(50.0))  # bf16 logits: the error the chunked path avoids
    assert (got - want).abs() < 1e-5 < (lossy - want).abs()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_chunked_function_gradcheck(kind):
    rows, cols = _features(5, dim=4)
    cols = torch.cat([cols, _features(2, dim=4, seed=1)[0]])  # more columns than rows, as in local-loss form
    labels = torch.tensor([0, 3, 1, 6, 2]) if kind == "softmax" else torch.tensor([0, -1, 1, 6, 2])
    scale, bias = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (rows, cols)] + [labels] + [
        t.clone().requires_grad_(True) for t in (scale, bias)]
    assert torch.autograd.gradcheck(lambda r, c, y, s, b: ChunkedContrastive.apply(r, c, y, s, b, kind, 2), inputs)


def test_chunked_loss_never_materialises_the_full_logits():
    # Record every tensor allocated during forward + backward; none may hold B x B logits.
    batch, chunk = 64, 8
    images, texts = _features(batch, dim=8, dtype=torch.float32)
    images.requires_grad_(True)
    sizes = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    with Spy():
        ClipLoss(chunk_size=chunk)(images, texts, torch.tensor(10.0)).backward()
    assert max(sizes) <= chunk * batch
    with Spy():
        ClipLoss()(images, texts, torch.tensor(10.0))
    assert max(sizes) == batch * batch  # the spy does see the plain loss's logits


# ---------------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes on CPU


WORLD = 2
# (loss, options, DDP-averaged feature gradient / single-process one); scale and bias always match exactly
CASES = [
    ("clip", dict(local_loss=True, gather_with_grad=True), 1.0),
    ("clip", dict(local_loss=False, gather_with_grad=True), 1.0),
    ("clip", dict(local_loss=True, gather_with_grad=True, chunk_size=3), 1.0),
    # open_clip's default: the gather carries no gradient, each rank's full loss only reaches its own
    # features, so their averaged gradient is 1/world_size of the single-process one (use gather_with_grad).
    ("clip", dict(local_loss=False, gather_with_grad=False), 1.0 / WORLD),
    ("siglip", dict(), 1.0),
    ("siglip", dict(chunk_size=2), 1.0),
]


def _make_loss(kind, kwargs, rank, world_size):
    cls = ClipLoss if kind == "clip" else SigLipLoss
    return cls(rank=rank, world_size=world_size, **kwargs)


def _worker(rank, port, batch, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images, texts = _features(WORLD * batch, dtype=torch.float64)
        local = slice(rank * batch, (rank + 1) * batch)
        out = []
        for kind, kwargs, _ in CASES:
            scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
            bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
            img = images[local].clone().requires_grad_(True)
            txt = texts[local].clone().requires_grad_(True)
            loss = _make_loss(kind, kwargs, rank, WORLD)(img, txt, scale, bias)
            loss.backward()
            # What DDP does with each rank's gradients: average them (the loss is averaged the same way).
            shared = torch.stack([loss.detach(), scale.grad, bias.grad])
            dist.all_reduce(shared)
            out.append((shared / WORLD, img.grad / WORLD, txt.grad / WORLD))
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_losses_equal_single_process_loss_and_gradients():
    batch = 3
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), batch, results), nprocs=WORLD, join=True)
    images, texts = _features(WORLD * batch, dtype=torch.float64)
    for case, (kind, kwargs, grad_factor) in enumerate(CASES):
        single_kwargs = {k: v for k, v in kwargs.items() if k == "chunk_size"}
        loss, grads = _grads(_make_loss(kind, single_kwargs, 0, 1), images, texts,
                             torch.tensor(9.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64))
        for rank in range(WORLD):
            shared, image_grad, text_grad = results[rank][case]
            local = slice(rank * batch, (rank + 1) * batch)
            torch.testing.assert_close(shared, torch.stack([loss, grads[2], grads[3]]), msg=f"{kind} {kwargs}")
            torch.testing.assert_close(image_grad, grad_factor * grads[0][local], msg=f"{kind} {kwargs}")
            torch.testing.assert_close(text_grad, grad_factor * grads[1][local], msg=f"{kind} {kwargs}")
