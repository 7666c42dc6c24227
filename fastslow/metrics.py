"""Retrieval metrics: pure functions from a score matrix to flat keys, plus a results table and its files.

Rank convention (pessimistic ties). The rank of a positive is ``1 + the number of negatives scoring >= it``: a tie
with a negative always counts against the model, so a constant score matrix gets the worst possible ranks (not
R@1 = 100, which "1 + strictly greater" would give). For text -> visual (t2v) each text has one positive item; for
visual -> text (v2t) an item's positives are all its texts and the rank is that of the best-scored one (other
positives never count as competitors, whatever their score).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fastslow.artefacts import atomic_write_text

RECALL_KS = (1, 5, 10)
METRIC_KEYS = (
    "t2v_R@1",
    "t2v_R@5",
    "t2v_R@10",
    "t2v_medr",
    "t2v_meanr",
    "v2t_R@1",
    "v2t_R@5",
    "v2t_R@10",
    "v2t_medr",
)


def _inputs(scores: torch.Tensor | np.ndarray, text_to_visual: Sequence[int] | np.ndarray | torch.Tensor):
    """Validate and convert: scores as a torch tensor (no copy for numpy input), targets as a long tensor."""
    scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_text, n_visual], got shape {tuple(scores.shape)}")
    n_text, n_visual = scores.shape
    if isinstance(text_to_visual, torch.Tensor):
        target = text_to_visual.to(scores.device, torch.long)
    else:
        target = torch.as_tensor(np.asarray(text_to_visual, dtype=np.int64), device=scores.device)
    if target.ndim != 1 or len(target) != n_text:
        raise ValueError(f"text_to_visual must have one entry per text ({n_text}), got shape {tuple(target.shape)}")
    if n_text == 0 or n_visual == 0:
        raise ValueError(f"cannot compute retrieval metrics on an empty score matrix {tuple(scores.shape)}")
    if target.min() < 0 or target.max() >= n_visual:
        raise ValueError(
            f"text_to_visual values must lie in [0, {n_visual}), got {int(target.min())}..{int(target.max())}"
        )
    return scores, target


def _chunk(scores: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    rows = scores[start:stop]
    if rows.dtype not in (torch.float32, torch.float64):
        # Half precision and integers compare exactly once upcast; float64 stays float64 so no new ties appear.
        rows = rows.to(torch.float64 if not rows.is_floating_point() else torch.float32)
    if torch.isnan(rows).any():
        raise ValueError(f"scores contain NaN (rows {start}..{stop - 1}): ranks would be undefined")
    return rows


def t2v_ranks(
    scores: torch.Tensor | np.ndarray, text_to_visual: Sequence[int] | np.ndarray, *, chunk_size: int = 1024
) -> np.ndarray:
    """1-based rank of each text's item among all items (pessimistic ties, see the module docstring).

    Args:
        scores: [n_text, n_visual], higher is better (torch on any device, or numpy).
        text_to_visual: [n_text] index of each text's item.
        chunk_size: texts processed at once; memory is ``chunk_size x n_visual`` booleans.

    Returns:
        [n_text] int64 ranks in ``1..n_visual``.
    """
    scores, target = _inputs(scores, text_to_visual)
    out = []
    for start in range(0, scores.shape[0], chunk_size):
        rows = _chunk(scores, start, start + chunk_size)
        pos = rows.gather(1, target[start : start + chunk_size, None])  # [c, 1]
        # >= counts the positive itself, so this is 1 + #negatives scoring >= the positive.
        out.append((rows >= pos).sum(1))
    return torch.cat(out).cpu().numpy().astype(np.int64)


def v2t_ranks(
    scores: torch.Tensor | np.ndarray, text_to_visual: Sequence[int] | np.ndarray, *, chunk_size: int = 1024
) -> np.ndarray:
    """1-based rank, for each item, of its best-scored text among all texts (pessimistic ties).

    Args:
        scores: [n_text, n_visual], higher is better.
        text_to_visual: [n_text] index of each text's item.
        chunk_size: texts processed at once.

    Returns:
        [n_visual] int64 ranks in ``1..n_text``; 0 for an item that has no text (no rank exists).
    """
    scores, target = _inputs(scores, text_to_visual)
    n_text, n_visual = scores.shape
    # Best positive score per item: scatter-max of each text's score for its own item.
    pos_score = torch.cat(
        [
            _chunk(scores, s, s + chunk_size).gather(1, target[s : s + chunk_size, None])[:, 0]
            for s in range(0, n_text, chunk_size)
        ]
    )
    best = torch.full((n_visual,), -torch.inf, dtype=pos_score.dtype, device=scores.device)
    best = best.scatter_reduce(0, target, pos_score, reduce="amax")
    # rank = 1 + #negatives >= best = 1 + #texts >= best - #positives >= best (the latter are the texts tied at best).
    at_least = torch.zeros(n_visual, dtype=torch.long, device=scores.device)
    for start in range(0, n_text, chunk_size):
        at_least += (_chunk(scores, start, start + chunk_size) >= best[None, :]).sum(0)
    pos_at_best = torch.zeros(n_visual, dtype=torch.long, device=scores.device)
    pos_at_best = pos_at_best.scatter_add(0, target, (pos_score >= best[target]).long())
    ranks = 1 + at_least - pos_at_best
    has_text = torch.zeros(n_visual, dtype=torch.bool, device=scores.device)
    has_text[target] = True
    return torch.where(has_text, ranks, torch.zeros_like(ranks)).cpu().numpy().astype(np.int64)


def _summary(ranks: np.ndarray, prefix: str, with_mean: bool) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.median(ranks))
    if with_mean:
        out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def retrieval_metrics(
    scores: torch.Tensor | np.ndarray, text_to_visual: Sequence[int] | np.ndarray, *, chunk_size: int = 1024
) -> dict[str, float]:
    """Text -> visual and visual -> text retrieval metrics from a full score matrix.

    Ranks are 1-based with pessimistic ties (module docstring). ``R@K`` is the percentage of queries whose rank is
    <= K; ``medr`` is the median rank (``np.median``: the mean of the two middle ranks for an even count, so it can
    end in .5); ``meanr`` the mean rank. v2t queries are the items that have at least one text: an item with no
    text has no positive and is left out of every v2t average (so v2t averages over fewer queries than n_visual).

    Args:
        scores: [n_text, n_visual], higher is better; torch (any device, any float dtype) or numpy.
        text_to_visual: [n_text] index of each text's item; several texts may share one item.
        chunk_size: texts processed at once, bounding memory to ``chunk_size x n_visual`` (a full 25k x 5k
            comparison would otherwise need 125M booleans per pass).

    Returns:
        ``{"t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_medr", "t2v_meanr", "v2t_R@1", "v2t_R@5", "v2t_R@10", "v2t_medr"}``
        as Python floats.

    Raises:
        ValueError: wrong shapes, an empty matrix, out-of-range ``text_to_visual``, or NaN scores.
    """
    t2v = t2v_ranks(scores, text_to_visual, chunk_size=chunk_size)
    v2t = v2t_ranks(scores, text_to_visual, chunk_size=chunk_size)
    return {**_summary(t2v, "t2v", with_mean=True), **_summary(v2t[v2t > 0], "v2t", with_mean=False)}


# ------------------------------------------------------------------------------------------------- tables and files


def _columns(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen = [key for row in rows.values() for key in row]
    # The standard keys first, in their usual order, then any extra key in order of first appearance.
    return [key for key in METRIC_KEYS if key in seen] + [key for key in dict.fromkeys(seen) if key not in METRIC_KEYS]


def format_table(
    rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None, *, precision: int = 1
) -> str:
    """A Markdown table with one row per method (pasteable into docs/BENCHMARKS.md).

    Args:
        rows: ``{method: {metric: value}}``, e.g. ``{"fast": {...}, "fast+slow@10": {...}}``; row order is kept.
        columns: metric keys to show; default the standard keys present, then any others.
        precision: digits after the decimal point for floats.

    Returns:
        The table as a string; a metric a method lacks shows as ``-``.
    """
    cols = _columns(rows, columns)

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.{precision}f}"
        return str(value)

    body = [[str(method)] + [cell(row.get(col)) for col in cols] for method, row in rows.items()]
    header = ["method", *cols]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Method names left-aligned, numbers right-aligned so that decimal points line up.
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def write_metrics(
    out_dir: str | os.PathLike, rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Write ``metrics.json`` (``{method: {metric: value}}``) and ``metrics.csv`` (one row per method, method first).

    Args:
        out_dir: directory, created if needed (e.g. ``${output_dir}/eval``).
        rows: ``{method: {metric: value}}``; values must be JSON-serialisable.
        columns: CSV columns after ``method``; default as in ``format_table``. Missing values are left empty.

    Returns:
        ``(json_path, csv_path)``. Each file is written to a temporary name and renamed, so a reader never sees
        a half-written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "metrics.json", out / "metrics.csv"
    atomic_write_text(json_path, json.dumps({str(m): dict(r) for m, r in rows.items()}, indent=2) + "\n")
    cols = _columns(rows, columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["method", *cols], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for method, row in rows.items():
        writer.writerow({"method": method, **row})
    atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


__all__ = ["METRIC_KEYS", "format_table", "retrieval_metrics", "t2v_ranks", "v2t_ranks", "write_metrics"]
