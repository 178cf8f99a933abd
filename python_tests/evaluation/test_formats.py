"""Karpathy / CLIP_benchmark / COCO caption files on a generated fixture: the same images and captions from
each format, retrieval numbers known by hand and equal to a transcription of CLIP_benchmark's recall, and the
JSON-lines results file."""

import json
import math

import pytest
import torch

from vlcore.evaluation.formats import caption_source, load_caption_set
from vlcore.evaluation.results import read_metrics_jsonl, write_metrics_jsonl
from vlcore.evaluation.retrieval import evaluate_retrieval
from vlcore.models.tokenizer import ByteTokenizer
from vlcore.train.data import DataSchemaError, ImageTransform

# (file, colour, split, captions). Colours are slightly impure so that no two scores tie.
IMAGES = [
    ("red.png", (250, 40, 0), "test", ["a red square", "a purple blob"]),  # the 2nd caption is closer to blue
    ("green.png", (0, 250, 30), "test", ["a green field"]),
    ("blue.png", (20, 0, 250), "test", ["the blue sky", "navy blue, at night"]),
    ("val.png", (9, 9, 9), "val", ["a grey thing"]),
    ("gone.png", None, "test", ["a red ghost"]),  # listed, but the file does not exist: skipped and counted
]
WORDS = {"purple": [0.5, 0.0, 1.0], "red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0], "grey": [1.0, 1.0, 1.0]}


@pytest.fixture
def fixture_dir(tmp_path):
    from PIL import Image

    (tmp_path / "images" / "sub").mkdir(parents=True)
    karpathy = []
    for i, (name, colour, split, captions) in enumerate(IMAGES):
        filepath = "sub" if i == 1 else ""  # Karpathy's COCO entries carry a filepath (train2014/...)
        if colour is not None:
            Image.new("RGB", (24, 16), colour).save(tmp_path / "images" / filepath / name)
        karpathy.append({"filename": name, "split": split, "imgid": i, "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
                         **({"filepath": filepath} if filepath else {})})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
    test = [(("sub/" if i == 1 else "") + name, captions) for i, (name, _, split, captions) in enumerate(IMAGES) if split == "test"]
    lines = ["image,caption"] + [f"{name},{c}" for name, captions in test for c in captions]
    (tmp_path / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    # COCO: images listed out of id order (read by increasing id), captions in annotation order
    coco = {"images": [{"id": 100 + i, "file_name": name} for i, (name, _) in enumerate(test)][::-1],
            "annotations": [{"id": 7 * j, "image_id": 100 + i, "caption": c}
                            for j, (i, c) in enumerate((i, c) for i, (_, caps) in enumerate(test) for c in caps)]}
    (tmp_path / "captions_test.json").write_text(json.dumps(coco))
    return tmp_path


class ColourModel:
    """Image embedding: the mean colour; text embedding: the colour its first colour word names."""

    tokenizer = ByteTokenizer()

    def encode_image(self, images):
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens):
        rows = []
        for row in tokens.tolist():
            words = self.tokenizer.decode(row).replace(",", " ").split()
            rows.append(next(WORDS[w] for w in words if w in WORDS))
        return torch.tensor(rows)


def clip_benchmark_recall(images, texts, text_to_image, k):
    """CLIP_benchmark's ``recall_at_k`` + ``batchify`` as its retrieval evaluation uses them."""
    scores = texts @ images.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True

    def recall(scores, positive):
        top = torch.topk(scores, k, dim=1)[1]
        onehot = torch.nn.functional.one_hot(top, num_classes=scores.shape[1]).sum(1)
        return ((onehot * positive).sum(1) / positive.sum(1) > 0).float().mean().item()

    return recall(scores.t(), positive.t()), recall(scores, positive)


def test_the_three_formats_give_the_same_set_and_known_recall(fixture_dir):
    transform = ImageTransform(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    files = {"karpathy": "dataset_coco.json", "clip_benchmark": "flickr30k_test_karpathy.txt", "coco": "captions_test.json"}
    results = {}
    for kind, name in files.items():
        images, captions, skipped = load_caption_set(kind, str(fixture_dir / name), transform,
                                                     image_root=str(fixture_dir / "images"))
        assert skipped == 1, kind
        assert captions == [["a red square", "a purple blob"], ["a green field"], ["the blue sky", "navy blue, at night"]], kind
        results[kind] = evaluate_retrieval(ColourModel(), images, captions, ColourModel.tokenizer, 32, ks=(1, 2, 3))
    assert results["karpathy"] == results["clip_benchmark"] == results["coco"]
    metrics = results["karpathy"]
    # image features ~ red [.99, .16, 0], green [0, .99, .12], blue [.08, 0, 1]. t2i: only "a purple blob"
    # misses its (red) image at rank 1: cosines blue .93 > red .49 > green .11 -> found at 2. i2t: every
    # image's best caption is its own (red .99 > purple .49; blue 1.0 > purple .93).
    assert metrics["t2i_R@1"] == pytest.approx(4 / 5) and metrics["t2i_R@2"] == 1.0
    assert metrics["i2t_R@1"] == 1.0 and metrics["eval_images"] == 3
    images, captions, _ = load_caption_set("karpathy", str(fixture_dir / "dataset_coco.json"), transform,
                                           image_root=str(fixture_dir / "images"))
    model = ColourModel()
    image_features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    text_features = torch.nn.functional.normalize(model.encode_text(ColourModel.tokenizer(sum(captions, []), 32)), dim=-1)
    for k in (1, 2, 3):
        i2t, t2i = clip_benchmark_recall(image_features, text_features, torch.tensor([0, 0, 1, 2, 2]), k)
        assert (metrics[f"i2t_R@{k}"], metrics[f"t2i_R@{k}"]) == pytest.approx((i2t, t2i))


def test_karpathy_split_and_default_root(fixture_dir):
    source = caption_source("karpathy", str(fixture_dir / "dataset_coco.json"), split="val")
    assert len(source) == 1 and source.rows[0][0] == str(fixture_dir / "val.png")  # root: the file's folder
    assert source.rows[0][1] == ["a grey thing"]


def test_bad_annotation_files(fixture_dir):
    (fixture_dir / "bad.json").write_text(json.dumps({"images": [{"file_name": "x.png"}]}))
    with pytest.raises(DataSchemaError, match="filename"):
        caption_source("karpathy", str(fixture_dir / "bad.json"))
    with pytest.raises(DataSchemaError, match="annotations"):
        caption_source("coco", str(fixture_dir / "bad.json"))
    with pytest.raises(DataSchemaError, match="split 'nope'"):
        caption_source("karpathy", str(fixture_dir / "dataset_coco.json"), split="nope")
    (fixture_dir / "bad.txt").write_text("image,caption\nno comma here\n")
    with pytest.raises(DataSchemaError, match="bad.txt:2"):
        caption_source("clip_benchmark", str(fixture_dir / "bad.txt"))
    with pytest.raises(ValueError, match="kind"):
        caption_source("tsv", str(fixture_dir / "bad.txt"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        caption_source("coco", str(fixture_dir / "missing.json"))


def test_metrics_jsonl(tmp_path):
    path = tmp_path / "out" / "eval.jsonl"
    n = write_metrics_jsonl(str(path), {"i2t_R@1": 0.25, "eval_images": 3, "note": "x", "flag": True,
                                        "cider": float("nan")}, step=120, checkpoint="run/step_120", dataset="coco")
    assert n == 3
    write_metrics_jsonl(str(path), {"i2t_R@1": 0.5}, step=240)
    rows = read_metrics_jsonl(str(path))
    assert rows[0] == {"step": 120, "metric": "i2t_R@1", "value": 0.25, "checkpoint": "run/step_120", "dataset": "coco"}
    assert rows[1]["value"] == 3 and rows[2]["metric"] == "cider" and rows[2]["value"] is None
    assert rows[3] == {"step": 240, "metric": "i2t_R@1", "value": 0.5}
    assert not any(math.isnan(r["value"]) for r in rows if r["value"] is not None)
    with pytest.raises(ValueError, match="step"):
        write_metrics_jsonl(str(path), {}, step=1.5)
