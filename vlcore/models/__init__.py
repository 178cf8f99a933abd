"""VLP models built from vlcore's modules: CLIP dual encoder, FIBER-style fusion, LLaVA-style captioner.

``create_model(name, **overrides)`` builds one from ``configs/<name>.json``; ``list_models()`` names them.
"""

from vlcore.models.config import ConnectorConfig, FusionConfig, ModelConfig, TextConfig, VisionConfig
from vlcore.models.factory import build_model, create_model, get_model_config, list_models

__all__ = ["create_model", "build_model", "get_model_config", "list_models", "ModelConfig", "VisionConfig",
           "TextConfig", "FusionConfig", "ConnectorConfig"]
