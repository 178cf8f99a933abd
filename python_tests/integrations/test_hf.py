"""patch_hf against transformers' own CLIPModel and SiglipModel: same features, logits, loss and gradients."""

import copy

import pytest
import torch

from python_tests.integrations.helpers import assert_close, assert_grads_close, need, spy_on_attention

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
            max_position_embeddings=16)


def tiny_model(kind):
    transformers = need("transformers")
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config={**TEXT, "eos_token_id": 99, "pad_token_id": 0,
                                                      "bos_token_id": 98}, vision_config=VISION, projection_dim=32)
        model = transformers.CLIPModel(config)
    else:
        config = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
        model = transformers.SiglipModel(config)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")  # the reference: transformers' own attention
    return model.eval()


def inputs(kind, batch=3):
    ids = torch.randint(1, 98, (batch, 16))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded row: the key-padding mask reaches the attention
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    lengths = mask.sum(1)
    ids[torch.arange(batch), lengths - 1] = 99
    return dict(pixel_values=torch.randn(batch, 3, 32, 32), input_ids=ids, attention_mask=mask, return_loss=True)


def run(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.image_embeds.detach(), out.text_embeds.detach(), out.logits_per_image.detach(), out.loss.detach()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_patched_model_matches_transformers(kind):
    from vlcore.integrations import patch_hf

    reference = tiny_model(kind)
    patched = copy.deepcopy(reference)
    keys = list(reference.state_dict())
    report = patch_hf(patched)
    assert len(report.attention) == 4, str(report)
    assert list(patched.state_dict()) == keys
    batch = inputs(kind)
    for got, want, what in zip(run(patched, batch), run(reference, batch), ("image", "text", "logits", "loss")):
        assert_close(got, want, what=what)
    assert_grads_close(patched, reference)
    if kind == "siglip":
        assert any("head" in name for name, _ in report.left_alone)


def test_patched_clip_calls_vlcore_attention(monkeypatch):
    from vlcore.integrations import patch_hf

    model = tiny_model("clip")
    patch_hf(model)
    seen = spy_on_attention(monkeypatch)
    batch = inputs("clip")
    batch.pop("return_loss")
    model(**batch)
    assert sorted(seen) == [False, False, True, True]


def test_patched_clip_compiles():
    from vlcore.integrations import patch_hf

    model = tiny_model("clip")
    patch_hf(model)
    batch = inputs("clip")
    eager = model(**batch).loss
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(**batch).loss
    assert_close(loss.detach(), eager.detach(), what="compiled loss")
    loss.backward()


def test_nvfp4_and_tome_refusal():
    from vlcore.integrations import patch_hf

    model = tiny_model("clip")
    with pytest.raises(ValueError, match="ToMe"):
        patch_hf(model, tome_r=2)
    report = patch_hf(model, nvfp4=True)
    assert any("encoder.layers" in name for name in report.nvfp4.converted), str(report)
    model(**inputs("clip")).loss.backward()
