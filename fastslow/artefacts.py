"""One way to write an artefact: atomically, durably, and (for a directory) with a manifest written last.

A reader sees either the old artefact or the complete new one, never a half-written file, and a power cut
cannot leave a renamed-but-empty file: every writer here goes through the same steps (STYLE.md, 16):

1. write to a temporary name in the destination's own directory (same filesystem, so the rename is atomic);
2. flush and ``fsync`` the file, so its bytes are on disk before its name is;
3. ``os.replace`` it over the destination;
4. ``fsync`` the directory, so the rename itself survives a crash.

A directory artefact (a checkpoint, a token store) is built in a temporary directory, every file in it is
fsynced, then `write_manifest` records each file's size and sha256 in ``manifest.json``, the commit marker,
written last; `verify_manifest` lists what differs. A reader that checks the manifest before it opens
anything never trusts a file that was truncated, swapped or planted after the manifest was written.

What an artefact was built from (weights hashes, gallery hash, tokenizer, max_length, image size, recipe keys) is
its *stamp*. A file artefact ``x.ext`` gets ``x.stamp.json`` beside it (`write_stamp`, or ``stamp=`` on any writer
here), holding those fields and the hash of the file it describes, so a file swapped or replaced after it was
stamped (or a crash between the two renames) is caught too. A directory artefact keeps its fields in its own
commit marker (the index manifest, the token store's ``meta.json``) and checks them with `check_fields`. Every
reader checks, through `check_stamp` / `check_fields`, and a mismatch raises `StaleArtefactError` listing each
field that differs (saved vs now) and the command that rebuilds the artefact.

Weights are read through `read_safetensors` (an empty, truncated or foreign file is a `CheckpointError` naming it,
never safetensors' own "header too small") and put into a model through `load_weights` (another model's weights are
a `CheckpointError` naming the file, the model and the first tensors that differ, never torch's page of size
mismatches).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from fastslow.errors import CheckpointError, MissingFileError, StaleArtefactError, file_message

__all__ = [
    "MANIFEST",
    "NOT_SAVED",
    "STAMP_SUFFIX",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_fields",
    "check_stamp",
    "commit_dir",
    "file_hash",
    "file_sha256",
    "fsync_dir",
    "fsync_tree",
    "load_weights",
    "read_json",
    "read_safetensors",
    "read_manifest",
    "read_stamp",
    "remove_dead_leftovers",
    "stamp_differences",
    "stamp_path",
    "temp_dir_for",
    "verify_manifest",
    "write_manifest",
    "write_stamp",
]

MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "fastslow-manifest"
STAMP_SUFFIX = ".stamp.json"
_STAMP_FORMAT = "fastslow-stamp"


class _NotSaved:
    """The saved value of a field an older stamp does not have; shown as such in messages."""

    def __repr__(self) -> str:
        return "(not in the stamp)"


NOT_SAVED: Any = _NotSaved()


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened, and renames are durable there anyway
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and /proc-like mounts) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_sibling(path: Path) -> Path:
    # Hidden, unique per writer (pid + random), so concurrent writers never share a temporary file; the pid in the
    # name is how `remove_dead_leftovers` tells a killed writer's file from a live one's.
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_dead_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``path`` (``.NAME.PID-XXXX.tmp`` / ``.old``) that a writer killed mid-write
    left behind (SIGKILL, the OOM killer, a power cut: no ``finally`` ran), and return them.

    Called by every writer before it writes ``path``, so that a killed-and-rerun stage leaves no temporary file or
    directory behind. A sibling whose writer (the pid in its name) is still running on this machine is kept.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        pid = p.name[len(path.name) + 2 :].split("-", 1)[0]
        if p.suffix not in (".tmp", ".old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def temp_dir_for(path: str | os.PathLike) -> Path:
    """A new, empty temporary directory beside ``path`` to write a directory artefact into, then `commit_dir` it.
    Leftovers of killed writers of ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(path)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, stamp: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through, for writers that take a file name (faiss, safetensors).

    On a clean exit the temporary file is fsynced and renamed over ``path`` and the directory fsynced; on an
    exception it is removed and ``path`` is left as it was. With ``stamp`` (JSON-serialisable fields: what the
    file was built from), `write_stamp` then stamps the new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    if stamp is not None:
        write_stamp(path, stamp)


def atomic_write(
    path: str | os.PathLike,
    write_fn: Callable[[IO], Any],
    mode: str = "wb",
    *,
    stamp: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``path`` atomically and durably: ``write_fn(f)`` fills an open temporary file.

    Args:
        path: the destination; its directory is created if needed.
        write_fn: called once with the open file object.
        mode: ``"wb"`` (binary) or ``"w"`` (text, UTF-8).
        stamp: what the file was built from, written beside it by `write_stamp`; None writes no stamp.

    Returns:
        ``path`` as a Path.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    with atomic_path(path, stamp=stamp) as tmp:
        # "x": the temporary name must be new; the file gets the usual permissions (umask), unlike mkstemp's 0600.
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, stamp: Mapping[str, Any] | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably (``stamp`` as in `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), "wb", stamp=stamp)


def atomic_write_text(path: str | os.PathLike, text: str, *, stamp: Mapping[str, Any] | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (``stamp`` as in `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text), "w", stamp=stamp)


def atomic_write_json(
    path: str | os.PathLike, obj: Any, *, stamp: Mapping[str, Any] | None = None, **json_kwargs: Any
) -> Path:
    """Write ``obj`` as JSON (``indent=1`` unless given) to ``path`` atomically and durably (``stamp`` as in
    `atomic_write`)."""
    json_kwargs.setdefault("indent", 1)
    return atomic_write(path, lambda f: json.dump(obj, f, **json_kwargs), "w", stamp=stamp)


def file_hash(path: str | os.PathLike, length: int = 16, block_size: int = 1 << 20) -> str:
    """Short sha256 of a file's bytes, read in blocks so that multi-GB checkpoints do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    """The full hex sha256 of a file's bytes (what manifests record)."""
    return file_hash(path, 64)


# ----------------------------------------------------------------------------------------------------------- stamps


def stamp_path(path: str | os.PathLike) -> Path:
    """Where the stamp of the file artefact ``path`` lives: ``embeddings.npy`` -> ``embeddings.stamp.json``."""
    path = Path(path)
    return path.with_name(path.stem + STAMP_SUFFIX)


def write_stamp(path: str | os.PathLike, fields: Mapping[str, Any]) -> Path:
    """Stamp the (complete, renamed) file ``path`` with what it was built from, atomically.

    The stamp also records the file's hash: a reader then knows the stamp describes *this* file, not one that
    replaced it later, nor the previous one left by a crash between the file's rename and the stamp's.

    Args:
        path: the artefact file.
        fields: JSON-serialisable ``{field: value}``, e.g. ``{"student_hash": ..., "gallery_hash": ...}``; recipe
            settings are best named by their recipe key (``"data.image_size"``), so a message names the key to set.

    Returns:
        The stamp's path.
    """
    path = Path(path)
    stamp = {"format": _STAMP_FORMAT, "file": path.name, "file_hash": file_hash(path), "fields": dict(fields)}
    return atomic_write_json(stamp_path(path), stamp, ensure_ascii=False)


def read_stamp(path: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed stamp of the file artefact ``path``, or None when it is missing, unreadable or not a stamp."""
    try:
        stamp = json.loads(stamp_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("format") != _STAMP_FORMAT or not isinstance(stamp.get("fields"), dict):
        return None
    return stamp


def stamp_differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, expected)}`` for each expected field whose saved value differs or is absent (`NOT_SAVED`).

    Only the fields of ``expected`` are compared: a stamp may record more than a given reader can check. Expected
    values are compared in their JSON form (a tuple equals the list it is saved as).
    """
    want = json.loads(json.dumps(dict(expected), default=str))
    have = {key: saved.get(key, NOT_SAVED) for key in want}
    return {key: (have[key], value) for key, value in want.items() if have[key] != value}


def check_fields(
    saved: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    path: str | os.PathLike,
    rebuild: str,
    error: type[StaleArtefactError] = StaleArtefactError,
) -> None:
    """Raise `StaleArtefactError` when the fields ``saved`` with the artefact at ``path`` differ from ``expected``.

    Args:
        saved: the fields the artefact was stamped with.
        expected: what the current run needs, e.g. ``{"gallery_hash": index_manifest["gallery_hash"]}``.
        path: the artefact, named in the message.
        rebuild: the command that rebuilds it, e.g. ``"python tools/build_index.py recipe=shapes"``.
        error: the subclass of `StaleArtefactError` to raise (e.g. the score cache's own).

    Raises:
        StaleArtefactError: the message lists every differing field (saved vs now) and ``rebuild``.
    """
    differences = stamp_differences(saved, expected)
    if differences:
        lines = "\n".join(f"  {key}: saved {old!r}, now {new!r}" for key, (old, new) in differences.items())
        raise error(
            f"{path} was built from other inputs than this run ({', '.join(differences)} differ):\n{lines}\n"
            f"to rebuild it: {rebuild}",
            path=path,
            differences=differences,
            rebuild=rebuild,
        )


def check_stamp(path: str | os.PathLike, expected: Mapping[str, Any], rebuild: str) -> dict[str, Any]:
    """Check that the file artefact ``path`` is complete, stamped, and built from what ``expected`` says.

    Args:
        path: the artefact file (its stamp is `stamp_path`).
        expected: the fields the current run needs (see `check_fields`).
        rebuild: the command that rebuilds it.

    Returns:
        Every field of the stamp (it may hold more than ``expected``).

    Raises:
        MissingFileError: no file at ``path`` (the message says how to build it); a FileNotFoundError.
        StaleArtefactError: no stamp (an artefact of an older fastslow, or an interrupted write), a stamp of another
            file, or fields that differ.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no {path}: to build it: {rebuild}")
    stamp = read_stamp(path)
    if stamp is None:
        raise StaleArtefactError(
            f"{path} has no stamp ({stamp_path(path).name} is missing or unreadable: written by an older fastslow, "
            f"or its write was interrupted), so what it was built from is unknown; to rebuild it: {rebuild}",
            path=path,
            rebuild=rebuild,
        )
    if stamp.get("file_hash") != file_hash(path):
        raise StaleArtefactError(
            f"{path} is not the file its stamp {stamp_path(path).name} describes (it was replaced after it was "
            f"stamped, or a write was interrupted); to rebuild it: {rebuild}",
            path=path,
            rebuild=rebuild,
        )
    check_fields(stamp["fields"], expected, path=path, rebuild=rebuild)
    return dict(stamp["fields"])


# -------------------------------------------------------------------------------------------------------- manifests


def _files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (relative POSIX paths, sorted), the manifest itself excluded."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST
    )


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file and every directory under ``directory`` (itself included), deepest first."""
    directory = Path(directory)
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_dir(root)


def write_manifest(directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsync every file under ``directory``, then write ``manifest.json`` (atomically, last) listing each one.

    The manifest maps each relative path to ``{"size", "sha256"}``; ``extra`` (JSON-serialisable) is stored
    beside the file list, e.g. the run that wrote the directory.

    Returns:
        The manifest as written.
    """
    directory = Path(directory)
    fsync_tree(directory)
    files = {}
    for rel in _files(directory):
        p = directory / rel
        files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    manifest = {"format": _MANIFEST_FORMAT, "files": files, **(extra or {})}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` of ``directory``, or None when it is missing or not a manifest."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        return None
    if not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def verify_manifest(directory: str | os.PathLike, hashes: bool = True) -> list[str]:
    """What is wrong with ``directory`` against its manifest; an empty list means it is complete and unchanged.

    Checks that the manifest exists and parses, that every listed file exists with its size and (with
    ``hashes``) its sha256, and that no file is present that the manifest does not list (a planted file).

    Args:
        directory: a directory written with `write_manifest`.
        hashes: also compare sha256 (reads every byte); False checks names and sizes only.

    Returns:
        One short sentence per problem, naming the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    if not (directory / MANIFEST).is_file():
        return [f"no {MANIFEST} (an interrupted write, or not written by fastslow)"]
    manifest = read_manifest(directory)
    if manifest is None:
        return [f"{MANIFEST} is empty, unreadable or not a fastslow manifest"]
    problems = []
    listed: dict[str, Any] = manifest["files"]
    for rel, want in sorted(listed.items()):
        p = directory / rel
        if not isinstance(want, dict) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{MANIFEST} has an invalid entry {rel!r}")
        elif not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != want.get("size"):
            problems.append(f"{rel} has {p.stat().st_size} bytes, the manifest says {want.get('size')}")
        elif hashes and file_sha256(p) != want.get("sha256"):
            problems.append(f"{rel} does not match its sha256 in the manifest (changed after it was written)")
    for rel in _files(directory):
        if rel not in listed:
            problems.append(f"{rel} is not listed in the manifest (added after it was written)")
    return problems


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a fully written directory ``tmp`` to ``final`` durably, replacing an existing ``final``.

    Every file in ``tmp`` is fsynced first; ``os.replace`` cannot replace a non-empty directory, so an existing
    ``final`` is moved aside to a hidden sibling and removed after the rename; the parent is fsynced.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = _tmp_sibling(final).with_suffix(".old")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------- readers


def read_json(path: str | os.PathLike, rebuild: str) -> Any:
    """The parsed JSON file ``path`` of an artefact, or `StaleArtefactError` naming it and ``rebuild`` when it is
    empty, cut short or not JSON (an interrupted write, a damaged copy); `MissingFileError` when it is absent."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no {path}: to build it: {rebuild}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StaleArtefactError(
            f"{path} is unreadable ({type(e).__name__}: {e}): a write was interrupted or the file was damaged; "
            f"to rebuild it: {rebuild}",
            path=path,
            rebuild=rebuild,
        ) from e


def read_safetensors(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """Every tensor of the safetensors file ``path`` (a dict of CPU torch tensors); no pickle is involved.

    Args:
        path: the weights file.
        fix: what to do when it cannot be read, e.g. ``"retrain it with tools/distill.py (same recipe and
            output_dir)"``; it ends every message.

    Raises:
        MissingFileError: no file at ``path``.
        CheckpointError: the file is empty, truncated, or not a safetensors file (named, with its size).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found: {fix}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(file_message(path, "weights file is empty (0 bytes): an interrupted write or copy", fix))
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(
            file_message(
                path, f"not a readable safetensors file ({size} bytes: truncated, damaged or not safetensors; {e})", fix
            )
        ) from e


def load_weights(model: Any, state: Mapping[str, Any], *, path: str | os.PathLike, name: str, fix: str) -> None:
    """``model.load_state_dict(state, strict=True)``, after checking that ``state`` has the model's every tensor,
    with its shape, and nothing else.

    Args:
        model: a torch module.
        state: the tensors read from ``path`` (`read_safetensors`).
        path: the weights file, named in the message.
        name: what the model is, e.g. ``"teacher captioner_tiny"``.
        fix: what to do, ending the message.

    Raises:
        CheckpointError: another model's weights: the message names the file, the model, how many tensors are of
            another shape, missing or unexpected, and the first of each (not torch's page of size mismatches).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [
        (k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or resized:
        parts = []
        if resized:
            key, saved, want = resized[0]
            parts.append(
                f"{len(resized)} tensors of another shape (e.g. {key}: {saved} in the file, {want} in the model)"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{path} does not fit the {name} its config describes: {'; '.join(parts)}. The file holds the weights of "
            f"another model (another registry name, size, modality or vocabulary); {fix}"
        )
    model.load_state_dict(state, strict=True)
