"""fastslow's own exceptions: every problem with the user's input is one of them, with a message that names the
thing (file, key, value) and says what to do.

All derive from `UserError`, a `ValueError`: a problem the user fixes by changing the command, the data or a file,
not the code. The tools print its message as one line, without a traceback (`fastslow.runtime.run`), and a test
tells bad input from a bug by the type (`tests/test_bad_inputs.py`). A traceback from inside a library (torch,
safetensors, faiss, tokenizers, json) reaching the user is a bug: the reader at the boundary turns it into one of
these, naming the file.

- `DataError`: a data file (image, features, annotations) is missing, malformed or unreadable. Every reader and
  loader in `fastslow.data` raises it for a file it cannot use, so that a dataset running under `on_error="skip"`
  can catch exactly these (and nothing that is a bug in our code), record `(path, reason)` and go on.
- `ConfigError`: a recipe or an override is wrong (`fastslow.config`).
- `MissingFileError`: a file the run needs is absent; also a `FileNotFoundError`.
- `StaleArtefactError`: an artefact was built from other inputs, or cannot be read (`fastslow.artefacts`).
- `CheckpointError`: a checkpoint or a model directory cannot be used (incomplete, tampered with, of another model).
- `QueryError`: a query-time request cannot be answered (an empty query, k <= 0).
"""

from __future__ import annotations

import os

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MissingFileError",
    "QueryError",
    "StaleArtefactError",
    "UserError",
    "file_message",
]


class UserError(ValueError):
    """A problem the user fixes by changing the command, not the code: e.g. an index or a cache that
    was built by another model. Tools print the message without a traceback."""


class ConfigError(UserError):
    """A recipe or an override is wrong; the message names the key and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs is absent; the message names it and the command that makes it.

    Also a `FileNotFoundError`, so code that catches that keeps working."""


class CheckpointError(UserError):
    """A checkpoint (or a trained model's directory) cannot be used: incomplete, tampered with, unreadable, of
    another model, or written under another configuration."""


class QueryError(UserError):
    """A query-time request that cannot be answered: an empty or contentless query, k <= 0."""


class StaleArtefactError(UserError):
    """An artefact on disk was built from other inputs than the ones at hand (another model, gallery, tokenizer,
    setting), or carries no stamp to tell. Raised by `fastslow.artefacts.check_stamp` / `check_fields`.

    Attributes:
        path: the artefact (file or directory).
        differences: ``{field: (saved, expected)}`` for every field that differs; empty when there is no stamp.
        rebuild: the command (or step) that rebuilds the artefact.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike,
        differences: dict[str, tuple[object, object]] | None = None,
        rebuild: str = "",
    ) -> None:
        super().__init__(message)
        self.path = os.fspath(path)
        self.differences = dict(differences or {})
        self.rebuild = rebuild


def file_message(path: str | os.PathLike, problem: str, fix: str | None = None) -> str:
    """Build the house message for a problem with a file: ``"file X: problem; what to do"``.

    Args:
        path: the file (or folder) concerned.
        problem: what is wrong, e.g. ``"image file is truncated"``.
        fix: what the user can do about it, e.g. ``"re-download it or set data.on_error=skip"``.

    Returns:
        The message, e.g. ``"file /data/x.jpg: image file is truncated; set data.on_error=skip to drop it"``.
    """
    message = f"file {os.fspath(path)}: {problem}"
    return f"{message}; {fix}" if fix else message


class DataError(UserError):
    """A data file is missing, malformed or unreadable.

    Attributes:
        path: the offending file, or None when the error is not about one file.
        reason: a short, stable description of the problem (``"missing file"``, ``"truncated image"``,
            ...) used to group skipped samples in reports; the message itself carries the details.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.reason = reason if reason is not None else message

    @classmethod
    def for_file(
        cls, path: str | os.PathLike, problem: str, fix: str | None = None, *, reason: str | None = None
    ) -> DataError:
        """Make a `DataError` whose message is ``file_message(path, problem, fix)``.

        Args:
            path: the offending file.
            problem: what is wrong, with details (shapes, exception text).
            fix: what to do about it, or None.
            reason: the short category used in skip reports; defaults to ``problem``.
        """
        return cls(file_message(path, problem, fix), path=path, reason=reason if reason is not None else problem)
