"""VLP models built from vlcore's modules: CLIP dual encoder, FIBER-style fusion, LLaVA-style captioner.

```python
from vlcore.models import create_model, list_models
from vlcore.models.losses import ClipLoss, SigLipLoss
from vlcore.models.tokenizer import get_tokenizer

model = create_model("ViT-B-16", impl="vlcore", vision_cfg={"tome_r": 8})   # configs/ViT-B-16.json + overrides
tokenizer = get_tokenizer("/path/to/bpe_simple_vocab_16e6.txt.gz")          # "byte" for the tiny presets
out = model(images, tokenizer(captions, model.context_length))               # features, logit_scale, logit_bias
loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, chunk_size=1024)(
    out["image_features"], out["text_features"], out["logit_scale"])
model.clamp_logit_scale()                                                    # after each optimizer step
```

``create_model("fiber-tiny")(images, tokens)`` returns the fusion losses (itc, itm, mlm, loss);
``create_model("captioner-tiny")(packed_batch, images)`` the captioning loss, ``.generate(images, prompts)``
greedy captions. open_clip checkpoints load with :func:`vlcore.models.openclip.load_open_clip_state_dict`.
"""

from vlcore.models.config import ConnectorConfig, FusionConfig, ModelConfig, TextConfig, VisionConfig
from vlcore.models.factory import build_model, create_model, get_model_config, list_models

__all__ = ["create_model", "build_model", "get_model_config", "list_models", "ModelConfig", "VisionConfig",
           "TextConfig", "FusionConfig", "ConnectorConfig"]
