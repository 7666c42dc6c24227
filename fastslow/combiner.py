"""Query-time combiner: the Fast student retrieves top-k candidates, the Slow teacher reranks them.

Modes:

- ``slow``: the final ranking of the k candidates is the teacher score alone (Miech et al. 2021, Sec. 3.3).
- ``fuse``: per query, the student scores and the teacher scores of its reranked candidates are each z-normalised
  over those candidates, ``z = (x - mean) / max(std, eps)`` (population std), and combined as
  ``final = alpha * z_T + (1 - alpha) * z_S``. The two scores live on unrelated scales (cosine similarity vs a
  length-normalised log-likelihood), and z-normalising per query makes ``alpha`` mean the same thing for every query
  and every k. ``alpha = 0`` keeps the student order, ``alpha = 1`` is ``slow``; ``tune_alpha`` picks it on val.

Adaptive depth (``adaptive_k``): when the student is confident (its top-1 beats the runner-up by a margin), only the
first ``k_min`` candidates are sent to the teacher. Candidates beyond a query's depth are not scored; they keep the
student order after the reranked ones and get the final score ``-inf``. Ties in the final score keep the student
order (stable sort).

Ids of -1 (faiss's "no result", e.g. an IVF probe that found fewer than k items) are never sent to the teacher; they
stay last with final score ``-inf``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch

from fastslow import index as fs_index
from fastslow.errors import QueryError

MODES = ("slow", "fuse")
TeacherScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RerankResult(NamedTuple):
    """Output of ``rerank``; every tensor is [Q, k] in the final order.

    Attributes:
        scores: final scores, descending per row; ``-inf`` for candidates that were not reranked.
        ids: item indices in the final order (-1 = no result).
        student_scores: the student's scores of ``ids``.
        teacher_scores: the teacher's scores of ``ids``; NaN where the teacher was not asked.
        pairs_scored: number of (query, item) pairs the teacher scored.
    """

    scores: torch.Tensor
    ids: torch.Tensor
    student_scores: torch.Tensor
    teacher_scores: torch.Tensor
    pairs_scored: int


class Hit(NamedTuple):
    """One result of ``Combiner.search``."""

    item: int  # row of the item in the gallery (the index's item_ids[item] names it)
    score: float  # final score (teacher, fused, or the student's in "fast" mode)
    student_score: float
    teacher_score: float | None  # None when the teacher did not score this candidate


def masked_zscore(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-row z-normalisation over the masked entries: ``(x - mean) / max(std, eps)``, population std.

    Args:
        x: [Q, k] scores.
        mask: [Q, k] bool, True for the entries that define (and receive) the statistics.
        eps: floor on the std, so that a row with one entry or equal entries maps to 0 instead of dividing by 0.

    Returns:
        [Q, k] float32; 0 where ``mask`` is False.
    """
    x = x.float()
    m = mask.float()
    count = m.sum(1, keepdim=True).clamp_min(1.0)
    xm = torch.where(mask, x, torch.zeros_like(x))  # masked entries may be -inf or NaN: keep them out of the sums
    mean = xm.sum(1, keepdim=True) / count
    var = (torch.where(mask, x - mean, torch.zeros_like(x)) ** 2).sum(1, keepdim=True) / count
    z = (x - mean) / var.sqrt().clamp_min(eps)
    return torch.where(mask, z, torch.zeros_like(z))


def adaptive_k(student_scores: torch.Tensor, *, margin: float, k_min: int, scale: float = 1.0) -> torch.Tensor:
    """Per-query rerank depth: ``k_min`` when the student is confident, else the full k.

    Confident means ``scale * (s_1 - s_2) > margin``, with ``s_1, s_2`` the student's top two scores. Pass the
    student's ``logit_scale.exp()`` as ``scale`` so that ``margin`` is in logit units (the units of its softmax).

    Args:
        student_scores: [Q, k] student scores, sorted descending per row (as faiss returns them).
        margin: logit gap above which the student's top-1 is trusted.
        k_min: depth for confident queries (>= 1).
        scale: multiplier turning the scores into logits.

    Returns:
        [Q] long depths in ``{min(k_min, k), k}``.
    """
    if k_min < 1:
        raise ValueError(f"k_min must be >= 1, got {k_min}")
    q, k = student_scores.shape
    full = torch.full((q,), k, dtype=torch.long, device=student_scores.device)
    if k <= k_min:
        return full
    gap = (student_scores[:, 0].float() - student_scores[:, 1].float()) * scale
    return torch.where(gap > margin, torch.full_like(full, k_min), full)


def _order(
    student_scores: torch.Tensor,
    ids: torch.Tensor,
    teacher_scores: torch.Tensor,
    within: torch.Tensor,
    mode: str,
    alpha: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final score and order given teacher scores on the ``within`` candidates: returns (scores, permutation)."""
    if mode == "slow":
        final = teacher_scores.float()
    elif mode == "fuse":
        final = alpha * masked_zscore(teacher_scores, within, eps) + (1 - alpha) * masked_zscore(
            student_scores, within, eps
        )
    else:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    final = torch.where(within, final, torch.full_like(final, -torch.inf))
    # Two stable sorts: by final score, then reranked-before-the-rest. Equal keys keep the incoming (student) order,
    # so ties are broken by the student and the unscored tail stays in student order after the reranked head.
    perm = torch.sort(final, dim=1, descending=True, stable=True).indices
    head_first = torch.sort(within.gather(1, perm).to(torch.uint8), dim=1, descending=True, stable=True).indices
    perm = perm.gather(1, head_first)
    return final.gather(1, perm), perm


def _check_mode(mode: str, alpha: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def rerank(
    student_scores: torch.Tensor | np.ndarray,
    candidate_ids: torch.Tensor | np.ndarray,
    teacher_score_fn: TeacherScoreFn,
    *,
    mode: str = "slow",
    alpha: float = 0.5,
    depth: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> RerankResult:
    """Rerank each query's student candidates with the teacher.

    The teacher is called once for the whole batch, on the flattened (query, item) pairs within each query's depth
    (row-major order: query 0's candidates first); the teacher implementation chunks internally.

    Args:
        student_scores: [Q, k] student scores of the candidates, sorted descending per row.
        candidate_ids: [Q, k] long item indices (-1 = no result, never scored).
        teacher_score_fn: ``(query_indices [P] long, item_ids [P] long) -> [P]`` teacher scores, higher is better;
            ``query_indices`` are rows of this batch (0..Q-1).
        mode: ``slow`` (teacher score alone) or ``fuse`` (z-normalised blend, module docstring).
        alpha: teacher weight in ``fuse``.
        depth: [Q] long number of leading candidates to rerank per query (e.g. from ``adaptive_k``); None = all k.
        eps: std floor of the z-normalisation.

    Returns:
        ``RerankResult(scores, ids, student_scores, teacher_scores, pairs_scored)``, tensors [Q, k] on the device
        of ``student_scores``, in the final order.

    Raises:
        ValueError: unknown mode, alpha outside [0, 1], mismatched shapes, or a teacher output of the wrong
            shape or with NaN.
    """
    _check_mode(mode, alpha)
    student_scores = torch.as_tensor(student_scores)
    ids = torch.as_tensor(candidate_ids, device=student_scores.device).long()
    if student_scores.ndim != 2 or student_scores.shape != ids.shape:
        raise ValueError(
            f"student_scores {tuple(student_scores.shape)} and candidate_ids {tuple(ids.shape)} must both be [Q, k]"
        )
    q, k = ids.shape
    positions = torch.arange(k, device=ids.device)[None, :]
    within = ids >= 0
    if depth is not None:
        depth = torch.as_tensor(depth, device=ids.device).long()
        if depth.shape != (q,):
            raise ValueError(f"depth must be [Q] = [{q}], got {tuple(depth.shape)}")
        within &= positions < depth[:, None]

    query_idx, cand_pos = within.nonzero(as_tuple=True)  # row-major, so query 0's pairs come first
    teacher = torch.full((q, k), torch.nan, device=ids.device)
    if len(query_idx):
        values = torch.as_tensor(teacher_score_fn(query_idx, ids[query_idx, cand_pos]))
        if values.shape != (len(query_idx),):
            raise ValueError(f"teacher_score_fn returned shape {tuple(values.shape)} for {len(query_idx)} pairs")
        if torch.isnan(values).any():
            raise ValueError("teacher_score_fn returned NaN scores")
        teacher[query_idx, cand_pos] = values.to(teacher.device, torch.float32)

    final, perm = _order(student_scores, ids, teacher, within, mode, alpha, eps)
    return RerankResult(
        scores=final,
        ids=ids.gather(1, perm),
        student_scores=student_scores.gather(1, perm),
        teacher_scores=teacher.gather(1, perm),
        pairs_scored=len(query_idx),
    )


def tune_alpha(
    student_scores: torch.Tensor | np.ndarray,
    candidate_ids: torch.Tensor | np.ndarray,
    teacher_scores: torch.Tensor | np.ndarray,
    positives: Sequence[int] | torch.Tensor | np.ndarray,
    grid: Sequence[float] | None = None,
    *,
    eps: float = 1e-6,
    min_gain: float | None = 0.0,
) -> tuple[float, dict[float, float]]:
    """Pick the ``fuse`` weight alpha that maximises R@1 on validation queries, never one that loses to the student.

    The guard (``min_gain``): an alpha > 0 is chosen only when its R@1 beats the student alone (alpha = 0, the
    candidates' own order) by more than ``min_gain`` points; otherwise the answer is 0. A teacher that is worse than
    the student (real photos with a pretrained text tower: student 17.5 R@1, teacher-only reranking 15.5) would
    otherwise still get a weight whenever some alpha ties the student on R@1 and wins the mean-rank tie-break, and a
    small val split makes such ties, and gains of one query, common.

    Args:
        student_scores: [Q, k] student scores of each val query's candidates (sorted descending).
        candidate_ids: [Q, k] their item indices (-1 = no result).
        teacher_scores: [Q, k] teacher scores of the same candidates (computed once, reused for every alpha).
        positives: [Q] the item index each query should retrieve (a query whose positive is not among its
            candidates counts as a miss for every alpha).
        grid: alphas to try; default 0, 0.05, ..., 1.
        eps: std floor of the z-normalisation.
        min_gain: R@1 points (percent) an alpha > 0 must gain over the student alone to be chosen; None: no
            guard (the best of the grid, whatever the student alone scores).

    Returns:
        ``(best_alpha, {alpha: R@1 in percent})``. Ties in R@1 go to the alpha with the better mean rank of the
        positive within the candidates (a miss counts as rank k + 1), then to the earlier grid value.
    """
    student_scores = torch.as_tensor(student_scores)
    ids = torch.as_tensor(candidate_ids, device=student_scores.device).long()
    teacher = torch.as_tensor(teacher_scores, device=student_scores.device).float()
    pos = torch.as_tensor(np.asarray(positives, dtype=np.int64), device=ids.device)
    if not (student_scores.shape == ids.shape == teacher.shape) or pos.shape != ids.shape[:1]:
        raise ValueError("student_scores, candidate_ids, teacher_scores must be [Q, k] and positives [Q]")
    grid = [round(0.05 * i, 2) for i in range(21)] if grid is None else [float(a) for a in grid]
    within = ids >= 0
    k = ids.shape[1]
    results: dict[float, float] = {}
    best, best_key = None, None
    for alpha in grid:
        _check_mode("fuse", alpha)
        _, perm = _order(student_scores, ids, teacher, within, "fuse", alpha, eps)
        hit = ids.gather(1, perm) == pos[:, None]
        rank = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(pos, k + 1)).float()
        r1 = 100.0 * hit[:, 0].float().mean().item()
        results[alpha] = r1
        key = (r1, -rank.mean().item())
        if best_key is None or key > best_key:
            best, best_key = alpha, key
    if min_gain is not None and best != 0.0:
        student_r1 = 100.0 * (ids[:, 0] == pos).float().mean().item()  # alpha = 0 keeps the candidates' order
        if results[best] <= student_r1 + min_gain:
            best = 0.0
    return best, results


def check_k(k: Any) -> int:
    """k as an int; QueryError unless it is a positive integer (candidates per query)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise QueryError(f"k must be a positive integer (candidates per query), got {k!r}")
    return int(k)


def check_queries(texts: Sequence[str], tokenizer: Any = None, max_length: int | None = None) -> list[str]:
    """The query strings as a list; QueryError for an empty or whitespace-only one (with a tokenizer, also for one
    that encodes to no token: only zero-width or other invisible characters), TypeError for a non-string."""
    if isinstance(texts, str):
        raise TypeError("pass a list of query strings, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"query {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise QueryError(f"query {i} is empty or only whitespace ({text!r}): nothing to search for")
    if tokenizer is not None and texts:
        empty = tokenizer.empty_texts(texts, max_length)
        if empty:
            shown = ", ".join(f"query {i} ({texts[i]!r})" for i in empty)
            raise QueryError(
                f"{shown} has no words the tokenizer knows (only invisible characters): nothing to search for"
            )
    return texts


class Combiner:
    """Fast retrieval + Slow rerank for text queries, with k as a runtime argument.

    Args:
        encode_text_fn: ``texts (list[str]) -> [Q, E]`` L2-normalised student text embeddings (torch or numpy).
        index: faiss index over the gallery (``fastslow.index.build_index`` / ``load_index``); faiss id = item row.
        teacher_score_fn: ``(texts, query_indices [P] long, item_ids [P] long) -> [P]`` teacher scores of the pairs
            ``(texts[query_indices[p]], item item_ids[p])``, e.g. tokenising the texts once and reading the items'
            cached visual tokens. Called once per batch of queries. May be None in ``fast`` mode.
        mode: ``fast`` (student only, no teacher), ``slow`` or ``fuse`` (see the module docstring).
        k: default number of candidates to retrieve and rerank.
        alpha: teacher weight in ``fuse`` mode.
        adaptive_margin: enable adaptive depth with this logit margin (``adaptive_k``); None = always rerank k.
        k_min: rerank depth of confident queries when adaptive.
        logit_scale: the student's ``logit_scale.exp()``, turning cosine gaps into logit gaps for the margin.
        batch_size: queries encoded, searched and reranked together.
        tokenizer, max_length: the student's tokenizer (`fastslow.tokenizer.TextTokenizer`) and query length; when
            given, a query that encodes to no token at all (only zero-width or other invisible characters, e.g.
            ``"\u200b"``) is refused like an empty one instead of being answered with a ranking of nothing asked.
    """

    def __init__(
        self,
        encode_text_fn: Callable[[list[str]], Any],
        index: Any,
        teacher_score_fn: Callable[[list[str], torch.Tensor, torch.Tensor], torch.Tensor] | None,
        *,
        mode: str = "slow",
        k: int = 10,
        alpha: float = 0.5,
        adaptive_margin: float | None = None,
        k_min: int = 1,
        logit_scale: float = 1.0,
        batch_size: int = 256,
        tokenizer: Any = None,
        max_length: int | None = None,
    ) -> None:
        if mode != "fast":
            _check_mode(mode, alpha)
            if teacher_score_fn is None:
                raise ValueError(f"mode={mode!r} needs a teacher_score_fn (use mode='fast' for the student alone)")
        self.encode_text_fn = encode_text_fn
        self.index = index
        self.teacher_score_fn = teacher_score_fn
        self.mode = mode
        self.k = self._check_k(k)
        self.alpha = alpha
        self.adaptive_margin = adaptive_margin
        self.k_min = k_min
        self.logit_scale = logit_scale
        self.batch_size = batch_size
        if tokenizer is not None and max_length is None:
            raise ValueError("Combiner: tokenizer= needs max_length= (how the student cuts its queries)")
        self.tokenizer, self.max_length = tokenizer, max_length

    @staticmethod
    def _check_k(k: Any) -> int:
        return check_k(k)

    def _check_texts(self, texts: Sequence[str]) -> list[str]:
        return check_queries(texts, self.tokenizer, self.max_length)

    def rank(self, texts: Sequence[str], k: int | None = None) -> RerankResult:
        """Rank the gallery for each query text; returns tensors (what evaluation uses).

        Args:
            texts: Q query strings (Q may be 0); an empty or all-whitespace string is an error.
            k: candidates per query; default ``self.k``; clamped to the gallery size with a warning.

        Returns:
            ``RerankResult`` with [Q, k] tensors in final order; ``pairs_scored`` summed over the batches. In
            ``fast`` mode ``scores`` are the student's and ``teacher_scores`` are NaN.

        Raises:
            QueryError: k <= 0, or an empty / whitespace-only query (or, with a tokenizer, one with no token).
            TypeError: ``texts`` is a single string or holds a non-string.
        """
        texts = self._check_texts(texts)
        k = self._check_k(self.k if k is None else k)
        if k > self.index.ntotal:
            warnings.warn(
                f"k={k} is larger than the gallery ({self.index.ntotal} items): using k={self.index.ntotal}",
                stacklevel=2,
            )
            k = int(self.index.ntotal)
        parts = []
        pairs = 0
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            with torch.no_grad():
                emb = self.encode_text_fn(batch)
            student, ids = (torch.from_numpy(a) for a in fs_index.search(self.index, emb, k))
            if self.mode == "fast":
                nan = torch.full(student.shape, torch.nan)
                parts.append(RerankResult(student, ids, student, nan, 0))
                continue
            depth = None
            if self.adaptive_margin is not None:
                depth = adaptive_k(student, margin=self.adaptive_margin, k_min=self.k_min, scale=self.logit_scale)
            with torch.no_grad():
                result = rerank(
                    student,
                    ids,
                    partial(self.teacher_score_fn, batch),
                    mode=self.mode,
                    alpha=self.alpha,
                    depth=depth,
                )
            parts.append(result)
            pairs += result.pairs_scored
        if not parts:
            empty = torch.empty((0, k))
            return RerankResult(empty, empty.long(), empty, empty.clone(), 0)
        return RerankResult(*(torch.cat([getattr(p, f) for p in parts]) for f in RerankResult._fields[:4]), pairs)

    def search(self, texts: Sequence[str], k: int | None = None) -> list[list[Hit]]:
        """Search the gallery for each query text; returns plain Python results (what ``tools/search.py`` prints).

        Args:
            texts: query strings; an empty list returns ``[]``.
            k: candidates per query (runtime); default ``self.k``; clamped to the gallery size with a warning.

        Returns:
            One list per query of ``Hit(item, score, student_score, teacher_score)`` in final order, best first;
            ``teacher_score`` is None for candidates the teacher did not score. Faiss "no result" slots (-1) are
            dropped, so a list can be shorter than k with approximate indexes.

        Raises:
            QueryError: k <= 0, or an empty / whitespace-only query (or, with a tokenizer, one with no token).
        """
        return hits(self.rank(texts, k))


def hits(result: Any) -> list[list[Hit]]:
    """A ranking (``RerankResult`` or anything with its ``ids``, ``scores``, ``student_scores``, ``teacher_scores``
    [Q, k]) as plain Python: one list of ``Hit`` per query, best first, faiss's "no result" slots (-1) dropped."""
    out = []
    for q in range(result.ids.shape[0]):
        row = []
        for item, score, s_score, t_score in zip(
            result.ids[q].tolist(),
            result.scores[q].tolist(),
            result.student_scores[q].tolist(),
            result.teacher_scores[q].tolist(),
        ):
            if item >= 0:
                row.append(Hit(item, score, s_score, None if np.isnan(t_score) else t_score))
        out.append(row)
    return out


__all__ = [
    "MODES",
    "Combiner",
    "Hit",
    "RerankResult",
    "adaptive_k",
    "check_k",
    "check_queries",
    "hits",
    "masked_zscore",
    "rerank",
    "tune_alpha",
]
