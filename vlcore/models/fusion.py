"""FIBER-style fusion in the backbone (docs/models.md, 'FIBER-style fusion'), on pre-LN ViT and bidirectional text towers.

The top ``K = fusion_cfg.layers`` blocks of both towers carry a gated cross-attention (``alpha`` init 0).
Vision block ``Lv - K + i`` runs beside text block ``Lt - K + i``; each reads the other's *pre-update*
state, so the two updates of a layer are independent. With fusion off (no context passed), the same
weights are the two unimodal towers: a dual encoder for ITC and retrieval.

Objectives (summed, as FIBER does): ITC on the unfused features, ITM on ``[I; I; I_neg]`` x
``[T; T_neg; T]`` with negatives sampled from the ITC similarities, and MLM (15 %, 80/10/10) on the fused
text stream. The lower, unfused blocks run once per input; only the top K run per pair. For ITM the first
fused layer reads each image's / text's K/V once through ``context_index`` (the attention's ``kv_segment``
under ``impl="vlcore"``; copies under ``impl="torch"``).

:class:`BridgeTowerModel` (``fusion_cfg.variant = "bridgetower"``, docs/models.md, 'BridgeTower') keeps the towers unimodal
and fuses in a K-layer cross-modal encoder fed by bridge layers, with the same heads and objectives.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.models.clip import LogitScale
from vlcore.models.config import ModelConfig
from vlcore.models.losses import ClipLoss
from vlcore.models.text import MlmHead, TextTransformer
from vlcore.models.vision import VisionTransformer
from vlcore.nn.transformer import Block

IGNORE_INDEX = -100


def mask_tokens(tokens: torch.Tensor, *, probability: float, mask_token_id: int, vocab_size: int,
                special_token_ids, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (HF ``DataCollatorForLanguageModeling``): each non-special token is chosen with
    ``probability``; chosen tokens become ``mask_token_id`` (80 %), a random token (10 %) or stay (10 %).
    Returns ``(masked tokens, labels)`` with labels ``-100`` wherever no prediction is asked."""
    def draw(shape):
        return torch.rand(shape, generator=generator, device=tokens.device)

    special = torch.isin(tokens, torch.as_tensor(list(special_token_ids), device=tokens.device))
    chosen = (draw(tokens.shape) < probability) & ~special
    labels = torch.where(chosen, tokens, IGNORE_INDEX)
    replaced = chosen & (draw(tokens.shape) < 0.8)
    randomised = chosen & ~replaced & (draw(tokens.shape) < 0.5)
    random_tokens = torch.randint(vocab_size, tokens.shape, generator=generator, device=tokens.device)
    masked = torch.where(replaced, mask_token_id, tokens)
    return torch.where(randomised, random_tokens, masked), labels


class FusionModel(nn.Module):
    """``forward(images [B, 3, H, W], tokens [B, L]) -> dict(itc, itm, mlm, loss)``; ``encode_image`` /
    ``encode_text`` are the unfused dual encoder (normalised ``[B, embed_dim]``)."""

    def __init__(self, cfg: ModelConfig, itc_loss: Optional[nn.Module] = None):
        super().__init__()
        self.config = cfg
        vision, text, fusion = cfg.vision_cfg, cfg.text_cfg, cfg.fusion_cfg
        self.num_fused = fusion.layers
        in_backbone = fusion.layers if fusion.variant == "fiber" else 0  # BridgeTower fuses after the towers
        self.visual = VisionTransformer(vision, None, impl=cfg.impl, fusion_layers=in_backbone, context_dim=text.width)
        self.text = TextTransformer(text, None, impl=cfg.impl, fusion_layers=in_backbone, context_dim=vision.width)
        self.itc_image_proj = nn.Linear(vision.width, cfg.embed_dim)
        self.itc_text_proj = nn.Linear(text.width, cfg.embed_dim)
        self.logit = LogitScale(cfg.init_logit_scale, cfg.init_logit_bias)
        self.itm_head = nn.Linear(text.width + vision.width, 2)
        self.mlm_head = MlmHead(text.width, text.vocab_size, text.norm_eps)
        #: the ITC loss: one process's ``ClipLoss`` unless the caller passes another (a distributed trainer
        #: passes ``ClipLoss(local_loss=True, gather_with_grad=True, rank=..., world_size=...)`` or a SigLIP loss)
        self.itc_loss = itc_loss if itc_loss is not None else ClipLoss()

    @property
    def image_size(self) -> int:
        return self.config.vision_cfg.image_size

    @property
    def context_length(self) -> int:
        return self.config.text_cfg.context_length

    def clamp_logit_scale(self) -> None:
        self.logit.clamp_()

    # --- the towers, split at the first fused block -------------------------------------------------------

    def lower_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.visual.embed(images)
        for block in self.visual.blocks[: len(self.visual.blocks) - self.num_fused]:
            x = block(x)
        return x

    def lower_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x, lengths = self.text.embed(tokens), self.text.key_lengths(tokens)
        for block in self.text.blocks[: len(self.text.blocks) - self.num_fused]:
            x = block(x, key_lengths=lengths)
        return x

    def upper(self, image_states: torch.Tensor, text_states: torch.Tensor, text_lengths: torch.Tensor, *,
              fuse: bool, image_index: Optional[torch.Tensor] = None,
              text_index: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top K blocks of both towers on pairs ``(image_index[p], text_index[p])`` (default: row p with
        row p), fused or not. Returns ``(image tokens after norm_post, text states after norm_final)``."""
        image_context, text_context, text_context_lengths = image_states, text_states, text_lengths
        if image_index is not None:
            image_states = image_states[image_index]
        if text_index is not None:
            text_states, text_lengths = text_states[text_index], text_lengths[text_index]
        vision_blocks = self.visual.blocks[len(self.visual.blocks) - self.num_fused:]
        text_blocks = self.text.blocks[len(self.text.blocks) - self.num_fused:]
        for vision_block, text_block in zip(vision_blocks, text_blocks):
            if fuse:
                new_image = vision_block(image_states, context=text_context, context_lengths=text_context_lengths,
                                         context_index=text_index)
                new_text = text_block(text_states, key_lengths=text_lengths, context=image_context,
                                      context_index=image_index)
            else:
                new_image, new_text = vision_block(image_states), text_block(text_states, key_lengths=text_lengths)
            image_states, text_states = new_image, new_text
            # After the first layer every pair has its own states: later layers read them one-to-one.
            image_context, text_context, text_context_lengths = image_states, text_states, text_lengths
            image_index = text_index = None
        return self.visual.norm_post(image_states), self.text.norm_final(text_states)

    # --- heads --------------------------------------------------------------------------------------------

    def _itc_features(self, image_tokens, text_states, tokens):
        image = F.normalize(self.itc_image_proj(self.visual.pool(image_tokens)), dim=-1)
        text = F.normalize(self.itc_text_proj(self.text.pool(text_states, tokens)), dim=-1)
        return image, text

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.itc_image_proj(self.visual.pool(self.visual.forward_tokens(images)[0]))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.itc_text_proj(self.text.pool(self.text.forward_tokens(tokens), tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def itm_logits(self, image_tokens: torch.Tensor, text_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[P, 2]`` not-match / match logits of fused pairs."""
        return self.itm_head(torch.cat([self.text.pool(text_states, tokens), self.visual.pool(image_tokens)], dim=-1))

    def match_scores(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """ITM match probability of each (image i, text i) pair, ``[B]`` (for ITM re-ranking)."""
        text_lengths = self.text.key_lengths(tokens)
        image_tokens, text_states = self.upper(self.lower_image(images), self.lower_text(tokens), text_lengths, fuse=True)
        return self.itm_logits(image_tokens, text_states, tokens).softmax(dim=-1)[:, 1]

    def pair_itm_logits(self, image_lower, text_lower, tokens: torch.Tensor, image_index: torch.Tensor,
                        text_index: torch.Tensor) -> torch.Tensor:
        """``[P, 2]`` ITM logits of the pairs ``(image_index[p], text_index[p])`` from :meth:`lower_image` /
        :meth:`lower_text` states computed once per image and text (``tokens`` are the texts'). As for ITM
        negatives, the first fused layer reads each image's and text's K/V once through ``context_index``
        (the attention's ``kv_segment``), so a candidate shared by k pairs is never copied k times."""
        text_lengths = self.text.key_lengths(tokens)
        fused_image, fused_text = self.upper(image_lower, text_lower, text_lengths, fuse=True,
                                             image_index=image_index, text_index=text_index)
        return self.itm_logits(fused_image, fused_text, tokens[text_index])

    def sample_negatives(self, similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One negative text per image and one negative image per text, drawn (no grad) with probability
        ``softmax(similarity)`` over the other items of the batch (uniform when hard negatives are off)."""
        with torch.no_grad():
            batch = similarity.shape[0]
            if not self.config.fusion_cfg.itm_hard_negatives:
                similarity = torch.zeros_like(similarity)
            diagonal = torch.eye(batch, dtype=torch.bool, device=similarity.device)
            weights_i2t = similarity.float().softmax(dim=1).masked_fill(diagonal, 0.0)
            weights_t2i = similarity.t().float().softmax(dim=1).masked_fill(diagonal, 0.0)
            negative_text = torch.multinomial(weights_i2t, 1)[:, 0]
            negative_image = torch.multinomial(weights_t2i, 1)[:, 0]
        return negative_text, negative_image

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        batch = images.shape[0]
        if batch < 2:
            raise ValueError("FusionModel: ITM needs at least 2 pairs per batch to draw negatives")
        fusion, text_cfg = self.config.fusion_cfg, self.config.text_cfg
        text_lengths = self.text.key_lengths(tokens)
        image_lower, text_lower = self.lower_image(images), self.lower_text(tokens)

        # ITC on the unfused towers.
        image_tokens, text_states = self.upper(image_lower, text_lower, text_lengths, fuse=False)
        image_features, text_features = self._itc_features(image_tokens, text_states, tokens)
        logit_scale, logit_bias = self.logit()
        itc = self.itc_loss(image_features, text_features, logit_scale, logit_bias)

        # ITM on positives and ITC-hard negatives: images [I; I; I_neg], texts [T; T_neg; T].
        negative_text, negative_image = self.sample_negatives(logit_scale * image_features @ text_features.t())
        rows = torch.arange(batch, device=images.device)
        image_index = torch.cat([rows, rows, negative_image])
        text_index = torch.cat([rows, negative_text, rows])
        fused_image, fused_text = self.upper(image_lower, text_lower, text_lengths, fuse=True,
                                             image_index=image_index, text_index=text_index)
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(images.device)
        itm = F.cross_entropy(self.itm_logits(fused_image, fused_text, tokens[text_index]), itm_labels)

        # MLM on the fused text stream of masked captions.
        masked, labels = mask_tokens(tokens, probability=fusion.mlm_probability, mask_token_id=fusion.mask_token_id,
                                     vocab_size=text_cfg.vocab_size, special_token_ids=fusion.special_token_ids)
        _, mlm_states = self.upper(image_lower, self.lower_text(masked), text_lengths, fuse=True)
        predicted = labels != IGNORE_INDEX
        if predicted.any():
            mlm = F.cross_entropy(self.mlm_head(mlm_states[predicted]), labels[predicted])
        else:  # nothing masked in this batch (tiny batches): a zero that keeps the graph connected
            mlm = 0.0 * self.mlm_head(mlm_states[:, :1]).sum()
        return {"itc": itc, "itm": itm, "mlm": mlm, "loss": itc + itm + mlm}


class CrossModalTower(nn.Module):
    """One modality's side of BridgeTower's cross-modal encoder: ``layers`` blocks with (ungated)
    cross-attention to the other side, each fed by a bridge ``LN(W h_uni + type + x_prev)``."""

    def __init__(self, width: int, heads: int, context_dim: int, layers: int, *, mlp_ratio: float, act: str,
                 norm_eps: float, impl):
        super().__init__()
        self.bridge_proj = nn.Linear(width, width)
        self.type_embedding = nn.Parameter(torch.zeros(width))
        self.bridges = nn.ModuleList([nn.LayerNorm(width, eps=norm_eps) for _ in range(layers)])
        self.blocks = nn.ModuleList([
            Block(width, heads, mlp_ratio=mlp_ratio, act=act, norm_eps=norm_eps, context_dim=context_dim, gated=False,
                  impl=impl) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=norm_eps)

    def bridge(self, layer: int, unimodal: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.bridge_proj(unimodal) + self.type_embedding.to(unimodal.dtype)
        return self.bridges[layer](x if previous is None else x + previous)


class BridgeTowerModel(FusionModel):
    """BridgeTower-style fusion (docs/models.md, 'BridgeTower') on the same blocks and objectives as :class:`FusionModel`: the
    towers run unfused; the outputs of their top K layers feed, one to one through bridge layers, a K-layer
    cross-modal encoder per modality whose layers read each other's inputs (cross-attention, not gated)."""

    def __init__(self, cfg: ModelConfig, itc_loss: Optional[nn.Module] = None):
        super().__init__(cfg, itc_loss)
        vision, text, k = cfg.vision_cfg, cfg.text_cfg, cfg.fusion_cfg.layers
        self.image_cross = CrossModalTower(vision.width, vision.heads, text.width, k, mlp_ratio=vision.mlp_ratio,
                                           act=vision.act, norm_eps=vision.norm_eps, impl=cfg.impl)
        self.text_cross = CrossModalTower(text.width, text.heads, vision.width, k, mlp_ratio=text.mlp_ratio,
                                          act=text.act, norm_eps=text.norm_eps, impl=cfg.impl)

    def lower_image(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the top K vision layers (the last one is the unimodal tower's)."""
        x, outputs = self.visual.embed(images), []
        for i, block in enumerate(self.visual.blocks):
            x = block(x)
            if i >= len(self.visual.blocks) - self.num_fused:
                outputs.append(x)
        return outputs

    def lower_text(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        x, lengths, outputs = self.text.embed(tokens), self.text.key_lengths(tokens), []
        for i, block in enumerate(self.text.blocks):
            x = block(x, key_lengths=lengths)
            if i >= len(self.text.blocks) - self.num_fused:
                outputs.append(x)
        return outputs

    def upper(self, image_states, text_states, text_lengths, *, fuse, image_index=None, text_index=None):
        if not fuse:
            return self.visual.norm_post(image_states[-1]), self.text.norm_final(text_states[-1])
        # Layer 0's bridges run once per image / text; the pairs read their K/V through context_index.
        image_in = self.image_cross.bridge(0, image_states[0], None)
        text_in = self.text_cross.bridge(0, text_states[0], None)
        image_context, text_context, text_context_lengths = image_in, text_in, text_lengths
        if image_index is not None:
            image_in, image_states = image_in[image_index], [h[image_index] for h in image_states]
        if text_index is not None:
            text_in, text_lengths = text_in[text_index], text_lengths[text_index]
            text_states = [h[text_index] for h in text_states]
        for layer, (image_block, text_block) in enumerate(zip(self.image_cross.blocks, self.text_cross.blocks)):
            if layer > 0:
                image_in = self.image_cross.bridge(layer, image_states[layer], image_out)
                text_in = self.text_cross.bridge(layer, text_states[layer], text_out)
                image_context, text_context, text_context_lengths = image_in, text_in, text_lengths
                image_index = text_index = None
            image_out = image_block(image_in, context=text_context, context_lengths=text_context_lengths,
                                    context_index=text_index)
            text_out = text_block(text_in, key_lengths=text_lengths, context=image_context, context_index=image_index)
        return self.image_cross.norm(image_out), self.text_cross.norm(text_out)
