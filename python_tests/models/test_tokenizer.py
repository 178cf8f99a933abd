"""Tokenizers: the offline byte tokenizer, and CLIP's BPE on a small vocabulary file in the
``bpe_simple_vocab_16e6.txt.gz`` format (plus the real file when ``VLCORE_CLIP_BPE_VOCAB`` points at it)."""

import gzip
import os

import pytest
import torch

from vlcore.models.tokenizer import ByteTokenizer, ClipBpeTokenizer, get_tokenizer


def test_byte_tokenizer_round_trip_padding_and_truncation():
    tok = get_tokenizer("byte")
    out = tok(["héllo", ""], 8)
    assert out.dtype == torch.long and out.shape == (2, 8)
    assert out[0].tolist() == [tok.sot_id, *[b + 1 for b in "héllo".encode()], tok.eot_id]  # 6 bytes: é is 2
    assert out[1].tolist() == [tok.sot_id, tok.eot_id] + [0] * 6
    assert tok.decode(out[0].tolist()) == "héllo"
    cut = tok(["a long caption"], 5)[0]
    assert cut[-1] == tok.eot_id and cut.argmax() == 4  # truncated, end-of-text kept last (argmax pooling)
    assert max(ByteTokenizer.special_ids) == tok.eot_id == tok.vocab_size - 1


def test_model_names_resolve_to_their_tokenizer():
    assert isinstance(get_tokenizer("clip-tiny"), ByteTokenizer)
    with pytest.raises(ValueError, match="uses CLIP's BPE; pass the path of its bpe_simple_vocab_16e6.txt.gz"):
        get_tokenizer("ViT-B-32")


@pytest.fixture
def small_vocab(tmp_path):
    path = tmp_path / "vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(["h e", "l l", "l o</w>", "he ll", "hell o</w>"]) + "\n")
    return str(path)


def test_bpe_merges_by_rank(small_vocab):
    tok = ClipBpeTokenizer(small_vocab)
    assert tok.vocab_size == 512 + 5 + 2
    hello = 512 + 4  # "hello</w>": h e -> he, l l -> ll, he ll -> hell, hell o</w> -> hello</w>
    bang_end = 256  # "!" is the first printable byte; +256 is its end-of-word form
    assert tok.encode("Hello hello!") == [hello, hello, bang_end]
    assert tok.encode("hel") == [512, ord("l") - 33 + 256]  # he + "l</w>": no merge (l, l</w>)
    assert tok.encode("&amp;") == [ord("&") - 33 + 256]  # html unescaped
    assert tok(["hello"], 4).tolist() == [[tok.sot_id, hello, tok.eot_id, 0]]
    assert tok.decode(tok.encode("hello  hel!")) == "hello hel !"


@pytest.mark.skipif(not os.environ.get("VLCORE_CLIP_BPE_VOCAB"), reason="set VLCORE_CLIP_BPE_VOCAB to the real vocab")
def test_real_clip_vocab_known_ids():
    tok = get_tokenizer(os.environ["VLCORE_CLIP_BPE_VOCAB"])
    assert tok.vocab_size == 49408
    # open_clip.tokenize("a photo of a cat")
    assert tok(["a photo of a cat"], 8).tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407, 0]]
