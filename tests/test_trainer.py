"""The shared training loop: exact resume, atomic checkpoints, loud failure, schedule."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastslow.trainer import EpochBatches, TrainConfig, Trainer, list_checkpoints, make_accelerator, warmup_cosine


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


def run(out_dir, max_steps, resume="auto", save_every=3, grad_accum=1, poison_step=None, on_step_end=None):
    torch.manual_seed(0)
    cfg = TrainConfig(
        max_steps=max_steps,
        batch_size=8,
        lr=1e-2,
        warmup_steps=2,
        grad_accum=grad_accum,
        save_every=save_every,
        keep_last=2,
        resume=resume,
        log_every=2,
        eval_every=0,
    )
    trainer = Trainer(
        ToyModule(poison_step),
        ToyData(),
        collate_fn=collate,
        out_dir=out_dir,
        cfg=cfg,
        seed=3,
        accelerator=make_accelerator(out_dir, grad_accum, log=False),
        on_step_end=on_step_end,
    )
    trainer.train()
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
