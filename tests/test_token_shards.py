"""The teacher's token store built by several processes, each extracting its own shard of the rows
(`fastslow.evaluation.build_token_store`, `TokenStore.allocate / fill / commit`): the same store as one process
builds, with every process reading only its items and the rows left out under skip gathered from all."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from teachers import TokenStore, VisualTokens

ROOT = Path(__file__).resolve().parents[1]


def chunks_of(tokens: torch.Tensor, mask: torch.Tensor | None, lo: int, hi: int, size: int = 3):
    for s in range(lo, hi, size):
        e = min(s + size, hi)
        yield VisualTokens(tokens[s:e], None if mask is None else mask[s:e])


@pytest.mark.parametrize("with_mask", [False, True], ids=["image", "video-mask"])
def test_shards_filled_out_of_order_give_the_store_write_gives(tmp_path, with_mask):
    torch.manual_seed(0)
    tokens = torch.randn(10, 4, 8)
    mask = (torch.rand(10, 4) > 0.3) if with_mask else None
    ids = [f"item{i}" for i in range(10)]
    whole = TokenStore.write(tmp_path / "whole", ids, chunks_of(tokens, mask, 0, 10), meta={"t": 1})
    tmp = tmp_path / ".parts.tmp"
    tmp.mkdir()
    TokenStore.allocate(tmp, 10, 4, 8, has_mask=with_mask)
    TokenStore.fill(tmp, 6, 10, chunks_of(tokens, mask, 6, 10))  # the second shard first: no order between ranks
    TokenStore.fill(tmp, 0, 6, chunks_of(tokens, mask, 0, 6))
    parts = TokenStore.commit(tmp, tmp_path / "parts", ids, {"t": 1})
    assert not tmp.exists()
    for name in ("tokens.npy", "mask.npy", "ids.json", "meta.json") if with_mask else ("tokens.npy", "ids.json"):
        assert (whole.path / name).read_bytes() == (parts.path / name).read_bytes(), name


def test_a_shard_must_get_exactly_its_rows(tmp_path):
    tokens = torch.randn(6, 2, 4)
    tmp = tmp_path / ".s.tmp"
    tmp.mkdir()
    TokenStore.allocate(tmp, 6, 2, 4, has_mask=False)
    with pytest.raises(ValueError, match="got rows 0..2 of 0..3"):
        TokenStore.fill(tmp, 0, 4, chunks_of(tokens, None, 0, 3))
    with pytest.raises(ValueError, match="past the end"):
        TokenStore.fill(tmp, 0, 2, chunks_of(tokens, None, 0, 3))
    with pytest.raises(ValueError, match="padding mask"):
        TokenStore.fill(tmp, 0, 2, [VisualTokens(tokens[:2], torch.ones(2, 2, dtype=torch.bool))])
    with pytest.raises(ValueError, match="3 token rows for 6 ids|6 token rows for 3 ids"):
        TokenStore.commit(tmp, tmp_path / "store", ["a", "b", "c"])


# One rank of the 2-process build: a tiny shapes gallery with one broken image, a seeded tiny teacher, a loader that
# logs every path it reads (what each rank extracted), and build_token_store under on_error=skip.
RANK = """
import json, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from fastslow.data import ImageLoader, SkipLedger, load_karpathy
from fastslow.evaluation import build_token_store
from teachers import create_teacher

data, out, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
acc = Accelerator(cpu=True)
split = load_karpathy(data / "dataset_shapes.json", data / "images", "train")
torch.manual_seed(0)
teacher = create_teacher("captioner_tiny", modality="image", vocab_size=64, max_length=8, image_size=32).eval()
base, read = ImageLoader(32), []

def load(path):
    read.append(Path(path).name)
    return base(path)

ledger = SkipLedger()
left = build_token_store(teacher, split, load, out, meta={"teacher_hash": "t"}, batch_size=4, accelerator=acc,
                         on_error="skip", ledger=ledger)
log.with_suffix(f".{acc.process_index}.json").write_text(json.dumps({"read": read, "left_out": left}))
"""


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    from fastslow.data import load_karpathy
    from fastslow.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("gallery")
    generate_shapes(out, seed=0, n_train=14, n_val_groups=1, n_test_groups=1, captions_per_image=2, image_size=32)
    split = load_karpathy(out / "dataset_shapes.json", out / "images", "train")
    Path(split.item_paths[9]).write_bytes(b"not an image")  # in the second process's shard
    return out, split


def test_two_processes_build_the_store_one_process_builds(gallery, tmp_path):
    from fastslow.data import ImageLoader, SkipLedger
    from fastslow.evaluation import build_token_store
    from teachers import create_teacher

    data, split = gallery
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(data), str(tmp_path / "two"), str(tmp_path / "log")]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    torch.manual_seed(0)
    teacher = create_teacher("captioner_tiny", modality="image", vocab_size=64, max_length=8, image_size=32).eval()
    left = build_token_store(teacher, split, ImageLoader(32), tmp_path / "one", meta={"teacher_hash": "t"},
                             batch_size=4, on_error="skip", ledger=SkipLedger())  # fmt: skip
    assert left == {9: left[9]} and "image" in left[9].lower()
    two, one = TokenStore.open(tmp_path / "two"), TokenStore.open(tmp_path / "one")
    # The same items through the same teacher; the shards batch them differently (rows 7.. start a new batch), so
    # float sums may round differently: within fp16's resolution, and row 9 is the placeholder in both.
    a, b = np.asarray(two._tokens, np.float32), np.asarray(one._tokens, np.float32)
    assert np.abs(a - b).max() <= 2e-3 and not a[9].any() and not b[9].any(), np.abs(a - b).max()
    assert two.skipped == one.skipped == {9: left[9]}  # the row rank 1 could not read is in the store it committed
    assert two.meta["meta"] == {"teacher_hash": "t"}

    names = [Path(p).name for p in split.item_paths]
    logs = [json.loads((tmp_path / f"log.{r}.json").read_text()) for r in (0, 1)]
    # Every process reads the first item once for the tokens' shape, then only the items of its own shard.
    assert logs[0]["read"] == [names[0], *names[:7]]
    assert logs[1]["read"] == [names[0], *names[7:]]
    assert {int(k) for k in logs[0]["left_out"]} == {int(k) for k in logs[1]["left_out"]} == {9}  # gathered
