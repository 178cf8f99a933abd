"""Tokenizers, both ``callable(list[str], context_length) -> LongTensor [N, context_length]`` (zero padded,
truncated so that the end-of-text token survives):

- :class:`ByteTokenizer`, the offline default: UTF-8 bytes plus a few special tokens, 261 ids, no file;
- :class:`ClipBpeTokenizer`, CLIP's byte-level BPE (open_clip's ``SimpleTokenizer``), from the user's
  ``bpe_simple_vocab_16e6.txt.gz`` (the open_clip wheel ships one).
"""

from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from typing import Sequence

import torch

__all__ = ["ByteTokenizer", "ClipBpeTokenizer", "get_tokenizer"]

DEFAULT_CONTEXT_LENGTH = 77


def _to_tensor(rows: list[list[int]], context_length: int, eot_id: int) -> torch.Tensor:
    out = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, ids in enumerate(rows):
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot_id
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class ByteTokenizer:
    """``<start_of_text> bytes... <end_of_text>``; id 0 is padding, bytes are ``1..256``, then ``<mask>``
    (MLM), ``<image>`` (captioner placeholders), ``<start_of_text>``, ``<end_of_text>`` (the highest id, so
    CLIP's argmax pooling finds it)."""

    pad_id = 0
    mask_id = 257
    image_id = 258
    sot_id = 259
    eot_id = 260
    vocab_size = 261
    special_ids = (pad_id, mask_id, image_id, sot_id, eot_id)

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 1 for i in ids if 1 <= i <= 256).decode("utf-8", errors="replace")

    def __call__(self, texts: str | list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        return _to_tensor([[self.sot_id, *self.encode(t), self.eot_id] for t in texts], context_length, self.eot_id)


@lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (whitespace/control bytes moved above 255)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _word_pattern():
    # CLIP's pattern uses \p{L} / \p{N} (the `regex` package); stdlib `re` spells letters as [^\W\d_] and
    # numbers as \d, which agree on everything but rare numeric symbols (e.g. Roman numerals).
    try:
        import regex
        return regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                             regex.IGNORECASE)
    except ImportError:
        return re.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""",
                          re.IGNORECASE)


def _clean(text: str) -> str:
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipBpeTokenizer:
    """CLIP's BPE over a ``bpe_simple_vocab_16e6.txt.gz``-format file: a header line, then merges
    ``"a b"`` one per line; CLIP uses the first ``49152 - 256 - 2`` merges, giving 49408 ids (256 bytes, 256
    bytes + ``</w>``, the merges, ``<start_of_text>``, ``<end_of_text>``)."""

    def __init__(self, vocab_path: str, num_merges: int = 49152 - 256 - 2):
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : num_merges + 1] if line.strip()]
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<start_of_text>": "<start_of_text>", "<end_of_text>": "<end_of_text>"}
        self.pattern = _word_pattern()
        self.sot_id = self.encoder["<start_of_text>"]
        self.eot_id = self.encoder["<end_of_text>"]
        self.pad_id = 0
        self.vocab_size = len(vocab)

    def bpe(self, token: str) -> str:
        """Merge the characters of one word (last one marked ``</w>``) by merge rank, lowest first."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(_clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[i] for i in ids if i not in (self.sot_id, self.eot_id, self.pad_id))
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        return _to_tensor([[self.sot_id, *self.encode(t), self.eot_id] for t in texts], context_length, self.eot_id)


def get_tokenizer(name_or_path: str = "byte"):
    """``"byte"`` (offline default), a ``*.txt.gz`` BPE vocabulary path, or a model name whose config names
    one of those (models with the CLIP BPE need the vocab path: nothing is downloaded)."""
    if name_or_path == "byte":
        return ByteTokenizer()
    if name_or_path.endswith(".gz"):
        return ClipBpeTokenizer(name_or_path)
    from vlcore.models.factory import get_model_config

    tokenizer = get_model_config(name_or_path).text_cfg.tokenizer
    if tokenizer == "clip_bpe":
        raise ValueError(f"get_tokenizer: model {name_or_path!r} uses CLIP's BPE; pass the path of its "
                         "bpe_simple_vocab_16e6.txt.gz (shipped in the open_clip wheel) instead of the model name")
    return get_tokenizer(tokenizer)
