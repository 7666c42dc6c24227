"""Tests for fastslow.score_cache: exact round trip, compute-once, reuse across objects and processes, stamps,
unreadable files, interrupted writes, and two processes writing and reading one cache at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3

import numpy as np
import pytest
import torch

from fastslow.errors import UserError
from fastslow.score_cache import DB_FILE, FORMAT_VERSION, CacheMismatchError, TeacherScoreCache, hash_dataset

N_ITEMS = 50
STAMP = {"teacher_hash": "teach-abc", "source": "mined:k=4:round=0:student=s0", "dataset_hash": "data-123"}


def formula(t, i):
    """The stand-in teacher: a deterministic score per pair (numpy or torch in, same kind out)."""
    if isinstance(t, torch.Tensor):
        return torch.sin(t.double() * 31 + i.double()).float()
    return np.sin(np.asarray(t) * 31.0 + np.asarray(i)).astype(np.float32)


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
    assert f"pairs={unique}" in repr(cache)


def test_scores_come_back_bit_for_bit(tmp_path):
    # Random bit patterns cover every exponent (subnormals included), plus the edges of the float32 range.
    bits = np.random.default_rng(5).integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    edges = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1e-45, 1.0,
                      -2.0, 0.1, 1 / 3], np.float32)  # fmt: skip
    values = np.concatenate([values[np.isfinite(values) & (bits != 0x80000000)], edges])  # -0.0: below
    t, i = np.arange(values.size) // N_ITEMS, np.arange(values.size) % N_ITEMS
    cache = open_cache(tmp_path)
    cache.add(t, i, values)
    cache.close()
    scores, found = open_cache(tmp_path).lookup(t, i)  # from disk, not from anything this object kept
    assert found.all() and scores.dtype == np.float32
    np.testing.assert_array_equal(scores.view(np.uint32), values.view(np.uint32))
    # -0.0 is the one exception (SQLite stores it as the integer 0): it comes back as +0.0, the same value.
    cache.add([t[-1] + 1], [0], np.array([-0.0], np.float32))
    got = cache.lookup([t[-1] + 1], [0])[0]
    assert got[0] == 0.0 and got.view(np.uint32)[0] == 0


def test_absent_pairs_are_not_found(tmp_path):
    cache = open_cache(tmp_path)
    empty_scores, empty_found = cache.lookup(np.array([0, 1]), np.array([0, 1]))
    assert not empty_found.any() and (empty_scores == 0).all()
    assert cache.lookup([], [])[0].shape == (0,)
    cache.add([3, 3, 5], [7, 8, 9], [0.5, -1.0, 2.0])
    scores, found = cache.lookup([3, 3, 3, 5, 0, 49, 5], [7, 8, 9, 9, 0, 49, 9])
    np.testing.assert_array_equal(found, [True, True, False, True, False, False, True])
    np.testing.assert_array_equal(scores, np.array([0.5, -1.0, 0.0, 2.0, 0.0, 0.0, 2.0], np.float32))


def test_add_dedups_and_keeps_cached_scores(tmp_path):
    cache = open_cache(tmp_path)
    assert cache.add([1, 1, 2], [4, 4, 5], [10.0, 99.0, 20.0]) == 2  # repeated pair: first occurrence wins
    assert cache.add([1, 2, 3], [4, 5, 6], [-1.0, -1.0, 30.0]) == 1  # only (3, 6) is new
    assert cache.add([1], [4], [7.0]) == 0
    assert cache.add([], [], []) == 0
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
    first.close()

    teacher = CountingTeacher()
    reopened = TeacherScoreCache(tmp_path, **STAMP, create=False)  # n_items comes from the stamp
    assert reopened.n_items == N_ITEMS and len(reopened) == n
    np.testing.assert_array_equal(reopened.get_or_compute(t, i, teacher), formula(t, i))
    assert teacher.calls == 0


def test_two_open_caches_see_each_others_writes_at_once(tmp_path):
    main, other = open_cache(tmp_path), open_cache(tmp_path)
    other.add([5], [6], [1.5])
    scores, found = main.lookup([5], [6])  # no refresh step: a committed write is visible to every reader
    assert found[0] and scores[0] == 1.5
    # Both store the same pair: it is stored once.
    assert main.add([5, 8], [6, 1], [1.5, 2.5]) == 1
    assert other.add([8], [1], [2.5]) == 0
    assert len(main) == len(other) == 2


def test_files_and_memory_maps_stay_bounded_over_many_steps(tmp_path):
    # The scenario: 600 steps of one write and one read each, with a second object (another rank) open.
    cache, other = open_cache(tmp_path), open_cache(tmp_path)
    for step in range(600):
        t, i = np.full(8, step), np.arange(8)
        (cache if step % 2 else other).add(t, i, formula(t, i))
        assert cache.lookup(t, i)[1].all()
    assert len(other) == 600 * 8
    assert sorted(os.listdir(tmp_path)) == [DB_FILE, f"{DB_FILE}-shm", f"{DB_FILE}-wal"]
    if os.path.exists("/proc/self/maps"):  # Linux: the shared-memory index, once per connection, and nothing else
        with open("/proc/self/maps") as f:
            maps = [line.split()[-1] for line in f if str(tmp_path) in line]
        assert len(maps) <= 2, maps
    cache.close()
    other.close()
    assert os.listdir(tmp_path) == [DB_FILE]  # the last connection out folds the log back into the database


def test_interrupted_get_or_compute_keeps_the_committed_chunks(tmp_path):
    cache = open_cache(tmp_path)
    t, i = np.array([1, 2, 3, 4]), np.array([0, 0, 0, 0])
    calls = []

    def failing_teacher(tt, ii):
        calls.append(len(tt))
        if len(calls) == 2:
            raise RuntimeError("out of memory")  # the second chunk dies mid-call
        return formula(tt, ii)

    with pytest.raises(RuntimeError, match="out of memory"):
        cache.get_or_compute(t, i, failing_teacher, chunk=2)
    np.testing.assert_array_equal(cache.lookup(t, i)[1], [True, True, False, False])
    teacher = CountingTeacher()
    np.testing.assert_array_equal(open_cache(tmp_path).get_or_compute(t, i, teacher), formula(t, i))
    assert teacher.pairs == [(3, 0), (4, 0)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("teacher_hash", "teach-def"),
        ("source", "inbatch:seed=0:bs=64"),
        ("dataset_hash", "data-999"),
        ("n_items", N_ITEMS + 1),
        ("tokenizer_hash", "tok-999"),
        ("max_length", 33),
        ("data.image_size", 64),
    ],
)
def test_mismatched_stamp_is_refused(tmp_path, field, value):
    stamp = {"tokenizer_hash": "tok-1", "max_length": 32}
    settings = {"data.image_size": 32}
    cache = open_cache(tmp_path, **stamp, settings=settings)
    cache.add([1], [2], [3.0])
    with pytest.raises(CacheMismatchError) as err:
        if field in settings:
            open_cache(tmp_path, **stamp, settings={field: value})
        else:
            open_cache(tmp_path, **{**stamp, field: value}, settings=settings)
    message = str(err.value)
    old = {**STAMP, "n_items": N_ITEMS, **stamp, **settings}[field]
    assert f"{field}: saved {old!r}, now {value!r}" in message and list(err.value.differences) == [field]
    assert f"delete {tmp_path}" in message and "tools/distill.py" in message
    assert isinstance(err.value, UserError)
    # Nothing was overwritten: the right stamp still opens the scores.
    assert open_cache(tmp_path, **stamp, settings=settings).lookup([1], [2])[1][0]


def test_unknown_tokenizer_stamp_is_refused_by_a_run_that_knows_it(tmp_path):
    open_cache(tmp_path)  # an older caller: no tokenizer_hash, no max_length
    assert open_cache(tmp_path).n_items == N_ITEMS
    with pytest.raises(CacheMismatchError, match="tokenizer_hash: saved None, now 't'"):
        open_cache(tmp_path, tokenizer_hash="t")


def test_refuses_foreign_directory_old_format_and_missing_cache(tmp_path):
    (tmp_path / "notes.txt").write_text("not a cache")
    with pytest.raises(CacheMismatchError, match=f"has no {DB_FILE}"):
        open_cache(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "fastslow.teacher_score_cache", "version": 1}))
    with pytest.raises(CacheMismatchError, match=f"old sharded format.*delete {old}"):
        open_cache(old)
    with pytest.raises(FileNotFoundError):
        open_cache(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()
    with pytest.raises(ValueError, match="n_items must be a positive int"):
        TeacherScoreCache(tmp_path / "new", **STAMP)


def test_format_version_mismatch_is_refused(tmp_path):
    open_cache(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'version'")
    conn.close()
    with pytest.raises(CacheMismatchError, match=f"version: saved 999, now {FORMAT_VERSION}"):
        open_cache(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_database_names_the_file_and_the_fix(tmp_path, damage):
    path = tmp_path / DB_FILE
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(6).bytes(8192))
    else:
        cache = open_cache(tmp_path)
        t, i = random_pairs(7, 20_000, n_texts=2_000)
        cache.add(t, i, formula(t, i))
        cache.close()  # folds the log into the database file
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    before = path.read_bytes()
    with pytest.raises(UserError) as err:
        cache = open_cache(tmp_path)
        cache.lookup(*random_pairs(7, 20_000, n_texts=2_000))  # in case the damage only shows on reading
    message = str(err.value)
    assert message.startswith(f"file {path}: not a readable SQLite database") and "delete it" in message
    assert not isinstance(err.value, CacheMismatchError) and isinstance(err.value.__cause__, sqlite3.DatabaseError)
    assert path.read_bytes() == before  # the damaged file is left for the user to look at


def test_large_vectorised_lookup_matches_dict(tmp_path):
    n_items = 1000
    rng = np.random.default_rng(4)
    cache = TeacherScoreCache(tmp_path, **STAMP, n_items=n_items)
    reference = {}
    for _ in range(4):  # several writes, with overlapping pairs between calls
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


# ------------------------------------------------------------------------------------------- several processes

MP_STEPS, MP_SYNC, MP_WIDTH = 300, 50, 16  # steps per process, steps between barriers, pairs per step and kind


def _own_pairs(rank, step):
    """The pairs only ``rank`` writes at ``step`` (disjoint between the processes)."""
    return np.full(MP_WIDTH, rank * MP_STEPS + step), np.arange(MP_WIDTH)


def _shared_pairs(step):
    """The pairs both processes write at ``step``."""
    return np.full(MP_WIDTH, 2 * MP_STEPS + step), np.arange(MP_WIDTH, 2 * MP_WIDTH)


def _rank_worker(directory, rank, barrier, errors):
    """One rank of a run: per step, store its own and the shared pairs and read the other rank's (module level so
    that a 'spawn' child can import it)."""
    try:
        barrier.wait()  # both open (and so create the schema) at the same moment
        cache = open_cache(directory)
        other, seen = 1 - rank, 0
        for step in range(MP_STEPS):
            t, i = _own_pairs(rank, step)
            if step % 2:
                assert cache.add(t, i, formula(t, i)) == MP_WIDTH
            else:
                np.testing.assert_array_equal(cache.get_or_compute(t, i, formula), formula(t, i))
            t, i = _shared_pairs(step)
            np.testing.assert_array_equal(cache.get_or_compute(t, i, formula), formula(t, i))
            # Whatever of the other rank's pairs is visible already must be right.
            t, i = _own_pairs(other, step)
            scores, found = cache.lookup(t, i)
            np.testing.assert_array_equal(scores[found], formula(t, i)[found])
            seen += int(found.sum())
            if (step + 1) % MP_SYNC == 0:
                barrier.wait()  # both ranks are past this step: each must see all the other wrote so far
                t, i = (np.concatenate(a) for a in zip(*(_own_pairs(other, s) for s in range(step + 1))))
                scores, found = cache.lookup(t, i)
                assert found.all(), f"rank {rank} misses {int((~found).sum())} pairs of rank {other} at step {step}"
                np.testing.assert_array_equal(scores, formula(t, i))
        cache.close()
        errors.put((rank, None, seen))
    except BaseException as e:  # reported to the test, which fails with it
        errors.put((rank, f"{type(e).__name__}: {e}", 0))
        barrier.abort()


@pytest.mark.slow
def test_two_processes_write_and_read_one_cache(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(2, timeout=300), ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(tmp_path, rank, barrier, errors)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = [errors.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [err for _, err, _ in results if err] == []
    assert [p.exitcode for p in procs] == [0, 0]

    files = sorted(os.listdir(tmp_path))
    assert files[0] == DB_FILE and len(files) <= 3, files  # the database and at most its -wal and -shm
    cache = open_cache(tmp_path)
    pairs = [_own_pairs(rank, s) for rank in (0, 1) for s in range(MP_STEPS)] + [
        _shared_pairs(s) for s in range(MP_STEPS)
    ]
    t, i = (np.concatenate(a) for a in zip(*pairs))
    scores, found = cache.lookup(t, i)
    assert found.all() and len(cache) == 3 * MP_STEPS * MP_WIDTH  # the shared pairs are stored once
    np.testing.assert_array_equal(scores.view(np.uint32), formula(t, i).view(np.uint32))
