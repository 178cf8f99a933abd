"""Shared by the integration tests: importing the libraries (skip, or fail where they must run), comparing
models, and an independent ToMe reference."""

import importlib
import math
import os

import pytest
import torch

REQUIRED = os.environ.get("VLCORE_REQUIRE_INTEGRATIONS") == "1"


def need(name: str):
    """Import ``name`` or skip with the reason; with VLCORE_REQUIRE_INTEGRATIONS=1 (.ci/integration_env.sh)
    a missing library fails the test instead."""
    try:
        return importlib.import_module(name)
    except Exception as error:  # torchvision beside a CPU-only torch fails with RuntimeError, not ImportError
        message = f"{name} is not importable here ({type(error).__name__}: {error}); .ci/integration_env.sh runs these"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)


def assert_close(actual, expected, rtol=1e-5, what="", floor=1e-12):
    """fp32 within ``rtol`` relative to the largest magnitude of ``expected`` (at least ``floor``)."""
    scale = expected.abs().max().clamp_min(floor)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: relative error {err.item():.3g} > {rtol}"


def spy_on_attention(monkeypatch) -> list:
    """Record the ``causal`` flag of every ``vlcore.ops.attention`` call from now on (the op still runs)."""
    import vlcore

    calls = []
    original = vlcore.ops.attention

    def spy(*args, **kwargs):
        calls.append(bool(kwargs.get("causal")))
        return original(*args, **kwargs)

    monkeypatch.setattr(vlcore.ops, "attention", spy)
    return calls


KEY_BIASES = ("k_proj.bias", "ln_k.bias", "k_norm.bias")


def assert_grads_close(patched, reference, rtol=1e-5):
    """Every parameter's gradient within ``rtol``; a gradient that is zero in exact arithmetic (the key bias:
    softmax ignores a constant added to a row's logits) is rounding noise, so the scale of each comparison is
    at least 1e-3 of the largest gradient of the model (1e-2 for the key biases themselves)."""
    ref = dict(reference.named_parameters())
    largest = max(p.grad.abs().max() for p in reference.parameters() if p.grad is not None)
    compared = 0
    for name, p in patched.named_parameters():
        if p.grad is None and ref[name].grad is None:
            continue
        assert p.grad is not None and ref[name].grad is not None, name
        assert_close(p.grad, ref[name].grad, rtol, f"grad of {name}", floor=(1e-2 if name.endswith(KEY_BIASES) else 1e-3) * largest)
        compared += 1
    assert compared > 0


# ---------------------------------------------------------------------------------------------------------
# ToMe, written from the algorithm of "Token Merging: Your ViT but Faster" (Bolya et al., 2023) and
# facebookresearch/ToMe: bipartite soft matching on the keys averaged over heads (alternate tokens into sets
# A and B, each A token's most similar B token by cosine similarity, the r most similar A tokens merged into
# their B token, the class token never merged), size-weighted average, proportional attention log(size).


def reference_match(metric, r, class_token):
    """Returns (kept A indices, merged A indices, their B destinations), each [B, *]."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)
    if class_token:
        scores[:, 0, :] = -math.inf
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    if class_token:
        kept = kept.sort(dim=-1).values
    return kept, merged, best_b.gather(1, merged)


def reference_merge(x, size, kept, merged, dest):
    """ToMe's output order: the kept A tokens, then every B token (with its merged A tokens averaged in)."""
    a, b = x[:, ::2], x[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    out, out_size = [], []
    for i in range(x.shape[0]):
        bi, sbi = (b[i] * sb[i]).clone(), sb[i].clone()
        bi = bi.index_add(0, dest[i], a[i, merged[i]] * sa[i, merged[i]])
        sbi = sbi.index_add(0, dest[i], sa[i, merged[i]])
        out.append(torch.cat([a[i, kept[i]], bi / sbi]))
        out_size.append(torch.cat([sa[i, kept[i]], sbi]))
    return torch.stack(out), torch.stack(out_size)


def reference_attention(q, k, v, size, scale):
    """q/k/v [B, H, N, D]; proportional attention adds log(size) to every key's logit."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.softmax(dim=-1) @ v


def reference_tome_blocks(x, blocks, schedule, qkv_of, attn_out_of, mlp_residual_of, class_token=True):
    """Run ``blocks`` with ToMe on ``x [B, N, C]``: ``qkv_of(block, x)`` -> q, k, v ``[B, H, N, D]`` (x already
    normed), ``attn_out_of(block, y [B, N, C])``, ``mlp_residual_of(block, x)`` -> the block's second residual
    branch (``qkv_of`` applies the block's first norm itself)."""
    size = torch.ones_like(x[..., :1])
    first = True
    for block, r in zip(blocks, schedule):
        q, k, v = qkv_of(block, x)
        y = reference_attention(q, k, v, None if first else size, q.shape[-1] ** -0.5)
        x = x + attn_out_of(block, y.transpose(1, 2).flatten(2))
        if r > 0:
            kept, merged, dest = reference_match(k.mean(dim=1), r, class_token)
            x, size = reference_merge(x, size, kept, merged, dest)
            first = False
        x = x + mlp_residual_of(block, x)
    return x
