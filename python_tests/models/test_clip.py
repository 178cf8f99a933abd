"""CLIP dual encoder: factory, forward/backward at tiny size, logit scale clamp, bad configurations."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlcore.models import create_model, get_model_config, list_models
from vlcore.models.clip import retrieval_recall, zero_shot_classifier, zero_shot_classify
from vlcore.models.tokenizer import get_tokenizer


def test_list_models_has_the_presets():
    names = set(list_models())
    assert {"clip-tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14", "fiber-tiny", "fiber-base", "captioner-tiny"} <= names


@pytest.mark.parametrize("name", list_models())
def test_every_preset_builds(name):
    with torch.device("meta"):  # shapes only: the full-size presets allocate nothing
        model = create_model(name)
    assert model.config.kind in ("clip", "fusion", "captioner") and model.image_size > 0


@pytest.mark.parametrize("name, params_m", [("ViT-B-32", 151.28), ("ViT-B-16", 149.62), ("ViT-L-14", 427.62)])
def test_open_clip_sizes_have_open_clip_parameter_counts(name, params_m):
    # open_clip.create_model(name) parameter counts (fp32, random init): 151.28M / 149.62M / 427.62M.
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


@pytest.mark.parametrize("impl", ["torch", "vlcore"])
def test_clip_tiny_forward_backward(impl):
    model = create_model("clip-tiny", impl=impl)
    tokenizer = get_tokenizer("clip-tiny")
    images = torch.randn(3, 3, model.image_size, model.image_size)
    tokens = tokenizer(["a red square", "two dots", "x"], model.context_length)
    out = model(images, tokens)
    assert out["image_features"].shape == out["text_features"].shape == (3, model.config.embed_dim)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    assert out["logit_bias"] is None
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    loss = (out["logit_scale"] * out["image_features"] @ out["text_features"].t()).diag().sum()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "logit_bias" not in n)


def test_encode_text_pools_the_end_of_text_token():
    model = create_model("clip-tiny", impl="torch")
    tokens = get_tokenizer("byte")(["hello", "hello world"], model.context_length)
    padded = tokens.clone()
    # Anything after the end-of-text token is invisible to it under the causal mask.
    padded[0, 10:] = 5
    padded[0, 6] = get_tokenizer("byte").eot_id  # "hello" -> sot + 5 bytes + eot at index 6
    torch.testing.assert_close(model.encode_text(padded)[0], model.encode_text(tokens)[0])


def test_logit_scale_is_clamped_at_100():
    model = create_model("clip-tiny")
    with torch.no_grad():
        model.logit.logit_scale.fill_(math.log(1000.0))
    assert model(None, None)["logit_scale"].item() == pytest.approx(100.0)
    model.clamp_logit_scale()
    assert model.logit.logit_scale.item() == pytest.approx(math.log(100.0))


def test_siglip_preset_has_bias():
    out = create_model("siglip-tiny")(None, None)
    assert out["logit_bias"].item() == -10.0 and out["logit_scale"].item() == pytest.approx(10.0)


@pytest.mark.parametrize("overrides, message", [
    (dict(vision_cfg={"heads": 5}), "heads \\(5\\) must divide width \\(64\\)"),
    (dict(text_cfg={"width": 62}), "heads \\(4\\) must divide width \\(62\\)"),
    (dict(vision_cfg={"patch_size": 7}), "patch_size \\(7\\) must divide image_size"),
    (dict(vision_cfg={"tome_r": 9}), "ToMe r = 9 at layer 0 must be in \\[0, 8\\]"),
    (dict(vision_cfg={"tome_r": [2, 8]}), "ToMe r = 8 at layer 1 must be in \\[0, 7\\]"),
    (dict(vision_cfg={"act": "relu6"}), "act must be one of"),
    (dict(vision_cfg={"pos_embed": "rope"}), "pos_embed must be one of"),
    (dict(impl="triton"), "impl must be one of"),
    (dict(vision_cfg={"no_such_field": 1}), "unknown keys \\['no_such_field'\\]"),
])
def test_bad_configs_raise_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("clip-tiny", **overrides)


def test_sincos_2d_positions_encode_row_and_column():
    model = create_model("clip-tiny", vision_cfg={"pos_embed": "sincos2d"})
    vision = model.visual
    grid, width = vision.cfg.grid_size, vision.cfg.width
    assert "visual.positional_embedding" not in dict(model.named_parameters())
    positions = vision.positional_embedding
    assert positions.shape == (grid * grid + 1, width) and torch.equal(positions[0], torch.zeros(width))
    # independent statement of the encoding: patch (i, j) -> [sin(i w), cos(i w), sin(j w), cos(j w)]
    quarter = width // 4
    w = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    for i, j in [(0, 0), (0, grid - 1), (grid - 1, 1), (2, 3)]:
        expected = torch.cat([(i * w).sin(), (i * w).cos(), (j * w).sin(), (j * w).cos()]).float()
        torch.testing.assert_close(positions[1 + i * grid + j], expected)
    images = torch.randn(2, 3, model.image_size, model.image_size)
    assert model.encode_image(images).shape == (2, model.config.embed_dim)


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        get_model_config("ViT-Q-99")


def test_zero_shot_and_retrieval_helpers_on_separable_data():
    model = create_model("clip-tiny", impl="torch")
    captions = ["a", "b", "c", "d", "e", "f"]  # class i has the prompts 2i, 2i + 1
    tokens = get_tokenizer("byte")(captions, model.context_length)
    classifier = zero_shot_classifier(model, tokens.view(3, 2, -1))
    assert classifier.shape == (3, model.config.embed_dim)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(3))
    assert zero_shot_classify(model, torch.randn(4, 3, 32, 32), classifier).shape == (4,)
    # Retrieval metrics on hand-built features: image i owns captions 2i, 2i+1; caption 3 points elsewhere.
    images = F.normalize(torch.eye(3, 8), dim=-1)
    texts = F.normalize(torch.eye(3, 8).repeat_interleave(2, dim=0), dim=-1)
    texts[3] = F.normalize(images[2] + 0.5 * images[1], dim=0)
    metrics = retrieval_recall(images, texts, torch.tensor([0, 0, 1, 1, 2, 2]), ks=(1, 5))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(5 / 6)
    assert metrics["text_retrieval_recall@1"] == pytest.approx(1.0)
    assert metrics["image_retrieval_recall@5"] == pytest.approx(1.0)


@pytest.mark.parametrize("overrides", [{}, {"vision_cfg": {"tome_r": 2}}], ids=["plain", "tome"])
def test_clip_compiles_fullgraph(overrides):
    model = create_model("clip-tiny", impl="torch", **overrides)
    images = torch.randn(2, 3, 32, 32)
    tokens = get_tokenizer("byte")(["ab", "cde"], model.context_length)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    want, got = model(images, tokens), compiled(images, tokens)
    for key in ("image_features", "text_features", "logit_scale"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
    (got["image_features"] @ got["text_features"].t()).sum().backward()


@pytest.mark.parametrize("name", ["clip-tiny", "fiber-tiny", "captioner-tiny"])
def test_every_matrix_is_a_plain_linear_for_nvfp4_convert(name):
    # vlcore.nvfp4.convert swaps nn.Linear modules and looks for transformer blocks in `blocks` ModuleLists.
    model = create_model(name)
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if p.dim() == 2 and not isinstance(module, torch.nn.Embedding) and param_name != "positional_embedding":
                assert type(module) is torch.nn.Linear, f"{module_name}.{param_name} is in a {type(module).__name__}"
    towers = [m for n, m in model.named_modules() if n.endswith("blocks")]
    assert towers and all(isinstance(t, torch.nn.ModuleList) and len(t) > 0 for t in towers)
