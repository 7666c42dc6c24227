"""Glue from a recipe to the library, shared by the tools so that each tool stays a short script.

The library itself takes plain keyword arguments (`create_teacher(**kw)`, `load_karpathy(...)`); the
functions here read the recipe sections, apply the conventions of a run directory
(`${output_dir}/teacher`, `/student`, `/index`, `/eval`, a shared `tokenizer.json`) and build things.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fastslow.artefacts import atomic_write_json, check_stamp, load_weights, read_json, read_safetensors
from fastslow.config import ConfigError, load_saved_config, save_config, to_kwargs
from fastslow.data import (
    AugmentingImageLoader,
    FeatureLoader,
    ImageLoader,
    RetrievalSplit,
    SkipLedger,
    captions_per_path,
    gather_ledger,
    load_karpathy,
    load_vatex,
    read_split_file,
    read_vatex_ids,
    reason_of,
    report_skipped,
    vatex_retrieval_split,
)
from fastslow.errors import CheckpointError, MissingFileError, UserError
from fastslow.tokenizer import TextTokenizer, load_pretrained_tokenizer, train_tokenizer

IMAGE_DATASETS = ("shapes", "karpathy")
VIDEO_DATASETS = ("shapes_video", "vatex")


# ---------------------------------------------------------------- paths


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """`${output_dir}/<stage>` for stage in teacher | student | index | eval."""
    return Path(cfg.output_dir) / stage


def modality(cfg: DictConfig) -> str:
    if cfg.data.dataset in IMAGE_DATASETS:
        return "image"
    if cfg.data.dataset in VIDEO_DATASETS:
        return "video"
    raise ConfigError(f"data.dataset={cfg.data.dataset!r} is not one of {', '.join(IMAGE_DATASETS + VIDEO_DATASETS)}")


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def rebuild_command(cfg: DictConfig, tool: str) -> str:
    """The command that rebuilds a stage's artefacts for this run (named in every staleness error); the user adds
    the overrides of the run being repaired."""
    return f"python tools/{tool} recipe={cfg.recipe} output_dir={cfg.output_dir}"


# ---------------------------------------------------------------- stamps


def visual_stamp(cfg: DictConfig) -> dict[str, Any]:
    """The recipe settings an item's visual tensor depends on besides its file, hence everything computed from it
    (student embeddings, index, teacher tokens): the image size, or the clip length and feature size."""
    if modality(cfg) == "image":
        return {"data.image_size": cfg.data.image_size}
    return {"data.max_frames": cfg.data.max_frames, "data.feature_dim": cfg.data.feature_dim}


def tokenizer_source(cfg: DictConfig) -> str | None:
    """Where the run's tokenizer comes from: `tokenizer.path`; else, for a student whose text tower is pretrained
    (`student.text_pretrained_path`), the tokenizer saved with that tower (its Hugging Face directory); else None (one
    is trained on the captions)."""
    if cfg.tokenizer.path:
        return str(cfg.tokenizer.path)
    if cfg.student.text_pretrained_path:
        return _pretrained_tokenizer_dir(cfg.student.text_pretrained_path, "student.text_pretrained_path",
                                         "tokenizer.path")  # fmt: skip
    return None


def tokenizer_stamp(cfg: DictConfig) -> dict[str, Any]:
    """The recipe's `tokenizer.*` settings that decide `${output_dir}/tokenizer.json`. A pretrained tokenizer
    (tokenizer.path, or the text tower's own) keeps its own vocabulary, so vocab_size only counts for one trained
    here."""
    path = tokenizer_source(cfg)
    return {"tokenizer.path": path, "tokenizer.vocab_size": None if path else int(cfg.tokenizer.vocab_size)}


def open_gallery_tokens(cfg: DictConfig, index_manifest: dict[str, Any], teacher_hash: str):
    """The teacher's visual tokens of the indexed gallery (`${output_dir}/index/tokens`), checked against the index
    they are used with and the current teacher. The index and the tokens are two writes: a crash between them, or
    a rebuilt index beside an old store, would otherwise rerank rows of another gallery or another teacher."""
    from teachers import TokenStore

    expect = {"teacher_hash": teacher_hash, "gallery_hash": index_manifest["gallery_hash"], **visual_stamp(cfg)}
    return TokenStore.open(
        stage_dir(cfg, "index") / "tokens", expect=expect, rebuild=rebuild_command(cfg, "build_index.py")
    )


# ---------------------------------------------------------------- data


def ensure_shapes(cfg: DictConfig, accelerator=None) -> None:
    """Generate the built-in shapes data under `data.root` when it is missing or was made with other
    settings (it is deterministic and takes seconds, so regenerating beats a confusing mismatch)."""
    from fastslow.data import shapes

    if cfg.data.dataset not in ("shapes", "shapes_video"):
        return
    root = Path(cfg.data.root)
    params = to_kwargs(cfg.data.generate)
    stamp = root / "generator.json"
    wanted = {"dataset": cfg.data.dataset, **params}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return
    if accelerator is None or accelerator.is_main_process:
        print(f"generating the built-in {cfg.data.dataset} data in {root} ...", flush=True)
        # Removed first: a generation that dies half-way must not leave the old stamp over the new files.
        stamp.unlink(missing_ok=True)
        fn = shapes.generate_shapes if cfg.data.dataset == "shapes" else shapes.generate_shapes_video
        summary = fn(root, **params)
        if cfg.data.dataset == "shapes_video" and summary["n_val"] != cfg.data.n_val:
            raise ConfigError(
                f"data.n_val={cfg.data.n_val} but the generator wrote {summary['n_val']} val videos "
                f"(n_val_groups x group_size): set data.n_val={summary['n_val']}"
            )
        print(f"  {summary}", flush=True)
        atomic_write_json(stamp, wanted)
    if accelerator is not None:
        accelerator.wait_for_everyone()


def load_split(cfg: DictConfig, split: str, ledger: SkipLedger | None = None) -> RetrievalSplit:
    """One split (train | val | test) of the recipe's dataset, failing fast on missing files.

    Under `data.on_error=skip` the items dropped at load time (missing file, no captions) are reported
    here, on the main process, and recorded in the run's `ledger` when one is given: the passes that read
    items later record what fails while reading.
    """
    d = cfg.data
    # The standard protocols score a fixed number of captions per val / test item: the first ones in file order
    # (COCO 5k test: 5 per image, 25,000, where the file holds 25,010). The captions left out are counted and printed.
    cap = d.max_captions
    if split != "train" and d.eval_captions is not None:
        cap = d.eval_captions if cap is None else min(cap, d.eval_captions)
    if d.dataset in IMAGE_DATASETS:
        out = load_karpathy(d.ann_file, d.image_dir, split, on_error=d.on_error, max_captions=cap)
    else:
        ann = d.ann_train if split == "train" else d.ann_val
        out = load_vatex(ann, d.feature_dir, on_error=d.on_error, select=vatex_ids(cfg, split), max_captions=cap)
    if d.dataset in VIDEO_DATASETS:
        # load_vatex names a split after its file, so val and test would both be "vatex/validation" (in the
        # manifest, the eval table and fuse_alpha.json); name them after the recipe's dataset and split instead.
        out = dataclasses.replace(out, name=f"{d.dataset}/{split}")
    if out.dropped_captions and is_main():
        print(
            f"{out.name}: {out.n_texts} captions, the first {cap} of each item in file order; "
            f"{out.dropped_captions} further captions left out (data.max_captions / data.eval_captions)",
            flush=True,
        )
    if out.skipped and is_main():
        total = out.n_items + len(out.skipped)
        print(
            f"{out.name}: dropped {len(out.skipped)} of {total} items (data.on_error=skip)\n"
            f"{report_skipped(out.skipped)}",
            flush=True,
        )
    if ledger is not None:
        ledger.add_split(out)
    return out


def vatex_ids(cfg: DictConfig, split: str) -> list[str] | None:
    """The videoIDs of one split of a video dataset, in order: from `data.split_file` when it is set (the published
    lists; a train list is optional), else the fallback: every training video, and the official validation file cut
    in its own order (`vatex_retrieval_split`, `data.n_val`). None: every video of the training file."""
    d = cfg.data
    if d.split_file is not None:
        # The whole file is checked whichever split is asked for, so that every stage refuses the same bad file.
        lists = read_split_file(d.split_file, val_ids=read_vatex_ids(d.ann_val), train_ids=read_vatex_ids(d.ann_train))
        return lists.get(split)
    if split == "train":
        return None
    return vatex_retrieval_split(read_vatex_ids(d.ann_val), n_val=d.n_val)[split]


def drop_unread(
    split: RetrievalSplit, left_out: list[int], load_visual, ledger: SkipLedger, where: str
) -> tuple[list[int], RetrievalSplit, list[dict[str, str]]]:
    """Leave the items a pass could not read (``left_out``, indices) out of ``split``, recording each in ``ledger``.

    The reason of each is asked of the file again (`reason_of`): a sharded, resumable pass (`encode_gallery`)
    keeps which items got no embedding, not why. An item that loads now got no embedding for another reason,
    which is a bug, not bad input: it raises.

    Returns:
        ``(kept, split without them, [{"id", "path", "reason"}, ...])``, ``kept`` the indices of the items left.
    """
    captions, skipped = captions_per_path(split), []
    for i in sorted(left_out):
        path = split.item_paths[i]
        reason = reason_of(load_visual, path)
        if reason is None:
            raise RuntimeError(f"{split.name} item {split.item_ids[i]} ({path}) got no embedding, yet it loads")
        ledger.add(path, reason, where=where, captions=captions.get(path, 0))
        skipped.append({"id": split.item_ids[i], "path": path, "reason": reason})
    kept = sorted(set(range(split.n_items)) - set(left_out))
    out = split.select_items(kept)
    if is_main():
        print(
            f"{split.name}: {len(skipped)} of {split.n_items} items could not be read and are left out, with "
            f"{split.n_texts - out.n_texts} of {split.n_texts} captions (data.on_error=skip)",
            flush=True,
        )
    return kept, out, skipped


def without_index_skips(cfg: DictConfig, split: RetrievalSplit, index_dir: Path, ledger: SkipLedger) -> RetrievalSplit:
    """The gallery as build_index indexed it: `split` without the items it left out under data.on_error=skip
    (``"skipped"`` in ``index/manifest.json``), which are recorded in `ledger`, and without their captions
    (queries whose item is not in the index). Under data.on_error=raise such an index is refused."""
    path = Path(index_dir) / "manifest.json"
    skipped = json.loads(path.read_text()).get("skipped", []) if path.is_file() else []
    if not skipped:
        return split
    if cfg.data.on_error != "skip":
        raise UserError(
            f"the index at {index_dir} left out {len(skipped)} of {split.n_items} items of {split.name} that could "
            f"not be read (e.g. {skipped[0]['path']}: {skipped[0]['reason']}; built with data.on_error=skip): set "
            f"data.on_error=skip to evaluate without them, or fix the files and rerun "
            f"{rebuild_command(cfg, 'build_index.py')}"
        )
    gone = {entry["id"] for entry in skipped}
    captions = captions_per_path(split)
    for entry in skipped:
        ledger.add(entry["path"], entry["reason"], where="index", captions=captions.get(entry["path"], 0))
    out = split.select_items([i for i, item in enumerate(split.item_ids) if item not in gone])
    print(
        f"{split.name}: {split.n_items - out.n_items} of {split.n_items} items and {split.n_texts - out.n_texts} of "
        f"{split.n_texts} queries left out: build_index could not read them (data.on_error=skip; listed in {path})",
        flush=True,
    )
    return out


def finish_skips(ledger: SkipLedger, directory: Path, accelerator=None) -> None:
    """The end of a run that reads items outside the trainer (build_index, rerank_eval): every process's
    ledger united, one line for every distinct file left out, and the list in `directory/skipped_files.json`
    (a stale list from an earlier run is removed). A collective when `accelerator` has several processes."""
    gather_ledger(ledger, accelerator)
    if accelerator is None or accelerator.is_main_process:
        path = ledger.save(directory)
        if path is not None:
            print(f"left out by this run (data.on_error=skip): {ledger.report()}; list in {path}", flush=True)


def visual_loader(cfg: DictConfig, model: torch.nn.Module | None = None, train: bool = False):
    """The per-item loader of the model it feeds: images -> [3, S, S] with that model's mean / std and filter
    (`model.data_config`: its backbone's, or the recipe's `*.image_*` overrides); video features -> ([T, D], [T]).

    The teacher and the student each get their own (a ViT student wants mean / std 0.5, a ResNet teacher
    ImageNet's). Without a model: ImageNet statistics and bicubic resampling (the loader of earlier versions).
    ``train=True`` gives the training loader: `AugmentingImageLoader` under `data.augment.enabled`, else the same
    deterministic loader as evaluation (every pass but the training one reads items unaugmented).
    """
    if modality(cfg) == "image":
        data_config = getattr(model, "data_config", None) or {"image_size": cfg.data.image_size}
        if data_config["image_size"] != cfg.data.image_size:
            raise ConfigError(
                f"the model is built for {data_config['image_size']}px images but data.image_size="
                f"{cfg.data.image_size}: build it from this recipe"
            )
        if train and cfg.data.augment.enabled:
            return AugmentingImageLoader(**data_config, **to_kwargs(cfg.data.augment, drop=("enabled",)))
        return ImageLoader(**data_config)
    return FeatureLoader(cfg.data.max_frames, feature_dim=cfg.data.feature_dim)


# ---------------------------------------------------------------- tokenizer


def tokenizer_path(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / "tokenizer.json"


def teacher_tokenizer_source(cfg: DictConfig) -> str | None:
    """Where the teacher's tokenizer comes from: `teacher.tokenizer.path`; else, for a decoder that starts from a
    BERT (`teacher.text_pretrained_path`), the tokenizer saved with it; else None (trained on the captions with
    `teacher.tokenizer.vocab_size`)."""
    if cfg.teacher.tokenizer.path:
        return str(cfg.teacher.tokenizer.path)
    if cfg.teacher.text_pretrained_path:
        return _pretrained_tokenizer_dir(cfg.teacher.text_pretrained_path, "teacher.text_pretrained_path",
                                         "teacher.tokenizer.path")  # fmt: skip
    return None


def _pretrained_tokenizer_dir(text_path: str, key: str, tokenizer_key: str) -> str:
    """The directory of a pretrained text model (`resolve_text_dir`), which must hold its tokenizer."""
    from fastslow.pretrained import resolve_text_dir

    directory = resolve_text_dir(text_path, key=key)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise ConfigError(
            f"{key}={text_path}: no tokenizer.json or vocab.txt in {directory}, and {tokenizer_key} is null: set "
            f"{tokenizer_key} to the tokenizer this text model was trained with (a tokenizer trained on the captions "
            f"would feed it ids it does not know)"
        )
    return str(directory)


def teacher_tokenizer_stamp(cfg: DictConfig) -> dict[str, Any]:
    """The `teacher.tokenizer.*` settings that decide the teacher's tokenizer file (as `tokenizer_stamp`)."""
    path = teacher_tokenizer_source(cfg)
    return {
        "teacher.tokenizer.path": path,
        "teacher.tokenizer.vocab_size": None if path else int(cfg.teacher.tokenizer.vocab_size),
    }


def teacher_shares_tokenizer(cfg: DictConfig) -> bool:
    """True when the teacher's tokenizer settings are the student's (the default: both trained on the captions with
    `tokenizer.vocab_size`): both then use `${output_dir}/tokenizer.json`, one file made once, as before the teacher
    had settings of its own, so such runs, their caches and their figures are unchanged."""
    return list(teacher_tokenizer_stamp(cfg).values()) == list(tokenizer_stamp(cfg).values())


def teacher_tokenizer_path(cfg: DictConfig) -> Path:
    """The teacher's tokenizer file: the shared `tokenizer.json`, or `${output_dir}/teacher_tokenizer.json`."""
    return tokenizer_path(cfg) if teacher_shares_tokenizer(cfg) else Path(cfg.output_dir) / "teacher_tokenizer.json"


def _make_or_check_tokenizer(
    cfg: DictConfig, path: Path, wanted: dict[str, Any], source: str | None, vocab_size: int, train_split, accelerator
) -> TextTokenizer:
    """The tokenizer file at ``path``: made once (``source`` loaded, or trained on the training captions with
    ``vocab_size``) and stamped with ``wanted``; an existing one made with other settings, or with no stamp, is
    refused rather than reused (every model built on it would otherwise use another vocabulary than the recipe
    says)."""
    if not path.is_file():
        if accelerator is None or accelerator.is_main_process:
            if source:
                tok = load_pretrained_tokenizer(source)
            else:
                if train_split is None:
                    raise FileNotFoundError(f"{path} not found: run tools/train_teacher.py recipe={cfg.recipe} first")
                tok = train_tokenizer(train_split.captions, vocab_size=vocab_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tok.save(path, stamp=wanted)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    # The benchmarks share one tokenizer by a symlink to it: its stamp lies beside the file itself.
    fix = (
        f"delete {path} (and the .stamp.json beside it) to make a new one, or choose another output_dir; "
        f"the models of {cfg.output_dir} built on the old one must then be retrained"
    )
    check_stamp(path.resolve(), wanted, fix)
    return TextTokenizer.from_file(path)


def get_tokenizer(cfg: DictConfig, train_split: RetrievalSplit | None, accelerator=None) -> TextTokenizer:
    """The student's tokenizer: a local pretrained one (tokenizer.path; by default, with a pretrained text tower, the
    one in `student.text_pretrained_path`), or one trained on the training captions once and saved as
    `${output_dir}/tokenizer.json` for every later stage to reuse.

    A pretrained text tower is checked against the tokenizer here, before any model is built or trained
    (`fastslow.pretrained.check_text_tokenizer`): a trained 8k tokenizer or another model's vocabulary is refused.

    The file is stamped with the `tokenizer.*` settings it was made with (`tokenizer.stamp.json`) and refused when
    they differ.

    Raises:
        StaleArtefactError: `${output_dir}/tokenizer.json` was made with other `tokenizer.*` settings (named).
        ConfigError: the tokenizer is not the one of `student.text_pretrained_path`.
    """
    path, wanted = tokenizer_path(cfg), tokenizer_stamp(cfg)
    source = wanted["tokenizer.path"]
    tok = _make_or_check_tokenizer(cfg, path, wanted, source, cfg.tokenizer.vocab_size, train_split, accelerator)
    if cfg.student.text_pretrained_path:
        from fastslow.pretrained import check_text_tokenizer

        check_text_tokenizer(cfg.student.text_pretrained_path, tok, source or f"{path} (trained on the captions)")
    return tok


def get_teacher_tokenizer(cfg: DictConfig, train_split: RetrievalSplit | None, accelerator=None) -> TextTokenizer:
    """The teacher's own tokenizer (`teacher.tokenizer`), independent of the student's: with settings equal to the
    student's, the shared `get_tokenizer` file; else `${output_dir}/teacher_tokenizer.json`, made and checked as
    that one is. The trained teacher keeps a copy beside its weights (`load_trained`), which every stage that scores
    with the teacher uses.

    Raises:
        StaleArtefactError: the file was made with other `teacher.tokenizer.*` settings (named).
    """
    if teacher_shares_tokenizer(cfg):
        tok, source = get_tokenizer(cfg, train_split, accelerator), tokenizer_source(cfg)
    else:
        wanted = teacher_tokenizer_stamp(cfg)
        source = wanted["teacher.tokenizer.path"]
        path = teacher_tokenizer_path(cfg)
        tok = _make_or_check_tokenizer(
            cfg, path, wanted, source, cfg.teacher.tokenizer.vocab_size, train_split, accelerator
        )
    if cfg.teacher.text_pretrained_path:  # a decoder from a BERT reads that BERT's ids, none other
        from fastslow.pretrained import check_text_tokenizer

        source = source or f"{teacher_tokenizer_path(cfg)} (trained on the captions)"
        check_text_tokenizer(cfg.teacher.text_pretrained_path, tok, source, key="teacher.text_pretrained_path",
                             tokenizer_key="teacher.tokenizer.path")  # fmt: skip
    return tok


# ---------------------------------------------------------------- models


# Keys of a model's recipe section that are not its builder's arguments (the teacher's tokenizer is made here).
NOT_BUILDER_KEYS = ("name", "tokenizer")


def model_kwargs(cfg: DictConfig, section: DictConfig, tokenizer: TextTokenizer) -> dict[str, Any]:
    """Builder arguments: the recipe section plus what the data decides (vocabulary, sizes, modality)."""
    kw = to_kwargs(section, drop=NOT_BUILDER_KEYS)
    kw.update(modality=modality(cfg), vocab_size=tokenizer.vocab_size, max_length=cfg.data.max_length)
    if modality(cfg) == "image":
        kw["image_size"] = cfg.data.image_size
    else:
        kw["feature_dim"] = cfg.data.feature_dim
    return {k: v for k, v in kw.items() if v is not None}  # null in a recipe: the builder's default


def build_teacher(cfg: DictConfig, tokenizer: TextTokenizer) -> torch.nn.Module:
    from teachers import create_teacher

    return create_teacher(cfg.teacher.name, **model_kwargs(cfg, cfg.teacher, tokenizer))


def build_student(cfg: DictConfig, tokenizer: TextTokenizer) -> torch.nn.Module:
    from students import create_student

    kw = model_kwargs(cfg, cfg.student, tokenizer)
    kw.pop("init_from", None)  # where the weights start, not what the model is (`init_student_from`)
    if modality(cfg) == "video":
        kw["max_frames"] = cfg.data.max_frames  # the video tower's position table covers the loader's T
    return create_student(cfg.student.name, **kw)


def weights_hash(path: str | os.PathLike) -> str:
    """Short sha256 of a weights file: stamps caches and indexes with the model that made them."""
    from fastslow.artefacts import file_hash

    return file_hash(path)


# The recipe keys that name local pretrained files: read once, when a model is first built for training; its weights
# then live in its own checkpoint, so a trained model is rebuilt without them (the run may have moved machines).
PRETRAINED_KEYS = {
    "teacher": ("pretrained_path", "text_pretrained_path"),
    "student": ("image_pretrained_path", "text_pretrained_path"),
}
# The architecture of a pretrained text model (a student's text tower, a teacher's decoder from BERT), saved beside
# its weights.
TEXT_CONFIG = "text_config.json"


def load_trained(directory: str | os.PathLike, kind: str) -> tuple[torch.nn.Module, DictConfig, TextTokenizer]:
    """Rebuild a trained teacher or student from its directory alone (config.yaml, tokenizer.json,
    model.safetensors, and for a student with a pretrained text tower text_config.json), in eval mode with
    gradients off.

    The pretrained files its config names (`teacher.pretrained_path`, `student.image_pretrained_path`,
    `student.text_pretrained_path`) are not read: the weights come from model.safetensors, and a pretrained text
    tower's architecture from text_config.json, so a run copied to another machine loads without them.

    Args:
        directory: a stage directory (`runs/shapes/teacher`) or one of its checkpoints.
        kind: "teacher" or "student".

    Raises:
        MissingFileError: model.safetensors or tokenizer.json is absent (the message names the stage to run).
        ConfigError: config.yaml is absent or does not parse.
        CheckpointError: the weights file is empty, truncated or not safetensors, or holds another model's weights.
    """
    directory = Path(directory)
    tool = "train_teacher.py" if kind == "teacher" else "distill.py"
    fix = f"train it again with tools/{tool} (same recipe and output_dir), or copy the directory again"
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise MissingFileError(f"{weights} not found: train it first with tools/{tool} (same recipe and output_dir)")
    cfg = load_saved_config(directory / "config.yaml", fix=fix)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise MissingFileError(f"{tokenizer_file} not found: every trained model keeps its tokenizer beside it; {fix}")
    tok = TextTokenizer.from_file(tokenizer_file)
    section = OmegaConf.to_container(cfg[kind], resolve=True)
    overrides: dict[str, Any] = {key: None for key in PRETRAINED_KEYS[kind] if section.get(key)}
    if section.get("text_pretrained_path"):
        text_config = directory / TEXT_CONFIG
        if not text_config.is_file():
            raise CheckpointError(
                f"{directory} was trained with {kind}.text_pretrained_path={section['text_pretrained_path']}, whose "
                f"architecture is not saved beside its weights ({TEXT_CONFIG} is missing: a run of an older fastslow): "
                f"make that directory available again, or retrain with tools/{tool}"
            )
        overrides["text_config"] = read_json(text_config, fix)
    build = copy.deepcopy(cfg)  # the caller gets the config as saved; only the build ignores the pretrained files
    with open_dict(build):
        for key, value in overrides.items():
            build[kind][key] = value
    model = build_teacher(build, tok) if kind == "teacher" else build_student(build, tok)
    load_weights(model, read_safetensors(weights, fix), path=weights, name=f"{kind} {cfg[kind].name}", fix=fix)
    model.eval().requires_grad_(False)
    return model, cfg, tok


# Config fields that say where a student's first weights came from, not what it is: a warm start ignores them.
_INIT_FIELDS = ("image_pretrained_path", "text_pretrained_path", "text_config")


def init_student_from(student: torch.nn.Module, cfg: DictConfig, directory: str | os.PathLike) -> None:
    """Warm start (`student.init_from=DIR`): copy the weights of the trained student in ``directory`` into
    ``student``, e.g. a VMLM / SMRM pre-training run before distillation.

    The saved student is rebuilt from its own directory (`load_trained`: config.yaml, tokenizer.json, weights through
    `read_safetensors` / `load_weights`), and must be the same model: the same registry name, the same
    `DualEncoderConfig` (where the first weights came from aside) and the same tokenizer file, since a token id of
    another vocabulary names another word.

    Raises:
        MissingFileError, ConfigError, CheckpointError: as `load_trained`, for a directory that is not a student.
        CheckpointError: a student of another configuration or tokenizer; the message names each differing key.
    """
    from fastslow.artefacts import file_hash

    directory = Path(directory)
    fix = f"give student.init_from a student trained with the same student.* keys and tokenizer, or retrain {directory}"
    saved, saved_cfg, _ = load_trained(directory, "student")
    ours, theirs = student.config_dict(), saved.config_dict()
    differ = [
        f"student.{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
        for k in sorted(set(ours) | set(theirs))
        if k not in _INIT_FIELDS and ours.get(k) != theirs.get(k)
    ]
    if saved_cfg.student.name != cfg.student.name:
        differ.insert(0, f"student.name: {saved_cfg.student.name!r} there, {cfg.student.name!r} here")
    here, there = tokenizer_path(cfg), directory / "tokenizer.json"
    if file_hash(there) != file_hash(here):
        differ.append(f"tokenizer: {there} differs from this run's {here}")
    if differ:
        raise CheckpointError(f"student.init_from={directory} is another student than this run's: "
                              f"{'; '.join(differ)}; {fix}")  # fmt: skip
    weights = directory / "model.safetensors"
    load_weights(student, saved.state_dict(), path=weights, name=f"student {cfg.student.name}", fix=fix)


def _pretrained_text(model: torch.nn.Module | None) -> bool:
    return bool(getattr(getattr(model, "config", None), "text_pretrained_path", None))


def run_files(directory: Path, model: torch.nn.Module | None = None) -> dict[str, Path]:
    """``{file name: path}`` of what `save_run_config` writes in ``directory`` for ``model`` (the files the trainer
    copies into every checkpoint beside the weights and the tokenizer); the same on every process."""
    files = {"config.yaml": directory / "config.yaml"}
    if _pretrained_text(model):
        files[TEXT_CONFIG] = directory / TEXT_CONFIG
    return files


def save_run_config(cfg: DictConfig, directory: Path, model: torch.nn.Module | None = None) -> dict[str, Path]:
    """Write what rebuilds a model besides its weights and tokenizer: `config.yaml` (the resolved recipe) and, for a
    student whose text tower came from `student.text_pretrained_path`, that tower's architecture (`text_config.json`,
    the transformers config) so that `load_trained` never needs the pretrained directory again.

    Returns:
        `run_files`: ``{file name: path}`` of the files written.
    """
    files = run_files(directory, model)
    save_config(cfg, files["config.yaml"])
    if TEXT_CONFIG in files:  # a teacher keeps its BERT's config in its own; a student's is its text encoder's
        text_config = getattr(model.config, "text_config", None) or model.text.encoder.config.to_dict()
        atomic_write_json(files[TEXT_CONFIG], text_config)
    return files


def prepare_training(
    cfg: DictConfig, accelerator, ledger: SkipLedger | None = None, kind: str = "student"
) -> tuple[RetrievalSplit, RetrievalSplit, TextTokenizer]:
    """What both training stages start from: the config shown, the data in place, the train and val
    splits (their load-time drops recorded in `ledger`; val cut to `eval.val_items` items, a fixed sample) and the
    tokenizer of the model trained (``kind``: "teacher" gets `get_teacher_tokenizer`, "student" `get_tokenizer`).
    The item loader is the model's (`visual_loader(cfg, model)`), so it is made once the model is built."""
    print_config(cfg, accelerator)
    ensure_shapes(cfg, accelerator)
    train, full_val = load_split(cfg, "train", ledger), load_split(cfg, "val", ledger)
    val = full_val.sample_items(cfg.eval.val_items)
    if val is not full_val and (accelerator is None or accelerator.is_main_process):
        print(
            f"{full_val.name}: validating on a fixed sample of {val.n_items} of {full_val.n_items} items "
            f"({val.n_texts} of {full_val.n_texts} captions; eval.val_items={cfg.eval.val_items})",
            flush=True,
        )
    make = get_teacher_tokenizer if kind == "teacher" else get_tokenizer
    return train, val, make(cfg, train, accelerator)


def print_config(cfg: DictConfig, accelerator=None) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(OmegaConf.to_yaml(cfg), flush=True)
