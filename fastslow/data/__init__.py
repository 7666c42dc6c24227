"""Data: retrieval splits read from Karpathy / VATEX files, file loaders, datasets and the collate function.

`fastslow.data.shapes` (the built-in generator) is imported on its own: ``from fastslow.data.shapes import ...``.
"""

from fastslow.data.datasets import (
    ON_ERROR,
    PairDataset,
    RetrievalSplit,
    SkipCounter,
    VisualDataset,
    collate,
    report_skipped,
)
from fastslow.data.karpathy import KARPATHY_SPLITS, load_karpathy
from fastslow.data.loaders import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    INTERPOLATIONS,
    AugmentingImageLoader,
    FeatureLoader,
    ImageLoader,
    fit_frames,
    read_features,
    read_image_rgb,
    resize_center_crop,
    resolve_image_config,
    swap_left_right,
    to_rgb,
)
from fastslow.data.skips import SKIP_FILE, SkipLedger, captions_per_path, gather_ledger, reason_of
from fastslow.data.vatex import VATEX_N_VAL, load_vatex, read_split_file, read_vatex_ids, vatex_retrieval_split
from fastslow.errors import DataError

__all__ = [
    "ON_ERROR",
    "DataError",
    "RetrievalSplit",
    "PairDataset",
    "VisualDataset",
    "collate",
    "report_skipped",
    "SkipCounter",
    "SKIP_FILE",
    "SkipLedger",
    "captions_per_path",
    "gather_ledger",
    "reason_of",
    "KARPATHY_SPLITS",
    "load_karpathy",
    "VATEX_N_VAL",
    "load_vatex",
    "read_vatex_ids",
    "read_split_file",
    "vatex_retrieval_split",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "INTERPOLATIONS",
    "ImageLoader",
    "AugmentingImageLoader",
    "swap_left_right",
    "resolve_image_config",
    "FeatureLoader",
    "read_image_rgb",
    "to_rgb",
    "resize_center_crop",
    "read_features",
    "fit_frames",
]
