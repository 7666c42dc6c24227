"""Fast students: dual encoders that embed texts and visual items into one space for a faiss index.

Models are built by name from a small registry (timm `_registry.py` style): a size builder registers itself
with `@register_student`, and `create_student(name, **kw)` calls it with plain keyword arguments
(`create_student(**cfg.student)` in the tools), so any student can be built and tested without a recipe.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

_STUDENTS: dict[str, Callable[..., Any]] = {}

_Builder = TypeVar("_Builder", bound=Callable[..., Any])


def register_student(fn: _Builder) -> _Builder:
    """Register a size builder under its function name (used as a decorator).

    Args:
        fn: A function `name(**kwargs) -> DualEncoder`.

    Returns:
        `fn` unchanged, so the builder stays importable and callable directly.

    Raises:
        ValueError: if a student with the same name is already registered.
    """
    name = fn.__name__
    if name in _STUDENTS:
        raise ValueError(f"student {name!r} is registered twice")
    _STUDENTS[name] = fn
    return fn


def list_students() -> list[str]:
    """Names accepted by `create_student`, sorted."""
    return sorted(_STUDENTS)


def create_student(name: str, **kwargs: Any) -> Any:
    """Build a registered student.

    Args:
        name: A registry name, e.g. `"dual_encoder_tiny"` (see `list_students()`).
        **kwargs: Passed to the size builder: `modality`, `vocab_size`, `max_length` and any
            `DualEncoderConfig` field to override.

    Returns:
        The `DualEncoder`.

    Raises:
        KeyError: for an unknown name; the message lists the nearest registered names.
    """
    if name not in _STUDENTS:
        near = difflib.get_close_matches(name, _STUDENTS, n=3, cutoff=0.4) or list_students()
        raise KeyError(f"unknown student {name!r}; did you mean one of: {', '.join(near)}")
    return _STUDENTS[name](**kwargs)


# Imported last on purpose: the model file registers its builders with `register_student` on import,
# so the registry functions above must exist before it is loaded.
from .dual_encoder import DualEncoder, DualEncoderConfig  # noqa: E402

__all__ = ["DualEncoder", "DualEncoderConfig", "create_student", "list_students", "register_student"]
