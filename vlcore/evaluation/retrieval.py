"""Image-text retrieval: CLIP_benchmark's recall on contrastive (ITC) embeddings, and the ITM re-ranking of
the ITC top k that fusion models (ALBEF, BLIP, FIBER) report (docs/evaluation.md, 'Retrieval').

Conventions (CLIP_benchmark): every caption of every image is a text; scores are cosine similarities of
normalised embeddings. ``t2i_R@k``: per caption, is its image among the k best images; ``i2t_R@k``: per
image, is *any* of its captions among the k best texts. Re-ranking keeps the ITC order and reorders each
query's first ``rerank_k`` candidates by the ITM head's match logit (ALBEF's score; ``add_itc=True`` adds the
ITC similarity, as BLIP does), so recall at k >= ``rerank_k`` equals the ITC recall.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["encode_in_batches", "ranking", "hits_at_k", "rerank", "retrieval_recall", "itm_rerank_recall",
           "fusion_pair_scorer", "evaluate_retrieval"]

#: ``pair_score(image_index [P], text_index [P]) -> [P]``: higher means a better match.
PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def encode_in_batches(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, *, batch_size: int = 256,
                      device: Optional[torch.device] = None, autocast=nullcontext) -> torch.Tensor:
    """``encode`` over ``inputs`` in batches, as L2-normalised float32 rows on ``device``."""
    if batch_size < 1:
        raise ValueError(f"encode_in_batches: batch_size must be >= 1, got {batch_size}")
    out = []
    with autocast():
        for start in range(0, inputs.shape[0], batch_size):
            chunk = inputs[start : start + batch_size]
            out.append(encode(chunk.to(device) if device is not None else chunk).float())
    return F.normalize(torch.cat(out), dim=-1)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """``[Q, N]`` candidate indices of each query, best first (ties: lower index first)."""
    return scores.argsort(dim=1, descending=True, stable=True)


def hits_at_k(order: torch.Tensor, positive: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries with a positive among their first k candidates of ``order``, for each k."""
    if any(k < 1 for k in ks):
        raise ValueError(f"hits_at_k: every k in ks must be >= 1, got {list(ks)}")
    ranked_positive = positive.gather(1, order)
    return {k: ranked_positive[:, : min(k, order.shape[1])].any(dim=1).float().mean().item() for k in ks}


def rerank(order: torch.Tensor, k: int, pair_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``order`` with each query's first k candidates reordered by ``pair_score(query [Q*k], candidate [Q*k])``,
    descending (ties keep the earlier order); the rest untouched."""
    k = min(k, order.shape[1])
    if k <= 1:
        return order
    top = order[:, :k]
    queries = torch.arange(order.shape[0], device=order.device).repeat_interleave(k)
    scores = pair_score(queries, top.flatten()).reshape(order.shape[0], k)
    out = order.clone()
    out[:, :k] = top.gather(1, ranking(scores))
    return out


def _positives(text_to_image: torch.Tensor, num_images: int) -> torch.Tensor:
    positive = torch.zeros(text_to_image.shape[0], num_images, dtype=torch.bool, device=text_to_image.device)
    positive[torch.arange(text_to_image.shape[0], device=text_to_image.device), text_to_image] = True
    return positive


def _check_retrieval_inputs(similarity: torch.Tensor, text_to_image: torch.Tensor, where: str) -> None:
    if similarity.dim() != 2 or similarity.shape[0] != text_to_image.shape[0]:
        raise ValueError(f"{where}: similarity must be [N_txt, N_img] with N_txt = len(text_to_image) "
                         f"({text_to_image.shape[0]}), got {tuple(similarity.shape)}")
    if text_to_image.numel() and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= similarity.shape[1]):
        raise ValueError(f"{where}: text_to_image must index the {similarity.shape[1]} images")


def retrieval_recall(similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """CLIP_benchmark recall from text-image scores ``[N_txt, N_img]``: ``i2t_R@k`` and ``t2i_R@k``."""
    _check_retrieval_inputs(similarity, text_to_image, "retrieval_recall")
    positive = _positives(text_to_image, similarity.shape[1])
    t2i = hits_at_k(ranking(similarity), positive, ks)
    i2t = hits_at_k(ranking(similarity.t()), positive.t(), ks)
    return {**{f"i2t_R@{k}": v for k, v in i2t.items()}, **{f"t2i_R@{k}": v for k, v in t2i.items()}}


def itm_rerank_recall(similarity: torch.Tensor, text_to_image: torch.Tensor, pair_score: PairScorer, *, k: int,
                      ks: Sequence[int] = (1, 5, 10), add_itc: bool = False) -> dict:
    """Recall after re-ranking each query's ITC top ``k`` by ``pair_score(image_index, text_index)``:
    ``i2t_itm_R@k`` and ``t2i_itm_R@k``. ``add_itc`` ranks by ``pair_score + similarity`` (BLIP)."""
    _check_retrieval_inputs(similarity, text_to_image, "itm_rerank_recall")
    if k < 1:
        raise ValueError(f"itm_rerank_recall: k must be >= 1, got {k}")

    def score(image_index, text_index):
        s = pair_score(image_index, text_index).to(similarity.device, torch.float64)
        return s + similarity[text_index, image_index].double() if add_itc else s

    positive = _positives(text_to_image, similarity.shape[1])
    t2i_order = rerank(ranking(similarity), k, lambda text, image: score(image, text))
    i2t_order = rerank(ranking(similarity.t()), k, score)
    t2i = hits_at_k(t2i_order, positive, ks)
    i2t = hits_at_k(i2t_order, positive.t(), ks)
    return {**{f"i2t_itm_R@{r}": v for r, v in i2t.items()}, **{f"t2i_itm_R@{r}": v for r, v in t2i.items()}}


def itm_pair_accuracy(similarity: torch.Tensor, text_to_image: torch.Tensor, pair_score: PairScorer) -> dict:
    """Whether the ITM head tells a match from the negative that matters: for each text, does
    ``pair_score`` rank its image above the ITC-hardest other image (the one re-ranking must push down)?
    Returns ``itm_pair_accuracy``, the fraction of texts where it does (ties count half; 0.5 is chance).
    Empty with fewer than two images, where no text has a negative."""
    _check_retrieval_inputs(similarity, text_to_image, "itm_pair_accuracy")
    num_texts, num_images = similarity.shape
    if num_images < 2 or num_texts == 0:
        return {}
    texts = torch.arange(num_texts, device=text_to_image.device)
    hardest = similarity.masked_fill(_positives(text_to_image, num_images), float("-inf")).argmax(dim=1)
    scores = pair_score(torch.cat([text_to_image, hardest]), torch.cat([texts, texts])).double()
    positive, negative = scores[:num_texts], scores[num_texts:]
    wins = (positive > negative).double() + 0.5 * (positive == negative).double()
    return {"itm_pair_accuracy": wins.mean().item()}


def fusion_pair_scorer(model, images: torch.Tensor, tokens: torch.Tensor, *, device: Optional[torch.device] = None,
                       pairs_per_batch: int = 256, autocast=nullcontext) -> PairScorer:
    """A :data:`PairScorer` from a fusion model's ITM head (the match logit) on ``images [N_img, 3, H, W]`` and
    ``tokens [N_txt, L]``. Pairs run ``pairs_per_batch`` at a time; within a batch each distinct image and
    text goes through the unfused lower blocks once and the fused blocks read its K/V through ``kv_segment``
    (:meth:`vlcore.models.fusion.FusionModel.pair_itm_logits`)."""
    if not hasattr(model, "pair_itm_logits"):
        raise ValueError(f"fusion_pair_scorer: {type(model).__name__} has no ITM head (pair_itm_logits)")
    if pairs_per_batch < 1:
        raise ValueError(f"fusion_pair_scorer: pairs_per_batch must be >= 1, got {pairs_per_batch}")

    @torch.no_grad()
    def score(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        out = []
        with autocast():
            for start in range(0, image_index.shape[0], pairs_per_batch):
                image_ids, image_pair = image_index[start : start + pairs_per_batch].cpu().unique(return_inverse=True)
                text_ids, text_pair = text_index[start : start + pairs_per_batch].cpu().unique(return_inverse=True)
                chunk_images, chunk_tokens = images[image_ids], tokens[text_ids]
                if device is not None:
                    chunk_images, chunk_tokens = chunk_images.to(device), chunk_tokens.to(device)
                    image_pair, text_pair = image_pair.to(device), text_pair.to(device)
                logits = model.pair_itm_logits(model.lower_image(chunk_images), model.lower_text(chunk_tokens),
                                               chunk_tokens, image_pair, text_pair)
                out.append(logits[:, 1].float())
        return torch.cat(out) if out else torch.zeros(0)

    return score


@torch.no_grad()
def evaluate_retrieval(model, images: torch.Tensor, captions: Sequence[Sequence[str]], tokenizer, context_length: int,
                       *, device: Optional[torch.device] = None, ks: Sequence[int] = (1, 5, 10), rerank_k: int = 0,
                       batch_size: int = 256, autocast=nullcontext, add_itc: bool = False) -> dict:
    """CLIP_benchmark retrieval of ``model`` (``encode_image`` / ``encode_text``) on images and their captions,
    plus ITM re-ranked recall of the ITC top ``rerank_k`` when ``rerank_k > 0`` (fusion models only).

    ``tokenizer(list[str], context_length) -> [N, L]``. Returns ``i2t_R@k``, ``t2i_R@k``,
    ``i2t_chance_R@1`` (what random scores give: captions per image / N_txt), ``eval_images`` and, when
    re-ranking, ``i2t_itm_R@k``, ``t2i_itm_R@k``, ``itm_rerank_k`` and ``itm_pair_accuracy``
    (:func:`itm_pair_accuracy`).
    """
    if len(captions) != images.shape[0]:
        raise ValueError(f"evaluate_retrieval: {images.shape[0]} images but captions has {len(captions)} entries")
    if any(len(caps) == 0 for caps in captions):
        raise ValueError("evaluate_retrieval: every image needs at least one caption")
    texts = [c for caps in captions for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    tokens = tokenizer(texts, context_length)
    image_features = encode_in_batches(model.encode_image, images, batch_size=batch_size, device=device, autocast=autocast)
    text_features = encode_in_batches(model.encode_text, tokens, batch_size=batch_size, device=device, autocast=autocast)
    similarity = (text_features @ image_features.t()).cpu()
    metrics = retrieval_recall(similarity, text_to_image, ks)
    if rerank_k > 0:
        scorer = fusion_pair_scorer(model, images, tokens, device=device, autocast=autocast)
        metrics.update(itm_rerank_recall(similarity, text_to_image, scorer, k=rerank_k, ks=ks, add_itc=add_itc))
        metrics["itm_rerank_k"] = rerank_k
        metrics.update(itm_pair_accuracy(similarity, text_to_image, scorer))
    metrics["i2t_chance_R@1"] = len(texts) / len(captions) / len(texts)
    metrics["eval_images"] = len(captions)
    return metrics
