"""Tests for fastslow.service: the HTTP API over the query-time world of tests/conftest.py, driven in process.

The answers equal `Retriever.search`'s; each bad request gets its status and message; gallery files never escape
the gallery folder; concurrent requests are merged into one model call (seen in /stats) and each caller gets its
own row; a full queue answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch
from conftest import MAX_LENGTH, N_ITEMS, captions, open_retriever

if os.environ.get("CI"):  # CI installs the serve extra (make test): a missing fastapi there is a failure, not a skip
    import fastapi  # noqa: F401
    import httpx
else:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from fastslow.service import create_app  # noqa: E402

ATOL = 1e-4  # batched vs alone: the same float32 operations over rows padded to another length


def make_app(world, **kw):
    return create_app(open_retriever(world, alpha=0.5), gallery_dir=world["images"], **kw)


@pytest.fixture(scope="module")
def client(world):
    with TestClient(make_app(world, max_wait_ms=1.0, max_k=30)) as c:
        yield c


def rows(body):
    return [r["row"] for r in body["results"]]


# --------------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize("mode", ["fast", "rerank", "fuse", "slow"])
def test_answers_equal_the_library_search(world, client, mode):
    r = open_retriever(world, alpha=0.5)
    q, k = world["queries"][0], 6
    resp = client.get("/search", params={"q": q, "k": k, "mode": mode})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    want = r.search([q], k, mode)
    assert rows(body) == want.ids[0].tolist()
    got = torch.tensor([x["score"] for x in body["results"]])
    assert torch.allclose(got, want.scores[0].double().float(), atol=ATOL)
    assert [x["id"] for x in body["results"]] == [world["ids"][i] for i in want.ids[0].tolist()]
    assert [x["path"] for x in body["results"]] == [world["paths"][i] for i in want.ids[0].tolist()]
    assert body["method"] == {"fast": "fast", "rerank": "fast+slow@6", "fuse": "fuse@6", "slow": "slow"}[mode]
    assert set(body["timings_ms"]) == {"queue", "encode", "index", "rerank", "model", "total"}
    if mode == "rerank":  # both ranks: the teacher's order is the answer, the student's is the candidates' order
        assert [x["slow_rank"] for x in body["results"]] == list(range(1, k + 1))
        fast = open_retriever(world).search([q], k, "fast").ids[0].tolist()
        assert [x["fast_rank"] for x in body["results"]] == [fast.index(i) + 1 for i in rows(body)]
        assert all(x["teacher_score"] is not None for x in body["results"])
    if mode == "fast":
        assert all(x["teacher_score"] is None and x["slow_rank"] is None for x in body["results"])


def test_result_page_shows_thumbnails_with_both_ranks(client, world):
    resp = client.get("/", params={"q": world["queries"][1], "k": 5, "mode": "rerank"})
    assert resp.status_code == 200
    page = resp.text
    assert page.count("<img src='/items/") == 5 and page.count("Fast ") >= 5 and page.count("Slow ") >= 5
    body = client.get("/search", params={"q": world["queries"][1], "k": 5}).json()
    url = body["results"][0]["url"]
    assert url in page
    img = client.get(url)  # the thumbnail is served by the app, from the gallery folder
    assert img.status_code == 200 and img.content == open(world["paths"][body["results"][0]["row"]], "rb").read()
    assert client.get("/").status_code == 200  # the empty page: a query box
    assert client.get("/healthz").json()["items"] == N_ITEMS


def test_feature_only_items_show_their_id_and_captions(world, tmp_path):
    """Clip features have no picture: the page shows each result's id and captions instead of a thumbnail."""
    r = open_retriever(world)
    r.manifest = {**r.manifest, "item_paths": [str(tmp_path / f"{i}.npy") for i in world["ids"]]}
    for p in r.manifest["item_paths"]:
        open(p, "wb").close()
    caps = {i: [f"caption one of {i}", f"caption two of {i}"] for i in world["ids"]}
    with TestClient(create_app(r, gallery_dir=tmp_path, captions=caps)) as c:
        page = c.get("/", params={"q": "a red circle", "k": 3, "mode": "rerank"}).text
        body = c.get("/search", params={"q": "a red circle", "k": 3, "mode": "rerank"}).json()
    assert "<img" not in page
    for hit in body["results"]:
        assert f"<b>{hit['id']}</b>" in page and f"caption two of {hit['id']}" in page
        assert hit["url"] == f"/items/{hit['id']}.npy"


# ----------------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "params, status, message",
    [
        ({"q": ""}, 400, "empty"),
        ({"q": "   "}, 400, "empty"),
        ({"q": "\u200b\u200b"}, 400, "no words the tokenizer knows"),
        ({"q": "a red circle", "k": 0}, 400, "k must be a positive integer"),
        ({"q": "a red circle", "k": -3}, 400, "k must be a positive integer"),
        ({"q": "a red circle", "k": "ten"}, 400, "k='ten' is not a whole number"),
        ({"q": "a red circle", "k": 31}, 400, "k=31 is above this service's maximum of 30"),
        ({"q": "a red circle", "mode": "bogus"}, 400, "mode='bogus' is not one of fast, slow, rerank, fuse"),
        ({"q": "a " * 600}, 400, "above this service's maximum of 1000"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(client, params, status, message):
    resp = client.get("/search", params=params)
    assert resp.status_code == status and message in resp.json()["error"], resp.text
    page = client.get("/", params=params)  # the page says it too
    if params.get("q", "").strip() or "\u200b" in params.get("q", ""):
        assert page.status_code == status and message.split("'")[0] in page.text


def test_a_long_query_is_cut_and_the_answer_says_so(client, world):
    long = " ".join(captions(6, 3))  # ~30 words, over the 16-token limit
    body = client.get("/search", params={"q": long, "k": 4, "mode": "fast"}).json()
    assert body["truncated"] is True and body["query_tokens"] > MAX_LENGTH == body["max_tokens"]
    assert any("longer than the limit of 16" in n for n in body["notes"])
    want = open_retriever(world).search([long], 4, "fast")  # the library cuts it the same way
    assert rows(body) == want.ids[0].tolist()
    short = client.get("/search", params={"q": "a red circle", "k": 4, "mode": "fast"}).json()
    assert short["truncated"] is False and short["notes"] == []


def test_k_above_the_gallery_is_clamped_and_said(world):
    with TestClient(make_app(world, max_k=100)) as c:
        body = c.get("/search", params={"q": "a red circle", "k": 50, "mode": "fast"}).json()
    assert body["k_used"] == N_ITEMS and len(body["results"]) == N_ITEMS
    assert "larger than the gallery" in body["notes"][0]


# ------------------------------------------------------------------------------------- gallery files


def test_gallery_files_never_escape_the_gallery_folder(client, world, tmp_path_factory):
    outside = tmp_path_factory.mktemp("secret") / "secret.txt"
    outside.write_text("do not serve")
    (world["images"] / "link.png").symlink_to(outside)  # a symlink inside the folder pointing out of it
    (world["images"] / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    rel = os.path.relpath(outside, world["images"])
    (world["images"] / "notes.txt").write_text("do not serve")  # inside the folder, but not an indexed item
    assert client.get("/items/item_000.png").status_code == 200
    for path in [
        f"/items/{rel}",  # ../ (the client normalises a literal ../; the encoded forms reach the app)
        "/items/" + rel.replace("/", "%2F"),
        "/items/" + rel.replace(".", "%2e").replace("/", "%2f"),
        "/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        f"/items/{outside}",  # an absolute path
        "/items/%2F" + str(outside).lstrip("/").replace("/", "%2F"),
        "/items//etc/passwd",
        "/items/link.png",
        "/items/linkdir/secret.txt",
        "/items/",
        "/items/nope.png",
        "/items/notes.txt",
    ]:
        resp = client.get(path)
        assert resp.status_code == 404 and b"do not serve" not in resp.content, path


# ----------------------------------------------------------------------------------------- batching


async def _concurrent(app, params_list, before=None):
    """Send the requests at once to the app (in process, one event loop), its lifespan running."""
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        if before:
            before(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            resps = await asyncio.gather(*(c.get("/search", params=p) for p in params_list))
            stats = (await c.get("/stats")).json()
    return resps, stats


def test_concurrent_requests_are_merged_and_each_gets_its_own_answer(world):
    app = make_app(world, max_wait_ms=200.0, max_batch=64)
    texts = captions(8, 7)
    resps, stats = asyncio.run(_concurrent(app, [{"q": t, "k": 5, "mode": "rerank"} for t in texts]))
    assert all(r.status_code == 200 for r in resps)
    sizes = {int(n): c for n, c in stats["batch_sizes"].items()}
    assert max(sizes) > 1 and sum(n * c for n, c in sizes.items()) == 8 == stats["queries_served"]
    assert stats["latency_ms_p50"] is not None and stats["latency_ms_p95"] >= stats["latency_ms_p50"]
    r = open_retriever(world)
    for t, resp in zip(texts, resps):  # each caller its own row, equal to searching its query alone
        body = resp.json()
        alone = r.search([t], 5, "rerank")
        assert body["query"] == t and rows(body) == alone.ids[0].tolist()
        got = torch.tensor([x["score"] for x in body["results"]])
        assert torch.allclose(got, alone.scores[0], atol=ATOL)
    assert max(resp.json()["batch_size"] for resp in resps) > 1


def test_different_modes_and_ks_are_separate_model_calls(world):
    app = make_app(world, max_wait_ms=500.0)  # the three arrive within it even on a loaded machine
    params = [{"q": "a red circle", "k": 3, "mode": "fast"}, {"q": "a blue square", "k": 3, "mode": "fast"},
              {"q": "a red circle", "k": 4, "mode": "rerank"}]  # fmt: skip
    resps, stats = asyncio.run(_concurrent(app, params))
    assert [len(r.json()["results"]) for r in resps] == [3, 3, 4]
    assert [r.json()["batch_size"] for r in resps] == [2, 2, 1]
    assert stats["batch_sizes"] == {"1": 1, "2": 1}


def test_a_full_queue_answers_503_with_retry_after(world):
    """The worker thread is held busy (a job of the test's own on the batcher's one thread), so queries pile up: the
    first is taken into a batch, queue_size more wait, the rest are refused; once the thread is free all waiting
    ones are answered."""
    release = threading.Event()

    def hold(app):
        app.state.batcher.pool.submit(release.wait)
        threading.Timer(2.0, release.set).start()  # free the thread after the burst has arrived

    app = make_app(world, max_wait_ms=0.0, max_batch=1, queue_size=2)
    resps, stats = asyncio.run(_concurrent(app, [{"q": t, "k": 3, "mode": "fast"} for t in captions(8, 9)], hold))
    codes = [r.status_code for r in resps]
    served = codes.count(200)  # queue_size waiting, and one more if the batcher took the first before the burst ended
    assert served in (2, 3) and codes.count(503) == 8 - served, codes
    refused = [r for r in resps if r.status_code == 503]
    assert all(r.headers["Retry-After"] == "1" and "serve.queue_size=2" in r.json()["error"] for r in refused)
    assert stats["rejected_503"] == 8 - served and stats["queries_served"] == served
