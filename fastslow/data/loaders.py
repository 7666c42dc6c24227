"""Turn one file into model input: `ImageLoader` (image -> normalised pixels), `FeatureLoader` (.npy -> clip features).

Both are picklable callables ``path -> visual`` handed to `PairDataset` / `VisualDataset`, so they run in
DataLoader worker processes. Anything wrong with a file raises `fastslow.errors.DataError` naming the file,
which the datasets either propagate or record, depending on ``on_error``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fastslow.errors import DataError

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "INTERPOLATIONS",
    "ImageLoader",
    "AugmentingImageLoader",
    "swap_left_right",
    "FeatureLoader",
    "resolve_image_config",
    "read_image_rgb",
    "to_rgb",
    "resize_center_crop",
    "read_features",
    "fit_frames",
]

# Same values as timm.data.IMAGENET_DEFAULT_*; copied so that loading data does not import timm.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# PIL resampling filters by timm's names (`timm.data.resolve_model_data_config` reports one of these).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")

_SKIP_HINT = "replace the file or set data.on_error=skip to drop it"
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# --------------------------------------------------------------------------------------------- images


class ImageLoader:
    """Load an image file as a normalised ``[3, S, S]`` float tensor.

    Steps: decode with PIL (truncated files are errors, whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says),
    apply the EXIF orientation, convert any mode to RGB (`to_rgb`), resize the shorter side to S with
    the backbone's (antialiased) resampling filter and take the centre S x S crop (`resize_center_crop`; the
    usual evaluation transform of pretrained backbones: no distortion of the aspect ratio, the centre of the
    scene kept), then ``(x / 255 - mean) / std``. Size, mean / std and filter come from the model the pixels
    feed (`resolve_image_config`), so a ViT trained on mean / std 0.5 is not handed ImageNet-normalised pixels.

    JPEGs are decoded with PIL's draft mode (DCT-domain downscaling by 1/2, 1/4 or 1/8, never below S on
    either side), which makes decoding COCO-sized photos for S=224 several times faster.

    Args:
        image_size: S, the output height and width.
        mean: per-channel mean of the backbone (RGB, in [0, 1]).
        std: per-channel standard deviation of the backbone.
        interpolation: the resampling filter, one of `INTERPOLATIONS` (timm's names).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str = "bicubic",
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean={tuple(mean)}, std={tuple(std)}: expected 3 values each, every std > 0")
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.mean_values, self.std_values = tuple(float(m) for m in mean), tuple(float(v) for v in std)
        self.mean = torch.tensor(self.mean_values, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(self.std_values, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        """Load ``path``.

        Returns:
            Float tensor ``[3, S, S]``, normalised.

        Raises:
            DataError: the file is missing, empty, not an image, truncated or corrupt.
        """
        image = read_image_rgb(path, draft_size=self.image_size)
        return self.normalise(resize_center_crop(image, self.image_size, self.interpolation))

    def normalise(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> ``[3, H, W]`` float, ``(x / 255 - mean) / std``."""
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return pixels.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return (
            f"ImageLoader(image_size={self.image_size}, mean={self.mean_values}, std={self.std_values}, "
            f"interpolation={self.interpolation!r})"
        )


class AugmentingImageLoader(ImageLoader):
    """The training loader for real photos: random resized crop, colour jitter and, optionally, a horizontal flip.

    The crop and the jitter are timm's own training transform (`timm.data.create_transform(is_training=True)`,
    fed our decoded RGB image so that bad files still raise `DataError` naming them). The flip is not timm's: it is
    decided by `PairDataset`, which swaps "left" and "right" in the caption of a flipped image (`swap_left_right`),
    since a mirrored "a dog left of a cat" is a wrong pair. Evaluation never uses this loader (deterministic
    `ImageLoader`).

    JPEG draft decoding is kept, at the side that leaves the smallest crop (area ``crop_scale[0]``) at least S pixels
    wide: decoding at S alone would make every crop an upscale of fewer than S pixels.

    Args:
        image_size, mean, std, interpolation: as `ImageLoader` (the model's, `resolve_image_config`).
        crop_scale: range of the crop's area as a fraction of the image (BLIP / ALBEF fine-tune with (0.5, 1)).
        crop_ratio: range of the crop's aspect ratio, before it is resized to S x S.
        color_jitter: brightness / contrast / saturation strength (0: off).
        hflip: probability that `PairDataset` flips a sample (0: never).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str = "bicubic",
        *,
        crop_scale: Sequence[float] = (0.5, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        color_jitter: float = 0.4,
        hflip: float = 0.0,
    ) -> None:
        super().__init__(image_size, mean, std, interpolation)
        from timm.data import create_transform  # here: reading data for evaluation must not import timm

        if not (0 < crop_scale[0] <= crop_scale[1] <= 1) or not (0 < crop_ratio[0] <= crop_ratio[1]):
            raise ValueError(f"crop_scale={tuple(crop_scale)} / crop_ratio={tuple(crop_ratio)}: expected 0 < lo <= hi")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip={hflip}: a probability, in [0, 1]")
        self.hflip = float(hflip)
        self.crop_scale, self.crop_ratio, self.color_jitter = tuple(crop_scale), tuple(crop_ratio), float(color_jitter)
        self.draft_size = math.ceil(self.image_size / math.sqrt(self.crop_scale[0]))
        self.transform = create_transform(
            input_size=self.image_size,
            is_training=True,
            scale=self.crop_scale,
            ratio=self.crop_ratio,
            hflip=0.0,  # ours, with the caption (see the class docstring)
            vflip=0.0,
            color_jitter=self.color_jitter,
            interpolation=self.interpolation,
            mean=self.mean_values,
            std=self.std_values,
            re_prob=0.0,
        )

    def __call__(self, path: str | os.PathLike, flip: bool = False) -> torch.Tensor:
        """Load ``path`` with a random crop and jitter, mirrored if ``flip``.

        Returns:
            Float tensor ``[3, S, S]``, normalised.

        Raises:
            DataError: as `ImageLoader`.
        """
        image = read_image_rgb(path, draft_size=self.draft_size)
        if flip:
            image = ImageOps.mirror(image)
        return self.transform(image)

    def __repr__(self) -> str:
        return (
            f"AugmentingImageLoader(image_size={self.image_size}, crop_scale={self.crop_scale}, "
            f"crop_ratio={self.crop_ratio}, color_jitter={self.color_jitter}, hflip={self.hflip})"
        )


_LEFT_RIGHT = re.compile(r"\b(left|right)(most|ward|wards)?\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """The caption of the mirrored image: "left" <-> "right" (also -most, -ward, -wards), keeping the case.

    "right" in the sense of "correct" ("all right") is swapped too; captions of photos rarely use it, and a caption
    whose words are kept while the picture is mirrored would be the worse error.
    """

    def swap(m: re.Match) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")

    return _LEFT_RIGHT.sub(swap, text)


def resolve_image_config(
    backbone,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
) -> dict:
    """The `ImageLoader` arguments a timm backbone expects: its mean / std and resampling filter, as timm's
    `resolve_model_data_config` reads them from the backbone's pretrained config, each overridable.

    The size stays the caller's (the recipe's ``data.image_size``, which the model is built for, and which every
    token store and index is stamped with); timm's ``crop_pct`` is not applied: retrieval evaluates on the
    shorter side resized to S and centre-cropped (CLIP, BLIP), since a caption may name what sits at the border.
    Our own loader is kept rather than ``timm.data.create_transform`` for evaluation for its JPEG draft decode
    (DCT-domain downscaling: several times faster on COCO-sized photos) and its `DataError` naming the file.

    Args:
        backbone: a timm model (``features_only`` wrappers included).
        image_size: S.
        mean, std, interpolation: overrides (the recipe's ``*.image_mean`` / ``image_std`` / ``image_interpolation``);
            None takes the backbone's.

    Returns:
        ``{"image_size", "mean", "std", "interpolation"}``, the keyword arguments of `ImageLoader`.
    """
    from timm.data import resolve_model_data_config  # here: reading data must not import timm

    resolved = resolve_model_data_config(backbone)
    interp = interpolation or resolved["interpolation"]
    if interp not in INTERPOLATIONS:  # timm also knows "random" (training only): evaluate with its usual bicubic
        interp = "bicubic"
    return {
        "image_size": int(image_size),
        "mean": tuple(float(v) for v in (mean if mean is not None else resolved["mean"])),
        "std": tuple(float(v) for v in (std if std is not None else resolved["std"])),
        "interpolation": interp,
    }


def read_image_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode an image file fully, apply its EXIF orientation and convert it to RGB.

    Args:
        path: the image file.
        draft_size: if set, let PIL decode a JPEG at a reduced scale whose sides stay >= ``draft_size``.

    Returns:
        An RGB PIL image.

    Raises:
        DataError: missing, empty (0 bytes), not an image, truncated, corrupt, too large, or a mode that
            cannot be converted to RGB; the message names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError.for_file(path, "image file not found", _SKIP_HINT, reason="missing file")
    if os.path.getsize(path) == 0:
        raise DataError.for_file(path, "empty file (0 bytes)", _SKIP_HINT, reason="empty file")
    try:
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft(image.mode, (draft_size, draft_size))
            with _strict_truncation():
                image.load()
            return to_rgb(_exif_transpose(image), path)
    except DataError:
        raise
    except UnidentifiedImageError as err:
        raise DataError.for_file(path, "not an image PIL can read", _SKIP_HINT, reason="not an image") from err
    except Image.DecompressionBombError as err:
        raise DataError.for_file(path, f"image too large ({err})", _SKIP_HINT, reason="image too large") from err
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        # PIL reports decoder failures with these; "image file is truncated" is the common one.
        reason = "truncated image" if "truncated" in str(err) else "corrupt image"
        raise DataError.for_file(path, f"{reason} ({err})", _SKIP_HINT, reason=reason) from err


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files even if some library set ``ImageFile.LOAD_TRUNCATED_IMAGES``.

    With that flag on, PIL fills the missing part of a truncated file with grey and says nothing; we would
    then train on half-grey images. The flag is process-global: it is restored on exit, and DataLoader
    workers are processes, so this only races with other threads of the same process loading images.
    """
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = True


def _exif_transpose(image: Image.Image) -> Image.Image:
    """Rotate / flip the pixels as the EXIF orientation tag says (phone photos are stored sideways)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost us an otherwise good image
        return image


def to_rgb(image: Image.Image, path: str | os.PathLike = "<image>") -> Image.Image:
    """Convert a PIL image of any mode to RGB, correctly.

    - RGB: unchanged. L, 1, P without transparency, CMYK, YCbCr, HSV: PIL's conversion.
    - Anything with alpha (RGBA, LA, PA, premultiplied La / RGBa) or a transparency key (P, L or RGB with
      ``info["transparency"]``): composited on white, as viewers show it, instead of keeping whatever colour
      the fully transparent pixels happen to store (often black).
    - 16-bit grey (I;16, I;16B, ...): scaled by 255 / 65535 (PIL's own conversion clips at 255 instead).
    - I (32-bit int): values in [0, 255] are taken as 8-bit, in [0, 65535] as 16-bit, others are min-max
      scaled to [0, 255]. F (float): [0, 1] is scaled by 255, [0, 255] taken as is, others min-max scaled.
      Transparency keys of these three modes are ignored.

    Args:
        image: a PIL image (fully loaded).
        path: the file it came from, for the error message.

    Returns:
        An RGB PIL image of the same size.

    Raises:
        DataError: the mode has no conversion to RGB (e.g. LAB without a colour profile).
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.float32) * (255.0 / 65535.0)
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise DataError.for_file(
            path, f"image mode {mode} cannot be converted to RGB ({err})", _SKIP_HINT, reason="unsupported mode"
        ) from err


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a 32-bit int (mode I) or float (mode F) grey image to uint8 (rule in `to_rgb`)."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= (1.0 if mode == "F" else 255.0):
        scale = 255.0 if mode == "F" else 1.0
    elif low >= 0 and high <= (255.0 if mode == "F" else 65535.0):
        scale = 1.0 if mode == "F" else 255.0 / 65535.0
    else:  # no known range: stretch what is there
        values, scale = values - low, 255.0 / max(high - low, 1e-12)
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def resize_center_crop(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is ``size`` (antialiased), then crop the centre ``size x size``.

    Args:
        image: a PIL image.
        size: the output side.
        interpolation: the resampling filter, one of `INTERPOLATIONS`.

    Returns:
        A ``size x size`` PIL image.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling[interpolation.upper()])
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------- features

_NPY_MAGIC = b"\x93NUMPY"


class FeatureLoader:
    """Load a ``.npy`` clip-feature file as a fixed number of frames plus a mask.

    Truncation: a video with more than ``max_frames`` clips is subsampled uniformly in time (the clip at
    the centre of each of ``max_frames`` equal segments) rather than cut at ``max_frames``: a caption
    describes the whole video, and cutting would drop its end. Shorter videos are zero-padded and the
    padding is masked out.

    Args:
        max_frames: T, the number of frames returned.
        feature_dim: if set, files whose feature dimension differs are errors (D is checked, not guessed).
    """

    def __init__(self, max_frames: int, feature_dim: int | None = None) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.max_frames = int(max_frames)
        self.feature_dim = feature_dim

    def __call__(self, path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Load ``path``.

        Returns:
            ``(features [T, D] float32, mask [T] bool)`` with T = ``max_frames``; ``mask`` is True on real
            frames, which come first.

        Raises:
            DataError: the file is missing, empty, not a ``.npy`` array, truncated, of the wrong ndim / shape /
                dtype, or holds NaN or infinite values.
        """
        return fit_frames(read_features(path, self.feature_dim), self.max_frames)

    def __repr__(self) -> str:
        return f"FeatureLoader(max_frames={self.max_frames}, feature_dim={self.feature_dim})"


def read_features(path: str | os.PathLike, feature_dim: int | None = None) -> np.ndarray:
    """Read and check a clip-feature file of shape (1, T, D) or (T, D).

    Args:
        path: the ``.npy`` file.
        feature_dim: expected D, or None to accept any.

    Returns:
        A float32 array ``[T, D]`` with T >= 1, all values finite.

    Raises:
        DataError: see `FeatureLoader.__call__`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError.for_file(path, "feature file not found", _SKIP_HINT, reason="missing file")
    if os.path.getsize(path) == 0:
        raise DataError.for_file(path, "empty file (0 bytes)", _SKIP_HINT, reason="empty file")
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        # np.load would try to unpickle it, or return an archive for .npz; say plainly what it is not.
        what = "a .npz archive" if magic.startswith(b"PK") else "not a .npy file"
        raise DataError.for_file(path, f"{what}, expected one .npy array", _SKIP_HINT, reason="not a .npy file")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError.for_file(
            path, f"corrupt or truncated .npy ({err})", _SKIP_HINT, reason="corrupt features"
        ) from err

    if not np.issubdtype(array.dtype, np.floating):
        raise DataError.for_file(
            path, f"dtype {array.dtype}, expected floating point features", _SKIP_HINT, reason="bad features"
        )
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise DataError.for_file(
            path, f"shape {array.shape}, expected (1, T, D) or (T, D)", _SKIP_HINT, reason="bad shape"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError.for_file(path, f"shape {array.shape} holds no features", _SKIP_HINT, reason="bad shape")
    if feature_dim is not None and array.shape[1] != feature_dim:
        raise DataError.for_file(
            path,
            f"feature dimension {array.shape[1]}, expected {feature_dim}",
            "check data.feature_dir",
            reason="bad shape",
        )
    if not np.isfinite(array).all():
        raise DataError.for_file(
            path, "features contain NaN or infinite values", _SKIP_HINT, reason="non-finite features"
        )
    return array.astype(np.float32, copy=False)


def fit_frames(features: np.ndarray, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsample uniformly or zero-pad ``[n, D]`` features to exactly ``max_frames`` rows.

    Args:
        features: ``[n, D]`` array, n >= 1.
        max_frames: T.

    Returns:
        ``(features [T, D] float32, mask [T] bool)``; the first ``min(n, T)`` mask entries are True.
    """
    n, dim = features.shape
    if n > max_frames:
        # Centre of each of max_frames equal segments of [0, n): strictly increasing, first and last
        # segments both represented.
        features = features[((np.arange(max_frames) + 0.5) * n / max_frames).astype(np.int64)]
        n = max_frames
    out = torch.zeros(max_frames, dim, dtype=torch.float32)
    out[:n] = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    mask = torch.zeros(max_frames, dtype=torch.bool)
    mask[:n] = True
    return out, mask
