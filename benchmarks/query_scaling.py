"""Query time at scale: per-query cost of fast, slow and fast+slow@k for galleries of 1k to 1M items.

    python benchmarks/query_scaling.py recipe=shapes
    python benchmarks/query_scaling.py recipe=shapes galleries=1000,10000 ks=10,20,50 queries=100
    python benchmarks/query_scaling.py recipe=shapes galleries=1000000 big_kind=hnsw slow_queries=20

Everything goes through the query-time object (`fastslow.query.Retriever`), as a user's query does. For each
gallery size N (`galleries=`, comma-separated), a synthetic gallery of the recipe's true shapes is written to disk
under ${output_dir}/bench/query_scaling/ and memory-mapped as in production: N unit student embeddings of the student's
dimension (clustered, as real embeddings are) and a teacher `TokenStore` of N rows of the teacher's visual tokens
(fp16, the teacher's token count and width). A gallery written by an earlier run with the same N, shapes and seed is
reused (said aloud); `regenerate=true` writes it again. The index is the kind a user would pick: flat up to
`flat_max` items (default 100k), `big_kind` (ivf | hnsw, default ivf) beyond, with its recall@k against exact search.

Per method and size: single-query latency (batch of 1, p50 and p95 over `queries` queries after `warmup` warm-up
queries) and batched throughput (queries/s at batch `batch`, default 64). Methods: `fast` (student + index), `slow`
(the teacher over every item) and `fast+slow@K` (the student's top-K reranked by the teacher alone) for K in `ks`.
`slow` is measured up to `slow_max` items (default 10k; over `slow_queries` queries) and extrapolated above it from the
measured per-pair cost (linear in N: it scores every pair), flagged `slow_extrapolated`; its batched throughput is
measured over at most `slow_batch_items` items (default 1,000) and scaled the same way (flagged too when scaled).
`speedup_vs_slow` divides slow's single-query p50 by the method's.

The models are the recipe's trained run (${output_dir}/student, /teacher) when there is one, else the recipe's
architectures with random weights (timing depends on the shapes only; said aloud). R@1 (`t2v_R@1`) is measured where
it can be, on the run's own indexed test gallery (a row with gallery = its size, through `Retriever.from_run`), and
is null on synthetic galleries.

Writes ${output_dir}/bench/query_scaling.json:
    {"rows": [{"gallery": N, "method": "fast"|"slow"|"fast+slow@K", "latency_ms_p50", "latency_ms_p95",
               "queries_per_s_batch64", "speedup_vs_slow", "slow_extrapolated", "t2v_R@1"}, ...],
     "indexes": [{"gallery", "kind", "params", "build_s", "recall@K"...}], "rerank_pairs_per_s": {N: {method: pairs/s}},
     "rerank_path": {"plain_pairs_per_s", "fast_pairs_per_s", "flops_per_pair", "fast_share_of_matmul", ...},
     "settings": {...}}
and prints a Markdown table. The CPU is whatever the machine gives: on a shared machine say so next to the figures.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
from _common import ROOT, clustered_unit_vectors, split_own

DEFAULTS = {
    "galleries": "1000,10000,100000,1000000",
    "ks": "10,20,50",
    "queries": "100",
    "warmup": "5",
    "batch": "64",
    "slow_max": "10000",
    "slow_queries": "100",
    "slow_batch_items": "1000",
    "flat_max": "100000",
    "big_kind": "ivf",
    "seed": "0",
    "regenerate": "false",
}


# ------------------------------------------------------------------------------------------ synthetic galleries


def synthetic_gallery(directory: Path, n: int, dim: int, token_shape: tuple[int, int], mask: bool, seed: int,
                      regenerate: bool):  # fmt: skip
    """N clustered unit embeddings [N, dim] (memory-mapped .npy) and a TokenStore of N rows [N_tok, D], on disk."""
    from fastslow.artefacts import atomic_write_json, read_json
    from teachers import TokenStore, VisualTokens

    key = {"n": n, "dim": dim, "token_shape": list(token_shape), "mask": mask, "seed": seed}
    meta = directory / "synthetic.json"
    if not regenerate and meta.is_file() and read_json(meta, "regenerate=true") == key:
        print(f"  gallery {n}: reusing the synthetic gallery in {directory} (same size, shapes and seed)", flush=True)
    else:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        need = n * (dim * 4 + token_shape[0] * token_shape[1] * 2)
        free = shutil.disk_usage(directory).free
        if need > 0.9 * free:
            raise SystemExit(f"gallery {n} needs {need / 2**30:.1f} GiB in {directory}, {free / 2**30:.1f} GiB free")
        clustered_unit_vectors(n, dim, seed, directory / "embeddings.npy")

        def chunks():
            import torch

            g = torch.Generator().manual_seed(seed)
            for s in range(0, n, 4096):
                m = min(4096, n - s)
                tok = torch.randn(m, *token_shape, generator=g)  # the teacher's tokens are layer-normed: unit scale
                yield VisualTokens(tok, torch.ones(m, token_shape[0], dtype=torch.bool) if mask else None)

        TokenStore.write(directory / "tokens", [str(i) for i in range(n)], chunks(), meta={"synthetic": key})
        atomic_write_json(meta, key)
    emb = np.load(directory / "embeddings.npy", mmap_mode="r")
    return emb, TokenStore.open(directory / "tokens")


def visual_shape(teacher, cfg) -> tuple[tuple[int, int], bool]:
    """The teacher's token shape [N_tok, D] for one item of this recipe, and whether it carries a mask (video)."""
    import torch

    with torch.no_grad():
        if cfg.data.dataset in ("shapes", "karpathy"):
            vt = teacher.encode_visual(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))
        else:
            vt = teacher.encode_visual(torch.zeros(1, cfg.data.max_frames, cfg.data.feature_dim),
                                       torch.ones(1, cfg.data.max_frames, dtype=torch.bool))  # fmt: skip
    return (vt.num_tokens, vt.dim), vt.mask is not None


# ------------------------------------------------------------------------------------------------ measuring


def single_query(retriever, texts, k, mode, warmup) -> list[float]:
    """Per-query latency (ms) at batch 1, after ``warmup`` untimed queries."""
    from fastslow.query import timed

    for q in texts[:warmup]:
        retriever.search([q], k, mode)
    return timed(lambda q: retriever.search(q, k, mode), texts, 1, warmup=False)[1]


def batched(retriever, texts, k, mode, batch) -> float:
    """Queries per second at batch ``batch`` (one warm-up batch, then one timed)."""
    part = (texts * (batch // max(len(texts), 1) + 1))[:batch]
    retriever.search(part, k, mode)
    t0 = time.perf_counter()
    retriever.search(part, k, mode)
    return batch / (time.perf_counter() - t0)


def recall_at(index, emb, queries, k) -> float:
    """Share of the exact top-k (brute force over the embeddings) that the index returns."""
    from fastslow.index import search

    exact = np.argsort(-(queries @ np.asarray(emb).T), axis=1)[:, :k]
    got = search(index, queries, k)[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact.tolist(), got.tolist())]))


def row(n, method, lat, qps, r1=None, extrapolated=False) -> dict:
    return {
        "gallery": n,
        "method": method,
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p95": float(np.percentile(lat, 95)),
        "queries_per_s_batch64": qps,
        "speedup_vs_slow": None,
        "slow_extrapolated": extrapolated,
        "t2v_R@1": r1,
    }


def measure_gallery(retriever, n, texts, own, ks, slow_cost) -> list[dict]:
    """Rows of one gallery size, and the rerank pairs/s at batch ``batch`` per k; ``slow_cost`` keeps the per-pair
    slow cost of the largest size measured (sizes come in increasing order), for the sizes above ``slow_max``."""
    warm, batch = int(own["warmup"]), int(own["batch"])
    rows = [row(n, "fast", single_query(retriever, texts, 10, "fast", warm), batched(retriever, texts, 10, "fast",
                                                                                      batch))]  # fmt: skip
    pairs = {}
    for k in ks:
        lat = single_query(retriever, texts, k, "rerank", warm)
        qps = batched(retriever, texts, k, "rerank", batch)
        pairs[k] = qps * min(k, n)
        rows.append(row(n, f"fast+slow@{k}", lat, qps))
    if n <= int(own["slow_max"]):
        lat = single_query(retriever, texts[: int(own["slow_queries"])], 10, "slow", min(warm, 1))
        slow_cost["single"] = (np.percentile(lat, 50) / n, np.percentile(lat, 95) / n)  # ms per pair
        slow = row(n, "slow", lat, None)
    else:  # the teacher scores every pair: its cost is linear in N, from the per-pair cost measured below slow_max
        slow = row(n, "slow", [0.0], None, extrapolated=True)
        slow["latency_ms_p50"], slow["latency_ms_p95"] = (c * n for c in slow_cost["single"])
    # Batched slow over at most slow_batch_items items, scaled by N (every pair is scored: linear in N).
    m = min(n, int(own["slow_batch_items"]))
    sub = retriever if m == n else sub_retriever(retriever, m)
    qps = batched(sub, texts, 10, "slow", batch) * m / n
    slow["queries_per_s_batch64"] = qps
    slow["slow_extrapolated"] = slow["slow_extrapolated"] or m < n
    rows.append(slow)
    for r in rows:
        r["speedup_vs_slow"] = slow["latency_ms_p50"] / max(r["latency_ms_p50"], 1e-9)
    return rows, pairs


def sub_retriever(retriever, m):
    """The same models over the first m items of the gallery, tokens read into memory (batched slow, scaled by N)."""
    from fastslow.index import build_index
    from fastslow.query import Retriever

    emb = np.ascontiguousarray(retriever.embeddings()[:m].numpy())
    return Retriever(retriever.student, retriever.tokenizer, build_index(emb, "flat"), {}, teacher=retriever.teacher,
                     store=retriever.store.get(slice(0, m)), max_length=retriever.max_length,
                     batch_size=retriever.batch_size, teacher_tokenizer=retriever.teacher_tokenizer)  # fmt: skip


def rerank_path(retriever, texts, k, batch, reps=3) -> dict:
    """Teacher pairs/s at batch ``batch`` x k candidates: the plain path (the aligned pairs of the whole batch, each
    text repeated per candidate) against the fast one (`StoreTeacherScorer.candidates`: one store gather, each
    text's item-independent work shared by its k candidates), FLOPs per pair (torch's FLOP counter) and the share
    of this process's float32 matmul rate the fast path reaches. Best of ``reps`` (a shared CPU only slows)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    part = (texts * (batch // max(len(texts), 1) + 1))[:batch]
    ids = retriever.search(part, k, "fast").ids
    rows = torch.arange(len(part)).repeat_interleave(ids.shape[1])
    scorer = retriever.scorer

    def best(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return ids.numel() / min(times)

    plain = best(lambda: scorer(part, rows, ids.reshape(-1)))
    fast = best(lambda: scorer.candidates(part, ids))
    with FlopCounterMode(display=False) as counter:
        scorer.candidates(part, ids)
    flops = counter.get_total_flops() / ids.numel()
    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    matmul = 10 * 2 * 1024**3 / (time.perf_counter() - t0)
    return {
        "k": int(ids.shape[1]),
        "batch": batch,
        "plain_pairs_per_s": plain,
        "fast_pairs_per_s": fast,
        "flops_per_pair": flops,
        "matmul_flops_per_s": matmul,
        "fast_share_of_matmul": fast * flops / matmul,
    }


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    own, overrides = split_own(sys.argv[1:], DEFAULTS)
    galleries = [int(float(g)) for g in own["galleries"].split(",")]
    ks = [int(k) for k in own["ks"].split(",")]

    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    threads = configure_threads(cfg.num_threads)
    import torch

    from fastslow import stages
    from fastslow.artefacts import atomic_write_json
    from fastslow.index import build_index, index_info
    from fastslow.metrics import retrieval_metrics
    from fastslow.query import Retriever
    from fastslow.tokenizer import train_tokenizer

    base = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir
    out = base / "bench"
    stages.ensure_shapes(cfg)
    test = stages.load_split(cfg, "test")
    texts = test.captions[:: max(1, len(test.captions) // int(own["queries"]))][: int(own["queries"])]
    trained = all((base / d / "model.safetensors").is_file() for d in ("student", "teacher"))
    if trained:
        student, _, tok = stages.load_trained(base / "student", "student")
        teacher, _, ttok = stages.load_trained(base / "teacher", "teacher")  # the teacher reads queries with its own
    else:
        print(f"no trained run in {base}: the recipe's models with random weights (timings only)", flush=True)
        tok = train_tokenizer(stages.load_split(cfg, "train").captions, vocab_size=cfg.tokenizer.vocab_size)
        torch.manual_seed(int(own["seed"]))
        student = stages.build_student(cfg, tok).eval().requires_grad_(False)
        teacher = stages.build_teacher(cfg, tok).eval().requires_grad_(False)
        ttok = tok
    dim = int(student.encode_text(*tok.encode(texts[:1], cfg.data.max_length)).shape[1])
    token_shape, has_mask = visual_shape(teacher, cfg)
    print(f"{cfg.teacher.name} tokens {token_shape} (fp16), {cfg.student.name} E={dim}, {threads} threads, "
          f"{len(texts)} queries", flush=True)  # fmt: skip

    rows, indexes, pair_rates, slow_cost, path_rates = [], [], {}, {}, {}
    if trained and (base / "index" / "manifest.json").is_file():
        rows += measure_real(cfg, texts, own, ks, test, retriever_cls=Retriever, metrics=retrieval_metrics)
    queries = None
    for n in sorted(galleries):
        emb, store = synthetic_gallery(out / "query_scaling" / f"gallery_{n}", n, dim, token_shape, has_mask,
                                       int(own["seed"]), own["regenerate"] == "true")  # fmt: skip
        kind = "flat" if n <= int(own["flat_max"]) else own["big_kind"]
        t0 = time.perf_counter()
        index = build_index(np.ascontiguousarray(emb), kind, seed=int(own["seed"]))
        build_s = time.perf_counter() - t0
        retriever = Retriever(student, tok, index, {"kind": kind}, teacher=teacher, store=store,
                              max_length=cfg.data.max_length, batch_size=int(own["batch"]), teacher_tokenizer=ttok,
                              embeddings_loader=lambda emb=emb: np.ascontiguousarray(emb))  # fmt: skip
        queries = retriever.encode(texts).numpy() if queries is None else queries
        info = {"gallery": n, "kind": kind, "params": index_info(index)["params"], "build_s": build_s}
        info.update({f"recall@{k}": recall_at(index, emb, queries, k) for k in ks if kind != "flat"})
        indexes.append(info)
        print(f"  gallery {n}: index {kind} built in {build_s:.1f}s; measuring", flush=True)
        if not path_rates:  # the rerank path's cost does not depend on N: measured once, on the first gallery
            path_rates = rerank_path(retriever, texts, 20 if 20 in ks else ks[0], int(own["batch"]))
        got, pairs = measure_gallery(retriever, n, texts, own, ks, slow_cost)
        rows += got
        pair_rates[str(n)] = {f"fast+slow@{k}": v for k, v in pairs.items()}
        # Written after every size: a run stopped at a large size keeps the sizes it measured.
        settings = {**{k: own[k] for k in DEFAULTS}, "recipe": cfg.recipe, "teacher": cfg.teacher.name,
                    "student": cfg.student.name, "trained": trained, "threads": threads,
                    "token_shape": list(token_shape), "embed_dim": dim}  # fmt: skip
        path = atomic_write_json(
            out / "query_scaling.json",
            {
                "rows": rows,
                "indexes": indexes,
                "rerank_pairs_per_s": pair_rates,
                "rerank_path": path_rates,
                "settings": settings,
            },
        )

    print_table(rows, indexes)
    if path_rates:
        r = path_rates
        print(
            f"rerank path, batch {r['batch']} x k={r['k']}: plain {r['plain_pairs_per_s']:,.0f} pairs/s, fast "
            f"{r['fast_pairs_per_s']:,.0f} pairs/s ({r['fast_pairs_per_s'] / r['plain_pairs_per_s']:.2f}x); "
            f"{r['flops_per_pair'] / 1e6:.1f} MFLOP/pair = {100 * r['fast_share_of_matmul']:.0f}% of this process's "
            f"matmul rate ({r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)"
        )
    print(f"\nwrote {path}")


def measure_real(cfg, texts, own, ks, test, *, retriever_cls, metrics) -> list[dict]:
    """Rows on the run's own indexed test gallery, with R@1 over every test query (through `Retriever.from_run`)."""
    from fastslow.evaluation import ranking_matrix
    from fastslow.index import hash_ids

    r = retriever_cls.from_run(cfg, gallery_hash=hash_ids(test.item_ids))
    n = r.n_items
    rest = r.encode(test.captions) @ r.embeddings().T  # orders the items a method does not rank (ranking_matrix)
    out = []
    for method, mode, k in (
        [("fast", "fast", n)] + [(f"fast+slow@{k}", "rerank", k) for k in ks] + [("slow", "slow", n)]
    ):
        res = r.search(test.captions, k, mode)
        r1 = metrics(ranking_matrix(res.ids, n, rest), test.text_to_visual)["t2v_R@1"]
        sample = texts[: int(own["slow_queries"])] if mode == "slow" else texts
        lat = single_query(r, sample, k, mode, int(own["warmup"]))
        out.append(row(n, method, lat, batched(r, texts, k, mode, int(own["batch"])), r1=r1))
    for x in out:
        x["speedup_vs_slow"] = out[-1]["latency_ms_p50"] / max(x["latency_ms_p50"], 1e-9)
    return out


def print_table(rows, indexes) -> None:
    kinds = {i["gallery"]: i["kind"] for i in indexes}
    print("\n| gallery | index | method | p50 ms | p95 ms | queries/s @64 | speed-up vs slow | t2v R@1 |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        method = r["method"] + (" (extrapolated)" if r["slow_extrapolated"] else "")
        r1 = "-" if r["t2v_R@1"] is None else f"{r['t2v_R@1']:.1f}"
        cells = [
            f"{r['gallery']:,}",
            kinds.get(r["gallery"], "run"),
            method,
            f"{r['latency_ms_p50']:.2f}",
            f"{r['latency_ms_p95']:.2f}",
            f"{r['queries_per_s_batch64']:.1f}",
            f"{r['speedup_vs_slow']:.1f}x",
            r1,
        ]
        print("| " + " | ".join(cells) + " |")
    for i in indexes:
        rec = ", ".join(f"{k} {v:.3f}" for k, v in i.items() if k.startswith("recall@"))
        print(
            f"gallery {i['gallery']:,}: {i['kind']} {i['params']}, built in {i['build_s']:.1f}s"
            + (f"; {rec}" if rec else "")
        )


if __name__ == "__main__":
    main()
