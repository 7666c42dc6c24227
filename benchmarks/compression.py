"""What a cheaper Slow model costs in accuracy: token merging (teacher.merge_ratio) against the unmerged teacher.

    python benchmarks/compression.py recipe=shapes output_dir=runs/shapes \
        student=runs/shapes/student ratios=0,0.25,0.5

For each variant, in one run on the test split: bytes per gallery item in the token store, teacher pairs/s in
the rerank pattern (one query against its k candidates; every variant timed in turn, `repeats` rounds, the
median kept, so a busy machine slows all of them alike), forward FLOPs per pair (torch.utils.flop_counter, the
math attention kernel), the teacher's full-ranking t2v R@1, and fast+slow@k R@1 (the student's top k reranked
by the variant). Own arguments: `teacher=` (default ${output_dir}/teacher), `student=` (a student directory; the
fast+slow column is null without it), `ratios=`, `k=` (20), `timing_queries=` (100), `repeats=` (3).

JSON to ${output_dir}/bench/compression.json:
    {"rows": [{"variant": "uncompressed"|"merge-0.25"|..., "bytes_per_item", "pairs_per_s", "flops_per_pair",
               "t2v_R@1", "fast+slow@20_R@1"}], "teacher": dir, "student": dir|null, "k": K, "split": "test"}
The compressed visual cache of issue 10 (learned M-token adapter) is not built yet: its rows are absent.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from _common import ROOT, split_own

from fastslow.artefacts import atomic_write_json


def main() -> None:
    own, overrides = split_own(
        sys.argv[1:],
        {"teacher": "", "student": "", "ratios": "0,0.25,0.5", "k": "20", "timing_queries": "100", "repeats": "3"},
    )
    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    configure_threads(cfg.num_threads)
    import torch

    from fastslow import stages
    from fastslow.bill import count_flops
    from fastslow.evaluation import (
        encode_items_student,
        encode_items_teacher,
        encode_texts_student,
        ranking_matrix,
        teacher_score_matrix,
        tokenize,
    )
    from fastslow.metrics import retrieval_metrics
    from teachers import VisualTokens

    base = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir
    teacher_dir = Path(own["teacher"] or base / "teacher")
    teacher, _, ttok = stages.load_trained(teacher_dir, "teacher")
    test = stages.load_split(cfg, "test")
    visual = encode_items_teacher(teacher, test, stages.visual_loader(cfg, teacher))
    # Reranking reads the gallery's fp16 token store: score what the store would hold.
    visual = VisualTokens(visual.tokens.half().float(), visual.mask)
    n_tok, dim = visual.tokens.shape[1:]
    bytes_per_item = n_tok * dim * 2 + (n_tok if visual.mask is not None else 0)
    k = min(int(own["k"]), test.n_items)

    cand, student_scores = None, None
    if own["student"]:
        student, _, stok = stages.load_trained(own["student"], "student")
        items = encode_items_student(student, test, stages.visual_loader(cfg, student))
        texts = encode_texts_student(student, stok, test.captions, max_length=cfg.data.max_length)
        student_scores = texts @ items.T
        cand = student_scores.topk(k, dim=1).indices  # [Q, k]

    ratios = [float(r) for r in own["ratios"].split(",")]
    names = ["uncompressed" if r == 0 else f"merge-{r:g}" for r in ratios]
    nq = min(int(own["timing_queries"]), len(test.captions))
    ids, mask = tokenize(ttok, test.captions[:nq], cfg.data.max_length)
    gen = torch.Generator().manual_seed(0)
    timing_cand = cand[:nq] if cand is not None else torch.randint(0, test.n_items, (nq, k), generator=gen)

    def rerank_pass() -> float:
        t0 = time.perf_counter()
        for q in range(nq):
            teacher.score(visual[timing_cand[q]], ids[q : q + 1], mask[q : q + 1])
        return time.perf_counter() - t0

    rows = []
    for r, name in zip(ratios, names):
        teacher.set_merge_ratio(r)
        full = teacher_score_matrix(teacher, visual, ttok, test.captions, max_length=cfg.data.max_length)
        row = {
            "variant": name,
            "merge_ratio": r,
            "bytes_per_item": int(bytes_per_item),
            "flops_per_pair": count_flops(lambda: teacher.score(visual[timing_cand[0]], ids[:1], mask[:1])) / k,
            "t2v_R@1": retrieval_metrics(full, test.text_to_visual)["t2v_R@1"],
            f"fast+slow@{k}_R@1": None,
        }
        if cand is not None:
            order = full.gather(1, cand).argsort(dim=1, descending=True)
            ranked = cand.gather(1, order)
            row[f"fast+slow@{k}_R@1"] = retrieval_metrics(
                ranking_matrix(ranked, test.n_items, rest=student_scores), test.text_to_visual
            )["t2v_R@1"]
        rows.append(row)
        print(f"{name}: t2v R@1 {row['t2v_R@1']:.1f}, fast+slow@{k} {row[f'fast+slow@{k}_R@1']}", flush=True)

    times = {name: [] for name in names}
    for _ in range(int(own["repeats"])):  # interleaved: every variant sees the same machine load
        for r, name in zip(ratios, names):
            teacher.set_merge_ratio(r)
            times[name].append(rerank_pass())
    for row in rows:
        row["pairs_per_s"] = nq * k / statistics.median(times[row["variant"]])

    out = base / "bench" / "compression.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "teacher": str(teacher_dir), "student": own["student"] or None, "k": k, "split": "test"}
    atomic_write_json(out, result)
    ref = rows[0]
    head = f"{cfg.data.dataset}/test: {test.n_items} items, {len(test.captions)} queries; k={k}"
    print(f"\n{head}; teacher {teacher_dir}\n")
    print(f"| variant | bytes/item | FLOPs/pair | pairs/s | speed-up | t2v R@1 (full) | fast+slow@{k} R@1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        fs = row[f"fast+slow@{k}_R@1"]
        print(
            f"| {row['variant']} | {row['bytes_per_item']:,} | {row['flops_per_pair'] / 1e6:.2f} M "
            f"| {row['pairs_per_s']:,.0f} | {row['pairs_per_s'] / ref['pairs_per_s']:.2f}x "
            f"| {row['t2v_R@1']:.1f} | {'-' if fs is None else f'{fs:.1f}'} |"
        )
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
