"""open_clip checkpoint loading: the same image and text features (fp32, max abs difference <= 1e-4).

open_clip does not import in this environment (it imports torchvision, and PyPI's torchvision does not
import beside the CPU torch 2.13 wheel), so the peer is an independent transcription of open_clip 3.3's
``CLIP`` forward in its own parameter names (``nn.MultiheadAttention`` blocks, ``x @ proj`` projections,
``ln_post`` before class-token pooling, argmax end-of-text pooling after ``ln_final``). Where open_clip does
import (e.g. a GPU machine with a matching torchvision), the real ``open_clip.create_model`` is used too.
"""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from vlcore.models import create_model, get_model_config
from vlcore.models.openclip import convert_open_clip_state_dict, load_open_clip_state_dict
from vlcore.nn.transformer import make_activation

try:
    import open_clip
except Exception:  # ImportError, or torchvision's operator registration failing at import
    open_clip = None


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", make_activation(act)),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads, act):
        super().__init__()
        self.resblocks = nn.ModuleList([_ResidualAttentionBlock(width, heads, act) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class _VisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, heads, output_dim, act):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 0] @ self.proj


class _OpenClipTranscription(nn.Module):
    """open_clip's ``CLIP`` with a ViT image tower and the built-in text tower, names as in its state dict."""

    def __init__(self, cfg):
        super().__init__()
        v, t = cfg.vision_cfg, cfg.text_cfg
        self.visual = _VisionTransformer(v.image_size, v.patch_size, v.width, v.layers, v.heads, cfg.embed_dim, v.act)
        self.transformer = _Transformer(t.width, t.layers, t.heads, t.act)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.randn(t.context_length, t.width))
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.randn(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        mask = torch.full((t.context_length, t.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode_image(self, images):
        return nn.functional.normalize(self.visual(images), dim=-1)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
        return nn.functional.normalize(x, dim=-1)


def _randomise(module: nn.Module) -> None:
    # Matrices are random already; make LayerNorm weights/biases, biases and the scale random too, so a
    # swapped or dropped mapping cannot hide behind ones and zeros.
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() <= 1:
                p.copy_(torch.randn_like(p) * 0.5)


def _inputs(cfg, batch=2):  # one short caption, one filling the context
    images = torch.randn(batch, 3, cfg.vision_cfg.image_size, cfg.vision_cfg.image_size)
    tokens = torch.randint(1, cfg.text_cfg.vocab_size - 1, (batch, cfg.text_cfg.context_length))
    lengths = torch.tensor([5, cfg.text_cfg.context_length])[:batch]
    for b, n in enumerate(lengths.tolist()):  # end-of-text (the highest id) then zero padding
        tokens[b, n - 1] = cfg.text_cfg.vocab_size - 1
        tokens[b, n:] = 0
    return images, tokens


def _check_same_features(reference, state_dict, name, **overrides):
    model = load_open_clip_state_dict(create_model(name, impl="torch", **overrides), state_dict)
    images, tokens = _inputs(model.config)
    with torch.no_grad():
        assert (model.encode_image(images) - reference.encode_image(images)).abs().max() <= 1e-4
        assert (model.encode_text(tokens) - reference.encode_text(tokens)).abs().max() <= 1e-4
        assert model.logit.logit_scale.item() == reference.logit_scale.item()


@pytest.mark.parametrize("name, overrides", [
    ("clip-tiny", {}),
    ("clip-tiny", {"vision_cfg": {"act": "quick_gelu"}, "text_cfg": {"act": "quick_gelu"}}),
    ("ViT-B-32", {}),
])
def test_transcribed_open_clip_state_dict_loads_with_same_features(name, overrides, tmp_path):
    cfg = get_model_config(name, **overrides)
    reference = _OpenClipTranscription(cfg).eval()
    _randomise(reference)
    # As saved by open_clip's trainer: under "state_dict", with DDP's "module." prefix.
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}
    if name == "clip-tiny":  # through a file too (ViT-B-32's 600 MB would only slow the test down)
        torch.save(checkpoint, tmp_path / "open_clip.pt")
        checkpoint = str(tmp_path / "open_clip.pt")
    _check_same_features(reference, checkpoint, name, **overrides)


@pytest.mark.skipif(open_clip is None, reason="open_clip does not import here (see module docstring)")
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16"])
def test_real_open_clip_state_dict_loads_with_same_features(name):
    reference = open_clip.create_model(name).eval()
    _check_same_features(reference, reference.state_dict(), name)


def test_conversion_rejects_parts_vlcore_does_not_model():
    with pytest.raises(ValueError, match="'visual.transformer.resblocks.0.ls_1.gamma' belongs to a part"):
        convert_open_clip_state_dict({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(4)})


def test_loading_a_different_architecture_names_the_mismatch():
    reference = _OpenClipTranscription(get_model_config("clip-tiny"))
    with pytest.raises(ValueError, match="visual.positional_embedding has shape .* is it the same architecture"):
        load_open_clip_state_dict(create_model("clip-tiny", vision_cfg={"patch_size": 16}), reference.state_dict())


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_every_open_clip_size_maps_key_for_key(name):
    # Names and shapes only (meta tensors, no memory): the full-size forward is checked above for B-32.
    with torch.device("meta"):
        cfg = get_model_config(name)
        converted = convert_open_clip_state_dict(_OpenClipTranscription(cfg).state_dict())
        expected = create_model(name).state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
