"""What a batch is and what loss it gives, per model kind (CLIP, fusion, captioner).

The collate functions run in the dataloader workers; ``compute_loss`` runs in the training step.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from vlcore.models.tokenizer import get_tokenizer as _load_tokenizer
from vlcore.packing import IGNORE_INDEX, build_packed_batch, padded_waste

# One tokenizer per process (each dataloader worker builds its own): a BPE vocabulary takes a moment to load.
get_tokenizer = lru_cache(maxsize=None)(_load_tokenizer)


class ContrastiveCollate:
    """Images + tokens of one caption per image (a random one of its captions when training)."""

    def __init__(self, tokenizer: str, context_length: int, train: bool = True):
        self.tokenizer, self.context_length, self.train = tokenizer, context_length, train

    def __call__(self, images: torch.Tensor, captions: list, rng: np.random.Generator) -> dict:
        # The caption is drawn with the batch's own generator, never the global one: a resumed run draws
        # the same captions as an uninterrupted one.
        chosen = [caps[int(rng.integers(len(caps)))] if self.train else caps[0] for caps in captions]
        return {"images": images, "tokens": get_tokenizer(self.tokenizer)(chosen, self.context_length)}


class CaptionCollate:
    """Images + one packed sequence of ``[image placeholders] caption <eot>`` per image (loss on the caption),
    concatenated without padding (``vlcore.packing``); records the padding a padded batch would have had."""

    def __init__(self, tokenizer: str, context_length: int, num_image_tokens: int, image_token_id: int,
                 train: bool = True):
        self.tokenizer, self.context_length, self.train = tokenizer, context_length, train
        self.num_image_tokens, self.image_token_id = num_image_tokens, image_token_id

    def __call__(self, images: torch.Tensor, captions: list, rng: np.random.Generator) -> dict:
        tok = get_tokenizer(self.tokenizer)
        # What is left of the context for the caption after the image placeholders and <eot>; longer
        # captions are cut (the model cannot attend past its context anyway).
        room = self.context_length - self.num_image_tokens - 1
        samples, lengths = [], []
        for caps in captions:
            caption = caps[int(rng.integers(len(caps)))] if self.train else caps[0]
            ids = [self.image_token_id] * self.num_image_tokens + tok.encode(caption)[:room] + [tok.eot_id]
            input_ids = torch.tensor(ids, dtype=torch.long)
            labels = input_ids.clone()
            labels[: self.num_image_tokens] = IGNORE_INDEX  # no loss on the image positions: only the caption
            samples.append({"input_ids": input_ids, "labels": labels})
            lengths.append(len(ids))
        packed = build_packed_batch(samples, self.image_token_id)
        return {"images": images, "packed": packed, "padding_avoided": padded_waste(lengths, len(lengths))}


FUSION_LOSS_TERMS = ("itc", "itm", "mlm")  # the fusion objectives that sum to its loss


def make_collate(model_cfg, train: bool = True):
    text = model_cfg.text_cfg
    if model_cfg.kind == "captioner":
        return CaptionCollate(text.tokenizer, text.context_length, model_cfg.connector_cfg.num_tokens(model_cfg.vision_cfg),
                              model_cfg.connector_cfg.image_token_id, train)
    return ContrastiveCollate(text.tokenizer, text.context_length, train)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors (and packed batches, which have ``.to``) moved to the device; anything else kept as is.
    ``non_blocking``: with pinned memory the copy overlaps the previous step's work on the GPU."""
    out = {}
    for key, value in batch.items():
        out[key] = value.to(device, non_blocking=True) if hasattr(value, "to") else value
    return out


def compute_loss(model, kind: str, batch: dict, contrastive_loss) -> tuple[torch.Tensor, dict]:
    """The scalar training loss of one (micro-)batch, and the terms it sums (detached; fusion models' ITC,
    ITM and MLM, logged as ``loss_itc`` ...; none for the others). CLIP's loss is applied here, on the
    features, so that GradCache can call the towers and the loss separately; fusion and captioner models
    compute their own."""
    if kind == "clip":
        out = model(batch["images"], batch["tokens"])
        return contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"]), {}
    if kind == "fusion":
        out = model(batch["images"], batch["tokens"])
        return out["loss"], {name: out[name].detach() for name in FUSION_LOSS_TERMS}
    return model(batch["packed"], batch["images"])["loss"], {}
