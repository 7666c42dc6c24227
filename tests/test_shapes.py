"""Tests of the built-in shapes generator: determinism, file formats and the semantics the benchmarks rely on."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastslow.data import shapes
from fastslow.data.shapes import (
    canonicalize,
    caption_fits,
    caption_text,
    frame_features,
    generate_shapes,
    generate_shapes_video,
    is_full_caption,
    render_scene,
    render_video_frames,
    video_caption_fits,
)

# Test splits are big enough that random cross-group collisions occur, so the exclusivity guard is exercised.
IMG_KW = {"n_train": 40, "n_val_groups": 3, "n_test_groups": 40, "group_size": 4, "image_size": 64}
VID_KW = {
    "n_train": 40,
    "n_val_groups": 2,
    "n_test_groups": 30,
    "group_size": 4,
    "n_frames": (6, 10),
    "feature_dim": 64,
    "frame_size": 24,
}


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def img_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes_img")
    summary = generate_shapes(out, seed=0, **IMG_KW)
    return out, summary


@pytest.fixture(scope="module")
def img_dir(img_run: tuple[Path, dict]) -> Path:
    return img_run[0]


@pytest.fixture(scope="module")
def img_meta(img_dir: Path) -> dict:
    return json.loads((img_dir / "shapes_meta.json").read_text())


@pytest.fixture(scope="module")
def vid_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes_vid")
    summary = generate_shapes_video(out, seed=0, **VID_KW)
    return out, summary


@pytest.fixture(scope="module")
def vid_meta(vid_dir: tuple[Path, dict]) -> dict:
    return json.loads((vid_dir[0] / "shapes_video_meta.json").read_text())


def _split(meta: dict, split: str, key: str = "images") -> list[dict]:
    return [m for m in meta[key] if m["split"] == split]


# ----------------------------------------------------------------------------------------------------------------
# Caption semantics on hand-made scenes
# ----------------------------------------------------------------------------------------------------------------


def _obj(shape, color, size, x, y):
    return {"shape": shape, "color": color, "size": size, "x": x, "y": y, "r": 0.1}


def _d(size=None, color=None, shape=None):
    return {"size": size, "color": color, "shape": shape}


def test_caption_fits_semantics():
    scene = {"objects": [_obj("circle", "red", "small", 0.2, 0.5), _obj("square", "blue", "large", 0.7, 0.45)]}
    full = {"a": _d("small", "red", "circle"), "rel": "left", "b": _d("large", "blue", "square")}
    assert caption_fits(full, scene)
    assert not caption_fits({**full, "rel": "right"}, scene)  # wrong relation
    assert not caption_fits({**full, "a": _d("small", "blue", "circle")}, scene)  # attribute bound to wrong object
    assert caption_fits({"a": _d(shape="square"), "rel": "right", "b": _d()}, scene)  # "a square right of something"
    assert caption_fits({"a": _d(color="red"), "rel": None, "b": None}, scene)
    assert not caption_fits({"a": _d(color="green"), "rel": None, "b": None}, scene)
    # dy = 0.05 is below the generation margin: "above" is not stated, but the lenient reading (margin 0) accepts it.
    above = {"a": _d(shape="square"), "rel": "above", "b": _d(shape="circle")}
    assert not caption_fits(above, scene)
    assert caption_fits(above, scene, margin=0.0)
    # An object is never related to itself.
    assert not caption_fits({"a": _d(shape="circle"), "rel": "left", "b": _d()}, {"objects": scene["objects"][:1]})


def test_canonical_paraphrases_agree():
    a, b = _d("small", "red", "circle"), _d("large", "blue", "square")
    left, right = {"a": a, "rel": "left", "b": b}, {"a": b, "rel": "right", "b": a}
    assert canonicalize(left) == canonicalize(right) == left
    assert canonicalize({"a": b, "rel": "below", "b": a}) == {"a": a, "rel": "above", "b": b}
    assert caption_text(right) == "a large blue square right of a small red circle"
    scenes = [
        {"objects": [_obj("circle", "red", "small", x, 0.5), _obj("square", "blue", "large", 0.5, 0.5)]}
        for x in (0.1, 0.45, 0.9)
    ]
    for sc in scenes:
        assert caption_fits(left, sc) == caption_fits(right, sc)
    assert [caption_fits(left, sc) for sc in scenes] == [True, False, False]


def test_render_draws_objects_where_the_scene_says():
    scene = {
        "objects": [_obj("square", "red", "large", 0.25, 0.25), _obj("circle", "blue", "small", 0.75, 0.7)],
        "background": 50,
    }
    arr = np.asarray(render_scene(scene, 64))
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert tuple(arr[16, 16]) == shapes.COLORS["red"]
    assert tuple(arr[int(0.7 * 64), 48]) == shapes.COLORS["blue"]
    assert tuple(arr[60, 4]) == (50, 50, 50)


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def test_image_generation_is_deterministic(img_dir: Path, tmp_path: Path):
    generate_shapes(tmp_path / "same", seed=0, **IMG_KW)
    generate_shapes(tmp_path / "other", seed=1, **IMG_KW)
    assert _tree_hash(tmp_path / "same") == _tree_hash(img_dir)
    assert _tree_hash(tmp_path / "other") != _tree_hash(img_dir)


def test_karpathy_format(img_dir: Path):
    data = json.loads((img_dir / "dataset_shapes.json").read_text())
    assert set(data) == {"dataset", "images"} and data["dataset"] == "shapes"
    images = data["images"]
    assert Counter(i["split"] for i in images) == {"train": 40, "val": 12, "test": 160}
    assert [i["imgid"] for i in images] == list(range(len(images)))
    sentids = [s["sentid"] for i in images for s in i["sentences"]]
    assert sentids == list(range(len(sentids)))
    for im in images:
        assert set(im) == {"filename", "split", "imgid", "sentids", "sentences"}
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert len(im["sentences"]) == (5 if im["split"] == "train" else 2)
        for s in im["sentences"]:
            assert set(s) == {"raw", "tokens", "imgid", "sentid"} and s["imgid"] == im["imgid"]
            assert isinstance(s["raw"], str) and s["tokens"] == s["raw"].lower().split() and s["tokens"]
        with Image.open(img_dir / "images" / im["filename"]) as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size == (64, 64)
    assert len(list((img_dir / "images").iterdir())) == len(images)


def test_karpathy_reader_reads_it(img_dir: Path):
    from fastslow.data import load_karpathy

    test = load_karpathy(img_dir / "dataset_shapes.json", img_dir / "images", "test")
    assert len(test.item_ids) == 160 and len(test.captions) == 320
    assert all(Path(p).is_file() for p in test.item_paths)


def test_every_caption_is_true_of_its_image(img_meta: dict):
    for m in img_meta["images"]:
        for c in m["captions"]:
            assert caption_fits(c["spec"], m["scene"]), (m["filename"], c)
            assert c["spec"] == canonicalize(c["spec"]) and c["full"] == is_full_caption(c["spec"])


def test_train_mixes_full_and_partial_captions(img_meta: dict):
    train = _split(img_meta, "train")
    full = [c["full"] for m in train for c in m["captions"]]
    frac_partial = 1 - sum(full) / len(full)
    assert 0.25 < frac_partial < 0.55  # partial_caption_frac=0.4 by default
    assert all(c["full"] for m in _split(img_meta, "test") + _split(img_meta, "val") for c in m["captions"])
    # Partial captions really do fit several images (false in-batch negatives exist), full ones far fewer.
    scenes = [m["scene"] for m in train]

    def mean_fits(want_full):
        counts = [
            sum(caption_fits(c["spec"], s) for s in scenes)
            for m in train
            for c in m["captions"]
            if c["full"] == want_full
        ]
        return float(np.mean(counts))

    assert mean_fits(False) > 2.0 * mean_fits(True)
    assert mean_fits(False) > 2.0
    assert mean_fits(False) < len(scenes)  # and not trivially everything


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_captions_fit_only_their_own_image(img_run: tuple[Path, dict], img_meta: dict, split: str):
    items = _split(img_meta, split)
    for i, m in enumerate(items):
        for c in m["captions"]:
            hits = [j for j, other in enumerate(items) if caption_fits(c["spec"], other["scene"], margin=0.0)]
            assert hits == [i], (m["filename"], c["spec"], hits)
    assert img_run[1]["rejected_groups"] > 0  # collisions did occur and were redrawn


def test_test_split_holds_minimal_pairs(img_dir: Path, img_meta: dict):
    data = {i["filename"]: i for i in json.loads((img_dir / "dataset_shapes.json").read_text())["images"]}
    groups: dict[int, list[dict]] = {}
    for m in _split(img_meta, "test"):
        groups.setdefault(m["group"], []).append(m)
    assert len(groups) == 40 and all(len(g) == 4 for g in groups.values())
    for g in groups.values():
        # Same objects: every attribute's multiset is the same across the group...
        for attr in ("shape", "color", "size"):
            assert len({tuple(sorted(o[attr] for o in m["scene"]["objects"])) for m in g}) == 1
        # ...the captions use the same bag of words...
        bows = {
            tuple(sorted(Counter(t for s in data[m["filename"]]["sentences"] for t in s["tokens"]).items())) for m in g
        }
        assert len(bows) == 1
        # ...yet the images differ.
        pixels = {np.asarray(Image.open(img_dir / "images" / m["filename"])).tobytes() for m in g}
        assert len(pixels) == len(g)
        # Both captions of an image are paraphrases of one canonical fact.
        assert all(m["captions"][0]["spec"] == m["captions"][1]["spec"] for m in g)


def test_train_minimal_pairs_knob(tmp_path: Path):
    generate_shapes(tmp_path, seed=3, n_train=12, n_val_groups=1, n_test_groups=1, train_minimal_pairs=True)
    meta = json.loads((tmp_path / "shapes_meta.json").read_text())
    train = _split(meta, "train")
    assert [m["group"] for m in train] == [0] * 4 + [1] * 4 + [2] * 4  # consecutive groups
    for g in range(3):
        members = [m for m in train if m["group"] == g]
        assert len({tuple(sorted(o["color"] for o in m["scene"]["objects"])) for m in members}) == 1
        assert members[0]["variant"] == "base"


# ----------------------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------------------


def test_video_generation_is_deterministic(vid_dir: tuple[Path, dict], tmp_path: Path):
    generate_shapes_video(tmp_path / "same", seed=0, **VID_KW)
    generate_shapes_video(tmp_path / "other", seed=1, **VID_KW)
    assert _tree_hash(tmp_path / "same") == _tree_hash(vid_dir[0])
    assert _tree_hash(tmp_path / "other") != _tree_hash(vid_dir[0])


def test_vatex_format(vid_dir: tuple[Path, dict]):
    out, summary = vid_dir
    train = json.loads((out / "vatex_training_v1.0.json").read_text())
    val = json.loads((out / "vatex_validation_v1.0.json").read_text())
    assert len(train) == 40 and len(val) == 8 + 120 and summary["n_val"] == 8
    # Val videos first, then test: the reader's first-n_val rule recovers the two splits.
    assert all(v["videoID"].startswith("val_") for v in val[:8])
    assert all(v["videoID"].startswith("test_") for v in val[8:])
    shapes_seen, lengths = set(), set()
    for v in train + val:
        assert set(v) == {"videoID", "enCap", "chCap"} and isinstance(v["videoID"], str)
        assert len(v["enCap"]) == 10 and all(isinstance(c, str) and c for c in v["enCap"])
        assert v["chCap"] == [""] * 10
        feats = np.load(out / "features" / f"{v['videoID']}.npy")
        assert feats.dtype == np.float32 and feats.ndim in (2, 3) and feats.shape[-1] == 64
        shapes_seen.add(feats.ndim)
        if feats.ndim == 3:
            assert feats.shape[0] == 1
        t = feats.shape[-2]
        assert 6 <= t <= 10 and np.isfinite(feats).all()
        lengths.add(t)
    assert shapes_seen == {2, 3} and len(lengths) >= 3
    assert len(list((out / "features").iterdir())) == len(train) + len(val)


def test_vatex_reader_reads_it(vid_dir: tuple[Path, dict]):
    from fastslow.data import load_vatex, read_vatex_ids, vatex_retrieval_split

    out, summary = vid_dir
    halves = vatex_retrieval_split(read_vatex_ids(out / "vatex_validation_v1.0.json"), summary["n_val"])
    test = load_vatex(out / "vatex_validation_v1.0.json", out / "features", select=halves["test"])
    assert len(test.item_ids) == 120 and len(test.captions) == 1200
    assert all(i.startswith("test_") for i in test.item_ids)


def test_every_video_caption_is_true_and_train_mixes(vid_meta: dict):
    for m in vid_meta["videos"]:
        for c in m["captions"]:
            assert video_caption_fits(c["spec"], m["video"]), (m["videoID"], c)
    train = _split(vid_meta, "train", "videos")
    full = [c["full"] for m in train for c in m["captions"]]
    assert 0.3 < 1 - sum(full) / len(full) < 0.7  # partial_caption_frac=0.5 by default
    partial = [c["spec"] for m in train for c in m["captions"] if not c["full"]]
    fits = [sum(video_caption_fits(s, m["video"]) for m in train) for s in partial]
    assert max(fits) > 3 and np.mean(fits) > 1.5 and max(fits) < len(train)


def test_video_eval_captions_fit_only_their_own_video(vid_dir: tuple[Path, dict], vid_meta: dict):
    for split in ("val", "test"):
        items = _split(vid_meta, split, "videos")
        for i, m in enumerate(items):
            assert all(c["full"] for c in m["captions"])
            assert len({json.dumps(c["spec"], sort_keys=True) for c in m["captions"]}) == 1  # 10 paraphrases
            spec = m["captions"][0]["spec"]
            hits = [j for j, other in enumerate(items) if video_caption_fits(spec, other["video"])]
            assert hits == [i], (m["videoID"], spec, hits)
    assert vid_dir[1]["rejected_groups"] > 0  # collisions did occur and were redrawn


def test_single_frames_do_not_reveal_motion_order(vid_dir: tuple[Path, dict], vid_meta: dict):
    """Each test video has a twin that holds exactly the same frames in reverse order.

    So any model that looks at frames without their order (a bag or mean of frame features) scores the two
    identically, while their captions exclude each other: the order can only be read from the sequence.
    """
    out = vid_dir[0]
    test = {m["videoID"]: m for m in _split(vid_meta, "test", "videos")}
    twins = [(m["reverse_of"], vid) for vid, m in test.items() if m["reverse_of"] is not None]
    assert len(twins) == len(test) // 2
    for a, b in twins:
        fa = np.load(out / "features" / f"{a}.npy").reshape(-1, 64)
        fb = np.load(out / "features" / f"{b}.npy").reshape(-1, 64)
        assert np.array_equal(fa[::-1], fb)  # same multiset of frames, exactly
        assert not np.array_equal(fa, fb)  # but a different sequence
        for x, y in ((a, b), (b, a)):
            assert not video_caption_fits(test[x]["captions"][0]["spec"], test[y]["video"])


def test_order_swap_twins_share_words(vid_dir: tuple[Path, dict], vid_meta: dict):
    """ "left then up" vs "up then left": a bag-of-words text model cannot tell these test videos apart."""
    out = vid_dir[0]
    test = _split(vid_meta, "test", "videos")
    by_group: dict[int, dict[str, dict]] = {}
    for m in test:
        by_group.setdefault(m["group"], {})[m["variant"]] = m
    pairs = [(g["base"], g["swap"]) for g in by_group.values() if "swap" in g]
    assert pairs, "no order-swap pair in the test split"
    for base, swap in pairs:
        words = [
            Counter(w for c in m["captions"] for clause in c["spec"]["clauses"] for w in clause["dirs"])
            for m in (base, swap)
        ]
        assert words[0] == words[1]
        assert base["captions"][0]["spec"] != swap["captions"][0]["spec"]
        fa = np.load(out / "features" / f"{base['videoID']}.npy").reshape(-1, 64)
        fb = np.load(out / "features" / f"{swap['videoID']}.npy").reshape(-1, 64)
        assert fa.shape == fb.shape and not np.array_equal(fa, fb)


def test_frame_features_are_exact_whatever_the_batch():
    video = {
        "objects": [
            {
                "shape": "triangle",
                "color": "green",
                "size": "large",
                "r": 0.17,
                "start": [0.3, 0.7],
                "motion": ["right", "up"],
                "lengths": [0.3, 0.25],
            }
        ],
        "n_frames": 9,
        "background": 40,
    }
    frames = render_video_frames(video, 32, noise=2.0, seed=5)
    assert frames.shape == (9, 32, 32, 3)
    batched = frame_features(frames, 256)
    one_by_one = np.concatenate([frame_features(frames[t : t + 1], 256) for t in range(9)])
    assert batched.dtype == np.float32 and batched.shape == (9, 256)
    assert np.array_equal(batched, one_by_one)  # exact integer arithmetic: no BLAS-dependent rounding
    # Frames that differ give different features (the object moves).
    assert not np.allclose(batched[0], batched[-1])
