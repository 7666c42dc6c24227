"""The bill of a recipe on real data, on paper: items, bytes of every store, teacher pairs, FLOPs, GPU-hours.

Nothing here reads a dataset or trains: the real-size models of the recipe are built with random weights (no
download) and each unit of work (one item through a visual tower, one text through the text tower, one teacher
pair) is run once under `torch.utils.flop_counter.FlopCounterMode`, so the FLOPs are those of *our* code at the
recipe's sizes, not a formula that could drift from it. Byte counts come from the stores' own layouts (fp16 teacher
tokens, fp32 embeddings) and, for the score cache, from a SQLite cache filled by the real `TeacherScoreCache`.
Everything else (the dataset sizes, the GPU's peak rate and the utilisation reached) is an input, named in the
output, because it is an assumption: `benchmarks/scaling_bill.py` prints it beside every figure.

Counted: matmuls, convolutions and attention (attention runs through the math kernel while counting, so its
batched matmuls are seen whatever kernel the device would pick). Not counted: element-wise ops, norms, softmax
(a few % of a transformer's work), data loading and JPEG decoding (often the real bound of a run on real images:
see docs/SCALING.md).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "DatasetSize",
    "DATASETS",
    "GpuModel",
    "count_flops",
    "unit_costs",
    "score_cache_bytes_per_pair",
    "bill",
    "decode_rate",
]


@dataclass(frozen=True)
class DatasetSize:
    """What a recipe's real dataset holds (the published splits; approximate caption lengths).

    caption_tokens: mean tokens per caption with BOS and EOS, the length the per-text FLOPs are counted at.
    """

    name: str
    train_items: int
    val_items: int
    test_items: int
    captions_per_item: int
    caption_tokens: int


# The standard retrieval splits. Flickr30K and COCO: Karpathy's split files (COCO train includes restval);
# test protocols are Flickr 1k and COCO 5k with 5 captions per image. VATEX: the 25,991 training videos with 10
# English captions each, and 1,500 + 1,500 of the official validation videos (fastslow.data.vatex_retrieval_split).
# Caption lengths are the datasets' mean words (Flickr ~12, COCO ~10.5, VATEX ~15) plus BOS/EOS and word pieces.
DATASETS: dict[str, DatasetSize] = {
    "flickr": DatasetSize("Flickr30K (Karpathy)", 29_000, 1_014, 1_000, 5, 16),
    "coco": DatasetSize("COCO (Karpathy)", 113_287, 5_000, 5_000, 5, 14),
    "vatex": DatasetSize("VATEX (en)", 25_991, 1_500, 1_500, 10, 19),
}


@dataclass(frozen=True)
class GpuModel:
    """Seconds for a number of FLOPs: peak rate times the share of it a run reaches (an assumption; say so)."""

    name: str = "A100 (bf16 dense)"
    peak_flops: float = 312e12
    mfu: float = 0.35  # model FLOPs utilisation; 30-45% is what well-tuned mixed-precision training reports
    scaling: float = 0.9  # efficiency of 8 data-parallel GPUs against 8x one (gradient all-reduce, stragglers)

    def hours(self, flops: float, gpus: int = 1) -> float:
        rate = self.peak_flops * self.mfu * (gpus if gpus == 1 else gpus * self.scaling)
        return flops / rate / 3600.0


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (no grad), with attention through the math kernel so it is counted."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _models(cfg: DictConfig, vocab_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    from fastslow.stages import build_student, build_teacher

    # The builders only ask the tokenizer for its vocabulary size; the bill needs no trained tokenizer.
    tok = SimpleNamespace(vocab_size=vocab_size)
    teacher, student = build_teacher(cfg, tok), build_student(cfg, tok)
    return teacher.eval(), student.eval()


def _text(n: int, length: int, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (n, length), generator=g)
    return ids, torch.ones(n, length, dtype=torch.long)


def unit_costs(cfg: DictConfig, caption_tokens: int, vocab_size: int | None = None) -> dict[str, Any]:
    """FLOPs of each unit of work at the recipe's model sizes, and the shapes of what the stores hold per item.

    Returns a dict with: teacher_visual (one item through the teacher's visual side), teacher_pair_loss (one aligned
    pair through the bi-directional captioning loss, both directions, forward), teacher_pair_rerank (one candidate of
    a query's k=20, both directions), teacher_pair_swap (one of a caption's 1 + loss.swaps scored texts),
    student_visual, student_text, student_pair (the dot product), visual_tokens / token_dim / has_mask (one item's
    teacher tokens), embed_dim, vocab_size, caption_tokens.
    """
    from fastslow.stages import modality

    vocab = int(vocab_size or cfg.tokenizer.vocab_size)
    L = min(int(caption_tokens), int(cfg.data.max_length))
    teacher, student = _models(cfg, vocab)
    if modality(cfg) == "image":
        s = int(cfg.data.image_size)
        x, xmask = torch.randn(1, 3, s, s), None
        student_visual = count_flops(lambda: student.encode_image(x))
    else:
        t = int(cfg.data.max_frames)
        x, xmask = torch.randn(1, t, int(cfg.data.feature_dim)), torch.ones(1, t, dtype=torch.bool)
        student_visual = count_flops(lambda: student.encode_video(x, xmask))
    teacher_visual = count_flops(lambda: teacher.encode_visual(x, xmask))
    with torch.no_grad():
        one = teacher.encode_visual(x, xmask)
    ids, mask = _text(1, L, vocab)
    k, swaps = 20, int(cfg.loss.swaps) + 1

    def batch_of(n: int):
        return one[[0] * n]

    pair_loss = count_flops(lambda: teacher.loss(batch_of(4), *_text(4, L, vocab))) / 4
    rerank = count_flops(lambda: teacher.score(batch_of(k), ids, mask)) / k
    swap = count_flops(lambda: teacher.score(batch_of(1), *_text(swaps, L, vocab))) / swaps
    embed_dim = int(student.encode_text(ids, mask).shape[-1])
    return {
        "teacher_visual": teacher_visual,
        "teacher_pair_loss": pair_loss,
        "teacher_pair_rerank": rerank,
        "teacher_pair_swap": swap,
        "student_visual": student_visual,
        "student_text": count_flops(lambda: student.encode_text(ids, mask)),
        "student_pair": 2 * embed_dim,
        "visual_tokens": int(one.tokens.shape[1]),
        "token_dim": int(one.tokens.shape[2]),
        "has_mask": one.mask is not None,
        "embed_dim": embed_dim,
        "vocab_size": vocab,
        "caption_tokens": L,
    }


def score_cache_bytes_per_pair(pairs: int = 20_000) -> float:
    """Bytes per cached teacher score, measured: `pairs` scores written to a real `TeacherScoreCache`."""
    from fastslow.score_cache import TeacherScoreCache

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        cache = TeacherScoreCache(d, teacher_hash="bill", source="bill", dataset_hash="bill", n_items=10**6)
        # Spread keys the way distillation writes them: many texts, a few items each.
        cache.add(rng.integers(0, 10**6, pairs), rng.integers(0, 10**6, pairs), rng.standard_normal(pairs))
        cache.close()
        size = sum(p.stat().st_size for p in Path(d).iterdir())
    return size / pairs


def bill(
    cfg: DictConfig,
    data: DatasetSize,
    gpu: GpuModel = GpuModel(),
    vocab_size: int | None = None,
    decode_per_s: float | None = None,
) -> dict:
    """The whole bill of `cfg` on `data`: per-unit FLOPs, store bytes, teacher pairs per epoch, stage GPU-hours.

    Training FLOPs are 3x the forward (forward + backward). Stages are costed for the recipe's own schedule
    (teacher_train.max_steps and train.max_steps at the per-process batch size, as one process runs it; on 8 GPUs
    the same samples take 1/8 of the steps, which is what the 8-GPU column assumes). With `decode_per_s` (images
    one loader worker decodes per second), image stages also get `loader_hours_1`: the hours that
    `data.num_workers` workers of one process need to decode the stage's images, the bound when it exceeds the
    GPU-hours.
    """
    u = unit_costs(cfg, data.caption_tokens, vocab_size)
    captions = data.train_items * data.captions_per_item
    test_queries = data.test_items * data.captions_per_item
    item_token_bytes = u["visual_tokens"] * u["token_dim"] * 2 + (u["visual_tokens"] if u["has_mask"] else 0)
    emb_bytes = u["embed_dim"] * 4
    swaps = int(cfg.loss.swaps) if cfg.loss.distill == "swap" else 0
    B = int(cfg.train.batch_size)
    rows = B if cfg.loss.swap_rows is None else min(int(cfg.loss.swap_rows), B)
    # Upper bound: every swapped row scores its caption and `swaps` copies (captions with fewer swappable word
    # pairs get fewer; on shapes 2.6 of 5 per caption were scored, docs/BENCHMARKS.md).
    pairs_per_step = rows * (swaps + 1) if swaps else 0
    steps_per_epoch = math.ceil(captions / B)
    pairs_per_epoch = pairs_per_step * steps_per_epoch
    cache_bpp = score_cache_bytes_per_pair()
    k = min(int(cfg.combiner.k), data.test_items)  # the combiner clamps k to the gallery

    TB = int(cfg.teacher_train.batch_size)
    teacher_step = 3 * TB * (u["teacher_visual"] + u["teacher_pair_loss"])
    distill_step = 3 * B * u["student_visual"] + 3 * (B + rows * swaps) * u["student_text"]
    distill_step += pairs_per_step * u["teacher_pair_swap"]  # teacher forward only; its tokens come from the store
    gallery = data.test_items
    all_items = data.train_items + data.val_items + data.test_items
    # (stage, FLOPs, images decoded)
    stages = [
        ("train teacher", int(cfg.teacher_train.max_steps) * teacher_step, int(cfg.teacher_train.max_steps) * TB),
        ("teacher token store (train + val + test)", all_items * u["teacher_visual"], all_items),
        ("distill student", int(cfg.train.max_steps) * distill_step, int(cfg.train.max_steps) * B),
        ("build index (test gallery)", gallery * u["student_visual"], gallery),
        (f"rerank test queries (fast+slow@{k})",
         test_queries * (u["student_text"] + gallery * u["student_pair"] + k * u["teacher_pair_rerank"]), 0),
        ("slow over the whole test gallery", test_queries * gallery * u["teacher_pair_rerank"], 0),
    ]  # fmt: skip
    from fastslow.stages import modality

    workers = max(int(cfg.data.num_workers), 1)
    decode = decode_per_s if modality(cfg) == "image" else None  # video reads precomputed features
    return {
        "recipe": str(cfg.recipe),
        "dataset": asdict(data),
        "models": {"teacher": str(cfg.teacher.name), "student": str(cfg.student.name)},
        "gpu": asdict(gpu),
        "units": u,
        "counts": {
            "train_captions": captions,
            "test_queries": test_queries,
            "distill_steps_per_epoch": steps_per_epoch,
            "teacher_pairs_per_step": pairs_per_step,
            "teacher_pairs_per_epoch": pairs_per_epoch,
            "slow_pairs_full_test": test_queries * gallery,
        },
        "bytes": {
            "teacher_tokens_per_item": item_token_bytes,
            "teacher_token_store_train": data.train_items * item_token_bytes,
            "teacher_token_store_test": gallery * item_token_bytes,
            "student_embeddings_test": gallery * emb_bytes,
            "faiss_flat_index_test": gallery * emb_bytes,
            "score_cache_per_pair": round(cache_bpp, 1),
            "score_cache_per_epoch": int(pairs_per_epoch * cache_bpp),
        },
        "decode_images_per_s_per_worker": decode,
        "stages": [
            {
                "stage": name,
                "flops": float(f),
                "gpu_hours_1": gpu.hours(f),
                "wall_hours_8": gpu.hours(f, 8),
                "images": images if modality(cfg) == "image" else 0,
                "loader_hours_1": images / (decode * workers) / 3600.0 if decode and images else None,
            }
            for name, f, images in stages
        ],
    }


def decode_rate(image_size: int, seconds: float = 2.0) -> float:
    """Images per second one thread decodes and resizes with our `ImageLoader`: a generated 500x375 JPEG (the size of
    a Flickr30K photo; COCO's 640x480 measured the same here thanks to draft-mode decoding), quality 90."""
    import time

    from PIL import Image, ImageFilter

    from fastslow.data.loaders import ImageLoader

    rng = np.random.default_rng(0)
    coarse = np.kron(rng.random((48, 63, 3)), np.ones((8, 8, 1)))[:375, :500]  # photo-like: smooth regions + grain
    pixels = (coarse * 200 + rng.random((375, 500, 3)) * 55).astype("uint8")
    loader = ImageLoader(image_size)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "photo.jpg"
        Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1)).save(path, quality=90)
        loader(path)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            loader(path)
            n += 1
        return n / (time.perf_counter() - t0)
