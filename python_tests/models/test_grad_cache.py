"""Gradient caching: the same loss and parameter gradients as one backward over the full batch."""

import pytest
import torch

from vlcore.models import create_model
from vlcore.models.grad_cache import grad_cache_backward
from vlcore.models.losses import ClipLoss, SigLipLoss
from vlcore.models.tokenizer import ByteTokenizer


@pytest.mark.parametrize("name, loss_fn, micro_batch", [
    ("clip-tiny", ClipLoss(), 3),
    ("clip-tiny", ClipLoss(chunk_size=4), 1),
    ("siglip-tiny", SigLipLoss(), 4),
    ("clip-tiny", ClipLoss(), 64),  # one micro-batch holding everything
])
def test_grad_cache_equals_full_batch_backward(name, loss_fn, micro_batch):
    torch.manual_seed(0)
    model = create_model(name, impl="torch")
    images = torch.randn(10, 3, 32, 32)
    tokens = ByteTokenizer()([f"caption {i} " * (i % 3 + 1) for i in range(10)], model.context_length)

    out = model(images, tokens)
    want_loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    got_loss = grad_cache_backward(model, loss_fn, images, tokens, micro_batch)
    torch.testing.assert_close(got_loss, want_loss.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_grad_cache_rejects_empty_micro_batches():
    with pytest.raises(ValueError, match="micro_batch must be positive, got 0"):
        grad_cache_backward(create_model("clip-tiny"), ClipLoss(), torch.randn(2, 3, 32, 32), torch.zeros(2, 4).long(), 0)
