"""vlcore.packing: the planner and the packed-batch builder."""

import random

import pytest
import torch

from vlcore.packing import IGNORE_INDEX, build_packed_batch, pack_samples, padded_waste, plan, vlp_length_mix


def first_fit_decreasing_ref(lengths, max_len):
    """Textbook O(n^2) first-fit decreasing."""
    free, assignment = [], [None] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = next((b for b, f in enumerate(free) if f >= lengths[i]), None)
        if b is None:
            free.append(max_len)
            b = len(free) - 1
        free[b] -= lengths[i]
        assignment[i] = b
    bins = [[] for _ in free]
    for i, b in enumerate(assignment):
        bins[b].append(i)
    return bins


def random_lengths(n, max_len, seed):
    rng = random.Random(seed)
    return [rng.choice([0, 1, rng.randint(1, max_len), rng.randint(1, max_len // 3 + 1)]) for _ in range(n)]


def check_valid(p, lengths, max_len):
    assert sorted(i for b in p.bins for i in b) == list(range(len(lengths)))  # every sample exactly once
    assert all(b == sorted(b) for b in p.bins)
    assert all(sum(lengths[i] for i in b) <= max_len for b in p.bins)  # never over max_len
    assert all(p.bins)  # no empty bin


@pytest.mark.parametrize("n,max_len,seed", [(0, 7, 0), (1, 1, 0), (5, 7, 1), (97, 64, 2), (500, 4096, 3), (1000, 13, 4)])
def test_plan_first_fit_matches_reference(n, max_len, seed):
    lengths = random_lengths(n, max_len, seed)
    p = plan(lengths, max_len, algorithm="first_fit")
    check_valid(p, lengths, max_len)
    assert p.bins == [sorted(b) for b in first_fit_decreasing_ref(lengths, max_len)]


@pytest.mark.parametrize("n,max_len,seed", [(0, 7, 0), (1, 1, 0), (5, 7, 1), (97, 64, 2), (500, 4096, 3), (1000, 13, 4)])
def test_plan_best_fit_places_each_sample_in_the_tightest_bin(n, max_len, seed):
    lengths = random_lengths(n, max_len, seed)
    p = plan(lengths, max_len, algorithm="best_fit")
    check_valid(p, lengths, max_len)
    # Replay the placements longest-first: each went to a bin with the least free space that fits,
    # or opened a new bin when none fitted.
    bin_of = {i: k for k, b in enumerate(p.bins) for i in b}
    free, opened = {}, set()
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        fitting = [f for k, f in free.items() if f >= lengths[i]]
        k = bin_of[i]
        if k in opened:
            assert free[k] == min(fitting)
        else:
            assert not fitting, "opened a bin while another had room"
            opened.add(k)
            free[k] = max_len
        free[k] -= lengths[i]


def test_plan_realistic_vlp_mix_wastes_under_3_percent():
    lengths = vlp_length_mix(5000)
    for algorithm in ("first_fit", "best_fit"):
        p = plan(lengths, 4096, algorithm=algorithm)
        assert p.waste < 0.03
        assert p.efficiency == pytest.approx(sum(lengths) / (len(p.bins) * 4096))
    assert padded_waste(lengths, 32) > 0.3  # what padding would have cost


def test_plan_too_long_and_truncate():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 exceeds max_len = 8; pass truncate=True"):
        plan([3, 9, 2], 8)
    p = plan([3, 9, 2], 8, truncate=True)
    assert p.truncated == [1] and p.lengths == [3, 8, 2] and p.bins == [[1], [0, 2]]
    with pytest.raises(ValueError, match=r"lengths\[0\] = -1 is negative"):
        plan([-1], 8)
    with pytest.raises(ValueError, match="max_len must be positive"):
        plan([1], 0)
    with pytest.raises(ValueError, match="algorithm must be"):
        plan([1], 4, algorithm="worst_fit")


def test_plan_zero_length_samples_take_no_room():
    p = plan([0, 4, 0, 4], 4)
    assert p.bins == [[0, 1, 2], [3]] and p.waste == 0.0
    assert plan([], 4).bins == []


def test_padded_waste():
    assert padded_waste([2, 4, 4, 4], 2) == pytest.approx(1 - 14 / 16)
    assert padded_waste([], 2) == 0.0


def llava_sample(n_image, n_text, image_token_id=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.cat([torch.full((n_image,), image_token_id), torch.randint(1, 100, (n_text,), generator=g)])}


def test_build_packed_batch_fields():
    samples = [llava_sample(3, 4, seed=1), {"input_ids": torch.tensor([], dtype=torch.int64)},
               llava_sample(0, 1, seed=2), llava_sample(2, 2, seed=3)]
    b = build_packed_batch(samples, image_token_id=0)
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 7, 7, 8, 12]
    assert b.max_seqlen == 7 and isinstance(b.max_seqlen, int)
    assert b.num_tokens == 12 and b.num_samples == 4
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0, 1, 2, 3]
    assert b.sample_ids.dtype == torch.int32 and b.sample_ids.tolist() == [0] * 7 + [2] + [3] * 4
    assert torch.equal(b.input_ids, torch.cat([s["input_ids"] for s in samples]))
    assert b.image_positions.tolist() == [0, 1, 2, 8, 9]
    assert b.image_spans.tolist() == [[0, 3], [8, 2]]
    expected = b.input_ids.clone()
    expected[[0, 1, 2, 8, 9]] = IGNORE_INDEX  # image placeholders
    expected[[0, 7, 8]] = IGNORE_INDEX  # first token of every non-empty sample
    assert torch.equal(b.labels, expected)


def test_build_packed_batch_adjacent_images_of_two_samples_are_two_spans():
    b = build_packed_batch([llava_sample(2, 0), llava_sample(3, 1)], image_token_id=0)
    assert b.image_spans.tolist() == [[0, 2], [2, 3]]


def test_build_packed_batch_keeps_user_labels():
    s = {"input_ids": torch.tensor([5, 6, 7, 8]), "labels": torch.tensor([-100, -100, 7, 8])}
    assert build_packed_batch([s]).labels.tolist() == [-100, -100, 7, 8]


def test_build_packed_batch_errors():
    with pytest.raises(ValueError, match="empty batch"):
        build_packed_batch([])
    with pytest.raises(ValueError, match=r"samples\[0\]\['input_ids'\] must be a 1-D integer tensor"):
        build_packed_batch([{"input_ids": torch.zeros(2, 2, dtype=torch.int64)}])
    with pytest.raises(ValueError, match=r"samples\[0\]\['labels'\] has shape \(3,\), expected \(2,\)"):
        build_packed_batch([{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2, 3])}])


def test_pack_samples_round_trip():
    lengths = [5, 0, 3, 9, 1, 7]
    samples = [llava_sample(n // 2, n - n // 2, seed=n) for n in lengths]
    batches, p = pack_samples(samples, 10, image_token_id=0)
    assert sorted(i for b in batches for i in b.sample_index) == list(range(len(samples)))
    for b in batches:
        assert b.num_tokens <= 10
        for k, i in enumerate(b.sample_index):
            assert torch.equal(b.input_ids[b.cu_seqlens[k] : b.cu_seqlens[k + 1]], samples[i]["input_ids"])


def test_packed_batch_to_keeps_host_ints():
    b = build_packed_batch([llava_sample(2, 3)], image_token_id=0).to("cpu")
    assert isinstance(b.max_seqlen, int) and b.cu_seqlens.dtype == torch.int32


@pytest.mark.parametrize("algorithm", ["first_fit", "best_fit"])
def test_plan_takes_a_0d_tensor_max_len_by_value(algorithm):
    max_len = torch.tensor(10)
    p = plan([5, 3, 8, 2, 7, 1, 4], max_len, algorithm=algorithm)
    assert max_len.item() == 10 and p.max_len == 10 and isinstance(p.max_len, int)
    assert max(p.bin_lengths()) <= 10 and all(p.bins) and sorted(i for b in p.bins for i in b) == list(range(7))


@pytest.mark.parametrize("algorithm", ["first_fit", "best_fit"])
@pytest.mark.parametrize("max_len", [float("inf"), float("nan"), 2.5, "10", None, 1 + 2j])
def test_plan_rejects_a_max_len_that_is_not_an_integer(algorithm, max_len):
    with pytest.raises(ValueError, match="max_len must be an integer"):
        plan([1, 2], max_len, algorithm=algorithm)


def test_plan_best_fit_memory_does_not_grow_with_max_len():
    # The bins' free space is kept in a sorted list over the bins, not in a table over 0..max_len.
    p = plan([5, 3, 8, 2, 7, 1, 4], 10**12, algorithm="best_fit")
    assert p.bins == [[0, 1, 2, 3, 4, 5, 6]]
    assert plan([3, 3], 4.0, algorithm="best_fit").bins == [[0], [1]]  # an integral float is its integer


@pytest.mark.parametrize("lengths, name", [([1, float("nan")], r"lengths\[1\]"), ([float("inf")], r"lengths\[0\]"),
                                           ([1 + 2j], r"lengths\[0\]"), ([[1, 2], [3, 4]], r"lengths\[0\]"),
                                           (torch.ones(2, 2, dtype=torch.long), "lengths must be 1-D"),
                                           ([2.5], r"lengths\[0\]")])
def test_plan_rejects_lengths_that_are_not_integers(lengths, name):
    with pytest.raises(ValueError, match=name):
        plan(lengths, 10)


def test_plan_of_no_samples_is_empty():
    assert plan([], 10).bins == [] and plan(torch.empty(0, dtype=torch.long), 10, algorithm="best_fit").bins == []


def test_build_packed_batch_names_samples_that_are_not_dicts():
    with pytest.raises(ValueError, match=r"samples\[0\] must be a dict with 'input_ids'.*got Tensor"):
        build_packed_batch([torch.arange(3), torch.arange(2)])
    with pytest.raises(ValueError, match=r"samples\[1\] must be a dict with 'input_ids'"):
        build_packed_batch([{"input_ids": torch.arange(3)}, {"labels": torch.arange(2)}])
