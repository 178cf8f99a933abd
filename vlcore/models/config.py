"""Model configurations: dataclasses filled from ``configs/<name>.json`` (open_clip's layout: ``embed_dim``,
``vision_cfg``, ``text_cfg``, plus ``fusion_cfg`` / ``connector_cfg``). Every check that can fail runs here,
at construction, so that a bad configuration raises before any weight is allocated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from vlcore.nn.tome import TomeR, parse_r
from vlcore.nn.transformer import ACTIVATIONS, check_tome_schedule



def _check_width(where: str, width: int, heads: int) -> None:
    if width <= 0 or heads <= 0 or width % heads:
        raise ValueError(f"{where}: heads ({heads}) must divide width ({width})")


def _check_choice(where: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{where}: {name} must be one of {choices}, got {value!r}")


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"  # "quick_gelu" for OpenAI weights
    norm_eps: float = 1e-5
    pool: str = "tok"  # "tok": class token, "avg": size-weighted mean of the patch tokens, "map": SigLIP's attention-pooling head
    class_token: bool = True
    patch_bias: bool = False  # a bias in the patch embedding (SigLIP)
    norm_pre: bool = True  # LayerNorm before the blocks (CLIP; SigLIP has none)
    pos_embed: str = "learned"  # "learned" (open_clip) or "sincos2d" (fixed 2D sin-cos of the patch's row and column)
    tome_r: TomeR = 0  # ToMe tokens merged per layer: int, per-layer list, or (r, inflect); see parse_r
    # preprocessing for the trainer: normalise RGB in [0, 1] with these (OpenAI CLIP's, open_clip's default)
    image_mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    def __post_init__(self):
        where = "VisionConfig"
        _check_width(where, self.width, self.heads)
        if self.layers <= 0:
            raise ValueError(f"{where}: layers must be positive, got {self.layers}")
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(f"{where}: patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        _check_choice(where, "act", self.act, ACTIVATIONS)
        _check_choice(where, "pool", self.pool, ("tok", "avg", "map"))
        _check_choice(where, "pos_embed", self.pos_embed, ("learned", "sincos2d"))
        if self.pos_embed == "sincos2d" and self.width % 4:
            raise ValueError(f"{where}: pos_embed='sincos2d' needs a width divisible by 4, got {self.width}")
        if self.pool == "tok" and not self.class_token:
            raise ValueError(f"{where}: pool='tok' needs class_token=True")
        if isinstance(self.tome_r, list) and len(self.tome_r) > self.layers:
            raise ValueError(f"{where}: tome_r lists {len(self.tome_r)} layers, the tower has {self.layers}")
        check_tome_schedule(self.num_tokens, self.tome_schedule, self.class_token, where)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2 + int(self.class_token)

    @property
    def tome_schedule(self) -> list[int]:
        r = tuple(self.tome_r) if isinstance(self.tome_r, list) and len(self.tome_r) == 2 and isinstance(
            self.tome_r[1], float) else self.tome_r  # JSON has no tuples: [r, inflect] with a float inflect
        return parse_r(self.layers, r)


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True  # CLIP: causal; BERT/RoBERTa-style (fusion): bidirectional with key padding
    pool: str = "argmax"  # "argmax": the end-of-text token (highest id, CLIP), "first": CLS, "last" (SigLIP), "none"
    pad_id: int = 0  # bidirectional towers mask keys equal to it (-1: no masking, SigLIP's convention)
    proj_bias: bool = False  # a bias in the text projection (SigLIP's head)
    tokenizer: str = "clip_bpe"  # "byte" (offline, vlcore.models.tokenizer.ByteTokenizer) or a BPE vocab path

    def __post_init__(self):
        where = "TextConfig"
        _check_width(where, self.width, self.heads)
        if self.layers <= 0 or self.context_length <= 0 or self.vocab_size <= 0:
            raise ValueError(f"{where}: layers, context_length and vocab_size must be positive")
        _check_choice(where, "act", self.act, ACTIVATIONS)
        _check_choice(where, "pool", self.pool, ("argmax", "first", "last", "none"))


MANAGER_KINDS = ("adaptive", "static")


@dataclass
class FusionConfig:
    layers: int = 6  # FIBER: top blocks of each tower with cross-attention; BridgeTower / ManagerTower: cross-modal layers
    variant: str = "fiber"  # "fiber": fusion in the backbone; "bridgetower": a cross-modal encoder fed by bridges;
    #                         "managertower": fed by managers that aggregate several unimodal layers
    managed_layers: int = 0  # ManagerTower: top layers of each tower that every manager sees (0: all of the shorter tower)
    manager: str = "adaptive"  # ManagerTower: "adaptive" (AAUE, the paper's best) or "static" (SAUE) managers
    mlm_probability: float = 0.15
    itm_hard_negatives: bool = True  # sample ITM negatives from the ITC similarities (else uniformly)
    mask_token_id: int = 257  # ByteTokenizer's <mask>; give the BPE vocabulary an extra id for it
    special_token_ids: list = field(default_factory=lambda: [0, 257, 258, 259, 260])  # never masked

    def check(self, vision: VisionConfig, text: TextConfig) -> None:
        where = "FusionConfig"
        _check_choice(where, "variant", self.variant, ("fiber", "bridgetower", "managertower"))
        _check_choice(where, "manager", self.manager, MANAGER_KINDS)
        if not 0 <= self.managed_layers <= min(vision.layers, text.layers):
            raise ValueError(f"{where}: managed_layers ({self.managed_layers}) must be in [0, min(vision layers "
                             f"{vision.layers}, text layers {text.layers})]")
        if not 0 < self.layers <= min(vision.layers, text.layers):
            raise ValueError(f"{where}: fusion layers ({self.layers}) must be in [1, min(vision layers "
                             f"{vision.layers}, text layers {text.layers})]")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"{where}: mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if text.causal:
            raise ValueError(f"{where}: the fusion text tower must be bidirectional (text_cfg.causal = false)")
        if vision.tome_r:
            raise ValueError(f"{where}: ToMe is not supported in the fused image tower")
        if not 0 <= self.mask_token_id < text.vocab_size:
            raise ValueError(f"{where}: mask_token_id {self.mask_token_id} is outside the vocabulary ({text.vocab_size})")


@dataclass
class ConnectorConfig:
    kind: str = "avg_pool"  # "avg_pool" (Open-Qwen2VL), "bilinear" (LLaVA-OneVision), "merge_2x2" (Qwen2-VL), "none"
    output_hw: Optional[list] = None  # pooled grid for avg_pool / bilinear, e.g. [12, 12]
    image_token_id: int = 258  # the placeholder id that vision tokens replace (ByteTokenizer's <image>)
    manager_layers: int = 0  # > 0: a ManagerTower manager aggregates the top N vision layers before pooling
    manager: str = "static"  # "static" (learned layer weights) or "adaptive" (per-token weights from the top layer)

    def check(self, vision: VisionConfig) -> None:
        where = "ConnectorConfig"
        _check_choice(where, "kind", self.kind, ("avg_pool", "bilinear", "merge_2x2", "none"))
        _check_choice(where, "manager", self.manager, MANAGER_KINDS)
        if not 0 <= self.manager_layers <= vision.layers:
            raise ValueError(f"{where}: manager_layers ({self.manager_layers}) must be in [0, vision layers {vision.layers}]")
        if self.manager_layers and vision.tome_r:
            raise ValueError(f"{where}: a manager aggregates whole layers of tokens, which ToMe merging changes")
        grid = vision.grid_size
        if self.kind in ("avg_pool", "bilinear"):
            if self.output_hw is None or len(self.output_hw) != 2 or not all(0 < n <= grid for n in self.output_hw):
                raise ValueError(f"{where}: output_hw must be [h, w] within the {grid}x{grid} grid, got {self.output_hw}")
        if self.kind == "merge_2x2" and grid % 2:
            raise ValueError(f"{where}: merge_2x2 needs an even token grid, got {grid}x{grid}")
        if vision.tome_r and self.kind != "none":
            raise ValueError(f"{where}: a pooling connector needs the token grid, which ToMe merging destroys "
                             "(ToMe in the vision tower goes with kind='none')")

    def num_tokens(self, vision: VisionConfig) -> int:
        """Vision tokens per image handed to the language model."""
        if self.kind in ("avg_pool", "bilinear"):
            return self.output_hw[0] * self.output_hw[1]
        if self.kind == "merge_2x2":
            return vision.grid_size ** 2 // 4
        # "none": every patch token left after ToMe (the schedule was checked to fit, so each r applies)
        return vision.grid_size ** 2 - sum(vision.tome_schedule)


MODEL_KINDS = ("clip", "fusion", "captioner")


@dataclass
class ModelConfig:
    """One model: its kind, its towers and the parts that kind uses."""

    kind: str = "clip"
    embed_dim: int = 512
    vision_cfg: VisionConfig = field(default_factory=VisionConfig)
    text_cfg: TextConfig = field(default_factory=TextConfig)
    fusion_cfg: Optional[FusionConfig] = None
    connector_cfg: Optional[ConnectorConfig] = None
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = None  # SigLIP: -10
    impl: str = "vlcore"  # "vlcore" kernels where present, else plain torch; "torch" always plain torch

    def __post_init__(self):
        _check_choice("ModelConfig", "kind", self.kind, MODEL_KINDS)
        _check_choice("ModelConfig", "impl", self.impl, ("vlcore", "torch"))
        if self.embed_dim <= 0:
            raise ValueError(f"ModelConfig: embed_dim must be positive, got {self.embed_dim}")
        if self.kind == "fusion":
            self.fusion_cfg = self.fusion_cfg or FusionConfig()
            self.fusion_cfg.check(self.vision_cfg, self.text_cfg)
        if self.kind == "captioner":
            self.connector_cfg = self.connector_cfg or ConnectorConfig()
            self.connector_cfg.check(self.vision_cfg)
            if not self.text_cfg.causal:
                raise ValueError("ModelConfig: the captioner's language model must be causal (text_cfg.causal = true)")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key, sub in (("vision_cfg", VisionConfig), ("text_cfg", TextConfig), ("fusion_cfg", FusionConfig),
                         ("connector_cfg", ConnectorConfig)):
            if isinstance(d.get(key), dict):
                d[key] = _sub_from_dict(sub, d[key], key)
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _sub_from_dict(cls, d: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)
