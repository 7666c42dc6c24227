"""Shared by the benchmark scripts: run a tool in a variant directory that shares a base run's parts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def variant_dir(base: Path, name: str, share: tuple[str, ...]) -> Path:
    """`base/bench/<name>` with symlinks to the base run's shared parts (teacher, tokenizer, caches)."""
    d = base / "bench" / name
    d.mkdir(parents=True, exist_ok=True)
    for part in share:
        src, dst = (base / part).resolve(), d / part
        if src.exists() and not dst.exists():
            os.symlink(src, dst)
    return d


def run_tool(tool: str, args: list[str], log: Path) -> float:
    """Run tools/<tool> with args, output to `log`; returns the wall time in seconds (raises on failure)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / tool), *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT
        )
    if proc.returncode:
        raise SystemExit(f"{tool} {' '.join(args)} failed; see {log}")
    return time.perf_counter() - t0


def split_own(argv: list[str], own: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Take `name=value` arguments that belong to the benchmark (defaults in `own`); the rest are overrides."""
    own, rest = dict(own), []
    for a in argv:
        k = a.split("=", 1)[0]
        if k in own and "=" in a:
            own[k] = a.split("=", 1)[1]
        else:
            rest.append(a)
    return own, rest
