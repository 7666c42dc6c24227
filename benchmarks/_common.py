"""Shared by the benchmark scripts: run a tool in a variant directory that shares a base run's parts."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def variant_dir(base: Path, name: str, share: tuple[str, ...]) -> Path:
    """`base/bench/<name>` with symlinks to the base run's shared parts (teacher, tokenizer, caches)."""
    d = base / "bench" / name
    d.mkdir(parents=True, exist_ok=True)
    for part in share:
        src, dst = (base / part).resolve(), d / part
        if src.exists() and not dst.exists():
            os.symlink(src, dst)
    return d


def run_tool(tool: str, args: list[str], log: Path) -> float:
    """Run tools/<tool> with args, output to `log`; returns the wall time in seconds (raises on failure)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / tool), *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT
        )
    if proc.returncode:
        raise SystemExit(f"{tool} {' '.join(args)} failed; see {log}")
    return time.perf_counter() - t0


def split_own(argv: list[str], own: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Take `name=value` arguments that belong to the benchmark (defaults in `own`); the rest are overrides."""
    own, rest = dict(own), []
    for a in argv:
        k = a.split("=", 1)[0]
        if k in own and "=" in a:
            own[k] = a.split("=", 1)[1]
        else:
            rest.append(a)
    return own, rest


# ---------------------------------------------------------------- student runs: configs x seeds of tools/distill.py


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` with one decimal; the value alone for one seed; ``-`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def parse_pairs(log: str) -> tuple[int | None, int | None]:
    """(teacher pairs scored, cache hits) from the last line tools/distill.py prints."""
    tail = log.rsplit("teacher pairs scored this run: ", 1)
    if len(tail) < 2:
        return None, None
    scored = int(tail[1].split(";")[0])
    hits = tail[1].split("cache hits: ", 1)
    return scored, int(hits[1].split(";")[0]) if len(hits) > 1 else None


def launch(args: list[str], log: Path, threads: int) -> subprocess.Popen:
    """Start tools/distill.py with ``args`` and ``threads`` threads, its output to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    f = open(log, "w")  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "distill.py"), *args, f"num_threads={threads}"],
        cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    proc.log_file = f  # type: ignore[attr-defined]
    proc.started = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def clustered_unit_vectors(n: int, dim: int, seed: int, path: Path | None = None, draw_seed: int | None = None,
                           centres: int = 1024):  # fmt: skip
    """N unit vectors [N, dim] around ``centres`` random centres (as real embeddings cluster): written to ``path``
    (.npy) in chunks and returned memory-mapped, or in memory without a path. The centres come from ``seed``; the
    draws around them too, or from ``draw_seed`` (queries from the same clusters as a gallery)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    if draw_seed is not None:
        rng = np.random.default_rng(draw_seed)
    if path is None:
        out = np.empty((n, dim), np.float32)
    else:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        x = c[rng.integers(0, centres, m)] + 0.5 * rng.standard_normal((m, dim)).astype(np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    if path is None:
        return out
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def base_dir(cfg) -> Path:
    """The recipe's output_dir, absolute (relative ones are under the repository, as the tools resolve them)."""
    return Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir


def ensure_teacher(base: Path, overrides: list[str]) -> None:
    """Train the recipe's teacher into ``base/teacher`` with tools/train_teacher.py unless one is there."""
    if not (base / "teacher" / "model.safetensors").is_file():
        print(f"no teacher in {base / 'teacher'}: training it (tools/train_teacher.py)", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "train_teacher.py"), *overrides], cwd=ROOT, check=True)


def train_students(
    *,
    base: Path,
    out: Path,
    configs: dict[str, list[str]],
    names: list[str],
    seeds: list[int],
    overrides: list[str],
    evaluate,
    doc: dict,
    jobs: int = 1,
    threads: int = 1,
    rerun: bool = False,
    prefix: str = "distill",
) -> list[dict]:
    """Train one student per (config, seed) with tools/distill.py, evaluate each, and keep the record in ``out``.

    Each run goes to ``base/bench/<prefix>_<config>_s<seed>/`` with the base run's teacher, tokenizer and caches
    shared by symlink (a pair the teacher scored for one run is a cache hit for the next). ``out`` is rewritten
    after every run (``{**doc, "runs": [...]}``), so an interrupted benchmark keeps what it measured; a row of an
    earlier ``out`` is reused when ``doc["teacher_hash"]`` and the command-line overrides are the same and its
    student is still there (``rerun`` trains everything again), and rows of other configs or seeds stay in it.

    Args:
        configs: ``{name: recipe overrides}`` of every known config; ``names`` are the ones to train.
        overrides: the command line's recipe overrides, applied to every run before the config's own.
        evaluate: ``(student, tokenizer) -> metrics`` with ``t2v_R@1``, ``t2v_R@5``, ``t2v_R@10``.
        jobs, threads: trainings at once, threads each.

    Returns:
        The rows of the configs and seeds asked for: ``{"seed", "mode", "t2v_R@1", "t2v_R@5", "t2v_R@10",
        "train_seconds", "teacher_pairs_scored", "cache_hits", "overrides", "command_overrides"}``.
    """
    from fastslow import stages
    from fastslow.artefacts import atomic_write_json

    earlier, others = {}, []
    if out.is_file() and not rerun:
        old = json.loads(out.read_text())
        if old.get("teacher_hash") == doc.get("teacher_hash"):
            # Rows of configs/seeds this invocation does not train stay in the file: extending never loses a run.
            others = [r for r in old["runs"] if r["mode"] not in names or r["seed"] not in seeds]
            for r in old["runs"]:
                trained = base / "bench" / f"{prefix}_{r['mode']}_s{r['seed']}" / "student" / "model.safetensors"
                if r.get("command_overrides") == overrides and r["mode"] in names and trained.is_file():
                    earlier[(r["mode"], r["seed"])] = r
    runs = [earlier[(c, s)] for s in seeds for c in names if (c, s) in earlier]
    if runs:
        print(f"reusing {len(runs)} run(s) of {out} (same teacher, same overrides; rerun=true to retrain)")
    # Seed by seed, so that an interrupted benchmark holds whole seeds of every config; distilled runs first within
    # that (they take ~2x a plain one, so two slots stay busy instead of one long run ending alone).
    todo = [(c, s) for s in seeds for c in names if (c, s) not in earlier]
    todo.sort(key=lambda cs: (seeds.index(cs[1]), "loss.distill=none" in configs[cs[0]]))
    running: list[tuple[str, int, Path, subprocess.Popen]] = []

    def write() -> None:
        atomic_write_json(out, {**doc, "runs": others + runs}, indent=1)

    def reap(entry) -> None:
        config, seed, d, proc = entry
        code = proc.wait()
        proc.log_file.close()
        secs = time.perf_counter() - proc.started
        if code:
            raise SystemExit(f"distill.py ({config}, seed {seed}) failed; see {d / 'distill.log'}")
        student, _, tok = stages.load_trained(d / "student", "student")
        m = evaluate(student, tok)
        scored, hits = parse_pairs((d / "distill.log").read_text())
        runs.append({
            "seed": seed, "mode": config, "t2v_R@1": m["t2v_R@1"], "t2v_R@5": m["t2v_R@5"],
            "t2v_R@10": m["t2v_R@10"], "train_seconds": round(secs, 1), "teacher_pairs_scored": scored or 0,
            "cache_hits": hits or 0, "overrides": configs[config], "command_overrides": overrides,
        })  # fmt: skip
        print(f"  {config} seed {seed}: t2v R@1 {m['t2v_R@1']:.1f} ({secs:.0f} s)", flush=True)
        write()  # after every run: an interrupted benchmark keeps what it measured

    print(f"{len(todo)} student runs, {jobs} at a time", flush=True)
    while todo or running:
        while todo and len(running) < jobs:
            config, seed = todo.pop(0)
            d = variant_dir(base, f"{prefix}_{config}_s{seed}", ("teacher", "tokenizer.json", "cache"))
            args = [*overrides, *configs[config], f"seed={seed}", f"output_dir={d}", "train.resume=none"]
            running.append((config, seed, d, launch(args, d / "distill.log", threads)))
        done = next((e for e in running if e[3].poll() is not None), None)
        if done is None:
            time.sleep(2)
            continue
        running.remove(done)
        reap(done)
    write()
    return runs


def setup_runs(names: list[str], known, own: dict[str, str], overrides: list[str]):
    """The shared start of a students-over-seeds benchmark: check the config names, read seeds and jobs, load the
    recipe and size the thread pools -> ``(cfg, seeds, jobs, threads)``."""
    unknown = [c for c in names if c not in known]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {', '.join(known)}")
    seeds = [int(s) for s in own["seeds"].split(",")]
    jobs = max(1, int(own["jobs"]))

    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    return cfg, seeds, jobs, configure_threads(cfg.num_threads if jobs == 1 else 1)


def teacher_record(cfg, base: Path, overrides: list[str], test, load_visual) -> tuple[dict, str]:
    """``(test metrics, weights hash)`` of the recipe's teacher in ``base/teacher`` (trained first if absent)."""
    from fastslow import stages
    from fastslow.evaluation import evaluate_teacher

    ensure_teacher(base, overrides)
    teacher, _, tok = stages.load_trained(base / "teacher", "teacher")
    metrics = evaluate_teacher(teacher, test, load_visual, tok, max_length=cfg.data.max_length)
    print(f"teacher: t2v R@1 {metrics['t2v_R@1']:.1f}", flush=True)
    return metrics, stages.weights_hash(base / "teacher" / "model.safetensors")
