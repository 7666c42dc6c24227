"""On-disk cache of teacher scores for (text, item) pairs, so distillation computes each pair once across runs.

The Slow teacher costs a decoder pass per (text, item) pair; distillation needs its scores for the same candidate
pairs epoch after epoch and run after run. This cache keeps them in one SQLite database per directory::

    <directory>/scores.sqlite        tables ``meta`` (the stamp) and ``scores`` (text_idx, item_idx) -> score
    <directory>/scores.sqlite-wal    SQLite's write-ahead log and its index; present while a connection is open
    <directory>/scores.sqlite-shm

Why SQLite. Every rank of an ``accelerate launch`` run reads and writes the cache at every step. An earlier
home-made store (one ``.npy`` shard per write, memory-mapped, compacted by rank 0 only) grew by a shard and two
mmaps per step on the other ranks and hit ``vm.max_map_count`` after ~32k steps. SQLite is in the standard
library (no new dependency), its write-ahead log lets readers run while one writer commits, its file locks
serialise writers from several processes (the busy timeout makes a writer wait for the lock instead of failing),
and a crash mid-transaction leaves the previous state. The file count is fixed (the three files above) and memory
is SQLite's page cache, whatever the number of steps. LMDB would serve too, but needs a package and a map size
fixed in advance.

Scores are stored as REAL (float64), which holds every float32 exactly, so a score comes back bit for bit as it was
added. The one exception is -0.0: SQLite stores an integral REAL as an integer and reads it back as +0.0, so
``add`` stores +0.0 for it (the same value; no softmax or KL can tell them apart).

The stamp (format version, teacher weights hash, candidate source, dataset hash, item count, tokenizer hash,
max_length, and the visual settings such as ``data.image_size``) is written once, by whichever process creates the
database, and every later opening compares it field by field (`fastslow.artefacts.check_fields`, which lists every
field that differs): a cache of another teacher, tokenisation or image size is refused, never silently mixed in.
Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastslow.artefacts import check_fields
from fastslow.errors import StaleArtefactError, UserError, file_message

__all__ = ["CacheMismatchError", "TeacherScoreCache", "hash_dataset", "FORMAT", "FORMAT_VERSION", "DB_FILE"]

FORMAT = "fastslow.teacher_score_cache"
# Bump when the schema or the meaning of a column changes; an old cache is then refused rather than misread.
# Version 1 was the sharded .npy layout (manifest.json + shard_*.json).
FORMAT_VERSION = 2
DB_FILE = "scores.sqlite"
_OLD_MANIFEST = "manifest.json"
# SQLite's own side files; with them, the database is the only thing a cache directory holds.
_DB_SUFFIXES = ("", "-wal", "-shm", "-journal")
# A writer holds the lock for one short transaction per step, so a long wait means a stuck process, not load.
DEFAULT_TIMEOUT = 120.0
# After a checkpoint SQLite truncates the write-ahead log to this size, so it does not keep its high-water mark.
_WAL_SIZE_LIMIT = 64 << 20
_INT64_MAX = np.iinfo(np.int64).max
_INHERITED: list[sqlite3.Connection] = []  # connections a forked child got from its parent: kept, never closed

IndexLike = torch.Tensor | np.ndarray | Sequence[int]
ComputeFn = Callable[[Any, Any], Any]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # WITHOUT ROWID: the rows live in the primary-key B-tree itself, so a lookup is one tree search and a pair
    # costs no extra rowid index.
    "CREATE TABLE IF NOT EXISTS scores (text_idx INTEGER NOT NULL, item_idx INTEGER NOT NULL, score REAL NOT NULL, "
    "PRIMARY KEY (text_idx, item_idx)) WITHOUT ROWID",
)



class CacheMismatchError(StaleArtefactError):
    """An existing cache was made for another teacher, candidate source, dataset, tokenizer, visual setting or
    format version (or the directory is not a cache of this format)."""


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
        # A NaN stored in the cache would poison every later run that reuses it (and SQLite turns NaN into NULL).
        raise ValueError(f"{what} contains NaN or inf: refusing to cache non-finite teacher scores")
    return arr


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    """True for "this file is not (or no longer) a database", False for lock timeouts and misuse."""
    name = getattr(e, "sqlite_errorname", "")  # Python >= 3.11
    if name:
        return name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))
    text = str(e)
    return "not a database" in text or "malformed" in text


class TeacherScoreCache:
    """Teacher scores for (text index, item index) pairs in one SQLite database, shared by every process of a run.

    Any number of processes (the ranks of one run, or several runs on one cache) may open, ``add`` and ``lookup``
    at once: each sees every pair another has committed, with no refresh and no compaction.

    Args:
        directory: the cache directory (created when ``create`` and missing). One directory holds the scores of one
            teacher checkpoint, one candidate source and one dataset: pick a directory per source.
        teacher_hash: hash of the teacher checkpoint (e.g. ``fastslow.stages.weights_hash(teacher_dir)``).
        source: how the candidate pairs were chosen, e.g. ``"inbatch:seed=0:bs=64"`` or
            ``"mined:k=16:round=3:student=<hash>"``.
        dataset_hash: identity of the indices, e.g. ``hash_dataset(split.captions, split.item_ids)``.
        n_items: number of items (``item_idx`` must be in ``[0, n_items)``). Required to create a cache; when
            opening one, None takes the stored value and any other value must match it.
        tokenizer_hash: hash of the tokenizer the teacher's texts were encoded with (e.g. of ``tokenizer.json``);
            None when unknown, which is stamped too (a cache stamped None is refused by a caller that knows it).
        max_length: token length the texts were truncated to; None when unknown (stamped like ``tokenizer_hash``).
        settings: other recipe settings the scores depend on, by recipe key, e.g. ``{"data.image_size": 224}``
            (the teacher sees the images at that size); each one is stamped and checked like the fields above.
        create: create the directory and database when missing; False raises FileNotFoundError instead.
        timeout: seconds a write waits for another process's transaction before failing.

    Raises:
        CacheMismatchError: the database was stamped with another teacher, source, dataset, item count, tokenizer,
            max_length or format version, or the directory holds other files and no database.
        UserError: the database file is not a readable SQLite database.
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
        tokenizer_hash: str | None = None,
        max_length: int | None = None,
        settings: dict[str, Any] | None = None,
        create: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_FILE
        self.timeout = float(timeout)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        stamp = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "teacher_hash": str(teacher_hash),
            "source": str(source),
            "dataset_hash": str(dataset_hash),
            "n_items": None if n_items is None else int(n_items),
            "tokenizer_hash": None if tokenizer_hash is None else str(tokenizer_hash),
            "max_length": None if max_length is None else int(max_length),
            **(settings or {}),
        }
        self._check_directory(create, stamp["n_items"])
        self.stamp = self._open(stamp)
        self.n_items: int = int(self.stamp["n_items"])

    # ------------------------------------------------------------------------------------------------ opening

    def _check_directory(self, create: bool, n_items: int | None) -> None:
        if self.path.is_file():
            return
        if not create:
            raise FileNotFoundError(f"no teacher score cache at {self.directory} ({DB_FILE} missing)")
        old = self.directory / _OLD_MANIFEST
        if old.is_file():
            raise CacheMismatchError(
                f"{self.directory} holds a teacher score cache in the old sharded format ({_OLD_MANIFEST}, "
                f"shard_*.json); this code reads {FORMAT!r} version {FORMAT_VERSION} ({DB_FILE}): delete "
                f"{self.directory} and rerun tools/distill.py, which recomputes the scores",
                path=self.directory,
            )
        if n_items is None or n_items <= 0:
            raise ValueError(f"n_items must be a positive int to create a score cache, got {n_items!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        ours = {DB_FILE + s for s in _DB_SUFFIXES}
        others = sorted(p.name for p in self.directory.iterdir() if p.name not in ours)
        if others:
            raise CacheMismatchError(
                f"{self.directory} is not empty ({', '.join(others[:3])}, ...) and has no {DB_FILE}: it is not a "
                f"teacher score cache; move those files or open the cache in a new or empty directory",
                path=self.directory,
            )

    @contextlib.contextmanager
    def _db_errors(self) -> Iterator[None]:
        """Turn "file is not a database" into a message that names the file and the fix; let the rest through."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            if not _is_corruption(e):
                raise
            raise UserError(
                file_message(
                    self.path,
                    f"not a readable SQLite database ({e})",
                    f"delete it (and {DB_FILE}-wal, {DB_FILE}-shm beside it) and rerun tools/distill.py, "
                    f"which recomputes the teacher scores",
                )
            ) from e

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross fork(): a forked child (e.g. a DataLoader worker) opens its own, and never
        # closes the inherited one, whose close could act on locks and files that belong to the parent's.
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:
                _INHERITED.append(self._conn)
            # isolation_level=None: no implicit transactions; every transaction below is explicit.
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                with self._db_errors():
                    self._set_wal(conn)
                    # NORMAL is enough under WAL: a crash (of the process or the machine) loses at most the last
                    # transactions, never the database's consistency, and a lost score is only recomputed.
                    conn.execute("PRAGMA synchronous=NORMAL")
                    conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
                    conn.execute("PRAGMA temp_store=MEMORY")  # the lookup table below is per call and small
                    conn.execute(
                        "CREATE TEMP TABLE IF NOT EXISTS query (pos INTEGER PRIMARY KEY, t INTEGER, i INTEGER)"
                    )
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        # WAL is a property of the database file, set by its first opener. Switching needs a moment of exclusive
        # access, for which SQLite does not always call the busy handler when several processes create the file at
        # once, so we retry here until the timeout.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                mode = None
            if mode == "wal":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: could not switch to WAL mode within {self.timeout:.0f} s ({mode})")
            time.sleep(0.01)

    def _open(self, stamp: dict[str, Any]) -> dict[str, Any]:
        conn = self._connection()
        with self._db_errors(), self._transaction("IMMEDIATE"):
            for statement in _SCHEMA:
                conn.execute(statement)
            # The first opener stamps the database; IMMEDIATE serialises openers, and OR IGNORE keeps a stamp
            # another process wrote. An existing database is never re-stamped, even where it lacks a field: a
            # missing field is a mismatch, below.
            if conn.execute("SELECT count(*) FROM meta").fetchone()[0] == 0:
                if stamp["n_items"] is None or stamp["n_items"] <= 0:
                    raise ValueError(
                        f"n_items must be a positive int to create a score cache, got {stamp['n_items']!r}"
                    )
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in stamp.items()]
                    + [("created", json.dumps(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))],
                )
            stored = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        self._check_stamp(stored, stamp)
        return stored

    def _check_stamp(self, stored: dict[str, Any], stamp: dict[str, Any]) -> None:
        # tools/distill.py keeps the cache in ${output_dir}/cache/ (there is no setting for it), hence this advice.
        fix = f"delete {self.directory} (tools/distill.py then recomputes the scores) or run with another output_dir"
        if stamp["n_items"] is None:  # take the stored count, which must be valid
            if not isinstance(stored.get("n_items"), int) or stored["n_items"] <= 0:
                raise CacheMismatchError(
                    f"{self.path} has no valid n_items in its stamp ({stored.get('n_items')!r}): {fix}", path=self.path
                )
            stamp = {k: v for k, v in stamp.items() if k != "n_items"}
        check_fields(stored, stamp, path=self.path, rebuild=fix, error=CacheMismatchError)

    @contextlib.contextmanager
    def _transaction(self, kind: str = "DEFERRED") -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE takes the write lock up front (waiting up to ``timeout``), so a writer never
        has to upgrade a read snapshot, which SQLite refuses without waiting when another process wrote meanwhile."""
        conn = self._connection()
        conn.execute(f"BEGIN {kind}")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connection (the last one to close folds the write-ahead log into the database)."""
        if self._conn is not None:
            if self._pid == os.getpid():
                self._conn.close()
            else:
                _INHERITED.append(self._conn)  # see _connection
        self._conn = None

    def __enter__(self) -> TeacherScoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- lookups

    def _pairs(self, text_idx: IndexLike, item_idx: IndexLike) -> tuple[np.ndarray, np.ndarray]:
        t = _to_numpy_index(text_idx, "text_idx")
        i = _to_numpy_index(item_idx, "item_idx")
        if t.shape != i.shape:
            raise ValueError(f"text_idx and item_idx must have the same shape, got {t.shape} and {i.shape}")
        if t.size:
            if i.min() < 0 or i.max() >= self.n_items:
                raise ValueError(f"item_idx must be in [0, {self.n_items}), got values in [{i.min()}, {i.max()}]")
            # The key below (for deduplication) must not overflow int64.
            if t.min() < 0 or t.max() > (_INT64_MAX - self.n_items) // self.n_items:
                raise ValueError(f"text_idx must be >= 0 and small enough for an int64 key, got [{t.min()}, {t.max()}]")
        return t, i

    def _lookup_keys(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keys [P] int64 (``text * n_items + item``) -> (scores float32 [P], found bool [P]), 0 where not found."""
        uniq, inverse = np.unique(keys, return_inverse=True)
        scores = np.zeros(uniq.size, np.float64)
        found = np.zeros(uniq.size, bool)
        if uniq.size:
            # One join against a temporary table of the wanted pairs: one statement whatever their number (an IN
            # list is capped by SQLite's variable limit), each pair one primary-key search.
            rows = zip(range(uniq.size), (uniq // self.n_items).tolist(), (uniq % self.n_items).tolist())
            with self._db_errors(), self._transaction() as conn:
                conn.execute("DELETE FROM temp.query")
                conn.executemany("INSERT INTO temp.query (pos, t, i) VALUES (?, ?, ?)", rows)
                hits = conn.execute(
                    "SELECT q.pos, s.score FROM temp.query AS q JOIN scores AS s "
                    "ON s.text_idx = q.t AND s.item_idx = q.i"
                ).fetchall()
                conn.execute("DELETE FROM temp.query")
            if hits:
                pos, value = zip(*hits)
                scores[list(pos)] = value
                found[list(pos)] = True
        # float64 -> float32 is exact here: every stored value was a float32.
        return scores.astype(np.float32)[inverse], found[inverse]

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
        t, i = self._pairs(text_idx, item_idx)
        scores, found = self._lookup_keys(t * self.n_items + i)
        if isinstance(text_idx, torch.Tensor):
            return torch.from_numpy(scores).to(text_idx.device), torch.from_numpy(found).to(text_idx.device)
        return scores, found

    def __len__(self) -> int:
        """Number of (text, item) pairs cached, by every process."""
        with self._db_errors():
            return int(self._connection().execute("SELECT count(*) FROM scores").fetchone()[0])

    def __repr__(self) -> str:
        s = self.stamp
        return (
            f"TeacherScoreCache({str(self.directory)!r}, teacher={s['teacher_hash']}, source={s['source']!r}, "
            f"pairs={len(self)})"
        )

    # -------------------------------------------------------------------------------------------------- writes

    def _insert(self, keys: np.ndarray, values: np.ndarray) -> int:
        """Insert unique ``keys`` [n] with float32 ``values`` [n] in one transaction; pairs already stored keep
        their score. Returns the number of new pairs."""
        values = values + np.float32(0.0)  # -0.0 -> +0.0, which is what SQLite would read back (module docstring)
        rows = zip((keys // self.n_items).tolist(), (keys % self.n_items).tolist(), values.astype(np.float64).tolist())
        with self._db_errors(), self._transaction("IMMEDIATE") as conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO scores (text_idx, item_idx, score) VALUES (?, ?, ?)", rows)
            return conn.total_changes - before

    def add(self, text_idx: IndexLike, item_idx: IndexLike, scores: Any) -> int:
        """Store scores for aligned pairs in one transaction; pairs already cached (or repeated) are stored once.

        Args:
            text_idx: [P] int text indices.
            item_idx: [P] int item indices in ``[0, n_items)``.
            scores: [P] float teacher scores (torch or numpy), finite. For a pair repeated in the call, the first
                occurrence is kept; a pair already cached (by any process) keeps its cached score.

        Returns:
            Number of new pairs written.
        """
        t, i = self._pairs(text_idx, item_idx)
        values = _to_numpy_scores(scores, t.size, "scores")
        keys, first = np.unique(t * self.n_items + i, return_index=True)
        if keys.size == 0:
            return 0
        return self._insert(keys, values[first])

    def get_or_compute(
        self, text_idx: IndexLike, item_idx: IndexLike, compute_fn: ComputeFn, *, chunk: int = 65536
    ) -> Any:
        """Scores of aligned pairs, computing (and caching) only the pairs not cached yet.

        Args:
            text_idx: [P] int text indices.
            item_idx: [P] int item indices in ``[0, n_items)``.
            compute_fn: ``(text_idx [M], item_idx [M]) -> scores [M]`` for unique missing pairs; it receives int64
                CPU torch tensors when ``text_idx`` is a tensor, else int64 numpy arrays, and may return torch or
                numpy. Called once per chunk; each chunk's scores are committed before the next chunk, so an
                interrupted call keeps what it computed.
            chunk: most pairs per ``compute_fn`` call (and per transaction).

        Returns:
            scores: [P] float32, torch on ``text_idx``'s device when it is a tensor, else numpy.
        """
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        t, i = self._pairs(text_idx, item_idx)
        keys = t * self.n_items + i
        scores, found = self._lookup_keys(keys)
        missing = np.unique(keys[~found])
        as_torch = isinstance(text_idx, torch.Tensor)
        computed = np.empty(missing.size, np.float32)
        for start in range(0, missing.size, chunk):
            part = missing[start : start + chunk]
            pt, pi = part // self.n_items, part % self.n_items
            out = compute_fn(torch.from_numpy(pt), torch.from_numpy(pi)) if as_torch else compute_fn(pt, pi)
            computed[start : start + part.size] = _to_numpy_scores(out, part.size, "compute_fn's output")
            # Another process may have stored some of these pairs meanwhile; its score is kept (OR IGNORE) and
            # ours returned, the same score since the teacher is deterministic.
            self._insert(part, computed[start : start + part.size])
        if missing.size:
            scores[~found] = computed[np.searchsorted(missing, keys[~found])] + np.float32(0.0)
        return torch.from_numpy(scores).to(text_idx.device) if as_torch else scores
