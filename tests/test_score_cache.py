"""Tests for fastslow.score_cache: round trip, compute-once, reuse across objects, stamps, interrupted writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fastslow.score_cache import CacheMismatchError, TeacherScoreCache, hash_dataset

N_ITEMS = 50
STAMP = {"teacher_hash": "teach-abc", "source": "mined:k=4:round=0:student=s0", "dataset_hash": "data-123"}


def formula(t, i):
    """The stand-in teacher: a deterministic score per pair (numpy or torch in, same kind out)."""
    if isinstance(t, torch.Tensor):
        return torch.sin(t.double() * 31 + i.double()).float()
    return np.sin(t * 31.0 + i).astype(np.float32)


class CountingTeacher:
    """Calls ``formula`` and records every pair it was asked for."""

    def __init__(self):
        self.pairs: list[tuple[int, int]] = []
        self.calls = 0

    def __call__(self, t, i):
        self.calls += 1
        self.pairs += list(zip(np.asarray(t).tolist(), np.asarray(i).tolist()))
        return formula(t, i)


def open_cache(path, **kw):
    return TeacherScoreCache(path, **{**STAMP, "n_items": N_ITEMS, **kw})


def random_pairs(seed, n, n_texts=40):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_texts, n), rng.integers(0, N_ITEMS, n)


def test_add_lookup_round_trip(tmp_path):
    cache = open_cache(tmp_path)
    t, i = random_pairs(0, 300)
    unique = len(set(zip(t.tolist(), i.tolist())))
    assert cache.add(t, i, formula(t, i)) == unique
    assert len(cache) == unique
    scores, found = cache.lookup(t, i)
    assert found.all() and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, formula(t, i))
    # Torch in, torch out.
    scores_t, found_t = cache.lookup(torch.from_numpy(t), torch.from_numpy(i))
    assert isinstance(scores_t, torch.Tensor) and scores_t.dtype == torch.float32 and bool(found_t.all())
    np.testing.assert_array_equal(scores_t.numpy(), formula(t, i))


def test_absent_pairs_are_not_found(tmp_path):
    cache = open_cache(tmp_path)
    empty_scores, empty_found = cache.lookup(np.array([0, 1]), np.array([0, 1]))
    assert not empty_found.any() and (empty_scores == 0).all()
    cache.add([3, 3, 5], [7, 8, 9], [0.5, -1.0, 2.0])
    scores, found = cache.lookup([3, 3, 3, 5, 0, 49], [7, 8, 9, 9, 0, 49])
    np.testing.assert_array_equal(found, [True, True, False, True, False, False])
    np.testing.assert_array_equal(scores, np.array([0.5, -1.0, 0.0, 2.0, 0.0, 0.0], np.float32))


def test_add_dedups_and_keeps_cached_scores(tmp_path):
    cache = open_cache(tmp_path)
    assert cache.add([1, 1, 2], [4, 4, 5], [10.0, 99.0, 20.0]) == 2  # repeated pair: first occurrence wins
    assert cache.add([1, 2, 3], [4, 5, 6], [-1.0, -1.0, 30.0]) == 1  # only (3, 6) is new
    assert cache.add([1], [4], [7.0]) == 0 and cache.n_shards == 2  # nothing new: no empty shard
    scores, found = cache.lookup([1, 2, 3], [4, 5, 6])
    assert found.all()
    np.testing.assert_array_equal(scores, [10.0, 20.0, 30.0])
    assert len(cache) == 3


def test_get_or_compute_computes_only_missing_pairs_once(tmp_path):
    cache = open_cache(tmp_path)
    cache.add([0, 0], [0, 1], formula(np.array([0, 0]), np.array([0, 1])))
    # Pairs with repeats and two already cached ones.
    t = np.array([0, 0, 2, 2, 2, 7, 0])
    i = np.array([0, 1, 3, 3, 4, 9, 1])
    teacher = CountingTeacher()
    scores = cache.get_or_compute(t, i, teacher, chunk=2)
    np.testing.assert_array_equal(scores, formula(t, i))
    assert sorted(teacher.pairs) == [(2, 3), (2, 4), (7, 9)]  # unique missing pairs only, each once
    assert teacher.calls == 2  # 3 pairs in chunks of 2
    assert len(cache) == 5

    again = CountingTeacher()
    np.testing.assert_array_equal(cache.get_or_compute(t, i, again), formula(t, i))
    assert again.calls == 0 and again.pairs == []


def test_get_or_compute_with_torch_indices(tmp_path):
    cache = open_cache(tmp_path)
    t, i = (torch.from_numpy(a) for a in random_pairs(1, 200))
    seen_types = []

    def teacher(tt, ii):
        seen_types.append((type(tt), tt.dtype))
        return formula(tt, ii)

    scores = cache.get_or_compute(t, i, teacher)
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and scores.shape == (200,)
    torch.testing.assert_close(scores, formula(t, i), rtol=0, atol=0)
    assert seen_types == [(torch.Tensor, torch.int64)]


def test_reopen_reuses_scores(tmp_path):
    t, i = random_pairs(2, 500)
    first = open_cache(tmp_path)
    first.get_or_compute(t, i, formula, chunk=128)
    n = len(first)

    teacher = CountingTeacher()
    reopened = TeacherScoreCache(tmp_path, **STAMP, create=False)  # n_items comes from the manifest
    assert reopened.n_items == N_ITEMS and len(reopened) == n
    np.testing.assert_array_equal(reopened.get_or_compute(t, i, teacher), formula(t, i))
    assert teacher.calls == 0


def test_other_process_shards_visible_after_refresh(tmp_path):
    main = open_cache(tmp_path, rank=0)
    other = open_cache(tmp_path, rank=1)
    other.add([5], [6], [1.5])
    assert not main.lookup([5], [6])[1][0]  # not yet seen
    main.refresh()
    scores, found = main.lookup([5], [6])
    assert found[0] and scores[0] == 1.5
    # Both ranks store the same pair: lookups agree and __len__ counts it once.
    main.add([5, 8], [6, 1], [1.5, 2.5])
    other.add([8], [1], [2.5])
    main.refresh()
    assert main.n_shards == 3 and len(main) == 2
    assert any(name.startswith("shard_r001-") for name in os.listdir(tmp_path))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("teacher_hash", "teach-def", "computed by teacher teach-abc, but the current teacher is teach-def"),
        ("source", "inbatch:seed=0:bs=64", "candidate source 'mined:k=4:round=0:student=s0'"),
        ("dataset_hash", "data-999", "dataset data-123"),
        ("n_items", N_ITEMS + 1, f"n_items={N_ITEMS}"),
    ],
)
def test_mismatched_stamp_is_refused(tmp_path, field, value, expected):
    cache = open_cache(tmp_path)
    cache.add([1], [2], [3.0])
    with pytest.raises(CacheMismatchError) as err:
        open_cache(tmp_path, **{field: value})
    message = str(err.value)
    assert expected in message and str(value) in message
    assert f"delete {tmp_path} or point loss.cache_dir elsewhere" in message
    # Nothing was overwritten: the right stamp still opens the scores.
    assert open_cache(tmp_path).lookup([1], [2])[1][0]


def test_refuses_foreign_directory_and_missing_cache(tmp_path):
    (tmp_path / "notes.txt").write_text("not a cache")
    with pytest.raises(CacheMismatchError, match="has no manifest.json"):
        open_cache(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_cache(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


def test_format_version_mismatch_is_refused(tmp_path):
    open_cache(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["version"] = 999
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="version 999"):
        open_cache(tmp_path)


def test_interrupted_writes_are_ignored(tmp_path):
    cache = open_cache(tmp_path)
    cache.add([1, 2], [3, 4], [0.25, 0.5])
    # A crash mid-write leaves a temporary file; a crash before the commit record leaves a record-less shard.
    (tmp_path / ".tmp-keys_r000-000009-deadbeef.npy.123.abcd").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "keys_r000-000010-feedface.npy", np.array([1 * N_ITEMS + 9, 7 * N_ITEMS + 7], np.int64))
    np.save(tmp_path / "scores_r000-000010-feedface.npy", np.array([9.0, 9.0], np.float32))

    reopened = open_cache(tmp_path)
    assert len(reopened) == 2 and reopened.n_shards == 1
    scores, found = reopened.lookup([1, 2, 1, 7], [3, 4, 9, 7])
    np.testing.assert_array_equal(found, [True, True, False, False])
    np.testing.assert_array_equal(scores[:2], [0.25, 0.5])
    # Writing after the crash works, and the orphan pair is computed, not read from the orphan shard.
    teacher = CountingTeacher()
    np.testing.assert_array_equal(reopened.get_or_compute([1], [9], teacher), formula(np.array([1]), np.array([9])))
    assert teacher.pairs == [(1, 9)]


def test_compact_merges_and_survives_leftover_replaced_records(tmp_path):
    cache = open_cache(tmp_path, auto_compact=None)
    t, i = random_pairs(3, 400)
    for part in np.array_split(np.arange(400), 8):
        cache.add(t[part], i[part], formula(t[part], i[part]))
    n, shards_before = len(cache), cache.n_shards
    assert shards_before == 8
    old_records = sorted(p.name for p in tmp_path.glob("shard_*.json"))
    saved = {name: (tmp_path / name).read_text() for name in old_records[:2]}
    cache.compact()
    assert cache.n_shards == 1 and len(cache) == n
    assert len(list(tmp_path.glob("*.npy"))) == 2  # the old shards' files are deleted

    # A crash between writing the merged record and deleting the old ones leaves old records behind: they are
    # replaced, so they neither double-count nor resurrect (even when their .npy files are gone).
    for name, text in saved.items():
        (tmp_path / name).write_text(text)
    reopened = open_cache(tmp_path)
    assert reopened.n_shards == 1 and len(reopened) == n
    np.testing.assert_array_equal(reopened.lookup(t, i)[0], formula(t, i))
    reopened.add([100], [49], [1.0])  # text 100 is outside random_pairs' range: a new pair
    reopened.compact()
    assert len(list(tmp_path.glob("shard_*.json"))) == 1 and len(list(tmp_path.glob("*.npy"))) == 2
    assert len(open_cache(tmp_path)) == n + 1


def test_auto_compact_bounds_shard_count(tmp_path):
    cache = open_cache(tmp_path, auto_compact=3)
    for text in range(6):
        cache.add([text], [0], [float(text)])
        assert cache.n_shards <= 3
    assert len(cache) == 6
    np.testing.assert_array_equal(cache.lookup(np.arange(6), np.zeros(6, np.int64))[0], np.arange(6))


def test_large_vectorised_lookup_matches_dict(tmp_path):
    n_items = 1000
    rng = np.random.default_rng(4)
    cache = TeacherScoreCache(tmp_path, **STAMP, n_items=n_items, auto_compact=None)
    reference = {}
    for _ in range(4):  # several shards, with overlapping pairs between calls
        t, i = rng.integers(0, 2000, 50_000), rng.integers(0, n_items, 50_000)
        s = rng.standard_normal(50_000).astype(np.float32)
        cache.add(t, i, s)
        for key, value in zip((t * n_items + i).tolist(), s.tolist()):
            reference.setdefault(key, value)  # first write wins, as in add
    assert len(cache) == len(reference)
    tq, iq = rng.integers(0, 2200, 100_000), rng.integers(0, n_items, 100_000)
    scores, found = cache.lookup(tq, iq)
    keys = (tq * n_items + iq).tolist()
    want_found = np.array([k in reference for k in keys])
    want_scores = np.array([reference.get(k, 0.0) for k in keys], np.float32)
    assert 0.05 < want_found.mean() < 0.95  # the query mixes hits and misses
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(scores, want_scores)


def test_rejects_bad_inputs(tmp_path):
    cache = open_cache(tmp_path)
    with pytest.raises(ValueError, match=r"item_idx must be in \[0, 50\)"):
        cache.lookup([0], [N_ITEMS])
    with pytest.raises(ValueError, match="same shape"):
        cache.lookup([0, 1], [0])
    with pytest.raises(TypeError, match="integers"):
        cache.lookup(torch.tensor([0.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="non-finite"):
        cache.add([0], [0], [float("nan")])
    with pytest.raises(ValueError, match="shape"):
        cache.get_or_compute([0, 1], [0, 1], lambda t, i: np.zeros(1, np.float32))
    assert len(cache) == 0


def test_hash_dataset_depends_on_order_and_content():
    base = hash_dataset(["a dog", "a cat"], ["1.jpg", "2.jpg"])
    assert base == hash_dataset(["a dog", "a cat"], ["1.jpg", "2.jpg"])
    assert base != hash_dataset(["a cat", "a dog"], ["1.jpg", "2.jpg"])
    assert base != hash_dataset(["a dog", "a cat"], ["2.jpg", "1.jpg"])
    # The caption/item boundary is part of the hash.
    assert hash_dataset(["a", "b"], ["c"]) != hash_dataset(["a"], ["b", "c"])
