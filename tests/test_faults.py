"""Fault test: `tools/distill.py` SIGKILLed again and again, resumed each time with `train.resume=auto`, ends with the
weights of an uninterrupted run, bit for bit.

The kills land at points a user's run meets (the OOM killer, a power cut, a pre-empted job): inside a checkpoint
write (the `step_XXXXXXX.tmp` directory exists, its manifest not yet renamed), a random moment after a checkpoint
commits (between and during training steps, miner refreshes, score-cache writes), and a random moment of start-up
(token store build, cache opening). The run is `recipe=smoke` over 10 steps with a checkpoint at every step, on the
listwise loss (mined bank, teacher-score cache): everything a resume has to restore exactly.

Opt-in (marker `fault`; about 2 minutes of process starts, more than the default run's budget for one test):
`make test-fault`, or `pytest -m fault tests/test_faults.py`.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.fault]

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ARGS = ["recipe=smoke", "train.max_steps=10", "train.save_every=1", "train.keep_last=2", "loss.mine_every=3"]
# Five kills, in this order; "inside" aims at the write of the checkpoint after the newest complete one.
PLAN = ["inside", "after_commit", "startup", "inside", "after_commit"]
TIMEOUT = 600  # seconds one process may take on a loaded machine


def distill(out: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "distill.py"), *ARGS, f"output_dir={out}"],
            cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip


def newest_complete(ckpts: Path) -> int:
    steps = [int(p.name[5:]) for p in ckpts.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return max(steps, default=0)


def new_since(path: Path, t0_ns: int) -> bool:
    """``path`` exists and was made by the current process (a leftover of an earlier kill is older)."""
    try:
        return path.stat().st_mtime_ns >= t0_ns
    except FileNotFoundError:
        return False


def kill_when(proc: subprocess.Popen, condition) -> bool:
    """SIGKILL ``proc`` the moment ``condition()`` holds (polled every half millisecond); False if it ended first."""
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None:
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("a distill run neither reached its kill point nor ended in time")
        time.sleep(0.0005)
    return False


def kill_point(what: str, tmp: Path, final: Path, t0: float, t0_ns: int, rng: random.Random):
    """The condition that fires the kill of one run started at ``t0`` (monotonic) / ``t0_ns`` (wall clock)."""
    if what == "inside":  # the write of the next checkpoint has begun
        return lambda: new_since(tmp, t0_ns)
    if what == "after_commit":  # a random moment within a second after the next checkpoint is complete
        delay, seen = rng.uniform(0.0, 1.0), []

        def condition():
            if not seen and new_since(final, t0_ns):
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] >= delay

        return condition
    # "startup": a random moment of the first seconds (imports, token store, cache, miner), at the latest when the
    # next checkpoint write begins, so that a fast machine cannot finish the run first.
    delay = rng.uniform(1.0, 8.0)
    return lambda: time.monotonic() - t0 >= delay or new_since(tmp, t0_ns)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained smoke teacher and its data, shared by the runs below."""
    out = tmp_path_factory.mktemp("base")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_teacher.py"), "recipe=smoke", f"output_dir={out}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def run_dir(base: Path, directory: Path) -> Path:
    directory.mkdir()
    for name in ("teacher", "data", "tokenizer.json"):
        os.symlink(base / name, directory / name)
    return directory


def test_sigkilled_distill_resumes_to_the_weights_of_an_uninterrupted_run(base, tmp_path):
    straight = run_dir(base, tmp_path / "straight")
    assert distill(straight, tmp_path / "straight.log").wait(TIMEOUT) == 0, (tmp_path / "straight.log").read_text()

    out = run_dir(base, tmp_path / "killed")
    ckpts = out / "student" / "checkpoints"
    rng = random.Random(13)
    landed = []
    for i, what in enumerate(PLAN):
        step = newest_complete(ckpts) + 1
        t0, t0_ns = time.monotonic(), time.time_ns()
        tmp, final = ckpts / f"step_{step:07d}.tmp", ckpts / f"step_{step:07d}"
        condition = kill_point(what, tmp, final, t0, t0_ns, rng)
        log = tmp_path / f"killed_{i}.log"
        assert kill_when(distill(out, log), condition), f"kill {i} ({what}): the run ended first\n{log.read_text()}"
        inside = new_since(tmp, t0_ns) and not final.exists()
        landed.append((what, step, inside))
        print(f"kill {i}: {what} at step {step}{' (inside its checkpoint write)' if inside else ''}")
        assert not (out / "student" / "model.safetensors").exists()
    log = tmp_path / "resumed.log"
    proc = distill(out, log)
    assert proc.wait(TIMEOUT) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text()
    # At least one kill cut a checkpoint write half-way (the poll can lose the race to a fast write; two tries).
    assert any(inside for what, _, inside in landed if what == "inside"), landed

    a = load_file(str(straight / "student" / "model.safetensors"))
    b = load_file(str(out / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and (a[k] == b[k]).all())]
    assert not different, f"{len(different)} tensors differ after the kills {landed}, e.g. {different[:3]}"
