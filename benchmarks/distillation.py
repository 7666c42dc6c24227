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

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, split_own, variant_dir

from fastslow.artefacts import atomic_write_json

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


def parse_pairs(log: str) -> tuple[int | None, int | None]:
    """(teacher pairs scored, cache hits) from the last line tools/distill.py prints."""
    tail = log.rsplit("teacher pairs scored this run: ", 1)
    if len(tail) < 2:
        return None, None
    scored = int(tail[1].split(";")[0])
    hits = tail[1].split("cache hits: ", 1)
    return scored, int(hits[1].split(";")[0]) if len(hits) > 1 else None


def launch(args: list[str], log: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    f = open(log, "w")  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "distill.py"), *args, f"num_threads={threads}"],
        cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    proc.log_file = f  # type: ignore[attr-defined]
    proc.started = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    defaults = {"seeds": "0,1,2", "configs": "none,recipe", "jobs": "1", "rerun": "false"}
    own, overrides = split_own(sys.argv[1:], defaults)
    # Compatibility with the first version of this script: modes=none,inbatch means configs of those names.
    own_modes, overrides = split_own(overrides, {"modes": ""})
    configs = (own_modes["modes"] or own["configs"]).split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    seeds = [int(s) for s in own["seeds"].split(",")]
    jobs = max(1, int(own["jobs"]))

    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    threads = configure_threads(cfg.num_threads if jobs == 1 else 1)
    from fastslow import stages
    from fastslow.evaluation import evaluate_student, evaluate_teacher

    base = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir
    if not (base / "teacher" / "model.safetensors").is_file():
        print(f"no teacher in {base / 'teacher'}: training it (tools/train_teacher.py)", flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "tools" / "train_teacher.py"), *overrides], cwd=ROOT, check=True
        )
    test, load_visual = stages.load_split(cfg, "test"), stages.visual_loader(cfg)
    teacher, _, tok = stages.load_trained(base / "teacher", "teacher")
    teacher_metrics = evaluate_teacher(teacher, test, load_visual, tok, max_length=cfg.data.max_length)
    teacher_hash = stages.weights_hash(base / "teacher" / "model.safetensors")
    del teacher

    out = base / "bench" / "distillation.json"
    earlier, others = {}, []
    if out.is_file() and own["rerun"] != "true":
        old = json.loads(out.read_text())
        if old.get("teacher_hash") == teacher_hash:
            # Rows of configs/seeds this invocation does not train stay in the file: extending never loses a run.
            others = [r for r in old["runs"] if r["mode"] not in configs or r["seed"] not in seeds]
            for r in old["runs"]:
                trained = base / "bench" / f"distill_{r['mode']}_s{r['seed']}" / "student" / "model.safetensors"
                if r.get("command_overrides") == overrides and r["mode"] in configs and trained.is_file():
                    earlier[(r["mode"], r["seed"])] = r
    runs = [earlier[(c, s)] for s in seeds for c in configs if (c, s) in earlier]
    if runs:
        print(f"reusing {len(runs)} run(s) of {out} (same teacher, same overrides; rerun=true to retrain)")
    # Distilled runs first: they take ~2x a plain one, so two slots stay busy instead of one long run ending alone.
    todo = [(c, s) for c in configs for s in seeds if (c, s) not in earlier]
    todo.sort(key=lambda cs: cs[0] == "none")
    running: list[tuple[str, int, Path, subprocess.Popen]] = []

    def write() -> None:
        doc = {"teacher": teacher_metrics, "teacher_hash": teacher_hash, "runs": others + runs}
        atomic_write_json(out, doc, indent=1)

    def reap(entry) -> None:
        config, seed, d, proc = entry
        code = proc.wait()
        proc.log_file.close()
        secs = time.perf_counter() - proc.started
        if code:
            raise SystemExit(f"distill.py ({config}, seed {seed}) failed; see {d / 'distill.log'}")
        student, _, stok = stages.load_trained(d / "student", "student")  # the student's own tokenizer
        m = evaluate_student(student, test, load_visual, stok, max_length=cfg.data.max_length)
        scored, hits = parse_pairs((d / "distill.log").read_text())
        runs.append({
            "seed": seed, "mode": config, "t2v_R@1": m["t2v_R@1"], "t2v_R@5": m["t2v_R@5"],
            "t2v_R@10": m["t2v_R@10"], "train_seconds": round(secs, 1), "teacher_pairs_scored": scored or 0,
            "cache_hits": hits or 0, "overrides": CONFIGS[config], "command_overrides": overrides,
        })  # fmt: skip
        print(f"  {config} seed {seed}: t2v R@1 {m['t2v_R@1']:.1f} ({secs:.0f} s)", flush=True)
        write()  # after every run: an interrupted benchmark keeps what it measured

    print(f"teacher: t2v R@1 {teacher_metrics['t2v_R@1']:.1f}; {len(todo)} student runs, {jobs} at a time", flush=True)
    while todo or running:
        while todo and len(running) < jobs:
            config, seed = todo.pop(0)
            d = variant_dir(base, f"distill_{config}_s{seed}", ("teacher", "tokenizer.json", "cache"))
            args = [*overrides, *CONFIGS[config], f"seed={seed}", f"output_dir={d}", "train.resume=none"]
            running.append((config, seed, d, launch(args, d / "distill.log", threads)))
        done = next((e for e in running if e[3].poll() is not None), None)
        if done is None:
            time.sleep(2)
            continue
        running.remove(done)
        reap(done)

    write()
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
