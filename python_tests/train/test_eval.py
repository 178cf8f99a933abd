"""Retrieval metrics follow CLIP_benchmark's protocol (docs/evaluation.md, 'Retrieval recall'), checked on a hand-computed example."""

import pytest
import torch

from vlcore.train.metrics import retrieval_metrics


class FeatureModel(torch.nn.Module):
    """encode_image returns the image tensor flattened; encode_text looks the caption up in a table."""

    def __init__(self, text_table: dict):
        super().__init__()
        self.text_table = text_table

    def encode_image(self, images):
        return images.flatten(1)

    def encode_text(self, tokens):
        # ByteTokenizer: the second token is the caption's first byte + 1; captions here are one letter
        return torch.stack([self.text_table[chr(int(t[1]) - 1)] for t in tokens])


def test_hand_computed_recall():
    # 3 images on the axes of R^3 (as [N, 3, 1, 1] "images"); image 0 has two captions, a and b.
    images = torch.eye(3).reshape(3, 3, 1, 1)
    captions = [["a", "b"], ["c"], ["d"]]
    table = {
        "a": torch.tensor([0.1, 1.0, 0.0]),  # normalised [0.0995, 0.995, 0]: closest to image 1 (wrong)
        "b": torch.tensor([0.9, 0.1, 0.0]),  # [0.994, 0.110, 0]: image 0 (right)
        "c": torch.tensor([0.0, 0.2, 1.0]),  # [0, 0.196, 0.981]: image 2 (wrong; its image is 1)
        "d": torch.tensor([0.775, 0.0, 0.8]),  # [0.696, 0, 0.718]: image 2 (right)
    }
    m = retrieval_metrics(FeatureModel(table), images, captions, "byte", 4, torch.device("cpu"), ks=(1, 2))
    # text->image, one row per caption: a miss, b hit, c miss, d hit at k=1; every caption's image is in
    # its top 2 (a: {1, 0}, b: {0, 1}, c: {2, 1}, d: {2, 0}).
    assert m["t2i_R@1"] == pytest.approx(2 / 4)
    assert m["t2i_R@2"] == pytest.approx(1.0)
    # image->text, one row per image over all 4 captions (a, b, c, d):
    #   image 0: [0.0995, 0.994, 0, 0.696] -> b, its own: hit (any of its captions counts, a is not needed)
    #   image 1: [0.995, 0.110, 0.196, 0] -> a (image 0's): miss; top 2 = {a, c}: hit at 2
    #   image 2: [0, 0, 0.981, 0.718] -> c (image 1's): miss; top 2 = {c, d}: hit at 2
    assert m["i2t_R@1"] == pytest.approx(1 / 3)
    assert m["i2t_R@2"] == pytest.approx(1.0)
    assert m["i2t_chance_R@1"] == pytest.approx(1 / 3)
    # A per-caption recall (open_clip's paired protocol) would differ: CLIP_benchmark's is a hit rate.
