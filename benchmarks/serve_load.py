"""The search service under concurrent load: latency and throughput from N clients, against the batched library.

    python benchmarks/serve_load.py recipe=shapes
    python benchmarks/serve_load.py recipe=shapes clients=1,8,32 seconds=10 modes=fast,rerank k=20
    python benchmarks/serve_load.py recipe=shapes serve.max_wait_ms=10 serve.max_batch=32

Starts `tools/serve.py` (uvicorn) in a subprocess on 127.0.0.1 at a free port, on the recipe's run
(${output_dir}/student, /teacher, /index, as `make demo` leaves them). When that run is not there, the benchmark
builds one itself in ${output_dir}/bench/serve_load/run with the recipe's own tools and models but 2 training steps
each (`build_steps=`; said aloud and recorded as "run": "built"): serving cost depends on the models' shapes and the
gallery, not on how well they were trained. For each mode (`modes=`: fast, rerank = fast+slow@k) and each client count
N (`clients=`), N clients send queries back to back for `seconds` seconds (after `warmup` queries per mode) and each
answer's latency is taken at the client; the queries are the test split's captions, each client starting at another
one. Meanwhile /stats gives the batch sizes the service formed.

The reference is the library itself in this process, with the server idle: `Retriever.search` over `library_queries`
queries in batches of ``serve.max_batch`` (queries/s), measured right before and right after each row, the best of
those passes kept (on a shared machine the load of other work changes from minute to minute; the row and its reference
are measured within the same minute, and taking the faster pass does not flatter the service).
`vs_library` = the service's queries/s over that reference (target: >= 0.70 for fast+slow@k at N = 32).

Writes ${output_dir}/bench/serve_load.json:
    {"rows": [{"mode", "method", "clients", "requests", "errors", "latency_ms_p50", "latency_ms_p95",
               "queries_per_s", "mean_batch", "library_queries_per_s", "library_passes", "vs_library"}, ...],
     "settings": {...}, "run": "trained" | "built", "machine": "..."}
and prints a Markdown table. Client and server share the machine's cores: on a shared machine say so beside the figures.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import ROOT, run_tool, split_own

DEFAULTS = {
    "clients": "1,8,32",
    "modes": "fast,rerank",
    "k": "20",
    "seconds": "10",
    "warmup": "16",
    "library_queries": "64",
    "build_steps": "2",
    "startup_timeout": "300",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_run(base: Path, overrides: list[str], steps: int) -> tuple[list[str], str]:
    """The overrides that point at a trained run: the recipe's own, or one built here with `steps` steps per stage."""
    if all((base / d / "model.safetensors").is_file() for d in ("student", "teacher")) and (
        base / "index" / "manifest.json"
    ).is_file():
        return overrides, "trained"
    run = base / "bench" / "serve_load" / "run"
    over = [*overrides, f"output_dir={run}"]
    if not (run / "index" / "manifest.json").is_file():
        print(f"no trained run in {base}: building one in {run} ({steps} steps per stage; timing depends on the "
              "shapes, not the weights)", flush=True)  # fmt: skip
        run.mkdir(parents=True, exist_ok=True)
        short = [f"teacher_train.max_steps={steps}", f"train.max_steps={steps}", "eval.val_items=8"]
        for tool in ("train_teacher.py", "distill.py", "build_index.py"):
            s = run_tool(tool, [*over, *short] if tool != "build_index.py" else over, run / f"{tool}.log")
            print(f"  {tool}: {s:.0f} s", flush=True)
    else:
        print(f"no trained run in {base}: using the one this benchmark built in {run}", flush=True)
    return over, "built"


def start_server(overrides: list[str], port: int, log: Path, timeout: float) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), *overrides, "host=127.0.0.1", f"port={port}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"tools/serve.py exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"tools/serve.py did not answer /healthz within {timeout:.0f} s; see {log}")


async def drive(url: str, texts: list[str], n: int, seconds: float, k: int, mode: str) -> tuple[list[float], int]:
    """N clients, each sending its next query as soon as the last is answered, for `seconds`; latencies (ms)."""
    import httpx

    lat, errors = [], 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)

    async def client(c: httpx.AsyncClient, start: int) -> None:
        nonlocal errors
        i = start
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await c.get(url, params={"q": texts[i % len(texts)], "k": k, "mode": mode})
            if r.status_code == 200:
                lat.append((time.perf_counter() - t0) * 1e3)
            else:
                errors += 1
            i += 1

    async with httpx.AsyncClient(limits=limits, timeout=60) as c:
        await asyncio.gather(*(client(c, j * len(texts) // n) for j in range(n)))
    return lat, errors


def batch_mean(before: dict[str, int], after: dict[str, int]) -> float | None:
    calls = {int(s): after.get(s, 0) - before.get(s, 0) for s in after}
    total = sum(calls.values())
    return sum(s * c for s, c in calls.items()) / total if total else None


def library_rate(retriever, texts: list[str], k: int, mode: str, batch: int, passes: int = 2) -> list[float]:
    """Queries/s of `Retriever.search` over `texts` in batches of `batch`, one figure per pass."""
    from fastslow.query import timed

    out = []
    for _ in range(passes):
        _, lat = timed(lambda t: retriever.search(t, k, mode), texts, batch, warmup=not out)
        out.append(len(texts) / (sum(lat) / 1e3))
    return out


def main() -> None:
    own, overrides = split_own(sys.argv[1:], DEFAULTS)
    ns = [int(n) for n in own["clients"].split(",")]
    modes, k, seconds = own["modes"].split(","), int(own["k"]), float(own["seconds"])

    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    base = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir
    out = base / "bench"
    out.mkdir(parents=True, exist_ok=True)
    overrides, kind = ensure_run(base, overrides, int(own["build_steps"]))
    cfg = load_recipe(overrides)
    threads = configure_threads(cfg.num_threads)
    import httpx

    from fastslow import stages
    from fastslow.artefacts import atomic_write_json
    from fastslow.query import Retriever, latency_summary
    from fastslow.service import method_name

    texts = stages.load_split(cfg, "test").captions
    lib_texts = texts[:: max(1, len(texts) // int(own["library_queries"]))][: int(own["library_queries"])]
    retriever = Retriever.from_run(cfg)
    batch = int(cfg.serve.max_batch)
    port = free_port()
    proc = start_server(overrides, port, out / "serve_load_server.log", float(own["startup_timeout"]))
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for mode in modes:  # first calls (allocations, lazy loads) are not load
            for t in texts[: int(own["warmup"])]:
                httpx.get(f"{url}/search", params={"q": t, "k": k, "mode": mode}, timeout=60)
        for mode in modes:
            for n in ns:
                passes = library_rate(retriever, lib_texts, k, mode, batch)
                before = httpx.get(f"{url}/stats", timeout=60).json()["batch_sizes"]
                t0 = time.perf_counter()
                lat, errors = asyncio.run(drive(f"{url}/search", texts, n, seconds, k, mode))
                wall = time.perf_counter() - t0
                after = httpx.get(f"{url}/stats", timeout=60).json()["batch_sizes"]
                passes += library_rate(retriever, lib_texts, k, mode, batch)
                s = latency_summary(lat) if lat else {}
                qps, lib = len(lat) / wall, max(passes)
                rows.append({"mode": mode, "method": method_name(mode, k), "clients": n, "requests": len(lat),
                             "errors": errors, "latency_ms_p50": s.get("latency_ms_p50"),
                             "latency_ms_p95": s.get("latency_ms_p95"), "queries_per_s": qps,
                             "mean_batch": batch_mean(before, after), "library_queries_per_s": lib,
                             "library_passes": passes, "vs_library": qps / lib})  # fmt: skip
                lib_text = ", ".join(f"{p:.1f}" for p in passes)
                print(f"  {mode} N={n}: {qps:.1f} q/s, p50 {s.get('latency_ms_p50', 0):.1f} ms, mean batch "
                      f"{rows[-1]['mean_batch'] or 0:.1f}; library passes {lib_text} q/s", flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    settings = {"k": k, "seconds": seconds, "clients": ns, "threads": threads, "max_wait_ms": cfg.serve.max_wait_ms,
                "max_batch": cfg.serve.max_batch, "queue_size": cfg.serve.queue_size,
                "gallery": retriever.n_items, "library_queries": len(lib_texts), "library_batch": batch,
                "overrides": overrides}  # fmt: skip
    machine = f"{os.cpu_count()} CPU cores (os.cpu_count), client and server on the same cores"
    path = atomic_write_json(out / "serve_load.json", {"rows": rows, "settings": settings, "run": kind,
                                                       "machine": machine})  # fmt: skip
    print(f"\n{retriever.n_items} items, k={k}, {seconds:.0f} s per row, max_wait_ms={cfg.serve.max_wait_ms}, "
          f"max_batch={cfg.serve.max_batch}, run: {kind}; written to {path}\n")  # fmt: skip
    print(f"| method | clients | queries/s | p50 ms | p95 ms | mean batch | library q/s (batch {batch}) | vs library |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p50, p95 = (np.nan if r[x] is None else r[x] for x in ("latency_ms_p50", "latency_ms_p95"))
        print(f"| {r['method']} | {r['clients']} | {r['queries_per_s']:.1f} | {p50:.1f} | {p95:.1f} | "
              f"{r['mean_batch'] or 0:.1f} | {r['library_queries_per_s']:.1f} | {r['vs_library']:.2f} |")


if __name__ == "__main__":
    main()
