"""ManagerTower (vlcore/models/managertower.py): the static and adaptive managers against their aggregation
written out in plain torch, the preset builds and trains (forward, backward, loss falls), ITM's shared K/V
equals copied pairs, the vlcore and torch impls train alike, and the captioner's manager plug-in."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlcore.models import create_model
from vlcore.models.managertower import LayerManager, ManagerTowerModel
from vlcore.models.tokenizer import ByteTokenizer
from vlcore.packing import build_packed_batch

from ..conftest import DEVICES

TOK = ByteTokenizer()
CAPTIONS = ["a red square", "two blue dots", "x", "a green line on grey", "nothing"]
WORDS = ["red", "green", "blue", "square", "circle", "dot", "line", "big", "small", "two"]


def _randomize(module, std=0.3):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _layer_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def test_static_manager_equals_plain_torch():
    n, b, l, d = 3, 2, 5, 8
    manager = LayerManager(d, n, adaptive=False, with_previous=True).double().eval()
    _randomize(manager)
    layers = torch.randn(n, b, l, d, dtype=torch.float64)
    previous = torch.randn(b, l, d, dtype=torch.float64)
    weights = torch.softmax(manager.layer_scores / manager.temperature, dim=0)  # [N, d], one per layer and channel
    want = sum(weights[i] * _layer_norm(manager.layer_norms[i], layers[i]) for i in range(n))
    want = want + manager.previous_weight * _layer_norm(manager.previous_norm, previous)
    torch.testing.assert_close(manager(layers, previous), want, rtol=1e-12, atol=1e-12)


def test_static_manager_starts_uniform():
    manager = LayerManager(4, 4, adaptive=False, with_previous=False).eval()
    layers = torch.randn(4, 1, 3, 4)
    want = sum(_layer_norm(norm, h) for norm, h in zip(manager.layer_norms, layers)) / 4
    torch.testing.assert_close(manager(layers), want)


def _adaptive_reference(manager, layers, previous, context, context_lengths):
    n, d = layers.shape[0], layers.shape[-1]
    normed = [_layer_norm(manager.layer_norms[i], layers[i]) for i in range(n)]
    q = _layer_norm(manager.previous_norm, previous)
    c = _layer_norm(manager.context_norm, context)
    scores = (q @ manager.query_proj.weight.T + manager.query_proj.bias) @ (
        c @ manager.key_proj.weight.T + manager.key_proj.bias).transpose(1, 2) / math.sqrt(d)
    for row, length in enumerate(context_lengths.tolist()):
        scores[row, :, length:] = float("-inf")
    fused = torch.cat([torch.softmax(scores, dim=-1) @ c, q], dim=-1)
    layer_scores = fused @ manager.controller.weight.T + manager.controller.bias  # [B, L, N]
    weights = torch.softmax(layer_scores / manager.temperature, dim=-1)
    out = sum(weights[..., i : i + 1] * normed[i] for i in range(n))
    return out + manager.previous_weight * q


def test_adaptive_manager_equals_plain_torch_and_ignores_padded_context():
    n, b, l, d, lc, dc = 4, 3, 6, 8, 7, 12
    manager = LayerManager(d, n, adaptive=True, with_previous=True, context_width=dc).double().eval()
    _randomize(manager)
    layers = torch.randn(n, b, l, d, dtype=torch.float64)
    previous = torch.randn(b, l, d, dtype=torch.float64)
    context = torch.randn(b, lc, dc, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4], dtype=torch.int32)
    got = manager(layers, previous, context=context, context_lengths=lengths)
    torch.testing.assert_close(got, _adaptive_reference(manager, layers, previous, context, lengths),
                               rtol=1e-12, atol=1e-12)
    poisoned = context.clone()
    poisoned[1, 1:] = 1e6
    poisoned[2, 4:] = float("nan")
    torch.testing.assert_close(manager(layers, previous, context=poisoned, context_lengths=lengths), got,
                               rtol=0, atol=0)
    # Weights differ per token (adaptive), and sum to one over the layers.
    normed = torch.stack([norm(h) for norm, h in zip(manager.layer_norms, layers)])
    w = manager.layer_weights(normed, manager.previous_norm(previous), context, lengths)
    assert w.shape == (n, b, l, 1)
    torch.testing.assert_close(w.sum(0), torch.ones(b, l, 1, dtype=torch.float64))
    assert w.std(dim=(1, 2)).max() > 1e-3


def test_adaptive_manager_without_context_queries_its_top_layer():
    n, d = 3, 8
    manager = LayerManager(d, n, adaptive=True, with_previous=False).double().eval()
    _randomize(manager)
    layers = torch.randn(n, 2, 5, d, dtype=torch.float64)
    normed = [_layer_norm(norm, h) for norm, h in zip(manager.layer_norms, layers)]
    weights = torch.softmax((normed[-1] @ manager.controller.weight.T + manager.controller.bias) / manager.temperature, -1)
    want = sum(weights[..., i : i + 1] * normed[i] for i in range(n))
    torch.testing.assert_close(manager(layers), want, rtol=1e-12, atol=1e-12)


def test_training_noise_only_in_training():
    manager = LayerManager(8, 3, adaptive=False, with_previous=False)
    layers = torch.randn(3, 2, 4, 8)
    manager.eval()
    clean = manager(layers)
    manager.train()
    assert (manager(layers) - clean).abs().max() > 1e-4
    manager.noise = False
    torch.testing.assert_close(manager(layers), clean, rtol=0, atol=0)


def test_manager_bad_inputs():
    manager = LayerManager(8, 3, adaptive=True, with_previous=True, context_width=4)
    with pytest.raises(ValueError, match="expected 3 layers"):
        manager(torch.randn(2, 1, 4, 8), torch.randn(1, 4, 8), context=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="previous"):
        manager(torch.randn(3, 1, 4, 8), context=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="context"):
        manager(torch.randn(3, 1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="context needs an adaptive"):
        LayerManager(8, 3, adaptive=False, with_previous=True, context_width=4)


def _batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, model.image_size, model.image_size, generator=g), TOK(CAPTIONS[:n], model.context_length)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("manager", ["adaptive", "static"])
def test_preset_builds_and_every_parameter_gets_a_gradient(manager, device):
    model = create_model("managertower-tiny", fusion_cfg={"manager": manager}).to(device)
    assert isinstance(model, ManagerTowerModel)
    assert model.num_fused == 3 and len(model.image_cross.managers) == 2
    kinds = [m.adaptive for m in model.text_cross.managers]
    assert kinds == ([False, True] if manager == "adaptive" else [False, False])  # layer 0 is always static
    images, tokens = _batch(model)
    out = model(images.to(device), tokens.to(device))
    assert set(out) == {"itc", "itm", "mlm", "loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def _train_step(model, optimizer, images, tokens) -> float:
    loss = model(images, tokens)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.clamp_logit_scale()
    return loss.item()


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = create_model("managertower-tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, tokens = _batch(model)
    losses = []
    for _ in range(6):
        torch.manual_seed(1)  # same negatives, masks and manager noise each step: a fixed objective
        losses.append(_train_step(model, optimizer, images, tokens))
    assert losses[-1] < 0.8 * losses[0], losses


def test_itm_with_shared_kv_equals_copied_pairs():
    torch.manual_seed(0)
    copied = create_model("managertower-tiny", impl="torch").eval()
    shared = create_model("managertower-tiny", impl="vlcore").eval()
    _randomize(copied, std=0.05)
    shared.load_state_dict(copied.state_dict())
    images, tokens = _batch(copied, 5)
    image_index = torch.tensor([0, 1, 2, 3, 4, 3, 0, 4])
    text_index = torch.tensor([0, 1, 2, 3, 4, 1, 2, 2])
    with torch.no_grad():
        lengths = copied.text.key_lengths(tokens)
        want = copied.upper(copied.lower_image(images[image_index]), copied.lower_text(tokens[text_index]),
                            lengths[text_index], fuse=True)
        got = shared.upper(shared.lower_image(images), shared.lower_text(tokens), lengths, fuse=True,
                           image_index=image_index, text_index=text_index)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_vlcore_and_torch_impls_train_alike():
    def train(impl):
        torch.manual_seed(0)
        model = create_model("managertower-tiny", impl=impl)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(1)
        losses = []
        for _ in range(4):
            images = torch.randn(4, 3, model.image_size, model.image_size, generator=g)
            words = torch.randint(len(WORDS), (4, 3), generator=g).tolist()
            tokens = TOK([" ".join(WORDS[i] for i in row) for row in words], model.context_length)
            losses.append(_train_step(model, optimizer, images, tokens))
        return losses

    reference, candidate = train("torch"), train("vlcore")
    for step, (got, want) in enumerate(zip(candidate, reference)):
        assert got == pytest.approx(want, rel=2e-3), f"step {step}: vlcore {got} vs torch {want}"


@pytest.mark.parametrize("overrides, message", [
    ({"fusion_cfg": {"managed_layers": 4}}, "managed_layers"),
    ({"fusion_cfg": {"manager": "dynamic"}}, "manager"),
    ({"fusion_cfg": {"managed_layers": -1}}, "managed_layers"),
])
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("managertower-tiny", **overrides)


@pytest.mark.parametrize("manager", ["static", "adaptive"])
def test_captioner_connector_manager(manager):
    model = create_model("captioner-tiny", impl="torch", connector_cfg={"manager_layers": 2, "manager": manager}).eval()
    _randomize(model.vision_manager)
    images = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        x, layers = model.visual.embed(images), []
        for block in model.visual.blocks:
            x = block(x)
            layers.append(x)
        mixed = model.vision_manager(torch.stack(layers[-2:]))
        grid = model.config.vision_cfg.grid_size
        pooled = F.adaptive_avg_pool2d(mixed.transpose(1, 2).unflatten(-1, (grid, grid)), (4, 4)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.image_tokens(images), model.projector(pooled), atol=1e-5, rtol=1e-5)
    model.train()
    samples = [model.sample([*TOK.encode(c), TOK.eot_id]) for c in CAPTIONS[:2]]
    model(build_packed_batch(samples, image_token_id=model.image_token_id), images)["loss"].backward()
    assert all(p.grad is not None for p in model.vision_manager.parameters())
    with pytest.raises(ValueError, match="manager_layers"):
        create_model("captioner-tiny", connector_cfg={"manager_layers": 3})
