"""MIR (vlcore/evaluation/mir.py) against direct computations: the Fréchet distance of Gaussians with a
closed form, scipy's matrix square root, the per-layer normalisation and outlier rule written out, and the
captioner helper against the function on the hidden states it returns."""

import math

import numpy as np
import pytest
import torch

from vlcore.evaluation.mir import (captioner_mir, frechet_distance, gaussian_statistics, layer_distance,
                                   modality_integration_rate, replace_outliers)


def _random_spd(n, generator):
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def test_frechet_distance_diagonal_closed_form():
    # Diagonal covariances commute: FD = |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2.
    mean_a, mean_b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    var_a, var_b = torch.tensor([4.0, 1.0, 0.25]), torch.tensor([1.0, 9.0, 0.25])
    want = float((mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    got = frechet_distance(mean_a, torch.diag(var_a), mean_b, torch.diag(var_b))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert frechet_distance(mean_a, torch.diag(var_a), mean_a, torch.diag(var_a)) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("dim", [1, 5, 17])
def test_frechet_distance_matches_scipy_sqrtm(dim):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(dim)
    cov_a, cov_b = _random_spd(dim, g), _random_spd(dim, g)
    mean_a, mean_b = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    covmean = scipy_linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    want = float(((mean_a - mean_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * np.trace(covmean))
    assert frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(want, rel=1e-9)


def test_sampled_gaussians_approach_the_population_distance():
    # Many samples of two known Gaussians: the sample FD converges to the population FD.
    g = torch.Generator().manual_seed(0)
    n, dim = 200_000, 3
    a = torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([1.0, 0.0, 0.0])
    b = torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1.0])
    want = 1.0 + (2.0 - 1.0) ** 2 + (0.5 - 1.0) ** 2
    assert frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b)) == pytest.approx(want, rel=0.02)


def _direct_layer_term(image, text):
    # The paper's recipe written out with numpy: scale by the mean text norm, 3-sigma outlier rule on the
    # norms (replaced by the lower per-channel median), then FD with unbiased covariances and scipy's sqrtm.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    image, text = image.numpy().astype(np.float64), text.numpy().astype(np.float64)
    scale = 1.0 / np.linalg.norm(text, axis=1).mean()
    image, text = image * scale, text * scale

    def clean(x):
        norms = np.linalg.norm(x, axis=1)
        median_norm = np.sort(norms)[(len(norms) - 1) // 2]
        outliers = np.abs(norms - median_norm) > 3 * norms.std(ddof=1)
        x = x.copy()
        x[outliers] = np.sort(x, axis=0)[(len(x) - 1) // 2]
        return x

    image, text = clean(image), clean(text)
    mu_i, mu_t = image.mean(0), text.mean(0)
    cov_i, cov_t = np.cov(image, rowvar=False), np.cov(text, rowvar=False)
    covmean = scipy_linalg.sqrtm(cov_i @ cov_t).real
    return float(((mu_i - mu_t) ** 2).sum() + np.trace(cov_i) + np.trace(cov_t) - 2 * np.trace(covmean))


def test_outliers_are_replaced_by_the_median_token():
    x = torch.ones(40, 4, dtype=torch.float64)
    x[::2] *= 1.1
    x[7] = 100.0  # far outlier
    out = replace_outliers(x)
    assert torch.equal(out[7], x.median(dim=0).values)
    assert torch.equal(out[:7], x[:7]) and torch.equal(out[8:], x[8:])


def test_mir_matches_a_direct_computation_on_small_tensors():
    g = torch.Generator().manual_seed(3)
    layers, batch, length, width = 4, 2, 37, 6
    # Layers whose scale grows (the normalisation must cancel it) and a few outlier tokens.
    hidden = [(k + 1) * 3.0 * torch.randn(batch, length, width, generator=g) for k in range(layers + 1)]
    hidden[2][0, 5] *= 40.0
    image_mask = torch.zeros(batch, length, dtype=torch.bool)
    image_mask[:, :16] = True
    text_mask = ~image_mask
    text_mask[1, -4:] = False  # padding in neither set
    for h in hidden:
        h[:, :16] += 2.0  # image tokens offset from text tokens
    got = modality_integration_rate(hidden, image_mask, text_mask)
    want = [_direct_layer_term(h[image_mask], h[text_mask]) for h in hidden[1:]]
    assert len(got.per_layer) == layers
    np.testing.assert_allclose(got.per_layer, want, rtol=1e-8)
    assert got.mir == pytest.approx(math.log10(sum(want)), rel=1e-10)
    # Scale invariance per layer: scaling a whole layer leaves its term unchanged.
    scaled = [h * 10.0 if k == 2 else h for k, h in enumerate(hidden)]
    assert modality_integration_rate(scaled, image_mask, text_mask).per_layer[1] == pytest.approx(got.per_layer[1], rel=1e-6)


def test_identical_distributions_score_lower():
    g = torch.Generator().manual_seed(1)
    text = torch.randn(1, 400, 4, generator=g)
    same = torch.cat([torch.randn(1, 400, 4, generator=g), text], dim=1)
    apart = torch.cat([torch.randn(1, 400, 4, generator=g) + 3.0, text], dim=1)
    image_mask = torch.arange(800)[None] < 400
    close = layer_distance(same[image_mask], same[~image_mask])
    far = layer_distance(apart[image_mask], apart[~image_mask])
    assert close < 0.1 < far


def test_bad_inputs_name_the_argument():
    h = [torch.randn(10, 4)] * 3
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:5] = True
    with pytest.raises(ValueError, match="image_mask"):
        modality_integration_rate(h, mask.long(), ~mask)
    with pytest.raises(ValueError, match="text_mask"):
        modality_integration_rate(h, mask, torch.ones(11, dtype=torch.bool))
    with pytest.raises(ValueError, match="both"):
        modality_integration_rate(h, mask, torch.ones(10, dtype=torch.bool))
    one = torch.zeros(10, dtype=torch.bool)
    one[0] = True
    with pytest.raises(ValueError, match="image_mask selects 1"):
        modality_integration_rate(h, one, ~one)
    with pytest.raises(ValueError, match="empty"):
        modality_integration_rate([], mask, ~mask)


def test_captioner_mir_equals_the_function_on_its_hidden_states():
    from vlcore.models import create_model
    from vlcore.models.tokenizer import ByteTokenizer
    from vlcore.packing import build_packed_batch

    tok = ByteTokenizer()
    model = create_model("captioner-tiny", impl="torch")
    captions = ["a red square", "two blue circles above a line", "green"]
    samples = [model.sample([*tok.encode(c), tok.eot_id]) for c in captions]
    packed = build_packed_batch(samples, image_token_id=model.image_token_id)
    images = torch.randn(len(captions), 3, model.image_size, model.image_size)
    model.train()
    got = captioner_mir(model, [(packed, images)])
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        out = model(packed, images, output_hidden_states=True)
    hidden = out["hidden_states"]
    assert len(hidden) == len(model.lm.blocks) + 1 and all(h.shape == hidden[0].shape for h in hidden)
    image_mask = packed.input_ids == model.image_token_id
    want = modality_integration_rate(hidden, image_mask, ~image_mask)
    np.testing.assert_allclose(got.per_layer, want.per_layer, rtol=1e-10)
    # The last entry is after norm_final (identity affine at initialisation: zero mean, unit variance rows).
    torch.testing.assert_close(hidden[-1].mean(-1), torch.zeros(hidden[-1].shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(hidden[-1].var(-1, unbiased=False), torch.ones(hidden[-1].shape[0]), atol=1e-3, rtol=0)
    # Two batches are pooled per layer, not averaged.
    half = build_packed_batch(samples[:2], image_token_id=model.image_token_id)
    rest = build_packed_batch(samples[2:], image_token_id=model.image_token_id)
    pooled = captioner_mir(model, [(half, images[:2]), (rest, images[2:])])
    np.testing.assert_allclose(pooled.per_layer, got.per_layer, rtol=1e-4)
