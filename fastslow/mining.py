"""Candidate sets for distillation: hard negatives the student mines itself, listwise and in-batch layouts.

The teacher's distribution is only informative over candidates the student confuses with the positive (Miech et al.,
CVPR 2021, sec. 3.3): random in-batch items are mostly easy. So every mining round the student embeds the training
texts and items, and each text's top-scoring items under the student (its own positive removed) become that text's
hard negatives; the teacher then scores (text, positive) and (text, negative) pairs, cached by
``fastslow.score_cache``.

The search is ``fastslow.index.build_index`` + ``search`` (faiss, inner product; exact ``flat`` by default, on the GPU
when faiss has one), so mining scales like the query-time index does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastslow.index import build_index, search

__all__ = ["mine_hard_negatives", "listwise_candidates", "inbatch_candidates", "swap_words", "swappable_tokens"]

Positives = torch.Tensor | np.ndarray | Sequence[int] | Sequence[Sequence[int]]


def _positives_matrix(positives: Positives, n_texts: int, n_items: int) -> np.ndarray:
    """Each text's positive item(s) as an int64 [Q, P] matrix padded with -1 (P = most positives of any text)."""
    if isinstance(positives, torch.Tensor):
        positives = positives.detach().cpu().numpy()
    if isinstance(positives, np.ndarray):
        matrix = positives.astype(np.int64).reshape(len(positives), -1)
    else:
        rows = [[int(p)] if np.ndim(p) == 0 else [int(x) for x in p] for p in positives]
        width = max((len(r) for r in rows), default=0)
        matrix = np.full((len(rows), max(width, 1)), -1, np.int64)
        for q, row in enumerate(rows):
            matrix[q, : len(row)] = row
    if matrix.shape[0] != n_texts:
        raise ValueError(f"positives has {matrix.shape[0]} entries but there are {n_texts} texts (one per text)")
    if matrix.size and (matrix.max() >= n_items or matrix.min() < -1):
        raise ValueError(
            f"positive item indices must be in [0, {n_items}), got values in [{matrix.min()}, {matrix.max()}]"
        )
    return matrix


def _compact_rows(ids: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """Per row, the first ``k`` entries of ``ids`` [Q, M] where ``keep`` [Q, M] is True, in order; -1 fills the rest."""
    # A stable sort on "not kept" moves the kept entries to the front without reordering them.
    order = np.argsort(~keep, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    kept = np.take_along_axis(keep, order, axis=1)
    out = np.where(kept, ids, -1)[:, :k]
    if out.shape[1] < k:
        out = np.concatenate([out, np.full((out.shape[0], k - out.shape[1]), -1, np.int64)], axis=1)
    return out


def mine_hard_negatives(
    text_emb: torch.Tensor | np.ndarray,
    item_emb: torch.Tensor | np.ndarray,
    positives: Positives,
    k: int,
    *,
    exclude_positives: bool = True,
    index_kind: str = "flat",
    index_params: dict[str, Any] | None = None,
    query_batch: int = 65536,
    exclude: torch.Tensor | np.ndarray | Sequence[int] | None = None,
) -> torch.Tensor:
    """Each text's ``k`` highest-scoring items under the student, its positive item(s) removed.

    Args:
        text_emb: [Q, E] float student text embeddings (L2-normalised: the score is the inner product).
        item_emb: [N, E] float student item embeddings; row j is item j.
        positives: text q's positive item(s): [Q] int (torch, numpy or list; one positive per text, e.g.
            ``split.text_to_visual``), or a list of Q lists of ints (several positives per text).
        k: negatives per text.
        exclude_positives: drop each text's positive(s) from its list (they are not negatives). With False the
            list is the plain top-k and may contain the positive.
        index_kind: ``flat`` (exact, the default) or an approximate kind of ``fastslow.index.build_index``
            (``ivf``, ``ivfpq``, ``hnsw``) for very large galleries.
        index_params: extra keyword arguments for ``build_index`` (``nlist``, ``nprobe``, ``use_gpu``, ...).
        query_batch: texts searched per faiss call (bounds the [batch, k + P] result buffers).
        exclude: items never returned, e.g. items whose file could not be read under ``data.on_error=skip``
            (their rows in ``item_emb`` are placeholders, not embeddings).

    Returns:
        [Q, k] int64 item indices, best first. When fewer than ``k`` items remain for a text (a gallery smaller
        than ``k`` plus its positives, or an approximate index returning fewer hits), the row ends with -1 padding;
        ``listwise_candidates`` masks it.

    Raises:
        ValueError: ``k`` not positive, mismatched dims, or positives out of range / not one entry per text.
    """
    if isinstance(k, bool) or int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer (negatives per text), got {k!r}")
    k = int(k)
    texts = text_emb.detach().to("cpu", torch.float32).numpy() if isinstance(text_emb, torch.Tensor) else text_emb
    texts = np.ascontiguousarray(texts, dtype=np.float32)
    items = item_emb.detach().to("cpu", torch.float32).numpy() if isinstance(item_emb, torch.Tensor) else item_emb
    items = np.ascontiguousarray(items, dtype=np.float32)
    if texts.ndim != 2 or items.ndim != 2 or texts.shape[1] != items.shape[1]:
        raise ValueError(f"text_emb [Q, E] and item_emb [N, E] must share E, got {texts.shape} and {items.shape}")
    n_texts, n_items = texts.shape[0], items.shape[0]
    pos = _positives_matrix(positives, n_texts, n_items)
    if n_texts == 0:
        return torch.empty((0, k), dtype=torch.long)

    # Ask for enough hits that k remain after removing the positives; never more than the gallery (no faiss warning).
    n_pos = int((pos >= 0).sum(axis=1).max()) if exclude_positives else 0
    excluded = np.unique(np.asarray(torch.as_tensor(exclude).cpu() if exclude is not None else [], dtype=np.int64))
    depth = min(k + n_pos + len(excluded), n_items)
    index = build_index(items, index_kind, **(index_params or {}))
    out = np.empty((n_texts, k), np.int64)
    for start in range(0, n_texts, query_batch):
        stop = min(start + query_batch, n_texts)
        _, ids = search(index, texts[start:stop], depth)
        keep = ids >= 0  # approximate kinds pad missing hits with -1
        if exclude_positives:
            keep &= ~(ids[:, :, None] == pos[start:stop, None, :]).any(axis=2)
        if len(excluded):
            keep &= ~np.isin(ids, excluded)
        out[start:stop] = _compact_rows(ids, keep, k)
    return torch.from_numpy(out)


def listwise_candidates(mined: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-text candidate lists for the distillation loss: the positive first, then the mined negatives.

    Args:
        mined: [Q, k] int64 item indices from ``mine_hard_negatives`` (-1 = padding).
        positive: [Q] int64 each text's positive item.

    Returns:
        cand: [Q, k + 1] int64; column 0 is the positive. Padding slots hold the text's positive index (not -1), so
            gathers and score-cache lookups on ``cand`` need no special case; the mask removes them from the loss.
        mask: [Q, k + 1] bool, True for a real candidate. False for padding, and for a mined entry equal to the
            positive (possible with ``exclude_positives=False``): it would be a second copy of the positive.
    """
    if mined.ndim != 2 or positive.shape != (mined.shape[0],):
        raise ValueError(f"mined must be [Q, k] and positive [Q], got {tuple(mined.shape)} and {tuple(positive.shape)}")
    positive = positive.to(device=mined.device, dtype=torch.long)
    mined = mined.long()
    real = (mined >= 0) & (mined != positive[:, None])
    cand = torch.cat([positive[:, None], torch.where(real, mined, positive[:, None])], dim=1)
    mask = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)
    return cand, mask


def inbatch_candidates(item_index: torch.Tensor) -> torch.Tensor:
    """Which in-batch columns are candidates for each row, so every distinct item counts once.

    In a batch of B (text, item) pairs, text i's candidates are the B items of the batch (column j = the item of
    pair j) and its positive is column i. Several pairs may share an item (an image has ~5 captions); a repeated
    item would enter the softmax twice, and a copy of row i's own item in another column would be a "negative"
    that is in fact the positive. So for row i:

    - column i (the positive) is kept;
    - another column holding row i's own item is masked;
    - among the other columns holding the same item, only the first is kept.

    Example: ``item_index = [5, 7, 5, 9, 7]`` gives the rows ``[1,1,0,1,0]``, ``[1,1,0,1,0]``, ``[0,1,1,1,0]``,
    ``[1,1,0,1,0]``, ``[1,0,0,1,1]``: each row keeps 3 columns, one per distinct item, and its diagonal, so the
    InfoNCE targets stay ``arange(B)``.

    Args:
        item_index: [B] int64 dataset index of each pair's item.

    Returns:
        [B, B] bool, True where column j is a candidate for row i (on ``item_index``'s device).
    """
    if item_index.ndim != 1:
        raise ValueError(f"item_index must be 1-D [B], got shape {tuple(item_index.shape)}")
    b = item_index.shape[0]
    cols = torch.arange(b, device=item_index.device)
    same = item_index[:, None] == item_index[None, :]  # [B, B]: pairs i, j share an item
    # First column holding each column's item: the smallest j' with same[j', j].
    first = torch.where(same, cols[:, None], b).amin(dim=0)  # [B]
    is_first = first == cols
    diagonal = cols[:, None] == cols[None, :]
    return diagonal | (is_first[None, :] & ~same)


def swappable_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int, *, threshold: float = 0.6, top: int = 2000
) -> torch.Tensor:
    """Which token pairs play the same role in the captions (distributional classes), so swapping them keeps a
    caption grammatical: [V, V] bool.

    Two tokens are swappable when the histograms of their left and right neighbours over the captions are
    similar (cosine >= ``threshold`` of the concatenated, L2-normalised histograms): colours share their
    contexts ("a small _ circle"), shapes theirs, and so on. A swap of two colours is the binding contrast
    retrieval needs; a swap of a colour with a shape only makes word salad, which a text encoder can learn to
    reject without looking at the item. No part-of-speech tagger needed (NegCLIP uses one), any vocabulary.

    Args:
        input_ids, attention_mask: [N, L] the training captions (``BOS w1 .. wn EOS PAD``).
        vocab_size: V.
        threshold: cosine similarity of the context histograms above which two tokens are swappable.
        top: only the ``top`` most frequent tokens can be swapped (bounds the [top, 2 V] histograms).

    Returns:
        [V, V] bool, symmetric, False on the diagonal.
    """
    ids = input_ids.long()
    real = attention_mask.bool()
    inner = real[:, 1:-1] & real[:, 2:]  # positions 1 .. L-2 with a real right neighbour (EOS counts as context)
    centre, left, right = ids[:, 1:-1][inner], ids[:, :-2][inner], ids[:, 2:][inner]
    counts = torch.bincount(centre, minlength=vocab_size)
    keep = counts.argsort(descending=True)[: min(top, vocab_size)]
    keep = keep[counts[keep] > 0]
    slot = torch.full((vocab_size,), -1, dtype=torch.long)
    slot[keep] = torch.arange(len(keep))
    m = slot[centre] >= 0
    hist = torch.zeros(len(keep), 2 * vocab_size)
    hist.index_put_((slot[centre[m]], left[m]), torch.ones(int(m.sum())), accumulate=True)
    hist.index_put_((slot[centre[m]], vocab_size + right[m]), torch.ones(int(m.sum())), accumulate=True)
    left_h = torch.nn.functional.normalize(hist[:, :vocab_size], dim=1)
    right_h = torch.nn.functional.normalize(hist[:, vocab_size:], dim=1)
    sim = (left_h @ left_h.T + right_h @ right_h.T) / 2
    out = torch.zeros(vocab_size, vocab_size, dtype=torch.bool)
    out[keep[:, None], keep[None, :]] = sim >= threshold
    out.fill_diagonal_(False)
    return out


def swap_words(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    swappable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` copies of each caption with two of its tokens swapped: compositional negatives for the text side.

    A dual encoder trained on random scenes never meets two items that differ only in which attribute goes with
    which object, or in the order of a relation ("a red circle left of a blue square" / "a blue circle left of a
    red square"), so nothing in InfoNCE asks it to tell them apart. Swapping two words of a caption makes such
    contrasts for free (NegCLIP, Yuksekgonul et al. 2023, builds its hard negatives the same way); unlike
    NegCLIP's one-hot labels, the teacher scores every swap against the item, so a swap that is still true ("a
    circle and a square" -> "a square and a circle") is not pushed away.

    Args:
        input_ids: [B, L] rows ``BOS w1 .. wn EOS PAD ..``.
        attention_mask: [B, L].
        n: swaps per caption.
        generator: for reproducible draws.
        swappable: [V, V] bool (`swappable_tokens`): only pairs of tokens allowed here are swapped; None: any
            two distinct tokens.

    Returns:
        ids [B, n, L] (same mask as the caption) and valid [B, n] bool: False where the caption has fewer than two
        distinct tokens to swap, or the swap repeats an earlier one of the same row.
    """
    b, width = input_ids.shape
    tokens, length = input_ids.cpu().long(), attention_mask.long().sum(1).cpu()
    pos = torch.arange(width)
    inner = (pos[None] >= 1) & (pos[None] <= length[:, None] - 2)  # [B, L] word positions (not BOS / EOS)
    pairs = inner[:, :, None] & inner[:, None, :] & (pos[:, None] < pos[None, :])  # [B, L, L] i < j
    pairs &= tokens[:, :, None] != tokens[:, None, :]
    if swappable is not None:
        pairs &= swappable.cpu()[tokens[:, :, None], tokens[:, None, :]]
    # n distinct allowed pairs per row, at random: random keys on the allowed pairs, the n largest.
    keys = torch.rand(b, width * width, generator=generator).masked_fill(~pairs.view(b, -1), -1.0)
    top = keys.topk(min(n, width * width), dim=1)
    picked = torch.cat([top.indices, top.indices[:, :1].expand(b, max(0, n - top.indices.shape[1]))], dim=1)
    ok = torch.cat([top.values >= 0, torch.zeros(b, max(0, n - top.values.shape[1]), dtype=torch.bool)], dim=1)
    first, second = picked // width, picked % width
    ids = input_ids.cpu()[:, None, :].repeat(1, n, 1)
    a, c = ids.gather(2, first[..., None]), ids.gather(2, second[..., None])
    ids.scatter_(2, first[..., None], c)
    ids.scatter_(2, second[..., None], a)
    valid = ok & (a != c).squeeze(-1)
    same = (ids[:, :, None, :] == ids[:, None, :, :]).all(-1)  # [B, n, n]: two swaps giving one caption
    earlier = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)
    valid &= ~(same & earlier & valid[:, None, :]).any(-1)
    return ids.to(input_ids.device), valid.to(input_ids.device)
