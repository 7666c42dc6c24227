"""Does distillation help the Fast student? Same data, seed and steps; only the loss changes.

    python benchmarks/distillation.py recipe=shapes
    python benchmarks/distillation.py recipe=shapes modes=none,inbatch train.max_steps=1000

Needs ${output_dir}/teacher (tools/train_teacher.py). Each mode (loss.distill = none | inbatch |
listwise) trains a student into ${output_dir}/bench/distill_<mode>/ (teacher, tokenizer and teacher-score
caches shared by symlink), then the student and the teacher are evaluated by full ranking on the test
split. Prints a markdown table (test text->item R@1/5/10, share of the student->teacher R@1 gap closed,
training wall time, teacher pairs scored) for docs/BENCHMARKS.md.
"""

import sys

from _common import ROOT, run_tool, split_own, variant_dir


def main() -> None:
    own, overrides = split_own(sys.argv[1:], {"modes": "none,inbatch,listwise"})
    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    configure_threads(cfg.num_threads)
    from pathlib import Path

    from fastslow import stages
    from fastslow.evaluation import evaluate_student, evaluate_teacher

    base = ROOT / cfg.output_dir if not Path(cfg.output_dir).is_absolute() else Path(cfg.output_dir)
    test, load_visual = stages.load_split(cfg, "test"), stages.visual_loader(cfg)
    teacher, _, tok = stages.load_trained(base / "teacher", "teacher")
    rows = {"teacher": evaluate_teacher(teacher, test, load_visual, tok, max_length=cfg.data.max_length)}
    extra = {}
    for mode in own["modes"].split(","):
        d = variant_dir(base, f"distill_{mode}", ("teacher", "tokenizer.json", "cache"))
        secs = run_tool(
            "distill.py",
            [*overrides, f"output_dir={d}", f"loss.distill={mode}", "train.resume=none"],
            d / "distill.log",
        )
        student, _, _ = stages.load_trained(d / "student", "student")
        rows[f"student ({mode})"] = evaluate_student(student, test, load_visual, tok, max_length=cfg.data.max_length)
        log = (d / "distill.log").read_text()
        pairs = log.rsplit("teacher pairs scored this run: ", 1)[-1].split(";")[0] if "pairs scored" in log else "-"
        extra[f"student ({mode})"] = (secs, pairs)
    gap0 = rows["teacher"]["t2v_R@1"] - rows.get("student (none)", {}).get("t2v_R@1", float("nan"))
    print(
        f"\n{test.name}: {test.n_texts} queries, {test.n_items} items; {cfg.train.max_steps} student steps, "
        f"seed {cfg.seed}\n"
    )
    print("| model | t2v R@1 | R@5 | R@10 | gap closed | train time (s) | teacher pairs scored |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        closed = (
            "-"
            if name == "teacher" or "none" in name
            else f"{100 * (m['t2v_R@1'] - rows['student (none)']['t2v_R@1']) / gap0:.0f}%"
            if "student (none)" in rows
            else "-"
        )
        secs, pairs = extra.get(name, (None, "-"))
        print(
            f"| {name} | {m['t2v_R@1']:.1f} | {m['t2v_R@5']:.1f} | {m['t2v_R@10']:.1f} | {closed} | "
            f"{'-' if secs is None else f'{secs:.0f}'} | {pairs} |"
        )


if __name__ == "__main__":
    main()
