"""The one artefact writer: atomic replace, no temporary left behind, manifests that catch every change."""

import json
import os

import pytest

from fastslow.artefacts import (
    MANIFEST,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    commit_dir,
    file_sha256,
    verify_manifest,
    write_manifest,
)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not a temp file's 0600


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")

    def half(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    with pytest.raises(ValueError, match="mode"):
        atomic_write(path, lambda f: None, "a")


def _tree(tmp_path):
    d = tmp_path / "artefact"
    (d / "sub").mkdir(parents=True)
    (d / "w.bin").write_bytes(b"0123456789")
    (d / "sub" / "s.json").write_text("{}")
    write_manifest(d, {"run_id": "r1"})
    return d


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    d = _tree(tmp_path)
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["run_id"] == "r1"
    assert manifest["files"] == {
        "sub/s.json": {"size": 2, "sha256": file_sha256(d / "sub" / "s.json")},
        "w.bin": {"size": 10, "sha256": file_sha256(d / "w.bin")},
    }
    assert verify_manifest(d) == []


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda d: (d / "w.bin").write_bytes(b""), "w.bin has 0 bytes, the manifest says 10"),
        (lambda d: (d / "w.bin").write_bytes(b"0123456780"), "w.bin does not match its sha256"),
        (lambda d: (d / "sub" / "s.json").unlink(), "sub/s.json is missing"),
        (lambda d: (d / "sub" / "x.pkl").write_bytes(b"x"), "sub/x.pkl is not listed in the manifest"),
        (lambda d: (d / MANIFEST).unlink(), f"no {MANIFEST}"),
        (lambda d: (d / MANIFEST).write_text(""), f"{MANIFEST} is empty"),
        (lambda d: (d / MANIFEST).write_text('{"files": {}}'), "not a fastslow manifest"),
    ],
    ids=["truncated", "same-size change", "missing", "planted", "no manifest", "empty manifest", "foreign manifest"],
)
def test_verify_manifest_names_what_is_wrong(tmp_path, damage, says):
    d = _tree(tmp_path)
    damage(d)
    problems = verify_manifest(d)
    assert any(says in p for p in problems), problems


def test_commit_dir_replaces_a_directory(tmp_path):
    final = tmp_path / "store"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = tmp_path / "store.tmp"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    commit_dir(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # neither the temporary nor the old one is left
