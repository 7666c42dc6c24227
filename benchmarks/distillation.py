"""Does distillation make a better Fast student? Same data, architecture and steps; only the loss changes.

    python benchmarks/distillation.py recipe=shapes seeds=0,1,2
    python benchmarks/distillation.py recipe=shapes_video seeds=0,1,2
    python benchmarks/distillation.py recipe=shapes seeds=0 configs=none,group,group-kl0,group-length jobs=2

One teacher per recipe, shared by every run: ${output_dir}/teacher (trained here with tools/train_teacher.py
if absent). For each seed and each config, tools/distill.py trains a student into
${output_dir}/bench/distill_<config>_s<seed>/ (tokenizer, teacher and teacher-score caches shared by
symlink, so a pair the teacher scored for one run is a cache hit for every later one), then the student
and the teacher are evaluated by full ranking on the test split.

Configs (`configs=`, comma-separated): `none` is the plain dual encoder (InfoNCE only); `recipe` is the
recipe's own loss section as it stands; the others are the recipe's loss with a few keys changed, named
in CONFIGS below (ablations of one ingredient each). Anything else on the command line is a recipe
override applied to every run (e.g. `train.max_steps=600`).

Writes ${output_dir}/bench/distillation.json:
    {"teacher": {"t2v_R@1": ...}, "runs": [{"seed", "mode", "t2v_R@1", "t2v_R@5", "train_seconds",
     "teacher_pairs_scored", "cache_hits", "overrides"}, ...]}
and prints a Markdown table: per config, mean ± sample std over seeds, and the share of the
(teacher - plain) gap closed, computed per seed against that seed's plain run and then averaged.
`jobs=2` runs two trainings at once with one thread each (wall times are then per-job, contended).

An interrupted or extended benchmark keeps what it measured: a row of an earlier distillation.json is reused
when it was trained against the same teacher weights with the same command-line overrides (so `seeds=0`
now and `seeds=0,1,2` later trains seed 0 once), and rows of other configs or seeds stay in the file;
`rerun=true` trains everything again.
"""

from __future__ import annotations

import statistics
import sys

from _common import base_dir, mean_std, setup_runs, split_own, teacher_record, train_students

# Named loss configurations: recipe overrides on top of the recipe's own loss section.
CONFIGS: dict[str, list[str]] = {
    "none": ["loss.distill=none"],
    "recipe": [],
    "inbatch": ["loss.distill=inbatch", "loss.inbatch_rows=null", "loss.teacher_norm=length",
                "loss.denoise_margin=null", "loss.student_temperature=null"],
    "listwise": ["loss.distill=listwise", "loss.teacher_norm=length", "loss.denoise_margin=null",
                 "loss.student_temperature=null"],
    "group": ["loss.distill=group"],
    "group-kl0": ["loss.distill=group", "loss.distill_weight=0.0", "loss.denoise_margin=null"],  # mined batches only
    "group-length": ["loss.distill=group", "loss.teacher_norm=length"],
    "group-zscore": ["loss.distill=group", "loss.teacher_norm=zscore"],
    "group-nodenoise": ["loss.distill=group", "loss.denoise_margin=null"],
    "group-learnedtau": ["loss.distill=group", "loss.student_temperature=null"],
    "group-random": ["loss.distill=group", "loss.mine_start=1000000000"],  # teacher KL over random groups
    "group-mse": ["loss.distill=group", "loss.margin_mse_weight=0.1"],
    # The recipe's swaps with the generator's ground truth as targets (shapes images): the student's ceiling.
    "oracle": ["loss.oracle=true"],
    "swap-inbatch": ["loss.distill=inbatch", "loss.inbatch_rows=32"],  # + in-batch KL on the swap rows
    "swap-all": ["loss.swap_rows=null"],  # swaps for every row of the batch, not half
    "swap-all-w2": ["loss.swap_rows=null", "loss.swap_weight=2.0"],
    "oracle-all": ["loss.oracle=true", "loss.swap_rows=null"],  # the ceiling of swap-all's targets
}  # fmt: skip


def main() -> None:
    defaults = {"seeds": "0,1,2", "configs": "none,recipe", "jobs": "1", "rerun": "false"}
    own, overrides = split_own(sys.argv[1:], defaults)
    # Compatibility with the first version of this script: modes=none,inbatch means configs of those names.
    own_modes, overrides = split_own(overrides, {"modes": ""})
    configs = (own_modes["modes"] or own["configs"]).split(",")
    cfg, seeds, jobs, threads = setup_runs(configs, CONFIGS, own, overrides)
    from fastslow import stages
    from fastslow.evaluation import evaluate_student

    base = base_dir(cfg)
    stages.ensure_shapes(cfg)  # the built-in data, before the test split is read
    test, load_visual = stages.load_split(cfg, "test"), stages.visual_loader(cfg)
    teacher_metrics, teacher_hash = teacher_record(cfg, base, overrides, test, load_visual)

    out = base / "bench" / "distillation.json"
    runs = train_students(
        base=base, out=out, configs=CONFIGS, names=configs, seeds=seeds, overrides=overrides,
        evaluate=lambda student, tok: evaluate_student(student, test, load_visual, tok, max_length=cfg.data.max_length),
        doc={"teacher": teacher_metrics, "teacher_hash": teacher_hash}, jobs=jobs, threads=threads,
        rerun=own["rerun"] == "true",
    )  # fmt: skip
    print_table(cfg, test, teacher_metrics, runs, configs, seeds)
    print(f"\nwritten: {out}")


def print_table(cfg, test, teacher_metrics, runs, configs, seeds) -> None:
    plain = {r["seed"]: r["t2v_R@1"] for r in runs if r["mode"] == "none"}
    t1 = teacher_metrics["t2v_R@1"]
    print(
        f"\n{test.name}: {test.n_texts} queries, {test.n_items} items; {cfg.train.max_steps} student steps; "
        f"seeds {','.join(map(str, seeds))}; teacher t2v R@1 {t1:.1f}\n"
    )
    print("| config | t2v R@1 | R@5 | R@10 | gap closed | train s | teacher pairs scored | cache hits |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| teacher (Slow, full ranking) | {t1:.1f} | {teacher_metrics['t2v_R@5']:.1f} | "
          f"{teacher_metrics['t2v_R@10']:.1f} | | | | |")  # fmt: skip
    for config in configs:
        rs = [r for r in runs if r["mode"] == config]
        closed = [
            (r["t2v_R@1"] - plain[r["seed"]]) / (t1 - plain[r["seed"]])
            for r in rs
            if r["seed"] in plain and t1 != plain[r["seed"]] and config != "none"
        ]
        gap = "-" if not closed else mean_std([100 * c for c in closed]) + " %"
        print(
            f"| {config} | {mean_std([r['t2v_R@1'] for r in rs])} | {mean_std([r['t2v_R@5'] for r in rs])} | "
            f"{mean_std([r['t2v_R@10'] for r in rs])} | {gap} | {statistics.mean(r['train_seconds'] for r in rs):.0f} "
            f"| {sum(r['teacher_pairs_scored'] for r in rs):,} | {sum(r['cache_hits'] for r in rs):,} |"
        )


if __name__ == "__main__":
    main()
