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
    """
    import sys

    from fastslow.errors import UserError

    try:
        main()
    except (FileNotFoundError, UserError) as e:
        if os.environ.get("FASTSLOW_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
