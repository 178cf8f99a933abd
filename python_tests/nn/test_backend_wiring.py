"""The ``impl="vlcore"`` call sites of vlcore.nn.backend, exercised before the ops land: stand-in ops with
the documented signatures (keyword-only arguments included) delegate to the torch paths, and the models run
through them must equal ``impl="torch"``. When the real ops are in the build, the stand-ins shadow them
here; the ops' own tests cover the kernels."""

import pytest
import torch

import vlcore
from vlcore.models import create_model
from vlcore.models.tokenizer import ByteTokenizer
from vlcore.nn import backend
from vlcore.packing import build_packed_batch


@pytest.fixture
def stand_in_ops(monkeypatch):
    calls = []

    def attention(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
                  causal=False, scale=None, key_bias=None, kv_segment=None, return_lse=False, key_lengths=None):
        assert not return_lse
        if cu_seqlens_q is None:
            assert q.dim() == 4 and (key_lengths is None or key_lengths.dtype == torch.int32)
        else:
            assert q.dim() == 3 and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
            assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
            assert key_bias is None or key_bias.shape[0] == k.shape[0]
            assert kv_segment is None or kv_segment.dtype == torch.int32
        calls.append("attention")
        return backend.attention(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal, scale=scale,
                                 key_bias=key_bias, key_lengths=key_lengths, kv_segment=kv_segment, impl="torch")

    def tome_match(metric, r, *, class_token=False, distill_token=False):
        calls.append("tome_match")
        return ("stand-in", backend.tome_match(metric, r, class_token=class_token, distill_token=distill_token))

    def tome_merge(x, match, *, size=None, mode="wavg"):
        assert mode == "wavg" and match[0] == "stand-in"
        calls.append("tome_merge")
        return backend.tome_merge(x, match[1], size=size)

    def token_pool_2d(x, grid_hw, *, output_hw=None, stride=None, mode="avg"):
        calls.append("token_pool_2d")
        return backend.token_pool_2d(x, grid_hw, output_hw=output_hw, stride=stride, mode=mode)

    def patch_merge_2x2(x, grid_hw):
        calls.append("patch_merge_2x2")
        return backend.patch_merge_2x2(x, grid_hw)

    for name, fn in dict(attention=attention, tome_match=tome_match, tome_merge=tome_merge,
                         token_pool_2d=token_pool_2d, patch_merge_2x2=patch_merge_2x2).items():
        monkeypatch.setattr(vlcore.ops, name, fn, raising=False)
    return calls


def _pair(name, **overrides):
    torch.manual_seed(0)
    reference = create_model(name, impl="torch", **overrides)
    candidate = create_model(name, impl="vlcore", **overrides)
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


def test_clip_with_tome_runs_through_the_ops(stand_in_ops):
    reference, candidate = _pair("clip-tiny", vision_cfg={"tome_r": 2})
    images = torch.randn(3, 3, 32, 32)
    tokens = ByteTokenizer()(["a", "bb", "ccc"], 32)
    torch.testing.assert_close(candidate.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(candidate.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=1e-5)
    assert {"attention", "tome_match", "tome_merge"} <= set(stand_in_ops)


def test_fusion_runs_through_the_ops(stand_in_ops):
    reference, candidate = _pair("fiber-tiny")
    with torch.no_grad():
        for model in (reference, candidate):
            for n, p in model.named_parameters():
                if n.endswith("cross.alpha"):
                    p.fill_(0.8)
    images, tokens = torch.randn(4, 3, 32, 32), ByteTokenizer()(["a b", "c", "d e f", "g"], 32)
    outs = []
    for model in (reference, candidate):
        torch.manual_seed(3)
        outs.append(model(images, tokens))
    for key in ("itc", "itm", "mlm"):
        torch.testing.assert_close(outs[1][key], outs[0][key], atol=1e-5, rtol=1e-5)
    assert "attention" in stand_in_ops


@pytest.mark.parametrize("connector", [{"kind": "avg_pool", "output_hw": [4, 4]}, {"kind": "merge_2x2"}])
def test_captioner_runs_through_the_ops(stand_in_ops, connector):
    reference, candidate = _pair("captioner-tiny", connector_cfg=connector)
    tok = ByteTokenizer()
    samples = [reference.sample([*tok.encode(c), tok.eot_id], prompt_ids=[tok.sot_id]) for c in ["ab", "cde"]]
    batch = build_packed_batch(samples, image_token_id=reference.image_token_id)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(candidate(batch, images)["loss"], reference(batch, images)["loss"], atol=1e-5, rtol=1e-5)
    prompts = [[tok.sot_id], [tok.sot_id, 70, 71]]
    assert candidate.generate(images, prompts, max_new_tokens=3) == reference.generate(images, prompts, max_new_tokens=3)
    connector_op = "patch_merge_2x2" if connector["kind"] == "merge_2x2" else "token_pool_2d"
    assert {"attention", connector_op} <= set(stand_in_ops)


@pytest.mark.parametrize("name, want", [("parse_r", "vlcore.nn.tome.parse_r"),
                                        ("TorchTomeMatch", "vlcore.ops.tome.TomeMatchRef"), ("has_op", "hasattr")])
def test_moved_names_warn_and_still_work(name, want):
    with pytest.warns(DeprecationWarning, match=want):
        value = getattr(backend, name)
    assert value is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        backend.nothing_here  # noqa: B018


def test_torch_impl_runs_the_ops_references(monkeypatch):
    """impl="torch" is the op family's reference, not a copy of it: a spy on each reference sees the call."""
    import vlcore.ops.token_grid as grid_ops
    import vlcore.ops.tome as tome_ops

    seen = []
    for module, name in ((tome_ops, "tome_match_ref"), (tome_ops, "tome_merge_ref"),
                         (grid_ops, "token_pool_2d_ref"), (grid_ops, "patch_merge_2x2_ref")):
        real = getattr(module, name)
        monkeypatch.setattr(backend, name, lambda *a, _real=real, _name=name, **k: seen.append(_name) or _real(*a, **k))
    x = torch.randn(2, 16, 3)
    match = backend.tome_match(x, 4, impl="torch")
    backend.tome_merge(x, match, impl="torch")
    backend.token_pool_2d(x, (4, 4), stride=2, impl="torch")
    backend.patch_merge_2x2(x, (4, 4), impl="torch")
    assert seen == ["tome_match_ref", "tome_merge_ref", "token_pool_2d_ref", "patch_merge_2x2_ref"]


def test_unknown_impl_names_the_argument():
    with pytest.raises(ValueError, match="impl must be 'vlcore' or 'torch', got 'cuda'"):
        backend.patch_merge_2x2(torch.zeros(1, 4, 1), (2, 2), impl="cuda")
