"""Tests for fastslow.bill: the FLOP counter sees matmuls and attention, the store sizes are those the real stores
write, and the stage totals follow the recipe's schedule."""

import importlib.util
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastslow.bill import DatasetSize, GpuModel, bill, count_flops, unit_costs
from fastslow.config import load_recipe
from teachers.tokens import TokenStore

TINY = DatasetSize("tiny", train_items=40, val_items=8, test_items=60, captions_per_item=3, caption_tokens=10)


def test_count_flops_sees_matmuls_and_attention():
    lin, x = torch.nn.Linear(24, 40, bias=False), torch.randn(5, 24)
    assert count_flops(lambda: lin(x)) == 2 * 5 * 24 * 40
    # Attention [b=2, h=3, L=7, S=11, d=8]: QK^T and AV are 2 * b*h*L*S*d each, whichever kernel the device
    # would choose (a fused CPU kernel that the counter does not know would count 0).
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * 2 * 3 * 7 * 11 * 8)


@pytest.fixture(scope="module")
def smoke():
    return load_recipe(["recipe=smoke"])


def test_teacher_token_bytes_match_a_written_store(smoke, tmp_path):
    u = unit_costs(smoke, TINY.caption_tokens)
    from fastslow.bill import _models

    teacher, _ = _models(smoke, u["vocab_size"])
    with torch.no_grad():
        tokens = teacher.encode_visual(torch.randn(3, 3, smoke.data.image_size, smoke.data.image_size))
    TokenStore.write(tmp_path / "store", ["a", "b", "c"], tokens)
    on_disk = np.load(tmp_path / "store" / "tokens.npy", mmap_mode="r")
    b = bill(smoke, TINY)
    assert b["bytes"]["teacher_tokens_per_item"] == on_disk[0].nbytes
    assert b["bytes"]["teacher_token_store_train"] == TINY.train_items * on_disk[0].nbytes


def test_stage_totals_follow_the_schedule(smoke):
    # teacher_train.max_steps follows train.max_steps unless set (recipes/base.yaml): pin it to see it is its own.
    base = bill(load_recipe(["recipe=smoke", "teacher_train.max_steps=7"]), TINY)
    longer = bill(
        load_recipe(["recipe=smoke", "teacher_train.max_steps=7", f"train.max_steps={2 * smoke.train.max_steps}"]), TINY
    )
    stage = {s["stage"]: s["flops"] for s in base["stages"]}
    stage2 = {s["stage"]: s["flops"] for s in longer["stages"]}
    assert stage2["distill student"] == pytest.approx(2 * stage["distill student"])
    assert stage2["train teacher"] == pytest.approx(stage["train teacher"])
    u, c = base["units"], base["counts"]
    assert c["slow_pairs_full_test"] == TINY.test_items * TINY.captions_per_item * TINY.test_items
    assert stage["slow over the whole test gallery"] == pytest.approx(
        c["slow_pairs_full_test"] * u["teacher_pair_rerank"]
    )
    rows = smoke.train.batch_size if smoke.loss.swap_rows is None else min(smoke.loss.swap_rows, smoke.train.batch_size)
    assert c["teacher_pairs_per_step"] == (rows * (smoke.loss.swaps + 1) if smoke.loss.distill == "swap" else 0)
    # Reranking k candidates costs less than the teacher over the whole gallery once the gallery is larger than k.
    assert smoke.combiner.k < TINY.test_items
    assert stage[f"rerank test queries (fast+slow@{smoke.combiner.k})"] < stage["slow over the whole test gallery"]


def test_gpu_hours():
    gpu = GpuModel(peak_flops=1e12, mfu=0.5, scaling=0.9)
    assert gpu.hours(3600 * 0.5e12) == pytest.approx(1.0)
    assert gpu.hours(3600 * 0.5e12, gpus=8) == pytest.approx(1 / (8 * 0.9))


def test_script_table_names_every_stage(smoke):
    spec = importlib.util.spec_from_file_location("scaling_bill", "benchmarks/scaling_bill.py")
    sys.path.insert(0, "benchmarks")
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove("benchmarks")
    b = bill(smoke, TINY)
    text = mod.table(b)
    for s in b["stages"]:
        assert f"| {s['stage']} |" in text


def test_decode_hours_count_every_image_of_a_stage(smoke):
    b = bill(load_recipe(["recipe=smoke", "teacher_train.max_steps=7", "data.num_workers=2"]), TINY, decode_per_s=100.0)
    stage = {s["stage"]: s for s in b["stages"]}
    teacher = stage["train teacher"]
    assert teacher["images"] == 7 * smoke.teacher_train.batch_size
    assert teacher["loader_hours_1"] == pytest.approx(teacher["images"] / (100.0 * 2) / 3600)
    assert stage["slow over the whole test gallery"]["loader_hours_1"] is None  # reads the token store, no images
