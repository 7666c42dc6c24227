"""The run's account of bad input under ``data.on_error=skip``: one `SkipLedger`, whatever pass met the file.

Every pass that reads visual items (the load-time checks, training batches, the teacher's token store, the
miner's bank, validation, gallery encoding, evaluation) records the files it leaves out in one ledger. A file
is recorded once, however many passes, epochs or processes met it: with the reason of its first failure and
the number of captions its item carries, i.e. the caption samples the run could not use. Because entries are
keyed by path, ledgers of several processes combine by union (`gather_ledger`), so nothing is counted twice.

The end-of-run line is `SkipLedger.report`, e.g.
``4 files skipped (1 missing, 1 empty, 1 truncated, 1 not an image), 6 caption samples``, and `SkipLedger.save`
writes the list (path, reason, captions, passes) to ``<stage dir>/skipped_files.json``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fastslow.errors import DataError

__all__ = ["SKIP_FILE", "SkipLedger", "captions_per_path", "gather_ledger", "reason_of"]

SKIP_FILE = "skipped_files.json"
_FORMAT = "fastslow-skipped-files"

# Report order and short names: the reasons the loaders give (fastslow.data.loaders), the common ones first, so
# that two reports of the same data read alike; any other reason follows, alphabetically, under its own name.
_ORDER = ("missing file", "no captions", "empty file", "truncated image", "corrupt image", "not an image")
_SHORT = {"missing file": "missing", "empty file": "empty", "truncated image": "truncated", "corrupt image": "corrupt"}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


class SkipLedger:
    """Distinct files left out by a run, each once: ``path -> {"reason", "captions", "passes"}``.

    Example:
        >>> ledger = SkipLedger()
        >>> ledger.add_split(train)                      # load-time drops: missing files, items without captions
        >>> ledger.add("/d/x.jpg", "truncated image", where="train", captions=5)
        >>> print(ledger.report())
        2 files skipped (1 missing, 1 truncated), 10 caption samples
    """

    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}

    def add(self, path: str | os.PathLike, reason: str, *, where: str, captions: int = 0) -> None:
        """Record that the pass ``where`` left out ``path`` for ``reason``; its item carries ``captions`` captions.

        A file already recorded keeps its first reason; ``where`` joins its passes and the caption count is the
        largest seen (every pass over one split sees the same item).
        """
        path = os.fspath(path)
        entry = self.files.get(path)
        if entry is None:
            self.files[path] = {"reason": str(reason), "captions": int(captions), "passes": [where]}
            return
        entry["captions"] = max(entry["captions"], int(captions))
        if where not in entry["passes"]:
            entry["passes"].append(where)

    def add_split(self, split: Any, where: str = "load") -> None:
        """Record the items a split dropped at load time (`RetrievalSplit.skipped`, with their caption counts)."""
        counts = getattr(split, "skipped_captions", {})
        for path, reason in split.skipped:
            self.add(path, reason, where=where, captions=counts.get(path, 0))

    def add_batch(self, skipped: Iterable[tuple[str, str]], captions: Mapping[str, int], *, where: str) -> None:
        """Record a batch's ``skipped`` list (`collate`); ``captions`` is `captions_per_path` of its split."""
        for path, reason in skipped:
            self.add(path, reason, where=where, captions=captions.get(path, 0))

    def reason(self, path: str | os.PathLike) -> str | None:
        """The recorded reason for ``path``, or None when it was not left out."""
        entry = self.files.get(os.fspath(path))
        return None if entry is None else entry["reason"]

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.fspath(path) in self.files

    @property
    def n_captions(self) -> int:
        """Caption samples of all the files left out (each file's captions counted once)."""
        return sum(entry["captions"] for entry in self.files.values())

    def by_reason(self) -> dict[str, int]:
        """Files per reason, in report order."""
        counts = Counter(entry["reason"] for entry in self.files.values())
        rank = {reason: i for i, reason in enumerate(_ORDER)}
        return {r: counts[r] for r in sorted(counts, key=lambda r: (rank.get(r, len(_ORDER)), r))}

    def report(self) -> str:
        """One line, ``""`` when nothing was left out: ``"4 files skipped (1 missing, ...), 6 caption samples"``."""
        if not self.files:
            return ""
        parts = ", ".join(f"{n} {_SHORT.get(reason, reason)}" for reason, n in self.by_reason().items())
        return f"{_plural(len(self.files), 'file')} skipped ({parts}), {_plural(self.n_captions, 'caption sample')}"

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """A JSON-serialisable copy of the entries (what a checkpoint keeps)."""
        return {path: {**entry, "passes": list(entry["passes"])} for path, entry in self.files.items()}

    def merge(self, other: SkipLedger | Mapping[str, Mapping[str, Any]]) -> SkipLedger:
        """Union ``other`` (a ledger or its `state_dict`) into this one, by path; returns ``self``."""
        files = other.files if isinstance(other, SkipLedger) else other
        for path, entry in files.items():
            for where in entry.get("passes") or ["?"]:
                self.add(path, entry["reason"], where=where, captions=entry.get("captions", 0))
        return self

    def to_json(self) -> dict[str, Any]:
        """The list as written to ``skipped_files.json``: totals, files per reason, then one entry per file."""
        return {
            "format": _FORMAT,
            "n_files": len(self.files),
            "n_captions": self.n_captions,
            "by_reason": self.by_reason(),
            "files": [{"path": path, **entry} for path, entry in sorted(self.files.items())],
        }

    def save(self, directory: str | os.PathLike) -> Path | None:
        """Write ``directory/skipped_files.json`` (atomically) when something was left out, and return its path.

        With nothing left out a list from an earlier run in the same directory is removed, so the file always
        describes the last run; returns None then.
        """
        from fastslow.artefacts import atomic_write_json

        path = Path(directory) / SKIP_FILE
        if not self.files:
            path.unlink(missing_ok=True)
            return None
        return atomic_write_json(path, self.to_json())


def captions_per_path(split: Any) -> dict[str, int]:
    """How many captions each item file of a split carries (what a skipped read of that file costs)."""
    counts = Counter(split.text_to_visual)
    out: dict[str, int] = {}
    for item, path in enumerate(split.item_paths):
        out[path] = out.get(path, 0) + counts.get(item, 0)
    return out


def gather_ledger(ledger: SkipLedger, accelerator: Any = None) -> SkipLedger:
    """Every process's ledger merged into ``ledger`` (a collective: every process must call it); returns it.

    On one process (or without an accelerator) the ledger is returned as is.
    """
    if accelerator is None or accelerator.num_processes <= 1:
        return ledger
    from accelerate.utils import gather_object

    for state in gather_object([ledger.state_dict()]):
        ledger.merge(state)
    return ledger


def reason_of(load_visual: Callable[[str], Any], path: str) -> str | None:
    """Why ``load_visual(path)`` fails (the `DataError` reason), or None when the file loads.

    Used to name the reason of an item that a sharded, resumable pass left out without keeping the reason.
    """
    try:
        load_visual(path)
    except DataError as err:
        return err.reason
    return None
