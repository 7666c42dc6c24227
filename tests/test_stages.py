"""fastslow.stages: the run directory's shared artefacts are reused only when they match the recipe."""

import os
from types import SimpleNamespace

import pytest

from fastslow import stages
from fastslow.config import load_recipe
from fastslow.errors import StaleArtefactError

CAPTIONS = ["a red circle left of a blue square", "a small green triangle", "two large yellow stars"]


def smoke(tmp_path, *overrides):
    return load_recipe(["recipe=smoke", f"output_dir={tmp_path}", *overrides])


def test_tokenizer_of_another_vocab_size_is_refused(tmp_path):
    train = SimpleNamespace(captions=CAPTIONS)
    tok = stages.get_tokenizer(smoke(tmp_path), train)
    assert (tmp_path / "tokenizer.stamp.json").is_file()
    assert stages.get_tokenizer(smoke(tmp_path), train).vocab_size == tok.vocab_size  # same settings: reused
    with pytest.raises(StaleArtefactError) as err:
        stages.get_tokenizer(smoke(tmp_path, "tokenizer.vocab_size=100"), train)
    message = str(err.value)
    assert "tokenizer.vocab_size: saved 200, now 100" in message
    assert f"delete {tmp_path / 'tokenizer.json'}" in message and "another output_dir" in message
    assert list(err.value.differences) == ["tokenizer.vocab_size"]


def test_tokenizer_without_stamp_or_swapped_is_refused(tmp_path):
    train = SimpleNamespace(captions=CAPTIONS)
    stages.get_tokenizer(smoke(tmp_path), train)
    other = tmp_path / "other"
    stages.get_tokenizer(smoke(other, "tokenizer.vocab_size=30"), SimpleNamespace(captions=CAPTIONS[:1]))
    os.replace(other / "tokenizer.json", tmp_path / "tokenizer.json")  # copied in by hand, under the old stamp
    with pytest.raises(StaleArtefactError, match="not the file its stamp tokenizer.stamp.json describes"):
        stages.get_tokenizer(smoke(tmp_path), train)
    (tmp_path / "tokenizer.stamp.json").unlink()  # a run directory of an older fastslow
    with pytest.raises(StaleArtefactError, match="has no stamp.*delete"):
        stages.get_tokenizer(smoke(tmp_path), train)


def test_a_shared_tokenizer_is_checked_through_its_symlink(tmp_path):
    """The benchmarks share the base run's tokenizer.json by a symlink; its stamp stays beside the real file."""
    train = SimpleNamespace(captions=CAPTIONS)
    stages.get_tokenizer(smoke(tmp_path / "base"), train)
    (tmp_path / "variant").mkdir()
    os.symlink(tmp_path / "base" / "tokenizer.json", tmp_path / "variant" / "tokenizer.json")
    stages.get_tokenizer(smoke(tmp_path / "variant"), train)
    with pytest.raises(StaleArtefactError, match="tokenizer.vocab_size"):
        stages.get_tokenizer(smoke(tmp_path / "variant", "tokenizer.vocab_size=50"), train)
