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
Accuracy is over every test query; the teacher scores each query's student top-max(eval.k) once and
every k is ranked from those scores. Latency is timed by running each method itself on the first
eval.latency_queries queries in batches of eval.text_batch (the batched query-time path), reported per
query: mean and p95 over batches; speedup_vs_slow divides the teacher-over-everything latency by it.
Writes ${output_dir}/eval/: metrics.json, metrics.csv, r1_vs_k.png, latency_vs_k.png.
Under data.on_error=skip the test items build_index could not read (its manifest lists them) and val items
that cannot be read are left out with their captions, said aloud and listed in eval/skipped_files.json.
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once


def timed(fn, texts, batch):
    """Run fn over query batches; returns (outputs, per-query latencies in ms, one per query)."""
    import time

    outs, lat = [], []
    if texts:
        fn(texts[:batch])  # warm-up: first-call allocations and lazy init are not query latency
    for s in range(0, len(texts), batch):
        part = texts[s : s + batch]
        t0 = time.perf_counter()
        outs.append(fn(part))
        lat += [(time.perf_counter() - t0) * 1e3 / len(part)] * len(part)
    return outs, lat


def candidate_scores(scorer, texts, ids, batch):
    """Teacher scores of each query's candidates: ids [Q, k] -> [Q, k] (NaN where the id is -1)."""
    import torch

    out = torch.full(ids.shape, float("nan"))
    for s in range(0, len(texts), batch):
        block = ids[s : s + batch]
        valid = block >= 0
        rows = torch.arange(len(block)).unsqueeze(1).expand_as(block)
        out[s : s + batch][valid] = scorer(texts[s : s + batch], rows[valid], block[valid])
    return out


def lookup(scores, ids):
    """A teacher_score_fn answering from precomputed candidate scores ([Q, k] aligned with ids [Q, k])."""

    def fn(query_idx, item_ids):
        pos = (ids[query_idx] == item_ids[:, None]).float().argmax(1)
        return scores[query_idx, pos]

    return fn


def main(argv=None) -> None:
    from fastslow.config import check_data_files, load_recipe

    cfg = load_recipe(argv, prog="rerank_eval.py")
    check_data_files(cfg)
    configure_threads(cfg.num_threads)

    import numpy as np
    import torch

    from fastslow import stages
    from fastslow.artefacts import atomic_write_json
    from fastslow.combiner import Combiner, adaptive_k, rerank, tune_alpha
    from fastslow.data import SkipLedger
    from fastslow.evaluation import StoreTeacherScorer, encode_items, encode_texts_student, ranking_matrix
    from fastslow.index import build_index, hash_ids, search
    from fastslow.metrics import format_table, retrieval_metrics, write_metrics
    from teachers import VisualTokens

    out = stages.stage_dir(cfg, "eval")
    student_dir, teacher_dir = stages.stage_dir(cfg, "student"), stages.stage_dir(cfg, "teacher")
    student, _, tok = stages.load_trained(student_dir, "student")
    teacher, _, _ = stages.load_trained(teacher_dir, "teacher")
    stages.ensure_shapes(cfg)
    ledger = SkipLedger()  # what this evaluation leaves out under data.on_error=skip
    full = stages.load_split(cfg, cfg.eval.split, ledger)
    # The gallery as build_index indexed it: without the items its manifest lists as left out (data.on_error=skip).
    split = stages.without_index_skips(cfg, full, stages.stage_dir(cfg, "index"), ledger)
    texts, t2v, n = split.captions, split.text_to_visual, split.n_items
    student_hash = stages.weights_hash(student_dir / "model.safetensors")
    teacher_hash = stages.weights_hash(teacher_dir / "model.safetensors")
    # Every artefact of the index directory is checked before any work: this student and teacher, this gallery
    # (the items indexed: a manifest whose "skipped" list does not account for the split fails this check too).
    index, manifest = stages.open_index(cfg, student_hash, hash_ids(split.item_ids))
    store = stages.open_gallery_tokens(cfg, manifest, teacher_hash)
    emb = torch.from_numpy(stages.load_gallery_embeddings(cfg, manifest, student_hash))
    ml, tb = cfg.data.max_length, cfg.eval.text_batch
    scorer = StoreTeacherScorer(teacher, store, tok, ml)
    encode = lambda q: encode_texts_student(student, tok, q, max_length=ml)  # noqa: E731
    scale = float(student.inverse_temperature())
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
    cand_t = candidate_scores(scorer, texts, cand_ids, tb)

    alpha = cfg.combiner.alpha
    if alpha is None:  # fuse weight tuned on the val split at combiner.k
        val, load_visual = stages.load_split(cfg, "val", ledger), stages.visual_loader(cfg)
        # One read of each val item for both models, so that both see the same items under data.on_error=skip.
        both = lambda *x: (student.encode_visual(*x).float().cpu(), teacher.encode_visual(*x).to(device="cpu"))  # noqa: E731
        v_out, kept = encode_items(both, val, load_visual, 64, on_error=cfg.data.on_error, ledger=ledger, where="val")
        if len(kept) < val.n_items:
            val_all, val = val, val.select_items(kept.tolist())
            print(
                f"fuse: {val_all.n_items - val.n_items} of {val_all.n_items} val items could not be read and are left "
                f"out, with {val_all.n_texts - val.n_texts} of {val_all.n_texts} captions (data.on_error=skip)"
            )
        v_index = build_index(torch.cat([o[0] for o in v_out]).numpy(), kind="flat")
        v_k = min(cfg.combiner.k, val.n_items)
        v_s, v_ids = (torch.from_numpy(a) for a in search(v_index, encode(val.captions), v_k))
        v_scorer = StoreTeacherScorer(teacher, VisualTokens.cat([o[1] for o in v_out]), tok, ml)
        alpha, _ = tune_alpha(v_s, v_ids, candidate_scores(v_scorer, val.captions, v_ids, tb),
                              torch.as_tensor(val.text_to_visual))
        print(f"fuse: alpha={alpha} tuned on {val.name} at k={cfg.combiner.k}")
        # Stamped with both models, the split and k, so search.py never fuses with a weight tuned for another pair.
        atomic_write_json(
            out / "fuse_alpha.json",
            {"alpha": alpha, "split": val.name, "k": cfg.combiner.k},
            stamp=stages.fuse_stamp(cfg, student_hash, teacher_hash, val.name),
        )

    sample = texts[: cfg.eval.latency_queries]
    ks = sorted(set(min(k, n) for k in cfg.eval.k))
    modes = (("slow", "fast+slow"), ("fuse", "fuse"))
    variants = [(k, mode, f"{prefix}@{k}", None) for k in ks for mode, prefix in modes]
    if cfg.combiner.adaptive_margin is not None:
        k = min(cfg.combiner.k, k_max)
        variants.append((k, "slow", f"adaptive@{k}", cfg.combiner.adaptive_margin))
    for k, mode, name, margin in variants:
        depth = None if margin is None else adaptive_k(cand_s[:, :k], margin=margin, k_min=cfg.combiner.adaptive_k_min,
                                                        scale=scale)
        res = rerank(cand_s[:, :k], cand_ids[:, :k], lookup(cand_t[:, :k], cand_ids[:, :k]), mode=mode, alpha=alpha,
                     depth=depth)
        comb = Combiner(encode, index, scorer, mode=mode, k=k, alpha=alpha, batch_size=tb, logit_scale=scale,
                        adaptive_margin=margin, k_min=cfg.combiner.adaptive_k_min)
        _, lat = timed(comb.rank, sample, tb)
        add(name, ranking_matrix(res.ids, n, exact), lat, res.pairs_scored / len(texts), per_query=True)
        if margin is None:
            curves.setdefault(mode, []).append((k, rows[name]["t2v_R@1"], rows[name]["latency_ms_mean"]))
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
