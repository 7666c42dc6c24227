"""Search the indexed gallery with a text query: the student's top-k, reranked by the teacher.

    python tools/search.py recipe=shapes query="a small red circle left of a large blue square" k=10
    python tools/search.py recipe=shapes query="a red circle" k=20 mode=fuse html=out.html
    python tools/search.py recipe=shapes query="..." query="..." k=5          # several queries, one batch

Besides recipe keys (e.g. combiner.alpha=0.7), takes its own arguments: query=TEXT (repeatable),
k=N (default combiner.k; clamped to the gallery with a warning), mode=slow|fuse|fast (default
combiner.mode; slow = the student's top-k reranked by the teacher alone) and html=PATH (a page
showing the ranked images with their scores). Needs ${output_dir}/index from tools/build_index.py;
mode=fuse without combiner.alpha uses the weight rerank_eval.py tuned for this index at this k
(${output_dir}/eval/fuse_alpha.json), else 0.5. Every artefact is loaded once (fastslow.query.Retriever)
and checked against its stamp: an index of another student, teacher tokens of another teacher or gallery, or a
fusion weight tuned for another model pair is refused, naming what differs.
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once

OWN_ARGS = ("query", "k", "mode", "html")


def split_args(argv):
    """Separate this tool's own arguments from the recipe overrides."""
    own, rest = {"query": []}, []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key in OWN_ARGS and "=" in arg:
            value = arg.split("=", 1)[1]
            own["query"].append(value) if key == "query" else own.__setitem__(key, value)
        else:
            rest.append(arg)
    return own, rest


def write_html(path, queries, results, split) -> None:
    import base64
    import html
    from pathlib import Path

    from fastslow.artefacts import atomic_write_text

    parts = [
        "<!doctype html><meta charset='utf-8'><title>fastslow search</title>",
        "<style>body{font-family:sans-serif} figure{display:inline-block;margin:4px;text-align:center;"
        "font-size:12px} img{width:128px;image-rendering:pixelated}</style>",
    ]
    for q, hits in zip(queries, results):
        parts.append(f"<h3>{html.escape(q)}</h3><div>")
        for rank, h in enumerate(hits, 1):
            p = Path(split.item_paths[h.item])
            if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
                img = f"<img src='data:image/{p.suffix[1:]};base64,{base64.b64encode(p.read_bytes()).decode()}'>"
            else:
                img = f"<div style='width:128px;height:40px'>{html.escape(p.name)}</div>"
            teacher = "-" if h.teacher_score is None else f"{h.teacher_score:.3f}"
            parts.append(
                f"<figure>{img}<figcaption>#{rank} {html.escape(split.item_ids[h.item])}<br>"
                f"student {h.student_score:.3f} · teacher {teacher}</figcaption></figure>"
            )
        parts.append("</div>")
    atomic_write_text(path, "\n".join(parts))  # a page being rewritten is never seen half-written


def main(argv=None) -> None:
    import sys

    from fastslow.config import ConfigError, check_data_files, load_recipe

    own, rest = split_args(sys.argv[1:] if argv is None else argv)
    cfg = load_recipe(rest, prog="search.py")
    if not own["query"]:
        raise ConfigError('give a query: query="a red circle left of a blue square"')
    check_data_files(cfg)
    configure_threads(cfg.num_threads)

    from fastslow.query import Retriever

    mode = own.get("mode", cfg.combiner.mode)
    try:
        k = int(own.get("k", cfg.combiner.k))
    except ValueError:
        raise ConfigError(f"k={own['k']!r} is not a whole number") from None
    # Student, index, teacher and token store loaded once and checked to belong together; the student alone reads
    # no teacher tokens. No gallery is loaded here: the index's manifest names it.
    retriever = Retriever.from_run(cfg, teacher=mode != "fast")
    # combiner.mode=slow is the teacher alone over the student's top-k: the retriever's "rerank".
    results = retriever.hits(retriever.search(own["query"], k, {"slow": "rerank"}.get(mode, mode)))
    manifest = retriever.manifest
    ids, paths = manifest["item_ids"], manifest.get("item_paths", [])
    # The gallery is what build_index indexed: under data.on_error=skip, without the items it could not read.
    gallery = f"gallery {len(ids)}"
    if manifest.get("skipped"):
        gallery += f", {len(manifest['skipped'])} left out by build_index (unreadable; listed in its manifest)"
    for q, hits in zip(own["query"], results):
        print(f"\nquery: {q!r}  ({mode}, k={k}, {gallery})")
        print(f"{'rank':>4}  {'student':>8}  {'teacher':>8}  id / path")
        for rank, h in enumerate(hits, 1):
            t = "-" if h.teacher_score is None else f"{h.teacher_score:8.3f}"
            print(f"{rank:>4}  {h.student_score:8.3f}  {t:>8}  {ids[h.item]}  {paths[h.item] if paths else ''}")
    if "html" in own:
        from types import SimpleNamespace

        write_html(own["html"], own["query"], results, SimpleNamespace(item_ids=ids, item_paths=paths))
        print(f"\nwrote {own['html']}")


if __name__ == "__main__":
    run(main)
