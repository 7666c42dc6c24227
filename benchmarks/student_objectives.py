"""Do LightningDOT's VMLM / SMRM help the Fast student? Same data, architecture, steps and seeds; only the loss changes.

    python benchmarks/student_objectives.py recipe=shapes seeds=0,1,2
    python benchmarks/student_objectives.py recipe=shapes_video seeds=0,1,2
    python benchmarks/student_objectives.py recipe=shapes seeds=0,1,2 configs=infonce,infonce+vmlm train.max_steps=300

Rows (`configs=`, comma-separated; default all): `infonce` (the plain dual encoder), `infonce+vmlm`,
`infonce+smrm`, `infonce+vmlm+smrm` (loss.distill=none plus the auxiliary terms), `distill` (the recipe's own
loss.distill, its best measured distillation) and `distill+vmlm+smrm` (the same plus both terms). The auxiliary
weights are `vmlm_weight=` / `smrm_weight=` of this script (default 1.0, LightningDOT's equal sum); anything else
on the command line is a recipe override applied to every run (e.g. `train.max_steps=300`). The distillation rows
need the recipe's teacher in ${output_dir}/teacher (trained with tools/train_teacher.py if absent; point
output_dir= at a run that has one to reuse it); the InfoNCE rows never touch a teacher.

Each run is a tools/distill.py student in ${output_dir}/bench/objectives_<config>_s<seed>/, evaluated by full
ranking on the test split (benchmarks/_common.train_students, shared with benchmarks/distillation.py: rows of an
earlier run with the same overrides are reused, `rerun=true` trains again). Writes
${output_dir}/bench/student_objectives.json:
    {"teacher": {...} | null, "teacher_hash", "steps", "runs": [{"seed", "mode", "t2v_R@1", "t2v_R@5", "t2v_R@10",
     "train_seconds", ...}, ...]}
and prints a Markdown table: per row, mean ± sample std over seeds, and the R@1 change against the same seed's
InfoNCE run (mean ± std of the per-seed differences).
"""

from __future__ import annotations

import statistics
import sys

from _common import base_dir, mean_std, setup_runs, split_own, teacher_record, train_students

ROWS = ["infonce", "infonce+vmlm", "infonce+smrm", "infonce+vmlm+smrm", "distill", "distill+vmlm+smrm"]


def configs(vmlm: str, smrm: str) -> dict[str, list[str]]:
    """Each row's recipe overrides; every row sets both weights, so no command-line weight leaks into another row."""
    off, v, s = ["loss.vmlm_weight=0", "loss.smrm_weight=0"], f"loss.vmlm_weight={vmlm}", f"loss.smrm_weight={smrm}"
    plain = ["loss.distill=none"]
    return {
        "infonce": plain + off,
        "infonce+vmlm": plain + [v, "loss.smrm_weight=0"],
        "infonce+smrm": plain + ["loss.vmlm_weight=0", s],
        "infonce+vmlm+smrm": plain + [v, s],
        "distill": off,  # the recipe's loss.distill as it stands
        "distill+vmlm+smrm": [v, s],
    }


def main() -> None:
    defaults = {"seeds": "0,1,2", "configs": ",".join(ROWS), "jobs": "1", "rerun": "false", "vmlm_weight": "1.0",
                "smrm_weight": "1.0"}  # fmt: skip
    own, overrides = split_own(sys.argv[1:], defaults)
    names = own["configs"].split(",")
    known = configs(own["vmlm_weight"], own["smrm_weight"])
    cfg, seeds, jobs, threads = setup_runs(names, known, own, overrides)
    from fastslow import stages
    from fastslow.evaluation import evaluate_student

    base = base_dir(cfg)
    stages.ensure_shapes(cfg)  # the built-in data, before the test split is read
    stages.get_tokenizer(cfg, stages.load_split(cfg, "train"))  # one tokenizer, shared by every run (symlink)
    test, load_visual = stages.load_split(cfg, "test"), stages.visual_loader(cfg)
    teacher_metrics, teacher_hash = None, None
    if any(not name.startswith("infonce") for name in names):  # the InfoNCE rows never need a teacher
        teacher_metrics, teacher_hash = teacher_record(cfg, base, overrides, test, load_visual)

    out = base / "bench" / "student_objectives.json"
    runs = train_students(
        base=base, out=out, configs=known, names=names, seeds=seeds, overrides=overrides,
        evaluate=lambda student, tok: evaluate_student(student, test, load_visual, tok, max_length=cfg.data.max_length),
        doc={"teacher": teacher_metrics, "teacher_hash": teacher_hash, "steps": cfg.train.max_steps}, jobs=jobs,
        threads=threads, rerun=own["rerun"] == "true", prefix="objectives",
    )  # fmt: skip
    print_table(cfg, test, teacher_metrics, runs, names, seeds)
    print(f"\nwritten: {out}")


def print_table(cfg, test, teacher_metrics, runs, names, seeds) -> None:
    plain = {r["seed"]: r["t2v_R@1"] for r in runs if r["mode"] == "infonce"}
    print(
        f"\n{test.name}: {test.n_texts} queries, {test.n_items} items; {cfg.train.max_steps} student steps; "
        f"seeds {','.join(map(str, seeds))}\n"
    )
    print("| loss | t2v R@1 | R@5 | R@10 | R@1 vs InfoNCE (same seed) | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    if teacher_metrics:
        print(f"| teacher (Slow, full ranking) | {teacher_metrics['t2v_R@1']:.1f} | {teacher_metrics['t2v_R@5']:.1f} | "
              f"{teacher_metrics['t2v_R@10']:.1f} | | |")  # fmt: skip
    for name in names:
        rs = [r for r in runs if r["mode"] == name]
        if not rs:
            continue
        gain = [r["t2v_R@1"] - plain[r["seed"]] for r in rs if r["seed"] in plain] if name != "infonce" else []
        delta = "-" if not gain else ("+" if statistics.mean(gain) >= 0 else "") + mean_std(gain)
        print(
            f"| {name} | {mean_std([r['t2v_R@1'] for r in rs])} | {mean_std([r['t2v_R@5'] for r in rs])} | "
            f"{mean_std([r['t2v_R@10'] for r in rs])} | {delta} | "
            f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |"
        )


if __name__ == "__main__":
    main()
