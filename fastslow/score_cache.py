"""On-disk cache of teacher scores for (text, item) pairs, so distillation computes each pair once across runs.

The Slow teacher costs a decoder pass per (text, item) pair; distillation needs its scores for the same candidate
pairs epoch after epoch and run after run. This cache keeps them on disk, memory-mapped, keyed by

    key = text_index * n_items + item_index        (int64; ``n_items`` is fixed in the manifest)

Layout of a cache directory (one directory = one teacher + one candidate source + one dataset)::

    manifest.json                   stamp, written once: format version, teacher_hash, source, dataset_hash, n_items
    keys_<id>.npy                   int64 [n], sorted, unique: the shard's keys
    scores_<id>.npy                 float32 [n]: the teacher score of each key
    shard_<id>.json                 commit record: names the two .npy files, n, key range, shards it replaces

A shard is *complete* iff its commit record exists: the two ``.npy`` files are written to temporary names, fsynced
and renamed (``os.replace``, atomic on one filesystem) before the record, which is itself written to a temporary
name and renamed. So the manifest proper (``manifest.json`` plus the set of commit records) lists complete shards
only; a leftover ``.tmp-*`` file or a ``.npy`` pair without a record (an interrupted write) is ignored. We keep one
record per shard rather than a shard list inside ``manifest.json`` because several processes may add shards at the
same time: a shared list would need a read-modify-write under a file lock, a record per shard needs no lock.

Several processes (``accelerate launch``). Every process may ``add``: a shard id is ``r<rank>-<counter>-<random>``,
so two writers never pick the same file name, and every write is temp-then-rename, so readers never see a partial
shard. A process sees its own new shards at once and the other processes' shards after ``refresh()``. Two ranks
that compute the same pair both store it; ``lookup`` is unaffected (the teacher is deterministic) and ``__len__``
counts unique pairs; ``compact()`` removes such duplicates. The simplest use is still: compute on the main process,
``add`` there, broadcast the scores (or ``refresh()`` on the other ranks after a barrier).

Compaction merges every complete shard into one and records the names it replaces, so a crash midway leaves
either the old shards or the merged one in effect, never both. Readers that had memory-mapped a deleted shard
keep reading it (POSIX keeps an unlinked, mapped file alive) until their next ``refresh()``. Compaction is safe
to run concurrently with writers; two concurrent compactions are safe but wasteful, so only rank 0 compacts
automatically.

Files are plain ``.npy`` (``allow_pickle=False``) and JSON: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastslow.errors import UserError

__all__ = ["CacheMismatchError", "TeacherScoreCache", "hash_dataset", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fastslow.teacher_score_cache"
# Bump when the layout or the key formula changes; an old cache is then refused rather than misread.
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
_SHARD_ID = re.compile(r"^r(\d+)-(\d+)-[0-9a-f]+$")
_INT64_MAX = np.iinfo(np.int64).max

IndexLike = torch.Tensor | np.ndarray | Sequence[int]
ComputeFn = Callable[[Any, Any], Any]


class CacheMismatchError(UserError):
    """An existing cache directory was made for another teacher, candidate source, dataset or format version."""


def hash_dataset(captions: Sequence[str], item_ids: Sequence[Any], length: int = 16) -> str:
    """Short sha256 of the ordered caption list and item ids: what ``text_index`` and ``item_index`` refer to.

    Args:
        captions: every caption, in text-index order.
        item_ids: every item id, in item-index order (converted with ``str``).
        length: number of hex characters kept.

    Returns:
        Hex digest prefix; reordering, adding or editing one caption or item changes it.
    """
    payload = json.dumps(
        {"captions": list(captions), "item_ids": [str(i) for i in item_ids]}, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


@dataclass
class _Shard:
    """One complete shard, memory-mapped."""

    name: str  # the shard id
    keys: np.ndarray  # int64 [n], sorted ascending, unique (np.memmap)
    scores: np.ndarray  # float32 [n] (np.memmap)
    min_key: int
    max_key: int


def _fsync_dir(path: Path) -> None:
    # Makes the renames durable across a power loss; best effort (some filesystems refuse O_RDONLY on directories).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    """A temporary sibling unique to this process and call; the ``.tmp-`` prefix keeps it out of every glob."""
    return path.with_name(f".tmp-{path.name}.{os.getpid()}.{os.urandom(4).hex()}")


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _to_numpy_index(x: IndexLike, name: str) -> np.ndarray:
    """Torch / numpy / list of ints [P] -> int64 numpy [P]."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {x.dtype}")
        x = x.detach().to("cpu", torch.int64).numpy()
    arr = np.asarray(x)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [P], got shape {tuple(arr.shape)}")
    return arr


def _to_numpy_scores(x: Any, n: int, what: str) -> np.ndarray:
    """Torch / numpy scores [n] -> float32 numpy [n], finite."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape [{n}] (one score per pair), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        # A NaN stored in the cache would poison every later run that reuses it.
        raise ValueError(f"{what} contains NaN or inf: refusing to cache non-finite teacher scores")
    return arr


class TeacherScoreCache:
    """Sharded, memory-mapped store of teacher scores for (text index, item index) pairs.

    Args:
        directory: the cache directory (created when ``create`` and missing). One directory holds the scores of one
            teacher checkpoint, one candidate source and one dataset: pick a directory per source.
        teacher_hash: hash of the teacher checkpoint (e.g. ``fastslow.stages.weights_hash(teacher_dir)``).
        source: how the candidate pairs were chosen, e.g. ``"inbatch:seed=0:bs=64"`` or
            ``"mined:k=16:round=3:student=<hash>"``.
        dataset_hash: identity of the indices, e.g. ``hash_dataset(split.captions, split.item_ids)``.
        n_items: number of items (the key is ``text_index * n_items + item_index``). Required to create a cache;
            when opening one, None takes the manifest's value and any other value must match it.
        create: create the directory and manifest when missing; False raises FileNotFoundError instead.
        rank: this process's rank, used in shard names; default ``$RANK`` (set by torchrun/accelerate) or 0.
        auto_compact: on rank 0, ``add`` calls ``compact()`` when more than this many shards are complete
            (each ``lookup`` searches every shard). None never compacts automatically.

    Raises:
        CacheMismatchError: the directory's manifest was written for another teacher, source, dataset, item count or
            format version, or the directory holds other files and no manifest.
        FileNotFoundError: ``create=False`` and there is no cache at ``directory``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        teacher_hash: str,
        source: str,
        dataset_hash: str,
        n_items: int | None = None,
        create: bool = True,
        rank: int | None = None,
        auto_compact: int | None = 64,
    ) -> None:
        self.directory = Path(directory)
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
        self.auto_compact = auto_compact
        stamp = {"teacher_hash": str(teacher_hash), "source": str(source), "dataset_hash": str(dataset_hash)}
        self.manifest = self._open_manifest(stamp, n_items, create)
        self.n_items: int = int(self.manifest["n_items"])
        self._shards: dict[str, _Shard] = {}
        self._replaced: set[str] = set()
        self._n_unique: int | None = 0  # None = unknown (shards may overlap); recomputed lazily by __len__
        self._counter = self._next_counter()
        self.refresh()

    # ------------------------------------------------------------------------------------------------ manifest

    def _open_manifest(self, stamp: dict[str, str], n_items: int | None, create: bool) -> dict[str, Any]:
        path = self.directory / MANIFEST_FILE
        if not path.is_file():
            if not create:
                raise FileNotFoundError(f"no teacher score cache at {self.directory} ({MANIFEST_FILE} missing)")
            if n_items is None or int(n_items) <= 0:
                raise ValueError(f"n_items must be a positive int to create a score cache, got {n_items!r}")
            self.directory.mkdir(parents=True, exist_ok=True)
            # Our own temp files may remain from a crash during creation; anything else means a wrong directory.
            others = [p.name for p in self.directory.iterdir() if not p.name.startswith(".tmp-")]
            if others:
                raise CacheMismatchError(
                    f"{self.directory} is not empty ({', '.join(sorted(others)[:3])}, ...) and has no {MANIFEST_FILE}: "
                    f"it is not a teacher score cache; point loss.cache_dir at a new or empty directory"
                )
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                **stamp,
                "n_items": int(n_items),
                "key": "text_index * n_items + item_index",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            # Several ranks may create the same cache at once: each writes a whole file and renames it, so the
            # last rename wins and every rank then reads (and checks) that one below.
            _write_atomic(path, lambda f: json.dump(manifest, f, indent=1), "w")
            _fsync_dir(self.directory)
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        self._check_manifest(manifest, stamp, n_items)
        return manifest

    def _check_manifest(self, manifest: dict[str, Any], stamp: dict[str, str], n_items: int | None) -> None:
        d = self.directory
        fix = f"delete {d} or point loss.cache_dir elsewhere"
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{d / MANIFEST_FILE} has format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                f"but this code reads {FORMAT!r} version {FORMAT_VERSION}: {fix}"
            )
        if manifest.get("teacher_hash") != stamp["teacher_hash"]:
            raise CacheMismatchError(
                f"scores in {d} were computed by teacher {manifest.get('teacher_hash')}, but the current teacher is "
                f"{stamp['teacher_hash']}: {fix}"
            )
        if manifest.get("source") != stamp["source"]:
            raise CacheMismatchError(
                f"scores in {d} are for candidate source {manifest.get('source')!r}, but the current source is "
                f"{stamp['source']!r}: {fix}"
            )
        if manifest.get("dataset_hash") != stamp["dataset_hash"]:
            raise CacheMismatchError(
                f"scores in {d} index dataset {manifest.get('dataset_hash')} (captions + item ids), but the current "
                f"dataset is {stamp['dataset_hash']}: {fix}"
            )
        if n_items is not None and int(n_items) != manifest.get("n_items"):
            raise CacheMismatchError(
                f"scores in {d} are keyed with n_items={manifest.get('n_items')}, but the current dataset has "
                f"n_items={int(n_items)}: {fix}"
            )

    # -------------------------------------------------------------------------------------------------- shards

    def _next_counter(self) -> int:
        """1 + the largest counter of this rank's shard files (cosmetic order; the random suffix prevents clashes)."""
        top = -1
        for p in self.directory.glob("*_r*.*"):
            m = _SHARD_ID.match(p.name.split("_", 1)[-1].rsplit(".", 1)[0])
            if m and int(m.group(1)) == self.rank:
                top = max(top, int(m.group(2)))
        return top + 1

    def _read_records(self) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Commit records in the directory.

        Returns:
            active: ``{shard id: record}`` for every record that no other record replaces.
            replaced: ids of records still on disk that another record replaces (left by an interrupted compaction).
        """
        records = {}
        for p in self.directory.glob("shard_*.json"):
            try:
                with open(p, encoding="utf-8") as f:
                    records[p.name[len("shard_") : -len(".json")]] = json.load(f)
            except FileNotFoundError:  # deleted by a concurrent compaction since the glob
                continue
            except json.JSONDecodeError as e:  # records are renamed into place whole, so this is corruption
                raise ValueError(
                    f"file {p}: unreadable shard record ({e}); delete it and its keys_/scores_ files"
                ) from e
        replaced = {name for rec in records.values() for name in rec.get("replaces", [])} & set(records)
        return {name: rec for name, rec in records.items() if name not in replaced}, replaced

    def _map_shard(self, name: str, record: dict[str, Any]) -> _Shard:
        keys = np.load(self.directory / record["keys"], mmap_mode="r", allow_pickle=False)
        scores = np.load(self.directory / record["scores"], mmap_mode="r", allow_pickle=False)
        n = int(record["n"])
        if keys.shape != (n,) or scores.shape != (n,) or keys.dtype != np.int64 or scores.dtype != np.float32:
            raise ValueError(
                f"shard {name} in {self.directory} is corrupt: its record says {n} pairs, its files hold keys "
                f"{keys.dtype}{list(keys.shape)} and scores {scores.dtype}{list(scores.shape)}; "
                f"delete shard_{name}.json"
            )
        return _Shard(name, keys, scores, int(record["min_key"]), int(record["max_key"]))

    def refresh(self) -> None:
        """Pick up the complete shards written since the last refresh (by other processes) and drop replaced ones."""
        for attempt in range(5):
            records, replaced = self._read_records()
            try:
                new = {name: self._map_shard(name, rec) for name, rec in records.items() if name not in self._shards}
            except FileNotFoundError:
                # A concurrent compaction deleted a shard between our listing and our mapping; its merged record is
                # already written (records are removed before files), so listing again finds it.
                if attempt == 4:
                    raise
                continue
            break
        kept = {name: shard for name, shard in self._shards.items() if name in records}
        if new or len(kept) != len(self._shards):
            self._n_unique = None if (new or kept) else 0
        self._shards = {**kept, **new}
        self._replaced = replaced

    @property
    def n_shards(self) -> int:
        """Number of complete shards currently mapped."""
        return len(self._shards)

    def __len__(self) -> int:
        """Number of unique (text, item) pairs cached (in the shards seen at the last refresh or own write)."""
        if self._n_unique is None:
            shards = list(self._shards.values())
            if len(shards) == 1:
                self._n_unique = len(shards[0].keys)
            else:
                # Shards from different processes may overlap; count each key once.
                self._n_unique = int(np.unique(np.concatenate([s.keys for s in shards])).size) if shards else 0
        return self._n_unique

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"TeacherScoreCache({str(self.directory)!r}, teacher={m['teacher_hash']}, source={m['source']!r}, "
            f"pairs={len(self)}, shards={self.n_shards})"
        )

    def _write_shard(self, keys: np.ndarray, scores: np.ndarray, replaces: Sequence[str] = ()) -> _Shard:
        """Write sorted unique ``keys`` [n] int64 and ``scores`` [n] float32 as one complete shard."""
        name = f"r{self.rank:03d}-{self._counter:06d}-{os.urandom(4).hex()}"
        self._counter += 1
        keys_file, scores_file = f"keys_{name}.npy", f"scores_{name}.npy"
        # The .npy files go first; the record, written last, is what makes the shard exist.
        _write_atomic(self.directory / keys_file, lambda f: np.save(f, keys, allow_pickle=False), "wb")
        _write_atomic(self.directory / scores_file, lambda f: np.save(f, scores, allow_pickle=False), "wb")
        record = {
            "keys": keys_file,
            "scores": scores_file,
            "n": int(keys.size),
            "min_key": int(keys[0]),
            "max_key": int(keys[-1]),
            "replaces": list(replaces),
            "rank": self.rank,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_atomic(self.directory / f"shard_{name}.json", lambda f: json.dump(record, f, indent=1), "w")
        _fsync_dir(self.directory)
        shard = self._map_shard(name, record)
        self._shards[name] = shard
        return shard

    # ------------------------------------------------------------------------------------------------- lookups

    def _keys(self, text_idx: IndexLike, item_idx: IndexLike) -> np.ndarray:
        t = _to_numpy_index(text_idx, "text_idx")
        i = _to_numpy_index(item_idx, "item_idx")
        if t.shape != i.shape:
            raise ValueError(f"text_idx and item_idx must have the same shape, got {t.shape} and {i.shape}")
        if t.size:
            if i.min() < 0 or i.max() >= self.n_items:
                raise ValueError(f"item_idx must be in [0, {self.n_items}), got values in [{i.min()}, {i.max()}]")
            if t.min() < 0 or t.max() > (_INT64_MAX - self.n_items) // self.n_items:
                raise ValueError(f"text_idx must be >= 0 and small enough for an int64 key, got [{t.min()}, {t.max()}]")
        return t * self.n_items + i

    def _lookup_keys(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keys [P] int64 -> (scores float32 [P], found bool [P]), 0 where not found."""
        uniq, inverse = np.unique(keys, return_inverse=True)  # sorted needles: cache-friendly searchsorted
        scores = np.zeros(uniq.size, np.float32)
        found = np.zeros(uniq.size, bool)
        for shard in self._shards.values():
            todo = np.flatnonzero(~found)
            if todo.size == 0:
                break
            # uniq is sorted, so the needles inside this shard's key range are one slice.
            pending = uniq[todo]
            lo = np.searchsorted(pending, shard.min_key, side="left")
            hi = np.searchsorted(pending, shard.max_key, side="right")
            todo = todo[lo:hi]
            if todo.size == 0:
                continue
            needles = uniq[todo]
            pos = np.searchsorted(shard.keys, needles)
            pos_c = np.minimum(pos, shard.keys.size - 1)
            hit = shard.keys[pos_c] == needles
            scores[todo[hit]] = shard.scores[pos_c[hit]]
            found[todo[hit]] = True
        return scores[inverse], found[inverse]

    def lookup(self, text_idx: IndexLike, item_idx: IndexLike) -> tuple[Any, Any]:
        """Cached scores of aligned pairs ``(text_idx[p], item_idx[p])``.

        Args:
            text_idx: [P] int text indices (torch, numpy or list).
            item_idx: [P] int item indices in ``[0, n_items)``.

        Returns:
            scores: [P] float32, 0 where not found.
            found: [P] bool.
            Torch tensors on ``text_idx``'s device when ``text_idx`` is a tensor, else numpy arrays.
        """
        scores, found = self._lookup_keys(self._keys(text_idx, item_idx))
        if isinstance(text_idx, torch.Tensor):
            return torch.from_numpy(scores).to(text_idx.device), torch.from_numpy(found).to(text_idx.device)
        return scores, found

    # -------------------------------------------------------------------------------------------------- writes

    def add(self, text_idx: IndexLike, item_idx: IndexLike, scores: Any) -> int:
        """Store scores for aligned pairs as one new shard; pairs already cached (or repeated) are stored once.

        Args:
            text_idx: [P] int text indices.
            item_idx: [P] int item indices in ``[0, n_items)``.
            scores: [P] float teacher scores (torch or numpy), finite. For a pair repeated in the call, the first
                occurrence is kept; a pair already cached keeps its cached score.

        Returns:
            Number of new pairs written (0 writes nothing).
        """
        keys = self._keys(text_idx, item_idx)
        values = _to_numpy_scores(scores, keys.size, "scores")
        keys, first = np.unique(keys, return_index=True)
        values = values[first]
        _, cached = self._lookup_keys(keys)
        keys, values = keys[~cached], values[~cached]
        if keys.size == 0:
            return 0
        self._write_shard(keys, values)
        if self._n_unique is not None:
            self._n_unique += int(keys.size)  # the new keys were in no shard we know of
        if self.rank == 0 and self.auto_compact is not None and self.n_shards > self.auto_compact:
            self.compact()
        return int(keys.size)

    def get_or_compute(
        self, text_idx: IndexLike, item_idx: IndexLike, compute_fn: ComputeFn, *, chunk: int = 65536
    ) -> Any:
        """Scores of aligned pairs, computing (and caching) only the pairs not cached yet.

        Args:
            text_idx: [P] int text indices.
            item_idx: [P] int item indices in ``[0, n_items)``.
            compute_fn: ``(text_idx [M], item_idx [M]) -> scores [M]`` for unique missing pairs; it receives int64
                CPU torch tensors when ``text_idx`` is a tensor, else int64 numpy arrays, and may return torch or
                numpy. Called once per chunk; each chunk's scores are stored as a shard before the next chunk, so
                an interrupted call keeps what it computed.
            chunk: most pairs per ``compute_fn`` call (and per shard).

        Returns:
            scores: [P] float32, torch on ``text_idx``'s device when it is a tensor, else numpy.
        """
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        keys = self._keys(text_idx, item_idx)
        scores, found = self._lookup_keys(keys)
        missing = np.unique(keys[~found])
        as_torch = isinstance(text_idx, torch.Tensor)
        computed = np.empty(missing.size, np.float32)
        for start in range(0, missing.size, chunk):
            part = missing[start : start + chunk]
            t, i = part // self.n_items, part % self.n_items
            out = compute_fn(torch.from_numpy(t), torch.from_numpy(i)) if as_torch else compute_fn(t, i)
            computed[start : start + part.size] = _to_numpy_scores(out, part.size, "compute_fn's output")
            self._write_shard(part, computed[start : start + part.size])
            if self._n_unique is not None:
                self._n_unique += int(part.size)
        if missing.size:
            scores[~found] = computed[np.searchsorted(missing, keys[~found])]
            if self.rank == 0 and self.auto_compact is not None and self.n_shards > self.auto_compact:
                self.compact()
        return torch.from_numpy(scores).to(text_idx.device) if as_torch else scores

    def compact(self) -> None:
        """Merge every complete shard into one (deduplicated); the old shard files are then deleted.

        Reads all cached keys and scores into memory once (12 bytes per pair). Crash-safe: the merged shard's
        record lists the shards it replaces, so until the old records are deleted readers ignore them.
        """
        self.refresh()
        if len(self._shards) <= 1:
            return
        shards = list(self._shards.values())
        keys = np.concatenate([np.asarray(s.keys) for s in shards])
        scores = np.concatenate([np.asarray(s.scores) for s in shards])
        keys, first = np.unique(keys, return_index=True)
        # Also replace the shards that an earlier, interrupted compaction replaced but whose records remain: the
        # merged shard supersedes the record that replaced them, and once their records are deleted they cannot
        # come back, so the list stays short. (Not "every other record on disk": a shard another rank wrote after
        # our refresh is not in the merge and must stay.)
        replaces = sorted(set(self._shards) | self._replaced)
        merged = self._write_shard(keys, scores[first], replaces=replaces)
        for name in replaces:  # records first, so a reader never finds a record whose files are gone
            (self.directory / f"shard_{name}.json").unlink(missing_ok=True)
        for name in replaces:
            (self.directory / f"keys_{name}.npy").unlink(missing_ok=True)
            (self.directory / f"scores_{name}.npy").unlink(missing_ok=True)
        self._shards = {merged.name: merged}
        self._n_unique = int(keys.size)
