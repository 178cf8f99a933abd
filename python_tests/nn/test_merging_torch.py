"""The plain-PyTorch token reduction of vlcore.nn.backend (impl="torch" runs the ops' references): ToMe's
bipartite soft matching + size-weighted merge against a per-token loop written from docs/tome.md, proportional attention == duplicated keys, the
ViT's ToMe schedule, and the pooling connectors against loops."""

import pytest
import torch
import torch.nn.functional as F

from vlcore.models import create_model
from vlcore.nn import backend
from vlcore.nn.tome import parse_r


def _tome_loop(x, size, metric, r, class_token):
    """One batch row: x [N, C], size [N], metric [N, c] -> merged x, size (docs/tome.md, the matching steps)."""
    n = x.shape[0]
    r = min(r, (n - int(class_token)) // 2)
    if r <= 0:
        return x.double(), size.double()
    m = F.normalize(metric.double(), dim=-1)
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    best = []  # (score, a position, partner b position)
    for ai, a in enumerate(a_idx):
        scores = [float(m[a] @ m[b]) for b in b_idx]
        if class_token and ai == 0:
            scores = [float("-inf")] * len(b_idx)
        j = max(range(len(b_idx)), key=lambda t: scores[t])
        best.append((scores[j], ai, j))
    order = sorted(range(len(best)), key=lambda t: -best[t][0])  # stable: ties keep A order
    merged, kept = order[:r], order[r:]
    if class_token:
        kept = sorted(kept)
    out_x = [x[b_idx[j]].double() * size[b_idx[j]] for j in range(len(b_idx))]
    out_s = [size[b_idx[j]].double() for j in range(len(b_idx))]
    for t in merged:
        _, ai, j = best[t]
        out_x[j] = out_x[j] + x[a_idx[ai]].double() * size[a_idx[ai]]
        out_s[j] = out_s[j] + size[a_idx[ai]]
    xs = [x[a_idx[best[t][1]]].double() for t in kept] + [out_x[j] / out_s[j] for j in range(len(b_idx))]
    ss = [size[a_idx[best[t][1]]].double() for t in kept] + out_s
    return torch.stack(xs), torch.stack(ss)


@pytest.mark.parametrize("tokens, r", [(17, 4), (17, 8), (17, 20), (10, 3), (2, 1), (1, 1)])
@pytest.mark.parametrize("class_token", [False, True])
def test_tome_matches_the_loop(tokens, r, class_token):
    x, metric = torch.randn(3, tokens, 6), torch.randn(3, tokens, 5)
    size = torch.randint(1, 4, (3, tokens, 1)).float()
    match = backend.tome_match(metric, r, class_token=class_token)
    merged, merged_size = backend.tome_merge(x, match, size=size)
    for b in range(3):
        want_x, want_size = _tome_loop(x[b], size[b, :, 0], metric[b], r, class_token)
        torch.testing.assert_close(merged[b].double(), want_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged_size[b, :, 0].double(), want_size)
    # Invariants: patches are conserved, and so is the size-weighted sum of features.
    torch.testing.assert_close(merged_size.sum(1), size.sum(1))
    torch.testing.assert_close((merged * merged_size).sum(1), (x * size).sum(1), atol=1e-4, rtol=1e-5)
    if class_token:
        torch.testing.assert_close(merged[:, 0], x[:, 0])


def test_proportional_attention_equals_duplicated_keys():
    # softmax(qk + log s) over a token of size s == softmax over s copies of that token (proportional attention)
    q, k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2, 4)
    size = torch.tensor([[1, 3, 2, 1]])
    out = backend.attention(q, k, v, key_bias=size.float().log())
    repeats = size[0]
    duplicated = backend.attention(q, k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1))
    torch.testing.assert_close(out, duplicated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r, want", [(3, [3, 3, 3, 3]), ((2, -1.0), [4, 2, 1, 0]), ([1, 2], [1, 2, 0, 0]), ((2, 0.5), [1, 1, 2, 3])])
def test_parse_r_schedules(r, want):
    assert parse_r(4, r) == want


def test_vit_with_tome_merges_per_schedule_and_keeps_patch_count():
    model = create_model("clip-tiny", impl="torch", vision_cfg={"tome_r": [3, 2]})
    tokens, size = model.visual.forward_tokens(torch.randn(2, 3, 32, 32))
    assert tokens.shape[1] == 17 - 3 - 2
    torch.testing.assert_close(size.sum(1), torch.full((2, 1), 17.0))
    with torch.no_grad():  # r = 0 everywhere gives back the plain tower
        plain = create_model("clip-tiny", impl="torch")
        plain.load_state_dict(model.state_dict())
        zero = create_model("clip-tiny", impl="torch", vision_cfg={"tome_r": 0})
        zero.load_state_dict(model.state_dict())
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(zero.encode_image(images), plain.encode_image(images))


@pytest.mark.parametrize("impl", ["torch", "vlcore"])
def test_token_pool_and_patch_merge_match_loops(impl):
    x = torch.randn(2, 6 * 4, 3)  # a 6 x 4 grid, row-major
    grid = x.view(2, 6, 4, 3)
    pooled = backend.token_pool_2d(x, (6, 4), output_hw=(3, 2), impl=impl)
    want = torch.stack([grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((1, 2)) for i in range(3) for j in range(2)], 1)
    torch.testing.assert_close(pooled, want)
    torch.testing.assert_close(backend.token_pool_2d(x, (6, 4), stride=2, impl=impl), want)
    merged = backend.patch_merge_2x2(x, (6, 4), impl=impl)
    want = torch.stack([torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                                   grid[:, 2 * i + 1, 2 * j + 1]], -1) for i in range(3) for j in range(2)], 1)
    torch.testing.assert_close(merged, want)
    bilinear = backend.token_pool_2d(x, (6, 4), output_hw=(6, 4), mode="bilinear", impl=impl)
    torch.testing.assert_close(bilinear, x)  # same size: identity
