"""Captioner evaluation: reading shapes captions, attribute accuracy on hand-worked cases, caption metrics,
greedy generation through the captioner."""

import pytest
import torch

from vlcore.evaluation.caption_metrics import cider_d, tokenize_caption
from vlcore.evaluation.captioning import (attribute_accuracy, caption_metrics, evaluate_captioning, generate_captions,
                                          parse_shapes_caption)
from vlcore.models import create_model
from vlcore.models.tokenizer import ByteTokenizer
from vlcore.train import synthetic


def test_parse_shapes_captions():
    two = parse_shapes_caption("A small red circle left of a large blue square.")
    assert two.objects == [("small", "red", "circle"), ("large", "blue", "square")] and two.relation == "left of"
    one = parse_shapes_caption("a small green triangle at the top left")
    assert one.objects == [("small", "green", "triangle")] and one.relation == "top left"
    assert parse_shapes_caption("a large white cross in the centre").relation == "centre"
    garbled = parse_shapes_caption("a smal red circle above a")
    assert garbled.objects == [(None, "red", "circle"), (None, None, None)] and garbled.relation == "above"
    assert parse_shapes_caption("hello").objects == [(None, None, None)]


def test_parse_reads_every_caption_the_data_writes():
    for index in range(40):
        for split in (synthetic.TRAIN, synthetic.EVAL):
            for caption in synthetic.generate(0, split, index, 16)[1]:
                parsed = parse_shapes_caption(caption)
                assert all(None not in obj for obj in parsed.objects) and parsed.relation is not None, caption


def test_attribute_accuracy_hand_worked():
    generated = [
        # The example: the held-out "red circle" named "red cross"; best reading is the first reference.
        "a small red cross above a small green cross",
        # The other reading of the references, exactly.
        "a large white square right of a large blue triangle",
        # Nothing readable: every slot and the relation wrong.
        "hello",
    ]
    references = [
        ["a small red circle above a small green cross", "a small green cross below a small red circle"],
        ["a large blue triangle left of a large white square", "a large white square right of a large blue triangle"],
        ["a small yellow cross below a large red square", "a large red square above a small yellow cross"],
    ]
    metrics = attribute_accuracy(generated, references)
    # held-out slots: red circle (size, colour right; shape wrong), blue triangle (all right), yellow cross (none)
    assert metrics["attr_size_held_out"] == pytest.approx(2 / 3)
    assert metrics["attr_colour_held_out"] == pytest.approx(2 / 3)
    assert metrics["attr_shape_held_out"] == pytest.approx(1 / 3)
    assert metrics["attr_pair_held_out"] == pytest.approx(1 / 3)
    # seen slots: green cross, white square (all right), red square (none)
    for attribute in ("size", "colour", "shape", "pair"):
        assert metrics[f"attr_{attribute}_seen"] == pytest.approx(2 / 3)
    assert metrics["attr_relation"] == pytest.approx(2 / 3)
    assert metrics["attr_objects_held_out"] == 3 and metrics["attr_objects_seen"] == 3


def test_caption_metrics_exact_and_cider():
    generated = ["A small red circle above a small green cross.", "a large red square"]
    references = [["a small red circle above a small green cross"], ["a large red square at the top left"]]
    metrics = caption_metrics(generated, references, shapes=True)
    assert metrics["caption_exact"] == pytest.approx(0.5)
    expected = cider_d([tokenize_caption(g) for g in generated], [[r] for r, in references])[0]
    assert metrics["cider"] == pytest.approx(expected) and metrics["cider"] > 0
    assert metrics["bleu_1"] >= metrics["bleu_4"] and metrics["caption_images"] == 2
    assert "attr_relation" in metrics
    assert "attr_relation" not in caption_metrics(generated, references)


def test_generate_captions_decodes_the_captioners_greedy_ids():
    torch.manual_seed(0)
    model = create_model("captioner-tiny").eval()
    tok = ByteTokenizer()
    images = torch.randn(5, 3, model.image_size, model.image_size)
    captions = generate_captions(model, images, tok, max_new_tokens=6, batch_size=2)
    ids = model.generate(images, max_new_tokens=6, eos_token_id=tok.eot_id)
    assert captions == [tok.decode(seq).strip() for seq in ids]
    metrics, again = evaluate_captioning(model, images, [["a red circle"]] * 5, tok, max_new_tokens=6, batch_size=5)
    assert again == captions and metrics["caption_images"] == 5
    with pytest.raises(ValueError, match="references"):
        evaluate_captioning(model, images, [["x"]], tok)
    # the default budget fills the context after the image tokens
    context = model.config.text_cfg.context_length
    with pytest.raises(ValueError, match="context_length"):
        generate_captions(model, images[:1], tok, max_new_tokens=context)
