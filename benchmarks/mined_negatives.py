"""How many of the student's mined "negatives" are really positives, and does the teacher see it?

    python benchmarks/mined_negatives.py recipe=shapes student=runs/shapes/student
    python benchmarks/mined_negatives.py recipe=shapes student=runs/shapes/student margins=0,1,2,4 texts=3000

The built-in shapes data knows which caption is true of which scene (`fastslow.data.shapes.GroundTruth`).
A trained student mines each of `texts` random training captions' top-K items (K = loss.listwise_k,
its own item removed), as the group batches do; the teacher (${output_dir}/teacher) scores the pairs.
Reported: the share of mined pairs that are true matches (false negatives for one-hot InfoNCE), how
well the teacher ranks (a true match above a true non-match, on the mined pairs of one caption), and for
each denoising margin (loss.denoise_margin, in loss.teacher_norm units) the recall (false negatives
dropped) and the share of true negatives wrongly dropped. JSON to ${output_dir}/bench/mined_negatives.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import ROOT, split_own


def main() -> None:
    own, overrides = split_own(sys.argv[1:], {"student": "", "margins": "0,0.5,1,2,4", "texts": "2000"})
    from fastslow.config import load_recipe
    from fastslow.runtime import configure_threads

    cfg = load_recipe(overrides)
    configure_threads(cfg.num_threads)
    import numpy as np
    import torch

    from fastslow import stages
    from fastslow.data.shapes import GroundTruth
    from fastslow.distill import TeacherPairScorer
    from fastslow.evaluation import encode_items_student, encode_texts_student
    from fastslow.losses import teacher_logits
    from fastslow.mining import mine_hard_negatives

    base = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir
    student_dir = Path(own["student"] or base / "student")
    train, load_visual = stages.load_split(cfg, "train"), stages.visual_loader(cfg)
    meta = Path(cfg.data.root) / ("shapes_meta.json" if cfg.data.dataset == "shapes" else "shapes_video_meta.json")
    truth = GroundTruth(meta, train.item_ids, train.text_to_visual)
    student, _, tok = stages.load_trained(student_dir, "student")
    teacher, _, ttok = stages.load_trained(base / "teacher", "teacher")  # the teacher reads texts with its own

    rng = np.random.default_rng(0)
    texts = np.sort(rng.choice(train.n_texts, size=min(int(own["texts"]), train.n_texts), replace=False))
    k = cfg.loss.listwise_k
    items = encode_items_student(student, train, load_visual)
    emb = encode_texts_student(student, tok, [train.captions[i] for i in texts], max_length=cfg.data.max_length)
    positives = torch.as_tensor(train.text_to_visual)[torch.as_tensor(texts)]
    mined = mine_hard_negatives(emb, items, positives, k)  # [Q, K]

    scorer = TeacherPairScorer(
        teacher, stages.weights_hash(base / "teacher" / "model.safetensors"), train, load_visual, ttok,
        cfg.data.max_length, base / "cache" / "teacher_tokens_train",
    )  # fmt: skip
    cand = torch.cat([positives[:, None], mined], dim=1)  # [Q, K+1], positive first
    rows = torch.as_tensor(texts)[:, None].expand_as(cand)
    raw = scorer(rows.flatten(), cand.flatten()).view(cand.shape)
    n_tokens = ttok.encode([train.captions[i] for i in texts], cfg.data.max_length)[1].sum(1) - 1
    logits = teacher_logits(raw, n_tokens, norm=cfg.loss.teacher_norm, directions=teacher.config.directions)
    fits = torch.from_numpy(truth.fits(rows[:, 1:].flatten().tolist(), mined.flatten().tolist())).view(mined.shape)

    fn_share = fits.float().mean().item()
    # Teacher ranking on the mined lists: P(true match scored above true non-match), over mixed rows.
    wins, pairs = 0, 0
    for r in range(len(texts)):
        pos_s = torch.cat([logits[r, :1], logits[r, 1:][fits[r]]])
        neg_s = logits[r, 1:][~fits[r]]
        if len(neg_s):
            wins += (pos_s[:, None] > neg_s[None, :]).sum().item()
            pairs += len(pos_s) * len(neg_s)
    out = {
        "student": str(student_dir), "texts": len(texts), "k": k, "teacher_norm": cfg.loss.teacher_norm,
        "false_negative_share": fn_share, "teacher_pairwise_accuracy": wins / max(pairs, 1), "margins": [],
    }  # fmt: skip
    print(f"\n{len(texts)} training captions x top-{k} mined items (student {student_dir})\n")
    print(f"- mined pairs that are true matches (false negatives for one-hot InfoNCE): {100 * fn_share:.1f}%")
    print(f"- teacher ranks a true match above a true non-match: {100 * out['teacher_pairwise_accuracy']:.1f}%\n")
    print("| denoise margin | false negatives dropped | true negatives dropped | mined pairs kept as negatives |")
    print("|---:|---:|---:|---:|")
    for m in (float(x) for x in own["margins"].split(",")):
        dropped = logits[:, 1:] >= logits[:, :1] - m
        recall = (dropped & fits).sum().item() / max(fits.sum().item(), 1)
        wrong = (dropped & ~fits).sum().item() / max((~fits).sum().item(), 1)
        kept = (~dropped).float().mean().item()
        out["margins"].append({"margin": m, "fn_dropped": recall, "tn_dropped": wrong, "kept": kept})
        print(f"| {m:g} | {100 * recall:.1f}% | {100 * wrong:.1f}% | {100 * kept:.1f}% |")
    path = base / "bench" / "mined_negatives.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
