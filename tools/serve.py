"""Serve the indexed gallery over HTTP: a JSON search API and a result page, everything loaded once.

    python tools/serve.py recipe=shapes                                  # http://127.0.0.1:8000/
    python tools/serve.py recipe=shapes port=8080 serve.max_wait_ms=10
    curl 'http://127.0.0.1:8000/search?q=a+small+red+circle+left+of+a+large+blue+square&k=20&mode=rerank'

Besides recipe keys (serve.max_wait_ms, serve.max_batch, serve.queue_size, serve.max_k, serve.max_query_chars,
combiner.alpha, ...), takes host= (default 127.0.0.1: only this machine; give 0.0.0.0 to serve others) and port=
(default 8000). Needs ${output_dir}/index from tools/build_index.py (make demo builds it); the student, index, teacher
and token store are opened once by fastslow.query.Retriever, their stamps checked. Endpoints, modes and limits:
fastslow/service.py. Modes: fast | rerank (fast+slow@k, the default) | fuse | slow (the teacher over everything).
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once

OWN_ARGS = {"host": "127.0.0.1", "port": "8000"}


def main(argv=None) -> None:
    import sys

    from fastslow.config import ConfigError, check_data_files, load_recipe, split_own_args

    own, rest = split_own_args(sys.argv[1:] if argv is None else argv, OWN_ARGS)
    cfg = load_recipe(rest, prog="serve.py")
    try:
        port = int(own["port"])
    except ValueError:
        raise ConfigError(f"port={own['port']!r} is not a whole number") from None
    check_data_files(cfg)
    configure_threads(cfg.num_threads)

    import uvicorn

    from fastslow.service import app_from_run

    app = app_from_run(cfg)  # student, index, teacher, token store: opened once, stamps checked
    retriever = app.state.retriever
    print(f"serving {retriever.n_items} items of {retriever.manifest.get('split')} on http://{own['host']}:{port}/")
    uvicorn.run(app, host=own["host"], port=port, log_level="warning")


if __name__ == "__main__":
    run(main)
