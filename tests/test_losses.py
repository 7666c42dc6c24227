"""fastslow.losses: closed forms written out by hand, masking, repeated items, numerical safety."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastslow.losses import ClipLoss, DistillLoss


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------- DistillLoss


def test_distill_matches_hand_computed_kl():
    # Row 0: teacher scores [0, 2 ln 3] at τ_T = 2 -> logits [0, ln 3] -> p_T = [1/4, 3/4];
    #        student scores [0, 0] -> p_S = [1/2, 1/2].
    #        KL = 1/4 ln((1/4)/(1/2)) + 3/4 ln((3/4)/(1/2)) = 3/4 ln 3 - ln 2.
    # Row 1: teacher scores [0, 0] -> p_T = [1/2, 1/2];
    #        student scores [0, ln 2] at τ_S = 1 -> p_S = [1/3, 2/3].
    #        KL = 1/2 ln((1/2)/(1/3)) + 1/2 ln((1/2)/(2/3)) = 1/2 ln(9/8).
    # A third, masked candidate with arbitrary scores must not matter.
    teacher = torch.tensor([[0.0, 2 * math.log(3), 7.0], [0.0, 0.0, -3.0]])
    student = torch.tensor([[0.0, 0.0, 5.0], [0.0, math.log(2), 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    expected = ((0.75 * math.log(3) - math.log(2)) + 0.5 * math.log(9 / 8)) / 2

    out = DistillLoss(teacher_temperature=2.0, student_temperature=1.0)(student, teacher, mask)
    assert set(out) == {"distill_loss"}
    assert out["distill_loss"].item() == pytest.approx(expected, abs=1e-6)

    # The same numbers through the learned-scale path: scores / 10 with logit_scale 10 give the same logits.
    out = DistillLoss(teacher_temperature=2.0)(student / 10, teacher, mask, student_logit_scale=torch.tensor(10.0))
    assert out["distill_loss"].item() == pytest.approx(expected, abs=1e-6)

    # And the weight multiplies.
    out = DistillLoss(teacher_temperature=2.0, student_temperature=1.0, weight=0.5)(student, teacher, mask)
    assert out["distill_loss"].item() == pytest.approx(0.5 * expected, abs=1e-6)


def test_distill_mask_equals_loss_on_submatrix():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g) * 3
    loss = DistillLoss(teacher_temperature=0.5, student_temperature=0.1)

    # Whole columns absent: equals the loss on the matrix without them.
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    masked = loss(student, teacher, keep.expand(6, 9))["distill_loss"]
    sub = loss(student[:, keep], teacher[:, keep])["distill_loss"]
    torch.testing.assert_close(masked, sub)

    # A different ragged set per row: equals the mean of the per-row losses on each row's own candidates.
    mask = torch.rand(6, 9, generator=g) > 0.4
    mask[:, :2] = True  # at least 2 valid candidates per row
    per_row = [loss(student[i, mask[i]][None], teacher[i, mask[i]][None])["distill_loss"] for i in range(6)]
    torch.testing.assert_close(loss(student, teacher, mask)["distill_loss"], torch.stack(per_row).mean())

    # Whatever the absent candidates hold, the loss is unchanged.
    noisy_s = torch.where(mask, student, torch.full_like(student, 1e6))
    noisy_t = torch.where(mask, teacher, torch.full_like(teacher, -1e6))
    torch.testing.assert_close(
        loss(noisy_s, noisy_t, mask)["distill_loss"], loss(student, teacher, mask)["distill_loss"]
    )


def test_distill_rows_with_fewer_than_two_candidates_contribute_zero():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 5, generator=g, requires_grad=True)
    teacher = torch.randn(4, 5, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False  # no candidate
    mask[3, 1:] = False  # one candidate
    loss = DistillLoss(teacher_temperature=1.0, student_temperature=1.0)
    out = loss(student, teacher, mask)["distill_loss"]
    # The mean runs over the two rows that have something to rank.
    expected = loss(student[[0, 2]], teacher[[0, 2]])["distill_loss"]
    torch.testing.assert_close(out, expected)
    out.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[[1, 3]].abs().sum() == 0
    assert student.grad[[0, 2]].abs().sum() > 0

    # No row with 2 candidates at all: 0, and backward still works.
    empty = torch.zeros(4, 5, dtype=torch.bool)
    empty[0, 0] = True
    student.grad = None
    out = loss(student, teacher, empty)["distill_loss"]
    assert out.item() == 0.0
    out.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("magnitude", [1.0, 1e4, 1e34])
def test_distill_gradients_finite_with_masks_and_extreme_scores(magnitude):
    g = torch.Generator().manual_seed(2)
    student = (torch.randn(5, 7, generator=g) * magnitude).requires_grad_(True)
    teacher = torch.randn(5, 7, generator=g) * magnitude
    logit_scale = torch.tensor(100.0, requires_grad=True)
    mask = torch.rand(5, 7, generator=g) > 0.5
    mask[0] = False
    mask[1] = True
    mask[2, 0], mask[2, 1:] = True, False
    for module, kw in [
        (DistillLoss(teacher_temperature=0.01, student_temperature=0.01), {}),
        (DistillLoss(teacher_temperature=0.01), {"student_logit_scale": logit_scale}),
    ]:
        student.grad = None
        # detect_anomaly fails on a NaN produced inside any backward step, even one a later masked_fill hides.
        with torch.autograd.detect_anomaly():
            out = module(student, teacher, mask, **kw)["distill_loss"]
            assert torch.isfinite(out)
            out.backward()
        assert torch.isfinite(student.grad).all()
        assert student.grad[~mask].abs().sum() == 0  # absent candidates get no gradient
    assert torch.isfinite(logit_scale.grad)


def test_distill_zero_when_student_equals_teacher_at_matched_temperature():
    scores = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(8, 12, generator=torch.Generator().manual_seed(4)) > 0.3
    out = DistillLoss(teacher_temperature=0.2, student_temperature=0.2)(scores, scores, mask)["distill_loss"]
    assert out.abs().item() < 1e-6
    out = DistillLoss(teacher_temperature=0.2)(scores, scores, mask, student_logit_scale=5.0)["distill_loss"]
    assert out.abs().item() < 1e-6
    # ... and not zero when the temperatures differ (the test can fail).
    out = DistillLoss(teacher_temperature=0.2, student_temperature=0.1)(scores, scores, mask)["distill_loss"]
    assert out.item() > 1e-3


def test_distill_teacher_gets_no_gradient_and_bad_inputs_are_rejected():
    student = torch.randn(2, 3, requires_grad=True)
    teacher = torch.randn(2, 3, requires_grad=True)
    DistillLoss(1.0, 1.0)(student, teacher)["distill_loss"].backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="student_logit_scale"):
        DistillLoss(1.0)(student, teacher)
    with pytest.raises(ValueError, match="expected"):
        DistillLoss(1.0, 1.0)(student, teacher[:, :2])
    with pytest.raises(ValueError, match="teacher_temperature"):
        DistillLoss(0.0)


# ---------------------------------------------------------------- ClipLoss


def _hand_clip(visual, text, scale):
    """CLIP loss written element by element: -log softmax of the diagonal, both ways, averaged."""
    n = len(visual)
    logits = [[scale * float(text[i] @ visual[j]) for j in range(n)] for i in range(n)]
    t2v = sum(-(logits[i][i] - math.log(sum(math.exp(x) for x in logits[i]))) for i in range(n)) / n
    cols = [[logits[i][j] for i in range(n)] for j in range(n)]
    v2t = sum(-(cols[j][j] - math.log(sum(math.exp(x) for x in cols[j]))) for j in range(n)) / n
    return (t2v + v2t) / 2


def test_clip_loss_equals_hand_formula():
    visual, text = _unit(5, 8, seed=10), _unit(5, 8, seed=11)
    out = ClipLoss()(visual, text, torch.tensor(14.0))
    assert set(out) == {"contrastive_loss"}
    assert out["contrastive_loss"].item() == pytest.approx(_hand_clip(visual, text, 14.0), rel=1e-5)
    # Distinct item ids, in any order, are the plain CLIP loss.
    ids = torch.tensor([7, 3, 9, 1, 4])
    torch.testing.assert_close(
        ClipLoss()(visual, text, 14.0, item_index=ids)["contrastive_loss"], out["contrastive_loss"]
    )


def test_clip_loss_deduplicates_repeated_items():
    # Texts 0 and 1 describe item 0 (rows 0 and 1 of visual_emb hold the same embedding).
    items = _unit(3, 8, seed=20)
    text = _unit(4, 8, seed=21)
    item_index = torch.tensor([0, 0, 1, 2])
    visual = items[item_index]
    scale = 10.0
    out = ClipLoss()(visual, text, scale, item_index=item_index)["contrastive_loss"].item()

    # By hand: logits over the 3 unique items; t2v targets [0, 0, 1, 2]; v2t softmax over the 4 texts,
    # item 0 averages -log p over its texts {0, 1}.
    logits = [[scale * float(text[i] @ items[u]) for u in range(3)] for i in range(4)]
    t2v = sum(-(logits[i][u] - math.log(sum(math.exp(x) for x in logits[i]))) for i, u in enumerate([0, 0, 1, 2])) / 4
    col_lse = [math.log(sum(math.exp(logits[i][u]) for i in range(4))) for u in range(3)]
    v2t_item0 = -((logits[0][0] - col_lse[0]) + (logits[1][0] - col_lse[0])) / 2
    v2t_item1 = -(logits[2][1] - col_lse[1])
    v2t_item2 = -(logits[3][2] - col_lse[2])
    expected = (t2v + (v2t_item0 + v2t_item1 + v2t_item2) / 3) / 2
    assert out == pytest.approx(expected, rel=1e-5)

    # Treating the copies as different items (the bug being avoided) gives another number.
    naive = ClipLoss()(visual, text, scale)["contrastive_loss"].item()
    assert abs(naive - expected) > 1e-2

    # The batch order does not matter.
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = ClipLoss()(visual[perm], text[perm], scale, item_index=item_index[perm])["contrastive_loss"].item()
    assert shuffled == pytest.approx(out, rel=1e-6)


def test_clip_loss_gradients_reach_embeddings_and_scale():
    visual = _unit(6, 8, seed=30).requires_grad_(True)
    text = _unit(6, 8, seed=31).requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    out = ClipLoss()(visual, text, log_scale.exp(), item_index=torch.tensor([0, 1, 1, 2, 3, 3]))["contrastive_loss"]
    out.backward()
    for grad in (visual.grad, text.grad, log_scale.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # The repeated rows 2 and 5 stand in no column: the first occurrence represents the item.
    assert visual.grad[[2, 5]].abs().sum() == 0


# ---------------------------------------------------------------- teacher logits, denoising, KL temperature


def test_teacher_logits_by_hand():
    from fastslow.losses import teacher_logits

    scores = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.5, -3.5]])  # length-normalised, summed over 2 directions
    n_tokens = torch.tensor([4, 10])
    # sum: n / d * s -> the mean over directions of the total log-likelihood
    want = torch.tensor([[-2.0, -4.0, -8.0], [-2.5, -2.5, -17.5]])
    torch.testing.assert_close(teacher_logits(scores, n_tokens, norm="sum", directions=2), want)
    torch.testing.assert_close(teacher_logits(scores, n_tokens, norm="sum", directions=1), 2 * want)
    torch.testing.assert_close(teacher_logits(scores, n_tokens, norm="length"), scores)
    # zscore over the valid candidates only: row 0 uses [-1, -2] (mean -1.5, std 0.5); the masked entry is untouched
    mask = torch.tensor([[True, True, False], [True, True, True]])
    z = teacher_logits(scores, n_tokens, mask, norm="zscore")
    torch.testing.assert_close(z[0], torch.tensor([1.0, -1.0, -4.0]), atol=1e-5, rtol=0)
    # row 1: mean -1.5, population std sqrt(((1)^2 + 1^2 + 2^2) / 3) = sqrt(2)
    torch.testing.assert_close(z[1], torch.tensor([1.0, 1.0, -2.0]) / math.sqrt(2), atol=1e-5, rtol=0)
    # A softmax of `sum` logits is the posterior over the candidates: a caption's length no longer flattens it.
    p_len = torch.softmax(scores[1], 0)
    p_sum = torch.softmax(teacher_logits(scores, n_tokens, norm="sum")[1], 0)
    assert p_sum[2] < p_len[2] / 100
    with pytest.raises(ValueError, match="bogus"):
        teacher_logits(scores, n_tokens, norm="bogus")


def test_teacher_matches_margin():
    from fastslow.losses import teacher_matches

    logits = torch.tensor([[0.0, -0.5, -3.0], [1.0, 0.0, 0.2], [5.0, 5.0, -1.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    got = teacher_matches(logits, mask, margin=1.0)
    want = torch.tensor([[False, True, False], [True, False, True], [False, False, False]])
    assert torch.equal(got, want)  # row 2: its own item is not scored, so no reference
    assert not teacher_matches(logits, mask, margin=0.0)[0].any()  # -0.5 < 0 - 0
    assert teacher_matches(logits, mask, margin=0.0)[1].tolist() == [True, False, True]


def test_clip_loss_exclude_by_hand():
    # Three texts, three items; text 0 is told that item 1 is not a negative (the teacher rates it a match).
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
    visual = torch.eye(3)
    text = logits  # scale 1: text i . visual j = logits[i, j]
    exclude = torch.zeros(3, 3, dtype=torch.bool)
    exclude[0, 1] = True
    exclude[2, 2] = True  # on the row's own item: ignored
    out = ClipLoss()(visual, text, 1.0, torch.arange(3), exclude=exclude)["contrastive_loss"]

    def ce(row, target):
        return -(row[target] - torch.logsumexp(row, 0))

    t2v = (ce(torch.tensor([2.0, 0.0]), 0) + ce(logits[1], 1) + ce(logits[2], 2)) / 3
    # item 1's softmax over texts loses text 0; the other items keep all texts
    v2t = (ce(logits[:, 0], 0) + ce(torch.tensor([3.0, 0.0]), 0) + ce(logits[:, 2], 2)) / 3
    torch.testing.assert_close(out, (t2v + v2t) / 2)
    # Nothing excluded: exactly the plain loss.
    plain = ClipLoss()(visual, text, 1.0, torch.arange(3))["contrastive_loss"]
    none = ClipLoss()(visual, text, 1.0, torch.arange(3), exclude=torch.zeros(3, 3, dtype=torch.bool))
    torch.testing.assert_close(none["contrastive_loss"], plain)
    assert out < plain


def test_fixed_kl_temperature_leaves_the_infonce_scale_alone():
    logit_scale = torch.tensor(math.log(20.0), requires_grad=True)
    s = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    t = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    apart = DistillLoss(1.0, student_temperature=0.05)(s, t, student_logit_scale=logit_scale.exp())["distill_loss"]
    apart.backward()
    assert logit_scale.grad is None and s.grad is not None
    shared = DistillLoss(1.0)(s, t, student_logit_scale=logit_scale.exp())["distill_loss"]
    shared.backward()
    assert logit_scale.grad is not None and logit_scale.grad.abs() > 0
