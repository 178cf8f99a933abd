"""LLaVA-style captioner on packed sequences: packed loss == per-sample losses (no cross-sample attention,
positions reset, loss only on caption tokens), KV-cache batched greedy generation == recomputing greedy."""

import pytest
import torch
import torch.nn.functional as F

from vlcore.models import create_model
from vlcore.models.tokenizer import ByteTokenizer
from vlcore.packing import build_packed_batch

TOK = ByteTokenizer()
CAPTIONS = ["a cat", "two dogs on a mat", "x"]


def _samples(model, captions=CAPTIONS):
    # prompt = <start_of_text> (no loss), caption = bytes + <end_of_text> (loss)
    return [model.sample([*TOK.encode(c), TOK.eot_id], prompt_ids=[TOK.sot_id]) for c in captions]


def _images(model, n):
    return torch.randn(n, 3, model.image_size, model.image_size)


@pytest.mark.parametrize("impl", ["torch", "vlcore"])
def test_packed_loss_equals_per_sample_losses(impl):
    model = create_model("captioner-tiny", impl=impl)
    samples, images = _samples(model), _images(model, 3)
    out = model(build_packed_batch(samples, image_token_id=model.image_token_id), images)
    assert out["num_targets"].item() == sum(len(c) + 1 for c in CAPTIONS)  # caption bytes + end-of-text only
    total = 0.0
    for i, sample in enumerate(samples):
        alone = model(build_packed_batch([sample], image_token_id=model.image_token_id), images[i : i + 1])
        total = total + alone["loss"] * alone["num_targets"]
    torch.testing.assert_close(out["loss"], total / out["num_targets"], atol=1e-5, rtol=1e-5)


def test_packed_loss_is_the_plain_next_token_loss():
    # One sample, written out without packing: embed, scatter the image rows, causal LM, shifted CE.
    model = create_model("captioner-tiny", impl="torch")
    sample, image = _samples(model)[1], _images(model, 1)
    out = model(build_packed_batch([sample], image_token_id=model.image_token_id), image)
    ids = sample["input_ids"][None]
    x = model.lm.token_embedding(ids) + model.lm.positional_embedding[: ids.shape[1]]
    x[0, : model.num_image_tokens] = model.image_tokens(image)[0]
    for block in model.lm.blocks:
        x = block(x)
    logits = model.lm_head(model.lm.norm_final(x))[0, :-1]
    want = F.cross_entropy(logits, sample["labels"][1:], ignore_index=-100)
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=1e-5)


def _greedy_without_cache(model, image, prompt, steps, eos):
    ids = [model.image_token_id] * model.num_image_tokens + list(prompt)
    out = []
    for _ in range(steps):
        t = torch.tensor(ids)[None]
        x = model.lm.token_embedding(t) + model.lm.positional_embedding[: t.shape[1]]
        x[0, : model.num_image_tokens] = model.image_tokens(image[None])[0]
        for block in model.lm.blocks:
            x = block(x)
        nxt = int(model.lm_head(model.lm.norm_final(x))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out


@pytest.mark.parametrize("impl", ["torch", "vlcore"])
def test_batched_cached_generation_equals_recomputed_greedy(impl):
    model = create_model("captioner-tiny", impl=impl).eval()
    with torch.no_grad():  # sharpen the LM so greedy choices are well separated from ties
        model.lm_head.weight.mul_(20)
    images = _images(model, 3)
    prompts = [[TOK.sot_id], [TOK.sot_id, 66, 67, 68], [TOK.sot_id, 70]]  # different lengths: left padding
    got = model.generate(images, prompts, max_new_tokens=6, eos_token_id=None)
    with torch.no_grad():
        want = [_greedy_without_cache(model, images[i], prompts[i], 6, None) for i in range(3)]
    assert got == want
    eos = want[0][2]
    stopped = model.generate(images[:1], prompts[:1], max_new_tokens=6, eos_token_id=eos)
    assert stopped == [want[0][: want[0].index(eos) + 1]]


@pytest.mark.parametrize("connector, vision, expected", [
    ({"kind": "merge_2x2"}, {}, 64 // 4),
    ({"kind": "bilinear", "output_hw": [3, 5]}, {}, 15),
    ({"kind": "none"}, {}, 64),
    ({"kind": "none"}, {"tome_r": [8, 6]}, 64 - 8 - 6),  # ToMe in the vision tower only, before the projector
])
def test_connectors_train(connector, vision, expected):
    model = create_model("captioner-tiny", impl="torch", connector_cfg=connector, vision_cfg=vision)
    assert model.config.vision_cfg.grid_size == 8
    assert model.num_image_tokens == expected
    images = _images(model, 2)
    assert model.image_tokens(images).shape == (2, expected, model.config.text_cfg.width)
    out = model(build_packed_batch(_samples(model, CAPTIONS[:2]), image_token_id=model.image_token_id), images)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("overrides, message", [
    (dict(text_cfg={"causal": False}), "language model must be causal"),
    (dict(connector_cfg={"output_hw": [9, 9]}), "output_hw must be \\[h, w\\] within the 8x8 grid"),
    (dict(connector_cfg={"kind": "perceiver"}), "kind must be one of"),
    (dict(vision_cfg={"tome_r": 4}), "ToMe merging destroys \\(ToMe in the vision tower goes with kind='none'\\)"),
])
def test_bad_captioner_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("captioner-tiny", **overrides)


def test_image_count_must_match_the_placeholders():
    model = create_model("captioner-tiny")
    batch = build_packed_batch(_samples(model), image_token_id=model.image_token_id)
    with pytest.raises(ValueError, match="2 images give 32 vision tokens but the batch has 48 image placeholders"):
        model(batch, _images(model, 2))


def test_a_pack_without_caption_tokens_has_zero_loss():
    model = create_model("captioner-tiny")
    sample = model.sample([], prompt_ids=[TOK.sot_id])  # image and prompt only: nothing to predict
    out = model(build_packed_batch([sample], image_token_id=model.image_token_id), _images(model, 1))
    assert out["loss"].item() == 0.0 and out["num_targets"].item() == 0
    out["loss"].backward()
