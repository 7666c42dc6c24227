"""Tests for fastslow.metrics: hand-computed ranks, extremes, ties, input types, chunking, and the output files."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from fastslow.metrics import METRIC_KEYS, format_table, retrieval_metrics, t2v_ranks, v2t_ranks, write_metrics

# 4 texts x 3 items; texts 0 and 1 describe item 0, text 2 item 1, text 3 item 2.
HAND_SCORES = [
    [0.9, 0.5, 0.1],  # t0 -> item 0 scores 0.9, the row max: rank 1
    [0.2, 0.8, 0.3],  # t1 -> item 0 scores 0.2, below 0.8 and 0.3: rank 3
    [0.4, 0.6, 0.7],  # t2 -> item 1 scores 0.6, below 0.7: rank 2
    [0.1, 0.3, 0.3],  # t3 -> item 2 scores 0.3, tied with item 1: pessimistic rank 2
]
HAND_TARGET = [0, 0, 1, 2]
HAND_T2V = [1, 3, 2, 2]
# Columns (item -> texts): item 0 = [.9 .2 .4 .1], best positive t0 = .9, no negative >= .9: rank 1.
# item 1 = [.5 .8 .6 .3], positive t2 = .6, negative t1 = .8 above: rank 2.
# item 2 = [.1 .3 .7 .3], positive t3 = .3, negatives t2 = .7 above and t1 = .3 tied: rank 3.
HAND_V2T = [1, 2, 3]


def loop_t2v(scores: np.ndarray, target: list[int]) -> list[int]:
    """Reference: per text, 1 + negatives scoring >= the positive."""
    return [
        1 + sum(scores[i, j] >= scores[i, t] for j in range(scores.shape[1]) if j != t) for i, t in enumerate(target)
    ]


def loop_v2t(scores: np.ndarray, target: list[int]) -> list[int]:
    """Reference: per item, the best rank over its texts, each ranked against the negative texts only."""
    ranks = []
    for j in range(scores.shape[1]):
        positives = [i for i, t in enumerate(target) if t == j]
        negatives = [i for i, t in enumerate(target) if t != j]
        if positives:
            ranks.append(min(1 + sum(scores[n, j] >= scores[p, j] for n in negatives) for p in positives))
        else:
            ranks.append(0)
    return ranks


def random_case(n_visual: int = 31, captions: int = 3, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    target = [j for j in range(n_visual) for _ in range(captions)]
    # Rounded to one decimal so that ties (against negatives and among positives) are frequent.
    return np.round(rng.standard_normal((len(target), n_visual)), 1).astype(np.float32), target


def test_hand_computed_multi_caption_case():
    assert t2v_ranks(HAND_SCORES, HAND_TARGET).tolist() == HAND_T2V
    assert v2t_ranks(HAND_SCORES, HAND_TARGET).tolist() == HAND_V2T
    m = retrieval_metrics(HAND_SCORES, HAND_TARGET)
    assert list(m) == list(METRIC_KEYS)
    assert m["t2v_R@1"] == pytest.approx(25.0)
    assert m["t2v_R@5"] == m["t2v_R@10"] == pytest.approx(100.0)
    assert m["t2v_medr"] == 2.0  # median of 1, 2, 2, 3
    assert m["t2v_meanr"] == 2.0
    assert m["v2t_R@1"] == pytest.approx(100 / 3)
    assert m["v2t_R@5"] == pytest.approx(100.0)
    assert m["v2t_medr"] == 2.0


def test_matches_per_query_loop_reference():
    scores, target = random_case()
    assert t2v_ranks(scores, target).tolist() == loop_t2v(scores, target)
    assert v2t_ranks(scores, target).tolist() == loop_v2t(scores, target)


def test_perfect_scores():
    target = [j for j in range(20) for _ in range(5)]
    scores = np.zeros((100, 20), np.float32)
    scores[np.arange(100), target] = 1.0
    m = retrieval_metrics(scores, target)
    for key in ("t2v_R@1", "t2v_R@5", "t2v_R@10", "v2t_R@1", "v2t_R@5", "v2t_R@10"):
        assert m[key] == 100.0
    assert m["t2v_medr"] == m["t2v_meanr"] == m["v2t_medr"] == 1.0


def test_reversed_scores_give_the_worst_ranks():
    n = 20
    scores = -np.eye(n, dtype=np.float32)  # every positive scores below every negative
    m = retrieval_metrics(scores, list(range(n)))
    assert m["t2v_R@1"] == m["t2v_R@10"] == m["v2t_R@10"] == 0.0
    assert m["t2v_medr"] == m["t2v_meanr"] == m["v2t_medr"] == float(n)


def test_ties_are_pessimistic():
    # A constant matrix carries no information: every positive lands behind every (tied) negative.
    target = [j for j in range(5) for _ in range(2)]  # 10 texts, 5 items
    m = retrieval_metrics(np.ones((10, 5)), target)
    assert m["t2v_R@1"] == 0.0
    assert m["t2v_medr"] == 5.0
    # v2t: the item's other text is a positive, not a competitor: 1 + 8 negatives.
    assert v2t_ranks(np.ones((10, 5)), target).tolist() == [9] * 5


def test_positives_tied_with_each_other_do_not_compete():
    scores = np.array([[0.5, 0.0], [0.5, 0.0], [0.1, 0.9]])
    assert v2t_ranks(scores, [0, 0, 1]).tolist() == [1, 1]


def test_numpy_torch_and_half_inputs_agree():
    scores, target = random_case()
    m_np = retrieval_metrics(scores, target)
    assert retrieval_metrics(torch.from_numpy(scores), torch.tensor(target)) == m_np
    assert retrieval_metrics(scores.astype(np.float64), np.array(target)) == m_np
    # Values with one decimal are exact enough in fp16 that no rank changes.
    assert retrieval_metrics(torch.from_numpy(scores).half(), target) == m_np


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunking_invariance(chunk_size):
    scores, target = random_case(n_visual=23, captions=4, seed=1)
    assert retrieval_metrics(scores, target, chunk_size=chunk_size) == retrieval_metrics(scores, target)


def test_items_without_texts_are_left_out_of_v2t():
    scores = np.array(
        [
            [0.9, 0.95, 0.1],  # t0 -> item 0; item 1 (no text) still competes in t2v: rank 2
            [0.1, 0.5, 0.8],  # t1 -> item 2: rank 1
        ]
    )
    assert t2v_ranks(scores, [0, 2]).tolist() == [2, 1]
    assert v2t_ranks(scores, [0, 2]).tolist() == [1, 0, 1]  # 0 marks "no text"
    m = retrieval_metrics(scores, [0, 2])
    assert m["t2v_R@1"] == 50.0
    assert m["v2t_R@1"] == 100.0  # averaged over items 0 and 2 only
    assert m["v2t_medr"] == 1.0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0]]), [0])
    with pytest.raises(ValueError, match="one entry per text"):
        retrieval_metrics(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        retrieval_metrics(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.zeros((0, 2)), [])


def test_format_table():
    rows = {"fast": {"t2v_R@1": 50.0, "t2v_medr": 2.0}, "fast+slow@10": {"t2v_R@1": 62.345, "extra": 3}}
    table = format_table(rows, precision=2)
    lines = table.splitlines()
    assert len(lines) == 4
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["method", "t2v_R@1", "t2v_medr", "extra"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["fast+slow@10", "62.34", "-", "3"]
    assert len({len(line) for line in lines}) == 1  # columns are aligned
    only = format_table(rows, columns=["t2v_medr"])
    assert "t2v_R@1" not in only and "2.0" in only


def test_write_metrics(tmp_path):
    rows = {"fast": retrieval_metrics(HAND_SCORES, HAND_TARGET), "fast+slow@10": {"t2v_R@1": 75.0}}
    json_path, csv_path = write_metrics(tmp_path / "eval", rows)
    assert json.loads(json_path.read_text()) == rows
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["method", *METRIC_KEYS]
        records = list(reader)
    assert [r["method"] for r in records] == ["fast", "fast+slow@10"]
    assert math.isclose(float(records[0]["t2v_R@1"]), 25.0)
    assert records[1]["t2v_medr"] == ""  # missing values stay empty
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.csv", "metrics.json"]  # no temp files
