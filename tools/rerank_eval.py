"""Stage 4b: Fast, Slow and Fast+Slow@k on the test split -- accuracy, latency, pairs scored per query.

    python tools/rerank_eval.py recipe=shapes
    python tools/rerank_eval.py recipe=flickr data.root=/data/flickr30k eval.k=[10,20,50] eval.max_gallery=2000

Needs ${output_dir}/teacher, /student and /index (tools/build_index.py). Methods (rows):
  fast          the student through the faiss index (what query time does)
  fast_exact    the student by brute-force dot product (the index's reference)
  slow          the teacher over the whole gallery (skipped above eval.max_gallery; an estimate is printed)
  fast+slow@K   the student's top-K reranked by the teacher alone, for K in eval.k
  fuse@K        top-K ranked by the z-normalised mix of both scores (alpha tuned on val per K unless combiner.alpha;
                0 when the teacher does not beat the student alone on val by combiner.min_gain)
  adaptive@K    fast+slow@K reranking only combiner.adaptive_k_min candidates for confident queries
Accuracy is over every test query; the teacher scores each query's student top-max(eval.k) once and
every k is ranked from those scores. Latency is timed by running each method through the query-time object
(fastslow.query.Retriever) on the first eval.latency_queries queries in batches of eval.text_batch, reported per
query: mean and p95 over batches; speedup_vs_slow divides the teacher-over-everything latency by it.
Writes ${output_dir}/eval/: metrics.json, metrics.csv, r1_vs_k.png, latency_vs_k.png and fuse_alpha.json (the weight
per k, stamped with both models and the index it was tuned for).
Under data.on_error=skip the test items build_index could not read (its manifest lists them) and val items
that cannot be read are left out with their captions, said aloud and listed in eval/skipped_files.json.
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once


def main(argv=None) -> None:
    from fastslow.config import check_data_files, load_recipe

    cfg = load_recipe(argv, prog="rerank_eval.py")
    check_data_files(cfg)
    configure_threads(cfg.num_threads)

    from functools import partial

    import numpy as np
    import torch

    from fastslow import stages
    from fastslow.combiner import adaptive_k, rerank
    from fastslow.data import SkipLedger
    from fastslow.evaluation import ranking_matrix
    from fastslow.index import hash_ids, search
    from fastslow.metrics import format_table, retrieval_metrics, write_metrics
    from fastslow.query import (
        FUSE_FILE,
        Retriever,
        candidate_scores,
        fuse_stamp,
        lookup,
        save_fuse_alphas,
        timed,
        tune_on_split,
    )

    out = stages.stage_dir(cfg, "eval")
    stages.ensure_shapes(cfg)
    ledger = SkipLedger()  # what this evaluation leaves out under data.on_error=skip
    full = stages.load_split(cfg, cfg.eval.split, ledger)
    # The gallery as build_index indexed it: without the items its manifest lists as left out (data.on_error=skip).
    split = stages.without_index_skips(cfg, full, stages.stage_dir(cfg, "index"), ledger)
    texts, t2v, n = split.captions, split.text_to_visual, split.n_items
    # Student, index, teacher and token store, loaded once and checked before any work: this student and teacher,
    # this gallery (the items indexed: a manifest whose "skipped" list does not account for the split fails too).
    retriever = Retriever.from_run(cfg, gallery_hash=hash_ids(split.item_ids))
    student, teacher, tok, scorer = retriever.student, retriever.teacher, retriever.tokenizer, retriever.scorer
    index, manifest = retriever.index, retriever.manifest
    emb = retriever.embeddings()
    ml, tb = cfg.data.max_length, cfg.eval.text_batch
    encode = retriever.encode
    scale = retriever.logit_scale
    rows, curves = {}, {}

    def add(name, scores, lat, pairs, extra=None, per_query=False):
        m = retrieval_metrics(scores, t2v)
        if per_query:  # a per-query reranking has no scores comparable across queries: v2t is undefined
            m = {k: v for k, v in m.items() if not k.startswith("v2t")}
        rows[name] = {
            **m,
            "latency_ms_mean": float(np.mean(lat)),
            "latency_ms_p95": float(np.percentile(lat, 95)),
            "pairs_per_query": pairs,
            **(extra or {}),
        }

    # Fast: through the index (ranks beyond what it returns are tied last) and exact.
    depth = n if n <= 10_000 else max(cfg.eval.k)
    res, lat = timed(lambda q: search(index, encode(q), depth), texts, tb)
    s_idx = torch.from_numpy(np.concatenate([r[0] for r in res])), torch.from_numpy(np.concatenate([r[1] for r in res]))
    res_exact, lat_exact = timed(lambda q: encode(q) @ emb.T, texts, tb)
    exact = torch.cat(res_exact)
    top10 = exact.topk(min(10, n), dim=1).indices
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / top10.shape[1] for a, b in zip(top10, s_idx[1][:, :10])])
    fast = torch.full((len(texts), n), float("-inf"))
    valid = s_idx[1] >= 0
    fast[torch.arange(len(texts)).unsqueeze(1).expand_as(valid)[valid], s_idx[1][valid]] = s_idx[0][valid]
    add("fast", fast, lat, 0, {"index_recall@10": float(recall) * 100})
    add("fast_exact", exact, lat_exact, 0)

    # Slow: the teacher over everything, or an estimate of what it would cost.
    if n <= cfg.eval.max_gallery:
        res, lat = timed(lambda q: scorer.full(q), texts, tb)
        add("slow", torch.cat(res), lat, n)
    else:
        _, lat = timed(
            lambda q: scorer(q, torch.arange(len(q)).repeat_interleave(64), torch.randint(n, (64 * len(q),))),
            texts[:tb],
            tb,
        )
        print(
            f"slow skipped: {n} items > eval.max_gallery={cfg.eval.max_gallery}; "
            f"estimated {np.mean(lat) * n / 64 / 1e3:.1f} s per query"
        )

    # Teacher scores of every query's student top-K, K the largest k, in one batched pass: each
    # fast+slow@k / fuse@k ranking follows from it (the student's top-k is a prefix of its top-K).
    # Latency is timed separately, by running the combiner itself on eval.latency_queries queries.
    k_max = min(max(cfg.eval.k), n)
    cand_s, cand_ids = s_idx[0][:, :k_max], s_idx[1][:, :k_max]
    cand_t = candidate_scores(scorer, texts, cand_ids, tb)  # the fast path: one store gather per batch

    asked = sorted(set(cfg.eval.k) | {cfg.combiner.k})  # the depths a fusion weight is tuned (and looked up) at
    if cfg.combiner.alpha is None:  # fusion weight per k, tuned on the val split over an index of the gallery's kind
        index_kw = {"kind": cfg.index.kind, "nlist": cfg.index.nlist, "nprobe": cfg.index.nprobe,
                    "pq_m": cfg.index.pq_m, "hnsw_m": cfg.index.hnsw_m, "ef_search": cfg.index.ef_search,
                    "seed": cfg.seed}  # fmt: skip
        tuned, val = tune_on_split(
            student, teacher, tok, stages.load_split(cfg, "val", ledger), stages.visual_loader(cfg, student), ks=asked,
            teacher_load_visual=stages.visual_loader(cfg, teacher), teacher_tokenizer=retriever.teacher_tokenizer,
            max_length=ml, text_batch=tb, index_kw=index_kw, min_gain=cfg.combiner.min_gain,
            on_error=cfg.data.on_error, ledger=ledger)  # fmt: skip
        for k, t in tuned.items():
            guard = " (the teacher does not help on val: student order kept)" if t["alpha"] == 0 else ""
            print(f"fuse@{k}: alpha={t['alpha']} tuned on {val.name} (val R@1 student {t['r1_student']:.1f}, "
                  f"teacher {t['r1_teacher']:.1f}, fused {t['r1_fused']:.1f}){guard}")  # fmt: skip
        # Stamped with both models, the index and the split: search.py never fuses with a weight tuned for another
        # model pair or index, nor at another k.
        stamp = fuse_stamp(student_hash=retriever.student_hash, teacher_hash=retriever.teacher_hash,
                           index_manifest=manifest, val_split=val.name, max_length=ml,
                           teacher_tokenizer_hash=retriever.teacher_tokenizer_hash)  # fmt: skip
        save_fuse_alphas(out / FUSE_FILE, tuned, split=val.name, stamp=stamp)
        retriever.alphas = {k: t["alpha"] for k, t in tuned.items()}

    sample = texts[: cfg.eval.latency_queries]
    by_k = {}  # clamped depth -> the first k asked for that reaches it
    for k in sorted(cfg.eval.k):
        by_k.setdefault(min(k, n), k)
    modes = (("slow", "rerank", "fast+slow"), ("fuse", "fuse", "fuse"))
    variants = [(kc, ka, m, rm, f"{prefix}@{kc}", None) for kc, ka in by_k.items() for m, rm, prefix in modes]
    if cfg.combiner.adaptive_margin is not None:
        k = min(cfg.combiner.k, k_max)
        variants.append((k, cfg.combiner.k, "slow", "rerank", f"adaptive@{k}", cfg.combiner.adaptive_margin))
    for kc, ka, mode, rmode, name, margin in variants:
        depth = (
            None
            if margin is None
            else adaptive_k(cand_s[:, :kc], margin=margin, k_min=cfg.combiner.adaptive_k_min, scale=scale)
        )
        alpha = retriever.alpha_for(ka) if mode == "fuse" else 0.0
        res = rerank(
            cand_s[:, :kc],
            cand_ids[:, :kc],
            lookup(cand_t[:, :kc], cand_ids[:, :kc]),
            mode=mode,
            alpha=alpha,
            depth=depth,
        )
        # Latency: the query-time object itself, batched as eval.text_batch (a k above the gallery is clamped).
        search_fn = partial(retriever.search, k=ka, mode=rmode, margin=margin, k_min=cfg.combiner.adaptive_k_min)
        _, lat = timed(search_fn, sample, tb)
        add(name, ranking_matrix(res.ids, n, exact), lat, res.pairs_scored / len(texts), per_query=True)
        if margin is None:
            curves.setdefault(mode, []).append((kc, rows[name]["t2v_R@1"], rows[name]["latency_ms_mean"]))
    if "slow" in rows:
        for row in rows.values():
            row["speedup_vs_slow"] = rows["slow"]["latency_ms_mean"] / max(row["latency_ms_mean"], 1e-9)

    columns = [
        "t2v_R@1",
        "t2v_R@5",
        "t2v_R@10",
        "t2v_medr",
        "v2t_R@1",
        "v2t_R@5",
        "v2t_R@10",
        "latency_ms_mean",
        "latency_ms_p95",
        "pairs_per_query",
        "speedup_vs_slow",
    ]
    left = ""
    if n < full.n_items:  # build_index could not read some test items (data.on_error=skip)
        left = f" (left out: {full.n_texts - len(texts)} of {full.n_texts} queries, "
        left += f"{full.n_items - n} of {full.n_items} items)"
    print(f"\n{split.name}: {len(texts)} queries, {n} items{left}, index {manifest['kind']}\n")
    print(format_table(rows, columns))
    write_metrics(out, rows)
    plot(out, rows, curves)
    print(f"\nwrote {out}/metrics.json, metrics.csv, r1_vs_k.png, latency_vs_k.png")
    stages.finish_skips(ledger, out)


def plot(out, rows, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, col, fname, label in (
        (1, "t2v_R@1", "r1_vs_k.png", "text->visual R@1 (%)"),
        (2, "latency_ms_mean", "latency_vs_k.png", "latency per query (ms)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode, pts in curves.items():
            ax.plot(
                [p[0] for p in pts], [p[key] for p in pts], marker="o", label="fast+slow" if mode == "slow" else mode
            )
        for ref, style in (("fast", "--"), ("slow", ":")):
            if ref in rows:
                ax.axhline(rows[ref][col], linestyle=style, color="gray", label=ref)
        ax.set_xscale("log")
        ax.set_xlabel("k (candidates reranked)")
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    run(main)
