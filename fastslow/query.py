"""Query time in one object: the student, its faiss index, the teacher and the gallery's token store, loaded once,
checked to belong together, and asked ``search(texts, k, mode)``.

`tools/search.py`, `tools/rerank_eval.py` and `benchmarks/query_scaling.py` all go through `Retriever`, so the
timing code (`timed`, `latency_summary`), the fast rerank path (`candidate_scores`: one store gather and one teacher
call per batch of queries over their k candidates only) and the tuning of the fusion weight (`tune_fuse_alphas`,
per k, guarded so that a teacher that hurts gets weight 0) live here and nowhere else.

Modes of `Retriever.search`:

- ``fast``: the student alone, through the index.
- ``slow``: the teacher over the whole gallery (the Slow baseline; cost grows with the gallery).
- ``rerank``: the student's top-k reranked by the teacher alone (fast+slow@k; `fastslow.combiner` mode ``slow``).
- ``fuse``: the student's top-k ranked by the per-query z-normalised mix, with the weight tuned for this index at
  this k (``${output_dir}/eval/fuse_alpha.json``, written by ``rerank_eval.py``).

What must belong together, and is checked when the object is opened (`Retriever.open`), each mismatch a
`StaleArtefactError` naming the artefact, each differing field and the command that rebuilds it:

- the index and the gallery embeddings were built by this student (``student_hash``) with these visual settings;
- the token store holds this teacher's tokens (``teacher_hash``) of the index's gallery (``gallery_hash``);
- the fusion weights were tuned for this student, teacher (and the teacher's tokenizer, ``teacher_tokenizer_hash``)
  and index (its gallery and kind) and query length; a k they were not tuned at is refused when it is asked for.

The teacher reads queries through its own tokenizer (``teacher_tokenizer``, saved beside its weights), which may not
be the student's (a BERT student, a teacher with a small caption vocabulary: ``teacher.tokenizer``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fastslow import index as fs_index
from fastslow.artefacts import atomic_write_json, check_stamp, file_hash, read_json
from fastslow.combiner import adaptive_k, check_k, check_queries, hits, rerank, tune_alpha
from fastslow.errors import QueryError, StaleArtefactError

MODES = ("fast", "slow", "rerank", "fuse")
FUSE_FILE = "fuse_alpha.json"
DEFAULT_ALPHA = 0.5  # an even mix, when no weight was tuned and none is given


# ------------------------------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[list[str]], Any], texts: list[str], batch: int, *, warmup: bool = True):
    """Run ``fn`` over ``texts`` in batches of ``batch``; returns (outputs, per-query latencies in ms, one per query).

    A batch's wall time is divided by its size (batch=1 is what one user waiting for one query sees). The first
    batch is run once before timing: first-call allocations and lazy initialisation are not query latency.
    """
    outs, lat = [], []
    if texts and warmup:
        fn(texts[:batch])
    for s in range(0, len(texts), batch):
        part = texts[s : s + batch]
        t0 = time.perf_counter()
        outs.append(fn(part))
        lat += [(time.perf_counter() - t0) * 1e3 / len(part)] * len(part)
    return outs, lat


def latency_summary(lat: Sequence[float]) -> dict[str, float]:
    """Mean, median and 95th percentile of per-query latencies (ms)."""
    a = np.asarray(lat, dtype=np.float64)
    return {
        "latency_ms_mean": float(a.mean()),
        "latency_ms_p50": float(np.percentile(a, 50)),
        "latency_ms_p95": float(np.percentile(a, 95)),
    }


# ------------------------------------------------------------------------------------------------ the rerank path


def candidate_scores(scorer: Any, texts: list[str], ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Teacher scores of each query's candidates, [Q, k] ids -> [Q, k] float32 (NaN where the id is -1).

    ``scorer`` is a `fastslow.evaluation.StoreTeacherScorer`; batches of ``batch`` queries go through its fast path
    (`StoreTeacherScorer.candidates`: one gather of the batch's rows, the k candidates of each query only).
    """
    ids = torch.as_tensor(ids).long()
    out = torch.full(ids.shape, float("nan"))
    for s in range(0, len(texts), batch):
        out[s : s + batch] = scorer.candidates(texts[s : s + batch], ids[s : s + batch])
    return out


def lookup(scores: torch.Tensor, ids: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``teacher_score_fn`` for `fastslow.combiner.rerank` answering from precomputed candidate scores ([Q, k]
    aligned with ids [Q, k]): the teacher is asked once per batch, and every k and mode ranks from its answers."""

    def fn(query_idx: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        pos = (ids[query_idx] == item_ids[:, None]).float().argmax(1)
        return scores[query_idx, pos]

    return fn


# ------------------------------------------------------------------------------------------------- fusion weights


def tune_fuse_alphas(
    student_scores: torch.Tensor,
    ids: torch.Tensor,
    teacher_scores: torch.Tensor,
    positives: Sequence[int] | torch.Tensor,
    ks: Sequence[int],
    *,
    min_gain: float = 0.0,
) -> dict[int, dict[str, float]]:
    """The fusion weight for each k, tuned on validation queries (guarded: `fastslow.combiner.tune_alpha`).

    The student's top-k is a prefix of its top-K (K = max ks), so the teacher scores [Q, K] are computed once and
    every k is tuned on its prefix.

    Args:
        student_scores, ids, teacher_scores: [Q, K] val candidates (sorted by the student), their teacher scores.
        positives: [Q] the item each val query should retrieve.
        ks: the depths to tune at (each clamped to K).
        min_gain: R@1 points alpha > 0 must gain over the student alone (below it, alpha = 0: the teacher hurts).

    Returns:
        ``{k: {"alpha", "r1_student", "r1_teacher", "r1_fused"}}``: the weight and the val R@1 (percent) of the
        student alone (alpha 0), teacher-only reranking (alpha 1) and the fusion at the chosen weight.
    """
    out = {}
    for k in sorted({int(k) for k in ks}):
        # Keyed by the k asked for: a val split smaller than k tunes on all its items, as a gallery smaller than k
        # is searched in full (k clamped).
        kv = min(k, ids.shape[1])
        alpha, r1 = tune_alpha(student_scores[:, :kv], ids[:, :kv], teacher_scores[:, :kv], positives,
                               min_gain=min_gain)  # fmt: skip
        out[k] = {"alpha": alpha, "r1_student": r1[0.0], "r1_teacher": r1[1.0], "r1_fused": r1[alpha]}
    return out


@torch.no_grad()
def tune_on_split(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    split: Any,
    load_visual: Callable,
    *,
    ks: Sequence[int],
    max_length: int,
    text_batch: int = 64,
    index_kw: dict[str, Any] | None = None,
    min_gain: float = 0.0,
    on_error: str = "raise",
    ledger: Any = None,
    teacher_load_visual: Callable | None = None,
    teacher_tokenizer: Any = None,
) -> tuple[dict[int, dict[str, float]], Any]:
    """Tune the fusion weight per k on a validation split: encode its items with both models, index them as the
    gallery is indexed (``index_kw``: the recipe's kind and parameters), rerank the student's top-max(ks).

    ``load_visual`` is the student's item loader; ``teacher_load_visual`` the teacher's when it differs (each model
    normalises with its own backbone's statistics, `stages.visual_loader(cfg, model)`); None: the same loader.
    ``tokenizer`` is the student's; ``teacher_tokenizer`` the teacher's own (None: the student's).

    Returns:
        ``(tune_fuse_alphas(...), the split as read)``: under ``on_error="skip"`` the items that cannot be read and
        their captions are left out (recorded in ``ledger``).
    """
    from fastslow.evaluation import StoreTeacherScorer, encode_items, encode_texts_student
    from teachers import VisualTokens

    # One read of each val item for both models, so that both see the same items under data.on_error=skip.
    def both(*x):
        return student.encode_visual(*x).float().cpu(), teacher.encode_visual(*x).to(device="cpu")

    if teacher_load_visual is None or repr(teacher_load_visual) == repr(load_visual):
        v_out, kept = encode_items(both, split, load_visual, 64, on_error=on_error, ledger=ledger, where="val")
    else:  # two loaders, two reads; a file unreadable for one is unreadable for the other
        s_out, kept = encode_items(
            lambda *x: student.encode_visual(*x).float().cpu(), split, load_visual, 64,
            on_error=on_error, ledger=ledger, where="val",
        )  # fmt: skip
        t_out, t_kept = encode_items(
            lambda *x: teacher.encode_visual(*x).to(device="cpu"), split, teacher_load_visual, 64,
            on_error=on_error, ledger=ledger, where="val",
        )  # fmt: skip
        if not torch.equal(torch.as_tensor(kept), torch.as_tensor(t_kept)):
            raise RuntimeError("the student's and the teacher's loaders read different val items")
        v_out = [(torch.cat(s_out), VisualTokens.cat(t_out))]
    if len(kept) < split.n_items:
        full, split = split, split.select_items(kept.tolist())
        print(
            f"fuse: {full.n_items - split.n_items} of {full.n_items} val items could not be read and are left "
            f"out, with {full.n_texts - split.n_texts} of {full.n_texts} captions (data.on_error=skip)"
        )
    v_index = fs_index.build_index(torch.cat([o[0] for o in v_out]).numpy(), **(index_kw or {"kind": "flat"}))
    k_max = min(max(ks), split.n_items)
    query = encode_texts_student(student, tokenizer, split.captions, max_length=max_length)
    v_s, v_ids = (torch.from_numpy(a) for a in fs_index.search(v_index, query, k_max))
    scorer = StoreTeacherScorer(teacher, VisualTokens.cat([o[1] for o in v_out]), teacher_tokenizer or tokenizer,
                                max_length)  # fmt: skip
    v_t = candidate_scores(scorer, split.captions, v_ids, text_batch)
    return tune_fuse_alphas(v_s, v_ids, v_t, torch.as_tensor(split.text_to_visual), ks, min_gain=min_gain), split


def fuse_stamp(
    *,
    student_hash: str,
    teacher_hash: str,
    index_manifest: dict[str, Any],
    val_split: str,
    max_length: int,
    teacher_tokenizer_hash: str | None = None,
) -> dict[str, Any]:
    """What a tuned fusion weight depends on: both models (and the tokenizer the teacher read the queries with), the
    index it reranks the candidates of (its gallery and kind decide which candidates come back), the split it was
    tuned on and how queries are cut."""
    return {
        "student_hash": student_hash,
        "teacher_hash": teacher_hash,
        "teacher_tokenizer_hash": teacher_tokenizer_hash,
        "index_gallery_hash": index_manifest["gallery_hash"],
        "index.kind": index_manifest.get("kind"),
        "val_split": val_split,
        "data.max_length": int(max_length),
    }


def save_fuse_alphas(path: str | Path, tuned: dict[int, dict[str, float]], *, split: str, stamp: dict) -> Path:
    """Write the per-k weights of `tune_fuse_alphas` to ``path`` (``fuse_alpha.json``), stamped (`fuse_stamp`)."""
    body = {"alphas": {str(k): v["alpha"] for k, v in tuned.items()}, "val": {str(k): v for k, v in tuned.items()},
            "split": split}  # fmt: skip
    return atomic_write_json(path, body, stamp=stamp)


def load_fuse_alphas(path: str | Path, expect: dict[str, Any], rebuild: str) -> dict[int, float]:
    """The per-k weights in ``path``, after checking its stamp against ``expect`` (`fuse_stamp`)."""
    check_stamp(path, expect, rebuild)
    body = read_json(path, rebuild)
    if not isinstance(body, dict) or not isinstance(body.get("alphas"), dict):
        raise StaleArtefactError(f"{path} holds no per-k weights (an older format): {rebuild}", path=path)
    return {int(k): float(a) for k, a in body["alphas"].items()}


# --------------------------------------------------------------------------------------------------- the object


class SearchResult(NamedTuple):
    """What `Retriever.search` returns: [Q, k] tensors in final order, and where the time went.

    Attributes:
        ids: gallery rows, best first (-1 = no result).
        scores: final scores (the student's, the teacher's or the fused ones; -inf for unscored tails).
        student_scores: the student's score of each id (NaN in ``slow`` mode beyond what the student retrieved).
        teacher_scores: the teacher's (NaN where it was not asked).
        pairs_scored: (query, item) pairs the teacher scored.
        timings: milliseconds, summed over the batches: ``encode``, ``index``, ``teacher``, ``total``.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    student_scores: torch.Tensor
    teacher_scores: torch.Tensor
    pairs_scored: int
    timings: dict[str, float]


class Retriever:
    """Fast retrieval and Slow reranking over one indexed gallery, everything loaded once.

    Build it with `Retriever.open` (checks every artefact against its stamp) or `Retriever.from_run` (a recipe's
    run directory); the constructor takes objects already checked.

    Args:
        student, tokenizer, max_length: the student (eval mode), its tokenizer and query length.
        index, manifest: the faiss index of the gallery and its manifest (`fastslow.index.load_index`).
        teacher, store: the teacher and the gallery's `TokenStore` (None: only ``fast`` mode works).
        teacher_tokenizer: the teacher's own tokenizer, which turns queries into the teacher's ids (None: the
            student's, when both share one).
        alphas: tuned fusion weight per k; ``alpha``: one weight for every k (overrides ``alphas``).
        fuse_loader: called once, on the first ``fuse`` search, to load ``alphas`` (a file checked lazily, so that a
            mode that does not fuse never reads it).
        batch_size: queries encoded, searched and reranked together.
        embeddings_loader: returns the exact gallery embeddings [N, E] (checked), for `embeddings`.
    """

    def __init__(
        self,
        student: Any,
        tokenizer: Any,
        index: Any,
        manifest: dict[str, Any],
        *,
        max_length: int,
        teacher: Any = None,
        store: Any = None,
        alphas: dict[int, float] | None = None,
        alpha: float | None = None,
        fuse_loader: Callable[[], dict[int, float] | None] | None = None,
        batch_size: int = 64,
        embeddings_loader: Callable[[], np.ndarray] | None = None,
        teacher_tokenizer: Any = None,
    ) -> None:
        from fastslow.evaluation import StoreTeacherScorer

        self.student, self.tokenizer, self.max_length = student, tokenizer, max_length
        self.index, self.manifest = index, manifest
        self.teacher, self.store = teacher, store
        self.teacher_tokenizer = teacher_tokenizer or tokenizer
        self.scorer = None
        if teacher is not None:
            self.scorer = StoreTeacherScorer(teacher, store, self.teacher_tokenizer, max_length)
        self.alpha, self.alphas, self._fuse_loader = alpha, alphas, fuse_loader
        self.batch_size = batch_size
        self.logit_scale = float(student.inverse_temperature())
        self._embeddings_loader, self._embeddings = embeddings_loader, None
        self.student_hash: str | None = None  # set by `open`: what the artefacts were checked against
        self.teacher_hash: str | None = None
        self.teacher_tokenizer_hash: str | None = None
        self.fuse_path: str | Path | None = None  # where `alphas` came from, and what rebuilds it (in errors)
        self.rebuild_fuse = "tools/rerank_eval.py"

    # ------------------------------------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        *,
        student: Any,
        tokenizer: Any,
        student_hash: str,
        max_length: int,
        teacher: Any = None,
        teacher_hash: str | None = None,
        teacher_tokenizer: Any = None,
        teacher_tokenizer_hash: str | None = None,
        settings: dict[str, Any] | None = None,
        gallery_hash: str | None = None,
        fuse_file: str | Path | None = None,
        val_split: str | None = None,
        alpha: float | None = None,
        rebuild: str = fs_index.BUILD_INDEX,
        rebuild_fuse: str = "tools/rerank_eval.py",
        batch_size: int = 64,
    ) -> Retriever:
        """Open an index directory (``index.faiss``, ``manifest.json``, ``embeddings.npy``, ``tokens/``) for this
        student and teacher, checking that every part belongs with the others.

        Args:
            index_dir: the index directory (`tools/build_index.py` writes it).
            student, tokenizer, student_hash: the student and the hash of its weights.
            max_length: query length (part of the fusion weights' stamp).
            teacher, teacher_hash: the teacher and its weights' hash; None opens no token store (``fast`` only).
            teacher_tokenizer, teacher_tokenizer_hash: the teacher's own tokenizer (None: the student's) and the hash
                of its file (the fusion weights are stamped with it).
            settings: the visual settings every stamp carries (e.g. ``{"data.image_size": 64}``).
            gallery_hash: the gallery the caller expects (an evaluation knows its split); None trusts the manifest.
            fuse_file: the tuned fusion weights (``fuse_alpha.json``); None, or a file that does not exist, uses
                ``alpha`` (or an even mix, with a warning).
            val_split: the split the weights must have been tuned on (default: the manifest's dataset + "/val").
            alpha: one weight for every k (overrides the file).
            rebuild, rebuild_fuse: the commands that rebuild the index directory and the fusion weights (in errors).

        Raises:
            MissingFileError: a part of the index directory is absent.
            StaleArtefactError: a part was built from other inputs (another student, teacher, gallery, settings).
        """
        from teachers import TokenStore

        index_dir = Path(index_dir)
        settings = dict(settings or {})
        expect = {"student_hash": student_hash, **settings}
        if gallery_hash is not None:
            expect["gallery_hash"] = gallery_hash
        index, manifest = fs_index.load_index(index_dir, expect=expect, rebuild=rebuild)
        gallery = {"gallery_hash": manifest["gallery_hash"], **settings}
        store = None
        if teacher is not None:
            # The index and the tokens are two writes: a crash between them, or a rebuilt index beside an old store,
            # would otherwise rerank rows of another gallery or score them with tokens of another teacher.
            store = TokenStore.open(index_dir / "tokens", expect={"teacher_hash": teacher_hash, **gallery},
                                    rebuild=rebuild)  # fmt: skip

        def embeddings():
            return fs_index.load_embeddings(index_dir, expect={"student_hash": student_hash, **gallery},
                                            rebuild=rebuild)  # fmt: skip

        fuse_loader = None
        if fuse_file is not None and teacher is not None:
            split = val_split or manifest.get("split", "").rpartition("/")[0] + "/val"
            want = fuse_stamp(student_hash=student_hash, teacher_hash=teacher_hash, index_manifest=manifest,
                              val_split=split, max_length=max_length,
                              teacher_tokenizer_hash=teacher_tokenizer_hash)  # fmt: skip

            def fuse_loader():
                return load_fuse_alphas(fuse_file, want, rebuild_fuse) if Path(fuse_file).is_file() else None

        out = cls(student, tokenizer, index, manifest, max_length=max_length, teacher=teacher, store=store,
                  alpha=alpha, fuse_loader=fuse_loader, batch_size=batch_size,
                  embeddings_loader=embeddings, teacher_tokenizer=teacher_tokenizer)  # fmt: skip
        out.student_hash, out.teacher_hash = student_hash, teacher_hash
        out.teacher_tokenizer_hash = teacher_tokenizer_hash
        out.fuse_path, out.rebuild_fuse = fuse_file, rebuild_fuse
        return out

    @classmethod
    def from_run(cls, cfg: Any, *, gallery_hash: str | None = None, teacher: bool = True) -> Retriever:
        """The retriever of a recipe's run directory: ``${output_dir}/student``, ``/teacher``, ``/index`` and the
        weights ``/eval/fuse_alpha.json``; ``combiner.alpha`` (when set) is the weight for every k."""
        from fastslow import stages

        student_dir, teacher_dir = stages.stage_dir(cfg, "student"), stages.stage_dir(cfg, "teacher")
        student, _, tok = stages.load_trained(student_dir, "student")
        kw: dict[str, Any] = {}
        if teacher:
            # The teacher reads queries through its own tokenizer, saved beside its weights.
            kw["teacher"], _, kw["teacher_tokenizer"] = stages.load_trained(teacher_dir, "teacher")
            kw["teacher_hash"] = stages.weights_hash(teacher_dir / "model.safetensors")
            kw["teacher_tokenizer_hash"] = file_hash(teacher_dir / "tokenizer.json")
        fix = f"{stages.rebuild_command(cfg, 'rerank_eval.py')} (it tunes the weights), or set combiner.alpha"
        return cls.open(
            stages.stage_dir(cfg, "index"),
            student=student,
            tokenizer=tok,
            student_hash=stages.weights_hash(student_dir / "model.safetensors"),
            max_length=cfg.data.max_length,
            settings=stages.visual_stamp(cfg),
            gallery_hash=gallery_hash,
            fuse_file=stages.stage_dir(cfg, "eval") / FUSE_FILE,
            alpha=cfg.combiner.alpha,
            rebuild=stages.rebuild_command(cfg, "build_index.py"),
            rebuild_fuse=fix,
            batch_size=cfg.eval.text_batch,
            **kw,
        )

    # ------------------------------------------------------------------------------------------------ parts
    @property
    def n_items(self) -> int:
        return int(self.index.ntotal)

    def embeddings(self) -> torch.Tensor:
        """The exact gallery embeddings [N, E] float32 (checked against this student and gallery; read once)."""
        if self._embeddings is None:
            self._embeddings = torch.from_numpy(self._embeddings_loader())
        return self._embeddings

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Student query embeddings [Q, E] (L2-normalised, float32, CPU)."""
        from fastslow.evaluation import encode_texts_student

        return encode_texts_student(self.student, self.tokenizer, texts, max_length=self.max_length)

    def alpha_for(self, k: int) -> float:
        """The fusion weight at depth k: ``alpha`` if given, else the one tuned at k.

        Raises:
            StaleArtefactError: the weights were tuned at other depths (named), not at k.
        """
        if self.alpha is not None:
            return float(self.alpha)
        if self.alphas is None and self._fuse_loader is not None:
            self.alphas, self._fuse_loader = self._fuse_loader(), None
        if not self.alphas:
            warnings.warn(f"no tuned fusion weight (run rerank_eval.py): using alpha={DEFAULT_ALPHA}", stacklevel=3)
            self.alphas = {}
            self.alpha = DEFAULT_ALPHA
            return DEFAULT_ALPHA
        if k not in self.alphas:
            raise StaleArtefactError(
                f"{self.fuse_path}: the fusion weight was tuned at k={sorted(self.alphas)}, not at k={k} (a weight "
                f"belongs to the depth it was tuned at): search with one of those k, or add {k} to eval.k and "
                f"rerun {self.rebuild_fuse}",
                path=self.fuse_path or "fusion weights",
                rebuild=self.rebuild_fuse,
            )
        return self.alphas[k]

    # ------------------------------------------------------------------------------------------------ search
    def check_mode(self, mode: Any) -> str:
        """``mode`` if this retriever can search in it; QueryError otherwise (an unknown mode, or one that needs the
        teacher when none was loaded). `fastslow.service` checks a request with it before the request joins a batch.
        """
        if mode not in MODES:
            raise QueryError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        if mode != "fast" and self.scorer is None:
            raise QueryError(f"mode={mode!r} needs the teacher and its token store; this retriever has neither")
        return mode

    def _clamp(self, k: Any) -> int:
        k = check_k(k)
        if k > self.n_items:
            warnings.warn(f"k={k} is larger than the gallery ({self.n_items} items): using k={self.n_items}",
                          stacklevel=3)  # fmt: skip
            k = self.n_items
        return k

    @torch.no_grad()
    def search(self, texts: Sequence[str], k: int, mode: str = "rerank", *, margin: float | None = None,
               k_min: int = 1) -> SearchResult:  # fmt: skip
        """Rank the gallery for each query.

        Args:
            texts: Q query strings (Q may be 0).
            k: results per query (candidates reranked in ``rerank`` / ``fuse``); clamped to the gallery with a warning.
            mode: ``fast`` | ``slow`` | ``rerank`` | ``fuse`` (module docstring).
            margin, k_min: adaptive depth in ``rerank`` / ``fuse`` (`fastslow.combiner.adaptive_k`): a query whose
                student top-1 leads by ``margin`` logits reranks only ``k_min`` candidates; None: always k.

        Returns:
            `SearchResult` ([Q, k] tensors and the time spent per part).

        Raises:
            QueryError: k <= 0, an empty query (or one the tokenizer reads no word in), or an unknown mode.
        """
        self.check_mode(mode)
        texts = check_queries(texts, self.tokenizer, self.max_length)
        alpha = self.alpha_for(check_k(k)) if mode == "fuse" else None  # tuned per k asked for (tune_fuse_alphas)
        k = self._clamp(k)
        t = dict.fromkeys(("encode", "index", "teacher", "total"), 0.0)
        parts = []
        for s in range(0, len(texts), self.batch_size):
            parts.append(self._batch(texts[s : s + self.batch_size], k, mode, alpha, margin, k_min, t))
        if not parts:
            empty = torch.empty((0, k))
            return SearchResult(empty, empty.long(), empty, empty.clone(), 0, t)
        cat = [torch.cat([getattr(p, f) for p in parts]) for f in SearchResult._fields[:4]]
        return SearchResult(*cat, sum(p.pairs_scored for p in parts), t)

    def _batch(self, texts, k, mode, alpha, margin, k_min, t) -> SearchResult:
        t0 = time.perf_counter()
        if mode == "slow":  # the teacher over every item: no student, no index
            full = self.scorer.full(texts)
            t1 = time.perf_counter()
            scores, ids = full.topk(k, dim=1)
            nan = torch.full(scores.shape, torch.nan)
            t["teacher"] += (t1 - t0) * 1e3
            t["total"] += (time.perf_counter() - t0) * 1e3
            return SearchResult(ids, scores, nan, scores, full.numel(), {})
        emb = self.encode(texts)
        t1 = time.perf_counter()
        student, ids = (torch.from_numpy(a) for a in fs_index.search(self.index, emb, k))
        t2 = time.perf_counter()
        t["encode"] += (t1 - t0) * 1e3
        t["index"] += (t2 - t1) * 1e3
        if mode == "fast":
            t["total"] += (t2 - t0) * 1e3
            return SearchResult(ids, student, student, torch.full(student.shape, torch.nan), 0, {})
        depth = None if margin is None else adaptive_k(student, margin=margin, k_min=k_min, scale=self.logit_scale)
        if depth is None:  # the fast path: one gather, the k candidates of each query only
            cand = self.scorer.candidates(texts, ids)
            fn = lookup(cand, ids)
        else:  # ragged depths: only the pairs within each query's depth are scored
            fn = lambda q, i: self.scorer(texts, q, i)  # noqa: E731
        res = rerank(student, ids, fn, mode="slow" if mode == "rerank" else "fuse", alpha=alpha or 0.0, depth=depth)
        t3 = time.perf_counter()
        t["teacher"] += (t3 - t2) * 1e3
        t["total"] += (t3 - t0) * 1e3
        return SearchResult(res.ids, res.scores, res.student_scores, res.teacher_scores, res.pairs_scored, {})

    def hits(self, result: SearchResult) -> list:
        """`fastslow.combiner.Hit` lists of a result, one per query (what `tools/search.py` prints)."""
        return hits(result)


__all__ = [
    "FUSE_FILE",
    "MODES",
    "Retriever",
    "SearchResult",
    "candidate_scores",
    "fuse_stamp",
    "latency_summary",
    "load_fuse_alphas",
    "lookup",
    "save_fuse_alphas",
    "timed",
    "tune_fuse_alphas",
    "tune_on_split",
]
