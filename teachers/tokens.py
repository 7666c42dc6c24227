"""Cacheable visual tokens of the Slow teacher and their memory-mapped on-disk store.

The teacher's visual side runs once, offline: `Captioner.encode_visual` returns a `VisualTokens` batch holding
everything the text decoder needs for an item, and `TokenStore` keeps a gallery of them on disk as fp16 so that the
query-time reranker reads the top-k items' tokens without ever running the backbone again.

Store layout (one directory, written to a temporary sibling and renamed, so readers never see a half-written store)::

    tokens.npy   float16 [num_items, num_tokens, dim]   (np.lib.format, memory-mapped on open)
    mask.npy     bool    [num_items, num_tokens]        (only when the tokens carry a padding mask, e.g. video)
    ids.json     [str] * num_items                      (item ids, row order)
    meta.json    {"format", "version", "num_items", "num_tokens", "dim", "dtype", "has_mask", "meta": {caller's},
                  "skipped": {row: reason}}

The caller's ``meta`` is the store's stamp (what it was built from: teacher weights hash, gallery hash, image size);
it lives in the store's own directory, so the rename that commits the tokens commits their stamp with them.
`TokenStore.open(expect=...)` checks it.

``skipped`` lists rows that hold no tokens (zeros) because their item could not be read under
``data.on_error=skip``: the store keeps one row per item so that row i stays item i, and `TokenStore.get`
refuses those rows rather than hand zeros to the teacher as if they were an item. It sits beside the stamp,
not in it: ``expect`` compares the caller's ``meta`` only, so a checked store may still hold placeholder rows.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastslow.artefacts import check_fields, commit_dir, read_json, temp_dir_for
from fastslow.errors import MissingFileError, StaleArtefactError

__all__ = ["VisualTokens", "TokenStore"]

_FORMAT = "fastslow.TokenStore"
_VERSION = 1


@dataclass
class VisualTokens:
    """A batch of visual tokens: everything the teacher's decoder needs for each item.

    Attributes:
        tokens: [B, N, D] tokens of all visual scales concatenated coarse -> fine.
        mask: [B, N] bool, True = real token (video padding is False), or None when every token is real (images).
    """

    tokens: Tensor
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"VisualTokens.tokens must be [B, N, D], got shape {tuple(self.tokens.shape)}")
        if self.mask is not None:
            if self.mask.shape != self.tokens.shape[:2]:
                raise ValueError(
                    f"VisualTokens.mask must be [B, N] = {tuple(self.tokens.shape[:2])}, got {tuple(self.mask.shape)}"
                )
            if self.mask.dtype != torch.bool:
                self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx: int | slice | Sequence[int] | Tensor | np.ndarray) -> VisualTokens:
        """Select items; an int keeps the batch dimension (a batch of one), so the result is always [b, N, D]."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(idx, None)
        elif isinstance(idx, (list, tuple, np.ndarray)):
            idx = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.tokens.device)
        elif isinstance(idx, Tensor):
            idx = idx.to(self.tokens.device)
        return VisualTokens(self.tokens[idx], None if self.mask is None else self.mask[idx])

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VisualTokens:
        """Move to `device` and cast the tokens (never the bool mask) to `dtype`."""
        mask = None if self.mask is None else self.mask.to(device=device)
        return VisualTokens(self.tokens.to(device=device, dtype=dtype), mask)

    @classmethod
    def cat(cls, items: Sequence[VisualTokens]) -> VisualTokens:
        """Concatenate batches along the item axis.

        Batches with fewer tokens are right-padded with zero tokens marked False in the mask (video galleries whose
        clips were padded to different lengths); a missing mask counts as all True.
        """
        if not items:
            raise ValueError("VisualTokens.cat needs at least one batch")
        n_max = max(it.num_tokens for it in items)
        need_mask = any(it.mask is not None or it.num_tokens != n_max for it in items)
        tokens, masks = [], []
        for it in items:
            pad = n_max - it.num_tokens
            tok = it.tokens
            mask = it.mask if it.mask is not None else torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device)
            if pad:
                tok = torch.nn.functional.pad(tok, (0, 0, 0, pad))
                mask = torch.nn.functional.pad(mask, (0, pad), value=False)
            tokens.append(tok)
            masks.append(mask)
        return cls(torch.cat(tokens), torch.cat(masks) if need_mask else None)


def _as_chunks(tokens: VisualTokens | Iterable[VisualTokens]) -> Iterator[VisualTokens]:
    if isinstance(tokens, VisualTokens):
        yield tokens
    else:
        yield from tokens


def _half(chunk: VisualTokens, row: int) -> np.ndarray:
    """A chunk's tokens as float16 numpy, refused when the cast overflows (rows from ``row``, for the message)."""
    half = chunk.tokens.detach().to("cpu", torch.float32).numpy().astype(np.float16)
    if not np.isfinite(half).all():
        # fp16 saturates at 65504; the teacher's tokens are layer-normed, so this signals a bug upstream.
        raise ValueError(f"non-finite tokens in rows {row}..{row + len(half)} after the cast to float16")
    return half


def _load_array(path: Path, mmap_mode: str | None, rebuild: str) -> np.ndarray:
    """One array of a store (memory-mapped when ``mmap_mode``), or StaleArtefactError naming the file."""
    if not path.is_file():
        raise StaleArtefactError(f"{path} is missing from its token store; to rebuild it: {rebuild}", path=path)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # "mmap length is greater than file size", a bad header
        raise StaleArtefactError(
            f"{path} cannot be read ({path.stat().st_size} bytes: truncated or damaged; {e}); "
            f"to rebuild it: {rebuild}",
            path=path,
            rebuild=rebuild,
        ) from e


def _owned(a: np.ndarray) -> np.ndarray:
    """A writable in-memory array: fancy indexing already copied the rows; a slice of the read-only map is copied."""
    return a if a.flags.writeable and a.flags.c_contiguous and not isinstance(a, np.memmap) else np.array(a)


class TokenStore:
    """A memory-mapped fp16 store of `VisualTokens`, one row per item id.

    Example::

        TokenStore.write(out / "tokens", ids, (teacher.encode_visual(x) for x in loader), meta={"teacher": sha})
        store = TokenStore.open(out / "tokens")
        vt = store[[store.index_of("img_17.jpg"), 3]]      # VisualTokens, float32 [2, N, D]
    """

    def __init__(self, path: Path, tokens: np.ndarray, mask: np.ndarray | None, ids: list[str], meta: dict):
        self.path = path
        self._tokens = tokens
        self._mask = mask
        self.ids = ids
        self.meta = meta
        self._index = {item_id: i for i, item_id in enumerate(ids)}
        if len(self._index) != len(ids):
            raise ValueError(f"{path}: duplicate item ids in ids.json")
        # Rows without tokens (their item could not be read when the store was built): row -> reason.
        self.skipped = {int(row): reason for row, reason in meta.get("skipped", {}).items()}
        self._skipped_rows = np.array(sorted(self.skipped), dtype=np.int64)

    # ---------------------------------------------------------------- writing
    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        ids: Sequence[str],
        tokens: VisualTokens | Iterable[VisualTokens],
        meta: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
        skipped: dict[int, str] | None = None,
    ) -> TokenStore:
        """Write a store atomically (temporary sibling directory, then rename).

        Args:
            path: store directory to create.
            ids: one id per item, in row order.
            tokens: all items at once, or an iterable of chunks (e.g. a generator over a gallery larger than RAM);
                chunks are written to the memory map as they arrive. Their total length must equal `len(ids)`.
            meta: caller's metadata (teacher checkpoint hash, scale sizes, ...), saved under `meta.json["meta"]`.
            overwrite: replace an existing store at `path`; otherwise an existing path is an error.
            skipped: rows that hold placeholder zeros, row -> reason (e.g. from
                `fastslow.evaluation.teacher_token_rows`). Read after the last chunk, so the generator that yields
                the chunks may fill it as it goes.

        Returns:
            The store, opened read-only from its final location.
        """
        path = Path(path)
        ids = cls._check_ids(path, ids, overwrite)
        tmp = temp_dir_for(path)  # after removing what a killed writer of this store left behind
        try:
            n_tok, dim, has_mask = cls._write_arrays(tmp, len(ids), _as_chunks(tokens))
            return cls._commit(tmp, path, ids, n_tok, dim, has_mask, meta, skipped)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # A store written by several processes at once, each its own rows (`fastslow.evaluation.build_token_store`):
    # one process allocates the arrays in a temporary directory, every process fills its rows in place through
    # its own memory map (disjoint rows of one file: no copy, no merge), one process commits.
    @staticmethod
    def allocate(tmp: Path, n_items: int, num_tokens: int, dim: int, has_mask: bool) -> None:
        """Create the zero-filled (sparse on disk) arrays of an ``n_items``-row store in the temporary directory
        ``tmp`` (`fastslow.artefacts.temp_dir_for`), for `fill` to write and `commit` to publish."""
        np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.float16,
                                  shape=(n_items, num_tokens, dim)).flush()  # fmt: skip
        if has_mask:
            mask = np.lib.format.open_memmap(tmp / "mask.npy", mode="w+", dtype=np.bool_, shape=(n_items, num_tokens))
            mask[:] = True
            mask.flush()

    @staticmethod
    def fill(tmp: Path, start: int, stop: int, tokens: VisualTokens | Iterable[VisualTokens]) -> None:
        """Write rows ``start .. stop - 1`` of the arrays `allocate` made in ``tmp``, from chunks in row order; every
        row of the range must come (a chunk past ``stop`` or a short range is an error)."""
        arr = np.load(tmp / "tokens.npy", mmap_mode="r+")
        mask = np.load(tmp / "mask.npy", mmap_mode="r+") if (tmp / "mask.npy").is_file() else None
        row = start
        for chunk in _as_chunks(tokens):
            tok = _half(chunk, row)
            if tok.shape[1:] != arr.shape[1:]:
                raise ValueError(f"chunk of shape {tok.shape[1:]} does not match the store's {arr.shape[1:]}")
            if row + len(tok) > stop:
                raise ValueError(f"token rows past the end of rows {start}..{stop - 1}")
            if chunk.mask is not None and mask is None:
                raise ValueError("a chunk carries a padding mask but the store was allocated without one")
            arr[row : row + len(tok)] = tok
            if mask is not None and chunk.mask is not None:
                mask[row : row + len(tok)] = chunk.mask.cpu().numpy()
            row += len(tok)
        if row != stop:
            raise ValueError(f"TokenStore.fill: got rows {start}..{row - 1} of {start}..{stop - 1}")
        arr.flush()
        if mask is not None:
            mask.flush()

    @classmethod
    def commit(
        cls,
        tmp: Path,
        path: str | os.PathLike,
        ids: Sequence[str],
        meta: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
        skipped: dict[int, str] | None = None,
    ) -> TokenStore:
        """Publish the store that `allocate` and `fill` wrote in ``tmp`` at ``path`` (as `write` does)."""
        path = Path(path)
        ids = cls._check_ids(path, ids, overwrite)
        arr = np.load(tmp / "tokens.npy", mmap_mode="r")
        if len(arr) != len(ids):
            raise ValueError(f"TokenStore.commit: {len(arr)} token rows for {len(ids)} ids")
        try:
            return cls._commit(tmp, path, ids, arr.shape[1], arr.shape[2], (tmp / "mask.npy").is_file(), meta, skipped)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _check_ids(path: Path, ids: Sequence[str], overwrite: bool) -> list[str]:
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise ValueError("TokenStore.write: item ids must be unique")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        return ids

    @classmethod
    def _commit(cls, tmp, path, ids, n_tok, dim, has_mask, meta, skipped) -> TokenStore:
        (tmp / "ids.json").write_text(json.dumps(ids))
        info = dict(
            format=_FORMAT,
            version=_VERSION,
            num_items=len(ids),
            num_tokens=int(n_tok),
            dim=int(dim),
            dtype="float16",
            has_mask=bool(has_mask),
            meta=dict(meta or {}),
            skipped={str(row): reason for row, reason in sorted((skipped or {}).items())},
        )
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, default=str))
        commit_dir(tmp, path)  # fsync every file, rename (an old store is moved aside first), fsync the parent
        return cls.open(path)

    @staticmethod
    def _write_arrays(tmp: Path, n_items: int, chunks: Iterator[VisualTokens]) -> tuple[int, int, bool]:
        arr = mask = None
        row = 0
        for chunk in chunks:
            tok = _half(chunk, row)
            if arr is None:
                n_tok, dim = tok.shape[1:]
                arr = np.lib.format.open_memmap(
                    tmp / "tokens.npy", mode="w+", dtype=np.float16, shape=(n_items, n_tok, dim)
                )
            if tok.shape[1:] != arr.shape[1:]:
                raise ValueError(f"chunk of shape {tok.shape[1:]} does not match the store's {arr.shape[1:]}")
            if row + len(tok) > n_items:
                raise ValueError(f"more token rows than ids ({n_items})")
            arr[row : row + len(tok)] = tok
            if chunk.mask is not None and mask is None:
                # The mask appears late: rows written so far had no padding.
                mask = np.lib.format.open_memmap(tmp / "mask.npy", mode="w+", dtype=np.bool_, shape=arr.shape[:2])
                mask[:row] = True
            if mask is not None:
                mask[row : row + len(tok)] = True if chunk.mask is None else chunk.mask.cpu().numpy()
            row += len(tok)
        if arr is None:
            raise ValueError("TokenStore.write: no token chunks were given")
        if row != n_items:
            raise ValueError(f"TokenStore.write: got {row} token rows for {n_items} ids")
        arr.flush()
        if mask is not None:
            mask.flush()
        return int(arr.shape[1]), int(arr.shape[2]), mask is not None

    # ---------------------------------------------------------------- reading
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        mmap: bool = True,
        expect: dict[str, Any] | None = None,
        rebuild: str = "tools/build_index.py",
    ) -> TokenStore:
        """Open a store; with `mmap` the arrays stay on disk and rows are read on indexing.

        Args:
            path: the store directory.
            mmap: keep the arrays on disk.
            expect: values the caller's ``meta`` must hold, e.g. ``{"teacher_hash": ..., "gallery_hash": ...}`` of
                the teacher and the index the tokens are used with; checked before any array is opened.
            rebuild: the command that rebuilds the store, named in errors.

        Raises:
            MissingFileError: no store at ``path`` (a FileNotFoundError).
            StaleArtefactError: a value of ``expect`` differs from the stamp, or the stamp lacks it (an older store);
                a file of the store is missing, truncated or damaged, or the files disagree.
        """
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise MissingFileError(f"no token store at {path} (meta.json missing): build it with {rebuild}")
        info = read_json(path / "meta.json", rebuild)
        if not isinstance(info, dict) or info.get("format") != _FORMAT:
            what = info.get("format") if isinstance(info, dict) else type(info).__name__
            raise StaleArtefactError(
                f"{path}/meta.json: not a {_FORMAT} (format={what!r}); to rebuild it: {rebuild}",
                path=path,
                rebuild=rebuild,
            )
        check_fields(info.get("meta") or {}, expect or {}, path=path, rebuild=rebuild)
        try:
            want = (info["num_items"], info["num_tokens"], info["dim"])
        except KeyError as e:
            raise StaleArtefactError(f"{path}/meta.json lacks {e}; to rebuild it: {rebuild}", path=path) from None
        mode = "r" if mmap else None
        tokens = _load_array(path / "tokens.npy", mode, rebuild)
        mask = _load_array(path / "mask.npy", mode, rebuild) if info.get("has_mask") else None
        ids = read_json(path / "ids.json", rebuild)
        if tokens.shape != want or not isinstance(ids, list) or len(ids) != info["num_items"]:
            raise StaleArtefactError(
                f"{path}: tokens.npy {tokens.shape} / ids.json disagree with meta.json {want}; "
                f"to rebuild it: {rebuild}",
                path=path,
                rebuild=rebuild,
            )
        return cls(path, tokens, mask, ids, info)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._tokens.shape)

    def index_of(self, item_id: str) -> int:
        """Row of `item_id`; KeyError names the store when it is absent."""
        try:
            return self._index[item_id]
        except KeyError:
            raise KeyError(f"item id {item_id!r} is not in the token store {self.path}") from None

    def get(
        self,
        indices: int | slice | Sequence[int] | np.ndarray | Tensor,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> VisualTokens:
        """Read rows as `VisualTokens` ([b, N, D] in `dtype`; an int gives a batch of one)."""
        if isinstance(indices, int):
            indices = [indices]
        elif isinstance(indices, Tensor):
            indices = indices.cpu().numpy()
        if not isinstance(indices, slice):
            indices = np.asarray(indices, dtype=np.int64)
        if len(self._skipped_rows):
            self._refuse_skipped(indices)
        tok = torch.from_numpy(_owned(self._tokens[indices])).to(device=device, dtype=dtype)
        mask = None if self._mask is None else torch.from_numpy(_owned(self._mask[indices])).to(device=device)
        return VisualTokens(tok, mask)

    def __getitem__(self, indices: int | slice | Sequence[int] | np.ndarray | Tensor) -> VisualTokens:
        return self.get(indices)

    def _refuse_skipped(self, indices: slice | np.ndarray) -> None:
        rows = np.arange(len(self))[indices] if isinstance(indices, slice) else indices % max(len(self), 1)
        bad = rows[np.isin(rows, self._skipped_rows)]
        if len(bad):
            row = int(bad[0])
            raise KeyError(
                f"row {row} ({self.ids[row]!r}) of the token store {self.path} has no tokens: its item could not be "
                f"read when the store was built ({self.skipped[row]}); nothing should score it. If the file has "
                f"been fixed since, delete {self.path} so that it is rebuilt"
            )

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, items={len(self)}, tokens={self.shape[1]}, dim={self.shape[2]})"
