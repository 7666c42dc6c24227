"""Fault tests: a run SIGKILLed again and again, and resumed, ends exactly where an uninterrupted run ends.

- `tools/distill.py`, 1 process and 2 processes under `accelerate launch` (DeepSpeed ZeRO-2 over gloo), resumed each
  time with `train.resume=auto`, ends with the weights of an uninterrupted run of the same launch, bit for bit. The
  kills land at points a user's run meets (the OOM killer, a power cut, a pre-empted job): inside a checkpoint write
  (the `step_XXXXXXX.tmp` directory exists, its manifest not yet renamed), a random moment after a checkpoint commits
  (between and during training steps, miner refreshes, score-cache writes), and a random moment of start-up (token
  store build, cache opening). A 2-process run is killed as a whole (its process group: a power cut or a job
  scheduler's kill takes every rank). The run is `recipe=smoke` over 10 steps with a checkpoint at every step, on the
  listwise loss (mined bank, teacher-score cache): everything a resume has to restore exactly.
- `tools/build_index.py` killed mid-encoding (its resumable gallery chunks), inside the teacher token store's write,
  and at start-up, then run again, leaves the index, embeddings and token store of an uninterrupted build, byte for
  byte, and no temporary directory behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_tools import accelerate_launch

pytestmark = [pytest.mark.slow, pytest.mark.fault]

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
MAX_STEPS = 20
ARGS = ["recipe=smoke", f"train.max_steps={MAX_STEPS}", "train.save_every=1", "train.keep_last=2", "loss.mine_every=3"]
# Five kills, in this order; "inside" aims at the write of the checkpoint after the newest complete one.
PLAN = ["inside", "after_commit", "startup", "inside", "after_commit"]
TIMEOUT = 600  # seconds one process may take on a loaded machine


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in a process group of its own, so that a kill takes it and every rank it launched."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def distill(out: Path, log: Path, processes: int = 1) -> subprocess.Popen:
    script = [str(ROOT / "tools" / "distill.py"), *ARGS, f"output_dir={out}"]
    launcher = [sys.executable] if processes == 1 else accelerate_launch(processes)
    return start([*launcher, *script], log)


def newest_complete(ckpts: Path) -> int:
    steps = [int(p.name[5:]) for p in ckpts.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return max(steps, default=0)


def new_since(path: Path, t0_ns: int) -> bool:
    """``path`` exists and was made by the current process (a leftover of an earlier kill is older)."""
    try:
        return path.stat().st_mtime_ns >= t0_ns
    except FileNotFoundError:
        return False


def any_new(directory: Path, pattern: str, t0_ns: int) -> bool:
    return any(new_since(p, t0_ns) for p in directory.glob(pattern)) if directory.is_dir() else False


def kill_when(proc: subprocess.Popen, condition) -> bool:
    """SIGKILL ``proc``'s process group the moment ``condition()`` holds (polled every half millisecond); False if it
    ended first."""
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("a run neither reached its kill point nor ended in time")
        time.sleep(0.0005)
    return False


def kill_point(what: str, tmp: Path, final: Path, t0: float, t0_ns: int, rng: random.Random):
    """The condition that fires the kill of one run started at ``t0`` (monotonic) / ``t0_ns`` (wall clock)."""
    if what == "inside":  # the write of the next checkpoint has begun
        return lambda: new_since(tmp, t0_ns)
    if what == "after_commit":
        # A random moment within a second after the next checkpoint is complete, at the latest when the write after
        # it begins (the following checkpoint or the final export): on a fast machine a second can hold the rest of
        # the run, and a kill after the export would test nothing.
        delay, seen = rng.uniform(0.0, 1.0), []
        following = final.with_name(f"step_{int(final.name[5:]) + 1:07d}.tmp")
        last = int(final.name[5:]) >= MAX_STEPS  # the export follows this commit at once: kill at the commit
        student = final.parent.parent

        def condition():
            if not seen and new_since(final, t0_ns):
                seen.append(time.monotonic())
            if not seen:
                return False
            return (time.monotonic() - seen[0] >= delay or new_since(following, t0_ns) or last
                    or any_new(student, ".model.safetensors.*.tmp", t0_ns))  # fmt: skip

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


def run_dir(base: Path, directory: Path, *parts: str) -> Path:
    directory.mkdir()
    for name in ("teacher", "data", "tokenizer.json", *parts):
        os.symlink(base / name, directory / name)
    return directory


def assert_same_weights(a_path: Path, b_path: Path, landed) -> None:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and (a[k] == b[k]).all())]
    assert not different, f"{len(different)} tensors differ after the kills {landed}, e.g. {different[:3]}"


def uninterrupted(base: Path, directory: Path, processes: int) -> Path:
    straight = run_dir(base, directory)
    log = directory.with_suffix(".log")
    assert distill(straight, log, processes).wait(TIMEOUT) == 0, log.read_text()[-3000:]
    return straight


@pytest.fixture(scope="module")
def straight_1(base, tmp_path_factory):
    """The uninterrupted 1-process distillation: the weights the killed run must reach, and the student indexed."""
    return uninterrupted(base, tmp_path_factory.mktemp("straight_1") / "run", 1)


@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-process-zero2"])
def test_sigkilled_distill_resumes_to_the_weights_of_an_uninterrupted_run(base, straight_1, tmp_path, processes):
    straight = straight_1 if processes == 1 else uninterrupted(base, tmp_path / "straight", processes)

    out = run_dir(base, tmp_path / "killed")
    ckpts = out / "student" / "checkpoints"
    rng = random.Random(13 + processes)
    landed = []
    for i, what in enumerate(PLAN):
        step = newest_complete(ckpts) + 1
        # A fast machine: the kills so far let the run near its end. Stop, so that the resume still trains (resuming
        # a finished 2-process run aborts rank 1 at exit: a known, separate defect, see issue 13's notes).
        if step > MAX_STEPS - 5:
            break
        t0, t0_ns = time.monotonic(), time.time_ns()
        tmp, final = ckpts / f"step_{step:07d}.tmp", ckpts / f"step_{step:07d}"
        condition = kill_point(what, tmp, final, t0, t0_ns, rng)
        log = tmp_path / f"killed_{i}.log"
        assert kill_when(distill(out, log, processes), condition), f"kill {i} ({what}): the run ended first\n" + (
            log.read_text()[-3000:]
        )
        inside = new_since(tmp, t0_ns) and not final.exists()
        landed.append((what, step, inside))
        print(f"kill {i}: {what} at step {step}{' (inside its checkpoint write)' if inside else ''}")
        # Killed before its end, the run has exported nothing (a kill right at the last commit may lose the race to
        # the export, which then stands complete: its rename is atomic).
        assert step == MAX_STEPS or not (out / "student" / "model.safetensors").exists(), landed
    log = tmp_path / "resumed.log"
    assert distill(out, log, processes).wait(TIMEOUT) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text()
    # At least one kill cut a checkpoint write half-way (the poll can lose the race to a fast write; two tries).
    assert any(inside for what, _, inside in landed if what == "inside"), landed
    assert_same_weights(straight / "student" / "model.safetensors", out / "student" / "model.safetensors", landed)
    student = out / "student"
    assert (student / "config.yaml").is_file() and list((student / "tb").rglob("events.out.tfevents.*"))
    newest = max((p for p in ckpts.glob("step_*") if p.name[5:].isdigit()), key=lambda p: p.name)
    assert json.loads((newest / "trainer_state.json").read_text())["step"] == MAX_STEPS
    if processes > 1:  # ZeRO-2 through accelerate_config.yaml, as the README says: every rank's optimizer partition
        assert len(list((newest / "state").rglob("*optim_states*"))) == processes, newest


INDEX_ARGS = ["recipe=smoke", "index.batch_size=2"]  # many small encoding steps: a kill lands between chunks
INDEX_PLAN = ["encoding", "tokens", "startup"]


def build_index(out: Path, log: Path) -> subprocess.Popen:
    return start([sys.executable, str(ROOT / "tools" / "build_index.py"), *INDEX_ARGS, f"output_dir={out}"], log)


def index_kill_point(what: str, index: Path, t0: float, t0_ns: int, rng: random.Random):
    if what == "encoding":  # a gallery chunk of this run is on disk: the kill lands between encoding steps
        return lambda: any_new(index / "student_chunks", "chunk_*.npz", t0_ns)
    if what == "tokens":  # the token store's temporary directory exists: the teacher is writing its rows
        return lambda: any_new(index, ".tokens.*.tmp", t0_ns)
    # "startup": a random moment of the first seconds, at the latest when encoding begins
    delay = rng.uniform(1.0, 6.0)
    return lambda: time.monotonic() - t0 >= delay or any_new(index / "student_chunks", "meta.json", t0_ns)


def index_files(index: Path) -> dict[str, bytes]:
    return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*")) if p.is_file()}


def test_sigkilled_build_index_restarts_to_the_files_of_an_uninterrupted_build(base, straight_1, tmp_path):
    student_run = straight_1  # the student both builds index
    straight = run_dir(base, tmp_path / "straight")
    os.symlink(student_run / "student", straight / "student")
    log = tmp_path / "straight.log"
    assert build_index(straight, log).wait(TIMEOUT) == 0, log.read_text()[-3000:]

    out = run_dir(base, tmp_path / "killed")
    os.symlink(student_run / "student", out / "student")
    index = out / "index"
    rng = random.Random(7)
    for i, what in enumerate(INDEX_PLAN):
        condition = index_kill_point(what, index, time.monotonic(), time.time_ns(), rng)
        log = tmp_path / f"killed_{i}.log"
        assert kill_when(build_index(out, log), condition), f"kill {i} ({what}): the build ended first\n" + (
            log.read_text()[-3000:]
        )
    log = tmp_path / "rebuilt.log"
    assert build_index(out, log).wait(TIMEOUT) == 0, log.read_text()[-3000:]
    expected, got = index_files(straight / "index"), index_files(index)
    assert sorted(got) == sorted(expected), "files differ from an uninterrupted build (a temporary one left behind?)"
    differ = [name for name in expected if expected[name] != got[name]]
    if "manifest.json" in differ:  # the build's time may differ, and the item paths name each run's directory
        a, b = (json.loads(files["manifest.json"].replace(str(run).encode(), b"RUN"))
                for files, run in ((expected, straight), (got, out)))  # fmt: skip
        a.pop("created"), b.pop("created")
        if a == b:
            differ.remove("manifest.json")
    assert not differ, f"{differ} differ from an uninterrupted build"
    leftovers = [p.name for p in index.iterdir() if ".tmp" in p.name or p.name.endswith(".old")]
    assert not leftovers, leftovers
