"""Tests for fastslow.combiner: hand-computed reranking and fusion, the batched teacher call, adaptive depth, and the
Combiner over a real faiss index (teacher scores come from random matrices: inputs, not mocks)."""

import math

import pytest
import torch

from fastslow.combiner import Combiner, Hit, adaptive_k, masked_zscore, rerank, tune_alpha
from fastslow.index import build_index

# Q = 2 queries, k = 3 candidates each, sorted by the student.
STUDENT = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, 0.1]])
IDS = torch.tensor([[10, 11, 12], [20, 21, 22]])
TEACHER = {(0, 10): -2.0, (0, 11): -1.0, (0, 12): -3.0, (1, 20): -0.5, (1, 21): -0.4, (1, 22): -0.6}
R = math.sqrt(1.5)  # 1.2247..: z of +-1 deviation among (-1, 0, +1), population std sqrt(2/3)
# Row 1 of the student: mean 0.4, deviations (.2, .1, -.3), population std sqrt(0.14 / 3).
S1 = math.sqrt(0.14 / 3)
Z_STUDENT = [[R, 0.0, -R], [0.2 / S1, 0.1 / S1, -0.3 / S1]]
Z_TEACHER = [[0.0, R, -R], [0.0, R, -R]]  # in the candidates' student order


def counting_teacher(table):
    """A teacher_score_fn reading a table, recording every call's pairs."""
    calls = []

    def score(query_idx, item_ids):
        calls.append(list(zip(query_idx.tolist(), item_ids.tolist())))
        return torch.tensor([table[(q, i)] for q, i in calls[-1]])

    return score, calls


def test_masked_zscore_by_hand():
    z = masked_zscore(STUDENT, torch.ones(2, 3, dtype=torch.bool))
    assert torch.allclose(z, torch.tensor(Z_STUDENT), atol=1e-5)
    # Masked entries neither count in the statistics nor receive a value; one entry has std 0 -> floored -> 0.
    mask = torch.tensor([[True, True, False], [True, False, False]])
    z = masked_zscore(torch.tensor([[1.0, 3.0, -torch.inf], [5.0, torch.nan, 0.0]]), mask)
    assert z.tolist() == [[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_slow_mode_reorders_by_teacher_score():
    fn, calls = counting_teacher(TEACHER)
    out = rerank(STUDENT, IDS, fn, mode="slow")
    assert out.ids.tolist() == [[11, 10, 12], [21, 20, 22]]
    assert torch.allclose(out.scores, torch.tensor([[-1.0, -2.0, -3.0], [-0.4, -0.5, -0.6]]))
    assert out.teacher_scores.tolist() == out.scores.tolist()
    assert torch.allclose(out.student_scores, torch.tensor([[0.8, 0.9, 0.7], [0.5, 0.6, 0.1]]))
    assert len(calls) == 1 and len(calls[0]) == 6 and out.pairs_scored == 6
    assert calls[0] == [(0, 10), (0, 11), (0, 12), (1, 20), (1, 21), (1, 22)]


def test_fuse_by_hand():
    fn, _ = counting_teacher(TEACHER)
    alpha = 0.75
    out = rerank(STUDENT, IDS, fn, mode="fuse", alpha=alpha)
    fused = [[alpha * t + (1 - alpha) * s for t, s in zip(tr, sr)] for tr, sr in zip(Z_TEACHER, Z_STUDENT)]
    # Row 0: fused = (0.306, 0.919, -1.225) -> 11, 10, 12. Row 1: (0.231, 1.034, -1.266) -> 21, 20, 22.
    assert out.ids.tolist() == [[11, 10, 12], [21, 20, 22]]
    expected = [[fused[0][1], fused[0][0], fused[0][2]], [fused[1][1], fused[1][0], fused[1][2]]]
    assert torch.allclose(out.scores, torch.tensor(expected), atol=1e-5)


def test_fuse_ties_keep_the_student_order():
    # Integer scores make the tie exact: student (3, 2, 1) and teacher (2, 3, 1) give z_S = (R, 0, -R) and
    # z_T = (0, R, -R), so at alpha = 0.5 the first two candidates both fuse to R / 2: the student's order decides.
    student = torch.tensor([[3.0, 2.0, 1.0]])
    for ids in ([7, 8, 9], [8, 7, 9]):
        table = {ids[0]: 2.0, ids[1]: 3.0, ids[2]: 1.0}
        out = rerank(student, torch.tensor([ids]), lambda q, i, t=table: torch.tensor([t[x] for x in i.tolist()]))
        assert out.ids.tolist() == [[ids[1], ids[0], ids[2]]]  # slow (the default mode) follows the teacher
        out = rerank(
            student, torch.tensor([ids]), lambda q, i, t=table: torch.tensor([t[x] for x in i.tolist()]), mode="fuse"
        )
        assert out.ids.tolist() == [ids]
        assert out.scores[0, 0].item() == out.scores[0, 1].item() == pytest.approx(R / 2)


def test_fuse_endpoints_equal_student_and_slow():
    g = torch.Generator().manual_seed(0)
    student = torch.sort(torch.rand(5, 8, generator=g), dim=1, descending=True).values
    ids = torch.randperm(40, generator=g).reshape(5, 8)
    table = torch.randn(5, 40, generator=g)
    fn = lambda q, i: table[q, i]
    assert torch.equal(rerank(student, ids, fn, mode="fuse", alpha=0.0).ids, ids)
    assert torch.equal(rerank(student, ids, fn, mode="fuse", alpha=1.0).ids, rerank(student, ids, fn, mode="slow").ids)


def test_teacher_called_once_for_all_pairs():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(7, 50, generator=g)
    n_pairs = []

    def fn(q, i):
        n_pairs.append(len(q))
        return table[q, i]

    rerank(torch.rand(7, 9, generator=g), torch.randint(0, 50, (7, 9), generator=g), fn, mode="fuse")
    assert n_pairs == [7 * 9]


def test_adaptive_depth():
    scale = 10.0
    student = torch.tensor([[0.9, 0.5, 0.4], [0.6, 0.55, 0.1]])  # logit gaps 4.0 and 0.5
    depth = adaptive_k(student, margin=1.0, k_min=1, scale=scale)
    assert depth.tolist() == [1, 3]
    assert adaptive_k(student, margin=1.0, k_min=1, scale=1.0).tolist() == [3, 3]  # cosine gaps 0.4, 0.05 < 1
    assert adaptive_k(student[:, :1], margin=0.0, k_min=2).tolist() == [1, 1]  # k <= k_min: everything
    # The teacher prefers the confident query's runner-up, but is not asked about it.
    table = {(0, 10): -5.0, (0, 11): 0.0, (0, 12): 0.0, (1, 20): -0.5, (1, 21): -0.4, (1, 22): -0.6}
    fn, calls = counting_teacher(table)
    out = rerank(student, IDS, fn, mode="slow", depth=depth)
    assert len(calls) == 1 and out.pairs_scored == len(calls[0]) == int(depth.sum()) == 4
    assert calls[0] == [(0, 10), (1, 20), (1, 21), (1, 22)]
    assert out.ids.tolist() == [[10, 11, 12], [21, 20, 22]]  # confident query keeps its student top-1 and order
    assert out.scores[0].tolist() == [-5.0, -math.inf, -math.inf]
    assert out.teacher_scores[0, 0].item() == -5.0 and torch.isnan(out.teacher_scores[0, 1:]).all()


def test_missing_results_are_not_scored_and_stay_last():
    ids = torch.tensor([[3, -1, -1], [4, 5, -1]])
    student = torch.tensor([[0.5, -3.4e38, -3.4e38], [0.4, 0.3, -3.4e38]])
    table = {(0, 3): 1.0, (1, 4): 0.0, (1, 5): 2.0}
    fn, calls = counting_teacher(table)
    out = rerank(student, ids, fn, mode="fuse", alpha=1.0)
    assert calls == [[(0, 3), (1, 4), (1, 5)]]
    assert out.ids.tolist() == [[3, -1, -1], [5, 4, -1]]


def test_rerank_rejects_bad_inputs():
    fn, _ = counting_teacher(TEACHER)
    with pytest.raises(ValueError, match="mode"):
        rerank(STUDENT, IDS, fn, mode="fast")
    with pytest.raises(ValueError, match="alpha"):
        rerank(STUDENT, IDS, fn, mode="fuse", alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        rerank(STUDENT, IDS, lambda q, i: torch.zeros(len(q) + 1))
    with pytest.raises(ValueError, match="NaN"):
        rerank(STUDENT, IDS, lambda q, i: torch.full((len(q),), torch.nan))


def test_tune_alpha_prefers_the_informative_teacher():
    g = torch.Generator().manual_seed(2)
    q, k = 40, 10
    student = torch.sort(torch.rand(q, k, generator=g), dim=1, descending=True).values
    ids = torch.stack([torch.randperm(100, generator=g)[:k] for _ in range(q)])
    teacher = torch.randn(q, k, generator=g)
    positives = ids.gather(1, teacher.argmax(1, keepdim=True))[:, 0]  # the teacher is always right
    best, r1 = tune_alpha(student, ids, teacher, positives)
    assert r1[1.0] == 100.0
    assert r1[0.0] == pytest.approx(100.0 * (ids[:, 0] == positives).float().mean().item())
    assert r1[best] == 100.0 and best == min(a for a, v in r1.items() if v == 100.0)
    assert set(r1) == {round(0.05 * i, 2) for i in range(21)}


# ------------------------------------------------------------------------------------------------ Combiner end to end


class World:
    """A gallery of N random embeddings, per-text student embeddings and a random teacher score matrix."""

    def __init__(self, n_items=30, n_queries=7, dim=16, seed=3):
        g = torch.Generator().manual_seed(seed)
        gallery = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=g), dim=1)
        self.queries = [f"query {i}" for i in range(n_queries)]
        self.text_emb = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=1)
        self.teacher = torch.randn(n_queries, n_items, generator=g)
        self.index = build_index(gallery, "flat")
        self.n_items = n_items
        self.teacher_calls = 0

    def encode(self, texts):
        return self.text_emb[[self.queries.index(t) for t in texts]]

    def teacher_fn(self, texts, query_idx, item_ids):
        self.teacher_calls += 1
        rows = torch.tensor([self.queries.index(texts[q]) for q in query_idx.tolist()], dtype=torch.long)
        return self.teacher[rows, item_ids]

    def combiner(self, **kw):
        return Combiner(self.encode, self.index, self.teacher_fn, **kw)


def test_slow_with_k_equal_gallery_is_the_teachers_full_ranking():
    world = World()
    comb = world.combiner(mode="slow", batch_size=3)  # 7 queries in batches of 3, 3, 1
    results = comb.search(world.queries, k=world.n_items)
    assert world.teacher_calls == 3
    for q, hits in enumerate(results):
        assert [h.item for h in hits] == torch.argsort(world.teacher[q], descending=True).tolist()
        assert [h.teacher_score for h in hits] == pytest.approx(torch.sort(world.teacher[q], descending=True).values)
        assert all(isinstance(h, Hit) and h.score == h.teacher_score for h in hits)


def test_fast_mode_is_the_student_ranking():
    world = World()
    results = world.combiner(mode="fast").search(world.queries[:2], k=5)
    exact = world.text_emb[:2] @ torch.from_numpy(world.index.reconstruct_n(0, world.n_items)).T
    for q, hits in enumerate(results):
        assert [h.item for h in hits] == torch.argsort(exact[q], descending=True)[:5].tolist()
        assert all(h.teacher_score is None for h in hits)
    assert world.teacher_calls == 0


def test_adaptive_combiner_scores_fewer_pairs():
    world = World()
    full = world.combiner(mode="slow").rank(world.queries, k=8)
    # margin -1: every gap (>= 0) beats it, so every query is confident and reranks only k_min = 2.
    adaptive = world.combiner(mode="slow", adaptive_margin=-1.0, k_min=2).rank(world.queries, k=8)
    assert full.pairs_scored == 7 * 8 and adaptive.pairs_scored == 7 * 2
    # The teacher reorders within each query's student top-2 only; the rest stays in student order.
    student = world.combiner(mode="fast").rank(world.queries, k=8).ids
    student_top2 = student[:, :2]
    assert torch.equal(torch.sort(adaptive.ids[:, :2]).values, torch.sort(student_top2).values)
    assert torch.equal(adaptive.ids[:, 2:], student[:, 2:])
    assert torch.isinf(adaptive.scores[:, 2:]).all()


def test_k_is_clamped_and_validated():
    world = World()
    comb = world.combiner(mode="slow")
    with pytest.warns(UserWarning, match=r"k=40 is larger than the gallery \(30 items\)"):
        results = comb.search(world.queries[:1], k=40)
    assert len(results[0]) == 30
    for bad_k in (0, -3):
        with pytest.raises(ValueError, match="positive integer"):
            comb.search(world.queries[:1], k=bad_k)
    with pytest.raises(ValueError, match="positive integer"):
        world.combiner(mode="slow", k=0)
    for bad_query in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="query 1 is empty or only whitespace"):
            comb.search([world.queries[0], bad_query])
    with pytest.raises(TypeError, match="list of query strings"):
        comb.search("query 0")
    assert comb.search([]) == []
    assert world.teacher_calls == 1  # only the clamped search reached the teacher
