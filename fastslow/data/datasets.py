"""Retrieval splits, the torch datasets over them, the collate function and the skip report.

The bad-input policy (``on_error``) lives in two places:

- at load time (`load_karpathy`, `load_vatex`): items whose file is missing or that have no captions
  either raise `DataError` (``"raise"``) or are dropped and listed in `RetrievalSplit.skipped` (``"skip"``);
- at read time (`PairDataset`, `VisualDataset`): a file that exists but cannot be decoded either raises
  the loader's `DataError` (``"raise"``) or turns the sample into ``{"skipped": (path, reason)}``, which
  `collate` drops and lists in ``batch["skipped"]`` (``"skip"``).

A batch whose samples were all skipped is still a valid dict: ``batch["empty"]`` is True and it holds
no visual or text tensors, only ``batch["skipped"]`` and a zero-length ``batch["item_index"]``; the
trainer skips such a batch and counts it. `report_skipped` / `SkipCounter` summarise what was dropped;
a run's account of every distinct file, over all its passes and processes, is `fastslow.data.skips.SkipLedger`.
"""

from __future__ import annotations

import functools
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fastslow.data.loaders import swap_left_right
from fastslow.errors import DataError

__all__ = [
    "ON_ERROR",
    "RetrievalSplit",
    "PairDataset",
    "VisualDataset",
    "collate",
    "report_skipped",
    "SkipCounter",
]

ON_ERROR = ("raise", "skip")

# Captions are tokenised in chunks so that the tokenizer's per-text Encoding objects (offsets, token
# strings) never exist for a whole COCO train split at once; only the id matrix is kept.
_TOKENIZE_CHUNK = 32768


def check_on_error(on_error: str) -> str:
    """Return ``on_error`` if it is ``"raise"`` or ``"skip"``, else raise ValueError naming the recipe key."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r} (recipe key data.on_error)")
    return on_error


@dataclass
class RetrievalSplit:
    """One retrieval split: visual items, their captions, and which caption belongs to which item.

    Attributes:
        name: e.g. ``"flickr30k/test"``, ``"vatex/validation"``.
        modality: ``"image"`` or ``"video"``.
        item_ids: one per visual item (Karpathy filename / VATEX videoID).
        item_paths: absolute path of the image or the ``.npy`` feature file, one per item.
        captions: every caption, flattened, grouped by item (an item's captions are contiguous).
        text_to_visual: caption ``i`` belongs to item ``text_to_visual[i]``.
        skipped: ``(path, reason)`` of the items dropped at load time under ``on_error="skip"``.
        skipped_captions: path -> number of captions each of those items had (the pairs the split lost), so
            that a run's `SkipLedger` can count caption samples for files that never reach a dataset.
        dropped_captions: captions of the kept items left out by a per-item cap (``max_captions``; the standard
            5-per-image protocol of COCO's 5k test), counted so that the log and the index manifest can say so.
    """

    name: str
    modality: str
    item_ids: list[str]
    item_paths: list[str]
    captions: list[str]
    text_to_visual: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped_captions: dict[str, int] = field(default_factory=dict)
    dropped_captions: int = 0

    def __post_init__(self) -> None:
        # Catch a hand-built split that is inconsistent here rather than as an index error mid-epoch.
        if self.modality not in ("image", "video"):
            raise ValueError(
                f"RetrievalSplit {self.name!r}: modality must be 'image' or 'video', got {self.modality!r}"
            )
        if len(self.item_ids) != len(self.item_paths):
            raise ValueError(
                f"RetrievalSplit {self.name!r}: {len(self.item_ids)} item_ids but {len(self.item_paths)} item_paths"
            )
        if len(self.captions) != len(self.text_to_visual):
            raise ValueError(
                f"RetrievalSplit {self.name!r}: {len(self.captions)} captions but "
                f"{len(self.text_to_visual)} text_to_visual entries"
            )
        if self.text_to_visual and (min(self.text_to_visual) < 0 or max(self.text_to_visual) >= len(self.item_ids)):
            raise ValueError(
                f"RetrievalSplit {self.name!r}: text_to_visual refers to items outside 0..{self.n_items - 1}"
            )

    @property
    def n_items(self) -> int:
        """Number of visual items."""
        return len(self.item_ids)

    @property
    def n_texts(self) -> int:
        """Number of captions."""
        return len(self.captions)

    def select_items(self, items: Sequence[int]) -> RetrievalSplit:
        """The split restricted to ``items`` (indices, increasing) and their captions, e.g. without the items a
        pass could not read under ``on_error="skip"``; ``skipped`` is carried over as is.

        Args:
            items: indices of the items kept, in increasing order (captions stay grouped by item).

        Returns:
            A new split; item ``j`` of it is item ``items[j]`` of this one.
        """
        items = [int(i) for i in items]
        if any(b <= a for a, b in zip(items, items[1:])):
            raise ValueError(f"RetrievalSplit {self.name!r}: select_items needs increasing item indices")
        new_index = {old: new for new, old in enumerate(items)}
        texts = [t for t, item in enumerate(self.text_to_visual) if item in new_index]
        return RetrievalSplit(
            self.name,
            self.modality,
            [self.item_ids[i] for i in items],
            [self.item_paths[i] for i in items],
            [self.captions[t] for t in texts],
            [new_index[self.text_to_visual[t]] for t in texts],
            list(self.skipped),
            dict(self.skipped_captions),
            self.dropped_captions,
        )

    def sample_items(self, n: int | None, seed: int = 0) -> RetrievalSplit:
        """A fixed sample of ``n`` items with all their captions, in split order (``eval.val_items``: validation on a
        capped part of a large val split, the same items at every validation and in every run of the split).

        Args:
            n: items kept; None, or at least `n_items`, keeps the split as it is.
            seed: which sample (a torch.Generator seed; a constant by default, so runs compare).

        Returns:
            ``select_items`` of ``n`` items drawn without replacement, sorted.
        """
        if n is None or n >= self.n_items:
            return self
        if n < 1:
            raise ValueError(f"RetrievalSplit {self.name!r}: sample_items needs n >= 1, got {n}")
        drawn = torch.randperm(self.n_items, generator=torch.Generator().manual_seed(seed))[:n]
        return self.select_items(sorted(drawn.tolist()))


@dataclass
class _Entry:
    """One visual item as read from an annotation file, before the load-time checks."""

    item_id: str
    path: str
    captions: list[str]
    where: str  # location in the annotation file, e.g. "images[12]", for error messages


def _assemble_split(
    name: str,
    modality: str,
    entries: list[_Entry],
    *,
    ann_file: str,
    folder: str,
    on_error: str,
    max_captions: int | None,
) -> RetrievalSplit:
    """Apply the load-time checks (captions present, file exists) and flatten entries into a split.

    Args:
        name: split name.
        modality: ``"image"`` or ``"video"``.
        entries: the items in annotation order.
        ann_file: the annotation file (for messages).
        folder: the image / feature folder (for messages).
        on_error: ``"raise"`` or ``"skip"``.
        max_captions: keep at most this many captions per item (the first ones in file order), or all when None.

    Returns:
        The split, with dropped items listed in ``skipped`` under ``on_error="skip"`` and the number of captions the
        cap left out in ``dropped_captions``.
    """
    check_on_error(on_error)
    if max_captions is not None and max_captions < 1:
        raise ValueError(f"max_captions must be >= 1 or None, got {max_captions}")
    kind = "image" if modality == "image" else "feature"

    no_captions = [e for e in entries if not e.captions]
    if no_captions and on_error == "raise":
        first = no_captions[0]
        raise DataError.for_file(
            ann_file,
            f"{first.where} ({first.item_id}) has no captions ({len(no_captions)} of {len(entries)} items have none)",
            "fix the annotation file or set data.on_error=skip to drop such items",
            reason="no captions",
        )
    # One stat per item: cheap next to decoding, and it turns a missing file into one clear error now
    # instead of a crash hours into an epoch.
    missing = [e for e in entries if e.captions and not os.path.exists(e.path)]
    if missing and on_error == "raise":
        hint = f"the {kind} folder {folder} does not exist" if not os.path.isdir(folder) else f"look in {folder}"
        raise DataError.for_file(
            missing[0].path,
            f"{kind} file not found ({len(missing)} of {len(entries)} {kind} files listed in {ann_file} are missing)",
            f"{hint}; check data.root, or set data.on_error=skip to drop the missing items",
            reason="missing file",
        )

    skipped: list[tuple[str, str]] = [(e.path, "no captions") for e in no_captions]
    skipped += [(e.path, "missing file") for e in missing]
    skipped_captions = {e.path: len(e.captions if max_captions is None else e.captions[:max_captions]) for e in missing}
    dropped = {id(e) for e in no_captions} | {id(e) for e in missing}
    item_ids, item_paths, captions, text_to_visual = [], [], [], []
    capped = 0
    for entry in entries:
        if id(entry) in dropped:
            continue
        index = len(item_ids)
        item_ids.append(entry.item_id)
        item_paths.append(entry.path)
        kept = entry.captions if max_captions is None else entry.captions[:max_captions]
        captions.extend(kept)
        text_to_visual.extend([index] * len(kept))
        capped += len(entry.captions) - len(kept)
    return RetrievalSplit(
        name, modality, item_ids, item_paths, captions, text_to_visual, skipped, skipped_captions, capped
    )


def _load_or_skip(load_visual: Callable[[str], Any], path: str, on_error: str) -> tuple[Any, dict | None]:
    """Call ``load_visual(path)``; under ``skip`` turn a `DataError` into a skipped-sample dict."""
    try:
        return load_visual(path), None
    except DataError as err:
        if on_error == "raise":
            raise
        return None, {"skipped": (path, err.reason)}


class PairDataset(Dataset):
    """One sample per caption, paired with its visual item; used to train on (text, visual) pairs.

    All captions are tokenised once here (batched, in the tokenizer's Rust code), so ``__getitem__`` only
    loads the visual item. Captions are padded to the longest caption of the split (at most
    ``max_length``); `collate` trims each batch back to its own longest caption.

    Args:
        split: the retrieval split.
        load_visual: ``path -> visual``, e.g. `ImageLoader` (``[3, H, W]``) or `FeatureLoader`
            (``([T, D], [T])``).
        tokenizer: a `fastslow.tokenizer.TextTokenizer` (anything with ``encode(texts, max_length)`` and
            ``pad_id``).
        max_length: longest token sequence, BOS and EOS included.
        on_error: ``"raise"`` lets the loader's `DataError` propagate; ``"skip"`` returns
            ``{"skipped": (path, reason)}`` for that sample.

    A sample is ``{"visual", "input_ids" [L] long, "attention_mask" [L] long, "item_index": int,
    "text_index": int}``.

    Horizontal flips: when ``load_visual`` has ``hflip > 0`` (`AugmentingImageLoader`), each sample is mirrored with
    that probability (``load_visual(path, flip=True)``) and then carries the tokens of its caption with "left" and
    "right" swapped (`swap_left_right`, tokenised once here too), so that the pair stays true.
    """

    def __init__(
        self,
        split: RetrievalSplit,
        load_visual: Callable[[str], Any],
        tokenizer: Any,
        max_length: int,
        on_error: str = "raise",
    ) -> None:
        self.split = split
        self.load_visual = load_visual
        self.on_error = check_on_error(on_error)
        self.input_ids, self.attention_mask = _tokenize_all(tokenizer, split.captions, max_length)
        self.hflip = float(getattr(load_visual, "hflip", 0.0))
        if self.hflip > 0:
            mirrored = [swap_left_right(c) for c in split.captions]
            ids, mask = _tokenize_all(tokenizer, mirrored, max_length)
            width = max(ids.shape[1], self.input_ids.shape[1])
            self.input_ids, self.attention_mask = (
                F.pad(self.input_ids, (0, width - self.input_ids.shape[1]), value=tokenizer.pad_id),
                F.pad(self.attention_mask, (0, width - self.attention_mask.shape[1]), value=False),
            )
            self.flipped_ids = F.pad(ids, (0, width - ids.shape[1]), value=tokenizer.pad_id)
            self.flipped_mask = F.pad(mask, (0, width - mask.shape[1]), value=False)

    def __len__(self) -> int:
        return self.split.n_texts

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.split.text_to_visual[index]
        path = self.split.item_paths[item]
        # torch's generator: seeded by set_seed in the main process and per worker by the DataLoader.
        flip = self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        load = functools.partial(self.load_visual, flip=True) if flip else self.load_visual
        visual, skipped = _load_or_skip(load, path, self.on_error)
        if skipped is not None:
            return skipped
        ids, mask = (self.flipped_ids, self.flipped_mask) if flip else (self.input_ids, self.attention_mask)
        return {
            "visual": visual,
            # Stored compactly (int32 / bool) for a 600k-caption split; the models expect long.
            "input_ids": ids[index].long(),
            "attention_mask": mask[index].long(),
            "item_index": item,
            "text_index": index,
        }


def _tokenize_all(tokenizer: Any, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise every caption: ``(input_ids [N, L] int32, attention_mask [N, L] bool)``, L the longest row."""
    chunks = [
        tokenizer.encode(list(captions[i : i + _TOKENIZE_CHUNK]), max_length)
        for i in range(0, len(captions), _TOKENIZE_CHUNK)
    ]
    if not chunks:
        return torch.zeros(0, 0, dtype=torch.int32), torch.zeros(0, 0, dtype=torch.bool)
    width = max(ids.shape[1] for ids, _ in chunks)
    ids = torch.cat([F.pad(i, (0, width - i.shape[1]), value=tokenizer.pad_id) for i, _ in chunks])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1]), value=0) for _, m in chunks])
    return ids.to(torch.int32), mask.bool()


class VisualDataset(Dataset):
    """One sample per visual item, ``{"visual", "item_index": int}``; used to encode a gallery.

    Args:
        split: the retrieval split.
        load_visual: ``path -> visual`` (see `PairDataset`).
        on_error: ``"raise"`` or ``"skip"`` (see `PairDataset`).
    """

    def __init__(self, split: RetrievalSplit, load_visual: Callable[[str], Any], on_error: str = "raise") -> None:
        self.split = split
        self.load_visual = load_visual
        self.on_error = check_on_error(on_error)

    def __len__(self) -> int:
        return self.split.n_items

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.split.item_paths[index]
        visual, skipped = _load_or_skip(self.load_visual, path, self.on_error)
        if skipped is not None:
            return skipped
        return {"visual": visual, "item_index": index}


def collate(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack samples into a batch, dropping the skipped ones.

    Args:
        samples: sample dicts from `PairDataset` / `VisualDataset`; ``{"skipped": (path, reason)}`` and
            ``None`` mark samples that failed under ``on_error="skip"``.

    Returns:
        A dict with, for the B kept samples:
        ``pixels`` [B, 3, H, W] float (image items) or ``features`` [B, T, D] float and ``frame_mask``
        [B, T] bool (video items); ``input_ids`` and ``attention_mask`` [B, L] long, trimmed to the longest
        caption in the batch (pair samples only); ``item_index`` [B] long; ``text_index`` [B] long (pair
        samples only); always ``skipped`` (list of ``(path, reason)``) and ``empty`` (True when B == 0,
        in which case only ``skipped``, ``empty`` and a zero-length ``item_index`` are present).
    """
    skipped: list[tuple[str, str]] = []
    kept: list[dict[str, Any]] = []
    for sample in samples:
        if sample is None:
            skipped.append(("<unknown>", "sample is None"))
        elif "skipped" in sample:
            skipped.append(tuple(sample["skipped"]))
        else:
            kept.append(sample)
    batch: dict[str, Any] = {"skipped": skipped, "empty": not kept}
    if not kept:
        batch["item_index"] = torch.zeros(0, dtype=torch.long)
        return batch

    visual = kept[0]["visual"]
    if isinstance(visual, torch.Tensor):
        batch["pixels"] = torch.stack([s["visual"] for s in kept])
    elif isinstance(visual, (tuple, list)) and len(visual) == 2:
        batch["features"] = torch.stack([s["visual"][0] for s in kept])
        batch["frame_mask"] = torch.stack([s["visual"][1] for s in kept])
    else:
        raise TypeError(f"collate: 'visual' must be a tensor or a (features, mask) pair, got {type(visual).__name__}")
    batch["item_index"] = torch.tensor([s["item_index"] for s in kept], dtype=torch.long)
    if "text_index" in kept[0]:
        batch["text_index"] = torch.tensor([s["text_index"] for s in kept], dtype=torch.long)
    if "input_ids" in kept[0]:
        attention_mask = torch.stack([s["attention_mask"] for s in kept])
        # Rows are right-padded (BOS w.. EOS PAD..), so columns past the longest real row are all padding.
        width = max(int(attention_mask.sum(1).max()), 1)
        batch["input_ids"] = torch.stack([s["input_ids"] for s in kept])[:, :width]
        batch["attention_mask"] = attention_mask[:, :width]
    return batch


def report_skipped(skipped: Iterable[tuple[str, str]], max_examples: int = 3) -> str:
    """Summarise skipped samples by reason, with a few example paths.

    Args:
        skipped: ``(path, reason)`` pairs, e.g. the concatenation of ``batch["skipped"]`` over an epoch or
            a split's ``skipped`` list. A file skipped several times (one image, five captions) counts as
            several samples but one file.
        max_examples: example paths shown per reason.

    Returns:
        ``""`` when nothing was skipped, else e.g.::

            skipped 7 samples (3 files)
              truncated image: 5 samples, 2 files, e.g. /d/a.jpg, /d/b.jpg
              missing file: 2 samples, 1 file, e.g. /d/c.jpg
    """
    skipped = list(skipped)
    if not skipped:
        return ""
    samples = Counter(reason for _, reason in skipped)
    files: dict[str, dict[str, None]] = defaultdict(dict)  # dict as an ordered set: examples in first-seen order
    for path, reason in skipped:
        files[reason][path] = None
    n_files = len({path for path, _ in skipped})
    lines = [f"skipped {len(skipped)} sample{'s' * (len(skipped) != 1)} ({n_files} file{'s' * (n_files != 1)})"]
    for reason, count in samples.most_common():
        paths = list(files[reason])
        examples = ", ".join(paths[:max_examples]) + (", ..." if len(paths) > max_examples else "")
        n_paths = len(paths)
        lines.append(
            f"  {reason}: {count} sample{'s' * (count != 1)}, {n_paths} file{'s' * (n_paths != 1)}, e.g. {examples}"
        )
    return "\n".join(lines)


class SkipCounter:
    """Accumulates ``batch["skipped"]`` over an epoch; ``report()`` is `report_skipped` of everything seen.

    Example:
        >>> counter = SkipCounter()
        >>> for batch in loader:
        ...     counter.update(batch["skipped"])
        >>> print(counter.report())
    """

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []
        self.empty_batches = 0

    def update(self, skipped: Iterable[tuple[str, str]], empty: bool = False) -> None:
        """Add one batch's ``skipped`` list; pass ``empty=batch["empty"]`` to also count empty batches."""
        self.skipped.extend((str(p), str(r)) for p, r in skipped)
        self.empty_batches += int(empty)

    @property
    def total(self) -> int:
        """Number of skipped samples seen so far."""
        return len(self.skipped)

    def report(self, max_examples: int = 3) -> str:
        """`report_skipped` of everything seen, plus the number of empty batches if any."""
        text = report_skipped(self.skipped, max_examples)
        if self.empty_batches:
            text += f"\n  {self.empty_batches} batch{'es' * (self.empty_batches != 1)} had no usable sample"
        return text

    def reset(self) -> None:
        """Forget everything (call at the start of an epoch)."""
        self.skipped.clear()
        self.empty_batches = 0
