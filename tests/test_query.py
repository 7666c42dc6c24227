"""Tests for fastslow.query: the fast rerank path against the plain one, the four modes of `Retriever.search`, the
refusal of artefacts that do not belong together, and the guard that gives a teacher that hurts no weight.

The world is built by tests/conftest.py: a tokenizer trained on a few captions, a tiny student and teacher (random
weights, seeded), a gallery of random pictures indexed with faiss and written to a token store, each artefact stamped
as `tools/build_index.py` stamps it. Teacher scores in the guard tests are given matrices: inputs, not mocks.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import MAX_LENGTH, N_ITEMS, REBUILD, SETTINGS, open_retriever

from fastslow.combiner import Combiner, tune_alpha
from fastslow.errors import QueryError, StaleArtefactError
from fastslow.evaluation import StoreTeacherScorer, encode_texts_student, tokenize
from fastslow.index import hash_ids, save_embeddings
from fastslow.query import FUSE_FILE, fuse_stamp, save_fuse_alphas, tune_fuse_alphas
from teachers import TokenStore

# The world (tokenizer, tiny student and teacher, an indexed gallery of pictures with its token store) is built by the
# `world` fixture of tests/conftest.py, shared with tests/test_service.py.
# Parity bound of the fast rerank path against the plain one: the same float32 operations in another grouping (one
# text per query broadcast to its k candidates instead of k copies); measured 0.0 on this model.
PARITY_ATOL = 1e-4


# ------------------------------------------------------------------------------------------- the fast rerank path


def test_fast_rerank_path_equals_the_plain_path(world):
    """One gather and one teacher call over each query's k candidates == every pair scored alone, read alone."""
    r = open_retriever(world)
    texts = world["queries"]
    g = torch.Generator().manual_seed(5)
    cand = torch.stack([torch.randperm(N_ITEMS, generator=g)[:6] for _ in texts])
    cand[0, :2] = cand[0, 2]  # one item twice in a query's list (the gather expands duplicates)
    fast = r.scorer.candidates(texts, cand)
    ids, mask = tokenize(world["tok"], texts, MAX_LENGTH)
    plain = torch.tensor(
        [
            [float(world["teacher"].score_pairs(r.store.get([int(i)]), ids[q : q + 1], mask[q : q + 1])) for i in row]
            for q, row in enumerate(cand)
        ]
    )
    assert (fast - plain).abs().max().item() <= PARITY_ATOL
    order = [torch.sort(x, dim=1, descending=True, stable=True).indices for x in (fast, plain)]
    assert torch.equal(*order)  # identical rankings
    # A query whose list came back short (-1: faiss's "no result") is scored on its real candidates only.
    ragged = cand.clone()
    ragged[1, 4:] = -1
    out = r.scorer.candidates(texts, ragged)
    assert torch.isnan(out[1, 4:]).all() and torch.allclose(out[1, :4], plain[1, :4], atol=PARITY_ATOL)


def test_rerank_mode_equals_the_combiner_over_the_plain_scorer(world):
    r = open_retriever(world)
    texts, k = world["queries"], 7
    plain = Combiner(
        lambda q: encode_texts_student(world["student"], world["tok"], q, max_length=MAX_LENGTH),
        r.index,
        StoreTeacherScorer(world["teacher"], TokenStore.open(world["dir"] / "tokens"), world["tok"], MAX_LENGTH),
        mode="slow",
        batch_size=4,
    ).rank(texts, k)
    got = r.search(texts, k, "rerank")
    assert torch.equal(got.ids, plain.ids)
    assert (got.scores - plain.scores).abs().max().item() <= PARITY_ATOL
    assert got.pairs_scored == plain.pairs_scored == len(texts) * k


def test_the_four_modes(world):
    r = open_retriever(world, alpha=0.0)
    texts, k = world["queries"], 5
    exact = r.encode(texts) @ torch.from_numpy(world["emb"]).T
    fast = r.search(texts, k, "fast")
    assert torch.equal(fast.ids, exact.topk(k, dim=1).indices) and fast.pairs_scored == 0
    assert torch.isnan(fast.teacher_scores).all()
    slow = r.search(texts, k, "slow")
    full = r.scorer.full(texts)
    assert torch.equal(slow.ids, full.topk(k, dim=1).indices) and slow.pairs_scored == len(texts) * N_ITEMS
    rerank = r.search(texts, k, "rerank")  # the teacher orders the student's top-k
    assert torch.equal(rerank.ids.sort(1).values, fast.ids.sort(1).values)
    assert torch.equal(rerank.ids, fast.ids.gather(1, full.gather(1, fast.ids).argsort(1, descending=True)))
    assert torch.equal(r.search(texts, k, "fuse").ids, fast.ids)  # alpha 0: the student's order
    assert torch.equal(open_retriever(world, alpha=1.0).search(texts, k, "fuse").ids, rerank.ids)
    assert set(rerank.timings) == {"encode", "index", "teacher", "total"}
    assert all(v >= 0 for v in rerank.timings.values())
    with pytest.raises(QueryError, match="mode='bogus'"):
        r.search(texts, k, "bogus")
    with pytest.raises(QueryError, match="empty"):
        r.search(["  "], k, "fast")
    with pytest.raises(QueryError, match="needs the teacher"):
        open_retriever(world, teacher=None).search(texts, k, "rerank")


# ----------------------------------------------------------------------------------- what must belong together


def copy_index(world, tmp_path):
    d = tmp_path / "index"
    shutil.copytree(world["dir"], d)
    return d


def restamp_tokens(d, **meta):
    info = json.loads((d / "tokens" / "meta.json").read_text())
    info["meta"].update(meta)
    (d / "tokens" / "meta.json").write_text(json.dumps(info))


def test_an_index_of_another_student_is_refused(world):
    with pytest.raises(StaleArtefactError) as err:
        open_retriever(world, student_hash="s2")
    msg = str(err.value)
    assert "student_hash: saved 's1', now 's2'" in msg and str(world["dir"]) in msg and REBUILD in msg


def test_an_index_built_at_another_image_size_is_refused(world):
    with pytest.raises(StaleArtefactError, match=r"data.image_size: saved 32, now 64") as err:
        open_retriever(world, settings={"data.image_size": 64})
    assert REBUILD in str(err.value)


def test_tokens_of_another_teacher_are_refused(world):
    with pytest.raises(StaleArtefactError) as err:
        open_retriever(world, teacher_hash="t2")
    msg = str(err.value)
    assert "teacher_hash: saved 't1', now 't2'" in msg and str(world["dir"] / "tokens") in msg and REBUILD in msg
    open_retriever(world, teacher=None, teacher_hash=None)  # the student alone opens no token store


def test_tokens_of_another_gallery_are_refused(world, tmp_path):
    d = copy_index(world, tmp_path)
    restamp_tokens(d, gallery_hash="0" * 16)  # the store of another gallery beside this index
    with pytest.raises(StaleArtefactError) as err:
        open_retriever(world, d)
    msg = str(err.value)
    assert f"gallery_hash: saved '{'0' * 16}', now '{hash_ids(world['ids'])}'" in msg
    assert str(d / "tokens") in msg and REBUILD in msg


def test_an_index_of_another_gallery_is_refused(world):
    with pytest.raises(StaleArtefactError, match="gallery_hash") as err:
        open_retriever(world, gallery_hash=hash_ids(world["ids"][:-1]))
    assert REBUILD in str(err.value)


def test_embeddings_of_another_student_are_refused(world, tmp_path):
    d = copy_index(world, tmp_path)
    save_embeddings(d, world["emb"], {"student_hash": "s2", "gallery_hash": hash_ids(world["ids"]), **SETTINGS})
    with pytest.raises(StaleArtefactError) as err:
        open_retriever(world, d).embeddings()
    assert "student_hash: saved 's2', now 's1'" in str(err.value) and "embeddings.npy" in str(err.value)


def fuse_file(world, d, tuned, **stamp_over):
    manifest = json.loads((d / "manifest.json").read_text())
    stamp = fuse_stamp(student_hash="s1", teacher_hash="t1", index_manifest=manifest, val_split="toy/val",
                       max_length=MAX_LENGTH)  # fmt: skip
    path = d.parent / "eval" / FUSE_FILE
    save_fuse_alphas(path, tuned, split="toy/val", stamp={**stamp, **stamp_over})
    return path


def test_fusion_weights_belong_to_their_index_and_k(world, tmp_path):
    d = copy_index(world, tmp_path)
    tuned = {k: {"alpha": a, "r1_student": 0.0, "r1_teacher": 0.0, "r1_fused": 0.0} for k, a in ((5, 0.0), (20, 1.0))}
    fix = "python tools/rerank_eval.py recipe=toy (it tunes the weights)"
    path = fuse_file(world, d, tuned)
    r = open_retriever(world, d, fuse_file=path, rebuild_fuse=fix)
    texts = world["queries"]
    assert r.alpha_for(5) == 0.0 and r.alpha_for(20) == 1.0  # each k its own weight
    assert torch.equal(r.search(texts, 5, "fuse").ids, r.search(texts, 5, "fast").ids)
    with pytest.raises(StaleArtefactError, match=r"tuned at k=\[5, 20\], not at k=10"):
        r.search(texts, 10, "fuse")
    # Tuned over another index (its gallery): refused, naming the file, the field and the command.
    path = fuse_file(world, d, tuned, index_gallery_hash="f" * 16)
    r = open_retriever(world, d, fuse_file=path, rebuild_fuse=fix)
    r.search(texts, 5, "rerank")  # a mode that does not fuse reads no weight
    with pytest.raises(StaleArtefactError) as err:
        r.search(texts, 5, "fuse")
    msg = str(err.value)
    assert "index_gallery_hash: saved 'ffffffffffffffff'" in msg and FUSE_FILE in msg and fix in msg
    assert open_retriever(world, d, fuse_file=path, alpha=0.3).alpha_for(5) == 0.3  # a given weight needs no file


# ------------------------------------------------------------------------------------- the guard on the weight


def worse_teacher(q: int = 40, k: int = 10):
    """Val candidates where the student is right for half the queries (its top-1) and the teacher never puts the
    positive first (teacher-only R@1 is 0), yet prefers it to the student's runner-ups: a little fusion keeps the
    student's R@1 and lifts the positives' mean rank, which the tie-break of an unguarded tuner rewards."""
    student = torch.linspace(1.0, 0.1, k).expand(q, k).clone()
    ids = torch.arange(q * k).view(q, k)
    teacher = torch.full((q, k), -1.0) + 0.01 * torch.arange(k).flip(0)
    right = torch.arange(q) % 2 == 0
    pos_col = torch.where(right, 0, 4)
    decoy = torch.where(right, 1, 0)  # the item the teacher prefers to the positive
    teacher[torch.arange(q), decoy] = 1.0
    teacher[torch.arange(q), pos_col] = 0.9
    return student, ids, teacher, ids[torch.arange(q), pos_col]


def test_a_teacher_worse_than_the_student_gets_weight_zero():
    student, ids, teacher, positives = worse_teacher()
    best, r1 = tune_alpha(student, ids, teacher, positives)
    assert r1[1.0] == 0.0 and r1[0.0] == 50.0  # the teacher alone is worse than the student alone
    assert best == 0.0
    unguarded, _ = tune_alpha(student, ids, teacher, positives, min_gain=None)
    assert unguarded > 0.0 and r1[unguarded] == r1[0.0]  # what the guard prevents: a weight for a tie
    tuned = tune_fuse_alphas(student, ids, teacher, positives, ks=[5, 10, 50])
    assert {k: t["alpha"] for k, t in tuned.items()} == {5: 0.0, 10: 0.0, 50: 0.0}
    assert tuned[10]["r1_student"] == 50.0 and tuned[10]["r1_teacher"] == 0.0


def test_a_teacher_that_helps_keeps_its_weight_and_min_gain_is_the_bar():
    g = torch.Generator().manual_seed(2)
    student = torch.sort(torch.rand(40, 10, generator=g), dim=1, descending=True).values
    ids = torch.stack([torch.randperm(100, generator=g)[:10] for _ in range(40)])
    teacher = torch.randn(40, 10, generator=g)
    positives = ids.gather(1, teacher.argmax(1, keepdim=True))[:, 0]  # the teacher is always right
    best, r1 = tune_alpha(student, ids, teacher, positives)
    assert best > 0.0 and r1[best] > r1[0.0]
    # A bar at the gain the teacher brings turns it off: it must beat the student alone by more.
    assert tune_alpha(student, ids, teacher, positives, min_gain=r1[best] - r1[0.0])[0] == 0.0


# ------------------------------------------------------------------------------------------------ the benchmark


@pytest.mark.slow
def test_query_scaling_benchmark_writes_the_issue_schema(tmp_path):
    """benchmarks/query_scaling.py on the smoke recipe at two tiny sizes: the rows hold exactly the issue's keys, and
    slow is measured at the first size and extrapolated (and said so) at the second."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = ["recipe=smoke", f"output_dir={tmp_path}", "galleries=40,80", "ks=2,5", "queries=4", "warmup=1",
            "slow_max=40", "slow_queries=2", "slow_batch_items=40", "batch=4"]  # fmt: skip
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "query_scaling.py"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench" / "query_scaling.json").read_text())["rows"]
    keys = {"gallery", "method", "latency_ms_p50", "latency_ms_p95", "queries_per_s_batch64", "speedup_vs_slow",
            "slow_extrapolated", "t2v_R@1"}  # fmt: skip
    assert all(set(r) == keys for r in rows)
    assert {(r["gallery"], r["method"]) for r in rows} == {
        (n, m) for n in (40, 80) for m in ("fast", "fast+slow@2", "fast+slow@5", "slow")
    }
    slow = {r["gallery"]: r for r in rows if r["method"] == "slow"}
    assert slow[40]["slow_extrapolated"] is False and slow[80]["slow_extrapolated"] is True
    assert all(r["speedup_vs_slow"] == 1.0 for r in slow.values())
    assert all(r["t2v_R@1"] is None for r in rows)  # random weights on synthetic galleries: nothing to measure
    assert "| gallery | index | method |" in proc.stdout and "slow (extrapolated)" in proc.stdout
