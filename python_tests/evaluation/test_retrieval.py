"""Retrieval recall (CLIP_benchmark) and ITM re-ranking: hand-worked rankings, the project's other recall
implementation, and a fusion model's shared-K/V pair scores against copied pairs."""

import pytest
import torch

import vlcore.ops
from vlcore.evaluation.retrieval import (evaluate_retrieval, fusion_pair_scorer, hits_at_k, itm_pair_accuracy,
                                         itm_rerank_recall, rerank, retrieval_recall)
from vlcore.models import create_model
from vlcore.models.clip import retrieval_recall as clip_retrieval_recall
from vlcore.models.tokenizer import ByteTokenizer

# Text i belongs to image i. t2i ranks: text 0 -> images [1, 2, 0] (positive 3rd), text 1 -> [1, 2, 0] (1st),
# text 2 -> [0, 2, 1] (2nd). i2t: image 0 -> texts [2, 1, 0] (3rd), image 1 -> [0, 1, 2] (2nd), image 2 -> [2, 0, 1] (1st).
SIMILARITY = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.8, 0.3], [0.7, 0.1, 0.6]])
TEXT_TO_IMAGE = torch.tensor([0, 1, 2])


def oracle(image_index, text_index):
    return (image_index == TEXT_TO_IMAGE[text_index]).float()


def test_recall_hand_worked():
    metrics = retrieval_recall(SIMILARITY, TEXT_TO_IMAGE, ks=(1, 2, 3))
    assert metrics == pytest.approx({"t2i_R@1": 1 / 3, "t2i_R@2": 2 / 3, "t2i_R@3": 1.0,
                                     "i2t_R@1": 1 / 3, "i2t_R@2": 2 / 3, "i2t_R@3": 1.0})


def test_rerank_with_an_oracle_and_an_adversary():
    # An oracle lifts every positive inside the top 2 to rank 1; text 0 / image 0 have theirs 3rd: still missed.
    metrics = itm_rerank_recall(SIMILARITY, TEXT_TO_IMAGE, oracle, k=2, ks=(1, 2, 3))
    assert metrics == pytest.approx({"t2i_itm_R@1": 2 / 3, "t2i_itm_R@2": 2 / 3, "t2i_itm_R@3": 1.0,
                                     "i2t_itm_R@1": 2 / 3, "i2t_itm_R@2": 2 / 3, "i2t_itm_R@3": 1.0})
    # An adversary pushes each positive in the top 2 down to rank 2: R@1 = 0, R@2 unchanged.
    worst = itm_rerank_recall(SIMILARITY, TEXT_TO_IMAGE, lambda i, t: -oracle(i, t), k=2, ks=(1, 2))
    assert worst == pytest.approx({"t2i_itm_R@1": 0.0, "t2i_itm_R@2": 2 / 3, "i2t_itm_R@1": 0.0, "i2t_itm_R@2": 2 / 3})
    # k = 3: every positive reachable.
    assert itm_rerank_recall(SIMILARITY, TEXT_TO_IMAGE, oracle, k=3, ks=(1,))["t2i_itm_R@1"] == 1.0


def test_rerank_add_itc_is_blips_sum():
    # ITM score 0.35 for (image 2, text 1) vs 0 elsewhere: alone it moves image 2 ahead of image 1 for text 1;
    # with ITC added (0.3 + 0.35 = 0.65 < 0.8) image 1 stays first.
    def bump(image_index, text_index):
        return ((image_index == 2) & (text_index == 1)).float() * 0.35
    assert itm_rerank_recall(SIMILARITY, TEXT_TO_IMAGE, bump, k=2, ks=(1,))["t2i_itm_R@1"] == pytest.approx(0.0)
    assert itm_rerank_recall(SIMILARITY, TEXT_TO_IMAGE, bump, k=2, ks=(1,), add_itc=True)["t2i_itm_R@1"] == pytest.approx(1 / 3)


def test_itm_pair_accuracy_hand_worked():
    # The ITC-hardest other image of each text (SIMILARITY rows, own image excluded): text 0 -> image 1 (0.9),
    # text 1 -> image 2 (0.3), text 2 -> image 0 (0.7).
    assert itm_pair_accuracy(SIMILARITY, TEXT_TO_IMAGE, oracle) == {"itm_pair_accuracy": 1.0}
    assert itm_pair_accuracy(SIMILARITY, TEXT_TO_IMAGE, lambda i, t: -oracle(i, t)) == {"itm_pair_accuracy": 0.0}
    assert itm_pair_accuracy(SIMILARITY, TEXT_TO_IMAGE, lambda i, t: torch.zeros(len(i))) == {"itm_pair_accuracy": 0.5}
    # A head that likes image 2 above all: right for text 2 (own image), wrong for text 1 (its hardest is 2),
    # a tie for text 0 (own image 0 and hardest image 1 both score 0): (1 + 0 + 0.5) / 3.
    prefer_2 = lambda i, t: (i == 2).float()  # noqa: E731
    assert itm_pair_accuracy(SIMILARITY, TEXT_TO_IMAGE, prefer_2)["itm_pair_accuracy"] == pytest.approx(0.5)
    # The pairs scored: each text with its own image, then each text with its ITC-hardest other image.
    seen = []

    def spy(image_index, text_index):
        seen.append((image_index.tolist(), text_index.tolist()))
        return oracle(image_index, text_index)
    itm_pair_accuracy(SIMILARITY, TEXT_TO_IMAGE, spy)
    assert seen == [([0, 1, 2, 1, 2, 0], [0, 1, 2, 0, 1, 2])]
    assert itm_pair_accuracy(SIMILARITY[:, :1], torch.zeros(3, dtype=torch.long), oracle) == {}  # no negative


def test_rerank_leaves_the_tail_alone():
    order = torch.tensor([[3, 1, 0, 2]])
    assert rerank(order, 2, lambda q, c: c.float()).tolist() == [[3, 1, 0, 2]]
    assert rerank(order, 3, lambda q, c: c.float()).tolist() == [[3, 1, 0, 2]]
    assert rerank(order, 3, lambda q, c: -c.float()).tolist() == [[0, 1, 3, 2]]
    assert hits_at_k(order, torch.tensor([[False, False, True, False]]), (1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 0.0}


def test_recall_matches_the_models_recall_with_several_captions_per_image():
    torch.manual_seed(0)
    images, texts = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1), torch.nn.functional.normalize(torch.randn(13, 8), dim=-1)
    text_to_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6, 1])
    ours = retrieval_recall(texts @ images.t(), text_to_image, ks=(1, 2, 5))
    theirs = clip_retrieval_recall(images, texts, text_to_image, ks=(1, 2, 5))
    for k in (1, 2, 5):
        assert ours[f"i2t_R@{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"])
        assert ours[f"t2i_R@{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="similarity"):
        retrieval_recall(SIMILARITY, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(SIMILARITY, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="k must be"):
        itm_rerank_recall(SIMILARITY, TEXT_TO_IMAGE, oracle, k=0)
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(SIMILARITY, TEXT_TO_IMAGE, ks=(0, 1))
    with pytest.raises(ValueError, match="ITM head"):
        fusion_pair_scorer(create_model("clip-tiny"), torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, dtype=torch.long))


def _fusion(name, impl):
    torch.manual_seed(0)
    model = create_model(name, impl=impl).eval()
    with torch.no_grad():  # open the gates, so that fusion matters
        for n, p in model.named_parameters():
            if n.endswith("cross.alpha"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", ["fiber-tiny", "bridgetower-tiny"])
def test_fusion_pair_scores_share_kv_and_equal_copied_pairs(name, monkeypatch):
    model = _fusion(name, "vlcore")
    images = torch.randn(3, 3, model.image_size, model.image_size)
    tokens = ByteTokenizer()(["a red circle", "two blue squares left of a cross", "x"], model.context_length)
    image_index = torch.tensor([0, 0, 0, 1, 2, 2, 1])
    text_index = torch.tensor([0, 1, 2, 1, 0, 2, 0])
    segments = []
    real = vlcore.ops.attention

    def spy(*args, **kwargs):
        segments.append(kwargs.get("kv_segment"))
        return real(*args, **kwargs)

    monkeypatch.setattr(vlcore.ops, "attention", spy)  # the backend calls the op through the module
    shared = fusion_pair_scorer(model, images, tokens, pairs_per_batch=4)(image_index, text_index)
    monkeypatch.setattr(vlcore.ops, "attention", real)
    assert any(s is not None for s in segments)  # the fused layer read K/V through kv_segment
    with torch.no_grad():  # reference: each pair's image and text copied, no indexing
        lengths = model.text.key_lengths(tokens[text_index])
        fused = model.upper(model.lower_image(images[image_index]), model.lower_text(tokens[text_index]), lengths, fuse=True)
        copied = model.itm_logits(*fused, tokens[text_index])[:, 1]
    torch.testing.assert_close(shared, copied, atol=1e-5, rtol=1e-5)


def test_evaluate_retrieval_rerank_all_equals_the_full_itm_ranking():
    model = _fusion("fiber-tiny", "vlcore")
    tok = ByteTokenizer()
    images = torch.randn(4, 3, model.image_size, model.image_size)
    captions = [["a red circle", "a circle"], ["a blue square"], ["a cross", "green"], ["a triangle"]]
    metrics = evaluate_retrieval(model, images, captions, tok, model.context_length, ks=(1, 2), rerank_k=4)
    texts = [c for caps in captions for c in caps]
    text_to_image = torch.tensor([0, 0, 1, 2, 2, 3])
    with torch.no_grad():  # full ITM matrix on copied pairs: re-ranking all 4 images / 6 texts must equal it
        image_index = torch.arange(4).repeat(6)
        text_index = torch.arange(6).repeat_interleave(4)
        tokens = tok(texts, model.context_length)[text_index]
        fused = model.upper(model.lower_image(images[image_index]), model.lower_text(tokens),
                            model.text.key_lengths(tokens), fuse=True)
        itm = model.itm_logits(*fused, tokens)[:, 1].reshape(6, 4)
    positive = torch.zeros(6, 4, dtype=torch.bool)
    positive[torch.arange(6), text_to_image] = True
    t2i_best = positive[torch.arange(6), itm.argmax(1)].float().mean().item()
    i2t_best = positive.t()[torch.arange(4), itm.t().argmax(1)].float().mean().item()
    assert metrics["t2i_itm_R@1"] == pytest.approx(t2i_best)
    assert metrics["i2t_itm_R@1"] == pytest.approx(i2t_best)
    with torch.no_grad():
        similarity = (torch.nn.functional.normalize(model.encode_text(tok(texts, model.context_length)), dim=-1)
                      @ torch.nn.functional.normalize(model.encode_image(images), dim=-1).t())
    itc = retrieval_recall(similarity, text_to_image, (1, 2))
    for key, value in itc.items():
        assert metrics[key] == pytest.approx(value)
    assert metrics["itm_rerank_k"] == 4 and metrics["eval_images"] == 4
    # Pair accuracy from the same full ITM matrix: own image vs the most ITC-similar other image, per text.
    hardest = similarity.masked_fill(positive, float("-inf")).argmax(1)
    wins = [float(itm[t, text_to_image[t]] > itm[t, hardest[t]]) for t in range(6)]
    assert metrics["itm_pair_accuracy"] == pytest.approx(sum(wins) / 6, abs=1e-6)
