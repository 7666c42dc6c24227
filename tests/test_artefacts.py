"""The one artefact writer: atomic replace, no temporary left behind, manifests that catch every change."""

import json
import os
import subprocess
import sys

import pytest

from fastslow.artefacts import (
    MANIFEST,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    check_stamp,
    commit_dir,
    file_sha256,
    remove_dead_leftovers,
    temp_dir_for,
    verify_manifest,
    write_manifest,
)
from fastslow.errors import StaleArtefactError, UserError


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


# ---------------------------------------------------------------------------------------------------------- stamps


def test_stamp_check_lists_every_differing_field_and_the_rebuild_command(tmp_path):
    path = tmp_path / "embeddings.npy"
    atomic_write_bytes(path, b"rows", stamp={"student_hash": "aaaa", "gallery_hash": "g1", "data.image_size": 32})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.npy", "embeddings.stamp.json"]
    rebuild = "python tools/build_index.py recipe=smoke"
    saved = check_stamp(path, {"student_hash": "aaaa", "gallery_hash": "g1"}, rebuild)  # a reader checks a subset
    assert saved == {"student_hash": "aaaa", "gallery_hash": "g1", "data.image_size": 32}
    with pytest.raises(StaleArtefactError) as err:
        check_stamp(path, {"student_hash": "bbbb", "gallery_hash": "g1", "data.image_size": 64, "new": 1}, rebuild)
    message = str(err.value)
    assert "student_hash: saved 'aaaa', now 'bbbb'" in message
    assert "data.image_size: saved 32, now 64" in message
    assert "new: saved (not in the stamp), now 1" in message  # a field an older stamp lacks
    assert "gallery_hash" not in message  # only what differs
    assert message.endswith(f"to rebuild it: {rebuild}")
    assert set(err.value.differences) == {"student_hash", "data.image_size", "new"}
    assert isinstance(err.value, UserError)  # tools print it as one error, exit status 2


def test_unstamped_or_replaced_artefact_is_refused_with_the_rebuild_command(tmp_path):
    path = tmp_path / "fuse_alpha.json"
    atomic_write_json(path, {"alpha": 0.5})  # no stamp: what an older fastslow wrote
    with pytest.raises(StaleArtefactError, match="has no stamp .*to rebuild it: run X"):
        check_stamp(path, {"k": 20}, "run X")
    atomic_write_json(path, {"alpha": 0.5}, stamp={"k": 20})
    assert check_stamp(path, {"k": 20}, "run X") == {"k": 20}
    path.write_text('{"alpha": 0.9}')  # replaced under its stamp (or a crash between the two renames)
    with pytest.raises(StaleArtefactError, match="not the file its stamp fuse_alpha.stamp.json describes"):
        check_stamp(path, {"k": 20}, "run X")
    with pytest.raises(FileNotFoundError, match="to build it: run X"):
        check_stamp(tmp_path / "absent.json", {}, "run X")


def test_a_killed_writers_leftovers_are_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    """SIGKILL runs no cleanup: the next writer of the same artefact removes the dead writer's temporaries."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    path = tmp_path / "tokens"
    stale_file = tmp_path / f".emb.npy.{dead_pid}-0badc0de.tmp"
    stale_file.write_bytes(b"half")
    stale_dir = tmp_path / f".tokens.{dead_pid}-deadbeef.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    old = tmp_path / f".tokens.{dead_pid}-12345678.old"
    old.mkdir()
    live = tmp_path / f".tokens.{os.getpid()}-00000000.tmp"  # a writer still running (this one)
    live.mkdir()
    other = tmp_path / ".tokensX.1-00000000.tmp"  # another artefact's name: not ours to touch
    other.mkdir()
    fresh = temp_dir_for(path)
    assert fresh.is_dir() and not any(fresh.iterdir())
    assert not stale_dir.exists() and not old.exists()
    assert live.exists() and other.exists() and stale_file.exists()
    atomic_write_json(tmp_path / "emb.npy", {"x": 1})  # every atomic write clears its own name's leftovers
    assert not stale_file.exists()
    assert remove_dead_leftovers(path) == []
