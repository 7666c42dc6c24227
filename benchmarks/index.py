"""The faiss index kinds at a million items: recall@k against exact search, speed, build time and bytes per vector.

    python benchmarks/index.py recipe=shapes
    python benchmarks/index.py recipe=shapes n=100000 kinds=flat,ivf,hnsw nprobes=8,16,32 efs=64,128
    python benchmarks/index.py recipe=flickr dim=512                # the size of dual_encoder_base's space

`n` (default 1,000,000) synthetic unit vectors of the recipe's student dimension (`dim=` overrides it), clustered as
real embeddings are (`_common.clustered_unit_vectors`), written once under ${output_dir}/bench/index/ and memory-mapped;
`queries` (default 1,000) query vectors drawn from the same clusters with another seed. Each kind of `kinds` is built
with `fastslow.index.build_index` at the recipe's `index.*` settings (`nlist`, `hnsw_m`; faiss on the GPU when faiss
has one, `gpu=auto`), then searched at each query-time setting of the sweep (`nprobes=` for ivf / ivfpq, `efs=` for
hnsw; the recipe's own `index.nprobe` / `index.ef_search` are always among them), k = `k` (default 100):

- `recall@K`: the share of the exact top-K (the flat index's answer) that the setting returns (and `recall@10`, the
  same for the top 10 of both);
- `queries_per_s`: all queries in one `search` call (faiss on the recipe's `num_threads`: 0 = the machine's cores);
- `latency_ms_p50` / `latency_ms_p95`: one query per call, over `single` queries (default 200) after 10 warm-up ones;
- `build_s` (train + add) and `bytes_per_vector` (the serialized index over N), per kind.

Writes ${output_dir}/bench/index.json:
    {"rows": [{"kind", "params", "search", "recipe_setting", "recall@K", "recall@10", "queries_per_s", "latency_ms_p50",
               "latency_ms_p95", "build_s", "bytes_per_vector"}, ...], "settings": {...}, "machine": "..."}
and prints a Markdown table. On a shared machine the timings move with the load; recall and bytes do not.
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import numpy as np
from _common import base_dir, clustered_unit_vectors, split_own

DEFAULTS = {
    "n": "1000000",
    "queries": "1000",
    "single": "200",
    "k": "100",
    "kinds": "flat,ivf,ivfpq,hnsw",
    "nprobes": "4,8,16,32,64",
    "efs": "64,128,256",
    "dim": "",
    "seed": "0",
    "gpu": "auto",
}


def student_dim(cfg) -> int:
    """The embedding size of the recipe's student (its index dimension), from a randomly initialised build."""
    from fastslow import stages

    student = stages.build_student(cfg, types.SimpleNamespace(vocab_size=cfg.tokenizer.vocab_size))
    return int(student.embed_dim)


def vectors(directory: Path, n: int, dim: int, seed: int) -> np.ndarray:
    path = directory / f"vectors_{n}_{dim}_{seed}.npy"
    if path.is_file() and np.load(path, mmap_mode="r").shape == (n, dim):
        print(f"reusing {path}", flush=True)
        return np.load(path, mmap_mode="r")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"writing {n:,} clustered unit vectors of dim {dim} to {path}", flush=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    clustered_unit_vectors(n, dim, seed, tmp)
    os.replace(tmp, path)  # a benchmark's scratch input: regenerated from the seed, so no stamp
    return np.load(path, mmap_mode="r")


def measure(index, queries: np.ndarray, k: int, single: int) -> tuple[np.ndarray, float, list[float]]:
    """(ids [Q, k] of the batched search, queries/s of it, per-query latencies in ms at batch 1)."""
    from fastslow.index import search

    search(index, queries[:10], k)
    t0 = time.perf_counter()
    ids = search(index, queries, k)[1]
    qps = len(queries) / (time.perf_counter() - t0)
    lat = []
    for q in queries[10 : 10 + single]:
        t = time.perf_counter()
        search(index, q[None], k)
        lat.append((time.perf_counter() - t) * 1e3)
    return ids, qps, lat


def recall(ids: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(ids, exact)]))


def main() -> None:
    own, overrides = split_own(sys.argv[1:], DEFAULTS)
    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    threads = configure_threads(cfg.num_threads)
    import faiss

    from fastslow.artefacts import atomic_write_json
    from fastslow.index import build_index, index_info, set_search_params, to_cpu

    faiss.omp_set_num_threads(threads)
    n, k, seed = int(float(own["n"])), int(own["k"]), int(own["seed"])
    dim = int(own["dim"]) if own["dim"] else student_dim(cfg)
    gpu = {"true": True, "false": False}.get(own["gpu"], own["gpu"])
    base = base_dir(cfg)
    emb = vectors(base / "bench" / "index", n, dim, seed)
    queries = clustered_unit_vectors(int(own["queries"]), dim, seed, draw_seed=seed + 1)  # the gallery's clusters
    x = np.ascontiguousarray(emb)
    kinds = own["kinds"].split(",")
    if "flat" not in kinds:
        kinds.insert(0, "flat")  # the exact answer every recall is measured against
    kinds.sort(key=lambda kind: kind != "flat")
    sweeps = {
        "ivf": ("nprobe", sorted({*map(int, own["nprobes"].split(",")), int(cfg.index.nprobe)})),
        "ivfpq": ("nprobe", sorted({*map(int, own["nprobes"].split(",")), int(cfg.index.nprobe)})),
        "hnsw": ("ef_search", sorted({*map(int, own["efs"].split(",")), int(cfg.index.ef_search)})),
        "flat": (None, [None]),
    }
    recipe_value = {"nprobe": int(cfg.index.nprobe), "ef_search": int(cfg.index.ef_search), None: None}
    print(f"{n:,} vectors, dim {dim}, {len(queries)} queries, k={k}, {threads} threads", flush=True)

    rows, exact = [], None
    out = base / "bench" / "index.json"
    for kind in kinds:
        t0 = time.perf_counter()
        index = build_index(x, kind, nlist=cfg.index.nlist, hnsw_m=int(cfg.index.hnsw_m), use_gpu=gpu, seed=seed)
        build_s = time.perf_counter() - t0
        info = index_info(index)
        size = len(faiss.serialize_index(to_cpu(index)))  # what save_index writes
        print(f"{kind} {info['params']}: built in {build_s:.1f} s, {size / n:.1f} bytes per vector", flush=True)
        name, values = sweeps[kind]
        for value in values:
            if name is not None:
                set_search_params(index, **{name: value})
            ids, qps, lat = measure(index, queries, k, int(own["single"]))
            if kind == "flat":
                exact = ids
            r = {
                "kind": kind,
                "params": {a: b for a, b in info["params"].items() if a not in ("nprobe", "ef_search")},
                "search": {name: value} if name else {},
                "recipe_setting": value == recipe_value[name],
                f"recall@{k}": recall(ids, exact, k),
                "recall@10": recall(ids[:, :10], exact[:, :10], 10),
                "queries_per_s": qps,
                "latency_ms_p50": float(np.percentile(lat, 50)),
                "latency_ms_p95": float(np.percentile(lat, 95)),
                "build_s": build_s,
                "bytes_per_vector": size / n,
            }
            rows.append(r)
            print(f"  {r['search'] or 'exact'}: recall@{k} {r[f'recall@{k}']:.3f} (@10 {r['recall@10']:.3f}), "
                  f"{qps:.0f} q/s, p50 {r['latency_ms_p50']:.2f} ms, p95 {r['latency_ms_p95']:.2f} ms",
                  flush=True)  # fmt: skip
            settings = {**own, "n": n, "dim": dim, "threads": threads, "recipe": cfg.recipe,
                        "index": {key: cfg.index[key] for key in cfg.index}, "faiss": faiss.__version__}  # fmt: skip
            machine = f"{os.cpu_count()} CPU cores (os.cpu_count), faiss {'GPU' if gpu is True else 'CPU/auto'}"
            atomic_write_json(out, {"rows": rows, "settings": settings, "machine": machine})  # kept after each row
        del index
    print(f"\nwritten to {out}\n")
    print(f"| kind | build params | search | recall@{k} | recall@10 | queries/s (batch {len(queries)}) | p50 ms | "
          "p95 ms | build s | bytes/vector |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        search_cell = ", ".join(f"{a}={b}" for a, b in r["search"].items()) or "exact"
        if r["recipe_setting"] and r["search"]:
            search_cell += " (recipe)"
        params = ", ".join(f"{a}={b}" for a, b in r["params"].items()) or "-"
        print(f"| {r['kind']} | {params} | {search_cell} | {r[f'recall@{k}']:.3f} | {r['recall@10']:.3f} | "
              f"{r['queries_per_s']:.0f} | "
              f"{r['latency_ms_p50']:.2f} | {r['latency_ms_p95']:.2f} | {r['build_s']:.1f} | "
              f"{r['bytes_per_vector']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
