"""LLaVA / Open-Qwen2VL-style captioner: vision tower -> connector (token pooling or 2x2 merger) -> MLP
projector -> causal decoder LM, trained on packed multimodal sequences (vlcore.packing: cu_seqlens,
positions restarting per sample, vision tokens scattered into their placeholder rows, loss only where
``labels != -100``), with greedy batched generation over a KV cache.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlcore.models.config import ModelConfig
from vlcore.models.text import TextTransformer
from vlcore.models.vision import VisionTransformer
from vlcore.nn import backend
from vlcore.nn.attention import KVCache
from vlcore.nn.connector import TokenPooler
from vlcore.nn.manager import LayerManager
from vlcore.nn.transformer import Mlp
from vlcore.packing import IGNORE_INDEX, PackedBatch


class Captioner(nn.Module):
    """``forward(packed_batch, images [N_img, 3, H, W]) -> dict(loss, num_targets)``; ``generate``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        vision, text, connector = cfg.vision_cfg, cfg.text_cfg, cfg.connector_cfg
        self.impl = cfg.impl
        self.visual = VisionTransformer(vision, None, impl=cfg.impl)
        # ManagerTower's manager as a connector plug-in: a weighted mix of the top vision layers replaces the
        # last layer's output (vlcore/nn/manager.py).
        self.vision_manager = None
        if connector.manager_layers:
            self.vision_manager = LayerManager(vision.width, connector.manager_layers,
                                               adaptive=connector.manager == "adaptive", with_previous=False,
                                               norm_eps=vision.norm_eps)
        # The token reduction (pooling / 2x2 merger) has no parameters; norm and projector stay here.
        self.pooler = TokenPooler(connector.kind, output_hw=connector.output_hw, impl=cfg.impl)
        merged_width = self.pooler.channels_out(vision.width)
        # Qwen2-VL's merger normalises the four concatenated tokens before its MLP.
        self.merge_norm = nn.LayerNorm(merged_width, eps=vision.norm_eps) if connector.kind == "merge_2x2" else None
        self.projector = Mlp(merged_width, text.width, text.width, act="gelu")
        self.lm = TextTransformer(text, None, impl=cfg.impl)
        self.lm_head = nn.Linear(text.width, text.vocab_size, bias=False)
        self.num_image_tokens = connector.num_tokens(vision)

    @property
    def image_size(self) -> int:
        return self.config.vision_cfg.image_size

    @property
    def image_token_id(self) -> int:
        return self.config.connector_cfg.image_token_id

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[N_img, 3, H, W] -> [N_img, num_image_tokens, lm width]``."""
        vision, connector = self.config.vision_cfg, self.config.connector_cfg
        if self.vision_manager is None:
            tokens, _ = self.visual.forward_tokens(images)
        else:
            x, top = self.visual.embed(images), []
            for i, block in enumerate(self.visual.blocks):
                x = block(x)
                if i >= len(self.visual.blocks) - connector.manager_layers:
                    top.append(x)
            tokens = self.vision_manager(torch.stack(top))  # each layer gets the manager's own LayerNorm
        tokens = tokens[:, int(vision.class_token):]  # the connector works on the patch grid
        tokens = self.pooler(tokens, (vision.grid_size, vision.grid_size))
        if self.merge_norm is not None:
            tokens = self.merge_norm(tokens)
        return self.projector(tokens)

    def sample(self, caption_ids: Sequence[int], prompt_ids: Sequence[int] = ()) -> dict:
        """One training sample for :func:`vlcore.packing.build_packed_batch`: image placeholders, then the
        prompt (no loss), then the caption (loss)."""
        prefix = [self.image_token_id] * self.num_image_tokens + list(prompt_ids)
        input_ids = torch.tensor(prefix + list(caption_ids), dtype=torch.long)
        labels = input_ids.clone()
        labels[: len(prefix)] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}

    def forward(self, batch: PackedBatch, images: torch.Tensor, *, output_hidden_states: bool = False) -> dict:
        """Mean next-token cross-entropy over the packed batch's caption tokens. ``batch.input_ids [T]``
        holds ``num_image_tokens`` placeholders per image, images in order. ``output_hidden_states`` adds
        ``hidden_states``: the LM's states ``[T, width]`` in Hugging Face's convention (the embeddings with the
        vision rows scattered in, then every block's output, the last one after ``norm_final``), for
        per-layer probes such as MIR (vlcore/evaluation/mir.py)."""
        vision_rows = self.image_tokens(images).flatten(0, 1)
        if vision_rows.shape[0] != batch.image_positions.shape[0]:
            raise ValueError(f"Captioner: {images.shape[0]} images give {vision_rows.shape[0]} vision tokens but the "
                             f"batch has {batch.image_positions.shape[0]} image placeholders")
        x = self.lm.embed(batch.input_ids, batch.position_ids)
        x = backend.scatter_image_embeds(x, vision_rows.to(x.dtype), batch.image_positions, impl=self.impl)
        hidden_states = [x]
        for block in self.lm.blocks:
            x = block(x, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
            hidden_states.append(x)
        x = self.lm.norm_final(x)
        hidden_states[-1] = x
        extra = {"hidden_states": hidden_states} if output_hidden_states else {}
        # Row t predicts labels[t + 1]; each sample's first label is -100, so no row predicts across samples.
        targets = batch.labels[1:]
        taken = targets != IGNORE_INDEX
        logits = self.lm_head(x[:-1][taken])
        if logits.shape[0] == 0:  # a pack with no caption token: a zero that keeps the graph connected
            return {"loss": 0.0 * x.sum(), "num_targets": taken.sum(), **extra}
        return {"loss": F.cross_entropy(logits.float(), targets[taken]), "num_targets": taken.sum(), **extra}

    def _prefill_state(self, images: torch.Tensor, prompts: Optional[Sequence[Sequence[int]]], max_new_tokens: int,
                       where: str):
        """What both decoders start from: the left-padded rows of ``[image tokens] prompt`` embedded, with the
        vision rows scattered in, each sample's positions (starting at its first real token), a key bias that
        hides the pad keys, and one empty KV cache per block sized for ``max_new_tokens`` more positions."""
        batch = images.shape[0]
        prompts = [list(p) for p in prompts] if prompts is not None else [[] for _ in range(batch)]
        if len(prompts) != batch:
            raise ValueError(f"Captioner.{where}: {batch} images but prompts has {len(prompts)} entries")
        n = self.num_image_tokens
        lengths = [n + len(p) for p in prompts]
        width = max(lengths)
        total = width + max_new_tokens
        if total > self.config.text_cfg.context_length:
            raise ValueError(f"Captioner.{where}: {total} positions exceed context_length {self.config.text_cfg.context_length}")
        device = images.device
        pads = torch.tensor([width - length for length in lengths], device=device)
        ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        positions = (torch.arange(total, device=device)[None] - pads[:, None]).clamp_min(0)
        x = self.lm.embed(ids, positions[:, :width])
        # As in training (forward), vision rows replace whole embedded rows: they carry no position embedding.
        image_rows = pads[:, None] + torch.arange(n, device=device)  # [B, n] where each sample's image goes
        x = x.scatter(1, image_rows[..., None].expand(-1, -1, x.shape[-1]), self.image_tokens(images).to(x.dtype))
        key_bias = torch.zeros(batch, total, dtype=x.dtype, device=device)
        key_bias.masked_fill_(torch.arange(total, device=device)[None] < pads[:, None], float("-inf"))
        caches = [KVCache(batch, total, blk.attn.num_kv_heads, blk.attn.head_dim, dtype=x.dtype, device=device)
                  for blk in self.lm.blocks]
        return x, positions, key_bias, caches, width

    def _next_logits(self, x: torch.Tensor, key_bias: torch.Tensor, caches: list, seen: int) -> torch.Tensor:
        """Run the new rows ``x`` through the LM over the cache; the logits of the last row, ``[B, vocab]``."""
        for block, cache in zip(self.lm.blocks, caches):
            x = block(x, key_bias=key_bias[:, :seen], kv_cache=cache)
        return self.lm_head(self.lm.norm_final(x[:, -1]))

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: Optional[Sequence[Sequence[int]]] = None, *,
                 max_new_tokens: int = 16, eos_token_id: Optional[int] = None) -> list[list[int]]:
        """Greedy decoding for a batch of images ``[B, 3, H, W]``, each with its own prompt token list.

        Sequences are left-padded to a common length (pad keys get a -inf bias, positions start at each
        sample's first real token), prefilled once, then decoded one token per step over a KV cache.
        Returns the generated ids of each sample, up to and including ``eos_token_id``.
        """
        batch = images.shape[0]
        x, positions, key_bias, caches, width = self._prefill_state(images, prompts, max_new_tokens, "generate")
        out = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool, device=images.device)
        for step in range(max_new_tokens):
            seen = width + step
            next_ids = self._next_logits(x, key_bias, caches, seen).argmax(dim=-1)
            for b in (~finished).nonzero().flatten().tolist():
                out[b].append(int(next_ids[b]))
            if eos_token_id is not None:
                finished |= next_ids == eos_token_id
                if bool(finished.all()):
                    break
            x = self.lm.embed(next_ids[:, None], positions[:, seen : seen + 1])
        return out

    @torch.no_grad()
    def beam_search(self, images: torch.Tensor, prompts: Optional[Sequence[Sequence[int]]] = None, *,
                    num_beams: int = 3, max_new_tokens: int = 16, eos_token_id: Optional[int] = None,
                    length_penalty: float = 1.0) -> list[tuple[list[int], float]]:
        """Beam search (Hugging Face's rules, ``early_stopping=False``) for a batch of images: per sample,
        ``(ids up to and including eos_token_id, summed log-probability)`` of the best hypothesis by
        ``sum log p / length ** length_penalty``.

        Each step extends every live beam by every token and keeps the best ``num_beams`` continuations
        that do not end the caption; those that do (among the best ``num_beams``) become finished
        hypotheses. A sample stops once it has ``num_beams`` finished hypotheses, none worse than its best
        live beam. The prefilled state is shared by a sample's beams; the caches follow the surviving beams.
        """
        if num_beams < 1:
            raise ValueError(f"Captioner.beam_search: num_beams must be >= 1, got {num_beams}")
        batch, beams, device = images.shape[0], num_beams, images.device
        x, positions, key_bias, caches, width = self._prefill_state(images, prompts, max_new_tokens, "beam_search")
        logp = self._next_logits(x, key_bias, caches, width).float().log_softmax(dim=-1)
        rows = torch.arange(batch, device=device).repeat_interleave(beams)
        logp, positions, key_bias = logp[rows], positions[rows], key_bias[rows]
        for cache in caches:
            cache.k, cache.v = cache.k[rows], cache.v[rows]
        vocab = logp.shape[-1]
        scores = torch.full((batch, beams), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one live beam per sample at first, so the first step picks distinct tokens
        sequences = [[] for _ in range(batch * beams)]
        finished = [[] for _ in range(batch)]  # (normalised score, summed log p, ids)
        done = [False] * batch

        def normalised(total, length):
            return total / (length ** length_penalty)

        for step in range(max_new_tokens):
            candidates = (scores.reshape(-1, 1) + logp).reshape(batch, beams * vocab)
            top_scores, top_index = candidates.topk(min(2 * beams, beams * vocab), dim=1)
            new_scores = torch.full((batch, beams), float("-inf"), device=device)
            new_beam = torch.zeros(batch, beams, dtype=torch.long, device=device)
            new_token = torch.zeros(batch, beams, dtype=torch.long, device=device)
            for b in range(batch):
                if done[b]:
                    continue
                kept = 0
                for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                    if score == float("-inf"):
                        break
                    beam, token = divmod(index, vocab)
                    if token == eos_token_id:
                        if rank < beams:
                            ids = sequences[b * beams + beam] + [token]
                            finished[b].append((normalised(score, len(ids)), score, ids))
                    else:
                        new_scores[b, kept], new_beam[b, kept], new_token[b, kept] = score, beam, token
                        kept += 1
                    if kept == beams:
                        break
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:beams]
                best_live = normalised(new_scores[b].max().item(), step + 1)
                done[b] = len(finished[b]) == beams and finished[b][-1][0] >= best_live
            if all(done):
                break
            reorder = (torch.arange(batch, device=device)[:, None] * beams + new_beam).flatten()
            for cache in caches:
                cache.k, cache.v = cache.k[reorder], cache.v[reorder]
            sequences = [sequences[r] + [t] for r, t in zip(reorder.tolist(), new_token.flatten().tolist())]
            scores = new_scores
            if step + 1 == max_new_tokens:
                break
            seen = width + step
            x = self.lm.embed(new_token.reshape(-1, 1), positions[:, seen : seen + 1])
            logp = self._next_logits(x, key_bias, caches, seen + 1).float().log_softmax(dim=-1)
        out = []
        for b in range(batch):
            hypotheses = list(finished[b])
            if not done[b]:  # out of budget: the live beams compete too
                hypotheses += [(normalised(s, len(sequences[b * beams + i])), s, sequences[b * beams + i])
                               for i, s in enumerate(scores[b].tolist()) if s != float("-inf")]
            best = max(hypotheses, key=lambda h: h[0])
            out.append((best[2], best[1]))
        return out
