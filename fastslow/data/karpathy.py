"""Reader for the Karpathy split files of Flickr30K and COCO (and of the built-in shapes data).

Format (``dataset_flickr30k.json``, ``dataset_coco.json``)::

    {"images": [{"filename": "1000092795.jpg", "filepath": "val2014"?, "split": "train|val|test|restval",
                 "sentences": [{"raw": "Two young guys ...", "tokens": ["two", "young", ...]}, ...]}, ...]}

COCO's ``restval`` images (the 30,504 val2014 images outside the 5k val / 5k test) are training images
in every paper that uses these splits, so ``split="train"`` includes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastslow.data.datasets import RetrievalSplit, _assemble_split, _Entry, check_on_error
from fastslow.errors import DataError, MissingFileError

__all__ = ["load_karpathy", "KARPATHY_SPLITS"]

# Which values of an image's "split" field belong to each split we can ask for.
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}

_WHERE_TO_GET = (
    "get the Karpathy split files, distributed with many captioning repos as dataset_flickr30k.json / "
    "dataset_coco.json (e.g. in caption_datasets.zip from https://cs.stanford.edu/people/karpathy/deepimagesent/), "
    "and set data.root (the folder holding it) or data.ann_file (the file itself)"
)


def load_karpathy(
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    split: str,
    *,
    on_error: str = "raise",
    max_captions: int | None = None,
) -> RetrievalSplit:
    """Read one split of a Karpathy-format annotation file.

    Args:
        ann_file: ``dataset_flickr30k.json``, ``dataset_coco.json`` or any file in that format.
        image_dir: the image folder; an image's path is ``image_dir/filepath/filename`` when the entry has
            a ``filepath`` (COCO: ``val2014``), else ``image_dir/filename``.
        split: ``"train"`` (includes ``restval``), ``"val"`` or ``"test"``.
        on_error: what to do with an image whose file is missing or that has no sentences: ``"raise"`` a
            `DataError` naming the first such file and how many there are, or ``"skip"`` it and list it in
            the returned split's ``skipped`` (the caller reports the count).
        max_captions: keep at most this many captions per image (the first ones); all when None.

    Returns:
        A `RetrievalSplit` named ``"<dataset>/<split>"`` (``dataset_coco.json`` -> ``"coco/test"``), captions
        from each sentence's ``raw`` (stripped; ``" ".join(tokens)`` when ``raw`` is empty), grouped by image.

    Raises:
        MissingFileError: ``ann_file`` does not exist (the message says where to get it); a FileNotFoundError.
        DataError: malformed JSON, a missing key or a filename listed twice (the message names the file and the
            entries), or a
            missing image / an image without sentences under ``on_error="raise"``.
        ValueError: an unknown ``split`` or ``on_error``.
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {sorted(KARPATHY_SPLITS)}, got {split!r}")
    check_on_error(on_error)
    ann_file, image_dir = os.path.abspath(ann_file), os.path.abspath(image_dir)
    data = _read_json(ann_file, _WHERE_TO_GET)

    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError.for_file(
            ann_file, 'expected a JSON object with an "images" list (the Karpathy split format)', _WHERE_TO_GET
        )
    wanted = KARPATHY_SPLITS[split]
    entries = []
    first_seen: dict[str, str] = {}  # filename -> where it first appears, over every split of the file
    for i, image in enumerate(images):
        where = f"images[{i}]"
        image_split = _field(image, "split", str, ann_file, where)
        filename = _field(image, "filename", str, ann_file, where)
        # The filename is the item's id everywhere downstream (index manifest, token store rows, metrics): two
        # entries for one file would be one item twice (crashing the token store after the index is written), or
        # one image in two splits (test images trained on). Refused whatever the split asked for.
        if filename in first_seen:
            raise DataError.for_file(
                ann_file,
                f"{where} repeats filename {filename!r} ({first_seen[filename]})",
                "the Karpathy format has one entry per image, holding all its sentences: merge the entries or "
                "remove one",
                reason="malformed entry",
            )
        first_seen[filename] = where
        if image_split not in wanted:
            continue
        filepath = image.get("filepath") or ""
        sentences = _field(image, "sentences", list, ann_file, where)
        captions = [_caption(s, ann_file, f"{where}.sentences[{j}]") for j, s in enumerate(sentences)]
        # An empty caption carries no signal and would train the captioner to emit EOS at once.
        captions = [c for c in captions if c]
        entries.append(_Entry(filename, os.path.join(image_dir, filepath, filename), captions, where))

    dataset = Path(ann_file).stem.removeprefix("dataset_")
    return _assemble_split(
        f"{dataset}/{split}",
        "image",
        entries,
        ann_file=ann_file,
        folder=image_dir,
        on_error=on_error,
        max_captions=max_captions,
    )


def _read_json(ann_file: str, where_to_get: str) -> Any:
    """Parse a JSON annotation file; missing -> FileNotFoundError saying ``where_to_get`` it, bad -> DataError."""
    if not os.path.isfile(ann_file):
        raise MissingFileError(f"file {ann_file}: annotation file not found; {where_to_get}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError.for_file(
            ann_file, f"not valid JSON ({err})", "re-download the annotation file", reason="malformed JSON"
        ) from err


def _field(entry: Any, key: str, kind: type, ann_file: str, where: str) -> Any:
    """``entry[key]`` checked to be a ``kind``; a DataError naming the file, the entry and the key otherwise."""
    if not isinstance(entry, dict):
        raise DataError.for_file(
            ann_file, f"{where} is a {type(entry).__name__}, expected an object", reason="malformed entry"
        )
    if key not in entry:
        raise DataError.for_file(ann_file, f'{where} has no "{key}" key', reason="malformed entry")
    value = entry[key]
    if not isinstance(value, kind):
        raise DataError.for_file(
            ann_file,
            f'{where}["{key}"] is a {type(value).__name__}, expected a {kind.__name__}',
            reason="malformed entry",
        )
    return value


def _caption(sentence: Any, ann_file: str, where: str) -> str:
    """The caption of one Karpathy sentence: ``raw`` stripped, or the joined ``tokens`` when ``raw`` is empty."""
    if not isinstance(sentence, dict) or ("raw" not in sentence and "tokens" not in sentence):
        raise DataError.for_file(ann_file, f'{where} has neither "raw" nor "tokens"', reason="malformed entry")
    raw = sentence.get("raw") or ""
    if not isinstance(raw, str):
        raise DataError.for_file(
            ann_file, f'{where}["raw"] is a {type(raw).__name__}, expected a str', reason="malformed entry"
        )
    raw = " ".join(raw.split())  # also folds the stray newlines and double spaces found in COCO captions
    if raw:
        return raw
    tokens = sentence.get("tokens") or []
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise DataError.for_file(ann_file, f'{where}["tokens"] is not a list of strings', reason="malformed entry")
    return " ".join(tokens)
