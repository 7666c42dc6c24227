"""Search the indexed gallery with a text query: the student's top-k, reranked by the teacher.

    python tools/search.py recipe=shapes query="a small red circle left of a large blue square" k=10
    python tools/search.py recipe=shapes query="a red circle" k=20 mode=fuse html=out.html
    python tools/search.py recipe=shapes query="..." query="..." k=5          # several queries, one batch

Besides recipe keys (e.g. combiner.alpha=0.7), takes its own arguments: query=TEXT (repeatable),
k=N (default combiner.k; clamped to the gallery with a warning), mode=slow|fuse|fast (default
combiner.mode) and html=PATH (a page showing the ranked images with their scores). Needs
${output_dir}/index from tools/build_index.py; mode=fuse without combiner.alpha uses the weight
rerank_eval.py tuned (${output_dir}/eval/fuse_alpha.json), else 0.5. Every artefact read is checked
against its stamp: an index of another student, teacher tokens of another teacher or gallery, or a
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
    import json
    import sys

    from fastslow.config import ConfigError, check_data_files, load_recipe

    own, rest = split_args(sys.argv[1:] if argv is None else argv)
    cfg = load_recipe(rest, prog="search.py")
    if not own["query"]:
        raise ConfigError('give a query: query="a red circle left of a blue square"')
    check_data_files(cfg)
    configure_threads(cfg.num_threads)

    from fastslow import stages
    from fastslow.artefacts import check_stamp
    from fastslow.combiner import Combiner
    from fastslow.evaluation import StoreTeacherScorer, encode_texts_student

    student_dir, teacher_dir = stages.stage_dir(cfg, "student"), stages.stage_dir(cfg, "teacher")
    student, _, tok = stages.load_trained(student_dir, "student")
    teacher, _, _ = stages.load_trained(teacher_dir, "teacher")
    student_hash = stages.weights_hash(student_dir / "model.safetensors")
    teacher_hash = stages.weights_hash(teacher_dir / "model.safetensors")
    # No gallery is loaded here: the index's manifest names it, and the teacher tokens must be of that gallery.
    index, manifest = stages.open_index(cfg, student_hash)
    mode = own.get("mode", cfg.combiner.mode)
    alpha = cfg.combiner.alpha
    tuned = stages.stage_dir(cfg, "eval") / "fuse_alpha.json"
    if alpha is None and mode == "fuse":  # the weight rerank_eval tuned on val, else an even mix
        alpha = 0.5
        if tuned.is_file():
            # Split names are "<dataset>/<split>" (stages.load_split): the val split of the indexed gallery's data.
            val_split = manifest.get("split", "").rpartition("/")[0] + "/val"
            rebuild = f"{stages.rebuild_command(cfg, 'rerank_eval.py')} (it tunes the weight), or set combiner.alpha"
            check_stamp(tuned, stages.fuse_stamp(cfg, student_hash, teacher_hash, val_split), rebuild)
            alpha = json.loads(tuned.read_text())["alpha"]
    try:
        k = int(own.get("k", cfg.combiner.k))
    except ValueError:
        raise ConfigError(f"k={own['k']!r} is not a whole number") from None
    ml = cfg.data.max_length
    scorer = None
    if mode != "fast":  # the student alone reads no teacher tokens
        scorer = StoreTeacherScorer(teacher, stages.open_gallery_tokens(cfg, manifest, teacher_hash), tok, ml)
    comb = Combiner(
        lambda q: encode_texts_student(student, tok, q, max_length=ml),
        index,
        scorer,
        mode=mode,
        k=k,
        alpha=0.5 if alpha is None else alpha,
        logit_scale=float(student.inverse_temperature()),
        tokenizer=tok,  # an empty or invisible-only query is refused (QueryError), k <= 0 too: exit status 2
        max_length=ml,
    )
    results = comb.search(own["query"], k)
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
