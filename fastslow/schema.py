"""The typed schema of a recipe: one dataclass per section, enums for modes, a range beside each number.

`fastslow.config.load_recipe` merges `recipes/base.yaml` and `recipes/NAME.yaml` into
`OmegaConf.structured(RecipeConfig)`, so every key a recipe may hold is declared here once, with its type
(`T | None` where null is allowed) and its range (`ge` / `gt` / `le` in the field's metadata, checked
by the loader after the overrides and the interpolations). The values live in the YAML files: a field
without a default (`MISSING`) must be set by `recipes/base.yaml`, so base.yaml stays the one documented
place for defaults and this file the one place for types. A key added to base.yaml must be added here
too (the loader names the dataclass to edit).

Modes are str enums whose member names equal their values, because OmegaConf converts a string to an
enum member by name. A member compares and hashes equal to its string (`cfg.loss.distill == "swap"`,
`mode in ("listwise", "group")`), prints as it (`f"{mode}"`), and is saved as it (`save_config`); builders
receive plain strings (`to_kwargs`). The library modules keep their own tuples of valid values (they
are importable without a recipe); `tests/test_config.py` checks that each enum here equals its tuple.

Importing this module must stay cheap (no torch): the tools load the recipe before the heavy imports.
"""

from __future__ import annotations

from dataclasses import MISSING as _DC_MISSING
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING


class Mode(str, Enum):
    """A str enum that prints as its value (`enum.StrEnum` is Python >= 3.11; the project supports 3.10)."""

    __str__ = str.__str__
    __format__ = str.__format__


def _modes(name: str, values: list[str]) -> type[Mode]:
    # The functional form, because `raise` cannot be a member name in a class body; names = values.
    return Mode(name, [(v, v) for v in values])  # type: ignore[return-value]


Dataset = _modes("Dataset", ["shapes", "karpathy", "shapes_video", "vatex"])  # fastslow.stages *_DATASETS
OnError = _modes("OnError", ["raise", "skip"])  # fastslow.data on_error
Split = _modes("Split", ["train", "val", "test"])  # fastslow.data.karpathy KARPATHY_SPLITS
CrossAttn = _modes("CrossAttn", ["gradual", "coarse", "fine"])  # teachers.captioner _CROSS_ATTN
TextPool = _modes("TextPool", ["mean", "first"])  # students.dual_encoder TextTower
VideoPool = _modes("VideoPool", ["mean", "cls"])  # students.dual_encoder VideoTower
Distill = _modes("Distill", ["none", "swap", "inbatch", "listwise", "group"])  # fastslow.distill DISTILL_MODES
TeacherNorm = _modes("TeacherNorm", ["length", "sum", "zscore"])  # fastslow.losses TEACHER_NORMS
IndexKind = _modes("IndexKind", ["flat", "ivf", "ivfpq", "hnsw"])  # fastslow.index KINDS
CombinerMode = _modes("CombinerMode", ["slow", "fuse"])  # fastslow.combiner MODES
Interpolation = _modes(
    "Interpolation", ["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
)  # fastslow.data INTERPOLATIONS


def key(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    default_factory: Any = _DC_MISSING,
) -> Any:
    """A dataclass field with its allowed range (for a list: of every entry); `MISSING`: base.yaml sets it."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    if default_factory is not _DC_MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class AugmentConfig:
    """`data.augment`: the training loader of image datasets (`fastslow.data.AugmentingImageLoader`). Off for the
    built-in shapes (a crop can cut an object out of a caption; its minimal pairs hinge on exact layouts) and
    for video (clip features); on for real photos (flickr, coco). Evaluation is never augmented."""

    enabled: bool = False  # false: training reads items exactly as evaluation does
    # Area fraction and aspect ratio of the random crop (BLIP / ALBEF fine-tune with area (0.5, 1)).
    crop_scale: list[float] = key(default_factory=lambda: [0.5, 1.0], gt=0, le=1)
    crop_ratio: list[float] = key(default_factory=lambda: [0.75, 1.3333], gt=0)
    color_jitter: float = key(0.4, ge=0)  # brightness / contrast / saturation strength; 0: off
    # Probability of a horizontal flip, which swaps "left" and "right" in the caption (fastslow.data.swap_left_right);
    # 0: never flip.
    hflip: float = key(0.5, ge=0, le=1)


@dataclass
class DataConfig:
    """`data`: the dataset reader and its files. Below `num_workers`, keys only some datasets read
    (null elsewhere; the loader requires them for their datasets and rejects them for the others)."""

    dataset: Dataset = MISSING
    root: str = MISSING
    on_error: OnError = MISSING
    max_length: int = key(ge=3)  # BOS + at least one token + EOS
    max_captions: int | None = key(ge=1)
    # val / test only: the first N captions of each item in file order, applied after max_captions. The standard
    # protocols score 5 per image (COCO 5k test: 25,000 captions; the file holds 25,010, some images having 6 or 7).
    eval_captions: int | None = key(None, ge=1)
    # video datasets: a JSON {"val": [...], "test": [...], "train"?: [...]} of videoIDs (the published lists of the
    # common VATEX retrieval split, so figures compare with papers); null: the official val file cut in its order.
    split_file: str | None = None
    num_workers: int = key(ge=0)
    # image datasets (shapes, karpathy)
    ann_file: str | None = None  # the Karpathy split file
    image_dir: str | None = None
    image_size: int | None = key(None, ge=8)
    # video datasets (shapes_video, vatex)
    ann_train: str | None = None  # vatex_training_v1.0.json
    ann_val: str | None = None  # vatex_validation_v1.0.json (cut into val / test)
    feature_dir: str | None = None  # one <videoID>.npy per video
    feature_dim: int | None = key(None, ge=1)
    max_frames: int | None = key(None, ge=1)
    n_val: int | None = key(None, ge=1)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # generated datasets: the generator's keyword arguments, checked against ShapesGenerate /
    # ShapesVideoGenerate below (a typed Union of sections is not something OmegaConf supports)
    generate: dict[str, Any] | None = None


# Keys each dataset reads beyond the shared ones (the loader requires exactly these of the optional ones).
DATASET_KEYS: dict[str, tuple[str, ...]] = {
    "shapes": ("ann_file", "image_dir", "image_size", "generate"),
    "karpathy": ("ann_file", "image_dir", "image_size"),
    "shapes_video": ("ann_train", "ann_val", "feature_dir", "feature_dim", "max_frames", "n_val", "generate"),
    "vatex": ("ann_train", "ann_val", "feature_dir", "feature_dim", "max_frames", "n_val"),
}


@dataclass
class TokenizerConfig:
    path: str | None = MISSING  # a local HF tokenizer dir; null: trained on the train captions
    vocab_size: int = key(ge=5)  # 4 special tokens + at least one piece


@dataclass
class TeacherTokenizerConfig:
    """`teacher.tokenizer`: the teacher's own tokenizer, apart from the student's (`tokenizer`). Its vocabulary is
    the captioner's softmax at every position in both directions: a student with a BERT tower needs BERT's 30k
    vocabulary, the teacher does not (docs/SCALING.md). Settings equal to the student's share its file."""

    # A local HF tokenizer (a dir holding tokenizer.json / vocab.txt); null: the tokenizer of
    # teacher.text_pretrained_path when that is set, else one trained on the train captions.
    path: str | None = MISSING
    vocab_size: int = key(ge=5)  # of the one trained on the captions (base.yaml: ${tokenizer.vocab_size})


@dataclass
class TeacherConfig:
    """`teacher`: a registry name (`teachers.list_teachers()`) and `CaptionerConfig` fields (null: default);
    `tokenizer` is read by fastslow.stages, not by the builder."""

    name: str = MISSING
    tokenizer: TeacherTokenizerConfig = field(default_factory=TeacherTokenizerConfig)
    cross_attn: CrossAttn | None = MISSING
    directions: int | None = key(ge=1, le=2)
    pretrained_path: str | None = MISSING
    # A local BERT-family HF directory that starts the text decoder (BLIP-style; its size decides the decoder's and
    # its tokenizer becomes the teacher's unless teacher.tokenizer.path is set); null: a decoder from scratch.
    text_pretrained_path: str | None = MISSING
    # The image loader feeding the teacher; null: its backbone's own (timm.data.resolve_model_data_config), so a
    # pretrained backbone sees pixels normalised as in its training. Three values each (RGB, in [0, 1] units).
    image_mean: list[float] | None = key(None, ge=0, le=1)
    image_std: list[float] | None = key(None, gt=0)
    image_interpolation: Interpolation | None = None


@dataclass
class StudentConfig:
    """`student`: a registry name (`students.list_students()`) and `DualEncoderConfig` fields (null: default)."""

    name: str = MISSING
    embed_dim: int | None = key(ge=1)
    image_global_pool: str | None = MISSING  # timm's pool names (avg, token, ...), flatten or attn: timm checks them
    image_output_stride: int | None = key(ge=8, le=32)
    text_pool: TextPool | None = MISSING
    video_pool: VideoPool | None = MISSING
    video_frame_diff: bool | None = MISSING
    image_pretrained_path: str | None = MISSING
    text_pretrained_path: str | None = MISSING
    # The image loader feeding the student (as teacher.image_*): null = its backbone's (ViT-B/16: mean / std 0.5).
    image_mean: list[float] | None = key(None, ge=0, le=1)
    image_std: list[float] | None = key(None, gt=0)
    image_interpolation: Interpolation | None = None
    # Warm start: the directory of a trained student (tools/distill.py's ${output_dir}/student, e.g. a VMLM / SMRM
    # pre-training run) whose weights initialise this one; it must be a student of the same architecture and
    # tokenizer (fastslow.stages.init_student_from names what differs). null: random / pretrained-path init.
    init_from: str | None = None


@dataclass
class LossConfig:
    """`loss`: read by tools/distill.py (fastslow.distill.DistillObjective, fastslow.losses)."""

    contrastive_weight: float = key(ge=0)
    distill: Distill = MISSING
    distill_weight: float = key(ge=0)
    teacher_norm: TeacherNorm = MISSING
    teacher_temperature: float = key(gt=0)
    student_temperature: float | None = key(gt=0)
    group_size: int = key(ge=2)  # an anchor and at least one neighbour
    mine_start: int = key(ge=0)
    denoise_margin: float | None = key(ge=0)
    margin_mse_weight: float = key(ge=0)
    swaps: int = key(ge=0)
    swap_rows: int | None = key(ge=1)
    swap_similarity: float | None = key(ge=-1, le=1)  # a cosine similarity
    swap_weight: float = key(ge=0)
    oracle: bool = MISSING
    inbatch_rows: int | None = key(ge=1)
    listwise_k: int = key(ge=1)
    mine_every: int = key(ge=1)
    listwise_fresh_positive: bool = MISSING
    # Several processes: InfoNCE and the in-batch KL over every process's rows (gathered with gradients), so the
    # loss and its gradient are those of one process given the global batch. true by default: the figures then do
    # not change with the GPU count; on one process it does nothing.
    gather: bool = True
    # LightningDOT's auxiliary objectives (students.aux_heads): 0 = off, no head built and no masked pass run, so the
    # default costs nothing; the heads are trained here and never exported with the student.
    vmlm_weight: float = key(0.0, ge=0)  # masked words predicted from the text tower + the item's pooled embedding
    smrm_weight: float = key(0.0, ge=0)  # masked patches / frames regressed from the visual tower + the caption's
    # Share of each caption's words / each item's patches or real frames masked: BERT's and LightningDOT's 15 %.
    # In (0, 1]: 0 would mask nothing (set the weight to 0 instead).
    vmlm_mask_ratio: float = key(0.15, gt=0, le=1)
    smrm_mask_ratio: float = key(0.15, gt=0, le=1)


@dataclass
class TrainSection:
    """`train` and `teacher_train`: the fields of `fastslow.trainer.TrainConfig`."""

    max_steps: int = key(ge=1)
    batch_size: int = key(ge=1)  # per process, per micro-step
    lr: float = key(gt=0)
    weight_decay: float = key(ge=0)
    warmup_steps: int = key(ge=0)
    grad_accum: int = key(ge=1)
    clip_grad: float = key(ge=0)  # 0 disables clipping
    save_every: int = key(ge=1)
    keep_last: int = key(ge=1)
    resume: str = MISSING  # auto | none | an existing checkpoint directory (checked by the loader)
    log_every: int = key(ge=1)
    eval_every: int = key(ge=0)  # 0: only at the end


@dataclass
class IndexConfig:
    kind: IndexKind = MISSING
    nlist: int | None = key(ge=1)
    nprobe: int = key(ge=1)
    pq_m: int = key(ge=1)
    hnsw_m: int = key(ge=2)
    ef_search: int = key(ge=1)
    batch_size: int = key(ge=1)


@dataclass
class CombinerConfig:
    mode: CombinerMode = MISSING
    k: int = key(ge=1)
    alpha: float | None = key(ge=0, le=1)  # teacher weight of fuse; null: tuned on val
    adaptive_margin: float | None = key(ge=0)
    adaptive_k_min: int = key(ge=1)
    min_gain: float = key(ge=0)  # R@1 points fusion must gain on val over the student alone, else alpha = 0


@dataclass
class EvalConfig:
    split: Split = MISSING
    k: list[int] = key(ge=1)  # every depth >= 1, at least one
    max_gallery: int = key(ge=0)
    # Validation during training on a fixed sample of this many val items (all their captions; the same items in
    # every run): the teacher ranks every val pair, 125M for COCO's 5k val. null: every val item.
    val_items: int | None = key(None, ge=1)
    text_batch: int = key(ge=1)
    latency_queries: int = key(ge=1)


@dataclass
class ServeConfig:
    """`serve`: tools/serve.py (fastslow.service.create_app). Concurrent queries are gathered into one model call;
    these bound how long a query waits for company, how big a call gets and how many queries may wait."""

    # How long the first waiting query waits for others before its batch runs. A few ms costs a lone query little
    # and, under load, lets one student / teacher call carry many queries (queries that arrive while a call runs
    # form the next batch anyway).
    max_wait_ms: float = key(5.0, ge=0, le=10_000)
    max_batch: int = key(64, ge=1)  # queries per model call, at most (memory: max_batch x k teacher pairs)
    # Queries waiting beyond the running call; more get 503 with Retry-After instead of an unbounded backlog.
    queue_size: int = key(256, ge=1)
    max_k: int = key(100, ge=1)  # the largest k a request may ask for (the teacher scores k pairs per query)
    # Longer queries are refused (400); a query within it but over data.max_length tokens is cut and said so.
    max_query_chars: int = key(1000, ge=1)


@dataclass
class RecipeConfig:
    """A whole recipe: `recipes/base.yaml` merged under `recipes/NAME.yaml`."""

    recipe: str = MISSING
    output_dir: str = MISSING
    seed: int = key(ge=0)
    num_threads: int = key(ge=0)  # 0: cores / processes
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSection = field(default_factory=TrainSection)
    teacher_train: TrainSection = field(default_factory=TrainSection)
    index: IndexConfig = field(default_factory=IndexConfig)
    combiner: CombinerConfig = field(default_factory=CombinerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# ------------------------------------------------------------------- data.generate, per generated dataset
# The keyword arguments of fastslow.data.shapes.generate_shapes / generate_shapes_video, with their
# defaults (a recipe sets any subset); a test binds names, types and defaults to the signatures.
@dataclass
class ShapesGenerate:
    seed: int = key(0, ge=0)
    n_train: int = key(6000, ge=1)
    n_val_groups: int = key(50, ge=1)
    n_test_groups: int = key(100, ge=1)
    group_size: int = key(4, ge=1)
    image_size: int = key(64, ge=8)
    captions_per_image: int = key(5, ge=1)
    test_captions_per_image: int = key(2, ge=1)
    partial_caption_frac: float = key(0.4, ge=0, le=1)
    train_minimal_pairs: bool = False
    n_objects: list[int] = key(default_factory=lambda: [2, 4], ge=1)
    noise: float = key(0.0, ge=0)


@dataclass
class ShapesVideoGenerate:
    seed: int = key(0, ge=0)
    n_train: int = key(4000, ge=1)
    n_val_groups: int = key(25, ge=1)
    n_test_groups: int = key(50, ge=1)
    group_size: int = key(4, ge=1)
    n_frames: list[int] = key(default_factory=lambda: [8, 16], ge=1)
    feature_dim: int = key(256, ge=1)
    frame_size: int = key(32, ge=4)
    partial_caption_frac: float = key(0.5, ge=0, le=1)
    two_object_frac: float = key(0.5, ge=0, le=1)
    train_minimal_pairs: bool = False
    noise: float = key(2.0, ge=0)


GENERATORS: dict[str, type] = {"shapes": ShapesGenerate, "shapes_video": ShapesVideoGenerate}
