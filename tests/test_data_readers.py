"""Tests for the Karpathy and VATEX readers, the load-time bad-input policy and the VATEX retrieval split rule.

Fixtures are written here in the exact official formats (Karpathy ``dataset_*.json``; VATEX
``[{"videoID", "enCap", "chCap"}]`` with (1, T, D) and (T, D) feature files).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fastslow.data import (
    DataError,
    RetrievalSplit,
    load_karpathy,
    load_vatex,
    read_vatex_ids,
    report_skipped,
    vatex_retrieval_split,
)

# --------------------------------------------------------------------------------------------- Karpathy


def sentence(raw: str) -> dict:
    return {"raw": raw, "tokens": raw.lower().strip(" .").split(), "imgid": 0, "sentid": 0}


def write_flickr(root, n_captions: int = 5) -> str:
    """Flickr30K style: no filepath, splits train / val / test."""
    images = []
    for i, split in enumerate(["train", "train", "val", "test", "train"]):
        sentences = [sentence(f"Image {i} caption {j} .") for j in range(n_captions)]
        images.append(
            {"filename": f"{1000 + i}.jpg", "imgid": i, "split": split, "sentences": sentences, "sentids": []}
        )
    # The raw text of one caption is empty in this fixture: the reader falls back to its tokens.
    images[0]["sentences"][1] = {"raw": "", "tokens": ["two", "dogs", "play"]}
    images[0]["sentences"][2]["raw"] = "  A dog\nruns   fast . \n"
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image in images:
        (root / "images" / image["filename"]).write_bytes(b"not decoded at load time")
    ann = root / "dataset_flickr30k.json"
    ann.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return str(ann)


def write_coco(root) -> str:
    """COCO style: filepath train2014 / val2014, splits train / restval / val / test, 5-7 captions."""
    rows = [("train2014", "train", 5), ("val2014", "restval", 6), ("val2014", "val", 5), ("val2014", "test", 7)]
    rows += [("val2014", "restval", 5)]
    images = []
    for i, (filepath, split, n) in enumerate(rows):
        filename = f"COCO_{filepath}_{i:012d}.jpg"
        images.append({"filepath": filepath, "filename": filename, "split": split, "cocoid": i,
                       "sentences": [sentence(f"coco {i} {j}") for j in range(n)]})  # fmt: skip
        (root / "coco" / filepath).mkdir(parents=True, exist_ok=True)
        (root / "coco" / filepath / filename).write_bytes(b"x")
    ann = root / "dataset_coco.json"
    ann.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return str(ann)


def assert_grouped(split: RetrievalSplit) -> None:
    """Captions of an item are contiguous and items appear in order."""
    assert split.text_to_visual == sorted(split.text_to_visual)
    assert set(split.text_to_visual) == set(range(split.n_items))


def test_karpathy_flickr_splits(tmp_path):
    ann = write_flickr(tmp_path)
    train = load_karpathy(ann, tmp_path / "images", "train")
    assert train.name == "flickr30k/train" and train.modality == "image"
    assert train.item_ids == ["1000.jpg", "1001.jpg", "1004.jpg"]
    assert train.item_paths == [os.path.join(str(tmp_path), "images", f) for f in train.item_ids]
    assert all(os.path.isabs(p) for p in train.item_paths)
    assert (train.n_items, train.n_texts) == (3, 15)
    assert train.text_to_visual == [0] * 5 + [1] * 5 + [2] * 5
    assert train.captions[0] == "Image 0 caption 0 ."
    assert train.captions[1] == "two dogs play"  # empty raw -> joined tokens
    assert train.captions[2] == "A dog runs fast ."  # stripped, inner whitespace folded
    assert train.skipped == []
    assert_grouped(train)
    test = load_karpathy(ann, tmp_path / "images", "test")
    assert test.item_ids == ["1003.jpg"] and test.captions == [f"Image 3 caption {j} ." for j in range(5)]
    assert load_karpathy(ann, tmp_path / "images", "val").item_ids == ["1002.jpg"]


def test_karpathy_coco_filepath_and_restval(tmp_path):
    ann = write_coco(tmp_path)
    image_dir = tmp_path / "coco"
    train = load_karpathy(ann, image_dir, "train")
    assert train.name == "coco/train"
    assert train.item_ids == ["COCO_train2014_000000000000.jpg", "COCO_val2014_000000000001.jpg",
                              "COCO_val2014_000000000004.jpg"]  # fmt: skip
    assert train.item_paths[1] == os.path.join(str(image_dir), "val2014", "COCO_val2014_000000000001.jpg")
    assert train.n_texts == 5 + 6 + 5 and train.text_to_visual == [0] * 5 + [1] * 6 + [2] * 5
    test = load_karpathy(ann, image_dir, "test")
    assert test.n_texts == 7  # every caption kept, not just the first five
    assert load_karpathy(ann, image_dir, "test", max_captions=5).n_texts == 5
    assert load_karpathy(ann, image_dir, "train", max_captions=5).text_to_visual == [0] * 5 + [1] * 5 + [2] * 5


def test_karpathy_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path, "test")
    message = str(info.value)
    assert str(tmp_path / "dataset_flickr30k.json") in message
    assert "Karpathy" in message and "data.root" in message and "data.ann_file" in message


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ("[]", '"images" list'),
        (json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": []}, {"split": "test"}]}),
         'images[1] has no "filename"'),
        (json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}, {}]}]}),
         "images[0].sentences[1]"),
        (json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": "a caption"}]}),
         'images[0]["sentences"] is a str'),
    ],
)  # fmt: skip
def test_karpathy_malformed(tmp_path, content, expected):
    ann = tmp_path / "dataset_bad.json"
    ann.write_text(content)
    with pytest.raises(DataError) as info:
        load_karpathy(ann, tmp_path, "test")
    assert str(ann) in str(info.value) and expected in str(info.value)


def test_karpathy_missing_images_raise_and_skip(tmp_path):
    ann = write_flickr(tmp_path)
    os.remove(tmp_path / "images" / "1001.jpg")
    os.remove(tmp_path / "images" / "1004.jpg")
    with pytest.raises(DataError) as info:
        load_karpathy(ann, tmp_path / "images", "train")
    message = str(info.value)
    assert str(tmp_path / "images" / "1001.jpg") in message and "2 of 3" in message and "on_error=skip" in message

    train = load_karpathy(ann, tmp_path / "images", "train", on_error="skip")
    assert train.item_ids == ["1000.jpg"] and train.text_to_visual == [0] * 5
    assert train.skipped == [
        (str(tmp_path / "images" / "1001.jpg"), "missing file"),
        (str(tmp_path / "images" / "1004.jpg"), "missing file"),
    ]
    report = report_skipped(train.skipped)
    assert "skipped 2 samples (2 files)" in report and "missing file: 2 samples" in report


def test_karpathy_wrong_image_dir_is_named(tmp_path):
    ann = write_flickr(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_karpathy(ann, tmp_path / "no-such-folder", "test")


def test_karpathy_images_without_sentences(tmp_path):
    ann = write_flickr(tmp_path)
    data = json.loads(open(ann).read())
    data["images"][1]["sentences"] = []
    data["images"][4]["sentences"] = [{"raw": " ", "tokens": []}]  # only an empty caption
    open(ann, "w").write(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[1\] \(1001.jpg\) has no captions \(2 of 3"):
        load_karpathy(ann, tmp_path / "images", "train")
    train = load_karpathy(ann, tmp_path / "images", "train", on_error="skip")
    assert train.item_ids == ["1000.jpg"]
    assert [reason for _, reason in train.skipped] == ["no captions", "no captions"]


def test_karpathy_bad_arguments(tmp_path):
    ann = write_flickr(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_karpathy(ann, tmp_path / "images", "restval")
    with pytest.raises(ValueError, match="data.on_error"):
        load_karpathy(ann, tmp_path / "images", "test", on_error="ignore")


def test_retrieval_split_checks_consistency():
    with pytest.raises(ValueError, match="text_to_visual"):
        RetrievalSplit("x", "image", ["a"], ["/a"], ["c1", "c2"], [0, 1])
    with pytest.raises(ValueError, match="modality"):
        RetrievalSplit("x", "audio", ["a"], ["/a"], ["c1"], [0])


# ------------------------------------------------------------------------------------------------ VATEX

CH_CAP = "一个人在弹吉他。"


def write_vatex(root, shapes: dict[str, tuple[int, ...]], name: str = "vatex_validation_v1.0.json") -> str:
    """A VATEX annotation file plus one feature file per video with the given array shape."""
    (root / "features").mkdir(parents=True, exist_ok=True)
    videos = []
    for k, (video_id, shape) in enumerate(shapes.items()):
        videos.append({"videoID": video_id, "enCap": [f"video {k} caption {j}" for j in range(10)],
                       "chCap": [CH_CAP] * 10})  # fmt: skip
        np.save(root / "features" / f"{video_id}.npy", np.full(shape, k, dtype=np.float32))
    ann = root / name
    ann.write_text(json.dumps(videos, ensure_ascii=False))
    return str(ann)


SHAPES = {"Ptf_2VRj-V0_000122_000132": (1, 7, 8), "abc_000001_000011": (12, 8), "xyz_000005_000015": (1, 32, 8)}


def test_vatex_reader(tmp_path):
    ann = write_vatex(tmp_path, SHAPES)
    split = load_vatex(ann, tmp_path / "features")
    assert split.name == "vatex/validation" and split.modality == "video"
    assert split.item_ids == list(SHAPES)
    assert split.item_paths == [os.path.join(str(tmp_path), "features", f"{v}.npy") for v in SHAPES]
    assert (split.n_items, split.n_texts) == (3, 30)
    assert split.text_to_visual == [0] * 10 + [1] * 10 + [2] * 10
    assert split.captions[10] == "video 1 caption 0"
    assert not any(CH_CAP in c for c in split.captions)  # English only
    assert load_vatex(ann, tmp_path / "features", max_captions=2).n_texts == 6


def test_vatex_select_keeps_given_order(tmp_path):
    ann = write_vatex(tmp_path, SHAPES)
    ids = list(SHAPES)
    split = load_vatex(ann, tmp_path / "features", select=[ids[2], ids[0]])
    assert split.item_ids == [ids[2], ids[0]]
    assert split.captions[0] == "video 2 caption 0" and split.text_to_visual[10] == 1
    with pytest.raises(DataError, match="not in this file") as info:
        load_vatex(ann, tmp_path / "features", select=["nope"])
    assert ann in str(info.value)


def test_vatex_missing_features_raise_and_skip(tmp_path):
    ann = write_vatex(tmp_path, SHAPES)
    missing = os.path.join(str(tmp_path), "features", "abc_000001_000011.npy")
    os.remove(missing)
    with pytest.raises(DataError) as info:
        load_vatex(ann, tmp_path / "features")
    assert missing in str(info.value) and "1 of 3" in str(info.value)
    split = load_vatex(ann, tmp_path / "features", on_error="skip")
    assert split.item_ids == ["Ptf_2VRj-V0_000122_000132", "xyz_000005_000015"]
    assert split.skipped == [(missing, "missing file")]
    assert split.text_to_visual == [0] * 10 + [1] * 10


def test_vatex_missing_and_malformed_annotations(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_vatex(tmp_path / "vatex_training_v1.0.json", tmp_path)
    assert "vatex_training_v1.0.json" in str(info.value) and "data.root" in str(info.value)
    bad = tmp_path / "vatex_bad.json"
    bad.write_text(json.dumps([{"videoID": "a", "enCap": ["x"]}, {"enCap": ["y"]}]))
    with pytest.raises(DataError, match=r'\[1\] has no "videoID"'):
        load_vatex(bad, tmp_path)
    bad.write_text(json.dumps([{"videoID": "a", "enCap": ["x"]}, {"videoID": "a", "enCap": ["y"]}]))
    with pytest.raises(DataError, match="repeats videoID"):
        load_vatex(bad, tmp_path)
    bad.write_text(json.dumps({"videoID": "a"}))
    with pytest.raises(DataError, match="JSON list"):
        load_vatex(bad, tmp_path)


def test_vatex_videos_without_english_captions(tmp_path):
    ann = write_vatex(tmp_path, SHAPES)
    data = json.loads(open(ann, encoding="utf-8").read())
    data[0]["enCap"] = []
    open(ann, "w", encoding="utf-8").write(json.dumps(data))
    with pytest.raises(DataError, match="no captions"):
        load_vatex(ann, tmp_path / "features")
    assert load_vatex(ann, tmp_path / "features", on_error="skip").n_items == 2


def test_vatex_retrieval_split_rule(tmp_path):
    ids = [f"vid{i:04d}_{(i * 7919) % 3000:06d}" for i in range(3000)]  # file order is not sorted order
    halves = vatex_retrieval_split(ids)
    assert halves["val"] == ids[:1500] and halves["test"] == ids[1500:]
    assert vatex_retrieval_split(list(ids)) == halves  # deterministic
    assert vatex_retrieval_split(ids[:10], n_val=4) == {"val": ids[:4], "test": ids[4:10]}
    with pytest.raises(ValueError):
        vatex_retrieval_split(ids[:1500])  # nothing left for test
    with pytest.raises(ValueError):
        vatex_retrieval_split(["a", "a", "b"], n_val=1)

    # End to end: ids read from the file before any skipping, so a missing feature does not shift the cut.
    ann = write_vatex(tmp_path, SHAPES)
    os.remove(tmp_path / "features" / "Ptf_2VRj-V0_000122_000132.npy")
    halves = vatex_retrieval_split(read_vatex_ids(ann), n_val=1)
    assert halves == {"val": ["Ptf_2VRj-V0_000122_000132"], "test": ["abc_000001_000011", "xyz_000005_000015"]}
    test = load_vatex(ann, tmp_path / "features", select=halves["test"], on_error="skip")
    assert test.item_ids == halves["test"]


# ------------------------------------------------------------------------------------- standard protocols


def _recipe(name: str, root, *overrides: str):
    from fastslow.config import load_recipe

    return load_recipe([f"recipe={name}", f"data.root={root}", *overrides])


def test_coco_test_keeps_the_first_five_captions_per_image(tmp_path, capsys):
    """COCO 5k test is 25,000 captions, 5 per image, where the file holds 25,010: the first 5 in file order are kept
    (an image with 6 or 7 loses its last ones), the count left out is printed, and train keeps every caption."""
    from fastslow import stages

    ann = write_coco(tmp_path)
    data = json.loads(open(ann).read())
    data["images"][2]["split"] = "test"  # a second test image, with 5 captions; the other test image has 7
    data["images"][2]["sentences"].append(sentence("coco 2 5"))  # now 6
    open(ann, "w").write(json.dumps(data))
    cfg = _recipe("coco", tmp_path, f"data.image_dir={tmp_path / 'coco'}")
    capsys.readouterr()
    test = stages.load_split(cfg, "test")
    assert test.n_items == 2 and test.n_texts == 10 and test.text_to_visual == [0] * 5 + [1] * 5
    assert test.captions == [f"coco 2 {j}" for j in range(5)] + [f"coco 3 {j}" for j in range(5)]
    assert test.dropped_captions == 1 + 2
    assert "3 further captions left out" in capsys.readouterr().out
    assert stages.load_split(cfg, "train").n_texts == 5 + 6 + 5  # training keeps them all
    assert stages.load_split(_recipe("coco", tmp_path, f"data.image_dir={tmp_path / 'coco'}",
                                     "data.eval_captions=null"), "test").n_texts == 13  # fmt: skip


def test_flickr_test_is_five_captions_per_image(tmp_path):
    from fastslow import stages

    ann = write_flickr(tmp_path, n_captions=6)
    cfg = _recipe("flickr", tmp_path, f"data.image_dir={tmp_path / 'images'}", f"data.ann_file={ann}")
    for split in ("val", "test"):
        s = stages.load_split(cfg, split)
        assert s.n_texts == 5 * s.n_items and s.dropped_captions == s.n_items
    assert stages.load_split(cfg, "train").n_texts == 6 * 3


def _vatex_run(tmp_path, lists=None, *overrides):
    """A VATEX layout (training + validation files, features) and the recipe over it; ``lists``: the split file."""
    val_ids = [f"val{i}_000000_000010" for i in range(6)]
    write_vatex(tmp_path, {v: (4, 8) for v in val_ids})
    write_vatex(tmp_path, {"trn0_000000_000010": (4, 8), "trn1_000000_000010": (4, 8)}, "vatex_training_v1.0.json")
    args = ["data.n_val=2", *overrides]
    if lists is not None:
        path = tmp_path / "split.json"
        path.write_text(lists if isinstance(lists, str) else json.dumps(lists))
        args.append(f"data.split_file={path}")
    return _recipe("vatex", tmp_path, *args), val_ids


def test_vatex_split_file_gives_val_and_test_in_its_order(tmp_path):
    from fastslow import stages

    cfg, ids = _vatex_run(tmp_path, {"val": [ids_ := f"val{5}_000000_000010", "val0_000000_000010"],
                                     "test": ["val3_000000_000010", "val1_000000_000010"]})  # fmt: skip
    assert stages.load_split(cfg, "val").item_ids == [ids_, "val0_000000_000010"]
    test = stages.load_split(cfg, "test")
    assert test.name == "vatex/test" and test.item_ids == ["val3_000000_000010", "val1_000000_000010"]
    assert test.captions[0] == "video 3 caption 0"
    assert stages.load_split(cfg, "train").item_ids == ["trn0_000000_000010", "trn1_000000_000010"]
    # A train list, when given, selects the training videos too.
    cfg, _ = _vatex_run(tmp_path, {"val": [ids[0]], "test": [ids[1]], "train": ["trn1_000000_000010"]})
    assert stages.load_split(cfg, "train").item_ids == ["trn1_000000_000010"]
    # The documented fallback: the official validation file cut in its own order (data.n_val first videos val).
    cfg, ids = _vatex_run(tmp_path)
    assert stages.load_split(cfg, "val").item_ids == ids[:2] and stages.load_split(cfg, "test").item_ids == ids[2:]


@pytest.mark.parametrize(
    "lists, error, needles",
    [
        (None, "missing", ["split file not found", "data.split_file"]),
        ({"val": ["val0_000000_000010"], "test": ["nope_1", "val1_000000_000010", "nope_2"]}, DataError,
         ['2 of the 3 "test" videoIDs are not in the official validation', "nope_1, nope_2"]),
        ({"val": ["val0_000000_000010"], "test": ["trn0_000000_000010"]}, DataError, ["trn0_000000_000010"]),
        ({"val": ["val0_000000_000010"], "test": ["val1_000000_000010"], "train": ["val2_000000_000010"]}, DataError,
         ['"train" videoIDs are not in the official training', "val2_000000_000010"]),
        ({"val": ["val0_000000_000010"], "test": ["val0_000000_000010"]}, DataError,
         ["val0_000000_000010 (also in val)"]),
        ({"val": ["val0_000000_000010", "val0_000000_000010"], "test": ["val1_000000_000010"]}, DataError,
         ["twice"]),
        ({"val": ["val0_000000_000010"]}, DataError, ["expected val and test lists"]),
        ({"val": ["val0_000000_000010"], "test": [], "tset": []}, DataError, ["unknown keys ['tset']"]),
        ({"val": ["val0_000000_000010"], "test": [3]}, DataError, ['"test" is not a non-empty list']),
        ("{not json", DataError, ["not valid JSON"]),
    ],
)  # fmt: skip
def test_bad_split_file_is_refused_naming_the_file_and_ids(tmp_path, lists, error, needles):
    from fastslow import stages
    from fastslow.errors import MissingFileError

    cfg, _ = _vatex_run(tmp_path, {"val": [], "test": []} if lists is None else lists)
    split_file = str(tmp_path / "split.json")
    if lists is None:
        os.remove(split_file)
        error = MissingFileError
    for split in ("val", "test", "train"):
        with pytest.raises(error) as info:
            stages.load_split(cfg, split)
        message = str(info.value)
        assert split_file in message and all(n in message for n in needles), message
