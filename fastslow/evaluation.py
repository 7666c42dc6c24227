"""Encode a split with a trained teacher or student, and score it: shared by validation during
training, `rerank_eval`, `build_index` and the benchmarks.

Everything here runs without gradients, batched, with bounded memory: galleries are encoded in
batches, and the teacher's [n_text, n_item] matrix is filled in text blocks (the teacher chunks the
item side itself).

Bad input (``on_error``): under ``"raise"`` (the default) an item that cannot be read stops the pass with the
loader's `DataError`, which names the file. Under ``"skip"`` the pass leaves it out and records it in the run's
`SkipLedger` (required then, so that nothing is dropped unseen); the evaluations score the items that were read
and their captions, and say how many of each were left out (``left_out_items``, ``left_out_texts``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from fastslow.data import RetrievalSplit, SkipLedger, VisualDataset, captions_per_path, collate
from fastslow.data.datasets import check_on_error
from fastslow.metrics import retrieval_metrics
from fastslow.tokenizer import TextTokenizer


def visual_args(batch: dict) -> tuple[torch.Tensor, ...]:
    """The visual inputs of a collated batch: (pixels,) for images, (features, frame_mask) for video."""
    if "pixels" in batch:
        return (batch["pixels"],)
    return (batch["features"], batch["frame_mask"])


def iter_items(
    split: RetrievalSplit,
    load_visual: Callable,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    on_error: str = "raise",
    ledger: SkipLedger | None = None,
    where: str = "items",
    rows: range | None = None,
):
    """Yield `(item_index [b], visual args)` over every item of the split that can be read, in order.

    Args:
        split, load_visual, batch_size, device: what to read, how, in batches of how many, onto which device.
        on_error: ``"raise"``: an unreadable item raises its `DataError`. ``"skip"``: it is not yielded and is
            recorded in ``ledger`` (with the captions it carries and ``where``, the name of the pass).
        ledger: the run's `SkipLedger`; required under ``"skip"``.
        where: the pass, as the ledger lists it (``"val"``, ``"miner"``, ``"teacher tokens"``, ...).
        rows: only these items (one process's shard); ``item_index`` stays the split's.
    """
    if check_on_error(on_error) == "skip" and ledger is None:
        raise ValueError("iter_items(on_error='skip') needs a SkipLedger to record the items it leaves out")
    dataset = VisualDataset(split, load_visual, on_error=on_error)
    if rows is not None:
        dataset = Subset(dataset, rows)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    captions = None  # path -> captions, computed once, on the first skip
    for batch in loader:
        if batch["skipped"]:
            captions = captions_per_path(split) if captions is None else captions
            ledger.add_batch(batch["skipped"], captions, where=where)
        if batch.get("empty", False):
            continue
        yield batch["item_index"], tuple(x.to(device) for x in visual_args(batch))


@torch.no_grad()
def encode_items(
    encode: Callable,
    split: RetrievalSplit,
    load_visual: Callable,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    on_error: str = "raise",
    ledger: SkipLedger | None = None,
    where: str = "items",
) -> tuple[list, torch.Tensor]:
    """``encode(*visual_args)`` of every item that can be read (see `iter_items` for ``on_error``).

    Returns:
        ``(outputs, kept)``: the per-batch outputs in item order, and ``kept`` [m] long, the item indices they
        cover (``arange(n_items)`` unless items were left out under ``"skip"``).
    """
    outputs, kept = [], []
    for index, args in iter_items(
        split, load_visual, batch_size, device, on_error=on_error, ledger=ledger, where=where
    ):
        outputs.append(encode(*args))
        kept.append(index)
    if not kept:
        raise ValueError(f"no item of {split.name} could be read ({split.n_items} tried): nothing to encode")
    return outputs, torch.cat(kept)


def _left_out(metrics: dict, split: RetrievalSplit, kept: RetrievalSplit) -> dict:
    """``metrics`` plus how many items and captions of ``split`` were left out, when any were."""
    if kept.n_items == split.n_items:
        return metrics
    return {**metrics, "left_out_items": split.n_items - kept.n_items, "left_out_texts": split.n_texts - kept.n_texts}


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


def teacher_token_rows(
    teacher,
    split: RetrievalSplit,
    load_visual: Callable,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    on_error: str = "raise",
    ledger: SkipLedger | None = None,
    where: str = "teacher tokens",
    left_out: dict[int, str] | None = None,
    rows: range | None = None,
    shape: tuple[tuple[int, int], int | None] | None = None,
):
    """Yield the teacher's visual tokens (on the CPU) for every row of ``split`` (or of ``rows``, one process's
    shard), in item order: the chunks `TokenStore.write` (or `TokenStore.fill`) takes, so that row i of the store
    is item i.

    Under ``on_error="skip"`` a row whose item cannot be read holds zeros (placeholders, never scores: the store
    refuses them) and ``left_out[row]`` is set to its reason as the chunks are consumed; ``shape`` (tokens [N, D],
    mask width or None) lets a shard with no readable item still yield its placeholders. Call it under
    ``torch.no_grad()`` (a generator cannot hold the grad mode for its caller).
    """
    from teachers import VisualTokens

    if left_out is None and on_error == "skip":
        raise ValueError("teacher_token_rows(on_error='skip') needs a left_out dict to list the rows it leaves empty")
    rows = range(split.n_items) if rows is None else rows
    row = rows.start  # next row to yield; a real chunk's tokens [N, D] and mask width, for placeholders

    def placeholders(lo: int, hi: int, index: torch.Tensor | None = None, real=None):
        for r in set(range(lo, hi)) - set([] if index is None else index.tolist()):
            left_out[r] = ledger.reason(split.item_paths[r])  # iter_items recorded it before leaving it out
        tokens = torch.zeros((hi - lo, *shape[0]))
        mask = None if shape[1] is None else torch.ones((hi - lo, shape[1]), dtype=torch.bool)
        if real is not None:
            tokens[index - lo] = real.tokens.float()
            if mask is not None:
                mask[index - lo] = real.mask
        return VisualTokens(tokens, mask)

    items = iter_items(split, load_visual, batch_size, device, on_error=on_error, ledger=ledger, where=where, rows=rows)
    for index, args in items:
        chunk = teacher.encode_visual(*args).to(device="cpu")
        shape = (tuple(chunk.tokens.shape[1:]), None if chunk.mask is None else chunk.mask.shape[1])
        hi = int(index[-1]) + 1
        yield chunk if hi - row == len(index) else placeholders(row, hi, index, chunk)
        row = hi
    if row < rows.stop:  # the last items could not be read
        if shape is None:
            raise ValueError(f"no item of {split.name} could be read ({len(rows)} tried): no teacher tokens")
        yield placeholders(row, rows.stop)


def token_shape(teacher, split: RetrievalSplit, load_visual: Callable) -> tuple[tuple[int, int], int | None]:
    """The shape of one item's teacher tokens ([N, D], and the padding mask's width or None), from the first item
    of ``split`` that can be read (every process finds the same one). An item that cannot be read is not recorded
    here: the pass that reads it for its tokens records it."""
    dataset = VisualDataset(split, load_visual, on_error="skip")
    for i in range(len(dataset)):
        sample = dataset[i]
        if isinstance(sample, dict) and "item_index" in sample:
            vt = teacher.encode_visual(*visual_args(collate([sample])))
            return tuple(vt.tokens.shape[1:]), None if vt.mask is None else int(vt.mask.shape[1])
    raise ValueError(f"no item of {split.name} could be read ({len(dataset)} tried): no teacher tokens")


def shard(n: int, rank: int, world: int) -> range:
    """Process ``rank``'s contiguous share of ``n`` rows (sizes differ by at most one)."""
    return range(rank * n // world, (rank + 1) * n // world)


@torch.no_grad()
def build_token_store(
    teacher,
    split: RetrievalSplit,
    load_visual: Callable,
    path,
    *,
    meta: dict,
    batch_size: int,
    device: torch.device | str = "cpu",
    accelerator=None,
    on_error: str = "raise",
    ledger: SkipLedger | None = None,
    where: str = "teacher tokens",
) -> dict[int, str]:
    """Write the teacher's `TokenStore` of ``split`` at ``path``, every process extracting its own shard of rows.

    Why: a store of a large split (COCO train at 224 px: ~119 GB for captioner_base) extracted by one process
    while the others wait at a barrier takes world-size times as long and can outlast a collective timeout.
    Here process 0 allocates the store's arrays in a temporary directory, every process encodes its contiguous
    rows and writes them in place (disjoint rows of one memory-mapped file: nothing is copied or merged), the
    rows left out under ``data.on_error=skip`` are gathered, and process 0 commits the store. The only waits are
    for the slowest shard (shards differ by at most one row) and for the commit. ``path`` must be on a
    filesystem every process sees (as checkpoints must).

    Returns:
        The rows left out (row -> reason), on every process; the store's stamp is ``meta``.
    """
    from fastslow.artefacts import temp_dir_for
    from teachers import TokenStore

    world = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    shape = token_shape(teacher.to(device), split, load_visual)
    tmp = None
    if rank == 0:
        tmp = temp_dir_for(Path(path))
        TokenStore.allocate(tmp, split.n_items, *shape[0], has_mask=shape[1] is not None)
    if world > 1:
        from accelerate.utils import broadcast_object_list

        tmp = Path(broadcast_object_list([None if tmp is None else str(tmp)])[0])
    left_out: dict[int, str] = {}
    mine = shard(split.n_items, rank, world)
    if len(mine):
        chunks = teacher_token_rows(teacher, split, load_visual, batch_size, device, on_error=on_error,
                                    ledger=ledger, where=where, left_out=left_out, rows=mine, shape=shape)  # fmt: skip
        TokenStore.fill(tmp, mine.start, mine.stop, chunks)
    if world > 1:
        from accelerate.utils import gather_object

        left_out = {row: why for part in gather_object([left_out]) for row, why in part.items()}
    if rank == 0:
        TokenStore.commit(tmp, path, split.item_ids, meta, overwrite=True, skipped=left_out)
    if world > 1:
        accelerator.wait_for_everyone()  # the store is at `path` before anyone opens it
    return left_out


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


def _shard(n: int, shard: bool) -> range:
    """This process's contiguous part of ``range(n)`` (rank order, so that gathered parts line up), all without
    ``shard`` or on one process."""
    from fastslow.losses import process_group

    rank, world = process_group() if shard else (0, 1)
    return range(n * rank // world, n * (rank + 1) // world)


def _gather(x: torch.Tensor, device, shard: bool) -> torch.Tensor:
    """Every process's rows of ``x`` in rank order, on the CPU (through ``device``: NCCL gathers GPU tensors)."""
    if not shard:
        return x
    from fastslow.losses import gather_rows

    return gather_rows(x.to(device), grad=False)[0].cpu()


def _read_items(encode, split, load_visual, batch_size, device, shard, **skip) -> tuple[list, torch.Tensor]:
    """``encode`` over this process's items that can be read: (outputs, their indices in ``split``)."""
    part = _shard(split.n_items, shard)
    if not len(part):
        return [], torch.zeros(0, dtype=torch.long)
    mine = split if len(part) == split.n_items else split.select_items(part)
    outputs, kept = [], []
    for index, args in iter_items(mine, load_visual, batch_size, device, **skip):
        outputs.append(encode(*args))
        kept.append(index + part.start)
    return outputs, torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)


def _read_split(split: RetrievalSplit, kept: torch.Tensor) -> RetrievalSplit:
    if not len(kept):
        raise ValueError(f"no item of {split.name} could be read ({split.n_items} tried): nothing to evaluate")
    return split if len(kept) == split.n_items else split.select_items(kept.tolist())


def evaluate_teacher(
    teacher,
    split: RetrievalSplit,
    load_visual: Callable,
    tokenizer: TextTokenizer,
    *,
    max_length: int,
    text_batch: int = 64,
    on_error: str = "raise",
    ledger: SkipLedger | None = None,
    where: str = "eval",
    shard: bool = False,
) -> dict[str, float]:
    """Full-ranking retrieval metrics of the teacher on a split (every text against every item).

    Under ``on_error="skip"`` the items that cannot be read and their captions are left out of the ranking
    and counted in ``left_out_items`` / ``left_out_texts`` (see `iter_items`).

    With ``shard`` (validation while training: every process calls it) each process encodes a contiguous part of
    the items and scores every text against them only; the score columns are gathered, so each process holds the
    visual tokens of 1/world of the items and scores 1/world of the pairs, and every process returns the metrics of
    the whole ranking. Each process records in its own ``ledger`` what its part leaves out (the trainer unites them).
    """
    from teachers import VisualTokens

    device = next(teacher.parameters()).device
    skip = dict(on_error=on_error, ledger=ledger, where=where)
    chunks, kept = _read_items(teacher.encode_visual, split, load_visual, 64, device, shard, **skip)
    # Without shard, the texts of the items read; with it, every text (which items the others read is not known
    # yet), trimmed after the gather.
    read = _read_split(split, kept) if not shard else split
    if chunks:
        visual = VisualTokens.cat(chunks)
        scores = teacher_score_matrix(teacher, visual, tokenizer, read.captions, max_length=max_length,
                                      text_batch=text_batch)  # fmt: skip
    else:
        scores = torch.zeros(read.n_texts, 0)
    if shard:
        scores, kept = _gather(scores.T.contiguous(), device, shard).T, _gather(kept, device, shard)
        read = _read_split(split, kept)
        keep = set(kept.tolist())
        scores = scores[[t for t, item in enumerate(split.text_to_visual) if item in keep]]
    return _left_out(retrieval_metrics(scores, read.text_to_visual), split, read)


def evaluate_student(
    student,
    split: RetrievalSplit,
    load_visual: Callable,
    tokenizer: TextTokenizer,
    *,
    max_length: int,
    on_error: str = "raise",
    ledger: SkipLedger | None = None,
    where: str = "eval",
    shard: bool = False,
) -> dict[str, float]:
    """Exact (brute-force dot product) retrieval metrics of the student on a split (``on_error``, ``shard``: see
    `evaluate_teacher`; sharded, each process encodes a part of the items and of the texts, then all are
    gathered)."""
    device = next(student.parameters()).device
    skip = dict(on_error=on_error, ledger=ledger, where=where)
    out, kept = _read_items(student.encode_visual, split, load_visual, 128, device, shard, **skip)
    dim = student.config.embed_dim  # an empty part still gathers as [0, E]
    items = torch.cat([o.float().cpu() for o in out]) if out else torch.zeros(0, dim)
    if shard:
        items, kept = _gather(items, device, shard), _gather(kept, device, shard)
    read = _read_split(split, kept)
    part = _shard(read.n_texts, shard)
    texts = encode_texts_student(student, tokenizer, read.captions[part.start : part.stop], max_length=max_length)
    texts = _gather(texts if len(texts) else torch.zeros(0, dim), device, shard)
    return _left_out(retrieval_metrics(texts @ items.T, read.text_to_visual), split, read)


class StoreTeacherScorer:
    """The teacher at query time: scores (query text, gallery item) pairs from the gallery's cached
    visual tokens (`TokenStore`), never running the visual backbone.

    Args:
        teacher: the trained teacher (eval mode, no gradients).
        store: the gallery's `TokenStore` (`${output_dir}/index/tokens`), or `VisualTokens` in memory.
        tokenizer, max_length: how query texts become ids.
        chunk: pairs per teacher call (bounds memory).
        autocast: None (float32) or torch.bfloat16 / torch.float16 for the fast path (`candidates`): the teacher's
            decoder under `torch.autocast`, scores within the bound tests/test_teachers.py states. Off by default:
            measured 0.8-2.0x pairs/s on a contended 2-core AMX CPU, at equal within-list R@1 on a trained shapes
            teacher (60.6 / 60.8, 98.8% of top-1s unchanged).
    """

    def __init__(self, teacher, store, tokenizer: TextTokenizer, max_length: int, chunk: int = 2048,
                 autocast: torch.dtype | None = None):  # fmt: skip
        self.teacher, self.store, self.tokenizer, self.max_length, self.chunk = (
            teacher,
            store,
            tokenizer,
            max_length,
            chunk,
        )
        self.device = next(teacher.parameters()).device
        self.autocast = autocast

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

    def distinct(self, item_ids: torch.Tensor):
        """The visual tokens of the distinct ids in ``item_ids`` (any shape, ids >= 0), read in one go, and the
        flat index of each id among them: ``(VisualTokens [U], index [item_ids.numel()])``.

        The distinct rows are read once, in increasing order (one fancy-index read of the memory map, sequential on
        disk): Q queries x k candidates cost one read, not Q * k, and an item that several queries retrieve is read
        (and scored by `score_candidates`' key/value projections) once.
        """
        flat = torch.as_tensor(item_ids).reshape(-1).cpu()
        rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        return self._visual(rows), inverse

    @torch.no_grad()
    def candidates(self, texts: list[str], item_ids: torch.Tensor) -> torch.Tensor:
        """The fast rerank path: scores of each query against its own candidates only, [Q, k] -> [Q, k] float32 (CPU).

        The store is read once (`distinct`) and the teacher's `score_candidates` shares each text's item-independent
        work across its k candidates and each item's text-independent work across the queries that retrieved it;
        ids of -1 (faiss's "no result") are not scored and get NaN. Equal to calling the scorer on the flattened
        pairs (``tests/test_query.py`` checks the bound).

        Args:
            texts: Q query strings.
            item_ids: [Q, k] long gallery rows (-1 = no result).
        """
        item_ids = torch.as_tensor(item_ids).long().cpu()
        q, k = item_ids.shape
        out = torch.full((q, k), float("nan"))
        valid = item_ids >= 0
        if not valid.any():
            return out
        if not hasattr(self.teacher, "score_candidates") or not valid.all():
            # A ragged candidate list (an IVF probe that came back short): the aligned-pairs path.
            rows = torch.arange(q).unsqueeze(1).expand_as(item_ids)
            out[valid] = self(texts, rows[valid], item_ids[valid])
            return out
        ids, mask = tokenize(self.tokenizer, texts, self.max_length, self.device)
        per_chunk = max(1, self.chunk // k)  # whole queries per teacher call: bounds memory like __call__
        for s in range(0, q, per_chunk):
            block = item_ids[s : s + per_chunk]
            visual, index = self.distinct(block)
            out[s : s + len(block)] = (
                self.teacher.score_candidates(
                    visual, ids[s : s + len(block)], mask[s : s + len(block)], chunk=self.chunk, index=index,
                    autocast=self.autocast,
                )
                .float()
                .cpu()
            )
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
