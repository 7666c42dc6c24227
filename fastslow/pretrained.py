"""Pretrained towers from the files users have: timm checkpoints for image backbones, Hugging Face model directories
(sentence-transformers snapshots included) for the text tower, and the check that a text tower and the tokenizer
feeding it belong together.

Nothing here downloads: every path is a local file or directory, and a bad one is a `UserError` naming it.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from fastslow.artefacts import read_safetensors
from fastslow.errors import CheckpointError, ConfigError, MissingFileError, file_message

__all__ = ["TORCH_SUFFIXES", "read_state_dict", "create_timm_backbone", "resolve_text_dir", "check_text_tokenizer"]

TORCH_SUFFIXES = (".pth", ".bin", ".pt", ".ckpt")  # torch.save'd state dicts, read with weights_only=True


def read_state_dict(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """The tensors of a timm checkpoint: a ``.safetensors`` file, or a ``.pth`` / ``.bin`` state dict.

    A torch file is read by timm's own `load_state_dict` with ``weights_only=True`` (never unpickling code), which
    also unwraps the usual training-checkpoint layouts (``state_dict``, ``model``, EMA weights) and strips a DDP
    ``module.`` prefix.

    Raises:
        MissingFileError: no file at ``path``.
        CheckpointError: empty, truncated, another format, pickled objects other than tensors, or no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found: {fix}")
    if path.suffix == ".safetensors":
        return read_safetensors(path, fix)
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            file_message(path, f"is not a .safetensors or {'/'.join(TORCH_SUFFIXES)} weights file", fix)
        )
    if path.stat().st_size == 0:
        raise CheckpointError(file_message(path, "weights file is empty (0 bytes)", fix))
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        text = " ".join(str(e).split())
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:  # torch: "Unsupported globals: ..."
            problem = (
                "holds pickled objects other than tensors (e.g. a whole module), which are never unpickled here "
                "(torch.load weights_only=True); save its state_dict(), or as safetensors"
            )
        else:
            problem = f"is not a readable torch state dict ({text[:300]})"
        raise CheckpointError(file_message(path, problem, fix)) from e
    import torch

    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(file_message(path, "holds no state dict of tensors", fix))
    return state


def create_timm_backbone(name: str, pretrained_path: str | None = None, *, key: str, **kwargs: Any):
    """``timm.create_model(name, **kwargs)``, with the weights of a local checkpoint file when one is named.

    timm does the loading (``pretrained_cfg_overlay={"state_dict": ...}``): its per-model filter (e.g. ViT position
    embeddings resized to another ``img_size``), dropping the classifier for ``num_classes=0`` and the
    ``features_only`` wrapping. timm then loads non-strictly (the classifier is gone), so a file of another model
    whose names do not match would leave the backbone silently random: every tensor of the built backbone must be
    in the file, or the file is refused.

    Args:
        name: the timm model name.
        pretrained_path: a ``.safetensors`` or ``.pth`` / ``.bin`` file, or None for random weights.
        key: the recipe key naming the file (in every message).
        **kwargs: timm ``create_model`` arguments (``num_classes``, ``features_only``, ``img_size``, ...).

    Raises:
        MissingFileError, CheckpointError: the file is absent, unreadable, or holds another model's weights.
    """
    import timm

    if not pretrained_path:
        return timm.create_model(name, pretrained=False, **kwargs)
    fix = f"point {key} at a timm checkpoint of {name} (.safetensors, or a {'/'.join(TORCH_SUFFIXES)} state dict)"
    state = read_state_dict(pretrained_path, fix)
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs)
    except RuntimeError as e:  # torch's size mismatches: one line is enough
        first = str(e).strip().splitlines()
        raise CheckpointError(
            file_message(pretrained_path, f"does not fit {name}: {' '.join(first[:2])[:300]}", fix)
        ) from e
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise CheckpointError(
            file_message(
                pretrained_path,
                f"lacks {len(missing)} of the {len(model.state_dict())} tensors of {name} (e.g. "
                f"{', '.join(missing[:3])}): the weights of another model, or saved with other names",
                fix,
            )
        )
    # The overlay keeps the state dict in the model's pretrained_cfg; the weights are in the model now.
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg.pop("state_dict", None)
    return model


def resolve_text_dir(path: str | os.PathLike, key: str = "student.text_pretrained_path") -> Path:
    """The Hugging Face model directory inside what a user has: the directory itself when it holds ``config.json``
    (a ``save_pretrained`` directory, a Hub snapshot, a sentence-transformers v2+ snapshot), else the Transformer
    module of a sentence-transformers snapshot (``modules.json``, e.g. ``0_Transformer/``), else its one
    subdirectory with a ``config.json``.

    Raises:
        MissingFileError: not a directory, or no model directory found in it (the message says what was looked for).
    """
    root = Path(path)
    if not root.is_dir():
        raise MissingFileError(
            f"{key}={root}: not a directory; expected a Hugging Face model directory (config.json, model.safetensors)"
        )
    if (root / "config.json").is_file():
        return root
    modules = root / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(file_message(modules, f"does not parse ({e})", f"fix {key}")) from e
        for entry in entries if isinstance(entries, list) else []:
            if str(entry.get("type", "")).endswith("Transformer") and (root / entry.get("path", "")).is_dir():
                sub = root / entry["path"]
                if (sub / "config.json").is_file():
                    return sub
    found = sorted(p.parent for p in root.glob("*/config.json"))
    if len(found) == 1:
        return found[0]
    raise MissingFileError(
        f"{key}={root}: no Hugging Face model found: no config.json in it, no Transformer module in a "
        f"modules.json (sentence-transformers), and {len(found)} subdirectories with a config.json; point it at the "
        f"directory that holds config.json and the weights"
    )


def _tokenizer_in(directory: Path) -> Path | None:
    return next((directory / n for n in ("tokenizer.json", "vocab.txt") if (directory / n).is_file()), None)


def check_text_tokenizer(
    text_path: str | os.PathLike,
    tokenizer: Any,
    tokenizer_source: str | os.PathLike,
    *,
    key: str = "student.text_pretrained_path",
    tokenizer_key: str = "tokenizer.path",
) -> None:
    """Refuse a tokenizer that is not the text tower's, before any work.

    The text tower's own tokenizer (in its directory) is the reference: ``tokenizer`` must give every token the id
    it gives (a BERT tower fed the ids of a tokenizer trained on the captions reads another language, whatever the
    vocabulary sizes). Without one in the directory, the vocabulary sizes must agree (the model's table may be
    padded to a multiple of 128 beyond the tokenizer's).

    Args:
        text_path: `student.text_pretrained_path` (a directory `resolve_text_dir` accepts), or the recipe key ``key``.
        tokenizer: the run's `fastslow.tokenizer.TextTokenizer`.
        tokenizer_source: where it came from (for the message).
        key, tokenizer_key: the recipe keys of the text model and of its tokenizer (``teacher.text_pretrained_path``
            and ``teacher.tokenizer.path`` for a teacher's decoder), named in the message.

    Raises:
        ConfigError: they do not belong together; the message names both and what to set.
    """
    model_dir = resolve_text_dir(text_path, key=key)
    fix = (
        f"set {tokenizer_key}=null to use the tokenizer saved with the text model (in {model_dir}), or "
        f"{tokenizer_key} to the one it was trained with"
    )
    reference = _tokenizer_in(model_dir)
    if reference is not None:
        from fastslow.tokenizer import load_pretrained_tokenizer

        own = load_pretrained_tokenizer(model_dir).tokenizer.get_vocab()
        given = tokenizer.tokenizer.get_vocab()
        if own != given:
            differ = next((t for t in sorted(own) if given.get(t) != own[t]), None) or next(
                t for t in sorted(given) if t not in own
            )
            raise ConfigError(
                f"the tokenizer {tokenizer_source} ({len(given)} tokens) is not the one of the text tower "
                f"{key}={text_path} ({reference}, {len(own)} tokens; e.g. {differ!r} is id "
                f"{own.get(differ)} there, {given.get(differ)} here): {fix}"
            )
        return
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_vocab = int(config.get("vocab_size", 0))
    if not (0 <= model_vocab - tokenizer.vocab_size < 128):
        raise ConfigError(
            f"the tokenizer {tokenizer_source} has {tokenizer.vocab_size} tokens but the text tower "
            f"{key}={text_path} has {model_vocab} embeddings: {fix}"
        )
