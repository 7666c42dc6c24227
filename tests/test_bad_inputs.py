"""Bad input, case by case: every case ends in a clear error of fastslow's own or in a counted skip.

A refused case must raise one of `fastslow.errors` (a `UserError`: what the tools print as one line, exit status
2), whose message names the offending file, key or value and says what to do; a traceback from inside a library
(torch, safetensors, faiss, tokenizers, numpy, PIL, json, yaml) is a failure of the case. A skipped case must
leave the item out and count it, once, in the run's `SkipLedger`. A few inputs are stale but harmless (a
pretrained path gone after training, a k larger than the gallery, a 10,000-word caption): they must work, and
say so where something is lost.

The families: images, annotations (Karpathy, VATEX), clip features, recipes, checkpoints and model directories,
teacher-score caches, indexes and token stores, embeddings, queries, tokenizer files, stamps. Everything runs in
process on tiny untrained models and files made here (one subprocess: a tool's exit on a bad recipe), so the
whole file takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastslow import stages
from fastslow.artefacts import atomic_write_json, check_stamp
from fastslow.combiner import Combiner
from fastslow.config import load_recipe
from fastslow.data import (
    FeatureLoader,
    ImageLoader,
    PairDataset,
    SkipLedger,
    VisualDataset,
    collate,
    load_karpathy,
    load_vatex,
    read_features,
)
from fastslow.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MissingFileError,
    QueryError,
    StaleArtefactError,
    UserError,
)
from fastslow.evaluation import encode_items, encode_texts_student
from fastslow.index import build_index, load_embeddings, load_index, save_embeddings, save_index
from fastslow.score_cache import CacheMismatchError, TeacherScoreCache
from fastslow.tokenizer import TextTokenizer, load_pretrained_tokenizer, train_tokenizer
from teachers import TokenStore, create_teacher

ROOT = Path(__file__).resolve().parents[1]
SKIP_HINT = "data.on_error=skip"
CAPTIONS = [
    "a small red circle left of a large blue square",
    "a green triangle above a yellow star",
    "two blue squares",
    "a large yellow circle right of a small red triangle",
]


# --------------------------------------------------------------------------------------------------- the world


def save_model_dir(directory: Path, cfg, tok, kind: str, model=None) -> Path:
    """What a training stage leaves (model.safetensors, config.yaml, tokenizer.json), for an untrained model."""
    if model is None:
        model = stages.build_teacher(cfg, tok) if kind == "teacher" else stages.build_student(cfg, tok)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, directory / "model.safetensors")
    stages.save_run_config(cfg, directory, model=model)
    tok.save(directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory, checkpoint):
    """The smoke recipe's config, a tokenizer, untrained teacher and student directories, a small image gallery,
    a flat index over it with its embeddings and the teacher's token store: the partners the cases spoil."""
    root = tmp_path_factory.mktemp("world")
    cfg = load_recipe(["recipe=smoke", f"output_dir={root / 'run'}"])
    tok = train_tokenizer(CAPTIONS, vocab_size=200)
    torch.manual_seed(0)
    teacher_dir = save_model_dir(root / "run" / "teacher", cfg, tok, "teacher")
    student_dir = save_model_dir(root / "run" / "student", cfg, tok, "student")
    teacher, _, _ = stages.load_trained(teacher_dir, "teacher")
    student, _, _ = stages.load_trained(student_dir, "student")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(images / f"img{i}.png")
    ids = [f"img{i}.png" for i in range(6)]
    loader = ImageLoader(cfg.data.image_size)
    pixels = torch.stack([loader(images / i) for i in ids])
    with torch.no_grad():
        emb = student.encode_image(pixels).numpy()
        tokens = teacher.encode_visual(pixels)
    index_dir = root / "run" / "index"
    save_index(index_dir, build_index(emb, kind="flat"), {"item_ids": ids, "student_hash": "s" * 16})
    save_embeddings(index_dir, emb, {"student_hash": "s" * 16})
    TokenStore.write(index_dir / "tokens", ids, tokens, meta={"teacher_hash": "t" * 16})
    return SimpleNamespace(
        root=root, cfg=cfg, tok=tok, teacher_dir=teacher_dir, student_dir=student_dir, student=student,
        images=images, ids=ids, loader=loader, index_dir=index_dir, emb=emb, checkpoint=checkpoint,
    )  # fmt: skip


def copy_of(src: Path, tmp: Path) -> Path:
    dst = tmp / src.name
    shutil.copytree(src, dst)
    return dst


def png(path: Path, size: int = 24) -> Path:
    """A noise image: it does not compress, so a cut at half its bytes cuts its pixel data."""
    Image.fromarray((np.random.default_rng(size).random((size, size, 3)) * 255).astype(np.uint8)).save(path)
    return path


def karpathy(tmp: Path, images: list, name: str = "dataset_flickr30k.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps({"images": images}))
    return path


def entry(filename: str, split: str = "train", captions=("a red circle",)) -> dict:
    return {"filename": filename, "split": split, "sentences": [{"raw": c} for c in captions]}


# ---------------------------------------------------------------------------------------------- refused cases

# name -> fn(tmp_path, world) -> (action, the error type, strings the message must hold)
REFUSED = {}


def refused(name):
    def register(fn):
        assert name not in REFUSED, name
        REFUSED[name] = fn
        return fn

    return register


# images ------------------------------------------------------------------------------------------------------


@refused("image: missing file")
def _(tmp, w):
    path = tmp / "gone.jpg"
    return lambda: w.loader(path), DataError, [path, "not found", SKIP_HINT]


@refused("image: zero-byte file")
def _(tmp, w):
    path = tmp / "empty.jpg"
    path.write_bytes(b"")
    return lambda: w.loader(path), DataError, [path, "empty file", SKIP_HINT]


@refused("image: truncated PNG")
def _(tmp, w):
    path = png(tmp / "whole.png", 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return lambda: w.loader(path), DataError, [path, "truncated", SKIP_HINT]


@refused("image: a text file named .jpg")
def _(tmp, w):
    path = tmp / "text.jpg"
    path.write_text("not a JPEG\n")
    return lambda: w.loader(path), DataError, [path, "not an image", SKIP_HINT]


@refused("image: a decompression bomb")
def _(tmp, w):
    path = png(tmp / "huge.png", 64)

    def action():
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = 1000  # PIL refuses more than twice this: 64 x 64 stands in for a 1-gigapixel file
        try:
            w.loader(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old

    return action, DataError, [path, "too large", SKIP_HINT]


# annotations --------------------------------------------------------------------------------------------------


@refused("karpathy: annotation file missing")
def _(tmp, w):
    path = tmp / "dataset_flickr30k.json"
    return lambda: load_karpathy(path, tmp, "train"), MissingFileError, [path, "data.root"]


@refused("karpathy: not JSON")
def _(tmp, w):
    path = tmp / "dataset_flickr30k.json"
    path.write_text('{"images": [')
    return lambda: load_karpathy(path, tmp, "train"), DataError, [path, "not valid JSON", "re-download"]


@refused("karpathy: no images list")
def _(tmp, w):
    path = tmp / "dataset_flickr30k.json"
    path.write_text(json.dumps([{"filename": "a.jpg"}]))
    return lambda: load_karpathy(path, tmp, "train"), DataError, [path, '"images" list', "data.ann_file"]


@refused("karpathy: an entry without filename")
def _(tmp, w):
    path = karpathy(tmp, [entry("a.png"), {"split": "train", "sentences": []}])
    return lambda: load_karpathy(path, tmp, "train"), DataError, [path, 'images[1] has no "filename"']


@refused("karpathy: sentences is not a list")
def _(tmp, w):
    path = karpathy(tmp, [{"filename": "a.png", "split": "train", "sentences": "a red circle"}])
    return lambda: load_karpathy(path, tmp, "train"), DataError, [path, 'images[0]["sentences"] is a str']


@refused("karpathy: a caption that is not text")
def _(tmp, w):
    path = karpathy(tmp, [{"filename": "a.png", "split": "train", "sentences": [{"raw": 7}]}])
    return lambda: load_karpathy(path, tmp, "train"), DataError, [path, 'images[0].sentences[0]["raw"]']


@refused("karpathy: duplicate filenames")
def _(tmp, w):
    png(tmp / "a.png")
    png(tmp / "b.png")
    path = karpathy(tmp, [entry("a.png"), entry("b.png"), entry("a.png", captions=["a blue square"])])
    needles = [path, "images[2]", "'a.png'", "images[0]", "one entry per image"]
    return lambda: load_karpathy(path, tmp, "train"), DataError, needles


@refused("karpathy: an image without captions")
def _(tmp, w):
    png(tmp / "a.png")
    path = karpathy(tmp, [entry("a.png", captions=["   "])])
    return lambda: load_karpathy(path, tmp, "train"), DataError, [path, "images[0] (a.png) has no captions", SKIP_HINT]


@refused("karpathy: image folder missing")
def _(tmp, w):
    path = karpathy(tmp, [entry("a.png")])
    folder = tmp / "no-such-folder"
    needles = [folder / "a.png", f"the image folder {folder} does not exist", "data.root"]
    return lambda: load_karpathy(path, folder, "train"), DataError, needles


@refused("vatex: not a list")
def _(tmp, w):
    path = tmp / "vatex_training_v1.0.json"
    path.write_text(json.dumps({"videoID": "v1"}))
    return lambda: load_vatex(path, tmp), DataError, [path, "expected a JSON list", "data.root"]


@refused("vatex: duplicate videoID")
def _(tmp, w):
    path = tmp / "vatex_training_v1.0.json"
    path.write_text(json.dumps([{"videoID": "v1", "enCap": ["a"]}, {"videoID": "v1", "enCap": ["b"]}]))
    return lambda: load_vatex(path, tmp), DataError, [path, "[1] repeats videoID 'v1'"]


@refused("vatex: captions that are not strings")
def _(tmp, w):
    path = tmp / "vatex_training_v1.0.json"
    path.write_text(json.dumps([{"videoID": "v1", "enCap": [["nested"]]}]))
    return lambda: load_vatex(path, tmp), DataError, [path, '[0]["enCap"] is not a list of strings']


@refused("vatex: feature file missing")
def _(tmp, w):
    path = tmp / "vatex_training_v1.0.json"
    path.write_text(json.dumps([{"videoID": "v1", "enCap": ["a person walks"]}]))
    return lambda: load_vatex(path, tmp), DataError, [tmp / "v1.npy", "feature file not found", SKIP_HINT]


# clip features ------------------------------------------------------------------------------------------------


def npy(path: Path, array: np.ndarray) -> Path:
    with open(path, "wb") as f:
        np.save(f, array)
    return path


@refused("features: a text file")
def _(tmp, w):
    path = tmp / "v.npy"
    path.write_text("0.1 0.2\n")
    return lambda: read_features(path, 8), DataError, [path, "not a .npy file", SKIP_HINT]


@refused("features: an .npz archive")
def _(tmp, w):
    path = tmp / "v.npy"
    with open(path, "wb") as f:
        np.savez(f, x=np.zeros((4, 8), np.float32))
    return lambda: read_features(path, 8), DataError, [path, "a .npz archive", SKIP_HINT]


class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@refused("features: a pickled object array (never unpickled)")
def _(tmp, w):
    path, marker = tmp / "v.npy", tmp / "marker"
    with open(path, "wb") as f:
        np.save(f, np.array([Payload(marker)], dtype=object), allow_pickle=True)

    def action():
        try:
            read_features(path, 8)
        finally:
            assert not marker.exists()

    return action, DataError, [path, "allow_pickle=False", SKIP_HINT]


@refused("features: another feature size")
def _(tmp, w):
    path = npy(tmp / "v.npy", np.zeros((5, 4), np.float32))
    return lambda: read_features(path, 8), DataError, [path, "feature dimension 4, expected 8", "data.feature_dir"]


@refused("features: NaN values")
def _(tmp, w):
    path = npy(tmp / "v.npy", np.full((5, 8), np.nan, np.float32))
    return lambda: read_features(path, 8), DataError, [path, "NaN", SKIP_HINT]


@refused("features: integers")
def _(tmp, w):
    path = npy(tmp / "v.npy", np.zeros((5, 8), np.int64))
    return lambda: read_features(path, 8), DataError, [path, "dtype int64", SKIP_HINT]


@refused("features: no clips")
def _(tmp, w):
    path = npy(tmp / "v.npy", np.zeros((0, 8), np.float32))
    return lambda: read_features(path, 8), DataError, [path, "holds no features", SKIP_HINT]


@refused("features: 4-D array")
def _(tmp, w):
    path = npy(tmp / "v.npy", np.zeros((2, 2, 5, 8), np.float32))
    return lambda: read_features(path, 8), DataError, [path, "expected (1, T, D) or (T, D)", SKIP_HINT]


@refused("features: truncated .npy")
def _(tmp, w):
    path = npy(tmp / "v.npy", np.zeros((64, 8), np.float32))
    path.write_bytes(path.read_bytes()[:300])
    return lambda: FeatureLoader(16, 8)(path), DataError, [path, "corrupt or truncated", SKIP_HINT]


# recipes ------------------------------------------------------------------------------------------------------


def recipe_case(name, overrides, needles):
    @refused(f"recipe: {name}")
    def _(tmp, w):
        return lambda: load_recipe(["recipe=smoke", f"output_dir={tmp}", *overrides]), ConfigError, needles


recipe_case("misspelled key", ["train.lrr=1"], ["train.lrr", "Did you mean", "train.lr"])
recipe_case("text for a float", ["train.lr=abc"], ["train.lr expects a float", "'abc'"])
recipe_case("eval.k=[0]", ["eval.k=[0]"], ["eval.k=[0] is out of range", ">= 1"])
recipe_case("eval.k=[]", ["eval.k=[]"], ["eval.k=[] is empty", "eval.k=[1]"])
recipe_case("unknown distillation mode", ["loss.distill=bogus"], ["loss.distill='bogus' is not one of", "swap"])
recipe_case("unknown dataset", ["data.dataset=foo"], ["data.dataset='foo' is not one of", "karpathy"])
recipe_case("unknown index kind", ["index.kind=bogus"], ["index.kind='bogus'", "ivfpq"])
recipe_case("grad_accum=0", ["train.grad_accum=0"], ["train.grad_accum=0 is out of range", ">= 1"])
recipe_case("text for a number that may be null", ["combiner.alpha=abc"], ["combiner.alpha expects", "'abc'"])
recipe_case("resume from a checkpoint that is not there", ["train.resume=/no/such/ckpt"],
            ["train.resume=/no/such/ckpt: no such checkpoint", "auto"])  # fmt: skip


@refused("recipe: no such recipe")
def _(tmp, w):
    return lambda: load_recipe(["recipe=nope"]), ConfigError, ["recipe=nope: no such recipe", "smoke"]


@refused("recipe: a YAML file that does not parse")
def _(tmp, w):
    path = tmp / "mine.yaml"
    path.write_text("train:\n  lr: [1e-4\n")
    return lambda: load_recipe([f"recipe={path}"]), ConfigError, [path, "cannot read it"]


# checkpoints and model directories ----------------------------------------------------------------------------


@refused("model dir: weights of another model family (size mismatch)")
def _(tmp, w):
    d = copy_of(w.teacher_dir, tmp)
    other = load_recipe(["recipe=smoke", f"output_dir={tmp}", "teacher.name=captioner_small"])
    save_model_dir(tmp / "other", other, w.tok, "teacher")
    shutil.copy(tmp / "other" / "model.safetensors", d / "model.safetensors")
    needles = [d / "model.safetensors", "captioner_tiny", "shape", "another model"]
    return lambda: stages.load_trained(d, "teacher"), CheckpointError, needles


@refused("model dir: a student's weights where the teacher's belong")
def _(tmp, w):
    d = copy_of(w.teacher_dir, tmp)
    shutil.copy(w.student_dir / "model.safetensors", d / "model.safetensors")
    needles = [d / "model.safetensors", "captioner_tiny", "missing", "unexpected"]
    return lambda: stages.load_trained(d, "teacher"), CheckpointError, needles


@refused("model dir: truncated model.safetensors")
def _(tmp, w):
    d = copy_of(w.student_dir, tmp)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    needles = [weights, "not a readable safetensors", "distill.py"]
    return lambda: stages.load_trained(d, "student"), CheckpointError, needles


@refused("model dir: zero-byte model.safetensors")
def _(tmp, w):
    d = copy_of(w.teacher_dir, tmp)
    weights = d / "model.safetensors"
    weights.write_bytes(b"")
    needles = [weights, "empty (0 bytes)", "train_teacher.py"]
    return lambda: stages.load_trained(d, "teacher"), CheckpointError, needles


@refused("model dir: no model.safetensors")
def _(tmp, w):
    d = copy_of(w.teacher_dir, tmp)
    (d / "model.safetensors").unlink()
    return lambda: stages.load_trained(d, "teacher"), MissingFileError, [d / "model.safetensors", "train_teacher.py"]


@refused("model dir: no tokenizer.json")
def _(tmp, w):
    d = copy_of(w.student_dir, tmp)
    (d / "tokenizer.json").unlink()
    return lambda: stages.load_trained(d, "student"), MissingFileError, [d / "tokenizer.json", "distill.py"]


@refused("model dir: config.yaml that does not parse")
def _(tmp, w):
    d = copy_of(w.student_dir, tmp)
    (d / "config.yaml").write_text("student: {name: [dual\n")
    return lambda: stages.load_trained(d, "student"), ConfigError, [d / "config.yaml", "cannot read it", "distill.py"]


def toy_trainer(out, resume="auto"):
    from fastslow.trainer import TrainConfig, Trainer, make_accelerator

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 1)

        def forward(self, batch):
            return {"loss": self.model(batch["x"]).pow(2).mean()}

    data = [{"x": torch.full((2,), float(i))} for i in range(8)]
    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-3, warmup_steps=1, save_every=2, resume=resume, log_every=1)
    collate_fn = lambda s: {"x": torch.stack([d["x"] for d in s])}  # noqa: E731
    acc = make_accelerator(out, log=False)
    return Trainer(Toy(), data, collate_fn=collate_fn, out_dir=out, cfg=cfg, accelerator=acc)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_run")
    toy_trainer(out).train()
    return out / "checkpoints" / "step_0000002"


@refused("checkpoint: a truncated optimizer file (resume=PATH)")
def _(tmp, w):
    ckpt = copy_of(w.checkpoint, tmp)
    state = ckpt / "optimizer.safetensors"
    state.write_bytes(state.read_bytes()[:-10])
    return lambda: toy_trainer(tmp / "run", resume=str(ckpt)), CheckpointError, ["optimizer.safetensors", "bytes"]


@refused("checkpoint: a pickle planted as optimizer.pt (never unpickled)")
def _(tmp, w):
    ckpt, marker = copy_of(w.checkpoint, tmp), tmp / "marker"
    torch.save({"state": Payload(marker)}, ckpt / "optimizer.pt")

    def action():
        try:
            toy_trainer(tmp / "run", resume=str(ckpt))
        finally:
            assert not marker.exists()

    return action, CheckpointError, ["optimizer.pt", "not listed in the manifest", "train.resume=auto"]


# teacher-score caches -----------------------------------------------------------------------------------------


def cache(directory, **kw):
    args = dict(teacher_hash="t1", source="listwise", dataset_hash="d1", n_items=6, settings={"data.image_size": 32})
    return TeacherScoreCache(directory, **{**args, **kw})


@refused("score cache: not a database")
def _(tmp, w):
    (tmp / "cache").mkdir()
    (tmp / "cache" / "scores.sqlite").write_bytes(b"this is not SQLite" * 100)
    needles = [tmp / "cache" / "scores.sqlite", "not a readable SQLite", "delete it"]
    return lambda: cache(tmp / "cache"), UserError, needles


@refused("score cache: another teacher's")
def _(tmp, w):
    cache(tmp / "cache").close()
    needles = ["teacher_hash: saved 't1', now 't2'", f"delete {tmp / 'cache'}"]
    return lambda: cache(tmp / "cache", teacher_hash="t2"), CacheMismatchError, needles


@refused("score cache: another image size")
def _(tmp, w):
    cache(tmp / "cache").close()
    needles = ["data.image_size: saved 32, now 64", f"delete {tmp / 'cache'}"]
    return lambda: cache(tmp / "cache", settings={"data.image_size": 64}), CacheMismatchError, needles


@refused("score cache: a directory of other files")
def _(tmp, w):
    (tmp / "cache").mkdir()
    (tmp / "cache" / "notes.txt").write_text("mine")
    return lambda: cache(tmp / "cache"), CacheMismatchError, [tmp / "cache", "notes.txt", "not a teacher score cache"]


# indexes, embeddings, token stores ----------------------------------------------------------------------------


@refused("index: no index directory")
def _(tmp, w):
    return lambda: load_index(tmp / "index", rebuild="REBUILD"), MissingFileError, [tmp / "index", "REBUILD"]


@refused("index: manifest.json that does not parse")
def _(tmp, w):
    d = copy_of(w.index_dir, tmp)
    (d / "manifest.json").write_text('{"item_ids": [')
    needles = [d / "manifest.json", "unreadable", "REBUILD"]
    return lambda: load_index(d, rebuild="REBUILD"), StaleArtefactError, needles


@refused("index: truncated index.faiss")
def _(tmp, w):
    d = copy_of(w.index_dir, tmp)
    index = d / "index.faiss"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    return lambda: load_index(d, rebuild="REBUILD"), StaleArtefactError, [index, "cannot be read", "REBUILD"]


@refused("index: zero-byte index.faiss")
def _(tmp, w):
    d = copy_of(w.index_dir, tmp)
    (d / "index.faiss").write_bytes(b"")
    return lambda: load_index(d, rebuild="REBUILD"), StaleArtefactError, [d / "index.faiss", "REBUILD"]


@refused("index: built by another student")
def _(tmp, w):
    d = copy_of(w.index_dir, tmp)
    needles = ["student_hash: saved 'ssssssssssssssss', now 'another'", "REBUILD"]
    return lambda: load_index(d, expect={"student_hash": "another"}, rebuild="REBUILD"), StaleArtefactError, needles


@refused("embeddings: truncated embeddings.npy")
def _(tmp, w):
    d = copy_of(w.index_dir, tmp)
    path = d / "embeddings.npy"
    path.write_bytes(path.read_bytes()[:-16])
    needles = [path, "not the file its stamp", "REBUILD"]
    return lambda: load_embeddings(d, expect={}, rebuild="REBUILD"), StaleArtefactError, needles


@refused("embeddings: no stamp")
def _(tmp, w):
    d = copy_of(w.index_dir, tmp)
    (d / "embeddings.stamp.json").unlink()
    needles = [d / "embeddings.npy", "has no stamp"]
    return lambda: load_embeddings(d, expect={}, rebuild="REBUILD"), StaleArtefactError, needles


@refused("token store: none there")
def _(tmp, w):
    return lambda: TokenStore.open(tmp / "tokens", rebuild="REBUILD"), MissingFileError, [tmp / "tokens", "REBUILD"]


@refused("token store: meta.json that does not parse")
def _(tmp, w):
    d = copy_of(w.index_dir / "tokens", tmp)
    (d / "meta.json").write_text("{")
    needles = [d / "meta.json", "unreadable", "REBUILD"]
    return lambda: TokenStore.open(d, rebuild="REBUILD"), StaleArtefactError, needles


@refused("token store: meta.json of something else")
def _(tmp, w):
    d = copy_of(w.index_dir / "tokens", tmp)
    (d / "meta.json").write_text(json.dumps({"format": "other"}))
    needles = [d, "not a fastslow.TokenStore", "REBUILD"]
    return lambda: TokenStore.open(d, rebuild="REBUILD"), StaleArtefactError, needles


@refused("token store: truncated tokens.npy")
def _(tmp, w):
    d = copy_of(w.index_dir / "tokens", tmp)
    path = d / "tokens.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return lambda: TokenStore.open(d, rebuild="REBUILD"), StaleArtefactError, [path, "cannot be read", "REBUILD"]


@refused("token store: another teacher's")
def _(tmp, w):
    d = copy_of(w.index_dir / "tokens", tmp)
    needles = ["teacher_hash: saved 'tttttttttttttttt', now 'other'", "REBUILD"]
    return lambda: TokenStore.open(d, expect={"teacher_hash": "other"}, rebuild="REBUILD"), StaleArtefactError, needles


# queries ------------------------------------------------------------------------------------------------------


def combiner(w, **kw):
    index, _ = load_index(w.index_dir)
    ml = w.cfg.data.max_length
    encode = lambda texts: encode_texts_student(w.student, w.tok, texts, max_length=ml)  # noqa: E731
    return Combiner(encode, index, None, mode="fast", k=3, tokenizer=w.tok, max_length=ml, **kw)


@refused("query: empty")
def _(tmp, w):
    return lambda: combiner(w).search([""]), QueryError, ["query 0 is empty", "nothing to search for"]


@refused("query: only a zero-width space")
def _(tmp, w):
    needles = ["query 1 ('\\u200b')", "no words the tokenizer knows"]
    return lambda: combiner(w).search(["a red circle", "\u200b"]), QueryError, needles


@refused("query: k=0")
def _(tmp, w):
    return lambda: combiner(w).search(["a red circle"], k=0), QueryError, ["k must be a positive integer", "got 0"]


@refused("query: k is not a number")
def _(tmp, w):
    return lambda: combiner(w).search(["a red circle"], k="ten"), QueryError, ["k must be a positive integer", "'ten'"]


# tokenizer files ----------------------------------------------------------------------------------------------


@refused("tokenizer: tokenizer.json that does not parse")
def _(tmp, w):
    path = tmp / "tokenizer.json"
    path.write_text('{"model": ')
    return lambda: TextTokenizer.from_file(path), UserError, [path, "not a readable tokenizer", "tokenizer.path"]


@refused("tokenizer: zero-byte tokenizer.json")
def _(tmp, w):
    path = tmp / "tokenizer.json"
    path.write_bytes(b"")
    return lambda: TextTokenizer.from_file(path), UserError, [path, "not a readable tokenizer"]


@refused("tokenizer: no start or end token")
def _(tmp, w):
    from tokenizers import Tokenizer, models

    path = tmp / "tokenizer.json"
    Tokenizer(models.WordLevel({"red": 0, "circle": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(path))
    needles = [path, "start and end a text", "bos_token"]
    return lambda: load_pretrained_tokenizer(path), UserError, needles


@refused("tokenizer: tokenizer.path that is not there")
def _(tmp, w):
    path = tmp / "bert-base-uncased"
    return lambda: load_pretrained_tokenizer(path), MissingFileError, [path, "nothing is downloaded"]


@refused("tokenizer: made with another vocab_size")
def _(tmp, w):
    cfg = load_recipe(["recipe=smoke", f"output_dir={tmp}"])
    stages.get_tokenizer(cfg, SimpleNamespace(captions=CAPTIONS))
    other = load_recipe(["recipe=smoke", f"output_dir={tmp}", "tokenizer.vocab_size=100"])
    needles = ["tokenizer.vocab_size: saved 200, now 100", f"delete {tmp / 'tokenizer.json'}"]
    return lambda: stages.get_tokenizer(other, None), StaleArtefactError, needles


@refused("tokenizer: the teacher's made with another teacher.tokenizer.vocab_size")
def _(tmp, w):
    cfg = load_recipe(["recipe=smoke", f"output_dir={tmp}", "teacher.tokenizer.vocab_size=150"])
    stages.get_teacher_tokenizer(cfg, SimpleNamespace(captions=CAPTIONS))
    other = load_recipe(["recipe=smoke", f"output_dir={tmp}", "teacher.tokenizer.vocab_size=120"])
    needles = ["teacher.tokenizer.vocab_size: saved 150, now 120", f"delete {tmp / 'teacher_tokenizer.json'}"]
    return lambda: stages.get_teacher_tokenizer(other, None), StaleArtefactError, needles


@refused("model dir: teacher.text_pretrained_path of another architecture (not BERT)")
def _(tmp, w):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=50, n_positions=32)).save_pretrained(tmp / "gpt2")
    build = lambda: create_teacher("captioner_tiny", vocab_size=50, text_pretrained_path=str(tmp / "gpt2"))  # noqa: E731
    return build, CheckpointError, ["teacher.text_pretrained_path", "model_type='gpt2'", "BERT-family"]


# stamps -------------------------------------------------------------------------------------------------------


def stamped(tmp: Path) -> Path:
    path = tmp / "fuse_alpha.json"
    atomic_write_json(path, {"alpha": 0.3}, stamp={"student_hash": "s1", "teacher_hash": "t1"})
    return path


@refused("stamp: a stamp file that does not parse")
def _(tmp, w):
    path = stamped(tmp)
    (tmp / "fuse_alpha.stamp.json").write_text("{")
    needles = [path, "has no stamp", "REBUILD"]
    return lambda: check_stamp(path, {"student_hash": "s1"}, "REBUILD"), StaleArtefactError, needles


@refused("stamp: the file was replaced after it was stamped")
def _(tmp, w):
    path = stamped(tmp)
    path.write_text(json.dumps({"alpha": 0.9}))
    needles = [path, "not the file its stamp", "REBUILD"]
    return lambda: check_stamp(path, {"student_hash": "s1"}, "REBUILD"), StaleArtefactError, needles


@refused("stamp: made for another model pair")
def _(tmp, w):
    path = stamped(tmp)
    needles = [path, "teacher_hash: saved 't1', now 't2'", "REBUILD"]
    return lambda: check_stamp(path, {"teacher_hash": "t2"}, "REBUILD"), StaleArtefactError, needles


@refused("stamp: the artefact itself is gone")
def _(tmp, w):
    path = stamped(tmp)
    path.unlink()
    return lambda: check_stamp(path, {}, "REBUILD"), MissingFileError, [path, "REBUILD"]


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_input_is_refused_with_a_clear_error(name, tmp_path, world):
    action, kind, needles = REFUSED[name](tmp_path, world)
    with pytest.raises(Exception) as info:
        action()
    err = info.value
    # Ours, not a library's: the tools print a UserError as one line, anything else as a traceback.
    assert isinstance(err, UserError), f"{type(err).__module__}.{type(err).__qualname__}: {err}"
    assert isinstance(err, kind), f"{type(err).__qualname__}, not {kind.__qualname__}: {err}"
    for needle in needles:
        assert str(needle) in str(err), f"{needle!r} not in the message: {err}"


def test_a_bad_recipe_stops_a_tool_before_any_work(tmp_path):
    """eval.k=[0] used to fail in rerank_eval after every expensive stage; now at the first line of the tool."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "rerank_eval.py"), "recipe=smoke", f"output_dir={tmp_path / 'run'}",
         "eval.k=[0]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "eval.k=[0] is out of range" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ skipped cases

# name -> fn(tmp_path, world) -> (ledger after the pass, the file, its reason)
SKIPPED = {}


def skipped(name):
    def register(fn):
        SKIPPED[name] = fn
        return fn

    return register


def gallery_with(tmp, w, bad_name, write_bad):
    """A Karpathy test split of two good images and one bad one, read under skip."""
    for name in ("a.png", "b.png"):
        png(tmp / name, 40)
    write_bad(tmp / bad_name)
    path = karpathy(tmp, [entry("a.png", "test"), entry(bad_name, "test", ["x", "y"]), entry("b.png", "test")])
    return load_karpathy(path, tmp, "test", on_error="skip")


def encode_under_skip(split, w):
    ledger = SkipLedger()
    ledger.add_split(split)
    _, kept = encode_items(w.student.encode_visual, split, w.loader, 2, on_error="skip", ledger=ledger, where="index")
    assert kept.tolist() == [i for i, p in enumerate(split.item_paths) if p not in ledger]
    return ledger


@skipped("image: zero-byte file in a gallery")
def _(tmp, w):
    split = gallery_with(tmp, w, "bad.jpg", lambda p: p.write_bytes(b""))
    return encode_under_skip(split, w), tmp / "bad.jpg", "empty file"


@skipped("image: a text file named .jpg in a gallery")
def _(tmp, w):
    split = gallery_with(tmp, w, "bad.jpg", lambda p: p.write_text("text"))
    return encode_under_skip(split, w), tmp / "bad.jpg", "not an image"


@skipped("image: truncated PNG in a gallery")
def _(tmp, w):
    def truncated(p):
        png(p, 64)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    split = gallery_with(tmp, w, "bad.png", truncated)
    return encode_under_skip(split, w), tmp / "bad.png", "truncated image"


@skipped("image: missing file, dropped at load time")
def _(tmp, w):
    split = gallery_with(tmp, w, "bad.png", lambda p: None)
    assert split.n_items == 2
    return encode_under_skip(split, w), tmp / "bad.png", "missing file"


@skipped("karpathy: an image without captions, dropped at load time")
def _(tmp, w):
    for name in ("a.png", "b.png", "bad.png"):
        png(tmp / name)
    path = karpathy(tmp, [entry("a.png", "test"), entry("bad.png", "test", []), entry("b.png", "test")])
    split = load_karpathy(path, tmp, "test", on_error="skip")
    return encode_under_skip(split, w), tmp / "bad.png", "no captions"


@skipped("features: NaN clip features in a training batch")
def _(tmp, w):
    npy(tmp / "v1.npy", np.zeros((3, 16), np.float32))
    npy(tmp / "v2.npy", np.full((3, 16), np.nan, np.float32))
    path = tmp / "vatex_training_v1.0.json"
    path.write_text(json.dumps([{"videoID": v, "enCap": ["a person walks"]} for v in ("v1", "v2")]))
    split = load_vatex(path, tmp, on_error="skip")
    batch = collate([PairDataset(split, FeatureLoader(4, 16), w.tok, 8, on_error="skip")[i] for i in range(2)])
    assert batch["features"].shape[0] == 1
    ledger = SkipLedger()
    ledger.add_batch(batch["skipped"], {str(tmp / "v2.npy"): 1}, where="train")
    return ledger, tmp / "v2.npy", "non-finite features"


@skipped("features: missing feature file, dropped at load time")
def _(tmp, w):
    npy(tmp / "v1.npy", np.zeros((3, 16), np.float32))
    path = tmp / "vatex_training_v1.0.json"
    path.write_text(json.dumps([{"videoID": v, "enCap": ["a person walks"]} for v in ("v1", "v2")]))
    split = load_vatex(path, tmp, on_error="skip")
    assert split.item_ids == ["v1"]
    assert len(VisualDataset(split, FeatureLoader(4, 16), on_error="skip")) == 1
    ledger = SkipLedger()
    ledger.add_split(split)
    return ledger, tmp / "v2.npy", "missing file"


@pytest.mark.parametrize("name", list(SKIPPED))
def test_bad_input_under_skip_is_left_out_and_counted_once(name, tmp_path, world):
    ledger, path, reason = SKIPPED[name](tmp_path, world)
    assert list(ledger.files) == [str(path)] and ledger.reason(path) == reason
    assert ledger.report().startswith("1 file skipped (1 ")


# -------------------------------------------------------------------------------- stale but harmless: must work


def test_a_moved_run_does_not_need_its_pretrained_files(tmp_path, world):
    """The config of a run names `teacher.pretrained_path`, `student.image_pretrained_path` and
    `student.text_pretrained_path`; on another machine they are gone. The weights are in the checkpoint, and the
    text tower's architecture in `text_config.json` beside it: the models load, equal to the ones saved."""
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=256, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(bert)  # fmt: skip
    built = load_recipe(["recipe=smoke", f"output_dir={tmp_path}", f"student.text_pretrained_path={bert}"])
    torch.manual_seed(1)
    student = stages.build_student(built, world.tok)
    assert student.text.encoder.config.hidden_size == 24  # the pretrained dir's shape, not the recipe's
    gone = tmp_path / "gone"
    moved = load_recipe([
        "recipe=smoke", f"output_dir={tmp_path}", f"teacher.pretrained_path={gone / 'resnet.safetensors'}",
        f"student.image_pretrained_path={gone / 'effnet.safetensors'}", f"student.text_pretrained_path={bert}",
    ])  # fmt: skip
    teacher_dir = save_model_dir(tmp_path / "teacher", moved, world.tok, "teacher",
                                 model=stages.build_teacher(world.cfg, world.tok))  # fmt: skip
    student_dir = save_model_dir(tmp_path / "student", moved, world.tok, "student", model=student)
    assert (student_dir / "text_config.json").is_file()
    shutil.rmtree(bert)  # the run moved to a machine without the pretrained files
    teacher, _, _ = stages.load_trained(teacher_dir, "teacher")
    loaded, cfg, _ = stages.load_trained(student_dir, "student")
    assert cfg.student.text_pretrained_path == str(bert)  # the config still names it: only the loader ignores it
    for key, value in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # A text_config.json that is gone too: the error names the key and what to do.
    (student_dir / "text_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"student.text_pretrained_path=.*bert.*text_config.json"):
        stages.load_trained(student_dir, "student")


def test_a_10000_word_caption_is_cut_counted_and_said_once(world):
    """A caption longer than data.max_length is cut to its first words, counted, and said once per tokenizer."""
    tok = train_tokenizer(CAPTIONS, vocab_size=200)
    long = " ".join(["red circle"] * 5000)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")  # no dedup by the warnings module: the once is ours
        ids, mask = tok.encode([long, CAPTIONS[0], long], 20)
        tok.encode([long], 20)
    assert ids.shape == (3, 20) and int(mask[0].sum()) == 20 and int(ids[0, 19]) == tok.eos_id
    assert tok.truncated_texts == 3
    messages = [str(w.message) for w in said]
    assert len(messages) == 1 and "max_length=20" in messages[0] and "data.max_length" in messages[0]


def test_k_larger_than_the_gallery_is_clamped_with_a_warning(world):
    with pytest.warns(UserWarning, match="k=50 is larger than the gallery .6 items.: using k=6"):
        hits = combiner(world).search(["a red circle"], k=50)
    assert len(hits[0]) == 6
