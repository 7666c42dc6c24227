"""students.aux_heads (LightningDOT's VMLM / SMRM for the student) and the warm start (`student.init_from`).

Masking does what it says (count per row, uniform, never padding nor BOS/EOS), zero weights are plain InfoNCE bit
for bit, the exported student holds no auxiliary parameter and embeds exactly as a student loaded from the export,
and a second run starts from the first run's student (and refuses a student of another configuration).
Tiny real models (random weights) on a tiny generated shapes dataset.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastslow.artefacts import load_weights, read_safetensors
from fastslow.data import ImageLoader, PairDataset, collate, load_karpathy
from fastslow.data.shapes import generate_shapes
from fastslow.distill import DistillObjective
from fastslow.errors import CheckpointError
from fastslow.losses import ClipLoss
from fastslow.tokenizer import train_tokenizer
from fastslow.trainer import TrainConfig, Trainer, make_accelerator
from students import create_student
from students.aux_heads import StudentObjectives, sample_mask, text_mask_candidates

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN, IMAGE_SIZE = 16, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, seed=0, n_train=16, n_val_groups=1, n_test_groups=1, captions_per_image=2,
                    image_size=IMAGE_SIZE)  # fmt: skip
    train = load_karpathy(out / "dataset_shapes.json", out / "images", "train")
    tok = train_tokenizer(train.captions)
    return PairDataset(train, ImageLoader(IMAGE_SIZE), tok, MAX_LEN), tok


def image_student(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return create_student("dual_encoder_tiny", modality="image", vocab_size=tok.vocab_size, max_length=MAX_LEN,
                          image_size=IMAGE_SIZE, **kw)  # fmt: skip


def video_batch(student, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 6
    features = torch.randn(b, t, student.config.feature_dim, generator=g)
    frame_mask = torch.arange(t)[None] < torch.tensor([6, 4, 2, 1])[:, None]
    ids = torch.randint(3, student.config.vocab_size, (b, 8), generator=g)
    attention = torch.arange(8)[None] < torch.tensor([8, 6, 5, 3])[:, None]
    return {"features": features, "frame_mask": frame_mask, "input_ids": ids.masked_fill(~attention, 0),
            "attention_mask": attention.long(), "item_index": torch.arange(b)}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ masking


def test_each_row_masks_its_stated_share_of_eligible_positions_uniformly():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([40, 20, 7, 3, 1, 0])
    eligible = torch.arange(40)[None] < lengths[:, None]
    ratio = 0.15
    want = torch.tensor([6, 3, 1, 1, 1, 0])  # max(1, floor(0.15 n + 0.5)); none without an eligible position
    hits = torch.zeros(eligible.shape)
    draws = 2000
    for _ in range(draws):
        m = sample_mask(eligible, ratio, generator=g)
        assert torch.equal(m.sum(1), want)
        assert not (m & ~eligible).any()
        hits += m
    # Uniform over each row's eligible positions: the binomial sd of a frequency over 2,000 draws is <= 0.011, so
    # 0.05 is > 4 sd; a sampler that favoured the first positions (ineligible keys not pushed last, or no shuffle)
    # would put frequency 1 on them.
    freq = hits[0, :40] / draws
    assert (freq - 6 / 40).abs().max() < 0.05, freq
    with pytest.raises(ValueError, match="0, 1"):
        sample_mask(eligible, 0.0)


def test_vmlm_never_masks_bos_eos_or_padding(data):
    ds, tok = data
    batch = collate([ds[i] for i in range(8)])
    ids, attention = batch["input_ids"], batch["attention_mask"]
    cand = text_mask_candidates(ids, attention, (tok.bos_id, tok.eos_id, tok.pad_id))
    assert (attention.sum(1) > cand.sum(1) + 1).all()  # BOS and EOS of every caption are out
    g = torch.Generator().manual_seed(0)
    for ratio in (0.15, 1.0):  # at 1.0 every eligible word is masked: exactly the words, nothing else
        for _ in range(50):
            m = sample_mask(cand, ratio, generator=g)
            assert not m[ids == tok.bos_id].any() and not m[ids == tok.eos_id].any()
            assert not m[~attention.bool()].any()
        if ratio == 1.0:
            assert torch.equal(m, cand)


def test_losses_ignore_what_padding_holds(data):
    """The VMLM and SMRM losses (same seed) do not change when padded tokens / frames hold other values."""
    _, tok = data
    torch.manual_seed(0)
    student = create_student("dual_encoder_tiny", modality="video", vocab_size=tok.vocab_size, max_length=MAX_LEN)
    aux = StudentObjectives(student, vmlm_weight=1.0, smrm_weight=1.0, vmlm_mask_ratio=0.5, smrm_mask_ratio=0.5,
                            special_ids=(tok.bos_id, tok.eos_id, tok.pad_id))  # fmt: skip
    student.eval()
    batch = video_batch(student)
    other = dict(batch)
    other["features"] = torch.where(batch["frame_mask"][..., None], batch["features"], 1e3)
    other["input_ids"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7)
    losses = []
    for b in (batch, other):
        torch.manual_seed(1)
        v = student.encode_visual(b["features"], b["frame_mask"])
        t = student.encode_text(b["input_ids"], b["attention_mask"])
        losses.append(aux(student, b, v, t))
    assert set(losses[0]) == {"vmlm_loss", "smrm_loss"}
    for k in losses[0]:
        assert torch.isfinite(losses[0][k]) and losses[0][k] > 0
        torch.testing.assert_close(losses[0][k], losses[1][k])


# ------------------------------------------------------------------------------------------- loss and gradients


def test_zero_weights_are_plain_infonce_bit_for_bit(data):
    ds, tok = data
    student = image_student(tok).eval()
    batch = collate([ds[i] for i in range(8)])
    aux = StudentObjectives(student, vmlm_weight=0.0, smrm_weight=0.0)
    assert not list(aux.parameters())  # a zero weight builds no head
    torch.manual_seed(3)
    out = DistillObjective(student, aux=aux)(batch)
    torch.manual_seed(3)
    v = student.encode_visual(batch["pixels"])
    t = student.encode_text(batch["input_ids"], batch["attention_mask"])
    want = ClipLoss()(v, t, student.inverse_temperature(), batch["item_index"])["contrastive_loss"]
    assert set(out) == {"loss", "contrastive_loss"}
    assert torch.equal(out["loss"], want)


@pytest.mark.parametrize("modality", ["image", "video"])
def test_each_term_trains_its_heads_and_both_towers(data, modality):
    ds, tok = data
    if modality == "image":
        student = image_student(tok)
        batch = collate([ds[i] for i in range(8)])
    else:
        torch.manual_seed(0)
        student = create_student("dual_encoder_tiny", modality="video", vocab_size=tok.vocab_size, max_length=MAX_LEN)
        batch = video_batch(student)
    for term in ("vmlm", "smrm"):
        aux = StudentObjectives(student, **{f"{term}_weight": 1.0}, special_ids=(tok.bos_id, tok.eos_id, tok.pad_id))
        objective = DistillObjective(student, contrastive_weight=0.0, aux=aux)
        student.zero_grad(set_to_none=True)
        out = objective(batch)
        assert set(out) == {"loss", "contrastive_loss", f"{term}_loss"}
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux.parameters()), term
        for tower in (student.text, student.visual):  # the injected embedding carries gradient to the other tower
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters()), term


# ------------------------------------------------------------------------------------------------------ export


def test_exported_student_has_no_aux_parameters_and_embeds_as_loaded(data, tmp_path):
    ds, tok = data
    student = image_student(tok)
    aux = StudentObjectives(student, vmlm_weight=1.0, smrm_weight=1.0, special_ids=(tok.bos_id, tok.eos_id))
    cfg = TrainConfig(max_steps=3, batch_size=8, lr=1e-3, warmup_steps=1, save_every=3, log_every=1, eval_every=0)
    trainer = Trainer(DistillObjective(student, aux=aux), ds, collate_fn=collate, out_dir=tmp_path, cfg=cfg,
                      accelerator=make_accelerator(tmp_path, log=False), checkpoint_objects=[aux])  # fmt: skip
    before = {k: v.clone() for k, v in aux.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in aux.state_dict().items())  # the heads did train
    weights = tmp_path / "model.safetensors"
    state = read_safetensors(weights, "rerun the test")
    plain = image_student(tok, seed=1)
    assert set(state) == set(plain.state_dict())
    load_weights(plain, state, path=weights, name="student", fix="-")
    trained = trainer.unwrapped().model.eval()
    plain.eval()
    batch = collate([ds[i] for i in range(8)])
    with torch.no_grad():
        assert torch.equal(trained.encode_image(batch["pixels"]), plain.encode_image(batch["pixels"]))
        text = (batch["input_ids"], batch["attention_mask"])
        assert torch.equal(trained.encode_text(*text), plain.encode_text(*text))
    # The heads are resumable: their weights are a checkpoint object beside the student's.
    ckpt = sorted((tmp_path / "checkpoints").iterdir())[-1]
    saved = read_safetensors(ckpt / "object_0.safetensors", "-")
    assert set(saved) == set(aux.state_dict()) and all(torch.equal(saved[k], v) for k, v in aux.state_dict().items())


# -------------------------------------------------------------------------------------------- warm start (tool)


def _distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "distill.py"), "recipe=smoke", *args], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A VMLM + SMRM pre-training run of the smoke recipe (no teacher: loss.distill=none)."""
    out = tmp_path_factory.mktemp("pre")
    proc = _distill(f"output_dir={out}", "loss.distill=none", "loss.vmlm_weight=1", "loss.smrm_weight=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_tool_exports_a_plain_student_after_aux_pretraining(pretrained):
    from fastslow import stages

    student, cfg, tok = stages.load_trained(pretrained / "student", "student")
    plain = stages.build_student(cfg, tok)
    assert set(read_safetensors(pretrained / "student" / "model.safetensors", "-")) == set(plain.state_dict())


def test_warm_start_loads_the_first_runs_student_and_refuses_another_config(pretrained):
    from fastslow import stages
    from fastslow.config import load_recipe
    from fastslow.tokenizer import TextTokenizer

    source = pretrained / "student"
    tok = TextTokenizer.from_file(pretrained / "tokenizer.json")
    cfg = load_recipe(["recipe=smoke", f"output_dir={pretrained}", f"student.init_from={source}"])
    student = stages.build_student(cfg, tok)
    stages.init_student_from(student, cfg, cfg.student.init_from)
    saved = read_safetensors(source / "model.safetensors", "-")
    assert all(torch.equal(saved[k], v) for k, v in student.state_dict().items())

    other = load_recipe(["recipe=smoke", f"output_dir={pretrained}", f"student.init_from={source}",
                         "student.embed_dim=16"])  # fmt: skip
    with pytest.raises(CheckpointError, match=r"student\.embed_dim: 32 there, 16 here"):
        stages.init_student_from(stages.build_student(other, tok), other, other.student.init_from)


def test_second_run_starts_from_the_first(pretrained, tmp_path):
    """The pipeline of the issue: pre-train with the aux terms, then a run warm-started from that student."""
    proc = _distill(f"output_dir={tmp_path}", "loss.distill=none", f"student.init_from={pretrained / 'student'}",
                    "train.max_steps=1")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"student initialised from {pretrained / 'student'}" in proc.stdout
