"""Reader for VATEX annotations over precomputed clip features, and the VATEX retrieval split rule.

Format (``vatex_training_v1.0.json``, ``vatex_validation_v1.0.json``)::

    [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": [10 English captions], "chCap": [10 Chinese captions]}, ...]

Features: one ``feature_dir/<videoID>.npy`` per video, I3D clip features of shape (1, T, 1024) or (T, 1024).
Only the English captions are used.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from fastslow.data.datasets import RetrievalSplit, _assemble_split, _Entry, check_on_error
from fastslow.data.karpathy import _field, _read_json
from fastslow.errors import DataError, MissingFileError

__all__ = ["load_vatex", "read_vatex_ids", "read_split_file", "vatex_retrieval_split", "VATEX_N_VAL"]

# The retrieval protocol used since HGR / "Support-set bottlenecks": train on the 25,991 training videos,
# cut the 3,000 official validation videos into 1,500 for validation and 1,500 for testing.
VATEX_N_VAL = 1500

_WHERE_TO_GET = (
    "get vatex_training_v1.0.json / vatex_validation_v1.0.json from https://eric-xw.github.io/vatex-website/"
    "download.html and set data.root (the folder holding them) or data.ann_file (the file itself)"
)


def load_vatex(
    ann_file: str | os.PathLike,
    feature_dir: str | os.PathLike,
    *,
    on_error: str = "raise",
    select: Sequence[str] | None = None,
    max_captions: int | None = None,
) -> RetrievalSplit:
    """Read a VATEX annotation file into a video retrieval split over ``feature_dir/<videoID>.npy``.

    Args:
        ann_file: a VATEX annotation file (a JSON list of ``{"videoID", "enCap", "chCap"}``).
        feature_dir: folder of per-video feature files ``<videoID>.npy``.
        on_error: what to do with a video whose feature file is missing or that has no English caption:
            ``"raise"`` a `DataError` naming the first such file and how many there are, or ``"skip"`` it and
            list it in the split's ``skipped``.
        select: keep only these videoIDs, in this order (e.g. one half of `vatex_retrieval_split`); all
            videos in file order when None.
        max_captions: keep at most this many captions per video (the first ones); all when None.

    Returns:
        A `RetrievalSplit` named ``"vatex/<file>"`` (``vatex_validation_v1.0.json`` -> ``"vatex/validation"``;
        rename it with ``dataclasses.replace`` when selecting), modality ``"video"``.

    Raises:
        FileNotFoundError: ``ann_file`` does not exist (the message says where to get it).
        DataError: malformed JSON, a missing key, a duplicated videoID, a ``select`` id absent from the file,
            or a missing feature file / a video without captions under ``on_error="raise"``.
    """
    check_on_error(on_error)
    ann_file, feature_dir = os.path.abspath(ann_file), os.path.abspath(feature_dir)
    data = _read_json(ann_file, _WHERE_TO_GET)
    if not isinstance(data, list):
        raise DataError.for_file(
            ann_file, 'expected a JSON list of {"videoID", "enCap", ...} objects (the VATEX format)', _WHERE_TO_GET
        )

    entries: dict[str, _Entry] = {}
    for i, video in enumerate(data):
        where = f"[{i}]"
        video_id = _field(video, "videoID", str, ann_file, where)
        if video_id in entries:
            raise DataError.for_file(
                ann_file, f"{where} repeats videoID {video_id!r} ({entries[video_id].where})", reason="malformed entry"
            )
        en_caps = _field(video, "enCap", list, ann_file, where)
        if not all(isinstance(c, str) for c in en_caps):
            raise DataError.for_file(ann_file, f'{where}["enCap"] is not a list of strings', reason="malformed entry")
        captions = [" ".join(c.split()) for c in en_caps]
        captions = [c for c in captions if c]
        entries[video_id] = _Entry(video_id, os.path.join(feature_dir, f"{video_id}.npy"), captions, where)

    if select is None:
        chosen = list(entries.values())
    else:
        select = list(select)
        if len(set(select)) != len(select):
            raise ValueError("select holds a videoID more than once")
        unknown = [v for v in select if v not in entries]
        if unknown:
            raise DataError.for_file(
                ann_file,
                f"{len(unknown)} selected videoIDs are not in this file, e.g. {unknown[:3]}",
                "select ids from the same annotation file",
                reason="unknown videoID",
            )
        chosen = [entries[v] for v in select]

    name = re.sub(r"_v\d+(\.\d+)*$", "", Path(ann_file).stem.removeprefix("vatex_"))
    return _assemble_split(
        f"vatex/{name}",
        "video",
        chosen,
        ann_file=ann_file,
        folder=feature_dir,
        on_error=on_error,
        max_captions=max_captions,
    )


def read_vatex_ids(ann_file: str | os.PathLike) -> list[str]:
    """The videoIDs of a VATEX annotation file, in file order, whether or not their features exist.

    Example:
        >>> halves = vatex_retrieval_split(read_vatex_ids("vatex_validation_v1.0.json"))
        >>> test = load_vatex("vatex_validation_v1.0.json", "features", select=halves["test"])
    """
    ann_file = os.path.abspath(ann_file)
    data = _read_json(ann_file, _WHERE_TO_GET)
    if not isinstance(data, list):
        raise DataError.for_file(ann_file, 'expected a JSON list of {"videoID", "enCap", ...} objects', _WHERE_TO_GET)
    return [_field(video, "videoID", str, ann_file, f"[{i}]") for i, video in enumerate(data)]


def vatex_retrieval_split(val_ids: Sequence[str], n_val: int = VATEX_N_VAL) -> dict[str, list[str]]:
    """Cut the official VATEX validation videos into a retrieval val and test split.

    The rule is deterministic and documented so that numbers are comparable: keep the official
    validation file's order, the first ``n_val`` videos are ``val``, the rest are ``test`` (official VATEX:
    3,000 videos -> 1,500 / 1,500).

    Args:
        val_ids: the videoIDs of the official validation file, in file order, before any skipping
            (`read_vatex_ids`), so that a missing feature file cannot shift the cut.
        n_val: how many go to ``val``.

    Returns:
        ``{"val": val_ids[:n_val], "test": val_ids[n_val:]}``.

    Raises:
        ValueError: duplicated ids, or ``n_val`` leaving either part empty.
    """
    val_ids = list(val_ids)
    if len(set(val_ids)) != len(val_ids):
        raise ValueError("vatex_retrieval_split: val_ids holds a videoID more than once")
    if not 0 < n_val < len(val_ids):
        raise ValueError(
            f"vatex_retrieval_split: n_val={n_val} must be between 1 and {len(val_ids) - 1} for {len(val_ids)} ids"
        )
    return {"val": val_ids[:n_val], "test": val_ids[n_val:]}


_SPLIT_FILE_FORMAT = (
    'a JSON object {"val": [videoID, ...], "test": [videoID, ...], "train": [...] (optional)}, e.g. made from the '
    "published lists of the common retrieval split (one videoID per line) with "
    "python -c \"import json; r=lambda f: open(f).read().split(); json.dump({'val': r('val_list.txt'), "
    "'test': r('test_list.txt')}, open('split.json', 'w'))\""
)


def read_split_file(
    split_file: str | os.PathLike, *, val_ids: Sequence[str], train_ids: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Read a user-given retrieval split of VATEX (recipe key ``data.split_file``), checked against the annotations.

    Published VATEX retrieval numbers use fixed lists of 1,500 val and 1,500 test videos drawn from the official
    validation file (HGR, CLIP4Clip, ...); `vatex_retrieval_split`'s cut in file order is only the fallback when no
    list is given, and its figures are not comparable with those papers.

    Args:
        split_file: ``{"val": [...], "test": [...]}`` and optionally ``"train": [...]`` (videoIDs).
        val_ids: the videoIDs of the official validation file (`read_vatex_ids`), where val and test must come from.
        train_ids: the videoIDs of the official training file, checked only when the file has a ``"train"`` list.

    Returns:
        ``{"val": [...], "test": [...]}`` (plus ``"train"`` when given), each in the split file's order.

    Raises:
        MissingFileError: ``split_file`` does not exist.
        DataError: not JSON or not of that format, a videoID listed twice or in two splits, or videoIDs absent
            from the annotation file they must come from (the message names the file, how many and the first ones).
    """
    split_file = os.path.abspath(split_file)
    if not os.path.isfile(split_file):
        raise MissingFileError(
            f"file {split_file}: split file not found (data.split_file); it should be {_SPLIT_FILE_FORMAT}, or set "
            "data.split_file=null for the cut in file order"
        )
    data = _read_json(split_file, _SPLIT_FILE_FORMAT)
    wanted = ("val", "test") + (("train",) if isinstance(data, dict) and "train" in data else ())
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("val", "test")):
        raise DataError.for_file(split_file, "expected val and test lists", f"write {_SPLIT_FILE_FORMAT}",
                                 reason="malformed split file")  # fmt: skip
    unknown_keys = sorted(set(data) - {"val", "test", "train"})
    if unknown_keys:
        raise DataError.for_file(split_file, f"unknown keys {unknown_keys}", f"write {_SPLIT_FILE_FORMAT}",
                                 reason="malformed split file")  # fmt: skip
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}  # videoID -> the split that lists it first
    for name in wanted:
        ids = data[name]
        if not isinstance(ids, list) or not all(isinstance(v, str) for v in ids) or not ids:
            raise DataError.for_file(split_file, f'"{name}" is not a non-empty list of videoID strings',
                                     f"write {_SPLIT_FILE_FORMAT}", reason="malformed split file")  # fmt: skip
        # An id in two lists would put a test video in val or train: the figures would then be meaningless.
        repeated = [v for v, n in Counter(ids).items() if n > 1]
        shared = [f"{v} (also in {seen[v]})" for v in dict.fromkeys(ids) if v in seen]
        if repeated or shared:
            raise DataError.for_file(
                split_file,
                f'"{name}" lists {len(repeated)} videoIDs twice and {len(shared)} of another split, e.g. '
                + ", ".join((repeated + shared)[:3]),
                "list each video once, in one split",
                reason="malformed split file",
            )
        seen.update({v: name for v in ids})
        out[name] = list(ids)

    for name, source, known in (("val", "validation", val_ids), ("test", "validation", val_ids),
                                ("train", "training", train_ids)):  # fmt: skip
        if name not in out or known is None:
            continue
        known = set(known)
        absent = [v for v in out[name] if v not in known]
        if absent:
            raise DataError.for_file(
                split_file,
                f'{len(absent)} of the {len(out[name])} "{name}" videoIDs are not in the official {source} '
                f"annotation file (data.ann_{'train' if name == 'train' else 'val'}), e.g. {', '.join(absent[:5])}",
                f"use the split lists that go with these annotation files (val and test are drawn from the official "
                f"validation videos), or set data.split_file=null for the cut in file order",
                reason="unknown videoID",
            )
    return out
