"""Faiss index over the student's gallery embeddings: build, search, save/load with a manifest, encode the gallery.

Embeddings are L2-normalised, so every index uses the inner product (= cosine similarity) metric. Four kinds:

- ``flat``: exact search (``"Flat"``), the reference every other kind is measured against.
- ``ivf``: inverted lists over k-means cells (``"IVF{nlist},Flat"``); probes ``nprobe`` cells per query.
- ``ivfpq``: the same cells with product-quantised codes (``"IVF{nlist},PQ{m}x{bits}"``); for 10^7-10^8 items.
- ``hnsw``: a graph index (``"HNSW{m},Flat"``); no training, good recall at small ``ef_search``.

Training-size rule. Faiss's k-means wants at least 39 training points per centroid (``MIN_POINTS_PER_CENTROID``)
and refuses fewer points than centroids. For the IVF cells ``build_index`` clamps ``nlist`` to ``N // 39`` (with a
``warnings.warn`` naming the requested and used values when the caller's value is reduced) and builds an exact
``flat`` index instead of ``ivf``/``ivfpq`` when the gallery cannot fill even one cell (``N < 39``, a warning says
so). The PQ codebooks (2**bits centroids per sub-quantizer) are only held to faiss's hard limit ``N >= 2**bits``
(``bits`` is clamped to ``floor(log2(N))`` with a warning): on clustered 32-d data with N = 2,000 (7.8 points per
centroid at 8 bits) 8-bit codes still gave recall@10 0.71 against 0.53 for 5-bit codes that obey the 39 rule, so
faiss's "please provide at least 9984 training points" message is silenced for the codebooks.
``index_info`` reports what was built.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from fastslow.artefacts import (
    atomic_path,
    atomic_write,
    atomic_write_json,
    check_fields,
    check_stamp,
    file_hash,
    read_json,
)
from fastslow.errors import MissingFileError, StaleArtefactError

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
# Faiss prints a warning below this many training points per k-means centroid (Clustering.cpp); we stay above it.
MIN_POINTS_PER_CENTROID = 39
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
BUILD_INDEX = "tools/build_index.py"  # what rebuilds an index, its embeddings and its token store
# Manifest keys that save_index computes from the index and the item ids itself.
_DERIVED_KEYS = ("kind", "params", "dim", "n_items", "gallery_hash", "index_type", "faiss_version", "created")
_REQUIRED_KEYS = ("item_ids", "student_hash")


# ----------------------------------------------------------------------------------------------------------- hashes


def hash_ids(ids: Iterable[Any], length: int = 16) -> str:
    """Short sha256 of an ordered list of item ids (the gallery's identity: same ids in the same order).

    Args:
        ids: item ids; each is converted with ``str`` (so ``[1, 2]`` and ``["1", "2"]`` hash alike).
        length: number of hex characters kept.

    Returns:
        Hex digest prefix. JSON encoding makes it unambiguous (ids may contain any character).
    """
    payload = json.dumps([str(i) for i in ids], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:length]


def dir_weights_hash(path: str | os.PathLike, length: int = 16) -> str:
    """Hash of a checkpoint's weights: the file itself, or every top-level ``*.safetensors`` file of a directory.

    Only the top level counts: ``checkpoints/step_*`` (resumable training state) below it is not the model that
    encoded the gallery. File names are part of the hash so that renaming a shard changes it.

    Raises:
        FileNotFoundError: the path does not exist or a directory holds no ``*.safetensors`` file.
    """
    path = Path(path)
    if path.is_file():
        return file_hash(path, length)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights at {path}: cannot stamp the index with a student hash")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{file_hash(f, 64)}\n".encode())
    return digest.hexdigest()[:length]


# ------------------------------------------------------------------------------------------------------------ build


def _as_float32(x: Any, name: str) -> np.ndarray:
    """Torch or numpy [N, E] -> C-contiguous float32 numpy (what faiss's Python wrappers require)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {tuple(x.shape)}")
    return x


def _default_pq_m(dim: int) -> int:
    """Largest number of sub-quantizers dividing ``dim`` with >= 4 dims each, capped at 64 bytes per code."""
    cap = max(1, min(dim // 4, 64))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def _gpu_available() -> bool:
    # faiss-cpu still defines get_num_gpus (returns 0) and some gpu helpers, but not StandardGpuResources.
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES: dict[int, Any] = {}  # one StandardGpuResources per device, kept alive as long as the process


def _to_gpu(index: faiss.Index, kind: str, use_gpu: bool | str) -> faiss.Index:
    """Move ``index`` to this process's GPU when asked and possible; HNSW has no faiss GPU implementation."""
    if use_gpu not in (True, False, "auto"):
        raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
    if use_gpu is False or (use_gpu == "auto" and not _gpu_available()):
        return index
    if not _gpu_available():
        raise RuntimeError("use_gpu=True but faiss has no GPU support here (faiss-cpu or no visible GPU)")
    if kind == "hnsw":
        if use_gpu is True:
            warnings.warn("faiss has no GPU HNSW: the hnsw index stays on the CPU", stacklevel=3)
        return index
    # Under accelerate every process owns one GPU; torch knows which one.
    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[device], device, index)


def _is_on_gpu(index: faiss.Index) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def set_search_params(index: faiss.Index, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set query-time parameters in place (IVF ``nprobe``, HNSW ``efSearch``); a parameter the index lacks is ignored.

    Args:
        index: CPU or GPU faiss index.
        nprobe: cells probed per query (IVF kinds); clamped to ``nlist``. Higher = better recall, slower.
        ef_search: size of the HNSW search beam. Higher = better recall, slower.
    """
    if nprobe is not None:
        ivf = _ivf_or_none(index)
        if ivf is not None:
            nprobe = int(min(max(1, nprobe), ivf.nlist))
            if _is_on_gpu(index):
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
            else:
                ivf.nprobe = nprobe
    if ef_search is not None and isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = int(max(1, ef_search))


def _ivf_or_none(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):  # faiss raises when the index has no IVF part
        return None


def build_index(
    embeddings: np.ndarray | torch.Tensor,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_m: int | None = None,
    pq_bits: int = 8,
    hnsw_m: int = 32,
    ef_search: int = 128,
    ef_construction: int = 200,
    use_gpu: bool | str = "auto",
    seed: int = 0,
) -> faiss.Index:
    """Build and fill an inner-product faiss index over the gallery.

    Args:
        embeddings: [N, E] float (torch or numpy), L2-normalised rows; row i is item i (faiss id i).
        kind: one of ``flat | ivf | ivfpq | hnsw`` (see the module docstring).
        nlist: IVF cells; default ``min(round(4 * sqrt(N)), N // 39)``; any value is clamped to ``N // 39``.
        nprobe: cells probed per query; default ``max(1, nlist // 8)``.
        pq_m: PQ sub-quantizers, must divide E; default the largest divisor of E with >= 4 dims each (<= 64).
        pq_bits: bits per PQ sub-code (8 = one byte); clamped to ``floor(log2(N))``.
        hnsw_m: HNSW graph degree.
        ef_search: HNSW search beam (faiss searches with ``max(ef_search, k)``).
        ef_construction: HNSW construction beam (faiss's default 40 gives a visibly worse graph).
        use_gpu: ``"auto"`` moves the index to this process's GPU when faiss has GPU support and sees a GPU;
            ``True`` requires it; ``False`` never. HNSW always stays on the CPU.
        seed: k-means seed (IVF centroids, PQ codebooks), for reproducible indexes.

    Returns:
        A trained index holding the N rows with ids 0..N-1. ``index_info(index)`` gives the kind and parameters
        actually used (after clamping or the fallback to ``flat``).

    Raises:
        ValueError: unknown kind, empty gallery, ``pq_m`` not dividing E, or non-finite embeddings.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    x = _as_float32(embeddings, "embeddings")
    n, dim = x.shape
    if n == 0:
        raise ValueError("cannot build an index over an empty gallery (0 embeddings)")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf: check the student's gallery encoding")

    pq_m_used, bits = None, None
    if kind in ("ivf", "ivfpq"):
        max_nlist = n // MIN_POINTS_PER_CENTROID
        if kind == "ivfpq":
            pq_m_used = _default_pq_m(dim) if pq_m is None else int(pq_m)
            if pq_m_used < 1 or dim % pq_m_used:
                raise ValueError(f"pq_m={pq_m} must be a positive divisor of the embedding dim {dim}")
            # Each sub-quantizer is a k-means with 2**bits centroids over the N residuals: faiss needs N >= 2**bits.
            max_bits = int(math.floor(math.log2(n)))
            bits = min(int(pq_bits), max_bits)
            if bits < pq_bits and max_nlist >= 1:
                warnings.warn(
                    f"ivfpq: pq_bits={pq_bits} needs at least {2**pq_bits} training points but the gallery has {n}: "
                    f"using pq_bits={bits}",
                    stacklevel=2,
                )
        if max_nlist < 1:
            warnings.warn(
                f"{kind}: a gallery of {n} items is too small to train (needs >= {MIN_POINTS_PER_CENTROID} points per "
                f"k-means centroid): building an exact 'flat' index instead",
                stacklevel=2,
            )
            kind = "flat"
        else:
            wanted = round(4 * math.sqrt(n)) if nlist is None else int(nlist)
            if nlist is not None and wanted > max_nlist:
                warnings.warn(
                    f"{kind}: nlist={nlist} needs {MIN_POINTS_PER_CENTROID * wanted} training points but the gallery "
                    f"has {n}: using nlist={max_nlist}",
                    stacklevel=2,
                )
            nlist = max(1, min(wanted, max_nlist))

    # "np": no polysemous training (a code reordering for Hamming filtering we do not use; it made training 10x slower).
    factory = {
        "flat": "Flat",
        "ivf": f"IVF{nlist},Flat",
        "ivfpq": f"IVF{nlist},PQ{pq_m_used}x{bits}np",
        "hnsw": f"HNSW{hnsw_m},Flat",
    }[kind]
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _ivf_or_none(index)
    if ivf is not None:
        ivf.cp.seed = seed
        if kind == "ivfpq":
            index.pq.cp.seed = seed
            index.pq.cp.min_points_per_centroid = 1  # only silences faiss's warning; see the module docstring
    if kind == "hnsw":
        index.hnsw.efConstruction = int(ef_construction)

    index = _to_gpu(index, kind, use_gpu)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    set_search_params(index, nprobe=max(1, nlist // 8) if nprobe is None and nlist else nprobe, ef_search=ef_search)
    return index


def index_info(index: faiss.Index) -> dict[str, Any]:
    """Kind and parameters of a built index, read from the index itself (what the manifest records).

    Returns:
        ``{"kind": str, "params": dict}`` with ``nlist``/``nprobe`` (IVF), ``pq_m``/``pq_bits`` (ivfpq),
        ``hnsw_m``/``ef_search``/``ef_construction`` (hnsw).
    """
    cpu = to_cpu(index)
    ivf = _ivf_or_none(cpu)
    if isinstance(cpu, faiss.IndexIVFPQ):
        params = {"nlist": ivf.nlist, "nprobe": ivf.nprobe, "pq_m": cpu.pq.M, "pq_bits": cpu.pq.nbits}
        return {"kind": "ivfpq", "params": params}
    if isinstance(cpu, faiss.IndexIVFFlat):
        return {"kind": "ivf", "params": {"nlist": ivf.nlist, "nprobe": ivf.nprobe}}
    if isinstance(cpu, faiss.IndexHNSW):
        # hnsw.nb_neighbors(1) is 2*M at level 0 and M above; faiss stores M only through the level sizes.
        params = {
            "hnsw_m": cpu.hnsw.nb_neighbors(1),
            "ef_search": cpu.hnsw.efSearch,
            "ef_construction": cpu.hnsw.efConstruction,
        }
        return {"kind": "hnsw", "params": params}
    if isinstance(cpu, faiss.IndexFlat):
        return {"kind": "flat", "params": {}}
    return {"kind": type(cpu).__name__, "params": {}}


# ----------------------------------------------------------------------------------------------------------- search


def search(index: faiss.Index, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search.

    Args:
        index: a filled faiss index (CPU or GPU; faiss GPU search supports k <= 2048).
        queries: [Q, E] float (torch or numpy), L2-normalised; Q may be 0.
        k: results per query; k > N is clamped to N with a warning.

    Returns:
        scores: [Q, min(k, N)] float32, descending per row.
        ids: [Q, min(k, N)] int64 item indices. Approximate kinds can return fewer than k hits for a query
            (e.g. its probed IVF cells hold fewer items); faiss fills the rest with id -1 and score -3.4e38.

    Raises:
        ValueError: k <= 0, an empty index, or a query dim different from the index dim.
    """
    if isinstance(k, bool) or int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer (number of results per query), got {k!r}")
    if index.ntotal == 0:
        raise ValueError("the index is empty: nothing to search")
    q = _as_float32(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dim {q.shape[1]} but the index was built with dim {index.d}")
    k = int(k)
    if k > index.ntotal:
        warnings.warn(
            f"k={k} is larger than the gallery ({index.ntotal} items): returning k={index.ntotal}", stacklevel=2
        )
        k = int(index.ntotal)
    if q.shape[0] == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    scores, ids = index.search(q, k)
    return scores, ids.astype(np.int64, copy=False)


# -------------------------------------------------------------------------------------------------------- save/load


def to_cpu(index: faiss.Index) -> faiss.Index:
    """The index itself on the CPU, or a CPU copy of a GPU one (what is serialized and saved)."""
    # index_gpu_to_cpu also unwraps the replicas/shards made by the multi-GPU cloners.
    if _gpu_available() and hasattr(faiss, "index_gpu_to_cpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


def save_index(out_dir: str | os.PathLike, index: faiss.Index, manifest: dict[str, Any]) -> Path:
    """Write ``out_dir/index.faiss`` and ``out_dir/manifest.json``, atomically.

    The manifest stamps the index with what it depends on, so that ``load_index`` can refuse a stale one.

    Args:
        out_dir: directory (created if needed).
        index: the filled index; a GPU index is converted to CPU for writing.
        manifest: must hold ``item_ids`` (list, one id per indexed row, in faiss-id order) and ``student_hash``
            (e.g. ``dir_weights_hash(student_dir)``); any other JSON-serialisable keys are kept. Computed here:
            ``kind``, ``params`` (``index_info``), ``dim``, ``n_items``, ``gallery_hash`` (``hash_ids(item_ids)``),
            ``index_type``, ``faiss_version``, ``created`` (UTC, ISO 8601); a given value for one of these that
            differs is replaced with a warning.

    Returns:
        The manifest path.

    Raises:
        ValueError: a required key is missing or ``item_ids`` does not have one entry per indexed row.
    """
    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"manifest is missing {missing}: save_index needs the item ids and the student hash")
    item_ids = [str(i) for i in manifest["item_ids"]]
    if len(item_ids) != index.ntotal:
        raise ValueError(f"manifest has {len(item_ids)} item_ids but the index holds {index.ntotal} vectors")
    cpu = to_cpu(index)
    info = index_info(cpu)
    derived = {
        "kind": info["kind"],
        "params": info["params"],
        "dim": int(cpu.d),
        "n_items": int(cpu.ntotal),
        "gallery_hash": hash_ids(item_ids),
        "index_type": type(cpu).__name__,
        "faiss_version": faiss.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key in _DERIVED_KEYS:
        if key in manifest and key != "created" and manifest[key] != derived[key]:
            warnings.warn(
                f"manifest[{key!r}]={manifest[key]!r} replaced by the value read from the index: {derived[key]!r}",
                stacklevel=2,
            )
    full = {**manifest, **derived, "item_ids": item_ids}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path, manifest_path = out / INDEX_FILE, out / MANIFEST_FILE
    # Both go through temporary siblings (fsync + os.replace, fastslow.artefacts). The manifest is the commit marker:
    # once the new index is written, remove the old manifest before swapping the index in, so a crash between the
    # two renames leaves "no manifest" (load refuses) rather than a new index under an old manifest.
    with atomic_path(index_path) as tmp_index:
        faiss.write_index(cpu, str(tmp_index))
        manifest_path.unlink(missing_ok=True)
    atomic_write_json(manifest_path, full, indent=1, ensure_ascii=False)
    return manifest_path


def load_index(
    out_dir: str | os.PathLike,
    *,
    expect: dict[str, Any] | None = None,
    use_gpu: bool | str = "auto",
    rebuild: str = BUILD_INDEX,
) -> tuple[faiss.Index, dict[str, Any]]:
    """Read an index written by ``save_index`` and check that it still matches the current student and gallery.

    Args:
        out_dir: directory holding ``index.faiss`` and ``manifest.json``.
        expect: manifest values the caller requires, e.g.
            ``{"student_hash": dir_weights_hash(student_dir), "gallery_hash": hash_ids(split.item_ids)}``.
        use_gpu: as in ``build_index``.
        rebuild: the command that rebuilds the index, named in every error (e.g. with the recipe and output_dir).

    Returns:
        ``(index, manifest)``; search parameters (nprobe, ef_search) are those saved.

    Raises:
        MissingFileError: a file is missing (e.g. an interrupted save); a FileNotFoundError.
        StaleArtefactError: manifest values differ from ``expect`` (each one listed, saved vs now), a file cannot be
            read (truncated, damaged), or the manifest and the index disagree.
    """
    out = Path(out_dir)
    index_path, manifest_path = out / INDEX_FILE, out / MANIFEST_FILE
    for path in (manifest_path, index_path):
        if not path.is_file():
            raise MissingFileError(f"no {path.name} in {out}: build the index with {rebuild}")
    manifest = read_json(manifest_path, rebuild)
    if not isinstance(manifest, dict):
        raise StaleArtefactError(f"{manifest_path} is not an index manifest: rebuild with {rebuild}", path=out)
    # The manifest is the index's stamp: written last, after the index file (save_index).
    check_fields(manifest, expect or {}, path=out, rebuild=rebuild)

    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:  # faiss reports a short or foreign file as a C++ assertion
        raise StaleArtefactError(
            f"{index_path} cannot be read by faiss ({index_path.stat().st_size} bytes: truncated or damaged; "
            f"{_last_line(e)}): rebuild with {rebuild}",
            path=index_path,
            rebuild=rebuild,
        ) from e
    if index.ntotal != manifest.get("n_items") or index.d != manifest.get("dim"):
        raise StaleArtefactError(
            f"index at {out} holds {index.ntotal} vectors of dim {index.d} but its manifest says "
            f"{manifest.get('n_items')} of dim {manifest.get('dim')}: rebuild with {rebuild}",
            path=out,
            rebuild=rebuild,
        )
    if hash_ids(manifest.get("item_ids", [])) != manifest.get("gallery_hash"):
        raise StaleArtefactError(
            f"manifest at {manifest_path} is inconsistent (item_ids do not match gallery_hash): rebuild with {rebuild}",
            path=out,
            rebuild=rebuild,
        )
    return _to_gpu(index, manifest.get("kind", ""), use_gpu), manifest


def save_embeddings(out_dir: str | os.PathLike, embeddings: np.ndarray, stamp: dict[str, Any]) -> Path:
    """Write the exact gallery embeddings ``out_dir/embeddings.npy`` atomically, stamped (``embeddings.stamp.json``).

    Args:
        out_dir: the index directory.
        embeddings: [N, E] float, row i for gallery item i.
        stamp: what they were built from, e.g. ``{"student_hash": ..., "gallery_hash": ..., "data.image_size": 32}``.

    Returns:
        The file's path.
    """
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    # A file object, so numpy does not append ".npy" to the temporary name.
    return atomic_write(Path(out_dir) / EMBEDDINGS_FILE, lambda f: np.save(f, emb), stamp=stamp)


def load_embeddings(out_dir: str | os.PathLike, *, expect: dict[str, Any], rebuild: str = BUILD_INDEX) -> np.ndarray:
    """Read ``out_dir/embeddings.npy`` after checking its stamp against ``expect`` (see ``save_embeddings``).

    Raises:
        FileNotFoundError: no embeddings file.
        StaleArtefactError: no stamp (an older index directory), or a field differs (another student or gallery).
    """
    path = Path(out_dir) / EMBEDDINGS_FILE
    check_stamp(path, expect, rebuild)
    return np.load(path, allow_pickle=False)


def _last_line(err: BaseException) -> str:
    """faiss's C++ messages run over several lines of source locations; the last line is the one that says why."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# --------------------------------------------------------------------------------------------------- gallery encoding


def _chunk_path(out: Path, step: int) -> Path:
    return out / f"chunk_{step:07d}.npz"


def _save_chunk(path: Path, item_index: np.ndarray, embeddings: np.ndarray) -> None:
    # A file object, so numpy does not append ".npz" to the temporary name.
    atomic_write(path, lambda f: np.savez(f, item_index=item_index, embeddings=embeddings))


def encode_gallery(
    encode_fn: Callable[[dict[str, Any]], torch.Tensor],
    loader: Iterable[dict[str, Any]],
    *,
    accelerator: Any = None,
    out_path: str | os.PathLike | None = None,
    resume: bool = True,
    n_items: int | None = None,
    stamp: dict[str, Any] | None = None,
    progress: bool = True,
    left_out: list[int] | None = None,
) -> np.ndarray:
    """Encode every gallery item with the student, optionally sharded across processes and resumable.

    Args:
        encode_fn: ``batch -> [b, E]`` embeddings (called under ``torch.no_grad``).
        loader: a deterministic (unshuffled) DataLoader whose batches carry ``item_index`` ([b] long). With an
            ``accelerator`` pass the loader returned by ``accelerator.prepare``: each process then encodes its
            share of the batches, and the per-step outputs are gathered with ``gather_for_metrics`` (which drops
            the samples duplicated to even out the last batch).
        accelerator: an ``accelerate.Accelerator`` or None (single process).
        out_path: directory for resumable chunks; ``chunk_XXXXXXX.npz`` per loader step (``item_index`` [b] int64,
            ``embeddings`` [b, E] float32, written by the main process, temp + rename) and ``meta.json``.
            Use a directory specific to the student that encodes (e.g. under ``${output_dir}/index/``). With several
            nodes it must be on a filesystem every process sees: each one reads the chunks back at the end.
        resume: reuse chunks written by an earlier run with the same ``stamp`` and number of steps; the finished
            prefix of steps is skipped without loading its data. False (or a different stamp) starts afresh.
        n_items: gallery size; default ``len(loader.dataset)`` when available, else ``max(item_index) + 1``.
        stamp: JSON-serialisable identity of the run (e.g. student hash, gallery hash) checked on resume.
        progress: show a progress bar on the main process.
        left_out: None (the default): every item must get an embedding. A list: the loader runs under
            ``data.on_error=skip``, so its batches may hold fewer items than asked, or none (``batch["empty"]``,
            not passed to ``encode_fn``); the items that got no embedding are appended to the list (every
            process gets the same list) and their rows are NaN, for the caller to leave out of the index.

    Returns:
        [n_items, E] float32 embeddings, row i for item i, on every process.

    Raises:
        ValueError: a batch has no ``item_index``, or some item in 0..n_items-1 got no embedding while
            ``left_out`` is None (e.g. it failed to load under ``on_error=skip``).
    """
    from tqdm.auto import tqdm

    is_main = accelerator is None or accelerator.is_main_process
    n_steps = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    out = Path(out_path) if out_path is not None else None
    # The chunk of step i holds different items when the number of steps or of processes changes: part of the key.
    meta = {
        "stamp": stamp,
        "n_steps": n_steps,
        "num_processes": 1 if accelerator is None else accelerator.num_processes,
    }

    done = 0  # leading steps whose chunks are on disk and can be skipped
    if out is not None:
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            meta_path = out / "meta.json"
            old_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
            if resume and old_meta == meta:
                while _chunk_path(out, done).is_file():
                    done += 1
            else:
                if old_meta is not None and resume:
                    warnings.warn(f"gallery chunks in {out} were written by a different run: re-encoding", stacklevel=2)
                for stale in [*out.glob("chunk_*.npz"), *out.glob(".chunk_*.tmp")]:  # .tmp: a killed writer's
                    stale.unlink()
                atomic_write_json(meta_path, meta)
        if accelerator is not None:
            from accelerate.utils import broadcast_object_list

            done = broadcast_object_list([done])[0]  # every rank must skip the same number of steps
    steps = loader
    if done:
        if accelerator is not None:
            steps = accelerator.skip_first_batches(loader, done)
        else:
            from accelerate.data_loader import skip_first_batches

            steps = skip_first_batches(loader, done)

    in_memory: list[tuple[np.ndarray, np.ndarray]] = []
    bar = tqdm(total=n_steps, initial=done, desc="encode gallery", disable=not (progress and is_main))
    for step, batch in enumerate(steps, start=done):
        if "item_index" not in batch:
            raise ValueError("gallery batches must carry 'item_index' (the item's row in the gallery)")
        if left_out is None:
            with torch.no_grad():
                emb = encode_fn(batch)
            idx = torch.as_tensor(batch["item_index"]).to(emb.device)
            if accelerator is not None:
                emb, idx = accelerator.gather_for_metrics((emb.contiguous(), idx.contiguous()))
            idx_np = idx.cpu().numpy().astype(np.int64)
            emb_np = emb.detach().float().cpu().numpy()
        else:
            idx_np, emb_np = _encode_step_skipping(encode_fn, batch, accelerator)
        if out is not None:
            if is_main:
                _save_chunk(_chunk_path(out, step), idx_np, emb_np)
        else:
            in_memory.append((idx_np, emb_np))
        bar.update(1)
    bar.close()
    if accelerator is not None and out is not None:
        accelerator.wait_for_everyone()  # the main process's chunks are complete before anyone reads them

    if out is not None:
        parts = []
        for path in sorted(out.glob("chunk_*.npz")):
            with np.load(path) as z:
                parts.append((z["item_index"], z["embeddings"]))
    else:
        parts = in_memory
    parts = [p for p in parts if len(p[0])]  # under skip, a step whose every item failed holds none
    if not parts:
        raise ValueError("the gallery loader yielded no batches" if left_out is None else "no gallery item loaded")
    idx_all = np.concatenate([p[0] for p in parts])
    emb_all = np.concatenate([p[1] for p in parts])
    if n_items is None:
        dataset = getattr(loader, "dataset", None)
        n_items = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else int(idx_all.max()) + 1
    # An item seen twice (padding that was not dropped) has the same embedding both times: keep the first.
    uniq, first = np.unique(idx_all, return_index=True)
    missing = np.setdiff1d(np.arange(n_items), uniq)
    if (len(missing) and left_out is None) or (len(uniq) and (uniq[0] < 0 or uniq[-1] >= n_items)):
        raise ValueError(
            f"{len(missing)} of {n_items} gallery items got no embedding (first: {missing[:5].tolist()}); "
            f"item_index values span {uniq.min()}..{uniq.max()}: every item must load to be indexed"
        )
    result = np.full((n_items, emb_all.shape[1]), np.nan, np.float32)
    result[uniq] = emb_all[first]
    if left_out is not None:
        left_out.extend(int(i) for i in missing)
    return result


def _encode_step_skipping(encode_fn, batch: dict[str, Any], accelerator: Any) -> tuple[np.ndarray, np.ndarray]:
    """One step of `encode_gallery` under ``on_error=skip``: ``(item_index [b], embeddings [b, E])`` of every
    process's batch.

    The processes' batches differ in size (or are empty) once items fail to load, which a tensor gather cannot
    take, and ``gather_for_metrics`` would trim the duplicated tail of the last step at the wrong place: so the
    arrays are gathered as objects, and the duplicates dropped later by item index.
    """
    if batch.get("empty", False):
        mine = (np.zeros(0, np.int64), None)
    else:
        with torch.no_grad():
            emb = encode_fn(batch)
        mine = (torch.as_tensor(batch["item_index"]).cpu().numpy().astype(np.int64), emb.detach().float().cpu().numpy())
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = [p for p in gather_object([mine]) if p[1] is not None]
    else:
        parts = [mine] if mine[1] is not None else []
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


__all__ = [
    "KINDS",
    "build_index",
    "dir_weights_hash",
    "encode_gallery",
    "file_hash",
    "hash_ids",
    "index_info",
    "load_embeddings",
    "load_index",
    "save_embeddings",
    "save_index",
    "search",
    "set_search_params",
]
