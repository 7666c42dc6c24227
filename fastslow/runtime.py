"""Process-level setup shared by the tools. Imports nothing heavy, so tools can call it before torch."""

from __future__ import annotations

import os


def configure_threads(num_threads: int = 0) -> int:
    """Pick the intra-op thread count for this process before torch starts its pools.

    `accelerate launch` starts one process per rank on the same cores; leaving every process at the
    default (all cores) oversubscribes the CPU and makes a 2-process run slower than a 1-process one.

    Args:
        num_threads: threads per process; 0 divides the machine's cores among local processes.

    Returns:
        The thread count set (also exported as OMP_NUM_THREADS / MKL_NUM_THREADS when unset).
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("ACCELERATE_NUM_PROCESSES", "1")) or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = num_threads if num_threads > 0 else max(1, cores // max(local, 1))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    # Tokenizers' own pool would fight the DataLoader and torch for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    except ImportError:  # pragma: no cover - torch is a hard dependency; keep this module import-light
        pass
    return n


def run(main) -> None:
    """Run a tool's `main()`, turning user errors into one clear line on stderr and exit status 2.

    User errors are fastslow's own (`fastslow.errors.UserError` and its kinds: a bad recipe or override, bad
    data, a missing or stale artefact, an unusable checkpoint, a bad query) and a missing input
    (FileNotFoundError); a bug still shows its traceback (set FASTSLOW_TRACEBACK=1 to see it for user errors too).

    A process of a multi-process run (WORLD_SIZE > 1) that ends, with 0 or 2, ends without interpreter
    finalization: see `_end_process`.
    """
    import sys

    from fastslow.errors import UserError

    code = 0
    try:
        main()
    except (FileNotFoundError, UserError) as e:
        if os.environ.get("FASTSLOW_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        _end_process(code)
    if code:
        raise SystemExit(code) from None


def _end_process(code: int) -> None:
    """Flush and leave with ``code`` at once, skipping the interpreter's finalization.

    Why: a gloo process group's worker thread drops its last reference to a finished collective's tensors a moment
    after the caller has seen the result, and that needs the GIL. When the main thread is already finalizing the
    interpreter, Python ends the worker thread inside a C++ destructor and the process aborts ("terminate called
    without an active exception", SIGABRT): a 2-process run that had written everything then failed with -6,
    1 run in 4 to 6 on the loaded 2-core machine (core dump: `ProcessGroupGloo::runLoop` destroying an
    `AsyncAllgatherWork`). `destroy_process_group()` does not join those threads while DeepSpeed still holds the
    groups. Nothing is lost by not finalizing: every artefact is written, fsynced and renamed by
    `fastslow.artefacts` before `main()` returns, and the tools close their caches themselves.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)
