"""CIDEr-D, BLEU and the caption tokenizer against values worked out by hand from the COCO caption
evaluation's definitions and against the values its reference implementation (pycocoevalcap) gives."""

import math

import pytest

from vlcore.evaluation.caption_metrics import bleu, cider_d, ngram_counts, tokenize_caption

LOG2 = math.log(2.0)


def test_tokenize_caption_lowercases_and_drops_punctuation():
    assert tokenize_caption("A dog's toy, on the GRASS.") == "a dog 's toy on the grass"
    assert tokenize_caption("A dog's toy (new).") == "a dog 's toy -lrb- new -rrb-"
    assert tokenize_caption("  Wait... a black-and-white cat!  ") == "wait a black-and-white cat"
    assert tokenize_caption("") == ""


def test_ngram_counts():
    counts = ngram_counts("a b a b", 2)
    assert counts[("a",)] == 2 and counts[("a", "b")] == 2 and counts[("b", "a")] == 1 and sum(counts.values()) == 7


def test_cider_exact_match_two_images():
    # df: "a" in both reference sets -> idf 0; every other n-gram in one of two -> idf log 2. Unigram and
    # bigram cosines are 1, tri/4-grams do not exist (zero norm -> 0): (1 + 1 + 0 + 0) / 4 * 10 = 5.
    score, per_image = cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]])
    assert per_image == pytest.approx([5.0, 5.0], abs=1e-12)
    assert score == pytest.approx(5.0, abs=1e-12)


def test_cider_length_penalty_counts_bigrams():
    # "cat" vs "a cat": unigram cosine 1 ("a" has weight 0), no candidate bigram; 0 vs 1 bigram -> delta -1.
    score, per_image = cider_d(["cat", "a dog"], [["a cat"], ["a dog"]])
    first = 10.0 * math.exp(-1.0 / 72.0) / 4.0
    assert per_image == pytest.approx([first, 5.0], abs=1e-12)
    assert score == pytest.approx((first + 5.0) / 2.0, abs=1e-12)


def test_cider_clips_repeated_ngrams():
    # candidate "cat cat": unigram weight 2 log2, norm 2 log2; the reference's "cat" weighs log2.
    # clipped: min(2 log2, log2) * log2 / (2 log2 * log2) = 1/2 (unclipped it would be 1); "cat cat" is
    # unseen (df 0 -> idf log 2) and absent from the reference: 0. One bigram each: no penalty.
    _, per_image = cider_d(["cat cat", "a dog"], [["a cat"], ["a dog"]])
    assert per_image[0] == pytest.approx(10.0 * 0.5 / 4.0, abs=1e-12)


def test_cider_averages_over_references():
    # refs of image 0: "a cat" (cosines 1, 1) and "a dog": unigram "dog" only in the other reference and
    # "cat" != "dog" -> 0. df: "a" 2, "cat" 1, "dog" 2 (both images' sets), "a cat" 1, "a dog" 2.
    # Against "a cat": unigram cosine = 1; bigram "a cat" (log 2) cosine 1 -> 2/4 * 10 = 5; against
    # "a dog" all weights of the reference are 0 (df 2 of 2 images) -> 0. Mean over the 2 references: 2.5.
    _, per_image = cider_d(["a cat", "a dog"], [["a cat", "a dog"], ["a dog"]])
    assert per_image[0] == pytest.approx(2.5, abs=1e-12)


def test_cider_single_image_corpus_is_zero():
    # log(1) - log(df) <= 0 for every n-gram: the idf of a one-image corpus is 0, as in pycocoevalcap.
    assert cider_d(["a red circle"], [["a red circle"]])[0] == 0.0


def test_bleu_hand_computed():
    # "a cat sat" vs {"a cat sat down", "the cat"}: precisions 3/3, 2/2, 1/1, 0/0 -> the 4-gram term is
    # (1e-15) / (1e-9) as in the reference scorer; closest reference length: 4 and 2 tie at 1 -> 2 (< 3,
    # no brevity penalty).
    scores = bleu(["a cat sat"], [["a cat sat down", "the cat"]])
    assert scores[:3] == pytest.approx([1.0, 1.0, 1.0], abs=1e-9)
    assert scores[3] == pytest.approx((1e-15 / 1e-9) ** 0.25, rel=1e-6)


def test_bleu_brevity_penalty_and_clipping_over_the_corpus():
    assert bleu(["cat"], [["the cat sat"]], n=1)[0] == pytest.approx(math.exp(1 - 3), rel=1e-8)  # up to the 1e-9 guards
    # "the the the the" vs "the cat": "the" clipped to 1 of 4; "a dog" exact. Corpus p1 = 3/6, p2 = 1/4
    # ("the the" x3 unmatched + "a dog"); c = 6 > r = 2 + 2.
    scores = bleu(["the the the the", "a dog"], [["the cat"], ["a dog"]], n=2)
    assert scores == pytest.approx([0.5, math.sqrt(0.5 * 0.25)], rel=1e-9)


@pytest.mark.parametrize("metric", [cider_d, bleu])
def test_bad_input_names_the_argument(metric):
    with pytest.raises(ValueError, match="references"):
        metric(["a"], [])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        metric(["a"], ["a"])
    with pytest.raises(ValueError, match="no candidates"):
        metric([], [])


# Published values of the COCO caption scorers on known inputs.

# Yale-LILY/SummEval, evaluation/tests/test_cider.py + summ_eval/test_util.py: the coco-caption CIDEr-D scorer
# on three whitespace-split (untokenised) candidate/reference pairs gives 2.5759014911864084.
SUMMEVAL_CANDIDATES = [
    "28-year-old chef found dead in San Francisco mall",
    "A 28-year-old chef who recently moved to San Francisco was found dead in the staircase of a local shopping center.",
    "The victim's brother said he cannot imagine anyone who would want to harm him,\"Finally, it went uphill again at him.\"",
]
SUMMEVAL_REFERENCES = [
    "28-Year-Old Chef Found Dead at San Francisco Mall",
    "A 28-year-old chef who had recently moved to San Francisco was found dead in the stairwell of a local mall this week.",
    "But the victim's brother says he can't think of anyone who would want to hurt him, saying, \"Things were finally going well for him.\"",
]


def test_cider_published_summeval_value():
    score, _ = cider_d(SUMMEVAL_CANDIDATES, [[r] for r in SUMMEVAL_REFERENCES])
    assert score == pytest.approx(2.5759014911864084, abs=1e-12)


def test_published_perfect_and_wrong_captions():
    # irisml-tasks-training's test of its pycocoevalcap wrapper: identical captions give BLEU 1 and CIDEr 10
    # (every n-gram order's cosine is 1 and idf > 0 in a two-image corpus); disjoint words give 0.
    references = [["Hello World good Bye"], ["This is perfect test", "This is perfect test"]]
    for candidates, want_bleu, want_cider in ((["Hello World Good bye", "This is perfect test"], 1.0, 10.0),
                                              (["How are you today", "Only wrong words here"], 0.0, 0.0)):
        cands = [tokenize_caption(c) for c in candidates]
        refs = [[tokenize_caption(r) for r in rs] for rs in references]
        assert bleu(cands, refs) == pytest.approx([want_bleu] * 4, abs=1e-7)
        assert cider_d(cands, refs)[0] == pytest.approx(want_cider, abs=1e-12)


# pycocoevalcap 1.2 (the COCO caption evaluation: Stanford PTBTokenizer in Java, Bleu(4), Cider), run on the
# captions below; its outputs are recorded here so that the comparison runs without Java or the package.
PTB_CASES = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "A woman (in a red dress) holding an umbrella": "a woman -lrb- in a red dress -rrb- holding an umbrella",
    "There's a cat that can't sit still; it's on the sofa.": "there 's a cat that ca n't sit still it 's on the sofa",
    "A black-and-white photo of a train -- at 5:30 p.m.": "a black-and-white photo of a train at 5:30 p.m.",
    "Kids' toys on the floor, next to a \"big\" box.": "kids toys on the floor next to a big box",
    "An elephant's trunk... eating hay?": "an elephant 's trunk eating hay",
    "Don't walk: a sign on the street": "do n't walk a sign on the street",
    "A 'vintage' car parked {outside}": "a vintage car parked -lcb- outside -rcb-",
    "People at the U.S. embassy in 2010.": "people at the u.s. embassy in 2010",
    "The bus is red & white.": "the bus is red & white",
    "We're sure they'll come, I'm told; you'd see.": "we 're sure they 'll come i 'm told you 'd see",
    "A [small] dog's bowl, isn't it?": "a -lsb- small -rsb- dog 's bowl is n't it",
}
COCO_STYLE_REFERENCES = [
    ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
     "Man on a surfboard riding an ocean wave!"],
    ["Two dogs playing with a frisbee in the park.", "A pair of dogs chase a frisbee on the grass."],
    ["A woman (in a red dress) holding an umbrella.", "A lady with an umbrella in the rain.",
     "Woman in red holds an umbrella; it's raining."],
    ["There's a cat that can't sit still on the sofa.", "A cat lying on a couch.", "A grey cat on the sofa."],
    ["A black-and-white photo of a train at 5:30 p.m.", "An old train at the station."],
    ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a white plate.", "A healthy meal on a plate."],
]
COCO_STYLE_CANDIDATES = ["a man riding a wave on a surfboard", "two dogs playing frisbee in a park",
                         "a woman holding an umbrella in the rain", "a cat sitting on a couch", "a train at the station",
                         "a plate of rice and broccoli"]
PYCOCOEVALCAP_BLEU = [0.9045498991251116, 0.7855263676102094, 0.6743637631940371, 0.5277883381873475]
PYCOCOEVALCAP_CIDER = [3.4262178352501453, 2.3359430745374627, 2.9587934466221437, 1.668605904429584,
                       4.1466316580883325, 2.179965114969459]  # mean 2.7860261723161877


@pytest.mark.parametrize("raw", list(PTB_CASES))
def test_tokenizer_matches_the_coco_ptb_tokenizer(raw):
    assert tokenize_caption(raw) == PTB_CASES[raw]


def test_scores_match_pycocoevalcap_on_coco_style_captions():
    candidates = [tokenize_caption(c) for c in COCO_STYLE_CANDIDATES]
    references = [[tokenize_caption(r) for r in refs] for refs in COCO_STYLE_REFERENCES]
    assert bleu(candidates, references) == pytest.approx(PYCOCOEVALCAP_BLEU, abs=1e-12)
    score, per_image = cider_d(candidates, references)
    assert per_image == pytest.approx(PYCOCOEVALCAP_CIDER, abs=1e-12)
    assert score == pytest.approx(2.7860261723161877, abs=1e-12)


def test_live_against_pycocoevalcap_when_installed():
    """Random corpora through the reference scorers themselves (skipped without pycocoevalcap and Java)."""
    import random
    import shutil

    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    vocab = "a the red dog cat on sits big small runs park".split()
    for _ in range(50):
        n = rng.randint(2, 6)
        refs = [[" ".join(rng.choices(vocab, k=rng.randint(1, 9))) for _ in range(rng.randint(1, 4))] for _ in range(n)]
        cands = [" ".join(rng.choices(vocab, k=rng.randint(1, 9))) for _ in range(n)]
        gts, res = dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)}
        assert bleu(cands, refs) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0], abs=1e-12)
        assert cider_d(cands, refs)[0] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenized = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(PTB_CASES)})
        assert [tokenize_caption(c) for c in PTB_CASES] == [tokenized[i][0] for i in range(len(PTB_CASES))]
