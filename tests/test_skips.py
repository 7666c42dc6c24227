"""`data.on_error=skip` in every pass that reads visual items, and the run's account of what it left out.

The fixture is a Karpathy split file whose training part names 4 bad files, one of each kind real mirrors
have: a missing image (dropped at load time), an empty file, a truncated JPEG and a text file named .jpg
(both found only when read). Their items carry 1 + 2 + 1 + 2 = 6 captions. One test image is a text file too,
for the gallery passes (build_index, rerank_eval).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset

from fastslow.data import (
    SKIP_FILE,
    DataError,
    ImageLoader,
    PairDataset,
    SkipLedger,
    VisualDataset,
    captions_per_path,
    collate,
    load_karpathy,
)
from fastslow.data.shapes import generate_shapes
from fastslow.distill import CandidateMiner, DistillBatcher, DistillObjective, GroupComposer, TeacherPairScorer
from fastslow.errors import StaleArtefactError
from fastslow.evaluation import evaluate_student
from fastslow.index import encode_gallery, hash_ids, load_embeddings
from fastslow.tokenizer import train_tokenizer
from fastslow.trainer import TrainConfig, Trainer, make_accelerator
from students import create_student
from teachers import TokenStore, create_teacher

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
IMAGE_SIZE, MAX_LEN = 32, 16
# name -> (reason as the loaders give it, captions of its item)
BAD = {
    "missing.jpg": ("missing file", 1),
    "empty.jpg": ("empty file", 2),
    "truncated.jpg": ("truncated image", 1),
    "text.jpg": ("not an image", 2),
}
REPORT = "4 files skipped (1 missing, 1 empty, 1 truncated, 1 not an image), 6 caption samples"
BAD_TEST = "broken_test.jpg"


def write_bad_karpathy(root: Path) -> Path:
    """The built-in shapes images in a Karpathy file (``dataset_flickr30k.json``) plus the bad entries."""
    generate_shapes(
        root, seed=0, n_train=16, n_val_groups=1, n_test_groups=2, captions_per_image=2, image_size=IMAGE_SIZE
    )
    data = json.loads((root / "dataset_shapes.json").read_text())
    sentences = [s for image in data["images"] if image["split"] == "train" for s in image["sentences"]]
    images = root / "images"
    (images / "empty.jpg").write_bytes(b"")
    noise = Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8))
    noise.save(images / "whole.jpg", quality=90)
    jpeg = (images / "whole.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (images / "whole.jpg").unlink()
    for name in ("text.jpg", BAD_TEST):
        (images / name).write_text("this is a text file, not a JPEG\n")
    bad = [{"filename": n, "split": "train", "sentences": sentences[:k]} for n, (_, k) in BAD.items()]
    # Among the training images, not at the end: the passes must keep item order around a hole.
    data["images"][3:3] = bad[:2]
    data["images"][9:9] = bad[2:]
    test = [i for i, image in enumerate(data["images"]) if image["split"] == "test"]
    data["images"].insert(test[2], {"filename": BAD_TEST, "split": "test", "sentences": sentences[:1]})
    ann = root / "dataset_flickr30k.json"
    ann.write_text(json.dumps(data))
    return ann


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("karpathy_bad")
    write_bad_karpathy(root)
    return root


@pytest.fixture(scope="module")
def data(bad_root):
    train = load_karpathy(bad_root / "dataset_flickr30k.json", bad_root / "images", "train", on_error="skip")
    assert train.n_items == 19 and [reason for _, reason in train.skipped] == ["missing file"]
    return train, ImageLoader(IMAGE_SIZE), train_tokenizer(train.captions, vocab_size=200)


def bad_rows(train) -> dict[int, str]:
    """Row of each bad file that exists (read-time failures) -> its reason."""
    return {i: BAD[Path(p).name][0] for i, p in enumerate(train.item_paths) if Path(p).name in BAD}


def model_kw(tok) -> dict:
    return dict(modality="image", vocab_size=tok.vocab_size, max_length=MAX_LEN, image_size=IMAGE_SIZE)


# ------------------------------------------------------------------------------------------------- the ledger


def test_ledger_counts_each_bad_file_once_whatever_the_passes_epochs_and_processes(data):
    train, loader, tok = data
    dataset = PairDataset(train, loader, tok, MAX_LEN, on_error="skip")
    captions = captions_per_path(train)
    # Two "processes", each reading its half of the captions for two epochs, each with the load-time drops.
    ledgers = []
    for rank in range(2):
        ledger = SkipLedger()
        ledger.add_split(train)
        for _epoch in range(2):
            for batch in DataLoader(Subset(dataset, range(rank, len(dataset), 2)), batch_size=4, collate_fn=collate):
                ledger.add_batch(batch["skipped"], captions, where="train")
        ledgers.append(ledger)
    assert all(len(ledger) < 4 or ledger.n_captions == 6 for ledger in ledgers)
    merged = SkipLedger().merge(ledgers[0]).merge(ledgers[1].state_dict())
    assert merged.report() == REPORT
    assert merged.by_reason() == {"missing file": 1, "empty file": 1, "truncated image": 1, "not an image": 1}
    entries = {Path(p).name: e for p, e in merged.files.items()}
    assert {name: (e["reason"], e["captions"]) for name, e in entries.items()} == BAD
    assert entries["missing.jpg"]["passes"] == ["load"] and entries["text.jpg"]["passes"] == ["train"]
    assert SkipLedger().report() == ""


def test_ledger_save_writes_the_list_and_removes_a_stale_one(data, tmp_path):
    train, _, _ = data
    ledger = SkipLedger()
    ledger.add_split(train)
    ledger.add(train.item_paths[5], "empty file", where="train", captions=2)
    path = ledger.save(tmp_path)
    written = json.loads(path.read_text())
    assert path == tmp_path / SKIP_FILE and written["n_files"] == 2 and written["n_captions"] == 3
    assert [f["path"] for f in written["files"]] == sorted(ledger.files)
    assert SkipLedger().save(tmp_path) is None and not path.exists()  # a run that skipped nothing leaves no list


# ------------------------------------------------------------------------------------- training: the run's list


class PixelMean(nn.Module):
    """The smallest objective over image batches: enough for the trainer to train, skip and checkpoint."""

    def __init__(self):
        super().__init__()
        self.model = nn.Linear(3, 1)

    def forward(self, batch):
        loss = self.model(batch["pixels"].mean((2, 3))).pow(2).mean()
        return {"loss": loss}


def make_run(data, out_dir, max_steps, on_step_end=None) -> Trainer:
    train, loader, tok = data
    ledger = SkipLedger()
    ledger.add_split(train)  # what stages.load_split records for the tools
    cfg = TrainConfig(max_steps=max_steps, batch_size=4, lr=1e-3, warmup_steps=1, save_every=5, log_every=5)
    torch.manual_seed(0)
    return Trainer(
        PixelMean(),
        PairDataset(train, loader, tok, MAX_LEN, on_error="skip"),
        collate_fn=collate,
        out_dir=out_dir,
        cfg=cfg,
        seed=1,
        accelerator=make_accelerator(out_dir, log=False),
        on_step_end=on_step_end,
        skip_ledger=ledger,
    )


def test_training_run_ends_with_every_bad_file_and_writes_the_list(data, tmp_path, capsys):
    # 37 captions in batches of 4: step 12 is past the first epoch, so every bad file has been read.
    state = make_run(data, tmp_path / "straight", 12).train()
    out = capsys.readouterr().out
    assert f"left out by this run (data.on_error=skip): {REPORT}" in out
    written = json.loads((tmp_path / "straight" / SKIP_FILE).read_text())
    assert written["n_files"] == 4 and written["n_captions"] == 6
    assert {Path(f["path"]).name: f["reason"] for f in written["files"]} == {n: r for n, (r, _) in BAD.items()}
    # The epoch counts are read-time samples: 2 + 1 + 2 per epoch over the three files that exist.
    assert sum(state.skipped.values()) >= 5 and "missing file" not in state.skipped

    class Crash(Exception):
        pass

    def crash_at_7(trainer):
        if trainer.state.step == 7:
            raise Crash

    with pytest.raises(Crash):
        make_run(data, tmp_path / "resumed", 12, on_step_end=crash_at_7).train()
    saved = json.loads((tmp_path / "resumed" / "checkpoints" / "step_0000005" / "trainer_state.json").read_text())
    assert len(saved["skipped_files"]) > 1 and saved["skipped"]  # read-time files, beyond the load-time one
    trainer = make_run(data, tmp_path / "resumed", 12)  # resumes at step 5 with a ledger of the load-time drop only
    assert trainer.skip_ledger.state_dict() == saved["skipped_files"]
    resumed = trainer.train()
    # The checkpoint carried the counts and the files met before step 5: the account equals the straight run's.
    assert resumed.skipped == state.skipped and resumed.skipped_files.keys() == state.skipped_files.keys()
    assert json.loads((tmp_path / "resumed" / SKIP_FILE).read_text())["files"] == written["files"]


# ------------------------------------------------------------------------------- the passes outside training


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    return create_teacher("captioner_tiny", **model_kw(data[2])).eval()


def test_token_store_build_leaves_unreadable_items_out_under_skip(data, teacher, tmp_path):
    train, loader, tok = data
    ledger = SkipLedger()
    scorer = TeacherPairScorer(
        teacher, "h", train, loader, tok, MAX_LEN, tmp_path / "tokens", on_error="skip", ledger=ledger
    )
    store = TokenStore.open(tmp_path / "tokens")
    assert len(store) == train.n_items and store.skipped == bad_rows(train)  # row i is still item i
    # The stamp and the placeholder rows sit side by side in meta.json: the checked open keeps both.
    assert TokenStore.open(tmp_path / "tokens", expect=scorer.stamp).skipped == bad_rows(train)
    with pytest.raises(StaleArtefactError, match="teacher_hash"):
        TokenStore.open(tmp_path / "tokens", expect={**scorer.stamp, "teacher_hash": "another"})
    assert {Path(p).name for p in ledger.files} == {"empty.jpg", "truncated.jpg", "text.jpg"}
    assert all(e["passes"] == ["teacher tokens"] for e in ledger.files.values())
    row = min(bad_rows(train))
    with pytest.raises(KeyError, match="has no tokens"):
        scorer(torch.tensor([0]), torch.tensor([row]))  # a placeholder never reaches the teacher
    good = [i for i in range(train.n_items) if i not in bad_rows(train)]
    text = train.text_to_visual.index(good[-1])
    direct = teacher.score_pairs(teacher.encode_visual(loader(train.item_paths[good[-1]])[None]),
                                 scorer.ids[[text]], scorer.mask[[text]])  # fmt: skip
    assert torch.allclose(scorer(torch.tensor([text]), torch.tensor([good[-1]])), direct, atol=1e-3)

    # A later run reusing the store still accounts for the rows it lacks; a run under raise rebuilds it.
    again = SkipLedger()
    TeacherPairScorer(teacher, "h", train, loader, tok, MAX_LEN, tmp_path / "tokens", on_error="skip", ledger=again)
    assert again.files.keys() == ledger.files.keys()
    with pytest.raises(DataError) as info:
        TeacherPairScorer(teacher, "h", train, loader, tok, MAX_LEN, tmp_path / "tokens")
    message = str(info.value)
    assert str(Path(train.item_paths[row])) in message and "data.on_error=skip" in message


def test_miner_never_mines_an_unreadable_item(data):
    train, loader, tok = data
    torch.manual_seed(0)
    student = create_student("dual_encoder_tiny", **model_kw(tok))
    ledger = SkipLedger()
    miner = CandidateMiner(train, loader, tok, MAX_LEN, k=train.n_items, on_error="skip", ledger=ledger)
    miner.refresh(student)
    bad = sorted(bad_rows(train))
    assert miner.left_out.tolist() == bad and (miner.item_emb[bad] == 0).all()
    # k = every item: each caption's list holds all items but its own and the unreadable ones.
    assert not np.isin(miner.mined.numpy(), bad).any()
    good_texts = [t for t, item in enumerate(train.text_to_visual) if item not in bad]
    assert (miner.mined[good_texts] >= 0).sum(1).eq(train.n_items - 4).all()
    with pytest.raises(DataError, match="data.on_error=skip"):
        CandidateMiner(train, loader, tok, MAX_LEN, k=3).refresh(student)


def test_group_neighbours_that_cannot_be_read_are_counted_like_other_skips(data, teacher, tmp_path, capsys):
    """loss.distill=group loads each anchor's neighbours itself. The loader here serves only readable anchors, so
    every file left out is a neighbour's: dropped from its batch, then counted by the trainer in the run's ledger and
    its per-reason sample counts (summed over processes, kept in checkpoints), and listed at the end of the run."""
    train, loader, tok = data
    bad = bad_rows(train)
    dataset = PairDataset(train, loader, tok, MAX_LEN, on_error="skip")
    anchors = Subset(dataset, [t for t, item in enumerate(train.text_to_visual) if item not in bad])
    miner = CandidateMiner(train, loader, tok, MAX_LEN, k=4, on_error="skip", ledger=SkipLedger())
    composer = GroupComposer(train, dataset, miner, group_size=4, seed=0)  # never mined: random neighbours
    scorer = TeacherPairScorer(teacher, "h", train, loader, tok, MAX_LEN, tmp_path / "tokens", on_error="skip",
                               ledger=SkipLedger())  # fmt: skip
    batcher = DistillBatcher("group", scorer, None, miner, mine_every=10**6, composer=composer, mine_start=10**6)
    batch, _ = composer.compose(collate([dataset[int(i)] for i in anchors.indices[:4]]), step=0)
    assert all(Path(path).name in BAD for path, _ in batch["skipped"])
    assert not set(batch["item_index"].tolist()) & set(bad)  # the rows of what could not be read are gone
    torch.manual_seed(0)
    objective = DistillObjective(create_student("dual_encoder_tiny", **model_kw(tok)))
    out = tmp_path / "run"
    cfg = TrainConfig(max_steps=6, batch_size=2, lr=1e-3, warmup_steps=1, save_every=3, log_every=10)
    trainer = Trainer(objective, anchors, collate_fn=collate, out_dir=out, cfg=cfg, seed=1,
                      accelerator=make_accelerator(out, log=False), prepare_batch=batcher)  # fmt: skip
    state = trainer.train()
    met = {Path(p).name: e["reason"] for p, e in trainer.skip_ledger.files.items()}
    assert met and all(BAD[name][0] == reason for name, reason in met.items()), met
    assert sum(state.skipped.values()) >= len(met) and set(state.skipped) == set(met.values())
    assert {Path(f["path"]).name for f in json.loads((out / SKIP_FILE).read_text())["files"]} == set(met)
    assert f"left out by this run (data.on_error=skip): {len(met)} file" in capsys.readouterr().out
    saved = json.loads((out / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert saved["skipped"] == state.skipped  # in the checkpoint, so a resumed run still accounts for them


def test_validation_leaves_out_unreadable_items_and_says_how_many(data):
    train, loader, tok = data
    torch.manual_seed(0)
    student = create_student("dual_encoder_tiny", **model_kw(tok)).eval()
    metrics = evaluate_student(student, train, loader, tok, max_length=MAX_LEN, on_error="skip", ledger=SkipLedger())
    good = train.select_items([i for i in range(train.n_items) if i not in bad_rows(train)])
    reference = evaluate_student(student, good, loader, tok, max_length=MAX_LEN)
    assert metrics.pop("left_out_items") == 3 and metrics.pop("left_out_texts") == 5
    assert metrics == pytest.approx(reference)
    with pytest.raises(ValueError, match="SkipLedger"):  # under skip, what is left out must be recorded somewhere
        evaluate_student(student, train, loader, tok, max_length=MAX_LEN, on_error="skip")


def test_gallery_encoding_leaves_out_unreadable_items_only_when_asked(data):
    train, loader, _ = data
    batches = DataLoader(VisualDataset(train, loader, on_error="skip"), batch_size=3, collate_fn=collate)
    left_out = []
    emb = encode_gallery(lambda b: b["pixels"].mean((2, 3)), batches, left_out=left_out, progress=False)
    assert left_out == sorted(bad_rows(train)) and np.isnan(emb[left_out]).all()
    assert np.isfinite(np.delete(emb, left_out, axis=0)).all()
    with pytest.raises(ValueError, match="got no embedding"):
        encode_gallery(lambda b: b["pixels"].mean((2, 3)), batches, progress=False)


# ------------------------------------------------------------------------------------------ the tools, end to end


def tool(name, *args, check=True):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *args], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def karpathy_args(root, out, on_error):
    """recipe=smoke on the Karpathy fixture instead of its generated shapes data."""
    return [
        "recipe=smoke",
        f"output_dir={out}",
        "data.dataset=karpathy",
        "data.generate=null",
        f"data.root={root}",
        f"data.ann_file={root}/dataset_flickr30k.json",
        f"data.image_dir={root}/images",
        f"data.on_error={on_error}",
        "train.eval_every=2",
        "train.max_steps=6",  # 37 captions in batches of 8: past one epoch, so training reads every bad file
    ]


@pytest.fixture(scope="module")
def skip_run(bad_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("skip_run")
    args = karpathy_args(bad_root, out, "skip")
    logs = {name: tool(name, *args) for name in ("train_teacher.py", "distill.py", "build_index.py", "rerank_eval.py")}
    return out, logs


@pytest.mark.slow
def test_skip_run_accounts_for_every_bad_file_in_every_stage(skip_run, bad_root):
    out, logs = skip_run
    for name, stage in (("train_teacher.py", "teacher"), ("distill.py", "student")):
        assert f"left out by this run (data.on_error=skip): {REPORT}" in logs[name].stdout, name
        written = json.loads((out / stage / SKIP_FILE).read_text())
        assert written["n_files"] == 4 and written["n_captions"] == 6
        passes = {Path(f["path"]).name: f["passes"] for f in written["files"]}
        assert passes["missing.jpg"] == ["load"] and "val" not in passes["text.jpg"]
    passes = {Path(f["path"]).name: f["passes"] for f in json.loads((out / "student" / SKIP_FILE).read_text())["files"]}
    assert {"teacher tokens", "miner", "train"} <= set(passes["text.jpg"])  # each distill pass met it, once listed

    # The gallery: the unreadable test image is left out of the index and listed in its manifest.
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    broken = str(bad_root / "images" / BAD_TEST)
    assert manifest["skipped"] == [{"id": BAD_TEST, "path": broken, "reason": "not an image"}]
    assert BAD_TEST not in manifest["item_ids"] and manifest["n_items"] == 8
    assert len(TokenStore.open(out / "index" / "tokens")) == 8
    assert json.loads((out / "index" / SKIP_FILE).read_text())["n_files"] == 1
    # The evaluation says what it left out: the broken one of the 9 test images, and its query.
    text = logs["rerank_eval.py"].stdout
    assert "flickr30k/test: 1 of 9 items and 1 of 17 queries left out: build_index could not read them" in text
    assert "flickr30k/test: 16 queries, 8 items (left out: 1 of 17 queries, 1 of 9 items)" in text
    assert json.loads((out / "eval" / SKIP_FILE).read_text())["files"][0]["path"] == broken


@pytest.mark.slow
def test_an_index_built_under_skip_is_stamped_over_the_items_it_indexed(skip_run, bad_root):
    out, _ = skip_run
    index_dir = out / "index"
    manifest = json.loads((index_dir / "manifest.json").read_text())
    indexed = manifest["gallery_hash"]
    assert indexed == hash_ids(manifest["item_ids"])  # the 8 items indexed, not the 9 of the split
    # Embeddings and tokens carry that gallery, so the checks every reader makes against the manifest pass ...
    emb = load_embeddings(index_dir, expect={"student_hash": manifest["student_hash"], "gallery_hash": indexed,
                                             "data.image_size": IMAGE_SIZE})  # fmt: skip
    assert emb.shape[0] == 8 and np.isfinite(emb).all()  # the unread item's NaN row is not among them
    expect = {"teacher_hash": manifest["teacher_hash"], "gallery_hash": indexed, "data.image_size": IMAGE_SIZE}
    store = TokenStore.open(index_dir / "tokens", expect=expect)
    assert store.ids == manifest["item_ids"] and store.skipped == {}  # the student pass already left it out
    # ... while the resumable chunks are keyed by the whole split and by on_error, so a run under raise re-encodes.
    chunks = json.loads((index_dir / "student_chunks" / "meta.json").read_text())["stamp"]
    # (Read before test_gallery_encoding_under_raise_..., whose run under raise restamps them.)
    chunks = {key: chunks[key] for key in ("on_error", "data.image_size", "gallery_hash")}
    test = load_karpathy(bad_root / "dataset_flickr30k.json", bad_root / "images", "test", on_error="skip")
    assert test.n_items == 9 and BAD_TEST in test.item_ids
    assert chunks == {"on_error": "skip", "data.image_size": IMAGE_SIZE, "gallery_hash": hash_ids(test.item_ids)}
    # A reader that expects the whole split (as an index built under raise has) refuses these tokens, naming it.
    with pytest.raises(StaleArtefactError, match="gallery_hash"):
        TokenStore.open(index_dir / "tokens", expect={**expect, "gallery_hash": chunks["gallery_hash"]})


@pytest.mark.slow
def test_gallery_encoding_under_raise_names_the_file_and_the_setting(skip_run, bad_root):
    out, _ = skip_run
    proc = tool("build_index.py", *karpathy_args(bad_root, out, "raise"), check=False)
    assert proc.returncode != 0
    assert str(bad_root / "images" / BAD_TEST) in proc.stderr and "data.on_error=skip" in proc.stderr
    # rerank_eval under raise refuses the index that left an item out (the one skip_run built is still there).
    proc = tool("rerank_eval.py", *karpathy_args(bad_root, out, "raise"), check=False)
    assert proc.returncode != 0 and "left out 1 of 9 items" in proc.stderr and "data.on_error=skip" in proc.stderr
