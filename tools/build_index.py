"""Stage 4a: index a gallery for query time -- the student's faiss index and the teacher's visual tokens.

    python tools/build_index.py recipe=shapes
    python tools/build_index.py recipe=coco data.root=/data/coco index.kind=ivfpq index.pq_m=32
    accelerate launch --num_processes 4 tools/build_index.py recipe=coco ...   # gallery encoding sharded across ranks

The gallery is the items of the `eval.split` split. Writes ${output_dir}/index/: index.faiss and
manifest.json (student hash, item ids, kind), embeddings.npy (exact reference) with
embeddings.stamp.json, and tokens/ (the teacher's visual tokens, memory-mapped fp16) so reranking never
runs the teacher's backbone. Each is stamped with what it was built from (student or teacher weights
hash, gallery hash, image size or clip length), which rerank_eval.py and search.py check. Gallery
encoding is resumable (chunks under index/student_chunks/).
Under data.on_error=skip an item that cannot be read is left out of the index, the embeddings and the
tokens, and listed (id, path, reason) under "skipped" in manifest.json and in index/skipped_files.json;
the gallery hash every stamp carries is then that of the items indexed.
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once


def main(argv=None) -> None:
    from fastslow.config import check_data_files, load_recipe

    cfg = load_recipe(argv, prog="build_index.py")
    check_data_files(cfg)
    configure_threads(cfg.num_threads)

    import time

    import numpy as np
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from fastslow import stages
    from fastslow.data import SkipLedger, VisualDataset, collate
    from fastslow.evaluation import build_token_store, visual_args
    from fastslow.index import build_index, hash_ids, index_info, save_embeddings, save_index
    from fastslow.trainer import skip_deepspeed_cpu_shm_build

    skip_deepspeed_cpu_shm_build()  # under `accelerate launch` with the DeepSpeed config: no C++ build at start-up
    acc = Accelerator()
    out = stages.stage_dir(cfg, "index")
    student_dir, teacher_dir = stages.stage_dir(cfg, "student"), stages.stage_dir(cfg, "teacher")
    student, _, _ = stages.load_trained(student_dir, "student")
    teacher, _, _ = stages.load_trained(teacher_dir, "teacher")
    student_hash = stages.weights_hash(student_dir / "model.safetensors")
    teacher_hash = stages.weights_hash(teacher_dir / "model.safetensors")
    stages.ensure_shapes(cfg, acc)
    ledger = SkipLedger()  # what this run leaves out under data.on_error=skip
    split = stages.load_split(cfg, cfg.eval.split, ledger)
    # Each model reads the items as it was trained to: its own backbone's mean / std and resampling.
    load_visual = stages.visual_loader(cfg, student)
    student.to(acc.device)
    visual = stages.visual_stamp(cfg)

    # Student embeddings: each process encodes its share of the gallery, gathered in item order.
    from fastslow.index import encode_gallery

    dataset = VisualDataset(split, load_visual, on_error=cfg.data.on_error)
    loader = DataLoader(dataset, batch_size=cfg.index.batch_size, collate_fn=collate)
    t0 = time.perf_counter()
    left_out = [] if cfg.data.on_error == "skip" else None  # filled with the items that could not be read
    emb = encode_gallery(
        lambda b: student.encode_visual(*visual_args(b)),
        acc.prepare(loader),
        accelerator=acc,
        out_path=out / "student_chunks",
        # The image size is part of the key: chunks encoded at another size must not be resumed from. So is
        # on_error: chunks written under skip lack the unreadable items, which a run under raise must meet.
        stamp={
            "student_hash": student_hash,
            "gallery_hash": hash_ids(split.item_ids),
            "on_error": cfg.data.on_error,
            **visual,
        },
        left_out=left_out,
    )
    t_student = time.perf_counter() - t0
    skipped = []  # the gallery items left out: {"id", "path", "reason"}, for the manifest
    if left_out:
        kept, split, skipped = stages.drop_unread(split, left_out, load_visual, ledger, where="index")
        emb = emb[kept]
    # The gallery as indexed (without the items left out): what save_index puts in the manifest, hence what the
    # embeddings' and tokens' stamps must carry for the readers' checks against the manifest.
    gallery_hash = hash_ids(split.item_ids)
    if acc.is_main_process:
        t0 = time.perf_counter()
        index = build_index(
            np.ascontiguousarray(emb, dtype=np.float32),
            kind=cfg.index.kind,
            nlist=cfg.index.nlist,
            nprobe=cfg.index.nprobe,
            pq_m=cfg.index.pq_m,
            hnsw_m=cfg.index.hnsw_m,
            ef_search=cfg.index.ef_search,
            seed=cfg.seed,
        )
        t_index = time.perf_counter() - t0
        save_index(
            out,
            index,
            {
                "item_ids": split.item_ids,
                "student_hash": student_hash,
                "teacher_hash": teacher_hash,
                "split": split.name,
                "item_paths": split.item_paths,
                "skipped": skipped,  # gallery items left out under data.on_error=skip: id, path, reason
                # captions beyond data.max_captions / data.eval_captions per item (COCO 5k test: 10 of 25,010)
                "dropped_captions": split.dropped_captions,
                **visual,
            },
        )
        save_embeddings(out, emb, {"student_hash": student_hash, "gallery_hash": gallery_hash, **visual})

    # Teacher tokens: computed once per gallery item, read back at query time (never the backbone); every process
    # extracts its shard of the rows (`build_token_store`), after the index and embeddings are written.
    t0 = time.perf_counter()
    teacher.to(acc.device)
    teacher_load = stages.visual_loader(cfg, teacher)  # the teacher's own mean / std, as in its training
    # Only the items the student read are left. One that fails now (changed since) keeps its row, as a
    # placeholder the store lists and refuses to score, so that row i of the tokens stays item i of the index.
    build_token_store(teacher, split, teacher_load, out / "tokens",
                      meta={"teacher_hash": teacher_hash, "gallery_hash": gallery_hash, **visual},
                      batch_size=cfg.index.batch_size, device=acc.device, accelerator=acc,
                      on_error=cfg.data.on_error, ledger=ledger, where="index tokens")  # fmt: skip
    t_tokens = time.perf_counter() - t0
    if acc.is_main_process:
        # What rerank_eval.py and search.py will check: the tokens on disk belong to the index just written.
        store = stages.open_gallery_tokens(cfg, {"gallery_hash": gallery_hash}, teacher_hash)
        info = index_info(index)
        print(
            f"index {info['kind']} {info['params']} over {split.n_items} items of {split.name} -> {out}\n"
            f"  student encoding {t_student:.1f}s, index build {t_index:.2f}s, teacher tokens {t_tokens:.1f}s "
            f"({store.shape} fp16, {np.prod(store.shape) * 2 / 2**20:.1f} MiB, {acc.num_processes} process(es))"
        )
    stages.finish_skips(ledger, out, acc)
    acc.wait_for_everyone()


if __name__ == "__main__":
    run(main)
