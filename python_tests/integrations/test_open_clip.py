"""patch_open_clip against open_clip's own CLIP: same features, logits, loss and gradients; ToMe as ToMe does it."""

import copy

import pytest
import torch

from python_tests.integrations.helpers import (assert_close, assert_grads_close, need, reference_tome_blocks,
                                               spy_on_attention)

VISION = dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16)
TEXT = dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2)


def tiny_clip(vision=None, text=None):
    need("open_clip")
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg={**VISION, **(vision or {})}, text_cfg={**TEXT, **(text or {})})
    with torch.no_grad():  # open_clip initialises in_proj biases to 0; random ones exercise them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def tokens(batch=3):
    t = torch.randint(1, 98, (batch, 16))
    t[:, 10:] = 0
    t[torch.arange(batch), torch.tensor([9, 5, 3])[:batch]] = 99  # end-of-text: the highest id
    return t


def run(model, images, text):
    from open_clip.loss import ClipLoss

    model.zero_grad()
    image_features, text_features, logit_scale = model(images, text)[:3]
    loss = ClipLoss()(image_features, text_features, logit_scale)
    loss.backward()
    return image_features.detach(), text_features.detach(), loss.detach()


@pytest.mark.parametrize("vision,text", [({}, {}), ({"pool_type": "avg"}, {}),
                                         ({"qk_norm": True}, {"qk_norm": True})])
def test_patched_clip_matches_open_clip(vision, text):
    from vlcore.integrations import patch_open_clip

    reference = tiny_clip(vision, text)
    patched = copy.deepcopy(reference)
    keys = list(reference.state_dict())
    report = patch_open_clip(patched)
    assert len(report.attention) == 5, str(report)
    assert list(patched.state_dict()) == keys
    images, text_tokens = torch.randn(3, 3, 32, 32), tokens()
    for got, want, what in zip(run(patched, images, text_tokens), run(reference, images, text_tokens),
                               ("image features", "text features", "loss")):
        assert_close(got, want, what=what)
    assert_grads_close(patched, reference)


def test_text_tower_runs_causal_vlcore_attention(monkeypatch):
    from vlcore.integrations import patch_open_clip

    model = tiny_clip()
    patch_open_clip(model)
    seen = spy_on_attention(monkeypatch)
    model.encode_text(tokens())
    model.encode_image(torch.randn(1, 3, 32, 32))
    assert seen == [True, True, False, False, False]


def _open_clip_reference_tome(visual, images, schedule):
    x = visual._embeds(images)

    def qkv_of(block, x):
        attn = block.attn
        q, k, v = torch.nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        return (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k, v))

    x = reference_tome_blocks(x, visual.transformer.resblocks, schedule, qkv_of,
                              lambda b, y: b.ls_1(b.attn.out_proj(y)), lambda b, x: b.ls_2(b.mlp(b.ln_2(x))))
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj


@pytest.mark.parametrize("tome_r,schedule", [(4, [4, 4, 4]), ((2, -1.0), [4, 2, 0])])
def test_tome_matches_reference_tome(tome_r, schedule):
    from vlcore.integrations import patch_open_clip

    reference = tiny_clip()
    patched = copy.deepcopy(reference)
    report = patch_open_clip(patched, tome_r=tome_r)
    assert report.tome == {"visual.transformer": schedule}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _open_clip_reference_tome(reference.visual, images, schedule)
        got = patched.visual(images)
    assert_close(got, expected, what="ToMe image features")
    patched.zero_grad()
    run(patched, images, tokens(2))
    assert patched.visual.transformer.resblocks[0].attn.in_proj_weight.grad is not None


def test_patched_clip_compiles():
    from vlcore.integrations import patch_open_clip

    model = tiny_clip()
    patch_open_clip(model, tome_r=2)
    images, text_tokens = torch.randn(2, 3, 32, 32), tokens(2)
    eager = model(images, text_tokens)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(images, text_tokens)
    assert_close(out[0], eager[0], what="compiled image features")
    assert_close(out[1], eager[1], what="compiled text features")
    (out[0].sum() + out[1].sum()).backward()


def test_nvfp4_and_report():
    from vlcore.integrations import patch_open_clip

    model = tiny_clip()
    report = patch_open_clip(model, nvfp4=True)
    converted = report.nvfp4.converted
    assert any(name.endswith("attn.out_proj") for name in converted), str(report)
    assert any(name.endswith("mlp.c_fc") for name in converted)
    assert any("in_proj" in name for name, _ in report.left_alone)
    image_features, text_features, scale = model(torch.randn(2, 3, 32, 32), tokens(2))[:3]
    (image_features @ text_features.t()).sum().backward()
    assert "left alone" in str(report)
