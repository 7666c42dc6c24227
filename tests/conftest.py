"""Shared fixtures: the query-time world of tests/test_query.py and tests/test_service.py.

A tokenizer trained on a few captions, a tiny student and teacher (random weights, seeded), a gallery of random
pictures (written as PNG files, as a real gallery folder holds them) indexed with faiss and written to a token store,
each artefact stamped as `tools/build_index.py` stamps it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastslow.index import build_index, hash_ids, save_embeddings, save_index
from fastslow.query import Retriever
from fastslow.tokenizer import train_tokenizer
from students import create_student
from teachers import TokenStore, create_teacher

N_ITEMS, MAX_LENGTH = 24, 16
SETTINGS = {"data.image_size": 32}
REBUILD = "python tools/build_index.py recipe=toy output_dir=runs/toy"
WORDS = "a small large red blue green circle square triangle left of right above below the".split()


def captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    tok = train_tokenizer(captions(200, 0), vocab_size=120)
    student = create_student("dual_encoder_tiny", vocab_size=tok.vocab_size, max_length=MAX_LENGTH).eval()
    teacher = create_teacher("captioner_tiny", vocab_size=tok.vocab_size, max_length=MAX_LENGTH).eval()
    student.requires_grad_(False), teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ids = [f"item_{i:03d}" for i in range(N_ITEMS)]
    pixels = torch.randn(N_ITEMS, 3, 32, 32, generator=g)
    with torch.no_grad():
        emb = student.encode_image(pixels).numpy()
        tokens = teacher.encode_visual(torch.randn(N_ITEMS, 3, 64, 64, generator=g))
    images = tmp_path_factory.mktemp("gallery")
    paths = [str(images / f"{i}.png") for i in ids]
    for p, x in zip(paths, pixels):
        Image.fromarray((x.clamp(-2, 2) * 63 + 128).byte().permute(1, 2, 0).numpy()).save(p)
    d = tmp_path_factory.mktemp("index")
    gallery = {"gallery_hash": hash_ids(ids), **SETTINGS}
    manifest = {"item_ids": ids, "item_paths": paths, "student_hash": "s1", "split": "toy/test", **SETTINGS}
    save_index(d, build_index(emb, "flat"), manifest)
    save_embeddings(d, emb, {"student_hash": "s1", **gallery})
    TokenStore.write(d / "tokens", ids, tokens, meta={"teacher_hash": "t1", **gallery})
    return dict(dir=d, tok=tok, student=student, teacher=teacher, queries=captions(9, 1), emb=emb, ids=ids,
                images=images, paths=paths)  # fmt: skip


def open_retriever(world, directory=None, **over):
    kw = dict(student=world["student"], tokenizer=world["tok"], student_hash="s1", teacher=world["teacher"],
              teacher_hash="t1", max_length=MAX_LENGTH, settings=SETTINGS, rebuild=REBUILD, batch_size=4)  # fmt: skip
    return Retriever.open(directory or world["dir"], **{**kw, **over})
