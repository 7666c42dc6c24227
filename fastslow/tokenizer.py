"""Text tokenizer: train one on captions, or wrap a local pretrained Hugging Face tokenizer. Never downloads.

Every row `TextTokenizer.encode` returns is ``BOS w1 .. wn EOS PAD ..``: the models rely on the first and
last real tokens being BOS and EOS (the right-to-left captioner reverses ``w1 .. wn`` between them).

Tokenizers trained here (`train_tokenizer`) are WordPiece over a lower-casing BERT normaliser and a
whitespace + punctuation pre-tokenizer, with ``[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3``: the alphabet plus the
most frequent whole words, chosen deterministically (the same captions give the same ids in any process).

A tokenizer is saved as one standard ``tokenizer.json``: BOS / EOS are recoverable from its
post-processor (``BOS $A EOS``) and PAD from its padding section, so `TextTokenizer.from_file` needs that
file only, and any other tool (``tokenizers``, ``transformers.PreTrainedTokenizerFast``) reads it too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from fastslow.artefacts import atomic_path
from fastslow.errors import MissingFileError, UserError, file_message

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "train_tokenizer", "load_pretrained_tokenizer"]

# Order fixes the ids of tokenizers trained here: PAD=0, UNK=1, BOS=2, EOS=3.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

# Names used by common pretrained tokenizers (BERT, RoBERTa/BART, CLIP, T5/Llama-style), tried in order
# when neither the caller nor the tokenizer's config files say which token plays which role.
_BOS_NAMES = ("[BOS]", "[CLS]", "<s>", "<|startoftext|>", "<bos>", "<|begin_of_text|>")
_EOS_NAMES = ("[EOS]", "[SEP]", "</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>")
_UNK_NAMES = ("[UNK]", "<unk>", "<|unk|>")


class TextTokenizer:
    """A `tokenizers.Tokenizer` with fixed BOS / EOS / PAD roles and torch-tensor batch encoding.

    Build one with `train_tokenizer`, `TextTokenizer.from_file` or `load_pretrained_tokenizer`.

    Args:
        tokenizer: the underlying fast tokenizer; its post-processor and padding are replaced so that it
            produces ``BOS .. EOS PAD ..`` rows.
        bos_token: token put first in every row (``[BOS]``, or ``[CLS]`` / ``<s>`` for pretrained ones).
        eos_token: token put last in every row, even a truncated one (``[EOS]``, ``[SEP]``, ``</s>``).
        pad_token: token filling rows after EOS (models rely on ``attention_mask``, not on this id).
        unk_token: the out-of-vocabulary token, or None if the model has none (byte-level BPE).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str,
        unk_token: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self._bos_id = _require_id(tokenizer, bos_token, "bos")
        self._eos_id = _require_id(tokenizer, eos_token, "eos")
        self._pad_id = _require_id(tokenizer, pad_token, "pad")
        self._unk_id = None if unk_token is None else _require_id(tokenizer, unk_token, "unk")
        # Registering them as special makes decode(skip_special_tokens=True) drop them; they are all in the
        # vocabulary already (checked above), so no id changes.
        tokenizer.add_special_tokens([t for t in (bos_token, eos_token, pad_token, unk_token) if t is not None])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A {eos_token}",
            pair=f"{bos_token} $A {eos_token} $B:1 {eos_token}:1",
            special_tokens=[(bos_token, self._bos_id), (eos_token, self._eos_id)],
        )
        tokenizer.enable_padding(pad_id=self._pad_id, pad_token=pad_token)  # to the longest row of each batch
        tokenizer.no_truncation()
        self._max_length: int | None = None
        self.truncated_texts = 0  # texts cut at max_length by encode(), over this tokenizer's life

    # ------------------------------------------------------------------------------------- properties

    @property
    def pad_id(self) -> int:
        """Id of the padding token."""
        return self._pad_id

    @property
    def bos_id(self) -> int:
        """Id of the token that starts every row."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """Id of the token that ends every row's text."""
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown-word token, or None when the vocabulary has none."""
        return self._unk_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (size of an embedding table over these ids)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # --------------------------------------------------------------------------------------- encoding

    def encode(self, texts: str | Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise a batch of texts.

        Args:
            texts: N strings (a single string counts as N = 1).
            max_length: the longest row allowed, BOS and EOS included (>= 2).

        Returns:
            ``(input_ids [N, L] long, attention_mask [N, L] long)`` with L = min(max_length, longest row);
            every row is ``BOS w1 .. wn EOS PAD ..``; a text too long loses words from its end, never its EOS.
        """
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for BOS and EOS), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)
        if self._max_length != max_length:
            # The library truncates the text before the post-processor adds BOS and EOS, so EOS survives.
            self.tokenizer.enable_truncation(max_length=max_length)
            self._max_length = max_length
        # Parallel, in Rust; the _fast variant (tokenizers >= 0.21) skips the character offsets we never use.
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode_batch(texts)
        cut = sum(1 for e in encodings if e.overflowing)
        if cut:
            # Said once per tokenizer, then counted: a 10,000-word caption must not be cut silently, and a
            # corpus with many long captions must not print a line per batch.
            if not self.truncated_texts:
                warnings.warn(
                    f"{cut} text(s) longer than max_length={max_length} tokens (BOS and EOS included) were cut "
                    "to their first words; further cuts are counted in TextTokenizer.truncated_texts. Raise "
                    "data.max_length to keep them whole.",
                    stacklevel=2,
                )
            self.truncated_texts += cut
        input_ids = torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int64))
        attention_mask = torch.from_numpy(np.array([e.attention_mask for e in encodings], dtype=np.int64))
        return input_ids, attention_mask

    def empty_texts(self, texts: Sequence[str], max_length: int) -> list[int]:
        """Indices of the texts that encode to no token but BOS and EOS (empty, blank, zero-width characters):
        a query made of them has no content, and ranking the gallery for it would answer nothing asked."""
        _, mask = self.encode(list(texts), max_length)
        return [i for i, n in enumerate(mask.sum(1).tolist()) if n <= 2]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Turn one row of ids back into text.

        A leading BOS is dropped and the row is cut at its first EOS (so a generated caption's tail after
        EOS is ignored); other special tokens (PAD, UNK) are skipped. For tokenizers trained here the
        result is `normalize` of the encoded text when all its characters were seen in training.

        Args:
            ids: ``[L]`` token ids.

        Returns:
            The text.
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == self._bos_id:
            ids = ids[1:]
        if self._eos_id in ids:
            ids = ids[: ids.index(self._eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """`decode` each row of ``ids [N, L]``."""
        return [self.decode(row) for row in ids]

    def normalize(self, text: str) -> str:
        """The canonical form of ``text``: normalised (e.g. lower-cased) words and punctuation, space-separated.

        This is what ``decode(encode(text))`` gives back for tokenizers trained here (their decoder joins
        tokens with single spaces and does not re-attach punctuation, so that nothing is rewritten).
        """
        if self.tokenizer.normalizer is not None:
            text = self.tokenizer.normalizer.normalize_str(text)
        if self.tokenizer.pre_tokenizer is None:
            return " ".join(text.split())
        return " ".join(word for word, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(text))

    # ------------------------------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike, *, stamp: dict[str, Any] | None = None) -> str:
        """Write the tokenizer as one ``tokenizer.json``, atomically (`fastslow.artefacts`).

        Args:
            path: a ``.json`` file path, or a directory (the file is then ``path/tokenizer.json``).
            stamp: what it was built from (e.g. the recipe's ``tokenizer.*`` settings), written beside it as
                ``tokenizer.stamp.json``; None writes no stamp.

        Returns:
            The path of the written file.
        """
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # The truncation of the last encode() call is not part of the tokenizer's identity.
        self.tokenizer.no_truncation()
        self._max_length = None
        with atomic_path(path, stamp=stamp) as tmp:
            self.tokenizer.save(str(tmp))
        return str(path)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TextTokenizer:
        """Load a tokenizer written by `save` (or any ``tokenizer.json``: roles as in `load_pretrained_tokenizer`).

        Args:
            path: the ``tokenizer.json`` file or the directory holding it.

        Returns:
            The tokenizer, with the same ids as when it was saved.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise MissingFileError(f"file {path}: tokenizer file not found; pass the tokenizer.json a run saved")
        return _wrap(_read_tokenizer(path), config={}, overrides={}, source=path)

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}:{self.bos_id}, "
            f"eos={self.eos_token!r}:{self.eos_id}, pad={self.pad_token!r}:{self.pad_id})"
        )


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 1, lowercase: bool = True
) -> TextTokenizer:
    """Build a WordPiece tokenizer from captions, deterministically.

    The vocabulary is every character seen (as a word start ``c`` and as a continuation ``##c``, so any
    word over the seen alphabet encodes) plus the most frequent whole words, ties broken alphabetically,
    up to ``vocab_size``. A word outside it is split greedily into the longest known pieces; a word with
    an unseen character becomes ``[UNK]``. Caption vocabularies are small (shapes: ~40 words; Flickr30K:
    ~18k words, of which 8,000 cover >99% of the tokens), so whole words are what a captioner wants.

    Why not ``tokenizers.trainers.WordPieceTrainer``: it breaks ties between equally frequent merges in
    hash-map order, which changes from process to process (huggingface/tokenizers#1794), so the same
    captions gave different vocabularies in about 1 run in 4 -- and every teacher, score cache and
    checkpoint built on the ids would silently stop matching. Here the result depends only on the
    multiset of captions: not on their order, the process or ``PYTHONHASHSEED``.

    Args:
        texts: the training captions.
        vocab_size: the largest vocabulary, special tokens included. The alphabet is always kept (as the
            library trainer does), so a tiny ``vocab_size`` can be exceeded by it.
        min_frequency: a whole word must occur this often to get its own token.
        lowercase: lower-case (and strip accents from) the text before splitting it.

    Returns:
        A `TextTokenizer` with ``[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3``, then the other tokens sorted.
    """
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace and around punctuation
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({ch for word in counts for ch in word})
    pieces = {*SPECIAL_TOKENS, *alphabet, *(f"##{ch}" for ch in alphabet)}
    room = max(vocab_size - len(pieces), 0)
    # (-count, word) is a total order: no tie is left to the hash map or to the order of the captions.
    words = (w for w, n in counts.items() if n >= min_frequency and w not in pieces)
    frequent = sorted(words, key=lambda w: (-counts[w], w))
    learnt = sorted(pieces.difference(SPECIAL_TOKENS).union(frequent[:room]))
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *learnt])}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    # cleanup=False: the BERT clean-up re-attaches punctuation but also rewrites " do not" as " don't".
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return TextTokenizer(tokenizer, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")


def load_pretrained_tokenizer(
    dir_or_file: str | os.PathLike,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> TextTokenizer:
    """Load a local pretrained Hugging Face tokenizer, keeping its own ids. Never downloads.

    Roles: BOS is the model's ``cls_token`` (BERT ``[CLS]``, RoBERTa ``<s>``) or else its ``bos_token``, EOS
    its ``sep_token`` or else ``eos_token``, PAD its ``pad_token`` (falling back to EOS for tokenizers
    without one, e.g. GPT-2: the models only read ``attention_mask``). They are read from
    ``tokenizer_config.json`` / ``special_tokens_map.json`` when present, else from the tokenizer's
    post-processor, else from well-known token names.

    Args:
        dir_or_file: a ``tokenizer.json``, a directory holding one (e.g. a model snapshot), a directory
            holding only a BERT ``vocab.txt``, or a Hub repo id already in the local Hugging Face cache.
        bos_token: force the BOS token.
        eos_token: force the EOS token.
        pad_token: force the PAD token.

    Returns:
        The tokenizer.

    Raises:
        MissingFileError: nothing usable at ``dir_or_file`` (the message says what was looked for).
        UserError: a tokenizer file that does not parse, or whose start / end tokens cannot be told (named).
    """
    path = Path(dir_or_file)
    if not path.exists():
        path = _from_hf_cache(str(dir_or_file))
    folder = path if path.is_dir() else path.parent
    config = _read_special_token_config(folder)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        source = path / "tokenizer.json"
        tokenizer = _read_tokenizer(source)
    elif path.is_dir() and (path / "vocab.txt").is_file():
        source = path / "vocab.txt"
        tokenizer = _bert_from_vocab(source, lowercase=bool(config.get("do_lower_case", True)))
    elif path.is_file():
        source = path
        tokenizer = _read_tokenizer(path)
    else:
        raise MissingFileError(
            f"file {path}: no tokenizer.json or vocab.txt here; "
            "point to a local tokenizer directory (nothing is downloaded)"
        )
    overrides = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
    return _wrap(tokenizer, config=config, overrides=overrides, source=source)


# ------------------------------------------------------------------------------------------- helpers


def _require_id(tokenizer: Tokenizer, token: str, role: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{role} token {token!r} is not in the tokenizer's vocabulary")
    return token_id


def _read_tokenizer(path: Path) -> Tokenizer:
    """``Tokenizer.from_file``, or a UserError naming the file when it is empty, cut short or not a tokenizer (the
    library raises a bare Exception saying only "EOF while parsing")."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for every parse error
        raise UserError(
            file_message(
                path,
                f"not a readable tokenizer file ({path.stat().st_size} bytes; {e})",
                "copy it again, or point tokenizer.path at a local directory holding a valid tokenizer.json",
            )
        ) from e


def _from_hf_cache(repo_id: str) -> Path:
    """The snapshot directory of ``repo_id`` in the local Hugging Face cache; FileNotFoundError if absent."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("tokenizer.json", "vocab.txt"):
            cached = try_to_load_from_cache(repo_id, filename)
            if isinstance(cached, str):
                return Path(cached).parent
    except Exception:  # noqa: BLE001 - not a repo id, or no hub library: fall through to the clear error
        pass
    raise MissingFileError(
        f"file {repo_id}: no tokenizer here and not in the local Hugging Face cache; pass a local directory "
        "holding tokenizer.json (nothing is downloaded)"
    )


def _read_special_token_config(folder: Path) -> dict[str, Any]:
    """Merge ``tokenizer_config.json`` and ``special_tokens_map.json`` of a snapshot (token values as strings)."""
    config: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            try:
                config.update(json.loads(file.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # these files only refine the guess; tokenizer.json is what must be valid
    for key, value in list(config.items()):
        if isinstance(value, dict) and "content" in value:  # AddedToken serialised as {"content": ...}
            config[key] = value["content"]
    return config


def _bert_from_vocab(vocab_file: Path, lowercase: bool) -> Tokenizer:
    """A BERT WordPiece tokenizer from an old-style snapshot that has only ``vocab.txt``."""
    tokenizer = Tokenizer(models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _post_processor_tokens(spec: dict[str, Any]) -> tuple[str | None, str | None]:
    """(first, last) special token of a serialised post-processor, i.e. its BOS and EOS roles."""
    kind = (spec or {}).get("type")
    if kind == "TemplateProcessing":
        specials = [piece["SpecialToken"]["id"] for piece in spec.get("single", []) if "SpecialToken" in piece]
        return (specials[0], specials[-1]) if len(specials) >= 2 else (None, None)
    if kind in ("BertProcessing", "RobertaProcessing"):
        return spec["cls"][0], spec["sep"][0]
    if kind == "Sequence":
        for inner in spec.get("processors", []):
            found = _post_processor_tokens(inner)
            if found[0] is not None:
                return found
    return None, None


def _wrap(
    tokenizer: Tokenizer, *, config: dict[str, Any], overrides: dict[str, str | None], source: Path | str = "tokenizer"
) -> TextTokenizer:
    """Decide the BOS / EOS / PAD / UNK roles of a loaded tokenizer and wrap it (see `load_pretrained_tokenizer`)."""
    spec = json.loads(tokenizer.to_str())
    pp_bos, pp_eos = _post_processor_tokens(spec.get("post_processor"))
    padding = spec.get("padding") or {}
    model_unk = (spec.get("model") or {}).get("unk_token")

    def pick(*candidates: str | None) -> str | None:
        for token in candidates:
            if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
                return token
        return None

    bos = pick(overrides.get("bos"), config.get("cls_token"), config.get("bos_token"), pp_bos, *_BOS_NAMES)
    eos = pick(overrides.get("eos"), config.get("sep_token"), config.get("eos_token"), pp_eos, *_EOS_NAMES)
    pad = pick(overrides.get("pad"), config.get("pad_token"), padding.get("pad_token"), *_PAD_NAMES) or eos
    unk = pick(config.get("unk_token"), model_unk, *_UNK_NAMES)
    if bos is None or eos is None:
        raise UserError(
            file_message(
                source,
                "cannot tell which tokens start and end a text in this tokenizer (no [CLS]/[SEP], <s>/</s>, ... in "
                "its vocabulary, config files or post-processor)",
                "pass bos_token= and eos_token= to load_pretrained_tokenizer, or use a tokenizer that has them",
            )
        )
    for role, token in (("bos", overrides.get("bos")), ("eos", overrides.get("eos")), ("pad", overrides.get("pad"))):
        if token is not None and token != {"bos": bos, "eos": eos, "pad": pad}[role]:
            raise UserError(file_message(source, f"{role}_token {token!r} is not in the tokenizer's vocabulary"))
    return TextTokenizer(tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk)
