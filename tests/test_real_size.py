"""A dry run at real size (issue 12): `recipe=flickr` and `recipe=coco` with their real models (`captioner_base`, a
ResNet-50 pyramid and its decoder; `dual_encoder_base`, a ViT-B/16 and a BERT-base text tower) at 224 px run two steps
of each stage on a tiny fixture in the datasets' real layout (Karpathy `dataset_*.json`, real JPEG files, COCO's
`train2014/` / `val2014/` folders), so the shapes and memory of the configuration users run are exercised in CI.

Everything the recipe decides stays as it is (models, image size, max_length, augmentation, index kind, loss); only
what a 10-image fixture cannot hold is made small: steps, batch size, worker processes, the tokenizer's vocabulary and
the number of latency queries. Weights are random (no pretrained file is needed to build the real shapes).

The two recipes share their models and differ in the reader (Flickr's flat folder, COCO's `filepath` folders and
`restval`): flickr runs all four stages, coco the two that read the training layout (the index and evaluation stages
read a split through the same code whichever reader made it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_tools import tool

pytestmark = pytest.mark.slow

WORDS = "a dog runs on the grass man in red shirt rides bike two children play near water".split()
SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
SMALL = [
    "data.num_workers=0", "tokenizer.vocab_size=200", "teacher_train.max_steps=2", "teacher_train.batch_size=2",
    "train.max_steps=2", "train.batch_size=2", "train.warmup_steps=1", "teacher_train.warmup_steps=1",
    "eval.latency_queries=2",
]  # fmt: skip


def write_karpathy(root: Path, dataset: str) -> list[str]:
    """10 real JPEGs (odd sizes: the loaders resize) with 5 captions each, in Flickr30K's or COCO's layout."""
    rng = np.random.default_rng(0)
    images = []
    for i, split in enumerate(SPLITS):
        if dataset == "coco":
            folder = "train2014" if split == "train" and i % 2 == 0 else "val2014"
            split = "restval" if split == "train" and folder == "val2014" else split
            entry = {"filepath": folder, "filename": f"COCO_{folder}_{i:012d}.jpg", "cocoid": i}
            path = root / folder / entry["filename"]
        else:
            entry = {"filename": f"{1000 + i}.jpg", "imgid": i}
            path = root / "flickr30k-images" / entry["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 56, 3), dtype=np.uint8)).save(path, quality=85)
        sentences = []
        for j in range(5):
            raw = " ".join(rng.choice(WORDS, 6)) + " ."
            sentences.append({"raw": raw, "tokens": raw.split()[:-1], "imgid": i, "sentid": 5 * i + j})
        images.append({**entry, "split": split, "sentences": sentences})
    name = "dataset_flickr30k.json" if dataset == "flickr" else "dataset_coco.json"
    (root / name).write_text(json.dumps({"images": images, "dataset": "flickr30k" if dataset == "flickr" else dataset}))
    return [f"data.root={root}"]


@pytest.mark.parametrize("recipe", ["flickr", "coco"])
def test_real_size_recipe_runs_two_steps_of_each_stage(recipe, tmp_path):
    args = [f"recipe={recipe}", f"output_dir={tmp_path / 'run'}", *write_karpathy(tmp_path / recipe, recipe), *SMALL]
    stages = ["train_teacher.py", "distill.py"] + (["build_index.py", "rerank_eval.py"] if recipe == "flickr" else [])
    for stage in stages:
        tool(stage, *args)
    run = tmp_path / "run"
    for model, name in (("teacher", "captioner_base"), ("student", "dual_encoder_base")):
        config = (run / model / "config.yaml").read_text()
        assert f"name: {name}" in config, (model, config[:500])
        # The real sizes: 57.7M (teacher) and 171M (student) fp32 weights.
        assert (run / model / "model.safetensors").stat().st_size > 200e6, model
    if recipe == "flickr":
        manifest = json.loads((run / "index" / "manifest.json").read_text())
        assert manifest["n_items"] == 2 and manifest["dim"] == 512 and manifest["data.image_size"] == 224
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert {"fast", "slow", "fast+slow@2"} <= set(metrics), sorted(metrics)
