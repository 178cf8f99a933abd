"""seq_pack family: pack, unpack, scatter_image_embeds against plain-PyTorch references."""

import pytest
import torch
from torch.library import opcheck

import vlcore
from vlcore.ops.seq_pack import pack_ref, scatter_image_embeds_ref, unpack_ref

from ..conftest import DEVICES, random_tensor

# Awkward lengths: empty samples, single tokens, primes, sizes that are not multiples of any tile.
LENGTH_SETS = [[0], [1], [5, 0, 3], [13, 1, 0, 7, 31], [97, 64, 2, 0, 1, 127], [0, 0, 0]]
ROW_SHAPES = [(), (1,), (3,), (7, 5), (136,), (257,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.complex64]


def cu_seqlens_of(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


def padded_sample(lengths, row_shape, dtype, device, extra=3):
    padded_len = max(lengths) + extra
    padded = random_tensor((len(lengths), padded_len, *row_shape), dtype, device)
    return padded, cu_seqlens_of(lengths, device), sum(lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("lengths", LENGTH_SETS)
def test_seq_pack_matches_reference(device, dtype, row_shape, lengths, poisoned):
    padded, cu, total = padded_sample(lengths, row_shape, dtype, device)
    out = vlcore.ops.pack(padded, cu, total)
    assert out.shape == (total, *row_shape) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, pack_ref(padded, cu))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("lengths", LENGTH_SETS)
def test_seq_unpack_matches_reference(device, dtype, row_shape, lengths, poisoned):
    cu = cu_seqlens_of(lengths, device)
    packed = random_tensor((sum(lengths), *row_shape), dtype, device)
    pad = True if dtype == torch.bool else 7
    padded_len = max(lengths) + 2
    out = vlcore.ops.unpack(packed, cu, padded_len, pad)
    assert out.shape == (len(lengths), padded_len, *row_shape)
    assert torch.equal(out, unpack_ref(packed, cu, padded_len, pad))
    assert torch.equal(vlcore.ops.pack(out, cu, sum(lengths)), packed)


@pytest.mark.parametrize("device", DEVICES)
def test_seq_unpack_pad_values(device):
    packed = torch.arange(3.0, device=device)
    cu = cu_seqlens_of([1, 2], device)
    assert vlcore.ops.unpack(packed, cu, 3, float("-inf")).tolist() == [[0.0, float("-inf"), float("-inf")],
                                                                         [1.0, 2.0, float("-inf")]]
    assert vlcore.ops.unpack(packed.long(), cu, 2, -100).tolist() == [[0, -100], [1, 2]]


def scatter_sample(total, num_image, row_shape, dtype, device):
    text = random_tensor((total, *row_shape), dtype, device)
    image = random_tensor((num_image, *row_shape), dtype, device)
    positions = torch.randperm(total)[:num_image].to(device)
    return text, image, positions


SCATTER_CASES = [(0, 0), (1, 0), (1, 1), (17, 5), (97, 96), (300, 144)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_shape", [(), (3,), (136,), (2, 9)])
@pytest.mark.parametrize("total,num_image", SCATTER_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_scatter_image_embeds_matches_reference(device, dtype, row_shape, total, num_image, index_dtype, poisoned):
    text, image, positions = scatter_sample(total, num_image, row_shape, dtype, device)
    positions = positions.to(index_dtype)
    out = vlcore.ops.scatter_image_embeds(text, image, positions)
    assert torch.equal(out, scatter_image_embeds_ref(text, image, positions))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("total,num_image", SCATTER_CASES)
def test_scatter_image_embeds_backward_matches_reference(device, dtype, total, num_image, poisoned):
    text, image, positions = scatter_sample(total, num_image, (136,), dtype, device)
    grad = random_tensor(text.shape, dtype, device)
    got = torch.autograd.grad(vlcore.ops.scatter_image_embeds(text.requires_grad_(), image.requires_grad_(), positions),
                              (text, image), grad)
    want = torch.autograd.grad(scatter_image_embeds_ref(text, image, positions), (text, image), grad)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", LENGTH_SETS)
def test_seq_pack_unpack_backward_matches_reference(device, lengths, poisoned):
    padded, cu, total = padded_sample(lengths, (5,), torch.float32, device)
    padded.requires_grad_()
    grad = torch.randn(total, 5, device=device)
    (got,) = torch.autograd.grad(vlcore.ops.pack(padded, cu, total), padded, grad)
    (want,) = torch.autograd.grad(pack_ref(padded, cu), padded, grad)
    assert torch.equal(got, want)
    packed = torch.randn(total, 5, device=device, requires_grad=True)
    grad = torch.randn(len(lengths), padded.shape[1], 5, device=device)
    (got,) = torch.autograd.grad(vlcore.ops.unpack(packed, cu, padded.shape[1], 3.0), packed, grad)
    (want,) = torch.autograd.grad(unpack_ref(packed, cu, padded.shape[1], 3.0), packed, grad)
    assert torch.equal(got, want)


@pytest.mark.parametrize("lengths", [[0], [1], [5, 0, 3], [13, 1, 0, 7]])
def test_seq_pack_gradcheck(lengths):
    padded, cu, total = padded_sample(lengths, (3,), torch.float64, "cpu")
    packed = torch.randn(total, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: vlcore.ops.pack(x, cu, total), (padded.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda x: vlcore.ops.unpack(x, cu, padded.shape[1], 1.5), (packed,))
    assert torch.autograd.gradgradcheck(lambda x: vlcore.ops.pack(x, cu, total), (padded,))


@pytest.mark.parametrize("total,num_image", [(1, 1), (17, 5), (9, 0)])
def test_scatter_image_embeds_gradcheck(total, num_image):
    text, image, positions = scatter_sample(total, num_image, (4,), torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda t, i: vlcore.ops.scatter_image_embeds(t, i, positions),
                                    (text.requires_grad_(), image.requires_grad_()))


def opcheck_samples(device):
    """Inputs for opcheck, including non-contiguous ones (transposed views, strided slices)."""
    padded, cu, total = padded_sample([5, 0, 3], (4,), torch.float32, device)
    strided = torch.randn(4, 3, padded.shape[1], device=device).transpose(0, 2)[..., :3].transpose(0, 1)
    yield torch.ops.vlcore.seq_pack, (padded.requires_grad_(), cu, total)
    yield torch.ops.vlcore.seq_pack, (strided.requires_grad_(), cu, total)
    packed = torch.randn(4, total, device=device).t()
    yield torch.ops.vlcore.seq_unpack, (packed.requires_grad_(), cu, 6, 0.5)
    yield torch.ops.vlcore.seq_unpack, (torch.randint(0, 9, (total,), device=device), cu, 6, -100)
    text, image, positions = scatter_sample(11, 4, (6,), torch.float32, device)
    yield torch.ops.vlcore.scatter_image_embeds, (text.requires_grad_(), image.requires_grad_(), positions)
    yield torch.ops.vlcore.scatter_image_embeds, (text.t().contiguous().t().requires_grad_(),
                                                  torch.randn(6, 4, device=device).t().requires_grad_(), positions)
    yield torch.ops.vlcore.scatter_image_embeds_backward, (torch.randn(6, 11, device=device).t(), positions)


@pytest.mark.parametrize("device", DEVICES)
def test_seq_pack_opcheck(device):
    for op, args in opcheck_samples(device):
        opcheck(op, args)


def test_seq_pack_compile():
    lengths = [5, 0, 3, 8]
    padded, cu, total = padded_sample(lengths, (6,), torch.float32, "cpu")
    image = torch.randn(4, 6, requires_grad=True)
    positions = torch.tensor([0, 1, 9, 15])

    def step(padded, image):
        packed = vlcore.ops.pack(padded, cu, total)
        packed = vlcore.ops.scatter_image_embeds(packed, image, positions)
        return vlcore.ops.unpack(packed * 2, cu, padded.shape[1], 0.0).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = padded.clone().requires_grad_()
    y = padded.clone().requires_grad_()
    loss_c, loss_e = compiled(x, image), step(y, image)
    assert torch.equal(loss_c, loss_e)
    (gc,) = torch.autograd.grad(loss_c, x)
    (ge,) = torch.autograd.grad(loss_e, y)
    assert torch.equal(gc, ge)


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

CU = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731


@pytest.mark.parametrize("cu,total,match", [
    (torch.tensor([0, 2, 3]), 3, "cu_seqlens must be int32, got Long"),
    (CU(1, 2, 3), 3, r"cu_seqlens must start at 0"),
    (CU(0, 3, 2), 2, r"cu_seqlens must be non-decreasing"),
    (CU(0, 2, 3), 4, r"cu_seqlens must end at the total token count 4"),
    (CU(0, 5, 6), 6, r"sample 0 has length 5 > padded_len"),
    (CU(0, 2), 2, r"cu_seqlens must have batch \+ 1 = 3 entries"),
    (CU(0), 0, r"cu_seqlens must have batch \+ 1 = 3 entries"),
    (CU(0, 1, 2).reshape(1, 3), 2, r"cu_seqlens must be 1-D"),
    (CU(0, 4, 9), 9, r"total_tokens = 9 cannot fit 2 samples of at most padded_len \(padded.size\(1\)\) = 4"),
])
def test_seq_pack_bad_cu_seqlens(cu, total, match):
    with pytest.raises(ValueError, match=match):
        vlcore.ops.pack(torch.randn(2, 4, 3), cu, total)


@pytest.mark.parametrize("cu,total,match", [
    (torch.tensor([0, 2, 3]), 3, "cu_seqlens must be int32, got torch.int64"),
    (CU(1, 2, 3), 3, r"cu_seqlens must start at 0"),
    (CU(0, 3, 2), 2, r"cu_seqlens must be non-decreasing"),
    (CU(0, 2, 3), 4, r"cu_seqlens must end at the total token count 4"),
    (CU(0, 5, 6), 6, r"sample 0 has length 5 > padded_len"),
    (CU(0, 2, 3), 2, r"cu_seqlens must end at the total token count 2"),
    (CU(), 0, r"cu_seqlens must be 1-D with batch \+ 1 >= 1 entries"),
])
def test_seq_pack_validate_on_host(cu, total, match):
    """validate=True runs the host-side checks that CUDA kernels cannot do without a sync."""
    with pytest.raises(ValueError, match=match):
        vlcore.ops.pack(torch.randn(len(cu) - 1 if len(cu) > 1 else 2, 4, 3), cu, total, validate=True)


@pytest.mark.parametrize("cu,packed_rows,match", [
    (CU(0, 5, 6), 6, r"vlcore.ops.unpack: sample 0 has length 5 > padded_len = 4"),
    (CU(0, 2, 3), 4, r"cu_seqlens must end at the total token count 4"),
    (CU(0, 3, 2), 3, r"cu_seqlens must be non-decreasing"),
])
def test_seq_unpack_validate_on_host(cu, packed_rows, match):
    with pytest.raises(ValueError, match=match):
        vlcore.ops.unpack(torch.randn(packed_rows, 3), cu, 4, validate=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row_shape", [(), (5,)])
def test_seq_pack_empty_batch(device, row_shape, poisoned):
    """B = 0 (cu_seqlens = [0]) gives empty results, forward and backward, with and without validate."""
    cu = CU(0).to(device)
    for validate in (False, True):
        padded = torch.randn(0, 7, *row_shape, device=device, requires_grad=True)
        packed = vlcore.ops.pack(padded, cu, 0, validate=validate)
        assert packed.shape == (0, *row_shape)
        unpacked = vlcore.ops.unpack(packed, cu, 7, -1.0, validate=validate)
        assert unpacked.shape == (0, 7, *row_shape)
        (grad,) = torch.autograd.grad(unpacked.sum(), padded)
        assert grad.shape == padded.shape


@pytest.mark.parametrize("dtype,pad", [(torch.int8, 300), (torch.int32, 2**40), (torch.int64, float("nan"))])
def test_seq_unpack_pad_value_that_does_not_fit(dtype, pad):
    """Where torch's checked conversion refuses the value (torch.full's rule), a ValueError names pad_value."""
    with pytest.raises(ValueError, match=r"seq_unpack: pad_value = .* does not fit the dtype"):
        vlcore.ops.unpack(torch.zeros(3, dtype=dtype), CU(0, 3), 4, pad)


@pytest.mark.parametrize("cu,packed_rows,match", [
    (CU(0, 2, 3), 4, r"cu_seqlens must end at the total token count 4"),
    (CU(0, 2, 7), 7, r"sample 1 has length 5 > padded_len = 4"),
    (CU(0, 2, 9), 9, r"packed has 9 tokens, more than 2 samples of at most padded_len = 4 tokens hold"),
    (CU(0), 2, r"packed has 2 tokens, more than 0 samples"),
])
def test_seq_unpack_bad_input(cu, packed_rows, match):
    with pytest.raises(ValueError, match=match):
        vlcore.ops.unpack(torch.randn(packed_rows, 3), cu, 4)
    with pytest.raises(ValueError, match="padded_len must be >= 0"):
        vlcore.ops.unpack(torch.randn(3, 3), CU(0, 3), -1)


def test_scatter_image_embeds_bad_input():
    text, image, pos = torch.randn(10, 4), torch.randn(3, 4), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"image_positions must have shape \(num_image_tokens,\) = \(3,\)"):
        vlcore.ops.scatter_image_embeds(text, image, pos[:2])
    with pytest.raises(ValueError, match=r"image_embeds must have shape \(num_image_tokens, \[4\]\)"):
        vlcore.ops.scatter_image_embeds(text, torch.randn(3, 5), pos)
    with pytest.raises(ValueError, match="image_embeds must have the dtype of text_embeds"):
        vlcore.ops.scatter_image_embeds(text, image.double(), pos)
    with pytest.raises(ValueError, match="image_positions must be int64 or int32"):
        vlcore.ops.scatter_image_embeds(text, image, pos.float())
    for bad, match in [(torch.tensor([1, 2, 10]), r"image_positions\[2\] = 10 is out of range for 10"),
                       (torch.tensor([1, -1, 3]), r"image_positions\[1\] = -1 is out of range"),
                       (torch.tensor([1, 2, 1]), "image_positions must be unique")]:
        with pytest.raises(ValueError, match=match):
            vlcore.ops.scatter_image_embeds(text, image, bad)
        with pytest.raises(ValueError, match=match):
            vlcore.ops.scatter_image_embeds(text, image, bad, validate=True)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA kernels and a GPU")
def test_seq_pack_cuda_wrong_device():
    with pytest.raises(ValueError, match="cu_seqlens must be on the same device as padded"):
        vlcore.ops.pack(torch.randn(2, 4, 3, device="cuda"), CU(0, 2, 3), 3)
    with pytest.raises(ValueError, match="image_positions must be on the same device as text_embeds"):
        vlcore.ops.scatter_image_embeds(torch.randn(5, 2, device="cuda"), torch.randn(1, 2, device="cuda"),
                                        torch.tensor([1]))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA kernels and a GPU")
def test_seq_pack_validate_on_cuda():
    """The CUDA kernels cannot check values without a sync; validate=True does, on the host."""
    with pytest.raises(ValueError, match="non-decreasing"):
        vlcore.ops.pack(torch.randn(2, 4, 3, device="cuda"), CU(0, 3, 2).cuda(), 2, validate=True)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA kernels and a GPU")
def test_seq_pack_cuda_understated_lengths_leave_no_uninitialised_output(poisoned):
    """Values that the CUDA kernels cannot check without a sync still give fully written outputs: rows
    without a valid source are zeros (the pad value in unpack), never uninitialised memory."""
    padded = torch.randn(2, 4, 3, device="cuda")
    # sample 0 claims 6 tokens but padded_len is 4: its rows 4 and 5 have no source
    out = vlcore.ops.pack(padded, CU(0, 6, 8).cuda(), 8)
    assert torch.equal(out[:4], padded[0]) and torch.equal(out[6:], padded[1, :2])
    assert torch.equal(out[4:6], torch.zeros(2, 3, device="cuda"))
    # total_tokens above cu_seqlens[-1]: the rows past the end are zeros
    out = vlcore.ops.pack(padded, CU(0, 2, 3).cuda(), 6)
    assert torch.equal(out[:3], pack_ref(padded, CU(0, 2, 3))) and not out[3:].any()
    # unpack truncates a sample longer than padded_len and pads the rest
    out = vlcore.ops.unpack(torch.arange(6.0, device="cuda"), CU(0, 5, 6).cuda(), 4, -1.0)
    assert out.tolist() == [[0.0, 1.0, 2.0, 3.0], [5.0, -1.0, -1.0, -1.0]]
    # duplicate and out-of-range image positions: the last duplicate wins; the others get zero gradient
    grad = torch.randn(6, 3, device="cuda")
    positions = torch.tensor([1, 4, 1, 9, -2], device="cuda")
    grad_text, grad_image = torch.ops.vlcore.scatter_image_embeds_backward(grad, positions)
    replaced = torch.tensor([False, True, False, False, True, False], device="cuda")
    assert torch.equal(grad_text, torch.where(replaced[:, None], 0.0, grad))
    assert torch.equal(grad_image, torch.stack([torch.zeros(3, device="cuda"), grad[4], grad[1],
                                                torch.zeros(3, device="cuda"), torch.zeros(3, device="cuda")]))
    out = vlcore.ops.scatter_image_embeds(torch.zeros(6, 3, device="cuda"), torch.eye(5, 3, device="cuda"), positions)
    assert torch.equal(out[1], torch.eye(5, 3, device="cuda")[2])
    # and with no text rows at all, every image row still gets a (zero) gradient
    _, grad_image = torch.ops.vlcore.scatter_image_embeds_backward(torch.randn(0, 3, device="cuda"), positions)
    assert torch.equal(grad_image, torch.zeros(5, 3, device="cuda"))
