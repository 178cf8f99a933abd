"""Caption metrics of the COCO caption evaluation (``pycocoevalcap``): CIDEr-D and corpus BLEU-1..4.

Both follow the reference scorers' arithmetic exactly (docs/evaluation.md, 'Caption metrics'), so scores
are comparable with published COCO numbers when the captions are tokenised alike. ``pycocoevalcap`` itself
is not a dependency: its tokenizer runs the Stanford PTB tokenizer in Java. :func:`tokenize_caption` is a
pure-Python stand-in for that step (tested token for token against it on COCO-style captions); on plain
ASCII captions such as the embedded data's the two agree.

Inputs are parallel lists: ``candidates[i]`` (one generated caption) against ``references[i]`` (one or
more reference captions of the same image).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

__all__ = ["tokenize_caption", "ngram_counts", "cider_d", "bleu"]

# The tokens the COCO evaluation removes after PTB tokenisation (lowercased; a straight double quote is what
# PTB turns into `` / '' first). Its list spells brackets in upper case, so -lrb- / -rrb- survive, as here.
_PUNCTUATION = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
# PTB's splits on lowercased text: "can't" -> "ca n't", clitics ('s 're 've 'm 'll 'd) apart, dotted
# abbreviations ("u.s.", "p.m.") and hyphen / colon compounds ("black-and-white", "5:30") whole, a
# sentence-final period apart, every other symbol alone.
_TOKEN = re.compile(r"""[a-z0-9]+(?=n't(?![a-z]))|n't(?![a-z])|'(?:s|re|ve|m|ll|d)(?![a-z])
                        |[a-z0-9]+(?:\.[a-z0-9]+)+\.?|[a-z0-9]+(?:[-:][a-z0-9]+)*|\.\.\.|--|\S""", re.X)


def tokenize_caption(text: str) -> str:
    """Lowercased PTB-style tokens joined by single spaces, punctuation dropped: ``"A dog's toy (new)."`` ->
    ``"a dog 's toy -lrb- new -rrb-"``."""
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text.lower()))
    return " ".join(t for t in tokens if t not in _PUNCTUATION)


def ngram_counts(text: str, n: int = 4) -> Counter:
    """Counts of every 1..n-gram (tuples of words) of a whitespace-tokenised caption."""
    words = text.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check_pairs(candidates: Sequence[str], references: Sequence[Sequence[str]], where: str) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{where}: {len(candidates)} candidates but references has {len(references)} lists")
    if not candidates:
        raise ValueError(f"{where}: no candidates")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"{where}: references[{i}] must be a non-empty list of captions")


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised captions: ``(corpus mean, per-image scores)``.

    Per image, each caption becomes one tf-idf vector per n-gram order (idf = ``log(N_images) -
    log(max(1, df))``, df counted over the images' reference sets); the score is the mean over orders of
    the candidate's clipped cosine similarity to each reference (``sum min(c, r) * r / |c||r|``) times a
    Gaussian penalty ``exp(-delta^2 / (2 sigma^2))`` on the length difference, averaged over references
    and multiplied by 10. As in ``pycocoevalcap``, the length is the number of bigrams (words - 1).
    """
    _check_pairs(candidates, references, "cider_d")
    cand_counts = [ngram_counts(c, n) for c in candidates]
    ref_counts = [[ngram_counts(r, n) for r in refs] for refs in references]
    document_frequency = Counter()
    for refs in ref_counts:
        document_frequency.update({gram for counts in refs for gram in counts})
    log_images = math.log(float(len(candidates)))

    def tfidf(counts: Counter):
        vector = [dict() for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            weight = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
            vector[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight * weight
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vector, [math.sqrt(x) for x in norm], bigrams

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        c_vec, c_norm, c_len = tfidf(cand)
        total = 0.0
        for ref in refs:
            r_vec, r_norm, r_len = tfidf(ref)
            penalty = math.exp(-((c_len - r_len) ** 2) / (2.0 * sigma * sigma))
            for order in range(n):
                dot = sum(min(w, r_vec[order].get(g, 0.0)) * r_vec[order].get(g, 0.0) for g, w in c_vec[order].items())
                if c_norm[order] != 0 and r_norm[order] != 0:
                    dot /= c_norm[order] * r_norm[order]
                total += dot * penalty / n
        scores.append(10.0 * total / len(refs))
    return sum(scores) / len(scores), scores


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised captions (``pycocoevalcap``'s ``Bleu``, in [0, 1]).

    Clipped n-gram matches (each n-gram counted at most as often as in the reference that has it most) and
    candidate n-gram totals are summed over the corpus; BLEU-k is the geometric mean of the first k
    precisions times the brevity penalty ``exp(1 - r / c)`` when the total candidate length c is below r, the
    sum over images of the reference length closest to each candidate's (the shorter one on a tie). As in
    the reference scorer, ``1e-15`` / ``1e-9`` keep an order without any match at a tiny, non-zero value.
    """
    _check_pairs(candidates, references, "bleu")
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    cand_total, ref_total = 0, 0
    for cand, refs in zip(candidates, references):
        cand_len = len(cand.split())
        ref_lens = [len(r.split()) for r in refs]
        ref_total += min(ref_lens, key=lambda length: (abs(length - cand_len), length))
        cand_total += cand_len
        max_ref = Counter()
        for r in refs:
            max_ref |= ngram_counts(r, n)  # | keeps the maximum count per n-gram
        for gram, count in ngram_counts(cand, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, cand_len - k)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (cand_total + tiny) / (ref_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1.0 / ratio) for s in scores]
    return scores
