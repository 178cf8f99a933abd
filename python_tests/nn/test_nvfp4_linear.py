"""vlcore.nvfp4: NVFP4Linear against a reference autograd built from quantize/dequantize, convert, the guard."""

import pytest
import torch
from torch import nn

import vlcore
from vlcore.models.factory import create_model
from vlcore.models.tokenizer import get_tokenizer
from vlcore.nvfp4 import NVFP4Linear, NVFP4Policy, NVFP4Recipe, StabilityGuard, convert, nvfp4_linear
from vlcore.ops.nvfp4 import nvfp4_dequantize_ref, nvfp4_quantize

from ..conftest import DEVICES


def pad16(t):
    pad = (-t.shape[0]) % 16
    return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t


def deq(t):
    return nvfp4_dequantize_ref(t).double()


def reference_linear(x, w, b, grad_out, recipe, seed, offset):
    """The recipe written with quantize + dequantize + float64 matmuls (docs/nvfp4.md, 'Training recipe')."""
    rht, sr, two_d = recipe.rht, recipe.stochastic_rounding, recipe.block_2d_weights
    k, n = w.shape[1], w.shape[0]
    x2, g2 = x.reshape(-1, k), grad_out.reshape(-1, n)
    tokens = x2.shape[0]
    xq = nvfp4_quantize(pad16(x2), columnwise=True, rht_columnwise=rht)
    wq = nvfp4_quantize(w, columnwise=True, block_2d=two_d)
    y = deq(xq.rowwise) @ deq(wq.rowwise).t()
    y = y[:tokens] + (b.double() if b is not None else 0)
    gq = nvfp4_quantize(pad16(g2), columnwise=True, rht_columnwise=rht, stochastic=sr, seed=seed, offset=offset)
    dx = (deq(gq.rowwise) @ deq(wq.columnwise).t())[:tokens]
    dw = deq(gq.columnwise) @ deq(xq.columnwise).t()
    return y.reshape(*x.shape[:-1], n), dx.reshape(x.shape), dw, g2.double().sum(0)


RECIPES = {
    "paper": NVFP4Recipe(),
    "no_rht": NVFP4Recipe(rht=False),
    "no_sr": NVFP4Recipe(stochastic_rounding=False),
    "1d_weights": NVFP4Recipe(block_2d_weights=False),
}


def close(got, want, rel=1e-5):
    # FP32 accumulation over exact 16-element block partials vs float64: relative to the largest output
    err = (got.double().cpu() - want.cpu()).abs().max().item()
    assert err <= rel * want.abs().max().item() + 1e-12, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("lead", [(40,), (3, 7)])  # 21 tokens: padded to 32 inside
def test_nvfp4_linear_matches_reference_autograd(device, recipe, lead):
    r = RECIPES[recipe]
    layer = NVFP4Linear(64, 48, recipe=r, seed=99, device=device)
    x = torch.randn(*lead, 64, device=device, requires_grad=True)
    grad_out = torch.randn(*lead, 48, device=device)
    y = layer(x)
    y.backward(grad_out)
    want_y, want_dx, want_dw, want_db = reference_linear(x.detach(), layer.weight.detach(), layer.bias.detach(),
                                                         grad_out, r, seed=99, offset=0)
    close(y, want_y)
    close(x.grad, want_dx)
    close(layer.weight.grad, want_dw)
    close(layer.bias.grad, want_db)
    assert layer.weight.grad.dtype == torch.float32 and layer.step == 1


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_linear_bf16_activations_and_params(device):
    layer = NVFP4Linear(32, 32, bias=False, seed=1, device=device, dtype=torch.bfloat16)
    x = torch.randn(16, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().pow(2).sum().backward()
    assert y.dtype == x.grad.dtype == layer.weight.grad.dtype == torch.bfloat16


def test_nvfp4_linear_saves_only_quantized_operands():
    layer = NVFP4Linear(64, 64)
    x = torch.randn(128, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert saved, "nothing saved"
    for t in saved:  # the columnwise X and W copies: uint8 codes and scales, 0-d fp32 amaxes
        assert t.dtype == torch.uint8 or (t.dtype == torch.float32 and t.numel() == 1), (t.dtype, t.shape)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes < (x.numel() * 2 + layer.weight.numel() * 2) / 3  # < a third of bf16 X and W


def test_nvfp4_linear_fresh_stochastic_rounding_each_step():
    torch.manual_seed(5)
    layer = NVFP4Linear(32, 32, seed=7)
    x = torch.randn(64, 32)
    start = {k: v.clone() for k, v in layer.state_dict().items()}
    grads = []
    for _ in range(2):
        layer.weight.grad = None
        layer(x).pow(2).sum().backward()
        grads.append(layer.weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])  # same input, next step: a different SR draw
    again = NVFP4Linear(32, 32, seed=7)
    again.load_state_dict(start)
    again(x).pow(2).sum().backward()
    assert torch.equal(again.weight.grad, grads[0])  # same seed, same step: reproducible
    no_sr = NVFP4Linear(32, 32, seed=7, recipe=NVFP4Recipe(stochastic_rounding=False))
    no_sr.load_state_dict(layer.state_dict())
    g = [torch.autograd.grad(no_sr(x).pow(2).sum(), no_sr.weight)[0] for _ in range(2)]
    assert torch.equal(g[0], g[1])


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_linear_resume_draws_the_same_stochastic_rounding(device):
    # The SR (seed, step) is in the state dict: a layer rebuilt from a checkpoint taken after two steps
    # draws the same bits on its next step as the uninterrupted layer on its third.
    torch.manual_seed(6)
    layer = NVFP4Linear(32, 48, device=device)  # seed drawn from torch's generator
    x = torch.randn(64, 32, device=device)
    for _ in range(2):
        layer(x).sum().backward()
    checkpoint = {k: v.cpu().clone() for k, v in layer.state_dict().items()}
    assert checkpoint["sr_state"].tolist() == [layer.seed, 2]
    layer.weight.grad = None
    layer(x).pow(2).sum().backward()
    resumed = NVFP4Linear(32, 48, seed=1, device=device)  # another seed, step 0, other weights
    resumed.load_state_dict(checkpoint)
    assert (resumed.seed, resumed.step) == (layer.seed, 2)
    resumed(x).pow(2).sum().backward()
    assert torch.equal(resumed.weight.grad, layer.weight.grad)
    assert resumed.state_dict()["sr_state"].tolist() == [layer.seed, 3]
    # the first two steps drew other bits: the restored step matters
    fresh = NVFP4Linear(32, 48, seed=layer.seed, device=device)
    fresh.load_state_dict({k: v for k, v in checkpoint.items() if k != "sr_state"})  # plain nn.Linear keys
    assert (fresh.seed, fresh.step) == (layer.seed, 0)
    fresh(x).pow(2).sum().backward()
    assert not torch.equal(fresh.weight.grad, layer.weight.grad)
    # a converted layer carries the buffer on its parameters' device, and loads a plain nn.Linear checkpoint
    plain = nn.Linear(32, 48, device=device)
    converted = NVFP4Linear.from_linear(plain, seed=11)
    assert converted.sr_state.device == plain.weight.device and converted.sr_state.tolist() == [11, 0]
    converted.load_state_dict(plain.state_dict())


def test_converted_model_under_torch_compile():
    # NVFP4Linear runs eagerly inside a compiled model (its SR step counter changes every call).
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(32, 32)])
            self.head = nn.Linear(32, 16)

        def forward(self, x):
            return self.head(torch.relu(self.blocks[0](x)))

    torch.manual_seed(0)
    model = Tower()
    report = convert(model, NVFP4Policy(keep_last_fraction=0.0))
    assert report.converted == ["blocks.0"] and isinstance(model.blocks[0], NVFP4Linear)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(8, 32)
    for _ in range(3):
        out = compiled(x)
        out.sum().backward()
    assert torch.equal(out, model(x))  # forward is RNE only: deterministic
    assert model.blocks[0].step == 4 and model.blocks[0].weight.grad is not None


def test_nvfp4_linear_disabled_is_plain_linear_and_bad_shapes():
    layer = NVFP4Linear(32, 16)
    layer.enabled = False
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(ValueError, match="multiples of 16"):
        NVFP4Linear(24, 16)
    with pytest.raises(ValueError, match="last dim 32"):
        nvfp4_linear(torch.randn(4, 16), layer.weight)


def test_small_model_trains_on_cpu():
    # A 2-layer MLP regression on a fixed random teacher: NVFP4 (all three GEMMs 4-bit) must learn.
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    data = torch.randn(512, 32)
    target = teacher(data).detach()

    def train(make_linear):
        torch.manual_seed(1)
        model = nn.Sequential(make_linear(32, 64), nn.ReLU(), make_linear(64, 16))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for step in range(120):
            idx = torch.randint(0, 512, (64,))
            loss = (model(data[idx]) - target[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return sum(losses[:10]) / 10, sum(losses[-10:]) / 10

    guard = StabilityGuard()
    first, last = train(lambda i, o: NVFP4Linear(i, o, guard=guard))
    ref_first, ref_last = train(nn.Linear)
    assert last < 0.25 * first, (first, last)
    assert last < 4 * ref_last + 0.02, (last, ref_last)  # same ballpark as full precision
    assert guard.checked == 2 * 120 and not guard.tripped


def test_convert_clip_tiny_report_and_training_step():
    torch.manual_seed(0)
    model = create_model("clip-tiny")
    weights_before = {n: p for n, p in model.named_parameters()}
    report = convert(model)
    # clip-tiny: 2 blocks per tower; ceil(15 % of 2) = 1 last block stays high precision
    assert report.towers == {"visual.blocks": (2, [0]), "text.blocks": (2, [0])}
    assert report.converted and all(".blocks.0." in n for n in report.converted)
    assert all(".blocks.1." in n for n in report.kept_by_policy)
    for name in report.converted:
        assert isinstance(model.get_submodule(name), NVFP4Linear)
    for name in report.kept_by_policy + report.outside_blocks:
        assert type(model.get_submodule(name)) is nn.Linear
    assert all(p is weights_before[n] for n, p in model.named_parameters())  # parameters are shared
    assert 0 < report.fraction_converted < 1 and "converted" in str(report)
    for m in model.modules():  # embeddings and norms untouched
        assert not isinstance(m, (nn.Embedding, nn.LayerNorm)) or type(m) in (nn.Embedding, nn.LayerNorm)
    images = torch.randn(2, 3, 32, 32)
    tokens = get_tokenizer("byte")(["ab", "cde"], model.context_length)
    out = model(images, tokens)
    (out["image_features"] @ out["text_features"].t()).sum().backward()
    assert report.guard.checked > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if ".blocks.0." in n and p.dim() == 2)


def test_convert_policy_and_non_multiple_of_16_layers():
    class Block(nn.Module):
        def __init__(self, odd):
            super().__init__()
            self.fc = nn.Linear(32, 48)
            self.odd = nn.Linear(32, 20 if odd else 32)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 32)
            self.blocks = nn.ModuleList([Block(odd=i == 2) for i in range(10)])
            self.head = nn.Linear(32, 10)

    model = Model()
    report = convert(model, NVFP4Policy(keep_last_fraction=0.15, keep_first_blocks=1))
    assert report.towers == {"blocks": (10, list(range(1, 8)))}  # first 1 and last ceil(1.5) = 2 blocks kept
    assert report.skipped_shape == [("blocks.2.odd", 32, 20)]
    assert "blocks.2.odd" in str(report)
    assert len(report.converted) == 2 * 7 - 1 and report.outside_blocks == ["head"]
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding
    with pytest.raises(ValueError, match="keep_last_fraction"):
        convert(Model(), NVFP4Policy(keep_last_fraction=1.5))


def test_stability_guard_flags_zero_and_nonfinite_gradients():
    guard = StabilityGuard()
    layer = NVFP4Linear(32, 32, guard=guard)
    x = torch.randn(16, 32, requires_grad=True)
    layer(x).backward(torch.randn(16, 32))
    assert guard.checked == 1 and not guard.tripped
    layer(x).backward(torch.zeros(16, 32))
    assert guard.zero_steps == 1 and guard.tripped
    g = torch.randn(16, 32)
    g[3, 4] = float("nan")
    layer(x).backward(g)
    g[3, 4] = float("inf")
    layer(x).backward(g)
    assert guard.nonfinite_steps == 2 and guard.checked == 4
    guard.reset()
    assert guard.checked == 0 and not guard.tripped
