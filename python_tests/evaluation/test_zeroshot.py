"""Zero-shot classification: prompt ensembling, accuracies against hand-worked values, the shapes classes,
folder-per-class reading."""

import numpy as np
import pytest
import torch

from vlcore.evaluation.zeroshot import (SHAPES_TEMPLATES, classification_metrics, evaluate_shapes_zero_shot,
                                        evaluate_zero_shot, format_prompt, image_folder_set, shapes_classes,
                                        shapes_classification_set, zero_shot_classifier)
from vlcore.models import create_model
from vlcore.models.tokenizer import ByteTokenizer
from vlcore.train import synthetic
from vlcore.train.data import ImageTransform


class LookupText:
    """A tokenizer + text encoder whose prompt embeddings are given by hand."""

    def __init__(self, table: dict):
        self.prompts = list(table)
        self.table = torch.tensor([table[p] for p in self.prompts], dtype=torch.float32)

    def tokenizer(self, texts, context_length):
        return torch.tensor([[self.prompts.index(t)] for t in texts])

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]


def test_classifier_normalises_each_prompt_before_averaging():
    text = LookupText({"a {A}": [1.0, 0.0], "the A": [0.0, 2.0], "a {B}": [3.0, 4.0], "the B": [3.0, 4.0]})
    templates = ["a {{{}}}", "the {c}"]
    classifier = zero_shot_classifier(text.encode_text, text.tokenizer, ["A", "B"], templates, 1)
    # A: [1, 0] and [0, 1] after normalising -> mean [.5, .5] -> [1, 1]/sqrt 2 (unnormalised: [1, 2]/sqrt 5).
    torch.testing.assert_close(classifier, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.6, 0.8]]))
    assert format_prompt(lambda c: c.upper(), "x") == "X"


def test_classification_metrics_hand_worked():
    logits = torch.tensor([[0.9, 0.1, 0.0],    # label 0: top-1
                           [0.5, 0.4, 0.1],    # label 1: 2nd
                           [0.2, 0.3, 0.1],    # label 2: 3rd
                           [0.1, 0.2, 0.3]])   # label 2: top-1
    labels = torch.tensor([0, 1, 2, 2])
    metrics = classification_metrics(logits, labels, ks=(1, 2, 5))
    assert metrics["top1_accuracy"] == pytest.approx(0.5)
    assert metrics["top2_accuracy"] == pytest.approx(0.75)
    assert metrics["top5_accuracy"] == pytest.approx(1.0)  # capped at 3 classes
    assert metrics["mean_per_class_recall"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(logits, labels[:3])


def test_evaluate_zero_shot_with_class_groups():
    text = LookupText({"A": [1.0, 0.0, 0.0], "B": [0.0, 1.0, 0.0], "C": [0.0, 0.0, 1.0]})

    class Model:
        encode_text = staticmethod(text.encode_text)

        @staticmethod
        def encode_image(images):
            return images  # the "images" are their own features

    images = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.9, 0.0, 0.5], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2])  # image 2 (label C) looks like A
    metrics = evaluate_zero_shot(Model(), images, labels, ["A", "B", "C"], ["{}"], text.tokenizer, 1,
                                 class_groups={"held_out": [2], "seen": [0, 1]})
    assert metrics["top1_accuracy"] == pytest.approx(0.75)
    assert metrics["top1_accuracy_held_out"] == pytest.approx(0.5)
    assert metrics["top1_accuracy_seen"] == pytest.approx(1.0)
    assert metrics["mean_per_class_recall"] == pytest.approx(2.5 / 3)
    assert metrics["zeroshot_classes"] == 3


def test_shapes_classes_and_templates():
    classnames, held_out, seen = shapes_classes()
    assert len(classnames) == 24 and sorted(held_out + seen) == list(range(24))
    assert {tuple(classnames[i].split()) for i in held_out} == set(synthetic.HELD_OUT)
    assert len(SHAPES_TEMPLATES) == 10
    assert format_prompt(SHAPES_TEMPLATES[0], "red circle") == "a small red circle at the top left"
    assert "a large red circle in the centre" in [format_prompt(t, "red circle") for t in SHAPES_TEMPLATES]


def test_shapes_classification_images_show_their_class():
    images, labels = shapes_classification_set(seed=0, size=48, image_size=32)
    classnames, _, _ = shapes_classes()
    assert images.shape == (48, 32, 32, 3) and labels.tolist() == [i % 24 for i in range(48)]
    again, _ = shapes_classification_set(seed=0, size=2, image_size=32)
    np.testing.assert_array_equal(again, images[:2])
    for image, label in zip(images.astype(np.float32), labels.tolist()):
        colour = np.asarray(synthetic.COLOURS[classnames[label].split()[0]], dtype=np.float32)
        far = np.linalg.norm(image - np.asarray(synthetic.BACKGROUND), axis=-1) > 80  # object pixels
        assert far.sum() > 10
        assert np.abs(np.median(image[far], axis=0) - colour).max() < 30


def test_image_folder_set(tmp_path):
    from PIL import Image

    for folder, colour in (("red_thing", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 12), colour).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "blue" / "notes.txt").write_text("not an image")
    images, labels, classnames = image_folder_set(str(tmp_path), ImageTransform(8, (0, 0, 0), (1, 1, 1)))
    assert classnames == ["blue", "red thing"] and labels.tolist() == [0, 0, 1, 1]
    assert images.shape == (4, 3, 8, 8)
    assert images[0, 2].min() == 1.0 and images[2, 0].min() == 1.0 and images[2, 2].max() == 0.0
    with pytest.raises(FileNotFoundError, match="root"):
        image_folder_set(str(tmp_path / "missing"), ImageTransform(8, (0, 0, 0), (1, 1, 1)))


def test_clip_runs_on_the_shapes_classes():
    model = create_model("clip-tiny").eval()
    transform = ImageTransform(model.image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    metrics = evaluate_shapes_zero_shot(model, transform, ByteTokenizer(), model.context_length, size=24)
    assert metrics["zeroshot_images"] == 24 and metrics["zeroshot_classes"] == 24
    for key in ("top1_accuracy", "top5_accuracy", "mean_per_class_recall", "top1_accuracy_held_out", "top1_accuracy_seen"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["top1_accuracy"] <= metrics["top5_accuracy"]
