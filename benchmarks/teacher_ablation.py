"""The paper's teacher ablation: which visual scales the decoder cross-attends to, and one vs both
captioning directions. Same data, seed and steps for every variant.

    python benchmarks/teacher_ablation.py recipe=shapes teacher_train.max_steps=800
    python benchmarks/teacher_ablation.py recipe=shapes variants=gradual-2,gradual-1

Variants (cross_attn-directions): gradual-2 (the default teacher), gradual-1 (left-to-right only),
coarse-2 (every layer attends the coarsest map only), fine-2 (every layer attends the finest map only).
Each trains into ${output_dir}/bench/teacher_<variant>/ (the tokenizer is shared, so scores are
comparable) and is evaluated by full ranking on the test split. Cost per pair: teacher.score over the
test set's first 256 captions x 64 items (visual tokens precomputed, as at query time), on this machine.
"""

import sys
import time

from _common import ROOT, run_tool, split_own, variant_dir


def main() -> None:
    own, overrides = split_own(sys.argv[1:], {"variants": "gradual-2,gradual-1,coarse-2,fine-2"})
    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    configure_threads(cfg.num_threads)
    from pathlib import Path

    import torch

    from fastslow import stages
    from fastslow.evaluation import encode_items_teacher, teacher_score_matrix
    from fastslow.metrics import retrieval_metrics

    base = ROOT / cfg.output_dir if not Path(cfg.output_dir).is_absolute() else Path(cfg.output_dir)
    test, load_visual = stages.load_split(cfg, "test"), stages.visual_loader(cfg)
    print(
        f"\n{test.name}: {test.n_texts} queries, {test.n_items} items; {cfg.teacher_train.max_steps} teacher steps, "
        f"seed {cfg.seed}\n"
    )
    print("| variant | cross-attention | directions | t2v R@1 | R@5 | R@10 | tokens/item | ms per 1k pairs "
          "| train time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant in own["variants"].split(","):
        cross_attn, directions = variant.split("-")
        d = variant_dir(base, f"teacher_{variant}", ("tokenizer.json",))
        secs = run_tool(
            "train_teacher.py",
            [
                *overrides,
                f"output_dir={d}",
                "train.resume=none",
                "teacher_train.eval_every=0",
                f"teacher.cross_attn={cross_attn}",
                f"teacher.directions={directions}",
            ],
            d / "train_teacher.log",
        )
        teacher, _, tok = stages.load_trained(d / "teacher", "teacher")
        visual = encode_items_teacher(teacher, test, load_visual)
        scores = teacher_score_matrix(teacher, visual, tok, test.captions, max_length=cfg.data.max_length)
        m = retrieval_metrics(scores, test.text_to_visual)
        ids, mask = tok.encode(test.captions[:256], cfg.data.max_length)
        with torch.no_grad():
            teacher.score(visual[:8], ids[:32], mask[:32])  # warm-up
            t0 = time.perf_counter()
            teacher.score(visual[:64], ids, mask)
            per_k = (time.perf_counter() - t0) * 1e3 / (64 * 256) * 1000
        print(
            f"| {variant} | {cross_attn} | {directions} | {m['t2v_R@1']:.1f} | {m['t2v_R@5']:.1f} | "
            f"{m['t2v_R@10']:.1f} | {visual.tokens.shape[1]} | {per_k:.0f} | {secs:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
