"""Search as a service: an ASGI app (FastAPI) over one `fastslow.query.Retriever`, loaded once.

    python tools/serve.py recipe=shapes                      # http://127.0.0.1:8000/
    curl 'http://127.0.0.1:8000/search?q=a+red+circle&k=20&mode=rerank'

Endpoints (`create_app`):

- ``GET /search?q=&k=&mode=`` -> JSON: ranked ids, item paths and URLs, student, teacher and final scores, each
  result's Fast rank and Slow rank, and the time spent (queue, encode, index, rerank). Modes are the library's
  (`fastslow.query.MODES`): ``fast`` (student + index), ``rerank`` (the student's top-k reranked by the teacher:
  fast+slow@k, the default), ``fuse`` (the tuned mix over the same top-k) and ``slow`` (the teacher over the whole
  gallery: the Slow baseline). Each answer names its method (``fast``, ``fast+slow@20``, ...).
- ``GET /`` -> the result page (query box, mode and k, thumbnails with both ranks, latency).
- ``GET /items/<path>`` -> a gallery file; a path that resolves outside the gallery folder (``..``, an absolute path,
  a symlink out) is refused.
- ``GET /healthz``, ``GET /stats`` (queries served, p50/p95 latency, the histogram of batch sizes).

Micro-batching (`MicroBatcher`): a request waits at most ``max_wait_ms`` for others; the waiting requests are
grouped by (mode, k) and each group is ONE `Retriever.search` call (one student batch, one teacher batch), run on
a worker thread so that the event loop keeps accepting requests meanwhile. Requests that arrive while a batch runs
form the next one, so under load the batches grow by themselves. Beyond ``queue_size`` waiting requests the
service answers 503 with Retry-After instead of queueing without bound.

Bad requests get 400 with the library's message (`fastslow.errors.QueryError`: an empty or all-invisible query,
k <= 0, an unknown mode) or the service's own (k above ``max_k``, a query above ``max_query_chars``). A query longer
than the tokenizer's limit is cut, as the library cuts it, and the answer says so (``truncated``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import html
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np

from fastslow.combiner import check_k, check_queries
from fastslow.errors import QueryError, UserError
from fastslow.query import MODES, Retriever, SearchResult, latency_summary

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
DEFAULT_MODE = "rerank"  # fast+slow@k: what the framework is for
RETRY_AFTER_S = 1  # what a refused client is told to wait: a batch on this hardware takes milliseconds to ~1 s


class Overloaded(Exception):
    """More requests are waiting than the queue holds (answered 503 with Retry-After)."""


def method_name(mode: str, k: int) -> str:
    """The method a mode runs, as the metrics name it (``fast+slow@20`` is the rerank mode at k=20)."""
    return {"fast": "fast", "slow": "slow", "rerank": f"fast+slow@{k}", "fuse": f"fuse@{k}"}[mode]


# ----------------------------------------------------------------------------------------------------- stats


@dataclass
class Stats:
    """What `/stats` reports: counts since start, latency over the last ``window`` answered queries (ms, from the
    request's arrival to its answer, queueing included) and how many queries each model call carried."""

    window: int = 10_000
    served: int = 0
    rejected: int = 0  # 503: the queue was full
    bad_requests: int = 0
    latencies_ms: deque = field(default_factory=deque)
    batch_sizes: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.time)

    def answered(self, ms: float) -> None:
        self.served += 1
        self.latencies_ms.append(ms)
        while len(self.latencies_ms) > self.window:
            self.latencies_ms.popleft()

    def snapshot(self) -> dict[str, Any]:
        lat = latency_summary(self.latencies_ms) if self.latencies_ms else {}
        return {
            "queries_served": self.served,
            "rejected_503": self.rejected,
            "bad_requests": self.bad_requests,
            "latency_ms_p50": lat.get("latency_ms_p50"),
            "latency_ms_p95": lat.get("latency_ms_p95"),
            "latency_window": len(self.latencies_ms),
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(n): c for n, c in sorted(self.batch_sizes.items())},  # size -> model calls
            "uptime_s": time.time() - self.started,
        }


# ------------------------------------------------------------------------------------------------ batching


@dataclass
class _Request:
    text: str
    k: int
    mode: str
    future: asyncio.Future
    arrived: float


@dataclass
class Answer:
    """One caller's row of a batched `Retriever.search`: [k] tensors, and the batch it was served in."""

    row: SearchResult  # ids, scores, ... of this query only ([k] each); timings are the batch's (ms)
    batch_size: int  # queries in the model call that answered it
    queue_ms: float  # from arrival to the start of that call


class MicroBatcher:
    """Gathers concurrent queries into one `search(texts, k, mode)` call per (mode, k), on one worker thread.

    Args:
        search: ``(texts, k, mode) -> SearchResult`` with [Q, k] rows (`Retriever.search`).
        max_wait_ms: how long the first waiting query waits for others before its batch runs (0: no wait; queries
            that arrive while a batch runs still form the next one).
        max_batch: queries per model call, at most.
        queue_size: queries waiting (not yet in a model call), at most; `submit` raises `Overloaded` beyond it.
        stats: where batch sizes are counted.
    """

    def __init__(
        self,
        search: Callable[[list[str], int, str], SearchResult],
        *,
        max_wait_ms: float,
        max_batch: int,
        queue_size: int,
        stats: Stats | None = None,
    ) -> None:
        self.search, self.max_wait, self.max_batch, self.queue_size = search, max_wait_ms / 1e3, max_batch, queue_size
        self.stats = stats if stats is not None else Stats()
        self._pending: deque[_Request] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One thread: torch runs one model call at a time with all its intra-op threads, and the tokenizer is not
        # shared between threads (it keeps its truncation length as state).
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastslow-search")

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for r in self._pending:
            if not r.future.done():
                r.future.set_exception(Overloaded("the service is shutting down"))
        self._pending.clear()
        self.pool.shutdown(wait=True)

    async def submit(self, text: str, k: int, mode: str) -> Answer:
        """Queue one query and wait for its answer (its own row of the batch it lands in)."""
        if self._task is None:
            raise RuntimeError("MicroBatcher.start() was not called (the app's lifespan starts it)")
        if len(self._pending) >= self.queue_size:
            self.stats.rejected += 1
            raise Overloaded(f"{len(self._pending)} queries are waiting (serve.queue_size={self.queue_size})")
        loop = asyncio.get_running_loop()
        req = _Request(text, k, mode, loop.create_future(), time.perf_counter())
        self._pending.append(req)
        self._wake.set()
        return await req.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            # Wait for company: until max_wait after the first query, or until a full batch is waiting.
            deadline = self._pending[0].arrived + self.max_wait
            while len(self._pending) < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
            taken = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            groups: dict[tuple[str, int], list[_Request]] = {}
            for r in taken:
                if not r.future.done():  # a caller that went away gets no model time
                    groups.setdefault((r.mode, r.k), []).append(r)
            for (mode, k), reqs in groups.items():
                await self._call(loop, reqs, k, mode)

    async def _call(self, loop, reqs: list[_Request], k: int, mode: str) -> None:
        t0 = time.perf_counter()
        self.stats.batch_sizes[len(reqs)] += 1
        try:
            res = await loop.run_in_executor(self.pool, self.search, [r.text for r in reqs], k, mode)
        except Exception as e:  # every caller of the group learns why (e.g. fuse weights not tuned at this k)
            for r in reqs:
                if not r.future.done():
                    r.future.set_exception(e)
            return
        for i, r in enumerate(reqs):
            if not r.future.done():
                row = SearchResult(*(getattr(res, f)[i] for f in SearchResult._fields[:4]), res.pairs_scored,
                                   res.timings)  # fmt: skip
                r.future.set_result(Answer(row, len(reqs), (t0 - r.arrived) * 1e3))


# ------------------------------------------------------------------------------------------------ the gallery


class Gallery:
    """The indexed items as the service shows them: ids, files, URLs under ``/items/``, captions.

    Args:
        manifest: the index manifest (``item_ids``, ``item_paths``).
        root: the gallery folder files are served from (the recipe's image or feature folder); None: no files.
        captions: item id -> its captions (shown for items that are not pictures, e.g. clip features).
    """

    def __init__(self, manifest: dict[str, Any], root: str | Path | None = None,
                 captions: dict[str, list[str]] | None = None) -> None:  # fmt: skip
        self.ids: list[str] = list(manifest["item_ids"])
        self.paths: list[str] = list(manifest.get("item_paths") or [])
        self.root = None if root is None else Path(root).resolve()
        self.captions = captions or {}
        # Only the indexed items are served, not whatever else the folder holds (annotations, other splits' files).
        self._served = {str(Path(p).resolve()) for p in self.paths} if self.root is not None else set()

    def resolve(self, rel: str) -> Path | None:
        """The file ``rel`` names inside the gallery folder, or None when it is not one: after resolving ``..``
        and symlinks the file must still lie inside the folder (an absolute ``rel`` is outside by construction) and
        be one of the indexed items."""
        if self.root is None or not rel or "\x00" in rel:
            return None
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or str(path) not in self._served or not path.is_file():
            return None
        return path

    def url(self, row: int) -> str | None:
        if self.root is None or row >= len(self.paths):
            return None
        path = Path(self.paths[row]).resolve()
        if not path.is_relative_to(self.root):
            return None
        return "/items/" + quote(path.relative_to(self.root).as_posix())

    def path(self, row: int) -> str | None:
        return self.paths[row] if row < len(self.paths) else None


# ------------------------------------------------------------------------------------------------ answers


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no NaN / -inf: "not scored" is null


def _ranks(scores: np.ndarray) -> list[int | None]:
    """1-based rank of each entry by score, descending (None where not scored)."""
    out: list[int | None] = [None] * len(scores)
    ok = np.flatnonzero(np.isfinite(scores))
    for r, i in enumerate(ok[np.argsort(-scores[ok], kind="stable")], 1):
        out[int(i)] = r
    return out


def answer_json(query: str, mode: str, k: int, k_used: int, ans: Answer, gallery: Gallery, *, n_tokens: int,
                max_tokens: int, total_ms: float) -> dict[str, Any]:  # fmt: skip
    """The JSON of one answered query (the shape `/search` returns; module docstring)."""
    ids, row = ans.row.ids.tolist(), ans.row
    student, teacher = row.student_scores.double().numpy(), row.teacher_scores.double().numpy()
    keep = [i for i, r in enumerate(ids) if r >= 0]  # -1: faiss's "no result"
    fast_rank, slow_rank = _ranks(student[keep]), _ranks(teacher[keep])
    results = []
    for pos, i in enumerate(keep):
        r = ids[i]
        results.append({
            "rank": pos + 1,
            "id": gallery.ids[r],
            "row": r,
            "path": gallery.path(r),
            "url": gallery.url(r),
            "score": _num(float(row.scores[i])),
            "student_score": _num(float(student[i])),
            "teacher_score": _num(float(teacher[i])),
            "fast_rank": fast_rank[pos],  # by the student's score among these results (None: not scored)
            "slow_rank": slow_rank[pos],  # by the teacher's
        })  # fmt: skip
    notes = []
    if k_used < k:
        notes.append(f"k={k} is larger than the gallery ({k_used} items): returning all {k_used}")
    truncated = n_tokens > max_tokens
    if truncated:
        notes.append(f"the query is {n_tokens} tokens (BOS and EOS included), longer than the limit of {max_tokens}: "
                     f"it was cut to its first words")  # fmt: skip
    t = row.timings
    return {
        "query": query,
        "mode": mode,
        "method": method_name(mode, k_used),
        "k": k,
        "k_used": k_used,
        "truncated": truncated,
        "query_tokens": n_tokens,
        "max_tokens": max_tokens,
        "notes": notes,
        "results": results,
        "batch_size": ans.batch_size,
        # encode / index / rerank are those of the model call this query shared with batch_size - 1 others.
        "timings_ms": {
            "queue": ans.queue_ms,
            "encode": t.get("encode", 0.0),
            "index": t.get("index", 0.0),
            "rerank": t.get("teacher", 0.0),
            "model": t.get("total", 0.0),
            "total": total_ms,
        },
    }


# ------------------------------------------------------------------------------------------------ the app


def create_app(
    retriever: Retriever,
    *,
    gallery_dir: str | Path | None = None,
    captions: dict[str, list[str]] | None = None,
    max_wait_ms: float = 5.0,
    max_batch: int = 64,
    queue_size: int = 256,
    max_k: int = 100,
    max_query_chars: int = 1000,
    default_k: int = 20,
) -> Any:
    """The FastAPI app serving ``retriever`` (module docstring); the keyword arguments are ``serve.*`` of a recipe.

    Args:
        retriever: the opened `Retriever` (its stamps already checked).
        gallery_dir: the folder gallery files are served from (``/items/``); None serves none.
        captions: item id -> captions, shown on the result page for items that are not pictures.
        max_wait_ms, max_batch, queue_size: the micro-batcher's (`MicroBatcher`).
        max_k: the largest k a request may ask for.
        max_query_chars: the longest query accepted (longer: 400; below it, a query over the tokenizer's limit is
            cut and said so).
        default_k: k when a request gives none.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    gallery = Gallery(retriever.manifest, gallery_dir, captions)
    stats = Stats()
    batcher = MicroBatcher(retriever.search, max_wait_ms=max_wait_ms, max_batch=max_batch, queue_size=queue_size,
                           stats=stats)  # fmt: skip
    # The event loop's own tokenizer, for checking and measuring queries: the worker thread's one keeps its
    # truncation length as state, so the two threads must not share it. Its limit is fixed above any accepted query
    # (a token covers at least one byte; 4 bytes per character at most), so it never cuts what it measures.
    tok, limit = copy.deepcopy(retriever.tokenizer), 4 * max_query_chars + 2

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="fastslow search", lifespan=lifespan)
    app.state.batcher, app.state.stats, app.state.gallery, app.state.retriever = batcher, stats, gallery, retriever

    def parse(q: str | None, k: str | None, mode: str | None) -> tuple[str, int, int, str, int]:
        """Check a request before it joins a batch (one bad query must not fail the others' model call)."""
        mode = DEFAULT_MODE if mode in (None, "") else mode
        retriever.check_mode(mode)
        try:
            k_int = default_k if k in (None, "") else int(k)
        except ValueError:
            raise QueryError(f"k={k!r} is not a whole number") from None
        k_int = check_k(k_int)
        if k_int > max_k:
            raise QueryError(f"k={k_int} is above this service's maximum of {max_k} (serve.max_k)")
        q = q or ""
        if len(q) > max_query_chars:
            raise QueryError(f"the query is {len(q)} characters, above this service's maximum of {max_query_chars} "
                             "(serve.max_query_chars)")  # fmt: skip
        check_queries([q], tok, limit)
        n_tokens = int(tok.encode([q], limit)[1].sum())
        return q, k_int, min(k_int, retriever.n_items), mode, n_tokens

    async def run_query(q, k, mode) -> dict[str, Any]:
        t0 = time.perf_counter()
        q, k, k_used, mode, n_tokens = parse(q, k, mode)
        ans = await batcher.submit(q, k_used, mode)
        ms = (time.perf_counter() - t0) * 1e3
        stats.answered(ms)
        return answer_json(q, mode, k, k_used, ans, gallery, n_tokens=n_tokens, max_tokens=retriever.max_length,
                           total_ms=ms)  # fmt: skip

    @app.exception_handler(UserError)
    async def _bad_request(request: Request, exc: UserError):
        stats.bad_requests += 1
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        return JSONResponse({"error": f"overloaded, retry in {RETRY_AFTER_S} s: {exc}"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip

    @app.get("/search")
    async def search(q: str | None = None, k: str | None = None, mode: str | None = None):
        return await run_query(q, k, mode)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "items": retriever.n_items, "split": retriever.manifest.get("split"),
                "modes": [m for m in MODES if m == "fast" or retriever.scorer is not None]}  # fmt: skip

    @app.get("/stats")
    async def get_stats():
        return {**stats.snapshot(), "queue": len(batcher._pending), "max_wait_ms": max_wait_ms,
                "max_batch": max_batch, "queue_size": queue_size}  # fmt: skip

    @app.get("/items/{rel:path}")
    async def item(rel: str):
        path = gallery.resolve(rel)
        if path is None:
            return JSONResponse({"error": f"{rel!r} is not a file of the gallery"}, status_code=404)
        return FileResponse(path)

    @app.get("/", response_class=HTMLResponse)
    async def page(q: str | None = None, k: str | None = None, mode: str | None = None):
        if not q:
            return HTMLResponse(render_page(None, q, k or str(default_k), mode or DEFAULT_MODE, gallery))
        try:
            body = await run_query(q, k, mode)
        except UserError as e:
            stats.bad_requests += 1
            return HTMLResponse(render_page(None, q, k, mode, gallery, error=str(e)), status_code=400)
        return HTMLResponse(render_page(body, q, k, mode, gallery))

    return app


def app_from_run(cfg: Any) -> Any:
    """The app over a recipe's run directory (`Retriever.from_run`): gallery files from the recipe's image folder,
    or, for clip features (no picture), each item's id and captions from the evaluated split. ``serve.*`` and
    ``combiner.k`` configure it. Shared by tools/serve.py and tools/screenshot.py."""
    from fastslow import stages
    from fastslow.config import to_kwargs

    retriever = Retriever.from_run(cfg)
    video = stages.modality(cfg) == "video"
    captions = None
    if video:
        split = stages.load_split(cfg, cfg.eval.split)
        captions = {}
        for text, item in zip(split.captions, split.text_to_visual):
            captions.setdefault(split.item_ids[item], []).append(text)
    return create_app(retriever, gallery_dir=cfg.data.feature_dir if video else cfg.data.image_dir,
                      captions=captions, default_k=cfg.combiner.k, **to_kwargs(cfg.serve))  # fmt: skip


# ------------------------------------------------------------------------------------------------ the page

_CSS = (
    "body{font-family:sans-serif;margin:16px;color:#222} form{margin-bottom:12px} input[name=q]{width:420px}"
    " .grid{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;width:136px;font-size:12px;text-align:center;"
    "border:1px solid #ddd;padding:4px;border-radius:4px} img{width:128px;height:128px;image-rendering:pixelated}"
    " .rank{font-weight:bold} .cap{text-align:left;font-size:11px;color:#555} .err{color:#b00} .meta{color:#555}"
)


def render_page(body: dict[str, Any] | None, q: str | None, k: str | None, mode: str | None, gallery: Gallery, *,
                error: str | None = None) -> str:  # fmt: skip
    """The result page: the query box with mode and k, then the results of ``body`` (`answer_json`) as thumbnails
    (pictures) or ids and captions (other items, e.g. clip features), each with its Fast rank and Slow rank."""
    esc = html.escape
    opts = "".join(
        f"<option value='{m}'{' selected' if m == (mode or DEFAULT_MODE) else ''}>{esc(label)}</option>"
        for m, label in (("fast", "fast (student)"), ("rerank", "fast+slow@k (rerank)"), ("fuse", "fuse@k"),
                         ("slow", "slow (teacher over all)"))
    )  # fmt: skip
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fastslow search</title>",
        f"<style>{_CSS}</style></head><body><h2>fastslow search</h2>",
        f"<form action='/' method='get'><input name='q' value='{esc(q or '')}' placeholder='a small red circle left "
        f"of a large blue square'> <select name='mode'>{opts}</select> k <input name='k' size='3' "
        f"value='{esc(k or '')}'> <button>search</button></form>",
    ]
    if error:
        parts.append(f"<p class='err'>{esc(error)}</p>")
    if body:
        t = body["timings_ms"]
        parts.append(
            f"<p class='meta'>{esc(body['method'])}: {len(body['results'])} results in {t['total']:.1f} ms (queue "
            f"{t['queue']:.1f}, encode {t['encode']:.1f}, index {t['index']:.1f}, rerank {t['rerank']:.1f}; batch of "
            f"{body['batch_size']})</p>"
        )
        parts += [f"<p class='meta'>{esc(n)}</p>" for n in body["notes"]]
        parts.append("<div class='grid'>")
        for r in body["results"]:
            fast = "-" if r["fast_rank"] is None else r["fast_rank"]
            slow = "-" if r["slow_rank"] is None else r["slow_rank"]
            if r["url"] and Path(r["url"]).suffix.lower() in IMAGE_SUFFIXES:
                visual = f"<img src='{esc(r['url'])}' alt='{esc(r['id'])}'>"
            else:  # feature-only items (clip features): their id and captions
                caps = "".join(f"<li>{esc(c)}</li>" for c in gallery.captions.get(r["id"], [])[:3])
                visual = f"<div class='cap'><b>{esc(r['id'])}</b><ul>{caps}</ul></div>"
            score = "-" if r["score"] is None else f"{r['score']:.3f}"
            parts.append(
                f"<figure>{visual}<figcaption><span class='rank'>#{r['rank']}</span> Fast {fast} · Slow {slow}<br>"
                f"{esc(r['id'])}<br>score {score}</figcaption></figure>"
            )
        parts.append("</div>")
        parts.append(f"<p class='meta'><a href='/search?{esc(urlencode({'q': q, 'k': k or '', 'mode': mode or ''}))}'>"
                     "JSON</a></p>")  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["Answer", "Gallery", "MicroBatcher", "Overloaded", "Stats", "answer_json", "app_from_run", "create_app",
           "method_name", "render_page"]  # fmt: skip
