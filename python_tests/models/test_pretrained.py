"""Checkpoints in and out: Hugging Face CLIP folders and open_clip files into vlcore's CLIP with equal features,
and vlcore's CLIP back out to open_clip. The libraries' own models are the references (skipped without them)."""

import pytest
import torch

from python_tests.integrations.helpers import assert_close, need
from vlcore.models import create_model
from vlcore.models.pretrained import export_open_clip, from_pretrained_hf, load_pretrained


def _tokens(batch, length, eos):
    t = torch.randint(1, eos - 1, (batch, length))
    t[torch.arange(batch), torch.tensor([length - 1, 5, 2])[:batch]] = eos
    for row, end in enumerate(torch.tensor([length - 1, 5, 2])[:batch]):
        t[row, end + 1:] = 0
    return t


def test_hf_clip_folder_gives_transformers_features(tmp_path):
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16, eos_token_id=99, hidden_act="gelu"),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=32)
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    model = from_pretrained_hf(tmp_path, impl="vlcore").eval()
    images, tokens = torch.randn(3, 3, 32, 32), _tokens(3, 16, 99)
    with torch.no_grad():
        expected_image = hf.get_image_features(pixel_values=images)
        expected_text = hf.get_text_features(input_ids=tokens)
        expected_image = getattr(expected_image, "pooler_output", expected_image)
        expected_text = getattr(expected_text, "pooler_output", expected_text)
        assert_close(model.encode_image(images, normalize=False), expected_image, what="image features")
        assert_close(model.encode_text(tokens, normalize=False), expected_text, what="text features")
        assert_close(model.logit()[0], hf.logit_scale.exp(), what="logit scale")
    assert model.config.vision_cfg.act == "quick_gelu" and model.config.text_cfg.act == "gelu"
    report = load_pretrained(model, tmp_path)
    assert report.source == "huggingface" and report.loaded > 0


def test_hf_siglip_folder_gives_transformers_features(tmp_path):
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8))
    hf = transformers.SiglipModel(config).eval()
    hf.save_pretrained(tmp_path)
    model = from_pretrained_hf(tmp_path, impl="vlcore").eval()
    assert model.config.vision_cfg.pool == "map" and not model.config.text_cfg.causal
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        out = hf(pixel_values=images, input_ids=tokens)
        assert_close(model.encode_image(images), out.image_embeds, what="image features")
        assert_close(model.encode_text(tokens), out.text_embeds, what="text features")
        scale, bias = model.logit()
        logits = scale * model.encode_text(tokens) @ model.encode_image(images).t() + bias
        assert_close(logits, out.logits_per_text, what="logits")


def test_unsupported_hf_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "blip"}')
    with pytest.raises(ValueError, match="blip"):
        from_pretrained_hf(tmp_path)


def _open_clip_model():
    need("open_clip")
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
                 text_cfg=dict(context_length=32, vocab_size=261, width=64, heads=4, layers=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("form", ["safetensors", "torch.save", "torch.save wrapped"])
def test_open_clip_checkpoint_gives_open_clip_features(tmp_path, form):
    reference = _open_clip_model()
    state = reference.state_dict()
    if form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "open_clip.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "open_clip.pt"
        if form == "torch.save wrapped":  # open_clip's training checkpoints: DDP prefixes under "state_dict"
            state = {"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}
        torch.save(state, path)
    model = create_model("clip-tiny").eval()
    report = load_pretrained(model, path)
    assert report.source == "open_clip"
    images, tokens = torch.randn(2, 3, 32, 32), _tokens(2, 32, 260)
    with torch.no_grad():
        assert_close(model.encode_image(images), reference.encode_image(images, normalize=True), what="image")
        assert_close(model.encode_text(tokens), reference.encode_text(tokens, normalize=True), what="text")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_loads_with_open_clip_create_model(tmp_path, suffix):
    import json

    from vlcore.models.pretrained import open_clip_config

    open_clip = need("open_clip")
    model = create_model("clip-tiny").eval()
    path = export_open_clip(model, tmp_path / f"exported{suffix}")
    name = f"vlcore-export-test{suffix.replace('.', '-')}"
    (tmp_path / f"{name}.json").write_text(json.dumps(open_clip_config(model)))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    loaded = open_clip.create_model(name, pretrained=str(path)).eval()
    images, tokens = torch.randn(2, 3, 32, 32), _tokens(2, 32, 260)
    with torch.no_grad():
        assert_close(loaded.encode_image(images, normalize=True), model.encode_image(images), what="image")
        assert_close(loaded.encode_text(tokens, normalize=True), model.encode_text(tokens), what="text")
        assert_close(loaded.logit_scale.exp(), model.logit()[0], what="logit scale")


def test_vlcore_checkpoint_dir_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    source = create_model("clip-tiny")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = create_model("clip-tiny")
    assert load_pretrained(model, tmp_path).source == "vlcore"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match="shape"):
        load_pretrained(create_model("clip-tiny", embed_dim=32), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(model, tmp_path / "absent.pt")


def test_export_refuses_what_open_clip_cannot_express(tmp_path):
    model = create_model("clip-tiny", vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                                   "heads": 4, "pool": "map"})
    with pytest.raises(ValueError, match="open_clip"):
        export_open_clip(model, tmp_path / "x.safetensors")
