"""Loading open_clip checkpoints into vlcore's CLIP (open_clip is not a dependency).

A state dict saved from ``open_clip.create_model('ViT-B-32' | 'ViT-B-16' | 'ViT-L-14')`` (or a checkpoint
holding one under ``"state_dict"``) maps one to one onto :class:`vlcore.models.clip.CLIP` built from the
config of the same name: ``nn.MultiheadAttention``'s packed ``in_proj`` is vlcore's ``qkv`` (same
``[q; k; v]`` row order), and open_clip's ``x @ proj`` parameters become ``nn.Linear`` weights (transposed).
"""

from __future__ import annotations

import re
from typing import Union

import torch
from torch import nn

_RENAMES = [  # (open_clip pattern, vlcore replacement), applied in order to every key
    (r"^visual\.conv1\.", "visual.patch_embed."),
    (r"^visual\.ln_pre\.", "visual.norm_pre."),
    (r"^visual\.ln_post\.", "visual.norm_post."),
    (r"^visual\.transformer\.resblocks\.", "visual.blocks."),
    (r"^transformer\.resblocks\.", "text.blocks."),
    (r"^token_embedding\.", "text.token_embedding."),
    (r"^positional_embedding$", "text.positional_embedding"),
    (r"^ln_final\.", "text.norm_final."),
    (r"^logit_scale$", "logit.logit_scale"),
    (r"^logit_bias$", "logit.logit_bias"),
    (r"\.ln_1\.", ".norm1."),
    (r"\.ln_2\.", ".norm2."),
    (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"),
    (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
    (r"\.attn\.out_proj\.", ".attn.out."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]
_PROJECTIONS = {"visual.proj": "visual.proj.weight", "text_projection": "text.proj.weight"}
_IGNORED = ("attn_mask",)  # open_clip's causal-mask buffer (vlcore builds its mask from `causal`)
_UNSUPPORTED = (".ls_1.", ".ls_2.", "attn_pool", ".ln_1_kv.", "visual.trunk.", "text.transformer.")


def convert_open_clip_state_dict(state_dict: dict) -> dict:
    """open_clip ``CLIP`` parameter names and layouts -> vlcore ``CLIP``. Raises on parts vlcore does not
    model (layer scale, attentional pooling, timm / HF towers)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    converted = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key  # saved from DDP
        if key in _IGNORED:
            continue
        if any(part in key for part in _UNSUPPORTED):
            raise ValueError(f"convert_open_clip_state_dict: {key!r} belongs to a part vlcore's CLIP does not have")
        if key in _PROJECTIONS:
            converted[_PROJECTIONS[key]] = value.t().contiguous()  # x @ proj == Linear with weight proj.T
            continue
        if key == "text_projection.weight":  # newer configs use an nn.Linear already
            converted["text.proj.weight"] = value
            continue
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


def load_open_clip_state_dict(model: nn.Module, checkpoint: Union[str, dict], *, strict: bool = True) -> nn.Module:
    """Load an open_clip state dict (a dict, or a path to a ``torch.save`` file, read with
    ``weights_only=True``) into a vlcore CLIP of the same architecture; returns the model."""
    if isinstance(checkpoint, str):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    converted = convert_open_clip_state_dict(checkpoint)
    expected = model.state_dict()
    for key, value in converted.items():
        if key in expected and expected[key].shape != value.shape:
            raise ValueError(f"load_open_clip_state_dict: {key} has shape {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(expected[key].shape)} in the model; is it the same architecture?")
    model.load_state_dict(converted, strict=strict)
    return model
