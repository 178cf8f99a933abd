"""FIBER-style fusion: alphas at 0 give the unimodal towers, ITM with shared K/V == with copied
negatives, hard-negative sampling, MLM masking, bad configurations."""

import pytest
import torch

from vlcore.models import create_model
from vlcore.models.fusion import IGNORE_INDEX, mask_tokens
from vlcore.models.tokenizer import ByteTokenizer

CAPTIONS = ["a red square", "two blue dots", "x", "a green line on grey", "nothing"]


def _batch(model, n=4):
    tokens = ByteTokenizer()(CAPTIONS[:n], model.context_length)
    return torch.randn(n, 3, model.image_size, model.image_size), tokens


def _alphas(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("cross.alpha")}


def test_fusion_starts_as_the_unimodal_towers():
    model = create_model("fiber-tiny", impl="torch")
    alphas = _alphas(model)
    k = model.config.fusion_cfg.layers
    assert len(alphas) == 2 * k and all(p.item() == 0 for p in alphas.values())
    fused_blocks = sorted({name.split(".cross")[0] for name in alphas})
    assert fused_blocks == sorted([f"text.blocks.{i}" for i in range(3 - k, 3)] + [f"visual.blocks.{i}" for i in range(3 - k, 3)])
    images, tokens = _batch(model)
    lengths = model.text.key_lengths(tokens)
    with torch.no_grad():
        fused_image, fused_text = model.upper(model.lower_image(images), model.lower_text(tokens), lengths, fuse=True)
        torch.testing.assert_close(fused_image, model.visual.forward_tokens(images)[0], rtol=0, atol=0)
        torch.testing.assert_close(fused_text, model.text.forward_tokens(tokens), rtol=0, atol=0)
        for p in alphas.values():
            p.fill_(0.5)
        moved_image, moved_text = model.upper(model.lower_image(images), model.lower_text(tokens), lengths, fuse=True)
    assert (moved_image - fused_image).abs().max() > 1e-3 and (moved_text - fused_text).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["fiber-tiny", "bridgetower-tiny"])
def test_itm_with_shared_kv_equals_copied_negatives(name):
    torch.manual_seed(0)
    copied = create_model(name, impl="torch")
    with torch.no_grad():
        for p in _alphas(copied).values():
            p.uniform_(0.5, 1.5)
    shared = create_model(name, impl="vlcore")
    shared.load_state_dict(copied.state_dict())
    images, tokens = _batch(copied, 5)
    results = []
    for model in (copied, shared):
        torch.manual_seed(1)  # same negatives and masks
        out = model(images, tokens)
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_c, grads_c), (out_s, grads_s) = results
    for key in ("itc", "itm", "mlm", "loss"):
        torch.testing.assert_close(out_s[key], out_c[key], atol=1e-5, rtol=1e-5)
    for param, grad in grads_c.items():
        torch.testing.assert_close(grads_s[param], grad, atol=1e-5, rtol=1e-4, msg=param)
    cross = "text.blocks.2.cross.alpha" if name == "fiber-tiny" else "text_cross.blocks.0.cross.kv.weight"
    assert grads_c[cross].abs().max() > 0  # the cross-attention is in the graph


def test_hard_negatives_come_from_the_similarities_and_never_the_positive():
    model = create_model("fiber-tiny", impl="torch")
    similarity = torch.full((4, 4), -50.0)
    similarity.fill_diagonal_(50.0)  # the positive dominates but may never be drawn
    hardest = torch.tensor([2, 3, 0, 1])
    similarity[torch.arange(4), hardest] = 40.0
    negative_text, negative_image = model.sample_negatives(similarity)
    assert torch.equal(negative_text, hardest)
    assert torch.equal(negative_image, hardest.argsort())  # column j's hardest row
    negative_text, negative_image = model.sample_negatives(torch.randn(6, 6))
    assert (negative_text != torch.arange(6)).all() and (negative_image != torch.arange(6)).all()


def test_mlm_masking_is_bert_80_10_10_and_skips_special_tokens():
    tok = ByteTokenizer()
    tokens = tok(["some text " * 6] * 400, 64)
    masked, labels = mask_tokens(tokens, probability=0.15, mask_token_id=tok.mask_id, vocab_size=tok.vocab_size,
                                 special_token_ids=tok.special_ids)
    special = torch.isin(tokens, torch.tensor(tok.special_ids))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any() and torch.equal(masked[special], tokens[special])
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(masked[~chosen], tokens[~chosen])
    rate = chosen.sum() / (~special).sum()
    replaced = (masked[chosen] == tok.mask_id).float().mean()
    kept = (masked[chosen] == tokens[chosen]).float().mean()
    # ~23k real tokens, ~3.5k chosen: 4-sigma binomial bands
    assert abs(rate - 0.15) < 0.01 and abs(replaced - 0.8) < 0.03 and abs(kept - 0.1) < 0.025


@pytest.mark.parametrize("overrides, message", [
    (dict(fusion_cfg={"layers": 4}), "fusion layers \\(4\\) must be in \\[1, min\\(vision layers 3, text layers 3\\)\\]"),
    (dict(fusion_cfg={"layers": 0}), "fusion layers \\(0\\) must be in"),
    (dict(text_cfg={"causal": True}), "must be bidirectional"),
    (dict(vision_cfg={"tome_r": 2}), "ToMe is not supported in the fused image tower"),
    (dict(fusion_cfg={"mask_token_id": 999}), "mask_token_id 999 is outside the vocabulary"),
    (dict(fusion_cfg={"variant": "meter"}), "variant must be one of"),
    (dict(fusion_cfg={"variant": "bridgetower", "layers": 4}), "fusion layers \\(4\\) must be in"),
])
def test_bad_fusion_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("fiber-tiny", **overrides)


def test_fusion_needs_two_pairs():
    model = create_model("fiber-tiny")
    with pytest.raises(ValueError, match="at least 2 pairs"):
        model(*_batch(model, 1))


def test_dual_encoder_and_match_scores_shapes():
    model = create_model("fiber-tiny")
    images, tokens = _batch(model, 3)
    assert model.encode_image(images).shape == model.encode_text(tokens).shape == (3, model.config.embed_dim)
    scores = model.match_scores(images, tokens)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()


def test_bridgetower_towers_stay_unimodal_and_bridges_feed_the_cross_encoder():
    model = create_model("bridgetower-tiny", impl="torch")
    assert not any(".cross." in n for n, _ in model.visual.named_parameters())
    images, tokens = _batch(model)
    lengths = model.text.key_lengths(tokens)
    image_states, text_states = model.lower_image(images), model.lower_text(tokens)
    assert len(image_states) == len(text_states) == model.config.fusion_cfg.layers
    with torch.no_grad():
        unimodal_image, unimodal_text = model.upper(image_states, text_states, lengths, fuse=False)
        torch.testing.assert_close(unimodal_image, model.visual.forward_tokens(images)[0], rtol=0, atol=0)
        torch.testing.assert_close(unimodal_text, model.text.forward_tokens(tokens), rtol=0, atol=0)
        # Layer 0 of the image side, written out: LN(W h + type) -> self-attn + cross-attn to the text bridge.
        image_in = model.image_cross.bridges[0](model.image_cross.bridge_proj(image_states[0]) + model.image_cross.type_embedding)
        text_in = model.text_cross.bridges[0](model.text_cross.bridge_proj(text_states[0]) + model.text_cross.type_embedding)
        block = model.image_cross.blocks[0]
        a = block.attn(block.norm1(image_in))
        a = a + block.cross(block.cross_norm(a), block.context_norm(text_in), context_lengths=lengths)
        want = image_in + a
        want = want + block.mlp(block.norm2(want))
        torch.testing.assert_close(model.image_cross.blocks[0](image_in, context=text_in, context_lengths=lengths), want)
        fused_image, fused_text = model.upper(image_states, text_states, lengths, fuse=True)
    assert fused_image.shape == unimodal_image.shape and fused_text.shape == unimodal_text.shape
