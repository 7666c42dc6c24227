"""Tests for ImageLoader / FeatureLoader and for the datasets + collate under on_error=raise|skip.

Every image mode, the EXIF orientation, resize + centre crop, and corrupt / truncated / zero-byte / missing
files; feature shapes, padding, uniform subsampling, and malformed .npy files.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from fastslow.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DataError,
    FeatureLoader,
    ImageLoader,
    PairDataset,
    RetrievalSplit,
    SkipCounter,
    VisualDataset,
    collate,
    read_image_rgb,
    report_skipped,
)
from fastslow.tokenizer import train_tokenizer

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def unnormalise(pixels: torch.Tensor) -> np.ndarray:
    """[3, S, S] normalised -> [S, S, 3] values in 0..255."""
    return ((pixels * STD + MEAN) * 255).permute(1, 2, 0).numpy()


def rgb_of(path) -> np.ndarray:
    return np.asarray(read_image_rgb(path)).astype(int)


# ------------------------------------------------------------------------------------------ image modes


def test_output_shape_and_normalisation(tmp_path):
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "red.png")
    pixels = ImageLoader(16)(tmp_path / "red.png")
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 0.0]) - MEAN.view(3)) / STD.view(3)
    assert torch.allclose(pixels, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def half_transparent(mode: str, colour) -> Image.Image:
    """Left half fully transparent black, right half opaque ``colour`` (in ``mode``'s own channels)."""
    width, height = 8, 4
    channels = len(mode)
    data = np.zeros((height, width, channels), dtype=np.uint8)
    data[:, width // 2 :, :] = colour
    return Image.fromarray(data, mode)


@pytest.mark.parametrize(
    "mode, make, left, right",
    [
        ("L", lambda: Image.new("L", (8, 4), 100), (100, 100, 100), (100, 100, 100)),
        ("1", lambda: Image.new("1", (8, 4), 1), (255, 255, 255), (255, 255, 255)),
        ("RGBA", lambda: half_transparent("RGBA", (200, 10, 20, 255)), (255, 255, 255), (200, 10, 20)),
        ("LA", lambda: half_transparent("LA", (90, 255)), (255, 255, 255), (90, 90, 90)),
    ],
)
def test_simple_and_alpha_modes(tmp_path, mode, make, left, right):
    image = make()
    assert image.mode == mode
    image.save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode == mode  # the file really holds that mode
    rgb = rgb_of(tmp_path / "x.png")
    assert tuple(rgb[0, 0]) == left and tuple(rgb[0, -1]) == right


def test_half_transparent_alpha_is_blended_on_white(tmp_path):
    data = np.zeros((2, 2, 4), dtype=np.uint8)
    data[..., 3] = 128  # half-transparent black
    Image.fromarray(data, "RGBA").save(tmp_path / "x.png")
    assert np.abs(rgb_of(tmp_path / "x.png") - 127).max() <= 1


def palette_image() -> Image.Image:
    image = Image.new("P", (8, 4), 0)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    image.paste(1, (4, 0, 8, 4))  # right half index 1 = (10, 20, 30), left half index 0 = black
    return image


def test_palette_without_transparency(tmp_path):
    palette_image().save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    rgb = rgb_of(tmp_path / "p.png")
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[0, -1]) == (10, 20, 30)


def test_palette_with_transparency(tmp_path):
    palette_image().save(tmp_path / "p.png", transparency=0)
    reopened = Image.open(tmp_path / "p.png")
    assert reopened.mode == "P" and "transparency" in reopened.info
    rgb = rgb_of(tmp_path / "p.png")
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[0, -1]) == (10, 20, 30)


def test_rgb_with_transparency_key(tmp_path):
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    image.paste((50, 60, 70), (4, 0, 8, 4))
    image.save(tmp_path / "x.png", transparency=(0, 0, 0))
    rgb = rgb_of(tmp_path / "x.png")
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[0, -1]) == (50, 60, 70)


def test_cmyk(tmp_path):
    Image.new("CMYK", (8, 4), (0, 255, 255, 0)).save(tmp_path / "x.tiff")  # pure red, lossless
    assert Image.open(tmp_path / "x.tiff").mode == "CMYK"
    assert tuple(rgb_of(tmp_path / "x.tiff")[0, 0]) == (255, 0, 0)
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "x.jpg", quality=95)
    assert Image.open(tmp_path / "x.jpg").mode == "CMYK"
    assert np.abs(rgb_of(tmp_path / "x.jpg")[16, 16] - (255, 0, 0)).max() <= 8


def test_16_bit_is_scaled_not_clipped(tmp_path):
    data = np.zeros((4, 8), dtype=np.uint16)
    data[:, :4] = 25700  # = 100 * 257 -> 100 in 8 bits (clipping would give 255)
    data[:, 4:] = 65535
    Image.fromarray(data).save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode.startswith("I;16")
    rgb = rgb_of(tmp_path / "x.png")
    assert tuple(rgb[0, 0]) == (100, 100, 100) and tuple(rgb[0, -1]) == (255, 255, 255)


@pytest.mark.parametrize(
    "values, expected",
    [
        (np.array([[0, 200]], dtype=np.int32), (0, 200)),  # fits 8 bits: as is
        (np.array([[25700, 65535]], dtype=np.int32), (100, 255)),  # 16-bit range: / 257
        (np.array([[-1000, 1000]], dtype=np.int32), (0, 255)),  # unknown range: stretched
    ],
)
def test_mode_i(tmp_path, values, expected):
    Image.fromarray(np.repeat(values, 4, axis=0), "I").save(tmp_path / "x.tiff")
    assert Image.open(tmp_path / "x.tiff").mode == "I"
    rgb = rgb_of(tmp_path / "x.tiff")
    assert (rgb[0, 0, 0], rgb[0, -1, 0]) == expected


@pytest.mark.parametrize(
    "values, expected",
    [
        (np.array([[0.0, 0.4]], dtype=np.float32), (0, 102)),  # [0, 1]: * 255
        (np.array([[3.0, 200.0]], dtype=np.float32), (3, 200)),  # [0, 255]: as is
        (np.array([[-2.0, 2.0]], dtype=np.float32), (0, 255)),  # unknown range: stretched
    ],
)
def test_mode_f(tmp_path, values, expected):
    Image.fromarray(np.repeat(values, 4, axis=0), "F").save(tmp_path / "x.tiff")
    assert Image.open(tmp_path / "x.tiff").mode == "F"
    rgb = rgb_of(tmp_path / "x.tiff")
    assert (rgb[0, 0, 0], rgb[0, -1, 0]) == expected


def test_every_mode_through_image_loader(tmp_path):
    """The full loader accepts each mode and gives a [3, S, S] tensor."""
    files = {
        "L.png": Image.new("L", (9, 7), 3),
        "LA.png": Image.new("LA", (9, 7), (3, 9)),
        "P.png": palette_image(),
        "RGBA.png": Image.new("RGBA", (9, 7), (1, 2, 3, 4)),
        "CMYK.jpg": Image.new("CMYK", (9, 7), (1, 2, 3, 4)),
        "I16.png": Image.fromarray(np.full((7, 9), 1000, dtype=np.uint16)),
        "I.tiff": Image.new("I", (9, 7), 70000),
        "F.tiff": Image.new("F", (9, 7), 0.5),
        "1.png": Image.new("1", (9, 7), 0),
    }
    loader = ImageLoader(6)
    for name, image in files.items():
        image.save(tmp_path / name)
        pixels = loader(tmp_path / name)
        assert pixels.shape == (3, 6, 6) and torch.isfinite(pixels).all(), name


# ------------------------------------------------------------------------------- orientation and geometry


def test_exif_orientation_rotates(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 = "rotate 90 degrees clockwise
    # to display": the stored left edge becomes the top, so the displayed image is 20 x 40, red on top.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    stored.save(tmp_path / "plain.jpg", quality=95)

    shown = rgb_of(tmp_path / "rotated.jpg")
    assert shown.shape == (40, 20, 3)
    assert np.abs(shown[5, 10] - (255, 0, 0)).max() < 30 and np.abs(shown[35, 10] - (0, 0, 255)).max() < 30
    plain = rgb_of(tmp_path / "plain.jpg")
    assert plain.shape == (20, 40, 3) and np.abs(plain[10, 5] - (255, 0, 0)).max() < 30

    pixels = unnormalise(ImageLoader(16)(tmp_path / "rotated.jpg"))  # 20x40 -> 16x32 -> centre 16x16
    assert pixels[0, 8, 0] > 200 and pixels[0, 8, 2] < 50  # top row red
    assert pixels[-1, 8, 2] > 200 and pixels[-1, 8, 0] < 50  # bottom row blue


def test_resize_keeps_aspect_and_crops_centre(tmp_path):
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 255, 0), (20, 0, 40, 20))
    image.paste((0, 0, 255), (40, 0, 60, 20))
    image.save(tmp_path / "thirds.png")
    pixels = unnormalise(ImageLoader(10)(tmp_path / "thirds.png"))  # 60x20 -> 30x10 -> centre 10x10 = green
    # The bicubic kernel blends a little red / blue into the outermost columns only.
    assert np.abs(pixels[:, 1:-1] - (0, 255, 0)).max() < 2 and (pixels[..., 1] > 230).all()


def test_large_jpeg_uses_draft_and_keeps_colours(tmp_path):
    Image.new("RGB", (800, 600), (30, 140, 220)).save(tmp_path / "big.jpg", quality=95)
    pixels = unnormalise(ImageLoader(64)(tmp_path / "big.jpg"))
    assert pixels.shape == (64, 64, 3) and np.abs(pixels - (30, 140, 220)).max() < 6
    assert read_image_rgb(tmp_path / "big.jpg", draft_size=64).size == (100, 75)  # 1/8 scale, still >= 64


# ------------------------------------------------------------------------------------------ bad images


def write_bad_images(folder) -> dict[str, str]:
    """One good image and one of each kind of bad file; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    noise = Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    paths = {name: str(folder / name) for name in ("good.jpg", "corrupt.jpg", "trunc.jpg", "trunc.png", "zero.jpg")}
    noise.save(paths["good.jpg"], quality=90)
    open(paths["corrupt.jpg"], "wb").write(rng.bytes(500))
    jpeg = open(paths["good.jpg"], "rb").read()
    open(paths["trunc.jpg"], "wb").write(jpeg[: len(jpeg) * 2 // 3])
    noise.save(folder / "full.png")
    png = open(folder / "full.png", "rb").read()
    open(paths["trunc.png"], "wb").write(png[: len(png) // 2])
    open(paths["zero.jpg"], "wb").close()
    paths["missing.jpg"] = str(folder / "missing.jpg")
    return paths


EXPECTED_REASON = {
    "corrupt.jpg": ("not an image", "not an image"),
    "trunc.jpg": ("truncated image", "truncated"),
    "trunc.png": ("truncated image", "truncated"),
    "zero.jpg": ("empty file", "0 bytes"),
    "missing.jpg": ("missing file", "not found"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_REASON))
def test_bad_image_raises_naming_the_file(tmp_path, name):
    paths = write_bad_images(tmp_path)
    with pytest.raises(DataError) as info:
        ImageLoader(16)(paths[name])
    reason, words = EXPECTED_REASON[name]
    assert paths[name] in str(info.value) and words in str(info.value)
    assert info.value.reason == reason and info.value.path == paths[name]


def test_truncated_is_an_error_even_with_load_truncated_images(tmp_path, monkeypatch):
    paths = write_bad_images(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="truncated"):
        ImageLoader(16)(paths["trunc.jpg"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it
    assert ImageLoader(16)(paths["good.jpg"]).shape == (3, 16, 16)


def image_split(paths: dict[str, str]) -> RetrievalSplit:
    names = list(paths)
    captions = [f"caption of {n}" for n in names for _ in range(2)]
    return RetrievalSplit("test/bad", "image", names, [paths[n] for n in names], captions,
                          [i for i in range(len(names)) for _ in range(2)])  # fmt: skip


def test_visual_dataset_raise_and_skip(tmp_path):
    paths = write_bad_images(tmp_path)
    split = image_split(paths)
    loader = ImageLoader(16)
    with pytest.raises(DataError) as info:
        VisualDataset(split, loader)[1]
    assert paths["corrupt.jpg"] in str(info.value)

    dataset = VisualDataset(split, loader, on_error="skip")
    batches = list(DataLoader(dataset, batch_size=3, collate_fn=collate))
    first, second = batches
    assert first["pixels"].shape == (1, 3, 16, 16) and first["item_index"].tolist() == [0]
    assert not first["empty"] and [r for _, r in first["skipped"]] == ["not an image", "truncated image"]
    # Every sample of the second batch is bad: the batch is still a valid, flagged dict.
    assert second["empty"] and "pixels" not in second and second["item_index"].shape == (0,)
    assert sorted(p for p, _ in second["skipped"]) == sorted(paths[n] for n in ("trunc.png", "zero.jpg", "missing.jpg"))

    counter = SkipCounter()
    for batch in batches:
        counter.update(batch["skipped"], empty=batch["empty"])
    assert counter.total == 5
    report = counter.report()
    assert report.startswith("skipped 5 samples (5 files)")
    assert "truncated image: 2 samples, 2 files" in report and "1 batch had no usable sample" in report
    counter.reset()
    assert counter.total == 0 and counter.report() == ""


def test_pair_dataset_images_and_text(tmp_path):
    paths = write_bad_images(tmp_path)
    split = image_split(paths)
    split.captions[0] = "caption of good with many more words than the others"
    tok = train_tokenizer(split.captions)
    dataset = PairDataset(split, ImageLoader(16), tok, max_length=32, on_error="skip")
    assert len(dataset) == split.n_texts == 12
    sample = dataset[1]
    assert set(sample) == {"visual", "input_ids", "attention_mask", "item_index", "text_index"}
    assert sample["item_index"] == 0 and sample["text_index"] == 1 and sample["input_ids"].dtype == torch.long

    batch = collate([dataset[i] for i in (1, 2, 3)])  # 1 good caption, 2 captions of the corrupt image
    assert batch["pixels"].shape == (1, 3, 16, 16)
    assert batch["text_index"].tolist() == [1] and batch["item_index"].tolist() == [0]
    assert [p for p, _ in batch["skipped"]] == [paths["corrupt.jpg"]] * 2
    # The dataset pads to the longest caption of the split; the batch is trimmed to its own longest row.
    expected = tok.encode([split.captions[1]], 32)
    assert torch.equal(batch["input_ids"], expected[0]) and torch.equal(batch["attention_mask"], expected[1])
    assert dataset.input_ids.shape[1] > batch["input_ids"].shape[1]

    full = collate([dataset[0], dataset[1]])
    assert full["input_ids"].shape == (2, dataset.input_ids.shape[1]) and full["input_ids"].dtype == torch.long
    assert (full["input_ids"][:, 0] == tok.bos_id).all()

    with pytest.raises(DataError, match="corrupt.jpg"):
        PairDataset(split, ImageLoader(16), tok, max_length=32)[2]


def test_report_skipped_format():
    assert report_skipped([]) == ""
    report = report_skipped([("a.jpg", "missing file"), ("a.jpg", "missing file"), ("b.jpg", "truncated image")])
    lines = report.splitlines()
    assert lines[0] == "skipped 3 samples (2 files)"
    assert lines[1] == "  missing file: 2 samples, 1 file, e.g. a.jpg"
    assert lines[2] == "  truncated image: 1 sample, 1 file, e.g. b.jpg"
    many = report_skipped([(f"{i}.jpg", "empty file") for i in range(5)], max_examples=2)
    assert many.endswith("e.g. 0.jpg, 1.jpg, ...")


# -------------------------------------------------------------------------------------------- features


def frames(n: int, dim: int = 4, dtype=np.float32) -> np.ndarray:
    """Frame t holds the value t everywhere, so subsampling can be read back."""
    return np.repeat(np.arange(n, dtype=dtype)[:, None], dim, axis=1)


def test_feature_shapes_and_dtypes(tmp_path):
    np.save(tmp_path / "a.npy", frames(5)[None])  # (1, T, D)
    np.save(tmp_path / "b.npy", frames(5, dtype=np.float16))  # (T, D), half precision
    loader = FeatureLoader(8)
    (fa, ma), (fb, mb) = loader(tmp_path / "a.npy"), loader(tmp_path / "b.npy")
    assert fa.shape == (8, 4) and fa.dtype == torch.float32 and ma.dtype == torch.bool
    assert torch.equal(fa, fb) and torch.equal(ma, mb)
    assert ma.tolist() == [True] * 5 + [False] * 3
    assert fa[:5, 0].tolist() == [0, 1, 2, 3, 4] and (fa[5:] == 0).all()


def test_feature_uniform_subsampling(tmp_path):
    np.save(tmp_path / "long.npy", frames(10))
    feats, mask = FeatureLoader(4)(tmp_path / "long.npy")
    assert mask.all() and feats[:, 0].tolist() == [1, 3, 6, 8]  # centres of 4 segments of 2.5 frames
    np.save(tmp_path / "exact.npy", frames(4))
    assert FeatureLoader(4)(tmp_path / "exact.npy")[0][:, 0].tolist() == [0, 1, 2, 3]
    np.save(tmp_path / "many.npy", frames(1000))
    sub = FeatureLoader(32)(tmp_path / "many.npy")[0][:, 0]
    assert (sub.diff() > 0).all() and sub[0] < 1000 / 32 and sub[-1] > 1000 - 1000 / 32  # spans the whole video


def write_bad_features(folder) -> dict[str, tuple[str, str]]:
    """name -> (path, words expected in the message)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}

    def add(name, words, array=None, raw=None):
        path = str(folder / name)
        if array is not None:
            np.save(path, array, allow_pickle=True)
        else:
            open(path, "wb").write(raw)
        cases[name] = (path, words)

    add("ndim1.npy", "shape (7,)", array=np.zeros(7, np.float32))
    add("batch2.npy", "shape (2, 3, 4)", array=np.zeros((2, 3, 4), np.float32))
    add("ndim4.npy", "expected (1, T, D) or (T, D)", array=np.zeros((1, 1, 3, 4), np.float32))
    add("empty_t.npy", "holds no features", array=np.zeros((0, 4), np.float32))
    add("nan.npy", "NaN", array=np.array([[0.0, np.nan, 1.0, 2.0]], np.float32))
    add("inf.npy", "infinite", array=np.array([[0.0, np.inf, 1.0, 2.0]], np.float32))
    add("ints.npy", "dtype int64", array=np.zeros((3, 4), np.int64))
    add("objects.npy", "corrupt", array=np.array([{"a": 1}], dtype=object))
    add("zero.npy", "0 bytes", raw=b"")
    add("text.npy", "not a .npy file", raw=b"this is not numpy at all")
    np.savez(folder / "archive.npz", x=np.zeros((3, 4), np.float32))
    os.replace(folder / "archive.npz", folder / "archive.npy")
    cases["archive.npy"] = (str(folder / "archive.npy"), ".npz archive")
    np.save(folder / "full.npy", np.ones((50, 64), np.float32))
    full = open(folder / "full.npy", "rb").read()
    add("truncated.npy", "truncated", raw=full[: len(full) // 2])
    cases["missing.npy"] = (str(folder / "missing.npy"), "not found")
    return cases


def test_bad_feature_files_name_the_file(tmp_path):
    for name, (path, words) in write_bad_features(tmp_path).items():
        with pytest.raises(DataError) as info:
            FeatureLoader(4)(path)
        assert path in str(info.value) and words in str(info.value), (name, str(info.value))


def test_feature_dim_checked(tmp_path):
    np.save(tmp_path / "a.npy", frames(3, dim=6))
    with pytest.raises(DataError, match="feature dimension 6, expected 4"):
        FeatureLoader(4, feature_dim=4)(tmp_path / "a.npy")
    assert FeatureLoader(4, feature_dim=6)(tmp_path / "a.npy")[0].shape == (4, 6)


def test_video_pairs_collate_with_skip(tmp_path):
    np.save(tmp_path / "v0.npy", frames(3)[None])
    np.save(tmp_path / "v1.npy", frames(9))
    bad = write_bad_features(tmp_path / "bad")
    paths = [str(tmp_path / "v0.npy"), bad["nan.npy"][0], str(tmp_path / "v1.npy")]
    split = RetrievalSplit("vid", "video", ["v0", "nan", "v1"], paths, ["a cat", "a dog", "a cow"], [0, 1, 2])
    tok = train_tokenizer(split.captions)
    dataset = PairDataset(split, FeatureLoader(6, feature_dim=4), tok, max_length=8, on_error="skip")
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert batch["features"].shape == (2, 6, 4) and batch["frame_mask"].shape == (2, 6)
    assert batch["frame_mask"].sum(1).tolist() == [3, 6]
    assert batch["text_index"].tolist() == [0, 2] and batch["item_index"].tolist() == [0, 2]
    assert batch["skipped"] == [(bad["nan.npy"][0], "non-finite features")]
    assert batch["input_ids"].shape == (2, 4)  # BOS word word EOS
