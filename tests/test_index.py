"""Tests for fastslow.index: every index kind against brute-force numpy search, k handling, save/load with the
manifest checks, tiny galleries, hashes, and resumable gallery encoding."""

import hashlib
import json
import warnings

import faiss
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fastslow.errors import StaleArtefactError
from fastslow.index import (
    KINDS,
    build_index,
    dir_weights_hash,
    encode_gallery,
    file_hash,
    hash_ids,
    index_info,
    load_embeddings,
    load_index,
    save_embeddings,
    save_index,
    search,
)

DIM = 32
N = 3000
# Lower bounds on recall@10 against exact search, on clustered data (64 centres), N = 3000, E = 32, seed 0.
# Measured while writing these tests: ivf (nlist 76, nprobe 16) 0.93, ivfpq (PQ8x8, nprobe 16) 0.69, hnsw 1.00.
# Uniform random data has no cluster structure and is much harder for IVF (ivf 0.67, ivfpq 0.50 at N = 5000): real
# embeddings are clustered, so the clustered numbers are the meaningful ones.
RECALL_BOUNDS = {"ivf": 0.85, "ivfpq": 0.5, "hnsw": 0.95}
PARAMS = {"flat": {}, "ivf": {"nprobe": 16}, "ivfpq": {"nprobe": 16}, "hnsw": {}}


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = normalise(rng.standard_normal((64, DIM)))

    def sample(n):
        return normalise(centres[rng.integers(0, 64, n)] + 0.25 * rng.standard_normal((n, DIM)))

    gallery, queries = sample(N), sample(200)
    exact = queries @ gallery.T
    return gallery, queries, exact


@pytest.fixture(scope="module")
def indexes(data):
    return {kind: build_index(data[0], kind, **PARAMS[kind]) for kind in KINDS}


def recall_at(ids: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    truth = np.argsort(-exact, axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids[:, :k], truth)]))


def test_flat_equals_brute_force(data, indexes):
    _, queries, exact = data
    scores, ids = search(indexes["flat"], queries, 20)
    assert ids.dtype == np.int64 and scores.shape == ids.shape == (200, 20)
    assert np.array_equal(ids, np.argsort(-exact, axis=1)[:, :20])
    assert np.allclose(scores, np.take_along_axis(exact, ids, 1), atol=1e-5)
    # torch queries give the same answer as numpy ones
    assert np.array_equal(search(indexes["flat"], torch.from_numpy(queries), 20)[1], ids)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_recall(data, indexes, kind):
    _, queries, exact = data
    scores, ids = search(indexes[kind], queries, 10)
    recall = recall_at(ids, exact)
    print(f"{kind} {index_info(indexes[kind])}: recall@10 = {recall:.3f}")
    assert recall >= RECALL_BOUNDS[kind]
    valid = ids >= 0
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # descending
    if kind != "ivfpq":  # PQ scores are approximations of the inner product
        assert np.allclose(scores[valid], np.take_along_axis(exact, np.where(valid, ids, 0), 1)[valid], atol=1e-5)


def test_index_info_and_default_params(data, indexes):
    assert index_info(indexes["flat"]) == {"kind": "flat", "params": {}}
    ivf = index_info(indexes["ivf"])
    # default nlist = min(round(4 * sqrt(3000)) = 219, 3000 // 39 = 76)
    assert ivf == {"kind": "ivf", "params": {"nlist": 76, "nprobe": 16}}
    assert index_info(indexes["ivfpq"])["params"] == {"nlist": 76, "nprobe": 16, "pq_m": 8, "pq_bits": 8}
    assert index_info(indexes["hnsw"])["params"]["hnsw_m"] == 32
    assert index_info(build_index(data[0][:500], "ivf"))["params"] == {"nlist": 12, "nprobe": 1}


def test_use_gpu_auto_runs_on_this_machine(data):
    index = build_index(data[0][:100], "flat", use_gpu="auto")
    assert not (hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)) or faiss.get_num_gpus() > 0
    assert index.ntotal == 100
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="no GPU support"):
            build_index(data[0][:100], "flat", use_gpu=True)
    with pytest.raises(ValueError, match="use_gpu"):
        build_index(data[0][:100], "flat", use_gpu="yes")


def test_k_handling(data, indexes):
    gallery, queries, _ = data
    small = build_index(gallery[:50], "flat")
    with pytest.warns(UserWarning, match=r"k=80 is larger than the gallery \(50 items\)"):
        scores, ids = search(small, queries[:3], 80)
    assert ids.shape == (3, 50) and sorted(ids[0].tolist()) == list(range(50))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            search(small, queries[:3], bad)
    scores, ids = search(small, queries[:0], 5)
    assert scores.shape == ids.shape == (0, 5)
    with pytest.raises(ValueError, match="dim 16 but the index was built with dim 32"):
        search(small, queries[:3, :16], 5)


def test_build_rejects_bad_inputs(data):
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(data[0], "lsh")
    with pytest.raises(ValueError, match="empty gallery"):
        build_index(np.zeros((0, DIM), np.float32))
    with pytest.raises(ValueError, match="divisor"):
        build_index(data[0], "ivfpq", pq_m=5)
    bad = data[0][:100].copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(bad)


def test_training_size_clamps_warn(data):
    gallery = data[0][:1000]
    with pytest.warns(
        UserWarning, match="nlist=200 needs 7800 training points but the gallery has 1000: using nlist=25"
    ):
        index = build_index(gallery, "ivf", nlist=200)
    assert index_info(index)["params"]["nlist"] == 25
    with pytest.warns(UserWarning, match="pq_bits=8 needs at least 256 training points .* has 100: using pq_bits=6"):
        index = build_index(gallery[:100], "ivfpq")
    assert index_info(index)["params"]["pq_bits"] == 6


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_gallery(data, kind):
    gallery, queries, _ = data
    tiny = gallery[:10]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = build_index(tiny, kind)
    fell_back = [str(w.message) for w in caught if "building an exact 'flat' index instead" in str(w.message)]
    # ivf and ivfpq cannot train on 10 points: documented fallback to exact search; hnsw needs no training.
    assert len(fell_back) == (1 if kind in ("ivf", "ivfpq") else 0)
    assert index_info(index)["kind"] == ("flat" if kind in ("ivf", "ivfpq") else kind)
    scores, ids = search(index, queries[:5], 10)
    assert np.array_equal(ids, np.argsort(-(queries[:5] @ tiny.T), axis=1))


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, data, indexes, kind):
    gallery, queries, _ = data
    item_ids = [f"img_{i:05d}.jpg" for i in range(N)]
    manifest = {"item_ids": item_ids, "student_hash": "abc123", "split": "shapes/test"}
    path = save_index(tmp_path, indexes[kind], manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "manifest.json"]  # no temp files left
    on_disk = json.loads(path.read_text())
    assert on_disk["kind"] == kind and on_disk["dim"] == DIM and on_disk["n_items"] == N
    assert on_disk["gallery_hash"] == hash_ids(item_ids) and on_disk["split"] == "shapes/test"
    assert on_disk["params"] == index_info(indexes[kind])["params"]

    loaded, loaded_manifest = load_index(
        tmp_path, expect={"student_hash": "abc123", "gallery_hash": hash_ids(item_ids)}
    )
    assert loaded_manifest == on_disk
    before, after = search(indexes[kind], queries, 10), search(loaded, queries, 10)
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])


def test_load_refuses_a_stale_index(tmp_path, data):
    index = build_index(data[0][:100], "flat")
    ids = [str(i) for i in range(100)]
    save_index(tmp_path, index, {"item_ids": ids, "student_hash": "aaaa"})
    with pytest.raises(StaleArtefactError, match=r"student_hash: saved 'aaaa', now 'bbbb'\n.*tools/build_index.py"):
        load_index(tmp_path, expect={"student_hash": "bbbb"})
    other = hash_ids(list(reversed(ids)))  # same items, another order: a different gallery for faiss ids
    with pytest.raises(StaleArtefactError, match=rf"gallery_hash: saved '{hash_ids(ids)}', now '{other}'"):
        load_index(tmp_path, expect={"gallery_hash": other})
    # An index of an older fastslow has no data.image_size in its manifest: refused, named, not a crash.
    with pytest.raises(StaleArtefactError, match=r"data.image_size: saved \(not in the stamp\), now 32"):
        load_index(tmp_path, expect={"data.image_size": 32}, rebuild="python tools/build_index.py recipe=smoke")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_index(tmp_path)


def test_embeddings_of_another_student_are_refused(tmp_path, data):
    gallery = data[0][:20]
    ids = [str(i) for i in range(20)]
    stamp = {"student_hash": "student-a", "gallery_hash": hash_ids(ids), "data.image_size": 32}
    save_embeddings(tmp_path, gallery, stamp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.npy", "embeddings.stamp.json"]
    assert np.array_equal(load_embeddings(tmp_path, expect=stamp), gallery)
    rebuild = "python tools/build_index.py recipe=smoke"
    with pytest.raises(StaleArtefactError, match=r"student_hash: saved 'student-a', now 'student-b'") as err:
        load_embeddings(tmp_path, expect={**stamp, "student_hash": "student-b"}, rebuild=rebuild)
    assert list(err.value.differences) == ["student_hash"] and str(err.value).endswith(rebuild)
    np.save(tmp_path / "embeddings.npy", gallery[::-1])  # written by an older fastslow: np.save, no stamp update
    with pytest.raises(StaleArtefactError, match="not the file its stamp"):
        load_embeddings(tmp_path, expect=stamp)
    (tmp_path / "embeddings.stamp.json").unlink()
    with pytest.raises(StaleArtefactError, match="has no stamp"):
        load_embeddings(tmp_path, expect=stamp)


def test_save_checks_the_manifest(tmp_path, data):
    index = build_index(data[0][:100], "flat")
    with pytest.raises(ValueError, match="missing"):
        save_index(tmp_path, index, {"item_ids": list(range(100))})
    with pytest.raises(ValueError, match="99 item_ids but the index holds 100"):
        save_index(tmp_path, index, {"item_ids": list(range(99)), "student_hash": "x"})
    with pytest.warns(UserWarning, match="manifest\\['kind'\\]='ivf' replaced"):
        path = save_index(tmp_path, index, {"item_ids": list(range(100)), "student_hash": "x", "kind": "ivf"})
    assert json.loads(path.read_text())["kind"] == "flat"


def test_hashes(tmp_path):
    assert hash_ids(["a", "b"]) != hash_ids(["b", "a"])
    assert hash_ids(["a,b"]) != hash_ids(["a", "b"])
    assert hash_ids([1, 2]) == hash_ids(["1", "2"]) and len(hash_ids(["a"])) == 16
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 3_000_000)  # spans several read blocks
    assert file_hash(weights, length=64) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    h = dir_weights_hash(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.safetensors").write_bytes(b"resumable state")
    (tmp_path / "config.yaml").write_text("a: 1")
    assert dir_weights_hash(tmp_path) == h  # only top-level weights count
    weights.write_bytes(b"x" * 2_999_999 + b"y")
    assert dir_weights_hash(tmp_path) != h
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        dir_weights_hash(tmp_path / "checkpoints" / "missing")


# ---------------------------------------------------------------------------------------------- gallery encoding


class Gallery(Dataset):
    """Items stored in a shuffled order, so that loader order != item order."""

    def __init__(self, n=37, dim=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, dim, generator=g)
        self.order = torch.randperm(n, generator=g)

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        item = int(self.order[i])
        return {"x": self.features[item], "item_index": item}


class Encoder:
    """encode_fn input: a fixed projection; counts batches and can fail after a number of them."""

    def __init__(self, fail_after=None):
        self.weight = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        self.batches = 0
        self.fail_after = fail_after

    def __call__(self, batch):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.batches += 1
        return batch["x"] @ self.weight


def test_encode_gallery_orders_by_item_index():
    data = Gallery()
    out = encode_gallery(Encoder(), DataLoader(data, batch_size=5), progress=False)
    assert out.dtype == np.float32 and out.shape == (37, 4)
    assert np.allclose(out, (data.features @ Encoder().weight).numpy(), atol=1e-6)


def test_encode_gallery_resumes(tmp_path):
    data = Gallery()
    loader = DataLoader(data, batch_size=5)  # 8 batches
    stamp = {"student_hash": "s1"}
    crashing = Encoder(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        encode_gallery(crashing, loader, out_path=tmp_path, stamp=stamp, progress=False)
    assert len(list(tmp_path.glob("chunk_*.npz"))) == 3

    resumed = Encoder()
    out = encode_gallery(resumed, loader, out_path=tmp_path, stamp=stamp, progress=False)
    assert resumed.batches == 5  # only the 5 missing batches were encoded
    assert np.allclose(out, (data.features @ Encoder().weight).numpy(), atol=1e-6)

    again = Encoder()
    encode_gallery(again, loader, out_path=tmp_path, stamp=stamp, progress=False)
    assert again.batches == 0  # all chunks present
    fresh = Encoder()
    with pytest.warns(UserWarning, match="different run"):
        encode_gallery(fresh, loader, out_path=tmp_path, stamp={"student_hash": "s2"}, progress=False)
    assert fresh.batches == 8
    no_resume = Encoder()
    encode_gallery(no_resume, loader, out_path=tmp_path, stamp={"student_hash": "s2"}, resume=False, progress=False)
    assert no_resume.batches == 8


def test_encode_gallery_reports_missing_items():
    data = Gallery()
    loader = DataLoader(torch.utils.data.Subset(data, range(30)), batch_size=5)
    with pytest.raises(ValueError, match="7 of 37 gallery items got no embedding"):
        encode_gallery(Encoder(), loader, n_items=37, progress=False)
