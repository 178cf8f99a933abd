"""vlcore.nn.tome.parse_r against ToMe's own parse_r, the connector modules (vlcore ops vs plain PyTorch),
and the ViT block's ToMe path running on the real ops with impl="vlcore"."""

import pytest
import torch

import vlcore
from vlcore.models import create_model
from vlcore.nn import backend
from vlcore.nn.connector import TokenConnector, TokenPooler
from vlcore.nn.tome import parse_r


def tome_parse_r(num_layers, r):
    """ToMe's tome/utils.py::parse_r, transcribed (it divides by num_layers - 1: needs >= 2 layers)."""
    inflect = 0
    if isinstance(r, list):
        if len(r) < num_layers:
            r = r + [0] * (num_layers - len(r))
        return list(r)
    elif isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


@pytest.mark.parametrize("num_layers", [2, 4, 12, 24])
@pytest.mark.parametrize("r", [0, 3, 8, 16, (16, -1.0), (8, -0.5), (13, 0.0), (7, 0.5), (9, 1.0), [1, 2, 3], [5] * 30])
def test_parse_r_is_tomes(num_layers, r):
    assert parse_r(num_layers, r) == tome_parse_r(num_layers, r)


def test_parse_r_schedules_and_errors():
    assert parse_r(12, (16, -1.0))[0] == 32 and parse_r(12, (16, -1.0))[-1] == 0  # the decreasing schedule
    assert sum(parse_r(12, (16, -1.0))) <= 12 * 16
    assert parse_r(1, 5) == [5] and parse_r(1, (4, -1.0)) == [8] and parse_r(0, 3) == []
    with pytest.raises(ValueError, match="num_layers must be an int >= 0"):
        parse_r(-1, 3)
    with pytest.raises(ValueError, match=r"a tuple schedule is \(r, inflect\)"):
        parse_r(4, (1, 2, 3))
    with pytest.raises(TypeError, match="a list schedule must hold ints"):
        parse_r(4, [1.5])
    with pytest.raises(TypeError, match="r must be an int"):
        parse_r(4, 2.5)


@pytest.mark.parametrize("kind,kwargs", [("avg_pool", {"output_hw": (3, 2)}), ("bilinear", {"stride": 2}),
                                         ("merge_2x2", {}), ("none", {})])
def test_token_pooler_vlcore_equals_torch(kind, kwargs):
    x = torch.randn(2, 6 * 4, 5, requires_grad=True)
    ours, ref = TokenPooler(kind, impl="vlcore", **kwargs), TokenPooler(kind, impl="torch", **kwargs)
    torch.testing.assert_close(ours(x, (6, 4)), ref(x, (6, 4)))
    grids = [(6, 4), (2, 2), (4, 8)]
    packed = torch.randn(24 + 4 + 32, 5)
    got, got_grids = ours.forward_varlen(packed, grids)
    want, want_grids = ref.forward_varlen(packed, grids)
    assert got_grids == want_grids
    torch.testing.assert_close(got, want)


def test_token_connector_shapes_and_grads():
    conn = TokenConnector("merge_2x2", 8, 16, impl="vlcore")
    x = torch.randn(2, 16, 8, requires_grad=True)
    out = conn(x, (4, 4))
    assert out.shape == (2, 4, 16)
    out.sum().backward()
    assert x.grad is not None and conn.merge_norm.weight.grad is not None
    packed, grids = conn.forward_varlen(torch.randn(16 + 4, 8), [(4, 4), (2, 2)])
    assert packed.shape == (5, 16) and grids == [(2, 2), (1, 1)]
    with pytest.raises(ValueError, match="needs exactly one of output_hw and stride"):
        TokenPooler("avg_pool")


def test_vit_tome_runs_on_the_ops(monkeypatch):
    """impl='vlcore' routes the ViT block's ToMe through vlcore.ops (the real ops here) and equals the torch path."""
    calls = []
    for name in ("tome_match", "tome_merge"):
        real = getattr(vlcore.ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(vlcore.ops, name, spy)
    torch.manual_seed(0)
    reference = create_model("clip-tiny", impl="torch", vision_cfg={"tome_r": (3, -1.0)})
    candidate = create_model("clip-tiny", impl="vlcore", vision_cfg={"tome_r": (3, -1.0)})
    candidate.load_state_dict(reference.state_dict())
    images = torch.randn(3, 3, 32, 32)
    # The attention op may or may not be in this build; compare the towers with the same attention path.
    candidate_tokens, candidate_size = candidate.visual.forward_tokens(images)
    reference_tokens, reference_size = reference.visual.forward_tokens(images)
    assert {"tome_match", "tome_merge"} <= set(calls)
    torch.testing.assert_close(candidate_size, reference_size)
    torch.testing.assert_close(candidate_tokens, reference_tokens, atol=1e-4, rtol=1e-4)
