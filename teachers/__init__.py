"""The Slow teacher: cross-attention captioners, built by name.

Example::

    teacher = create_teacher("captioner_tiny", modality="image", vocab_size=tok.vocab_size, max_length=32)
    tokens = teacher.encode_visual(pixels)                     # VisualTokens, cacheable in a TokenStore
    scores = teacher.score(tokens, input_ids, attention_mask)  # [n_text, n_visual]
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from teachers.tokens import TokenStore, VisualTokens

__all__ = ["create_teacher", "list_teachers", "register_teacher", "VisualTokens", "TokenStore"]

_TEACHERS: dict[str, Callable[..., nn.Module]] = {}


def register_teacher(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a size builder under its function name."""
    if fn.__name__ in _TEACHERS:
        raise ValueError(f"teacher {fn.__name__!r} is registered twice")
    _TEACHERS[fn.__name__] = fn
    return fn


def list_teachers() -> list[str]:
    """Registered teacher names, sorted."""
    return sorted(_TEACHERS)


def create_teacher(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered teacher, e.g. `create_teacher(**cfg.teacher)` with `name` and the builder's options.

    Args:
        name: a name from `list_teachers()`.
        **kwargs: `modality`, `vocab_size`, `max_length` and any `CaptionerConfig` field to override.
    """
    if name not in _TEACHERS:
        near = difflib.get_close_matches(name, list(_TEACHERS), n=3)
        raise KeyError(
            f"unknown teacher {name!r}"
            + (f"; did you mean {near}?" if near else "")
            + f" Registered: {list_teachers()}"
        )
    return _TEACHERS[name](**kwargs)


# Imported last: the model file registers its builders with the decorator defined above.
from teachers.captioner import Captioner, CaptionerConfig, reverse_tokens  # noqa: E402

__all__ += ["Captioner", "CaptionerConfig", "reverse_tokens"]
