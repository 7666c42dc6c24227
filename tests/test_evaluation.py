"""fastslow.evaluation under several processes, and the capped validation sample (`eval.val_items`).

Validation while training runs on every process: with ``shard=True`` each one encodes a contiguous part of the
items (the teacher scores every text against its part only) and the parts are gathered, so that every process returns
the metrics one process computes over the whole split. Tiny random models on a tiny generated shapes dataset; the
2-process run is `torch.multiprocessing.spawn` over gloo on the CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fastslow import stages
from fastslow.config import load_recipe
from fastslow.data import ImageLoader, SkipLedger, load_karpathy
from fastslow.data.shapes import generate_shapes
from fastslow.evaluation import evaluate_student, evaluate_teacher
from fastslow.tokenizer import train_tokenizer
from students import create_student
from teachers import create_teacher

MAX_LEN, IMAGE_SIZE, WORLD = 16, 32, 2
BROKEN = 5  # the item whose image cannot be decoded (a read-time skip, in the first process's part)


def _setup(root: str):
    """The split (13 items, one unreadable), its loader, tokenizer and both models, the same in every process."""
    root = Path(root)
    split = load_karpathy(root / "dataset_shapes.json", root / "images", "train")
    tok = train_tokenizer(split.captions, vocab_size=100)
    kw = dict(modality="image", vocab_size=tok.vocab_size, max_length=MAX_LEN, image_size=IMAGE_SIZE)
    torch.manual_seed(0)
    teacher = create_teacher("captioner_tiny", **kw).eval()
    student = create_student("dual_encoder_tiny", **kw).eval()
    return split, ImageLoader(IMAGE_SIZE), tok, teacher, student


def _evaluations(root: str, shard: bool) -> dict:
    """Both models' metrics on the readable items (raise) and on all of them (skip), and the files each left out."""
    split, loader, tok, teacher, student = _setup(root)
    readable = split.select_items([i for i in range(split.n_items) if i != BROKEN])
    out, ledgers = {}, {}
    with torch.no_grad():
        for name, evaluate in (("teacher", evaluate_teacher), ("student", evaluate_student)):
            model = teacher if name == "teacher" else student
            out[f"{name}/raise"] = evaluate(model, readable, loader, tok, max_length=MAX_LEN, shard=shard)
            ledgers[name] = SkipLedger()
            out[f"{name}/skip"] = evaluate(model, split, loader, tok, max_length=MAX_LEN, on_error="skip",
                                           ledger=ledgers[name], where="val", shard=shard)  # fmt: skip
    out["left_out"] = {name: sorted(Path(p).name for p in ledger.files) for name, ledger in ledgers.items()}
    return out


def _evaluation_rank(rank: int, world: int, init_file: str, root: str, out_dir: str) -> None:
    """One process of the 2-process validation (module level, so that spawn can import it)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(_evaluations(root, shard=True)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, seed=0, n_train=13, n_val_groups=1, n_test_groups=1, captions_per_image=2,
                    image_size=IMAGE_SIZE)  # fmt: skip
    split = load_karpathy(out / "dataset_shapes.json", out / "images", "train")
    Path(split.item_paths[BROKEN]).write_bytes(b"not an image")
    return out


@pytest.mark.slow
def test_sharded_validation_on_two_processes_gives_the_metrics_of_one(root, tmp_path):
    """Each of 2 processes encodes half of the items, the teacher scores every text against its half, the score
    columns (student: embeddings) are gathered: every process returns the whole ranking's metrics, those of one
    process, with or without an unreadable item (left out, with its captions, and recorded by the process that met
    it)."""
    torch.multiprocessing.spawn(_evaluation_rank, args=(WORLD, str(tmp_path / "init"), str(root), str(tmp_path)),
                                nprocs=WORLD)  # fmt: skip
    one = _evaluations(str(root), shard=False)
    assert one["teacher/skip"]["left_out_items"] == 1 and one["teacher/skip"]["left_out_texts"] == 2
    broken = Path(load_karpathy(root / "dataset_shapes.json", root / "images", "train").item_paths[BROKEN]).name
    assert one["left_out"] == {"teacher": [broken], "student": [broken]}
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, two in enumerate(ranks):
        for key in ("teacher/raise", "teacher/skip", "student/raise", "student/skip"):
            assert two[key] == pytest.approx(one[key], abs=1e-6), (rank, key)
    # The unreadable item lies in the first process's part: that process records it (the trainer unites them).
    assert ranks[0]["left_out"] == one["left_out"] and ranks[1]["left_out"] == {"teacher": [], "student": []}


def test_validation_sample_is_fixed_and_keeps_every_caption_of_its_items(root, tmp_path):
    """eval.val_items: the training stages validate on a fixed sample of that many val items, the same in every
    run whatever its seed, each with all its captions; null keeps the whole val split."""
    split = load_karpathy(Path(root) / "dataset_shapes.json", Path(root) / "images", "train")
    sample = split.sample_items(5)
    assert sample.n_items == 5 and sample.n_texts == 10
    assert sample.item_ids == sorted(sample.item_ids, key=split.item_ids.index)  # in split order
    assert sample.item_ids == split.sample_items(5).item_ids != split.sample_items(5, seed=1).item_ids
    for i, item in enumerate(sample.item_ids):
        j = split.item_ids.index(item)
        assert [c for c, v in zip(sample.captions, sample.text_to_visual) if v == i] == [
            c for c, v in zip(split.captions, split.text_to_visual) if v == j
        ]
    assert split.sample_items(None) is split and split.sample_items(99) is split

    def val_of(*overrides):
        cfg = load_recipe(["recipe=smoke", f"output_dir={tmp_path}", f"data.root={tmp_path / 'data'}", *overrides])
        return stages.prepare_training(cfg, None)[1]

    full = val_of()
    capped = val_of("eval.val_items=3", "seed=7")
    assert full.n_items > 3 and capped.n_items == 3
    assert capped.item_ids == full.sample_items(3).item_ids  # not drawn from the run's seed
    assert os.path.isfile(tmp_path / "tokenizer.json")
