"""Captioner beam search over the KV cache: one beam is greedy decoding, the reported score is the model's own
log-probability of the returned caption (so the caches followed the right beams), more beams never end below
greedy's score on these images."""

import pytest
import torch

from vlcore.evaluation.captioning import generate_captions
from vlcore.models import create_model
from vlcore.models.tokenizer import ByteTokenizer
from vlcore.packing import build_packed_batch

TOK = ByteTokenizer()


def _model():
    torch.manual_seed(0)
    model = create_model("captioner-tiny").eval()
    with torch.no_grad():  # sharper next-token distributions, as a trained LM has
        model.lm_head.weight.mul_(8)
    return model


def _log_prob(model, image, prompt, ids):
    sample = model.sample(ids, prompt_ids=prompt)
    with torch.no_grad():
        out = model(build_packed_batch([sample], image_token_id=model.image_token_id), image[None])
    return -(out["loss"] * out["num_targets"]).item()


def test_one_beam_is_greedy():
    model = _model()
    images = torch.randn(3, 3, model.image_size, model.image_size)
    prompts = [[TOK.sot_id], [TOK.sot_id, 66, 67], []]
    greedy = model.generate(images, prompts, max_new_tokens=7)
    eos = greedy[0][2]  # a token greedy emits: sample 0 stops at it
    greedy_eos = model.generate(images, prompts, max_new_tokens=7, eos_token_id=eos)
    assert [ids for ids, _ in model.beam_search(images, prompts, num_beams=1, max_new_tokens=7)] == greedy
    assert [ids for ids, _ in model.beam_search(images, prompts, num_beams=1, max_new_tokens=7, eos_token_id=eos)] == greedy_eos


@pytest.mark.parametrize("eos_from_greedy", [False, True])
def test_beam_scores_are_the_models_log_probabilities(eos_from_greedy):
    model = _model()
    images = torch.randn(4, 3, model.image_size, model.image_size)
    prompts = [[TOK.sot_id], [TOK.sot_id, 70, 71, 72], [], [TOK.sot_id, 80]]  # left padding differs per sample
    greedy = model.generate(images, prompts, max_new_tokens=6)
    eos = greedy[1][1] if eos_from_greedy else None
    results = model.beam_search(images, prompts, num_beams=4, max_new_tokens=6, eos_token_id=eos, length_penalty=0.0)
    for b, (ids, score) in enumerate(results):
        assert 1 <= len(ids) <= 6 and (len(ids) == 6 or ids[-1] == eos)
        assert score == pytest.approx(_log_prob(model, images[b], prompts[b], ids), abs=1e-3)
        greedy_ids = model.generate(images[b : b + 1], [prompts[b]], max_new_tokens=6, eos_token_id=eos)[0]
        # length_penalty 0 ranks by the summed log-probability: beam search keeps greedy's path or a better one
        assert score >= _log_prob(model, images[b], prompts[b], greedy_ids) - 1e-4


def test_generate_captions_with_beams_and_bad_arguments():
    model = _model()
    images = torch.randn(2, 3, model.image_size, model.image_size)
    captions = generate_captions(model, images, TOK, max_new_tokens=5, num_beams=3)
    want = [TOK.decode(ids).strip() for ids, _ in model.beam_search(images, [[]] * 2, num_beams=3, max_new_tokens=5,
                                                                    eos_token_id=TOK.eot_id)]
    assert captions == want
    with pytest.raises(ValueError, match="num_beams"):
        model.beam_search(images, num_beams=0)
    with pytest.raises(ValueError, match="prompts"):
        model.beam_search(images, [[]], num_beams=2)
