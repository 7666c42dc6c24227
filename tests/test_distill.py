"""Tests for fastslow.distill: the frozen teacher's pair scorer and its token store, the batcher that attaches teacher
targets (in-batch and listwise over mined candidates, through the score cache), the candidate miner's resumable bank
and the InfoNCE + KL objective. Tiny real models (random weights) on a tiny generated shapes dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastslow.data import ImageLoader, PairDataset, collate, load_karpathy
from fastslow.data.shapes import generate_shapes
from fastslow.distill import (
    CandidateMiner,
    DistillBatcher,
    DistillObjective,
    GroupComposer,
    TeacherPairScorer,
    group_mask,
    split_hash,
)
from fastslow.errors import StaleArtefactError
from fastslow.evaluation import encode_texts_student
from fastslow.losses import ClipLoss
from fastslow.mining import inbatch_candidates, listwise_candidates
from fastslow.score_cache import TeacherScoreCache
from fastslow.tokenizer import train_tokenizer
from students import create_student
from teachers import TokenStore, create_teacher

MAX_LEN = 16
IMAGE_SIZE = 32
K = 3
# Texts of one batch; with 2 captions per image, texts 0 and 1 share item 0 (a repeated item in the batch).
BATCH_TEXTS = [0, 1, 5, 9, 14, 20, 33, 47]


@pytest.fixture(scope="module")
def data_dir(data):
    return data[0].item_paths[0].rsplit("/images/", 1)[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(
        out, seed=0, n_train=24, n_val_groups=1, n_test_groups=1, captions_per_image=2, image_size=IMAGE_SIZE
    )
    train = load_karpathy(out / "dataset_shapes.json", out / "images", "train")
    assert train.n_items == 24 and train.n_texts == 48
    return train, ImageLoader(IMAGE_SIZE), train_tokenizer(train.captions)


def make_teacher(tok, seed=0):
    torch.manual_seed(seed)
    return create_teacher(
        "captioner_tiny", modality="image", vocab_size=tok.vocab_size, max_length=MAX_LEN, image_size=IMAGE_SIZE
    )


def make_student(tok, seed=0):
    torch.manual_seed(seed)
    return create_student(
        "dual_encoder_tiny", modality="image", vocab_size=tok.vocab_size, max_length=MAX_LEN, image_size=IMAGE_SIZE
    )


@pytest.fixture(scope="module")
def teacher(data):
    """A briefly trained teacher, left as a trainer leaves it (train mode, trainable).

    At random init its scores hardly depend on the item (spread over items ~2e-3 per text, the size of the fp16
    tolerance); 80 steps make the spread ~0.1, so a test that mixed items up would fail.
    """
    train, loader, tok = data
    teacher = make_teacher(tok).train()
    pixels = torch.stack([loader(train.item_paths[i]) for i in train.text_to_visual])
    ids, mask = tok.encode(train.captions, MAX_LEN)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(80):
        loss = teacher.loss(teacher.encode_visual(pixels), ids, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher


@pytest.fixture(scope="module")
def teacher_state_before(teacher):
    return teacher.training, all(p.requires_grad for p in teacher.parameters())


@pytest.fixture(scope="module")
def scorer(data, teacher, teacher_state_before, tmp_path_factory):
    train, loader, tok = data
    store_dir = tmp_path_factory.mktemp("scorer") / "tokens"
    return TeacherPairScorer(teacher, "hashA", train, loader, tok, MAX_LEN, store_dir)


@pytest.fixture(scope="module")
def student(data):
    return make_student(data[2])


@pytest.fixture(scope="module")
def miner(data, student):
    train, loader, tok = data
    m = CandidateMiner(train, loader, tok, MAX_LEN, k=K)
    student.train()
    m.refresh(student)
    assert student.training  # refresh restores the mode it found
    return m


def make_batch(data, texts=BATCH_TEXTS):
    train, loader, tok = data
    ds = PairDataset(train, loader, tok, MAX_LEN)
    return collate([ds[i] for i in texts])


def pairwise(scorer, texts, items):
    """[T, U] from aligned-pair calls of the scorer (the reference for the all-pairs paths)."""
    t, u = len(texts), len(items)
    return scorer(texts.repeat_interleave(u), items.repeat(t)).view(t, u)


def new_cache(path, train, source):
    return TeacherScoreCache(
        path, teacher_hash="hashA", source=source, dataset_hash=split_hash(train), n_items=train.n_items
    )


# ------------------------------------------------------------------------------------------------ TeacherPairScorer


def test_scorer_builds_the_token_store_of_the_split_items(data, scorer):
    train = data[0]
    store = TokenStore.open(scorer.store_dir)
    assert store.ids == train.item_ids
    assert store.meta["meta"] == {"teacher_hash": "hashA", "split_hash": split_hash(train)}


def test_scorer_matches_the_teacher_on_fresh_visual_tokens(data, scorer, teacher):
    train, loader, tok = data
    gen = torch.Generator().manual_seed(0)
    text_idx = torch.arange(0, train.n_texts, 3)
    item_idx = torch.randint(0, train.n_items, (len(text_idx),), generator=gen)
    item_idx[::4] = torch.as_tensor(train.text_to_visual)[text_idx[::4]]  # some positives among them
    got = scorer(text_idx, item_idx)

    with torch.no_grad():
        visual = teacher.encode_visual(torch.stack([loader(train.item_paths[i]) for i in item_idx]))
        ids, mask = tok.encode([train.captions[t] for t in text_idx], MAX_LEN)  # padded to this subset only
        want = teacher.score_pairs(visual, ids, mask).float()
    assert got.dtype == torch.float32 and got.shape == (len(text_idx),)
    assert want.std() > 1e-2  # the pairs score differently, so a mix-up of pairs would show
    block = scorer.block(text_idx, torch.arange(train.n_items))
    assert (block.amax(1) - block.amin(1)).min() > 10 * 2e-3  # so would a mix-up of items, at this tolerance
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_scorer_block_equals_pairwise_scores(data, scorer):
    texts, items = torch.tensor([0, 7, 8, 30, 41]), torch.tensor([3, 0, 23, 11])
    block = scorer.block(texts, items)
    assert block.shape == (5, 4) and block.dtype == torch.float32
    torch.testing.assert_close(block, pairwise(scorer, texts, items), atol=1e-4, rtol=0)


def test_scorer_freezes_the_teacher(scorer, teacher, teacher_state_before):
    assert teacher_state_before == (True, True)  # the fixture handed over a trainable teacher in train mode
    assert scorer.teacher is teacher
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_scorer_reuses_the_store_of_the_same_teacher_and_rebuilds_for_another(data, tmp_path):
    train, loader, tok = data
    teacher = make_teacher(tok)
    store_dir = tmp_path / "tokens"

    def stamp():
        st = os.stat(store_dir / "tokens.npy")
        return st.st_ino, st.st_mtime_ns, TokenStore.open(store_dir).meta["meta"]["teacher_hash"]

    TeacherPairScorer(teacher, "hashA", train, loader, tok, MAX_LEN, store_dir)
    first = stamp()
    TeacherPairScorer(teacher, "hashA", train, loader, tok, MAX_LEN, store_dir)
    assert stamp() == first  # same file, not rewritten
    TeacherPairScorer(teacher, "hashB", train, loader, tok, MAX_LEN, store_dir)
    rebuilt = stamp()
    assert rebuilt[2] == "hashB" and rebuilt[:2] != first[:2]


def test_train_token_store_is_stamped_with_the_image_size(data, tmp_path):
    """The tokens of an item depend on the size it was read at: a store built at data.image_size=32 is rebuilt by a
    run at another size (same teacher, same split), and refused by a reader that expects 32."""
    train, loader, tok = data
    teacher = make_teacher(tok)
    store_dir = tmp_path / "tokens"
    at_32 = TeacherPairScorer(teacher, "hashA", train, loader, tok, MAX_LEN, store_dir,
                              settings={"data.image_size": 32})  # fmt: skip
    assert TokenStore.open(store_dir).meta["meta"]["data.image_size"] == 32
    inode = os.stat(store_dir / "tokens.npy").st_ino
    TeacherPairScorer(teacher, "hashA", train, loader, tok, MAX_LEN, store_dir, settings={"data.image_size": 48})
    assert os.stat(store_dir / "tokens.npy").st_ino != inode  # rebuilt, not reused
    with pytest.raises(StaleArtefactError, match="data.image_size: saved 48, now 32"):
        at_32.store  # noqa: B018 - every process opens the store checked against the stamp it expects


# ------------------------------------------------------------------------------------------------ DistillBatcher


def test_inbatch_batcher_attaches_teacher_block_and_mask(data, scorer, tmp_path):
    train = data[0]
    batch = make_batch(data)
    text, item = batch["text_index"].clone(), batch["item_index"].clone()
    b = len(text)
    assert item[0] == item[1]  # the batch repeats an item, so the mask is not all ones
    batcher = DistillBatcher("inbatch", scorer, new_cache(tmp_path / "cache", train, "inbatch"))
    out = batcher(batch, step=0)
    assert out["inbatch_teacher"].shape == (b, b) and out["inbatch_teacher"].dtype == torch.float32
    torch.testing.assert_close(out["inbatch_teacher"], pairwise(scorer, text, item), atol=1e-4, rtol=0)
    assert torch.equal(out["inbatch_mask"], inbatch_candidates(item))
    assert not out["inbatch_mask"].all()
    assert batcher.pairs_scored == b * b


def test_inbatch_batcher_reads_the_cache_on_a_second_call(data, scorer, tmp_path):
    train = data[0]
    batcher = DistillBatcher("inbatch", scorer, new_cache(tmp_path / "cache", train, "inbatch"))
    first = batcher(make_batch(data), step=0)["inbatch_teacher"].clone()
    scored = batcher.pairs_scored
    assert scored > 0
    second = batcher(make_batch(data), step=1)["inbatch_teacher"]
    assert batcher.pairs_scored == scored  # no new teacher call
    assert torch.equal(second, first)
    # A later run (new batcher, cache reopened from disk) scores nothing either.
    later = DistillBatcher("inbatch", scorer, new_cache(tmp_path / "cache", train, "inbatch"))
    assert torch.equal(later(make_batch(data), step=0)["inbatch_teacher"], first)
    assert later.pairs_scored == 0
    # Without a cache, every call scores again (so the counter above can tell the difference).
    online = DistillBatcher("inbatch", scorer)
    online(make_batch(data), step=0)
    online(make_batch(data), step=1)
    assert online.pairs_scored == 2 * scored


def test_miner_bank_is_the_students_item_embeddings_and_its_top_k(data, student, miner):
    train, loader, tok = data
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            items = student.encode_image(torch.stack([loader(p) for p in train.item_paths]))
        texts = encode_texts_student(student, tok, train.captions, max_length=MAX_LEN)
    finally:
        student.train(was_training)
    assert miner.item_emb.shape == (train.n_items, items.shape[1])
    torch.testing.assert_close(miner.item_emb, items, atol=1e-5, rtol=0)
    scores = texts @ items.T
    scores[torch.arange(train.n_texts), torch.as_tensor(train.text_to_visual)] = -torch.inf  # positives excluded
    assert miner.mined.shape == (train.n_texts, K)
    assert torch.equal(miner.mined, scores.topk(K, dim=1).indices)


def test_listwise_batcher_attaches_scores_mask_and_bank_rows(data, scorer, miner, tmp_path):
    train = data[0]
    batch = make_batch(data)
    text, item = batch["text_index"].clone(), batch["item_index"].clone()
    b = len(text)
    batcher = DistillBatcher("listwise", scorer, new_cache(tmp_path / "cache", train, "listwise"), miner)
    out = batcher(batch, step=0)
    teacher, mask, emb = out["listwise_teacher"], out["listwise_mask"], out["listwise_emb"]
    assert teacher.shape == (b, K + 1) and mask.shape == (b, K + 1) and emb.shape == (b, K + 1, miner.item_emb.shape[1])

    cand, want_mask = listwise_candidates(miner.mined[text], item)
    assert torch.equal(mask, want_mask)
    assert torch.equal(cand[:, 0], item)  # column 0 is the batch's own item
    torch.testing.assert_close(teacher[:, 0], scorer(text, item), atol=1e-4, rtol=0)  # the positive's score
    rows = text[:, None].expand_as(cand)
    torch.testing.assert_close(teacher[mask], scorer(rows[mask], cand[mask]), atol=1e-4, rtol=0)
    assert torch.equal(emb, miner.item_emb[cand])
    assert not emb.requires_grad

    scored = batcher.pairs_scored
    assert scored == int(mask.sum())
    again = batcher(make_batch(data), step=1)["listwise_teacher"]
    assert batcher.pairs_scored == scored and torch.equal(again, teacher)


def test_listwise_batcher_masks_padding_when_the_gallery_is_smaller_than_k(data, scorer, student):
    train, loader, tok = data
    big = CandidateMiner(train, loader, tok, MAX_LEN, k=train.n_items + 2)  # more than the 23 negatives there are
    big.refresh(student)
    out = DistillBatcher("listwise", scorer, None, big)(make_batch(data), step=0)
    mask = out["listwise_mask"]
    assert mask.shape[1] == train.n_items + 3
    assert (mask.sum(1) == train.n_items).all()  # the positive + every other item, padding masked
    assert (out["listwise_teacher"][~mask] == 0).all()


def test_miner_state_dict_round_trips_the_bank(data, miner, tmp_path):
    train, loader, tok = data
    path = tmp_path / "miner.safetensors"
    save_file(miner.state_dict(), str(path))  # what the trainer does with its checkpoint_objects
    resumed = CandidateMiner(train, loader, tok, MAX_LEN, k=K)
    assert resumed.state_dict() == {}
    resumed.load_state_dict(load_file(str(path)))
    assert torch.equal(resumed.item_emb, miner.item_emb)
    assert torch.equal(resumed.mined, miner.mined)
    assert resumed.rounds == miner.rounds == 1
    text = torch.tensor(BATCH_TEXTS)
    for got, want in zip(resumed.candidates(text), miner.candidates(text)):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------ DistillObjective


def test_objective_without_teacher_keys_is_the_clip_loss(data, student):
    batch = make_batch(data)
    student.eval()  # deterministic forward passes to compare
    out = DistillObjective(student, contrastive_weight=2.0)(batch)
    with torch.no_grad():
        v = student.encode_visual(batch["pixels"])
        t = student.encode_text(batch["input_ids"], batch["attention_mask"])
        want = ClipLoss()(v, t, student.inverse_temperature(), batch["item_index"])["contrastive_loss"]
    assert set(out) == {"loss", "contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"].detach(), want)
    torch.testing.assert_close(out["loss"].detach(), 2.0 * want)


def test_listwise_term_alone_reaches_both_towers(data, scorer, miner, student):
    batch = DistillBatcher("listwise", scorer, None, miner)(make_batch(data), step=0)
    student.train()
    student.zero_grad(set_to_none=True)
    out = DistillObjective(student, contrastive_weight=0.0)(batch)  # only the KL term carries gradient
    assert out["listwise_distill_loss"] > 1e-4
    out["loss"].backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    # The image tower's gradient can only come through the fresh positive in column 0 (the bank has none).
    assert has_grad(student.text) and has_grad(student.visual)
    student.zero_grad(set_to_none=True)


def student_listwise_scores(student, batch):
    """The student's listwise scores as the objective builds them: fresh text vs [fresh positive, bank negatives]."""
    with torch.no_grad():
        v = student.encode_visual(batch["pixels"])
        t = student.encode_text(batch["input_ids"], batch["attention_mask"])
        cand = torch.cat([v[:, None], batch["listwise_emb"][:, 1:]], dim=1)
        return torch.einsum("be,bke->bk", t, cand), t, v, student.inverse_temperature()


def test_listwise_distill_loss_is_zero_when_teacher_equals_the_scaled_student(data, scorer, miner, student):
    batch = DistillBatcher("listwise", scorer, None, miner)(make_batch(data), step=0)
    student.eval()
    s, _, _, scale = student_listwise_scores(student, batch)
    mask = batch["listwise_mask"]
    assert (mask.sum(1) >= 2).all()
    objective = DistillObjective(student, teacher_temperature=1.0, student_temperature=None)

    batch["listwise_teacher"] = (s * scale).masked_fill(~mask, 1e4)  # masked slots must not count
    assert objective(batch)["listwise_distill_loss"].abs() < 1e-6
    batch["listwise_teacher"] = (s * scale).flip(1)  # another ranking: the loss must see it
    assert objective(batch)["listwise_distill_loss"] > 1e-3


def test_inbatch_distill_loss_is_zero_when_teacher_equals_the_scaled_student(data, student):
    batch = make_batch(data)
    student.eval()
    with torch.no_grad():
        v = student.encode_visual(batch["pixels"])
        t = student.encode_text(batch["input_ids"], batch["attention_mask"])
        scaled = (t @ v.T) * student.inverse_temperature()
    batch["inbatch_teacher"], batch["inbatch_mask"] = scaled, inbatch_candidates(batch["item_index"])
    objective = DistillObjective(student, teacher_temperature=1.0, student_temperature=None)
    assert objective(batch)["inbatch_distill_loss"].abs() < 1e-6
    batch["inbatch_teacher"] = scaled.T.contiguous()
    assert objective(batch)["inbatch_distill_loss"] > 1e-3


# ------------------------------------------------------------------------------------------------ modes


def test_unknown_mode_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="bogus") as err:
        DistillBatcher("bogus")
    assert all(mode in str(err.value) for mode in ("none", "inbatch", "listwise"))


def test_mode_none_leaves_the_batch_alone(data):
    batch = make_batch(data)
    keys = set(batch)
    assert DistillBatcher("none")(batch, step=0) is batch and set(batch) == keys


def test_bank_positive_keeps_the_listwise_term_off_the_visual_tower(data, scorer, miner, student):
    batch = DistillBatcher("listwise", scorer, None, miner)(make_batch(data), step=0)
    student.train()
    student.zero_grad(set_to_none=True)
    out = DistillObjective(student, contrastive_weight=0.0, fresh_positive=False)(batch)
    out["loss"].backward()
    text_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.text.parameters())
    visual_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.visual.parameters())
    assert text_grad and not visual_grad  # every candidate, the positive included, is a bank row
    student.zero_grad(set_to_none=True)


def test_inbatch_rows_limits_teacher_targets_to_the_first_captions(data, scorer):
    batch = make_batch(data)
    b = len(batch["text_index"])
    batcher = DistillBatcher("inbatch", scorer, None, inbatch_rows=3)
    out = batcher(dict(batch), step=0)
    assert batcher.pairs_scored == 3 * b  # the teacher saw only 3 rows x B items
    assert not out["inbatch_mask"][3:].any() and out["inbatch_mask"][:3].any()
    full = DistillBatcher("inbatch", scorer, None)(dict(batch), step=0)
    torch.testing.assert_close(out["inbatch_teacher"][:3], full["inbatch_teacher"][:3], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ group batches


def make_composer(data, miner, group_size=3, seed=0):
    train, loader, tok = data
    return GroupComposer(train, PairDataset(train, loader, tok, MAX_LEN), miner, group_size, seed)


def test_group_batches_hold_each_anchors_mined_neighbours(data, miner):
    train = data[0]
    composer = make_composer(data, miner, group_size=3)
    anchors = make_batch(data, BATCH_TEXTS[:4])
    batch, group = composer.compose(anchors, step=7)
    assert len(batch["text_index"]) == 4 * 3 and group.tolist() == [0, 1, 2, 3] + [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(batch["text_index"][:4], torch.tensor(BATCH_TEXTS[:4]))
    for row in range(4, 12):
        a = int(group[row])
        anchor_text = BATCH_TEXTS[a]
        item = int(batch["item_index"][row])
        assert item in miner.mined[anchor_text].tolist()  # a neighbour the student mined for this anchor
        assert item != train.text_to_visual[anchor_text]
        assert train.text_to_visual[int(batch["text_index"][row])] == item  # one of that item's own captions
    # The two neighbours of one anchor are distinct items; the draw is deterministic per step.
    for a in range(4):
        rows = (group == a).nonzero().flatten()
        assert len(set(batch["item_index"][rows].tolist())) == 3
    again, _ = composer.compose(make_batch(data, BATCH_TEXTS[:4]), step=7)
    other, _ = composer.compose(make_batch(data, BATCH_TEXTS[:4]), step=8)
    assert torch.equal(again["text_index"], batch["text_index"])
    assert not torch.equal(other["text_index"], batch["text_index"])


def test_group_batches_search_the_bank_with_live_anchor_embeddings(data, miner, student):
    train, loader, tok = data
    composer = GroupComposer(train, PairDataset(train, loader, tok, MAX_LEN), miner, 3, 0, student=student)
    anchors = make_batch(data, BATCH_TEXTS[:4])
    student.train()
    pool = composer.pool(anchors)
    assert student.training  # the search ran in eval mode and gave the mode back
    # The same as the miner's own top-K for these captions: the bank holds the same student's embeddings.
    assert torch.equal(pool, miner.mined[torch.tensor(BATCH_TEXTS[:4])])
    batch, group = composer.compose(make_batch(data, BATCH_TEXTS[:4]), step=1)
    for row in range(4, 12):
        assert int(batch["item_index"][row]) in pool[int(group[row])].tolist()


def test_group_batches_before_mining_use_random_other_items(data, student):
    train, loader, tok = data
    fresh = CandidateMiner(train, loader, tok, MAX_LEN, k=K)  # never refreshed: nothing mined yet
    batch, group = make_composer(data, fresh).compose(make_batch(data, BATCH_TEXTS[:4]), step=0)
    assert len(batch["text_index"]) == 12
    for row in range(4, 12):
        assert int(batch["item_index"][row]) != train.text_to_visual[BATCH_TEXTS[int(group[row])]]


def test_group_mask_keeps_each_rows_group_and_each_item_once():
    group = torch.tensor([0, 1, 0, 0, 1, 1])
    item = torch.tensor([5, 7, 8, 5, 9, 9])  # row 3 repeats row 0's item in group 0; rows 4, 5 share item 9
    m = group_mask(group, item)
    assert m[0].tolist() == [True, False, True, False, False, False]  # row 3 holds row 0's own item: dropped
    assert m[3].tolist() == [False, False, True, True, False, False]  # own column kept, the copy of it dropped
    assert m[1].tolist() == [False, True, False, False, True, False]  # item 9 once (its first column)
    assert m[5].tolist() == [False, True, False, False, False, True]


def test_group_batcher_scores_each_group_and_reuses_the_cache_bit_for_bit(data, scorer, miner, tmp_path):
    train = data[0]
    cache = new_cache(tmp_path / "cache", train, "group")
    batcher = DistillBatcher("group", scorer, cache, miner, composer=make_composer(data, miner))
    out = batcher(make_batch(data, BATCH_TEXTS[:4]), step=3)
    mask, scores = out["inbatch_mask"], out["inbatch_teacher"]
    assert torch.equal(mask, group_mask(out["group"], out["item_index"]))
    i, j = mask.nonzero(as_tuple=True)
    unique_pairs = len(set(zip(out["text_index"][i].tolist(), out["item_index"][j].tolist())))
    assert int(mask.sum()) == 12 * 3  # every row against its group's 3 items
    assert batcher.pairs_scored == unique_pairs and batcher.cache_hits == 36 - unique_pairs
    want = scorer(out["text_index"][i], out["item_index"][j])
    torch.testing.assert_close(scores[i, j], want, atol=1e-4, rtol=0)
    assert (scores[~mask] == 0).all()
    # The same step again (a resumed run, another seed's run on the same cache): every pair from the cache.
    later = DistillBatcher("group", scorer, new_cache(tmp_path / "cache", train, "group"), miner,
                           composer=make_composer(data, miner))  # fmt: skip
    again = later(make_batch(data, BATCH_TEXTS[:4]), step=3)
    assert later.pairs_scored == 0 and later.cache_hits == 36
    assert torch.equal(again["inbatch_teacher"], scores)


def test_denoising_drops_teacher_rated_matches_from_infonce(data, student):
    batch = make_batch(data)
    student.eval()
    b = len(batch["item_index"])
    mask = inbatch_candidates(batch["item_index"])
    teacher = torch.full((b, b), -10.0)
    teacher.fill_diagonal_(0.0)
    teacher[2, 3] = -0.2  # within a margin of 0.5 of text 2's positive: a match by the teacher
    batch["inbatch_teacher"], batch["inbatch_mask"] = teacher, mask
    kw = dict(teacher_norm="length", distill_weight=0.0)
    plain = DistillObjective(student, **kw)(dict(batch))
    denoised = DistillObjective(student, denoise_margin=0.5, **kw)(dict(batch))
    assert denoised["denoised_negatives"] == 1
    with torch.no_grad():
        v = student.encode_visual(batch["pixels"])
        t = student.encode_text(batch["input_ids"], batch["attention_mask"])
        exclude = torch.zeros(b, b, dtype=torch.bool)
        exclude[2, 3] = True
        want = ClipLoss()(v, t, student.inverse_temperature(), batch["item_index"], exclude=exclude)
    torch.testing.assert_close(denoised["contrastive_loss"], want["contrastive_loss"])
    assert not torch.allclose(denoised["contrastive_loss"], plain["contrastive_loss"])


def test_margin_mse_by_hand(student):
    objective = DistillObjective(student, teacher_temperature=2.0, student_temperature=0.5, margin_mse_weight=1.0)
    s = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.4, 0.0], [0.0, 0.0, 0.3]])
    t = torch.tensor([[0.0, -2.0, -6.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])  # row 2: no diagonal
    # Row 0, candidate 1: student margin (1 - 0.5) / 0.5 = 1, teacher (0 + 2) / 2 = 1 -> 0.
    # Row 1, candidate 0: (0.4 - 0.2) / 0.5 = 0.4, teacher (0 + 1) / 2 = 0.5 -> 0.01.
    # Row 1, candidate 2: 0.8, teacher 0 -> 0.64.
    got = objective._margin_mse(s, t, mask, scale=None)
    assert got.item() == pytest.approx((0 + 0.01 + 0.64) / 3, abs=1e-6)


def test_oracle_scores_each_caption_true_of_its_own_item_and_not_of_most_others(data, data_dir):
    from fastslow.data.shapes import GroundTruth
    from fastslow.distill import OracleScorer

    train = data[0]
    truth = GroundTruth(f"{data_dir}/shapes_meta.json", train.item_ids, train.text_to_visual)
    oracle = OracleScorer(truth, penalty=20.0)
    texts = torch.arange(train.n_texts)
    own = oracle(texts, torch.as_tensor(train.text_to_visual))
    assert (own == 0).all()
    block = oracle.block(texts, torch.arange(train.n_items))
    assert set(block.unique().tolist()) == {0.0, -20.0}
    # Partial captions fit other scenes too, full ones mostly do not: some but not all off-diagonal pairs fit.
    fits_other = (block == 0).sum().item() - train.n_texts
    assert 0 < fits_other < train.n_texts * (train.n_items - 1) / 2


def test_oracle_judges_swapped_captions_by_their_words(data, data_dir):
    """The oracle's swap targets: a swapped caption is parsed and checked against the scene, not looked up."""
    from fastslow.data.shapes import GroundTruth, caption_fits, parse_caption
    from fastslow.distill import OracleScorer

    train, _, tok = data
    truth = GroundTruth(f"{data_dir}/shapes_meta.json", train.item_ids, train.text_to_visual)
    oracle = OracleScorer(truth, penalty=20.0, tokenizer=tok)
    scene = truth.scenes[0]
    a = scene["objects"][0]
    true_text = f"a {a['size']} {a['color']} {a['shape']}"
    wrong_size = f"a {'small' if a['size'] == 'large' else 'large'} {a['color']} {a['shape']}"
    texts = [true_text, wrong_size, "a red small circle"]  # the last one is outside the grammar: true of nothing
    ids, mask = tok.encode(texts, MAX_LEN)
    got = oracle.score_ids(ids, mask, torch.zeros(len(texts), dtype=torch.long))
    assert got[0] == 0.0 and got[2] == -20.0
    # wrong_size is false unless another object of that colour and shape has the other size
    other = [o for o in scene["objects"] if o is not a and (o["color"], o["shape"]) == (a["color"], a["shape"])]
    assert (got[1] == 0.0) == any(o["size"] != a["size"] for o in other)
    assert (got[1] == 0.0) == caption_fits(parse_caption(wrong_size), scene)


def test_parse_caption_inverts_every_generated_caption(data_dir):
    import json

    from fastslow.data.shapes import canonicalize, caption_text, parse_caption

    meta = json.loads(Path(f"{data_dir}/shapes_meta.json").read_text())
    specs = [c["spec"] for e in meta["images"] for c in e["captions"]]
    assert len(specs) > 40
    for spec in specs:
        assert canonicalize(parse_caption(caption_text(spec))) == canonicalize(spec), caption_text(spec)
    for text in ("a red small circle", "a shape", "an small circle", "a small red circle left of", "", "a blue"):
        assert parse_caption(text) is None, text


def test_swap_negatives_are_scored_by_the_teacher_against_the_captions_own_item(data, scorer, student):
    batch = make_batch(data)
    batcher = DistillBatcher("inbatch", scorer, None, inbatch_rows=0, swaps=3, seed=0, swap_rows=5)
    out = batcher(batch, step=5)
    b = 5  # rows with swaps: the first 5 of the batch
    assert out["swap_ids"].shape[:2] == (b, 3) and out["swap_teacher"].shape == out["swap_mask"].shape == (b, 4)
    assert out["swap_mask"][:, 0].all()  # the caption itself always counts
    own = scorer(out["text_index"][:b], out["item_index"][:b])
    torch.testing.assert_close(out["swap_teacher"][:, 0], own, atol=1e-4, rtol=0)
    r, p = out["swap_mask"][:, 1:].nonzero(as_tuple=True)
    width = out["swap_ids"].shape[2]
    want = scorer.score_ids(out["swap_ids"][r, p], out["attention_mask"][r, :width], out["item_index"][r])
    torch.testing.assert_close(out["swap_teacher"][:, 1:][r, p], want)
    # The objective's term: zero when the teacher's scores are the student's own scaled ones, positive otherwise.
    student.eval()
    objective = DistillObjective(student, teacher_norm="length", student_temperature=0.1)
    with torch.no_grad():
        v = student.encode_visual(out["pixels"])
        t = student.encode_text(out["input_ids"], out["attention_mask"])
        swap_mask = out["attention_mask"][:b].repeat_interleave(3, 0)
        ts = student.encode_text(out["swap_ids"].reshape(b * 3, width), swap_mask)
        t, v = t[:b], v[:b]
        s = torch.cat([(t * v).sum(-1, keepdim=True), torch.einsum("bne,be->bn", ts.view(b, 3, -1), v)], dim=1)
    out["swap_teacher"] = s / 0.1
    assert objective(dict(out))["swap_distill_loss"].abs() < 1e-5
    out["swap_teacher"] = -s / 0.1
    assert objective(dict(out))["swap_distill_loss"] > 1e-3


# ------------------------------------------------------------------------- several processes (loss.gather)

GATHER_N, GATHER_WORLD = 8, 2  # a global batch of 8 pairs, 4 per process
# Items repeat within a process (1) and across processes (0, 3): multi-positives a per-process loss cannot see.
GATHER_ITEMS = [0, 1, 1, 3, 3, 4, 0, 5]


class FormulaScorer:
    """The teacher's place: a fixed, uneven score per (text, item) pair, so that targets differ row by row."""

    def __call__(self, text_idx, item_idx):
        t, i = torch.as_tensor(text_idx).float(), torch.as_tensor(item_idx).float()
        return -((t * 7 + i * 3) % 11) / 3

    def block(self, text_idx, item_idx):
        return self(torch.as_tensor(text_idx)[:, None], torch.as_tensor(item_idx)[None, :])


class PairGroups:
    """Group mode's composer for a fixed batch: consecutive pairs form a group (neighbours are the batch's own)."""

    def compose(self, batch, step):
        return batch, torch.arange(len(batch["item_index"])) // 2


def _gather_case(gather: bool, mode: str = "inbatch"):
    """The same student, global batch, batcher and objective in every process (seeded, CPU-deterministic)."""
    torch.manual_seed(0)
    # eval(): no dropout, and normalisation layers on running statistics, so a row's embedding does not depend on
    # which process computed it (per-process batch statistics are another matter: SyncBatchNorm, not this test's).
    model = create_student("dual_encoder_tiny", vocab_size=40, max_length=12, image_size=IMAGE_SIZE).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([12, 9, 5, 7, 12, 3, 8, 10])
    batch = {
        "pixels": torch.randn(GATHER_N, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "input_ids": torch.randint(4, 40, (GATHER_N, 12), generator=g),
        "attention_mask": (torch.arange(12)[None, :] < lengths[:, None]).long(),
        "item_index": torch.tensor(GATHER_ITEMS),
        "text_index": torch.arange(GATHER_N),
    }
    composer = PairGroups() if mode == "group" else None
    batcher = DistillBatcher(mode, FormulaScorer(), composer=composer, gather=gather)
    objective = DistillObjective(model, teacher_norm="sum", student_temperature=0.05, denoise_margin=0.5,
                                 margin_mse_weight=0.5, gather=gather)  # fmt: skip
    return model, batch, batcher, objective


def _step(model, batch, batcher, objective) -> dict[str, torch.Tensor]:
    """One forward and backward: the loss parts and every gradient, averaged over processes as DDP/DeepSpeed do."""
    out = objective(batcher(batch, step=0))
    out["loss"].backward()
    result = {f"out.{k}": v.detach().reshape(()) for k, v in out.items()}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad.clone()
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(grad)
                grad /= torch.distributed.get_world_size()
            result[f"grad.{name}"] = grad
    return result


def _gather_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One process of a 2-process run on its half of the global batch (module level, so that spawn can import it)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = GATHER_N // world
        for gather, mode in ((True, "inbatch"), (False, "inbatch"), (True, "group"), (False, "group")):
            model, batch, batcher, objective = _gather_case(gather, mode)
            own = {k: v[rank * b : (rank + 1) * b] for k, v in batch.items()}
            save_file(_step(model, own, batcher, objective), os.path.join(out_dir, f"{mode}_{gather}_{rank}.st"))
    finally:
        torch.distributed.destroy_process_group()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    # The floor: a gradient that is zero in exact arithmetic (attention's key bias: softmax ignores a shift) is
    # float noise on both sides, ~1e-9, whose ratio means nothing.
    return float((a - b).norm() / b.norm().clamp(min=1e-4))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    torch.multiprocessing.spawn(_gather_rank, args=(GATHER_WORLD, str(out / "init"), str(out)), nprocs=GATHER_WORLD)
    return lambda mode, gather, rank: load_file(str(out / f"{mode}_{gather}_{rank}.st"))


@pytest.mark.slow
def test_two_processes_with_gather_give_the_loss_and_gradients_of_one_process(two_processes):
    """loss.gather: 2 processes (gloo, CPU) on halves of a global batch compute, on each process, the loss one
    process computes on the whole batch (InfoNCE, in-batch KL, margin-MSE, denoising), and the gradients averaged
    over the processes are its gradients; without the gather, negatives are per process and the loss differs."""
    one = _step(*_gather_case(gather=True))  # no process group here: the gather does nothing
    assert one["out.denoised_negatives"] > 0  # the teacher-rated exclusions are part of what is compared
    grads = sorted(k for k in one if k.startswith("grad."))
    assert len(grads) > 10 and sum(float(one[k].norm()) > 1e-3 for k in grads) > len(grads) / 2  # floor aside
    for rank in range(GATHER_WORLD):
        two = two_processes("inbatch", True, rank)
        assert sorted(k for k in two if k.startswith("grad.")) == grads
        # Equal up to float32 summation order (the towers ran on batches of 4, not 8): 1e-4 of each tensor's norm.
        errors = {key: _relative_error(two[key], one[key]) for key in one}
        assert max(errors.values()) < 1e-4, {k: e for k, e in errors.items() if e >= 1e-4}
    per_process = [two_processes("inbatch", False, rank) for rank in range(GATHER_WORLD)]
    assert all(_relative_error(r["out.loss"], one["out.loss"]) > 1e-2 for r in per_process)
    assert max(_relative_error(per_process[0][k], one[k]) for k in grads) > 1e-2


@pytest.mark.slow
def test_group_targets_under_gather_stay_within_each_processs_groups(two_processes):
    """Group mode's candidates are a group's own rows: gathered, its KL is the mean of the per-process ones (each
    process's rows see only their own block of the global columns), while InfoNCE gains the other processes'."""
    gathered = [two_processes("group", True, rank) for rank in range(GATHER_WORLD)]
    local = [two_processes("group", False, rank) for rank in range(GATHER_WORLD)]
    mean_local = sum(r["out.inbatch_distill_loss"] for r in local) / GATHER_WORLD
    for r in gathered:
        assert _relative_error(r["out.inbatch_distill_loss"], mean_local) < 1e-5
    assert _relative_error(gathered[0]["out.contrastive_loss"], local[0]["out.contrastive_loss"]) > 1e-2
