"""``create_model(name, **overrides)``: architectures by name, from ``configs/<name>.json`` (open_clip's
registry pattern). ``name`` may also be the path of a JSON file in the same format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import nn

from vlcore.models.config import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"


def list_models() -> list[str]:
    """Names of the bundled architectures."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _load_json(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        path = Path(name)
    if not path.exists() or path.suffix != ".json":
        raise ValueError(f"unknown model {name!r}: not one of {list_models()} nor a .json config file")
    with open(path) as f:
        return json.load(f)


def get_model_config(name: str, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of ``name`` with ``overrides`` applied: top-level fields replace, dicts for
    ``vision_cfg`` / ``text_cfg`` / ``fusion_cfg`` / ``connector_cfg`` update the named fields only, e.g.
    ``get_model_config("ViT-B-16", impl="torch", vision_cfg={"tome_r": 8})``."""
    d = _load_json(name)
    for key, value in overrides.items():
        if key.endswith("_cfg") and isinstance(value, dict):
            d[key] = {**(d.get(key) or {}), **value}
        else:
            d[key] = value
    return ModelConfig.from_dict(d)


def create_model(name: str, **overrides) -> nn.Module:
    """Build the model ``name`` with fresh weights: a :class:`~vlcore.models.clip.CLIP`, ``FusionModel`` /
    ``BridgeTowerModel`` / ``ManagerTowerModel`` or ``Captioner`` by the config's ``kind``. Raises ``ValueError`` on a bad
    configuration."""
    cfg = get_model_config(name, **overrides)
    return build_model(cfg)


def build_model(cfg: ModelConfig, *, itc_loss: Optional[nn.Module] = None) -> nn.Module:
    """The model of an already parsed config. ``itc_loss`` replaces a fusion model's default contrastive
    loss (CLIP's loss is applied by the caller, on the features the model returns)."""
    if itc_loss is not None and cfg.kind != "fusion":
        raise ValueError(f"build_model: itc_loss is the fusion models' ITC loss; model kind {cfg.kind!r} has none")
    if cfg.kind == "clip":
        from vlcore.models.clip import CLIP
        return CLIP(cfg)
    if cfg.kind == "fusion":
        from vlcore.models.fusion import BridgeTowerModel, FusionModel
        if cfg.fusion_cfg.variant == "managertower":
            from vlcore.models.managertower import ManagerTowerModel
            return ManagerTowerModel(cfg, itc_loss)
        model_cls = FusionModel if cfg.fusion_cfg.variant == "fiber" else BridgeTowerModel
        return model_cls(cfg, itc_loss)
    from vlcore.models.captioner import Captioner
    return Captioner(cfg)
