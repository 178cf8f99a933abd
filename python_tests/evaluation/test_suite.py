"""evaluate_model per model kind on the embedded data, and the report lines."""

import pytest
import torch

from vlcore.evaluation.suite import EvalOptions, EvalResult, evaluate_model, report_lines
from vlcore.models import create_model
from vlcore.models.tokenizer import ByteTokenizer
from vlcore.train import synthetic
from vlcore.train.data import ImageTransform

TOK = ByteTokenizer()


def _eval_set(image_size, n=6):
    transform = ImageTransform(image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    samples = [synthetic.generate(0, synthetic.EVAL, i, image_size) for i in range(n)]
    return torch.stack([transform(image) for image, _ in samples]), [caps for _, caps in samples], transform


def test_clip_retrieval_and_shapes_zero_shot():
    model = create_model("clip-tiny")
    images, captions, transform = _eval_set(model.image_size)
    result = evaluate_model(model, "clip", images, captions, TOK, model.context_length, transform=transform,
                            options=EvalOptions(zeroshot="shapes", zeroshot_size=24, itm_rerank_k=4))
    m = result.metrics
    assert {"i2t_R@1", "t2i_R@10", "top1_accuracy", "top1_accuracy_held_out"} <= set(m)
    assert "itm_rerank_k" not in m and result.captions == []  # no ITM head: no re-ranking
    assert model.training  # the mode is restored
    lines = report_lines(result)
    assert lines[0].startswith("retrieval (ITC, 6 images): i2t R@1/5/10 ") and lines[1].startswith("zero-shot (24 classes")


def test_fusion_reranks_and_reports_both():
    model = create_model("fiber-tiny").eval()
    images, captions, _ = _eval_set(model.image_size)
    result = evaluate_model(model, "fusion", images, captions, TOK, model.context_length,
                            options=EvalOptions(itm_rerank_k=3, ks=(1, 5)))
    assert result.metrics["itm_rerank_k"] == 3 and "t2i_itm_R@5" in result.metrics
    lines = report_lines(result, ks=(1, 5))
    assert lines[1].startswith("retrieval (ITM re-ranked ITC top 3): i2t R@1/5 ")
    assert not model.training


def test_captioner_samples_and_attributes():
    model = create_model("captioner-tiny")
    images, captions, _ = _eval_set(model.image_size)
    result = evaluate_model(model, "captioner", images, captions, TOK, model.config.text_cfg.context_length,
                            options=EvalOptions(caption_samples=3, shapes=True, max_new_tokens=8))
    assert result.metrics["caption_images"] == 3 and "attr_shape_held_out" in result.metrics
    assert [refs for _, refs in result.captions] == captions[:3]
    lines = report_lines(result)
    assert lines[0].startswith("captions (3 images): CIDEr ")
    assert lines[1].startswith("attribute accuracy (held-out pairs / seen pairs): colour ")
    assert lines[2] == "sample captions (generated | reference):" and len(lines) == 6


def test_report_lines_hand_built():
    metrics = {"i2t_R@1": 0.5, "t2i_R@1": 0.25, "eval_images": 4, "i2t_itm_R@1": 0.75, "t2i_itm_R@1": 1.0,
               "itm_rerank_k": 2, "top1_accuracy": 0.5, "top5_accuracy": 1.0, "mean_per_class_recall": 0.4,
               "zeroshot_classes": 3, "zeroshot_images": 6}
    assert report_lines(EvalResult(metrics), ks=(1,)) == [
        "retrieval (ITC, 4 images): i2t R@1 0.500, t2i 0.250",
        "retrieval (ITM re-ranked ITC top 2): i2t R@1 0.750, t2i 1.000",
        "zero-shot (3 classes, 6 images): top-1 0.500, top-5 1.000, mean per-class recall 0.400",
    ]


def test_folder_zero_shot_and_bad_options(tmp_path):
    from PIL import Image

    for name, colour in (("red", (250, 0, 0)), ("green", (0, 250, 0))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 40), colour).save(tmp_path / name / "a.png")
    model = create_model("clip-tiny")
    images, captions, transform = _eval_set(model.image_size, 2)
    m = evaluate_model(model, "clip", images, captions, TOK, model.context_length, transform=transform,
                       options=EvalOptions(zeroshot=str(tmp_path))).metrics
    assert m["zeroshot_classes"] == 2 and m["zeroshot_images"] == 2 and m["top5_accuracy"] == 1.0
    with pytest.raises(ValueError, match="transform"):
        evaluate_model(model, "clip", images, captions, TOK, model.context_length, options=EvalOptions(zeroshot="shapes"))
    with pytest.raises(ValueError, match="kind"):
        evaluate_model(model, "vqa", images, captions, TOK, model.context_length)
    with pytest.raises(ValueError, match="itm_rerank_k"):
        EvalOptions(itm_rerank_k=-1)
