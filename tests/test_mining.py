"""Tests for fastslow.mining: faiss mining vs brute force, positive exclusion, padding, candidate layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastslow.mining import inbatch_candidates, listwise_candidates, mine_hard_negatives


def normalised(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(text_emb, item_emb, positives, k):
    """Reference: argsort of the full score matrix (float64), positives removed, first k, -1 padded."""
    scores = text_emb.astype(np.float64) @ item_emb.astype(np.float64).T
    out = np.full((len(text_emb), k), -1, np.int64)
    for q, row in enumerate(np.argsort(-scores, axis=1, kind="stable")):
        kept = [j for j in row if j not in positives[q]][:k]
        out[q, : len(kept)] = kept
    return out, scores


def test_matches_brute_force_top_k_with_one_positive_per_text():
    rng = np.random.default_rng(0)
    text_emb, item_emb = normalised(rng, 60, 16), normalised(rng, 200, 16)
    positive = rng.integers(0, 200, 60)
    # Make the positive the best item for half the texts, as after training, so exclusion really removes a hit.
    text_emb[::2] = item_emb[positive[::2]]
    mined = mine_hard_negatives(torch.from_numpy(text_emb), torch.from_numpy(item_emb), torch.from_numpy(positive), 8)
    want, scores = brute_force(text_emb, item_emb, [[p] for p in positive], 8)
    # Random Gaussian scores have no near-ties at float32 precision that could swap two neighbours.
    gaps = np.diff(-np.sort(-scores, axis=1)[:, :12], axis=1)
    assert -gaps.max() > 1e-6
    assert mined.dtype == torch.long and mined.shape == (60, 8)
    np.testing.assert_array_equal(mined.numpy(), want)
    assert not (mined == torch.from_numpy(positive)[:, None]).any()


def test_several_positives_per_text_are_all_excluded():
    rng = np.random.default_rng(1)
    text_emb, item_emb = normalised(rng, 20, 8), normalised(rng, 50, 8)
    top = np.argsort(-(text_emb @ item_emb.T), axis=1)
    # Each text's positives are among its own top items (the hardest case for exclusion); counts vary 1..3.
    positives = [top[q, : 1 + q % 3].tolist() for q in range(20)]
    mined = mine_hard_negatives(text_emb, item_emb, positives, 5)
    want, _ = brute_force(text_emb, item_emb, positives, 5)
    np.testing.assert_array_equal(mined.numpy(), want)
    for q in range(20):
        assert not set(mined[q].tolist()) & set(positives[q])


def test_keep_positives_gives_plain_top_k():
    rng = np.random.default_rng(2)
    text_emb, item_emb = normalised(rng, 10, 8), normalised(rng, 30, 8)
    positive = np.argmax(text_emb @ item_emb.T, axis=1)  # each positive is its text's best item
    mined = mine_hard_negatives(text_emb, item_emb, positive, 4, exclude_positives=False)
    np.testing.assert_array_equal(mined.numpy(), np.argsort(-(text_emb @ item_emb.T), axis=1)[:, :4])
    np.testing.assert_array_equal(mined[:, 0].numpy(), positive)


def test_small_gallery_pads_with_minus_one():
    rng = np.random.default_rng(3)
    text_emb, item_emb = normalised(rng, 4, 8), normalised(rng, 3, 8)
    positive = np.array([0, 1, 2, 0])
    mined = mine_hard_negatives(text_emb, item_emb, positive, 5)
    assert mined.shape == (4, 5)
    # 3 items minus the positive leave 2 negatives, then 3 padding slots.
    assert (mined[:, 2:] == -1).all()
    for q in range(4):
        assert sorted(mined[q, :2].tolist()) == sorted({0, 1, 2} - {int(positive[q])})
    want, _ = brute_force(text_emb, item_emb, [[p] for p in positive], 5)
    np.testing.assert_array_equal(mined.numpy(), want)


def test_query_batches_and_approximate_index_agree_with_exact():
    rng = np.random.default_rng(4)
    text_emb, item_emb = normalised(rng, 30, 8), normalised(rng, 100, 8)
    positive = rng.integers(0, 100, 30)
    exact = mine_hard_negatives(text_emb, item_emb, positive, 6)
    batched = mine_hard_negatives(text_emb, item_emb, positive, 6, query_batch=7)
    np.testing.assert_array_equal(batched.numpy(), exact.numpy())
    # HNSW with a beam larger than the gallery explores every node: it must find the exact lists.
    hnsw = mine_hard_negatives(text_emb, item_emb, positive, 6, index_kind="hnsw", index_params={"ef_search": 256})
    np.testing.assert_array_equal(hnsw.numpy(), exact.numpy())


def test_bad_inputs_are_refused():
    rng = np.random.default_rng(5)
    text_emb, item_emb = normalised(rng, 3, 8), normalised(rng, 5, 8)
    with pytest.raises(ValueError, match="one per text"):
        mine_hard_negatives(text_emb, item_emb, [0, 1], 2)
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        mine_hard_negatives(text_emb, item_emb, [0, 1, 5], 2)
    with pytest.raises(ValueError, match="share E"):
        mine_hard_negatives(text_emb, normalised(rng, 5, 4), [0, 1, 2], 2)
    with pytest.raises(ValueError, match="positive integer"):
        mine_hard_negatives(text_emb, item_emb, [0, 1, 2], 0)


def test_listwise_layout_and_mask():
    mined = torch.tensor([[4, 2, -1], [1, 3, 0], [-1, -1, -1]])
    positive = torch.tensor([7, 3, 5])
    cand, mask = listwise_candidates(mined, positive)
    # Row 1 mined its own positive (3): masked like padding. Padding slots hold the positive index.
    assert cand.tolist() == [[7, 4, 2, 7], [3, 1, 3, 0], [5, 5, 5, 5]]
    assert mask.tolist() == [
        [True, True, True, False],
        [True, True, False, True],
        [True, False, False, False],
    ]
    assert cand.dtype == torch.long and mask.dtype == torch.bool


def test_listwise_from_mined_has_positive_first_and_no_minus_one():
    rng = np.random.default_rng(6)
    text_emb, item_emb = normalised(rng, 5, 8), normalised(rng, 4, 8)
    positive = torch.tensor([0, 1, 2, 3, 0])
    mined = mine_hard_negatives(text_emb, item_emb, positive, 4)  # 3 negatives remain, 1 padding slot
    cand, mask = listwise_candidates(mined, positive)
    assert cand.shape == mask.shape == (5, 5)
    assert (cand[:, 0] == positive).all() and (cand >= 0).all()
    assert mask.sum(dim=1).tolist() == [4] * 5
    np.testing.assert_array_equal(cand[:, 1:][mask[:, 1:]].numpy(), mined[mined >= 0].numpy())


def test_inbatch_duplicate_items_are_masked_by_hand_example():
    mask = inbatch_candidates(torch.tensor([5, 7, 5, 9, 7]))
    assert mask.dtype == torch.bool
    assert mask.int().tolist() == [
        [1, 1, 0, 1, 0],  # item 5: keeps itself (col 0), first 7 (col 1), 9; drops its other copy (col 2)
        [1, 1, 0, 1, 0],  # item 7: first 5, itself, 9; drops the other 7 (col 4)
        [0, 1, 1, 1, 0],  # item 5 again: its positive is its own column 2, so the copy in col 0 is dropped
        [1, 1, 0, 1, 0],  # item 9: first 5, first 7, itself
        [1, 0, 0, 1, 1],  # item 7 again: first 5, 9, itself (col 4); drops col 1
    ]


def test_inbatch_properties_on_random_batch():
    item_index = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(0))
    mask = inbatch_candidates(item_index)
    n_unique = len(set(item_index.tolist()))
    assert mask.diagonal().all()
    assert (mask.sum(dim=1) == n_unique).all()
    for i in range(40):  # one kept column per distinct item in every row
        assert sorted(item_index[mask[i]].tolist()) == sorted(set(item_index.tolist()))
    assert inbatch_candidates(torch.arange(4)).all()  # no duplicates: every column is a candidate


# ---------------------------------------------------------------- swapped-word negatives


def test_swap_words_swaps_two_real_tokens_and_flags_what_cannot_be_swapped():
    from fastslow.mining import swap_words

    # BOS=2, EOS=3, PAD=0. Row 0: five words; row 1: one word (nothing to swap); row 2: two equal words.
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3, 0], [2, 10, 3, 0, 0, 0, 0, 0], [2, 15, 15, 3, 0, 0, 0, 0]])
    mask = (torch.arange(8)[None] < torch.tensor([7, 3, 4])[:, None]).long()
    out, valid = swap_words(ids, mask, 6, torch.Generator().manual_seed(0))
    assert out.shape == (3, 6, 8) and valid.shape == (3, 6)
    assert not valid[1].any() and not valid[2].any()
    for p in range(6):
        row = out[0, p]
        assert row[0] == 2 and row[6] == 3 and row[7] == 0  # BOS, EOS and padding stay
        changed = (row != ids[0]).nonzero().flatten().tolist()
        if valid[0, p]:
            assert len(changed) == 2 and row[changed[0]] == ids[0, changed[1]] and row[changed[1]] == ids[0, changed[0]]
        assert sorted(row[1:6].tolist()) == [10, 11, 12, 13, 14]  # a permutation of the same words
    kept = [tuple(out[0, p].tolist()) for p in range(6) if valid[0, p]]
    assert len(kept) == len(set(kept)) >= 4  # repeats are flagged, not kept twice
    again, _ = swap_words(ids, mask, 6, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)


def test_swappable_tokens_groups_words_by_role_and_swaps_stay_within_a_role():
    from fastslow.mining import swap_words, swappable_tokens

    # ids: 2 BOS, 3 EOS, 0 PAD; colours 10-12, shapes 20-22, "left"/"right" 30/31, "of" 32, "a" 40.
    colours, shapes = (10, 11, 12), (20, 21, 22)
    rows = []
    for i, c in enumerate(colours):
        for j, s in enumerate(shapes):
            c2, s2 = colours[(i + 1) % 3], shapes[(j + 2) % 3]
            rel = 30 + (i + j) % 2
            rows.append([2, 40, c, s, rel, 32, 40, c2, s2, 3])
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    sw = swappable_tokens(ids, mask, 50, threshold=0.6)
    assert torch.equal(sw, sw.T) and not sw.diagonal().any()
    assert sw[10, 11] and sw[11, 12] and sw[20, 22] and sw[30, 31]
    assert not sw[10, 20] and not sw[20, 30] and not sw[40, 10] and not sw[32, 40]
    out, valid = swap_words(ids, mask, 4, torch.Generator().manual_seed(0), sw)
    assert valid.any()
    for r, p in valid.nonzero().tolist():
        changed = (out[r, p] != ids[r]).nonzero().flatten().tolist()
        a, b = ids[r, changed[0]].item(), ids[r, changed[1]].item()
        assert sw[a, b], (a, b)  # every swap exchanges two words of one role
    # Without a role table, some swap mixes roles (e.g. a colour with "of").
    out, valid = swap_words(ids, mask, 8, torch.Generator().manual_seed(0))
    mixed = [(ids[r, c[0]].item(), ids[r, c[1]].item()) for r, p in valid.nonzero().tolist()
             for c in [(out[r, p] != ids[r]).nonzero().flatten().tolist()]]  # fmt: skip
    assert any(not sw[a, b] for a, b in mixed)
