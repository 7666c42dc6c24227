"""Encode a split with a trained teacher or student, and score it: shared by validation during
training, `rerank_eval`, `build_index` and the benchmarks.

Everything here runs without gradients, batched, with bounded memory: galleries are encoded in
batches, and the teacher's [n_text, n_item] matrix is filled in text blocks (the teacher chunks the
item side itself).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from fastslow.data import RetrievalSplit, VisualDataset, collate
from fastslow.metrics import retrieval_metrics
from fastslow.tokenizer import TextTokenizer


def visual_args(batch: dict) -> tuple[torch.Tensor, ...]:
    """The visual inputs of a collated batch: (pixels,) for images, (features, frame_mask) for video."""
    if "pixels" in batch:
        return (batch["pixels"],)
    return (batch["features"], batch["frame_mask"])


def iter_items(split: RetrievalSplit, load_visual: Callable, batch_size: int, device: torch.device | str = "cpu"):
    """Yield `(item_index [b], visual args)` over every item of the split, in order."""
    loader = DataLoader(VisualDataset(split, load_visual), batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in loader:
        if batch.get("empty", False):
            continue
        yield batch["item_index"], tuple(x.to(device) for x in visual_args(batch))


def tokenize(tokenizer: TextTokenizer, texts: list[str], max_length: int, device="cpu") -> tuple[torch.Tensor, ...]:
    ids, mask = tokenizer.encode(texts, max_length)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def encode_items_teacher(teacher, split: RetrievalSplit, load_visual: Callable, batch_size: int = 64):
    """Teacher visual tokens for every item of the split (a `VisualTokens` of length n_items)."""
    from teachers import VisualTokens

    device = next(teacher.parameters()).device
    chunks = [teacher.encode_visual(*args) for _, args in iter_items(split, load_visual, batch_size, device)]
    return VisualTokens.cat(chunks)


@torch.no_grad()
def teacher_score_matrix(
    teacher, visual, tokenizer: TextTokenizer, texts: list[str], *, max_length: int, text_batch: int = 64
) -> torch.Tensor:
    """Teacher scores of every text against every item: [n_text, n_item] (float32, CPU)."""
    device = next(teacher.parameters()).device
    rows = []
    for start in range(0, len(texts), text_batch):
        ids, mask = tokenize(tokenizer, texts[start : start + text_batch], max_length, device)
        rows.append(teacher.score(visual, ids, mask).float().cpu())
    return torch.cat(rows) if rows else torch.zeros(0, len(visual))


@torch.no_grad()
def encode_items_student(student, split: RetrievalSplit, load_visual: Callable, batch_size: int = 128) -> torch.Tensor:
    """Student embeddings of every item: [n_item, E] float32 on CPU (L2-normalised)."""
    device = next(student.parameters()).device
    out = [student.encode_visual(*args).float().cpu() for _, args in iter_items(split, load_visual, batch_size, device)]
    return torch.cat(out)


@torch.no_grad()
def encode_texts_student(
    student, tokenizer: TextTokenizer, texts: list[str], *, max_length: int, batch_size: int = 256
) -> torch.Tensor:
    """Student embeddings of texts: [n_text, E] float32 on CPU (L2-normalised)."""
    device = next(student.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, texts[start : start + batch_size], max_length, device)
        out.append(student.encode_text(ids, mask).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate_teacher(
    teacher,
    split: RetrievalSplit,
    load_visual: Callable,
    tokenizer: TextTokenizer,
    *,
    max_length: int,
    text_batch: int = 64,
) -> dict[str, float]:
    """Full-ranking retrieval metrics of the teacher on a split (every text against every item)."""
    visual = encode_items_teacher(teacher, split, load_visual)
    scores = teacher_score_matrix(
        teacher, visual, tokenizer, split.captions, max_length=max_length, text_batch=text_batch
    )
    return retrieval_metrics(scores, split.text_to_visual)


def evaluate_student(
    student, split: RetrievalSplit, load_visual: Callable, tokenizer: TextTokenizer, *, max_length: int
) -> dict[str, float]:
    """Exact (brute-force dot product) retrieval metrics of the student on a split."""
    items = encode_items_student(student, split, load_visual)
    texts = encode_texts_student(student, tokenizer, split.captions, max_length=max_length)
    return retrieval_metrics(texts @ items.T, split.text_to_visual)


class StoreTeacherScorer:
    """The teacher at query time: scores (query text, gallery item) pairs from the gallery's cached
    visual tokens (`TokenStore`), never running the visual backbone.

    Args:
        teacher: the trained teacher (eval mode, no gradients).
        store: the gallery's `TokenStore` (`${output_dir}/index/tokens`), or `VisualTokens` in memory.
        tokenizer, max_length: how query texts become ids.
        chunk: pairs per teacher call (bounds memory).
    """

    def __init__(self, teacher, store, tokenizer: TextTokenizer, max_length: int, chunk: int = 2048):
        self.teacher, self.store, self.tokenizer, self.max_length, self.chunk = (
            teacher,
            store,
            tokenizer,
            max_length,
            chunk,
        )
        self.device = next(teacher.parameters()).device

    def _visual(self, idx):
        if hasattr(self.store, "get"):  # a TokenStore on disk
            return self.store.get(idx, device=self.device)
        return self.store[idx].to(device=self.device)  # VisualTokens in memory

    @torch.no_grad()
    def __call__(self, texts: list[str], query_idx: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Scores of the pairs (texts[query_idx[p]], item item_ids[p]): [P] float32 on CPU."""
        ids, mask = tokenize(self.tokenizer, texts, self.max_length, self.device)
        query_idx, item_ids = torch.as_tensor(query_idx).cpu(), torch.as_tensor(item_ids).cpu()
        out = torch.empty(len(query_idx))
        for s in range(0, len(query_idx), self.chunk):
            q, i = query_idx[s : s + self.chunk], item_ids[s : s + self.chunk]
            visual = self._visual(i)
            out[s : s + len(q)] = self.teacher.score_pairs(visual, ids[q], mask[q]).float().cpu()
        return out

    @torch.no_grad()
    def full(self, texts: list[str], item_chunk: int = 256) -> torch.Tensor:
        """Scores of every text against every gallery item: [len(texts), n_items] (the Slow-only baseline)."""
        ids, mask = tokenize(self.tokenizer, texts, self.max_length, self.device)
        cols = []
        for s in range(0, len(self.store), item_chunk):
            visual = self._visual(slice(s, s + item_chunk))
            cols.append(self.teacher.score(visual, ids, mask).float().cpu())
        return torch.cat(cols, dim=1)


def ranking_matrix(ids: torch.Tensor, n_items: int, rest: torch.Tensor | None = None) -> torch.Tensor:
    """Turn ranked candidate lists into a [Q, n_items] score matrix for `retrieval_metrics`.

    The k ranked candidates of each row come first, in their order; the other items follow in the
    order of `rest` ([Q, n_items] scores, e.g. the student's), or are tied last (-inf) without it.
    Ids of -1 (no result) are ignored.

    Args:
        ids: [Q, k] item indices, best first.
        n_items: gallery size.
        rest: [Q, n_items] scores ordering the items not in `ids`, or None.
    """
    q, k = ids.shape
    if rest is None:
        out = torch.full((q, n_items), float("-inf"))
    else:
        # Squash `rest` into (-1, 0) so every ranked candidate (scores 1..k) stays above it.
        out = -torch.sigmoid(-rest.float()).clamp(1e-6, 1 - 1e-6)
    rank_score = torch.arange(k, 0, -1, dtype=out.dtype).expand(q, k)
    valid = ids >= 0
    rows = torch.arange(q).unsqueeze(1).expand(q, k)
    out[rows[valid], ids[valid]] = rank_score[valid]
    return out
