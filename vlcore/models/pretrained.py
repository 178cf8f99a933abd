"""Weights in and out of vlcore's CLIP: Hugging Face CLIP / SigLIP folders, open_clip and vlcore checkpoints.

- :func:`load_pretrained` ``(model, path)`` loads into an existing vlcore ``CLIP`` whichever of these ``path`` is:
  a Hugging Face folder (``config.json`` + ``model.safetensors``, ``model_type`` "clip" or "siglip"), an open_clip
  checkpoint (``.safetensors``, or a ``torch.save`` ``.pt``/``.bin``/``.pth`` file, with or without a
  ``"state_dict"`` wrapper and DDP's ``module.`` prefixes), or a vlcore checkpoint directory
  (``model.safetensors`` in vlcore's own names). It returns a :class:`LoadReport`.
- :func:`from_pretrained_hf` ``(path)`` builds the vlcore CLIP that a Hugging Face ``config.json`` describes and
  loads the folder's weights into it.
- :func:`export_open_clip` ``(model, path)`` writes a vlcore CLIP in open_clip's names and layouts, loadable by
  an open_clip ``CLIP`` of the same configuration.

Nothing here imports transformers or open_clip: the names are mapped by hand, and every loaded tensor's shape
is checked against the model's before any is copied, so a checkpoint of another architecture raises a
ValueError naming the first mismatching parameter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import nn

from vlcore.models.config import ModelConfig
from vlcore.models.openclip import _PROJECTIONS, convert_open_clip_state_dict

PathLike = Union[str, Path]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` read and how it mapped onto the model."""

    source: str  #: "huggingface", "open_clip" or "vlcore"
    path: str
    loaded: int = 0  #: tensors copied into the model
    ignored: list[str] = field(default_factory=list)  #: checkpoint entries that are not weights (position ids)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from a {self.source} checkpoint at {self.path}"]
        lines += [f"  ignored: {name}" for name in self.ignored]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reading files


def _read_tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return torch.load(str(path), map_location="cpu", weights_only=True)
    raise ValueError(f"load_pretrained: {path} is neither a .safetensors nor a torch.save (.pt/.pth/.bin) file")


def _hf_config(folder: Path):
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text())


# ---------------------------------------------------------------------------------------------------------
# Hugging Face CLIP


# transformers' CLIPConfig defaults: a saved config.json may omit the fields left at their defaults
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, eos_token_id=2)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh"}

_HF_RENAMES = [  # (Hugging Face pattern, vlcore replacement), applied in order
    (r"^text_model\.embeddings\.token_embedding\.", "text.token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "text.positional_embedding"),
    (r"^text_model\.final_layer_norm\.", "text.norm_final."),
    (r"^text_model\.encoder\.layers\.", "text.blocks."),
    (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed."),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "visual.norm_pre."),
    (r"^vision_model\.post_layernorm\.", "visual.norm_post."),
    (r"^vision_model\.encoder\.layers\.", "visual.blocks."),
    (r"^visual_projection\.", "visual.proj."),
    (r"^text_projection\.", "text.proj."),
    (r"^logit_scale$", "logit.logit_scale"),
    (r"^logit_bias$", "logit.logit_bias"),
    (r"^text_model\.head\.", "text.proj."),  # SigLIP's text head
    (r"^vision_model\.head\.attention\.out_proj\.", "visual.head.attn.out."),  # SigLIP's pooling head
    (r"^vision_model\.head\.layernorm\.", "visual.head.norm."),
    (r"^vision_model\.head\.", "visual.head."),
    (r"\.layer_norm1\.", ".norm1."),
    (r"\.layer_norm2\.", ".norm2."),
    (r"\.self_attn\.out_proj\.", ".attn.out."),
]


def _hf_activation(name: str) -> str:
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"Hugging Face CLIP: hidden_act {name!r} has no vlcore equivalent ({sorted(_HF_ACTIVATIONS)})")
    return _HF_ACTIVATIONS[name]


def hf_clip_config(config: dict) -> ModelConfig:
    """A Hugging Face ``CLIPConfig`` (the parsed ``config.json``) as vlcore's :class:`ModelConfig`."""
    if config.get("model_type") != "clip":
        raise ValueError(f"hf_clip_config: model_type {config.get('model_type')!r} is not 'clip'")
    text = {**_HF_TEXT_DEFAULTS, **config.get("text_config", {})}
    vision = {**_HF_VISION_DEFAULTS, **config.get("vision_config", {})}
    return ModelConfig.from_dict(dict(
        kind="clip", embed_dim=config.get("projection_dim", 512),
        init_logit_scale=config.get("logit_scale_init_value", 2.6592),
        vision_cfg=dict(image_size=vision["image_size"], patch_size=vision["patch_size"], width=vision["hidden_size"],
                        layers=vision["num_hidden_layers"], heads=vision["num_attention_heads"],
                        mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
                        act=_hf_activation(vision["hidden_act"]), norm_eps=vision["layer_norm_eps"]),
        text_cfg=dict(context_length=text["max_position_embeddings"], vocab_size=text["vocab_size"],
                      width=text["hidden_size"], heads=text["num_attention_heads"], layers=text["num_hidden_layers"],
                      mlp_ratio=text["intermediate_size"] / text["hidden_size"], act=_hf_activation(text["hidden_act"]),
                      norm_eps=text["layer_norm_eps"], causal=True, pool="argmax")))


_HF_SIGLIP_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, projection_size=None)
_HF_SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                  image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                                  vision_use_head=True)


def hf_siglip_config(config: dict) -> ModelConfig:
    """A Hugging Face ``SiglipConfig`` as vlcore's :class:`ModelConfig`: no class token, a biased patch embedding,
    no pre-LN, the attention-pooling head, a bidirectional text tower read at its last token without a padding
    mask (transformers' SigLIP is run unmasked, padded to its full length), a biased text head."""
    text = {**_HF_SIGLIP_TEXT_DEFAULTS, **config.get("text_config", {})}
    vision = {**_HF_SIGLIP_VISION_DEFAULTS, **config.get("vision_config", {})}
    embed_dim = text["projection_size"] or text["hidden_size"]
    if embed_dim != vision["hidden_size"] or not vision["vision_use_head"]:
        raise ValueError(f"hf_siglip_config: vlcore's CLIP needs both towers' embeddings of one width (text "
                         f"{embed_dim}, image {vision['hidden_size']}) and the image tower's pooling head")
    return ModelConfig.from_dict(dict(
        kind="clip", embed_dim=embed_dim, init_logit_scale=0.0, init_logit_bias=0.0,
        vision_cfg=dict(image_size=vision["image_size"], patch_size=vision["patch_size"], width=vision["hidden_size"],
                        layers=vision["num_hidden_layers"], heads=vision["num_attention_heads"],
                        mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
                        act=_hf_activation(vision["hidden_act"]), norm_eps=vision["layer_norm_eps"], pool="map",
                        class_token=False, patch_bias=True, norm_pre=False),
        text_cfg=dict(context_length=text["max_position_embeddings"], vocab_size=text["vocab_size"],
                      width=text["hidden_size"], heads=text["num_attention_heads"], layers=text["num_hidden_layers"],
                      mlp_ratio=text["intermediate_size"] / text["hidden_size"], act=_hf_activation(text["hidden_act"]),
                      norm_eps=text["layer_norm_eps"], causal=False, pool="last", pad_id=-1, proj_bias=True)))


def convert_hf_clip_state_dict(state_dict: dict) -> tuple[dict, list[str]]:
    """Hugging Face ``CLIPModel`` names -> vlcore ``CLIP``: q/k/v projections concatenated into ``qkv`` (rows
    ``[q; k; v]``). Returns (converted, ignored keys)."""
    converted, ignored, qkv = {}, [], {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            ignored.append(key)
            continue
        if key in ("logit_scale", "logit_bias"):  # SigLIP stores them as [1], vlcore as scalars
            value = value.reshape(())
        head = re.match(r"^vision_model\.head\.attention\.in_proj_(weight|bias)$", key)
        if head:  # nn.MultiheadAttention's packed [q; k; v] -> vlcore's CrossAttention q and kv ([k; v])
            width = value.shape[0] // 3
            converted[f"visual.head.attn.q.{head.group(1)}"] = value[:width]
            converted[f"visual.head.attn.kv.{head.group(1)}"] = value[width:]
            continue
        for pattern, replacement in _HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        match = re.match(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if match:
            qkv.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
            continue
        converted[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Hugging Face CLIP: {prefix} has only the {sorted(parts)} projections' {kind}")
        converted[f"{prefix}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted, ignored


# ---------------------------------------------------------------------------------------------------------
# Loading


def _load_checked(model: nn.Module, state_dict: dict, where: str) -> int:
    expected = model.state_dict()
    for key, value in state_dict.items():
        if key in expected and expected[key].shape != value.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(expected[key].shape)} in the model; is it the same architecture?")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # a model's non-persistent buffers are never in a checkpoint; anything else missing is an error
    if missing or unexpected:
        raise ValueError(f"{where}: the checkpoint does not match the model: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    return len(state_dict)


def _is_vlcore_state_dict(state_dict: dict) -> bool:
    return any(k.startswith(("visual.blocks.", "text.blocks.", "logit.")) for k in state_dict)


def load_pretrained(model: nn.Module, path: PathLike) -> LoadReport:
    """Load a Hugging Face CLIP folder, an open_clip checkpoint or a vlcore checkpoint into ``model`` (a vlcore
    CLIP of the same architecture); see the module docstring. Returns a :class:`LoadReport`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_pretrained: {path} does not exist")
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise ValueError(f"load_pretrained: {path} holds no model.safetensors (a Hugging Face folder or a vlcore "
                             "checkpoint directory has one)")
        state_dict = _read_tensors(weights)
        config = _hf_config(path)
        if config is not None and "model_type" in config:
            if config["model_type"] not in ("clip", "siglip"):
                raise ValueError(f"load_pretrained: Hugging Face model_type {config['model_type']!r} is not supported "
                                 "(only 'clip' and 'siglip')")
            converted, ignored = convert_hf_clip_state_dict(state_dict)
            report = LoadReport("huggingface", str(path), ignored=ignored)
            if config["model_type"] == "siglip" and "visual.proj.weight" not in converted:
                # SigLIP has no image projection; vlcore's tower always ends in one: the identity, exactly
                converted["visual.proj.weight"] = torch.eye(model.visual.proj.weight.shape[0])
                report.notes.append("visual.proj set to the identity (SigLIP has no image projection)")
            eos = config.get("text_config", {}).get("eos_token_id", _HF_TEXT_DEFAULTS["eos_token_id"])
            vocab = config.get("text_config", {}).get("vocab_size", _HF_TEXT_DEFAULTS["vocab_size"])
            if config["model_type"] == "clip" and eos not in (2, vocab - 1):
                report.notes.append(f"text pooling: transformers pools at the first eos_token_id ({eos}); vlcore at "
                                    "the highest token id, the same only when the eos token has the highest id")
            report.loaded = _load_checked(model, converted, "load_pretrained")
            return report
        report = LoadReport("vlcore", str(path))
        report.loaded = _load_checked(model, state_dict, "load_pretrained")
        return report
    state_dict = _read_tensors(path)
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if _is_vlcore_state_dict(state_dict):
        report = LoadReport("vlcore", str(path))
        report.loaded = _load_checked(model, state_dict, "load_pretrained")
        return report
    report = LoadReport("open_clip", str(path), ignored=[k for k in state_dict if k.endswith("attn_mask")])
    report.loaded = _load_checked(model, convert_open_clip_state_dict(state_dict), "load_pretrained")
    return report


def from_pretrained_hf(path: PathLike, **overrides) -> nn.Module:
    """The vlcore CLIP described by a Hugging Face folder's ``config.json``, with its weights loaded.
    ``overrides`` replace top-level :class:`ModelConfig` fields (e.g. ``impl="torch"``)."""
    from vlcore.models.clip import CLIP

    path = Path(path)
    config = _hf_config(path)
    if config is None:
        raise ValueError(f"from_pretrained_hf: {path} has no config.json")
    if config.get("model_type") not in ("clip", "siglip"):
        raise ValueError(f"from_pretrained_hf: model_type {config.get('model_type')!r} is not 'clip' or 'siglip'")
    cfg = hf_clip_config(config) if config["model_type"] == "clip" else hf_siglip_config(config)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"from_pretrained_hf: unknown ModelConfig field {key!r}")
        setattr(cfg, key, value)
    model = CLIP(cfg)
    load_pretrained(model, path)
    return model


# ---------------------------------------------------------------------------------------------------------
# Export


_TO_OPEN_CLIP = [  # (vlcore pattern, open_clip replacement): the inverse of vlcore.models.openclip's renames
    (r"^visual\.patch_embed\.", "visual.conv1."),
    (r"^visual\.norm_pre\.", "visual.ln_pre."),
    (r"^visual\.norm_post\.", "visual.ln_post."),
    (r"^visual\.blocks\.", "visual.transformer.resblocks."),
    (r"^text\.blocks\.", "transformer.resblocks."),
    (r"^text\.token_embedding\.", "token_embedding."),
    (r"^text\.positional_embedding$", "positional_embedding"),
    (r"^text\.norm_final\.", "ln_final."),
    (r"^logit\.logit_scale$", "logit_scale"),
    (r"^logit\.logit_bias$", "logit_bias"),
    (r"\.norm1\.", ".ln_1."),
    (r"\.norm2\.", ".ln_2."),
    (r"\.attn\.qkv\.weight$", ".attn.in_proj_weight"),
    (r"\.attn\.qkv\.bias$", ".attn.in_proj_bias"),
    (r"\.attn\.out\.", ".attn.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]


def to_open_clip_state_dict(model: nn.Module) -> dict:
    """vlcore ``CLIP`` -> open_clip ``CLIP`` names and layouts (the inverse of
    :func:`vlcore.models.openclip.convert_open_clip_state_dict`): ``nn.Linear`` projections become open_clip's
    ``x @ proj`` parameters (transposed)."""
    projections = {vlcore_key: open_clip_key for open_clip_key, vlcore_key in _PROJECTIONS.items()}
    out = {}
    for key, value in model.state_dict().items():
        if key in projections:
            out[projections[key]] = value.t().contiguous()
            continue
        for pattern, replacement in _TO_OPEN_CLIP:
            key = re.sub(pattern, replacement, key)
        out[key] = value.contiguous()
    return out


def open_clip_config(model: nn.Module) -> dict:
    """The open_clip model configuration (its ``model_configs/*.json`` layout) of a vlcore CLIP: register it
    with ``open_clip.add_model_config`` and ``open_clip.create_model(name, pretrained=exported_file)`` loads
    what :func:`export_open_clip` wrote."""
    cfg = model.config
    vision, text = cfg.vision_cfg, cfg.text_cfg
    if vision.act != text.act or vision.act not in ("gelu", "quick_gelu"):
        raise ValueError(f"open_clip_config: open_clip uses one activation, GELU or QuickGELU, for both towers; "
                         f"this model has {vision.act!r} / {text.act!r}")
    if vision.norm_eps != 1e-5 or text.norm_eps != 1e-5 or not text.causal or text.pool != "argmax" or text.proj_bias:
        raise ValueError("open_clip_config: open_clip's CLIP has LayerNorm eps 1e-5 and a causal, argmax-pooled text "
                         "tower with a bias-free projection")
    if (vision.pool not in ("tok", "avg") or vision.patch_bias or not vision.norm_pre or not vision.class_token
            or vision.pos_embed != "learned"):
        raise ValueError("open_clip_config: open_clip's image tower has a class token, learned positions, ln_pre, a "
                         "bias-free patch embedding and 'tok' or 'avg' pooling")
    out = {"embed_dim": cfg.embed_dim, "quick_gelu": vision.act == "quick_gelu",
           "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.width,
                          "layers": vision.layers, "head_width": vision.width // vision.heads, "mlp_ratio": vision.mlp_ratio,
                          "pool_type": vision.pool},
           "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                        "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio}}
    if cfg.init_logit_bias is not None:
        out["init_logit_bias"] = cfg.init_logit_bias
    return out


def export_open_clip(model: nn.Module, path: PathLike) -> Path:
    """Write ``model`` (a vlcore CLIP) as an open_clip checkpoint: ``.safetensors`` by extension, a ``torch.save``
    state dict otherwise; returns the path. Only a vlcore CLIP that open_clip's ``CLIP`` can express exports
    (see :func:`open_clip_config`)."""
    open_clip_config(model)  # raises when open_clip's CLIP cannot express the model
    path = Path(path)
    state_dict = to_open_clip_state_dict(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, str(path))
    return path
