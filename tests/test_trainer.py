"""The shared training loop: exact resume, durable checkpoints of one run, checked and safe resume,
loud failure, schedule."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_tools import accelerate_launch
from torch import nn

from fastslow.artefacts import write_manifest
from fastslow.errors import UserError
from fastslow.trainer import (
    EpochBatches,
    TrainConfig,
    Trainer,
    _WeightsOnlyCheckpointEngine,
    checkpoint_problems,
    list_checkpoints,
    make_accelerator,
    warmup_cosine,
)

ROOT = Path(__file__).resolve().parents[1]


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=40):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x @ torch.randn(8, 1, generator=g)).squeeze(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "item_index": i}


def collate(samples):
    return {
        "x": torch.stack([s["x"] for s in samples]),
        "y": torch.stack([s["y"] for s in samples]),
        "item_index": torch.tensor([s["item_index"] for s in samples]),
    }


class ToyModule(nn.Module):
    """Dropout makes the result depend on the restored RNG, not only on the weights."""

    def __init__(self, poison_step=None):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.poison_step, self.calls = poison_step, 0

    def forward(self, batch):
        self.calls += 1
        loss = (self.model(batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()
        if self.poison_step is not None and self.calls > self.poison_step:
            loss = loss * float("nan")
        return {"loss": loss, "mse_loss": loss.detach()}


class Crash(Exception):
    pass


def crash_at(step):
    def hook(trainer):
        if trainer.state.step == step:
            raise Crash(step)

    return hook


def make_trainer(
    out_dir,
    max_steps,
    resume="auto",
    save_every=3,
    grad_accum=1,
    poison_step=None,
    on_step_end=None,
    batch_size=8,
    lr=1e-2,
    checkpoint_objects=None,
):
    torch.manual_seed(0)
    cfg = TrainConfig(
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=2,
        grad_accum=grad_accum,
        save_every=save_every,
        keep_last=2,
        resume=resume,
        log_every=2,
        eval_every=0,
    )
    return Trainer(
        ToyModule(poison_step),
        ToyData(),
        collate_fn=collate,
        out_dir=out_dir,
        cfg=cfg,
        seed=3,
        accelerator=make_accelerator(out_dir, grad_accum, log=False),
        on_step_end=on_step_end,
        checkpoint_objects=checkpoint_objects,
    )


def run(out_dir, max_steps, **kw):
    make_trainer(out_dir, max_steps, **kw).train()
    return load_file(str(out_dir / "model.safetensors"))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_bit_identical(tmp_path, grad_accum):
    # 8 steps straight vs a run killed after its step-4 checkpoint and resumed to 8, crossing an
    # epoch boundary (5 batches per epoch).
    straight = run(tmp_path / "a", 8, grad_accum=grad_accum, save_every=4)
    with pytest.raises(Crash):
        run(tmp_path / "b", 8, grad_accum=grad_accum, save_every=4, on_step_end=crash_at(6))
    assert not (tmp_path / "b" / "model.safetensors").exists()
    resumed = run(tmp_path / "b", 8, grad_accum=grad_accum, save_every=4)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    state = json.loads((list_checkpoints(tmp_path / "b" / "checkpoints")[-1] / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["micro_step"] == 8 * grad_accum


def test_resume_none_starts_over(tmp_path):
    a = run(tmp_path / "a", 6)
    with pytest.raises(Crash):
        run(tmp_path / "b", 6, on_step_end=crash_at(4))
    b = run(tmp_path / "b", 6, resume="none")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same as straight: resume=none ignored the checkpoint


def test_checkpoints_atomic_and_pruned(tmp_path):
    run(tmp_path, 9, save_every=2)
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_0000008", "step_0000009"]  # keep_last=2
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    ckpt = tmp_path / "checkpoints" / "step_0000009"
    assert (ckpt / "model.safetensors").is_file()
    # an interrupted write (a .tmp dir) is never picked up by resume=auto
    (tmp_path / "checkpoints" / "step_0000099.tmp").mkdir()
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step_0000009"


def test_nan_loss_names_step_batch_and_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError) as err:
        run(tmp_path, 8, save_every=2, poison_step=5)
    msg = str(err.value)
    assert "step 5" in msg and "item_index" in msg and "step_0000004" in msg


def test_epoch_batches_deterministic_and_disjoint():
    a = EpochBatches(50, 4, seed=1, rank=0, world=2)
    b = EpochBatches(50, 4, seed=1, rank=1, world=2)
    assert len(a) == 6
    ea, eb = a.epoch(0), b.epoch(0)
    assert ea == EpochBatches(50, 4, seed=1, rank=0, world=2).epoch(0)
    flat_a, flat_b = sum(ea, []), sum(eb, [])
    assert not set(flat_a) & set(flat_b) and len(set(flat_a)) == 24
    assert a.epoch(1) != ea
    with pytest.raises(ValueError, match="train.batch_size"):
        EpochBatches(5, 4, seed=0, world=2)


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def set_aside(out_dir):
    dirs = sorted(out_dir.glob("checkpoints.set-aside-*"))
    assert len(dirs) <= 1
    return dirs[0] if dirs else None


# ---------------------------------------------------------------- one run's checkpoints (issue 13, point 3)


def test_new_run_sets_old_checkpoints_aside_and_auto_resumes_its_own(tmp_path):
    run(tmp_path, 9, save_every=2)  # an earlier run leaves step 8 and 9, higher than anything the new run writes
    old = sorted(p.name for p in list_checkpoints(tmp_path / "checkpoints"))
    with pytest.warns(UserWarning, match="another run"), pytest.raises(Crash):
        run(tmp_path, 6, resume="none", save_every=2, on_step_end=crash_at(5))
    # keep-last-2 kept the new run's own checkpoints, not the old run's higher step numbers
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000002", "step_0000004"]
    aside = set_aside(tmp_path)
    assert sorted(p.name for p in aside.iterdir()) == old  # moved intact, not deleted
    assert not any(checkpoint_problems(p) for p in aside.iterdir())
    resumed = run(tmp_path, 6, save_every=2)  # auto: the new run's step 4, not the old run's step 9
    assert same(resumed, run(tmp_path / "straight", 6, save_every=2))


def test_pruning_removes_only_this_runs_checkpoints(tmp_path):
    run(tmp_path / "other", 2, save_every=2)
    foreign = list_checkpoints(tmp_path / "other" / "checkpoints")[-1]

    def plant(trainer):  # another run writing into the same directory meanwhile
        if trainer.state.step == 3:
            shutil.copytree(foreign, trainer.ckpt_dir / "step_0000099")

    run(tmp_path / "a", 8, save_every=2, on_step_end=plant)
    names = [p.name for p in list_checkpoints(tmp_path / "a" / "checkpoints")]
    assert names == ["step_0000006", "step_0000008", "step_0000099"]


# ---------------------------------------------------------------- durable checkpoints (point 4)


def test_stray_names_are_ignored(tmp_path):
    run(tmp_path, 4, save_every=2)
    d = tmp_path / "checkpoints"
    shutil.copytree(d / "step_0000004", d / "step_0000500.bak")  # a user's backup
    (d / "step_0000600.tmp").mkdir()  # an interrupted write
    (d / "step_abc").mkdir()
    (d / "notes.txt").write_text("")
    assert [p.name for p in list_checkpoints(d)] == ["step_0000002", "step_0000004"]
    with pytest.warns(UserWarning, match=r"step_0000600\.tmp: an interrupted write"):
        run(tmp_path, 6, save_every=2)  # resume=auto neither crashes on them nor resumes the .bak
    assert json.loads((d / "step_0000006" / "trainer_state.json").read_text())["step"] == 6
    assert (d / "step_0000500.bak").is_dir() and (d / "step_abc").is_dir()  # not ours to move


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # what a power cut or a bad disk leaves, and the file the warning must name
    "empty weights": (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors has 0 bytes"),
    "empty state": (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json has 0 bytes"),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
    "flipped byte": (lambda c: _flip_byte(c / "optimizer.safetensors"), "optimizer.safetensors does not match"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_auto_resume_falls_back_past_an_incomplete_checkpoint(tmp_path, damage):
    straight = run(tmp_path / "a", 8, save_every=2)
    with pytest.raises(Crash):
        run(tmp_path / "b", 8, save_every=2, on_step_end=crash_at(7))  # leaves step 4 and 6
    ckpts = tmp_path / "b" / "checkpoints"
    breaks, says = DAMAGE[damage]
    breaks(ckpts / "step_0000006")
    with pytest.warns(UserWarning) as record:
        resumed = run(tmp_path / "b", 8, save_every=2)
    messages = [str(w.message) for w in record]
    assert any("step_0000006" in m and says in m for m in messages), messages
    assert same(straight, resumed)  # from step 4, the previous complete checkpoint
    assert (set_aside(tmp_path / "b") / "step_0000006").is_dir()  # the broken one is kept for inspection


def test_explicit_or_only_incomplete_checkpoint_is_an_error(tmp_path):
    run(tmp_path, 2, save_every=2)
    ckpt = tmp_path / "checkpoints" / "step_0000002"
    (ckpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        UserError, match=r"step_0000002: not a complete, unchanged fastslow checkpoint: model\.safetensors has 0 bytes"
    ):
        make_trainer(tmp_path, 4, resume=str(ckpt))
    with pytest.raises(UserError, match=r"none of the 1 checkpoints .* is complete.*train\.resume=none"):
        make_trainer(tmp_path, 4)  # auto with nothing complete does not silently start over


# ---------------------------------------------------------------- resume checks what it resumes into (point 5)


@pytest.mark.parametrize(
    "key, kwargs, saved, now",
    [("batch_size", {"batch_size": 4}, 8, 4), ("grad_accum", {"grad_accum": 2}, 1, 2), ("num_processes", {}, 2, 1)],
)
def test_resume_refuses_a_changed_data_position(tmp_path, key, kwargs, saved, now):
    run(tmp_path, 4, save_every=4)
    ckpt = tmp_path / "checkpoints" / "step_0000004"
    if key == "num_processes":  # as if saved by a 2-process run (the manifest is rewritten to match)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state["config"]["num_processes"] = 2
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        write_manifest(ckpt)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=rf"{key} \(.*\): saved {saved}, now {now}"):
        make_trainer(tmp_path, 8, **kwargs)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # refused before anything moved


def test_resume_with_a_lower_lr_applies_it_from_the_resumed_step(tmp_path):
    run(tmp_path, 4, save_every=4)
    trainer = make_trainer(tmp_path, 8, lr=1e-3)  # e.g. after a non-finite loss; and 4 more steps
    assert trainer.state.step == 4
    want = 1e-3 * warmup_cosine(4, 2, 8)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([want, want])
    assert trainer.scheduler.base_lrs == [1e-3, 1e-3]


# ---------------------------------------------------------------- loading runs no code (point 8)


class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_the_payload_is_live(tmp_path):
    """The payload below does run when unpickled the unsafe way, so its absence there means something."""
    torch.save({"x": Payload(tmp_path / "marker")}, tmp_path / "p.bin")
    torch.load(tmp_path / "p.bin", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("forged", [False, True], ids=["manifest-kept", "manifest-forged"])
@pytest.mark.parametrize(
    "where", ["model.safetensors", "optimizer.safetensors", "state/custom_checkpoint_0.pkl", "state/optimizer.bin"]
)
def test_planted_pickle_is_refused_and_never_runs(tmp_path, where, forged):
    out = tmp_path / "run"
    run(out, 2, save_every=2)
    ckpt = out / "checkpoints" / "step_0000002"
    marker = tmp_path / "marker"
    (ckpt / where).parent.mkdir(exist_ok=True)
    torch.save({"state": Payload(marker)}, ckpt / where)  # where accelerate or we would look for state
    if forged:  # the attacker also rewrites the manifest to list the planted file with its hash
        write_manifest(ckpt)
    with pytest.raises(UserError, match=rf"{where.split('/')[-1]}"):
        make_trainer(out, 4, resume=str(ckpt))
    with pytest.raises(UserError):
        make_trainer(out, 4)  # resume=auto refuses it too
    assert not marker.exists()


def test_deepspeed_files_are_loaded_weights_only(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.zero.config import ZeroStageEnum

    engine = _WeightsOnlyCheckpointEngine(TorchCheckpointEngine())
    torch.save({"zero_stage": ZeroStageEnum.gradients, "w": torch.ones(2)}, tmp_path / "good.pt")
    assert engine.load(str(tmp_path / "good.pt"))["zero_stage"] == ZeroStageEnum.gradients  # DeepSpeed's own types
    marker = tmp_path / "marker"
    torch.save({"optimizer_state_dict": Payload(marker)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"bad\.pt cannot be loaded with weights_only=True"):
        engine.load(str(tmp_path / "bad.pt"))
    assert not marker.exists()


# ------------------------------------------------------------------------------ skip counts over processes

BAD_EVERY = 7  # sample i is unreadable when i % 7 == 3 (6 of the 40), under two reasons


class SkippyData(ToyData):
    """ToyData whose every 7th sample could not be read (what PairDataset returns under data.on_error=skip)."""

    def __getitem__(self, i):
        if i % BAD_EVERY == 3:
            return {"skipped": (f"/data/bad_{i}.jpg", "truncated image" if i % 2 else "missing file")}
        return super().__getitem__(i)


def skip_collate(samples):
    kept = [s for s in samples if "skipped" not in s]
    batch = collate(kept) if kept else {"item_index": torch.zeros(0, dtype=torch.long)}
    batch["skipped"], batch["empty"] = [s["skipped"] for s in samples if "skipped" in s], not kept
    return batch


def run_skippy(out_dir, batch_size, steps=4):
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-2, warmup_steps=1, save_every=steps, log_every=2)
    trainer = Trainer(ToyModule(), SkippyData(), collate_fn=skip_collate, out_dir=out_dir, cfg=cfg, seed=3,
                      accelerator=make_accelerator(out_dir, log=False))  # fmt: skip
    return trainer.train()


SKIP_SCRIPT = """
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
from test_trainer import run_skippy

run_skippy(Path(sys.argv[1]), int(sys.argv[2]))
"""


@pytest.mark.slow
def test_skip_counts_are_summed_over_processes(tmp_path):
    """2 processes (accelerate launch, DeepSpeed ZeRO-2 over gloo) on halves of each global batch count, in the
    saved state and the run's list of files, every sample either process dropped: what 1 process counts on the
    same global batches."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "skippy.py"
    script.write_text(SKIP_SCRIPT.format(tests=str(ROOT / "tests")))
    launcher = [*accelerate_launch(2), str(script), str(tmp_path / "two"), "4"]
    # A fresh torch extensions folder: DeepSpeed's CPU shm op would be compiled into it (a C++ build at every new
    # venv's first launch); fastslow.trainer.skip_deepspeed_cpu_shm_build keeps it empty.
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = subprocess.run(launcher, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(extensions.rglob("*.so")), "DeepSpeed compiled an op at start-up"
    one = run_skippy(tmp_path / "one", 8)  # 1 process, global batches of 8: the same samples in the same steps

    # What the 4 global batches hold (no local batch is all bad here, so no process reads an extra one).
    consumed = [i for batch in EpochBatches(40, 8, seed=3).epoch(0)[:4] for i in batch]
    halves = [EpochBatches(40, 4, seed=3, rank=r, world=2).epoch(0)[:4] for r in range(2)]
    assert sorted(i for h in halves for b in h for i in b) == sorted(consumed)
    assert all(any(i % BAD_EVERY != 3 for i in b) for h in halves for b in h)
    bad = [i for i in consumed if i % BAD_EVERY == 3]
    assert bad and all(any(i in b for b in halves[r] for i in bad) for r in range(2))  # both processes drop some
    expected = {}
    for i in bad:
        reason = "truncated image" if i % 2 else "missing file"
        expected[reason] = expected.get(reason, 0) + 1

    assert one.skipped == expected
    state = json.loads((tmp_path / "two" / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["skipped"] == expected
    listed = json.loads((tmp_path / "two" / "skipped_files.json").read_text())["files"]
    assert sorted(f["path"] for f in listed) == sorted(f"/data/bad_{i}.jpg" for i in bad)
    assert "summed over 2 processes" in proc.stdout
