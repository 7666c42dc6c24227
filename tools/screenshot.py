"""Render the service's result page in headless Chromium and save it as a PNG (the README's picture).

    python tools/screenshot.py recipe=shapes                                     # -> docs/serve.png
    python tools/screenshot.py recipe=shapes query="a blue square above a red circle" k=10 out=/tmp/page.png

Serves the recipe's run in this process (fastslow.service.app_from_run, uvicorn on 127.0.0.1 at a free port), points
Debian's `chromium` (apt-get install chromium; `chromium=PATH` for another binary) at the result page of `query`
(mode=, default rerank: fast+slow@k, so each thumbnail shows its Fast and its Slow rank) and writes `out` (width= and
height= set the window). Chromium runs with a fresh profile and no background networking: nothing is downloaded.
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once

OWN_ARGS = {
    "query": "a small red circle left of a large blue square",
    "k": "10",
    "mode": "rerank",
    "out": "docs/serve.png",
    "width": "1000",
    "height": "640",
    "chromium": "chromium",
}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]  # fmt: skip


def main(argv=None) -> None:
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import threading
    import time
    from pathlib import Path
    from urllib.parse import urlencode

    from fastslow.config import check_data_files, load_recipe, split_own_args
    from fastslow.errors import MissingFileError

    own, rest = split_own_args(sys.argv[1:] if argv is None else argv, OWN_ARGS)
    cfg = load_recipe(rest, prog="screenshot.py")
    browser = shutil.which(own["chromium"])
    if browser is None:
        raise MissingFileError(f"no {own['chromium']!r} on PATH: apt-get install -y chromium, or give chromium=PATH")
    check_data_files(cfg)
    configure_threads(cfg.num_threads)

    import uvicorn

    from fastslow.service import app_from_run

    app = app_from_run(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the server stopped before it started (see above)")
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}/?" + urlencode({"q": own["query"], "k": own["k"], "mode": own["mode"]})
    out = Path(own["out"]).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run(
                [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
                 f"--window-size={own['width']},{own['height']}", url],
                capture_output=True, text=True, timeout=180,
            )  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    if proc.returncode or not out.is_file():
        raise SystemExit(f"chromium failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    from PIL import Image

    Image.open(out).convert("RGB").quantize(colors=128).save(out, optimize=True)  # a small file for the repository
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB) from {url}")


if __name__ == "__main__":
    run(main)
