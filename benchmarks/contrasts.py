"""Which minimal-pair contrasts does each model resolve? Pairwise accuracy inside the test groups, by what differs.

    python benchmarks/contrasts.py recipe=shapes output_dir=runs/shapes \
        students=plain=runs/shapes/bench/distill_none_s0/student,swap=runs/shapes/bench/distill_recipe_s0/student

The built-in test splits are minimal-pair groups (`shapes_meta.json`: each item's `group` and `variant`, e.g.
`color`, `position+size`, or for video `swap+rev`). For every test query (true of exactly one item) and every
other item of its group, the pair counts as resolved when the model scores the query's own item higher. Pairs
are grouped by the swaps that separate the two items (the symmetric difference of their variants), so
`position` is "same objects, positions exchanged" (a relation contrast) and `color` "colours exchanged" (an
attribute-binding contrast). 50% is chance. Models: the teacher in `teacher=` (default ${output_dir}/teacher;
`teacher=none` skips it) and the students in `students=name=dir,...`. JSON to ${output_dir}/bench/contrasts.json:
    {"split": "test", "models": [{"name", "kind", "dir", "t2v_R@1", "contrasts": {"<swaps>": {"accuracy", "pairs"}}}]}
and a Markdown table (rows: models; columns: contrasts, most pairs first).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

from _common import ROOT, split_own

from fastslow.artefacts import atomic_write_json


def contrast_of(variant_a: str, variant_b: str) -> str:
    """The swaps that separate two group members: "color" ^ "color+size" -> "size"."""
    a, b = set(variant_a.split("+")) - {"base"}, set(variant_b.split("+")) - {"base"}
    return "+".join(sorted(a ^ b))


def main() -> None:
    own, overrides = split_own(sys.argv[1:], {"students": "", "teacher": ""})
    students = [m.split("=", 1) for m in own["students"].split(",") if m]
    if any(len(m) != 2 for m in students):
        raise SystemExit(f"students={own['students']}: expected name=dir pairs separated by commas")
    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    configure_threads(cfg.num_threads)
    import torch

    from fastslow import stages
    from fastslow.evaluation import (
        StoreTeacherScorer,
        encode_items_student,
        encode_items_teacher,
        encode_texts_student,
    )
    from fastslow.metrics import retrieval_metrics

    if cfg.data.dataset not in ("shapes", "shapes_video"):
        raise SystemExit(f"contrasts need the built-in minimal-pair groups, not data.dataset={cfg.data.dataset}")
    video = cfg.data.dataset == "shapes_video"
    test, load_visual = stages.load_split(cfg, "test"), stages.visual_loader(cfg)
    meta = json.loads((Path(cfg.data.root) / f"{cfg.data.dataset}_meta.json").read_text())
    entries = {e["videoID" if video else "filename"]: e for e in meta["videos" if video else "images"]}
    items = [entries[i] for i in test.item_ids]
    groups = collections.defaultdict(list)
    for idx, e in enumerate(items):
        groups[e["group"]].append(idx)
    # Every (query, other member of its item's group) pair, with the contrast that separates them.
    qs, own_items, others, kinds = [], [], [], []
    for q, i in enumerate(test.text_to_visual):
        for j in groups[items[i]["group"]]:
            if j != i:
                qs.append(q), own_items.append(i), others.append(j)
                kinds.append(contrast_of(items[i]["variant"], items[j]["variant"]))
    qs_t, own_t, oth_t = torch.tensor(qs), torch.tensor(own_items), torch.tensor(others)

    base = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir
    models = [("teacher", "teacher", Path(own["teacher"] or base / "teacher"))] if own["teacher"] != "none" else []
    models += [(name, "student", Path(d)) for name, d in students]
    results = []
    for name, kind, d in models:
        model, _, tok = stages.load_trained(d, kind)
        if kind == "teacher":
            scorer = StoreTeacherScorer(model, encode_items_teacher(model, test, load_visual), tok, cfg.data.max_length)
            full = scorer.full(test.captions)  # every pair once: the group pairs are read from it, not rescored
        else:
            iv = encode_items_student(model, test, load_visual)
            tv = encode_texts_student(model, tok, test.captions, max_length=cfg.data.max_length)
            full = tv @ iv.T
        s_own, s_other = full[qs_t, own_t], full[qs_t, oth_t]
        won = (s_own > s_other).tolist()
        by = collections.defaultdict(list)
        for k, w in zip(kinds, won):
            by[k].append(w)
        contrasts = {k: {"accuracy": 100 * sum(v) / len(v), "pairs": len(v)} for k, v in by.items()}
        r1 = retrieval_metrics(full, test.text_to_visual)["t2v_R@1"]
        results.append({"name": name, "kind": kind, "dir": str(d), "t2v_R@1": r1, "contrasts": contrasts})
        del model

    out = base / "bench" / "contrasts.json"
    atomic_write_json(out, {"split": test.name, "models": results}, indent=1)
    cols = sorted(results[0]["contrasts"], key=lambda k: -results[0]["contrasts"][k]["pairs"])
    print(
        f"\n{test.name}: {test.n_texts} queries; pairwise accuracy (%) inside the groups, by contrast (50 = chance)\n"
    )
    print("| model | t2v R@1 | " + " | ".join(f"{c} ({results[0]['contrasts'][c]['pairs']})" for c in cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for r in results:
        cells = " | ".join(f"{r['contrasts'][c]['accuracy']:.0f}" if c in r["contrasts"] else "-" for c in cols)
        print(f"| {r['name']} | {r['t2v_R@1']:.1f} | {cells} |")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
