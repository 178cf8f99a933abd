"""patch_timm against timm's own VisionTransformer: same logits, loss and gradients; ToMe as ToMe does it."""

import copy

import pytest
import torch
import torch.nn.functional as F

from python_tests.integrations.helpers import (assert_close, assert_grads_close, need, reference_tome_blocks,
                                               spy_on_attention)


def tiny_vit(**kwargs):
    need("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10, qkv_bias=True)
    args.update(kwargs)
    return VisionTransformer(**args).eval()


def loss_and_grads(model, images, labels):
    model.zero_grad()
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return logits.detach(), loss.detach()


@pytest.mark.parametrize("kwargs", [{}, {"global_pool": "avg", "qk_norm": True}, {"class_token": False, "global_pool": "avg"}])
def test_patched_vit_matches_timm(kwargs):
    from vlcore.integrations import patch_timm

    reference = tiny_vit(**kwargs)
    patched = copy.deepcopy(reference)
    keys = list(reference.state_dict())
    report = patch_timm(patched)
    assert report.attention == [f"blocks.{i}.attn" for i in range(3)], str(report)
    assert list(patched.state_dict()) == keys
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 7])
    logits, loss = loss_and_grads(patched, images, labels)
    ref_logits, ref_loss = loss_and_grads(reference, images, labels)
    assert_close(logits, ref_logits, what="logits")
    assert_close(loss, ref_loss, what="loss")
    assert_grads_close(patched, reference)


def test_patched_vit_calls_vlcore_attention(monkeypatch):
    from vlcore.integrations import patch_timm

    model = tiny_vit()
    patch_timm(model)
    calls = spy_on_attention(monkeypatch)
    model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 3


def _timm_reference_tome(model, images, schedule):
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))

    def qkv_of(block, x):
        a = block.attn
        q, k, v = a.qkv(block.norm1(x)).reshape(x.shape[0], x.shape[1], 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        return a.q_norm(q), a.k_norm(k), v

    x = reference_tome_blocks(x, model.blocks, schedule, qkv_of, lambda b, y: b.ls1(b.attn.proj(y)),
                              lambda b, x: b.ls2(b.mlp(b.norm2(x))))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("tome_r,schedule", [(3, [3, 3, 3]), ((3, -0.5), [4, 3, 2]), ([2, 0, 5], [2, 0, 5])])
def test_tome_matches_reference_tome(tome_r, schedule):
    from vlcore.integrations import patch_timm

    reference = tiny_vit()
    patched = copy.deepcopy(reference)
    report = patch_timm(patched, tome_r=tome_r)
    assert report.tome == {"blocks": schedule}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _timm_reference_tome(reference, images, schedule)
        features = patched.forward_features(images)
    assert features.shape[1] == 17 - sum(schedule)
    assert_close(patched.forward_head(features), expected, what="ToMe logits")
    # trains: gradients flow through the merges and the proportional attention
    patched.zero_grad()
    F.cross_entropy(patched(images), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in patched.parameters() if p.requires_grad)


def test_tome_rejects_too_large_r():
    from vlcore.integrations import patch_timm

    with pytest.raises(ValueError, match="tome_r"):
        patch_timm(tiny_vit(), tome_r=9)


def test_patched_vit_compiles():
    from vlcore.integrations import patch_timm

    model = tiny_vit()
    expected = model(torch.randn(2, 3, 32, 32))
    patch_timm(model, tome_r=2)
    images = torch.randn(2, 3, 32, 32)
    eager = model(images)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_close(compiled(images), eager, what="compiled")
    compiled(images).sum().backward()
    assert expected.shape == eager.shape


def test_nvfp4_converts_block_linears():
    from vlcore.integrations import patch_timm
    from vlcore.nvfp4 import NVFP4Linear

    model = tiny_vit()
    report = patch_timm(model, nvfp4=True)
    assert report.nvfp4.converted and all(name.startswith("blocks.") for name in report.nvfp4.converted)
    assert isinstance(model.get_submodule(report.nvfp4.converted[0]), NVFP4Linear)
    images = torch.randn(2, 3, 32, 32)
    model(images).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
