"""Stage 4b: Fast, Slow and Fast+Slow@k on the test split -- accuracy, latency, pairs scored per query.

    python tools/rerank_eval.py recipe=shapes
    python tools/rerank_eval.py recipe=flickr data.root=/data/flickr30k eval.k=[10,20,50] eval.max_gallery=2000

Needs ${output_dir}/teacher, /student and /index (tools/build_index.py). Methods (rows):
  fast          the student through the faiss index (what query time does)
  fast_exact    the student by brute-force dot product (the index's reference)
  slow          the teacher over the whole gallery (skipped above eval.max_gallery; an estimate is printed)
  fast+slow@K   the student's top-K reranked by the teacher alone, for K in eval.k
  fuse@K        top-K ranked by the z-normalised mix of both scores (alpha tuned on val unless combiner.alpha)
  adaptive@K    fast+slow@K reranking only combiner.adaptive_k_min candidates for confident queries
Latency is measured in batches of eval.text_batch queries (the batched query-time path) and reported
per query: mean and p95 over batches. Writes ${output_dir}/eval/: metrics.json, metrics.csv, r1_vs_k.png,
latency_vs_k.png.
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once


def timed(fn, texts, batch):
    """Run fn over query batches; returns (outputs, per-query latencies in ms, one per query)."""
    import time

    outs, lat = [], []
    for s in range(0, len(texts), batch):
        part = texts[s : s + batch]
        t0 = time.perf_counter()
        outs.append(fn(part))
        lat += [(time.perf_counter() - t0) * 1e3 / len(part)] * len(part)
    return outs, lat


def main(argv=None) -> None:
    from fastslow.config import check_data_files, load_recipe

    cfg = load_recipe(argv, prog="rerank_eval.py")
    check_data_files(cfg)
    configure_threads(cfg.num_threads)

    import numpy as np
    import torch

    from fastslow import stages
    from fastslow.combiner import Combiner, tune_alpha
    from fastslow.errors import UserError
    from fastslow.evaluation import StoreTeacherScorer, encode_texts_student, ranking_matrix, teacher_score_matrix
    from fastslow.evaluation import encode_items_student, encode_items_teacher
    from fastslow.index import build_index, hash_ids, load_index, search
    from fastslow.metrics import format_table, retrieval_metrics, write_metrics
    from teachers import TokenStore

    out, idx_dir = stages.stage_dir(cfg, "eval"), stages.stage_dir(cfg, "index")
    student_dir, teacher_dir = stages.stage_dir(cfg, "student"), stages.stage_dir(cfg, "teacher")
    student, _, tok = stages.load_trained(student_dir, "student")
    teacher, _, _ = stages.load_trained(teacher_dir, "teacher")
    stages.ensure_shapes(cfg)
    split = stages.load_split(cfg, cfg.eval.split)
    texts, t2v, n = split.captions, split.text_to_visual, split.n_items
    index, manifest = load_index(idx_dir, expect={
        "student_hash": stages.weights_hash(student_dir / "model.safetensors"), "gallery_hash": hash_ids(split.item_ids)})
    store = TokenStore.open(idx_dir / "tokens")
    teacher_hash = stages.weights_hash(teacher_dir / "model.safetensors")
    if store.meta["meta"].get("teacher_hash") != teacher_hash:
        raise UserError(f"{idx_dir / 'tokens'} holds tokens of another teacher: rerun tools/build_index.py")
    ml, tb = cfg.data.max_length, cfg.eval.text_batch
    scorer = StoreTeacherScorer(teacher, store, tok, ml)
    encode = lambda q: encode_texts_student(student, tok, q, max_length=ml)  # noqa: E731
    scale = float(student.inverse_temperature())
    rows, curves = {}, {}

    def add(name, scores, lat, pairs, extra=None, per_query=False):
        m = retrieval_metrics(scores, t2v)
        if per_query:  # a per-query reranking has no scores comparable across queries: v2t is undefined
            m = {k: v for k, v in m.items() if not k.startswith("v2t")}
        rows[name] = {**m, "latency_ms_mean": float(np.mean(lat)), "latency_ms_p95": float(np.percentile(lat, 95)),
                      "pairs_per_query": pairs, **(extra or {})}

    # Fast: through the index (ranks beyond what it returns are tied last) and exact.
    depth = n if n <= 10_000 else max(cfg.eval.k)
    res, lat = timed(lambda q: search(index, encode(q), depth), texts, tb)
    s_idx = torch.from_numpy(np.concatenate([r[0] for r in res])), torch.from_numpy(np.concatenate([r[1] for r in res]))
    emb = torch.from_numpy(np.load(idx_dir / "embeddings.npy"))
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
        _, lat = timed(lambda q: scorer(q, torch.arange(len(q)).repeat_interleave(64), torch.randint(n, (64 * len(q),))),
                       texts[:tb], tb)
        print(f"slow skipped: {n} items > eval.max_gallery={cfg.eval.max_gallery}; "
              f"estimated {np.mean(lat) * n / 64 / 1e3:.1f} s per query")

    # Fuse weight: tuned on the val split at combiner.k unless the recipe fixes it.
    alpha = cfg.combiner.alpha
    if alpha is None:
        val = stages.load_split(cfg, "val")
        v_store = encode_items_teacher(teacher, val, stages.visual_loader(cfg))
        v_index = build_index(encode_items_student(student, val, stages.visual_loader(cfg)).numpy(), kind="flat")
        v_s, v_ids = (torch.from_numpy(a) for a in search(v_index, encode(val.captions), min(cfg.combiner.k, val.n_items)))
        v_full = teacher_score_matrix(teacher, v_store, tok, val.captions, max_length=ml, text_batch=tb)
        v_t = v_full.gather(1, v_ids)
        alpha, _ = tune_alpha(v_s, v_ids, v_t, torch.as_tensor(val.text_to_visual))
        print(f"fuse: alpha={alpha} tuned on {val.name} at k={cfg.combiner.k}")

    student_rest = exact  # items below the reranked top-k keep the student's order
    for k in sorted(set(min(k, n) for k in cfg.eval.k)):
        for mode, name in (("slow", f"fast+slow@{k}"), ("fuse", f"fuse@{k}")):
            comb = Combiner(encode, index, scorer, mode=mode, k=k, alpha=alpha, batch_size=tb, logit_scale=scale)
            res, lat = timed(lambda q: comb.rank(q), texts, tb)
            ids = torch.cat([r.ids for r in res])
            add(name, ranking_matrix(ids, n, student_rest), lat, sum(r.pairs_scored for r in res) / len(texts),
                per_query=True)
            curves.setdefault(mode, []).append((k, rows[name]["t2v_R@1"], rows[name]["latency_ms_mean"]))
    if cfg.combiner.adaptive_margin is not None:
        k = min(cfg.combiner.k, n)
        comb = Combiner(encode, index, scorer, mode="slow", k=k, adaptive_margin=cfg.combiner.adaptive_margin,
                        k_min=cfg.combiner.adaptive_k_min, batch_size=tb, logit_scale=scale)
        res, lat = timed(lambda q: comb.rank(q), texts, tb)
        ids = torch.cat([r.ids for r in res])
        add(f"adaptive@{k}", ranking_matrix(ids, n, student_rest), lat, sum(r.pairs_scored for r in res) / len(texts),
            per_query=True)

    columns = ["t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_medr", "v2t_R@1", "v2t_R@5", "v2t_R@10", "latency_ms_mean",
               "latency_ms_p95", "pairs_per_query"]
    print(f"\n{split.name}: {len(texts)} queries, {n} items, index {manifest['kind']}\n")
    print(format_table(rows, columns))
    write_metrics(out, rows)
    plot(out, rows, curves)
    print(f"\nwrote {out}/metrics.json, metrics.csv, r1_vs_k.png, latency_vs_k.png")


def plot(out, rows, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, col, fname, label in ((1, "t2v_R@1", "r1_vs_k.png", "text->visual R@1 (%)"),
                                   (2, "latency_ms_mean", "latency_vs_k.png", "latency per query (ms)")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[key] for p in pts], marker="o", label="fast+slow" if mode == "slow" else mode)
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
