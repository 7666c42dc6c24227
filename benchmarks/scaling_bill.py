"""What a recipe costs on its real dataset, computed from the configs (no data, no training, no download).

    python benchmarks/scaling_bill.py recipe=flickr
    python benchmarks/scaling_bill.py recipe=coco tokenizer_vocab=30522 mfu=0.3
    python benchmarks/scaling_bill.py recipe=vatex

Builds the recipe's real-size teacher and student with random weights, counts the FLOPs of one item / text / pair
through each (fastslow.bill), and multiplies by the dataset's published sizes (fastslow.bill.DATASETS). Own
arguments: `tokenizer_vocab=` (default the recipe's tokenizer.vocab_size; 30522 for a BERT tokenizer),
`peak_tflops=` (312, A100 bf16), `mfu=` (0.35), `scaling=` (0.9, 8-GPU efficiency), `decode_per_s=` (images one
loader worker decodes and resizes per second; default: measured here on a generated 500x375 JPEG with
fastslow's ImageLoader); everything else is a recipe override. JSON to ${output_dir}/bench/scaling_bill.json (the
dict of `fastslow.bill.bill`) and a Markdown table.
docs/SCALING.md holds the tables of the three real recipes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import ROOT, split_own

from fastslow.artefacts import atomic_write_json


def _si(x: float, unit: str = "") -> str:
    for div, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {p}{unit}"
    return f"{x:.3g} {unit}".strip()


def table(b: dict) -> str:
    u, c, by = b["units"], b["counts"], b["bytes"]
    lines = [
        f"**{b['recipe']}** on {b['dataset']['name']}: {b['models']['teacher']} / {b['models']['student']}, "
        f"vocab {u['vocab_size']}, captions counted at {u['caption_tokens']} tokens; "
        f"{b['gpu']['name']} at {b['gpu']['peak_flops'] / 1e12:.0f} TFLOP/s x MFU {b['gpu']['mfu']}, "
        f"8-GPU efficiency {b['gpu']['scaling']}; "
        + (f"decoding {b['decode_images_per_s_per_worker']:.0f} images/s per loader worker"
           if b["decode_images_per_s_per_worker"] else "precomputed features, nothing decoded"),
        "",
        "| unit of work | forward FLOPs |",
        "|---|---:|",
        f"| teacher: one item's visual tokens | {_si(u['teacher_visual'])} |",
        f"| teacher: one training pair (loss, both directions) | {_si(u['teacher_pair_loss'])} |",
        f"| teacher: one rerank pair (of k=20, both directions) | {_si(u['teacher_pair_rerank'])} |",
        f"| teacher: one swap-scored pair | {_si(u['teacher_pair_swap'])} |",
        f"| student: one item | {_si(u['student_visual'])} |",
        f"| student: one text | {_si(u['student_text'])} |",
        f"| student: one pair (dot product) | {_si(u['student_pair'])} |",
        "",
        "| store | bytes |",
        "|---|---:|",
        f"| teacher tokens per item ({u['visual_tokens']} x {u['token_dim']} fp16) "
        f"| {_si(by['teacher_tokens_per_item'], 'B')} |",
        f"| teacher token store, train | {_si(by['teacher_token_store_train'], 'B')} |",
        f"| teacher token store, test gallery | {_si(by['teacher_token_store_test'], 'B')} |",
        f"| student embeddings / flat index, test gallery | {_si(by['student_embeddings_test'], 'B')} |",
        f"| score cache per teacher pair (measured, SQLite) | {by['score_cache_per_pair']:.0f} B |",
        f"| score cache per epoch of distillation ({c['teacher_pairs_per_epoch']:,} pairs) "
        f"| {_si(by['score_cache_per_epoch'], 'B')} |",
        "",
        "| stage | FLOPs | GPU-hours (1 GPU) | wall hours on 8 GPUs | images decoded | decode hours (1 process) |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for s in b["stages"]:
        dec = "-" if s["loader_hours_1"] is None else f"{s['loader_hours_1']:.3g}"
        lines.append(
            f"| {s['stage']} | {_si(s['flops'])} | {s['gpu_hours_1']:.3g} | {s['wall_hours_8']:.3g} "
            f"| {s['images']:,} | {dec} |"
        )
    return "\n".join(lines)


def main() -> None:
    own, overrides = split_own(
        sys.argv[1:], {"tokenizer_vocab": "", "peak_tflops": "312", "mfu": "0.35", "scaling": "0.9", "decode_per_s": ""}
    )
    from fastslow.bill import DATASETS, GpuModel, bill, decode_rate
    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    configure_threads(cfg.num_threads)
    if cfg.recipe not in DATASETS:
        raise SystemExit(f"recipe={cfg.recipe}: the bill knows the real datasets {', '.join(DATASETS)}")
    gpu = GpuModel(peak_flops=float(own["peak_tflops"]) * 1e12, mfu=float(own["mfu"]), scaling=float(own["scaling"]))
    vocab = int(own["tokenizer_vocab"]) if own["tokenizer_vocab"] else None
    decode = None  # video recipes read precomputed clip features: nothing to decode
    if cfg.data.dataset != "vatex":
        decode = float(own["decode_per_s"]) if own["decode_per_s"] else decode_rate(int(cfg.data.image_size))
    b = bill(cfg, DATASETS[cfg.recipe], gpu, vocab_size=vocab, decode_per_s=decode)
    base = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir
    out = base / "bench" / "scaling_bill.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, b)
    print(table(b))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
