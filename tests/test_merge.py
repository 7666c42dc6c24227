"""Token merging in the Slow teacher (`merge_ratio`, CrossGET / ToMe bipartite soft matching): what a merge keeps,
that padding never counts, that a lossless merge scores exactly as the unmerged model, the bound of a lossy one,
and that ratio 0 is the unmerged model."""

from __future__ import annotations

import pytest
import torch
from test_teachers import VOCAB, make_texts, make_visual

from fastslow.bill import count_flops
from teachers import VisualTokens, create_teacher
from teachers.captioner import merge_tokens

torch.set_num_threads(1)


def test_merge_keeps_the_mass_of_every_real_token():
    g = torch.Generator().manual_seed(0)
    x, sizes = torch.randn(3, 10, 8, generator=g), torch.rand(3, 10, generator=g) + 0.5
    out, out_sizes, out_mask = merge_tokens(x, sizes, None, 4)
    assert out.shape == (3, 6, 8) and out_mask is None
    torch.testing.assert_close(out_sizes.sum(1), sizes.sum(1))  # every token is somewhere
    torch.testing.assert_close((out * out_sizes[..., None]).sum(1), (x * sizes[..., None]).sum(1))  # weighted means


def test_identical_partners_merge_first_and_exactly():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 4, 8, generator=g)
    x = base.repeat_interleave(2, dim=1)  # positions 2i (set A) and 2i+1 (set B) hold the same token
    x[:, 0] = torch.randn(2, 8, generator=g)  # one A token without a twin: it must be the one kept
    out, sizes, _ = merge_tokens(x, torch.ones(2, 8), None, 3)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(sizes[:, 0], torch.ones(2))
    torch.testing.assert_close(out[:, 2:], base[:, 1:])  # B twins hold their merged copies ...
    torch.testing.assert_close(sizes[:, 2:], torch.full((2, 3), 2.0))  # ... with size 2


def test_padding_weighs_nothing_and_no_real_token_is_lost():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 12, 8, generator=g)
    real = torch.zeros(4, 12, dtype=torch.bool)
    for i, n in enumerate((12, 7, 2, 1)):  # ragged clips, one with a single real token
        real[i, :n] = True
    x[~real] = 1e6  # padding content must never leak into a real token
    out, sizes, mask = merge_tokens(x, torch.ones(4, 12), real, 6)
    assert out.shape == (4, 6, 8)
    kept = sizes * mask
    torch.testing.assert_close(kept.sum(1), real.sum(1).float())  # every real token is inside a real output token
    assert out[mask].abs().max() < 1e3
    w = real.float()
    torch.testing.assert_close((out * kept[..., None]).sum(1), (x * w[..., None]).sum(1))


def _teacher(**kw):
    torch.manual_seed(0)
    return create_teacher("captioner_tiny", modality="image", vocab_size=VOCAB, max_length=12, **kw).eval()


def _twin_tokens(teacher, n: int) -> VisualTokens:
    """Real tokens of n images where every set-A token (even position) copies a set-B one (odd), unevenly: B token
    j gets copies from A positions 2j and 2j+2 when j is even, none when j is odd (sizes 3, 1, 3, 1, ...), so a
    merge of half is lossless and only the log-size bias can keep attention as it was."""
    with torch.no_grad():
        v = teacher.encode_visual(make_visual("image", n, seed=3)[0])
    parts, start = [], 0
    for size in teacher.scale_sizes(v.num_tokens):
        b = v.tokens[:, start : start + size // 2]  # distinct tokens
        src = [min(2 * (i // 2), size // 2 - 1) for i in range(size // 2)]  # A token i copies B token src[i]
        x = torch.empty(n, size, b.shape[-1])
        x[:, 1::2], x[:, ::2] = b, b[:, src]
        parts.append(x)
        start += size
    return VisualTokens(torch.cat(parts, 1))


def test_a_lossless_merge_scores_exactly_as_the_unmerged_model():
    # `fine` with two groups: the second group reads the finest tokens merged once, by half. With twin tokens that
    # merge loses nothing, and the log-size bias makes attention to a merged twin worth the two it replaced.
    teacher = _teacher(cross_attn="fine", group_depths=(1, 1))
    vis, (ids, mask) = _twin_tokens(teacher, 5), make_texts(6, seed=4)
    plain = teacher.score(vis, ids, mask)
    teacher.set_merge_ratio(0.5)
    torch.testing.assert_close(teacher.score(vis, ids, mask), plain, rtol=0, atol=1e-5)
    teacher.set_merge_ratio(0.0)
    assert torch.equal(teacher.score(vis, ids, mask), plain)


def test_a_lossy_merge_changes_scores_less_than_the_image_does_and_costs_fewer_flops():
    teacher = _teacher(cross_attn="fine")
    with torch.no_grad():
        vis = teacher.encode_visual(make_visual("image", 8, seed=5)[0])
    ids, mask = make_texts(8, seed=6)
    plain = teacher.score(vis, ids, mask)
    other = teacher.score(vis[list(range(1, 8)) + [0]], ids, mask)  # each text against another image
    flops_plain = count_flops(lambda: teacher.score(vis, ids, mask))
    teacher.set_merge_ratio(0.5)
    merged = teacher.score(vis, ids, mask)
    flops_merged = count_flops(lambda: teacher.score(vis, ids, mask))
    # Scale-free: a random tiny model barely reads the image, so compare with what changing the image does.
    # Measured here: merging by half moves scores by 0.026 of what another image moves them (max over pairs 0.07).
    image_effect = (other - plain).abs().mean()
    assert not torch.equal(merged, plain)
    assert (merged - plain).abs().mean() < 0.2 * image_effect
    assert flops_merged < flops_plain


def test_training_never_merges():
    teacher = _teacher(cross_attn="fine")
    x, _ = make_visual("image", 4, seed=7)
    ids, mask = make_texts(4, seed=8)
    with torch.no_grad():
        plain = teacher(x, ids, mask)["loss"]
        teacher.set_merge_ratio(0.5)
        assert torch.equal(teacher(x, ids, mask)["loss"], plain)


def test_video_merging_ignores_padding():
    torch.manual_seed(0)
    teacher = create_teacher("captioner_tiny", modality="video", vocab_size=VOCAB, max_length=12, feature_dim=16)
    teacher.eval().set_merge_ratio(0.5)
    x, frames = make_visual("video", 4, seed=9)
    with torch.no_grad():
        vis = teacher.encode_visual(x, frames)
    ids, mask = make_texts(3, seed=10)
    before = teacher.score(vis, ids, mask)
    vis.tokens[~vis.mask] = 1e4  # whatever padding holds
    after = teacher.score(vis, ids, mask)
    assert before.isfinite().all()
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("ratio", [-0.1, 0.6])
def test_invalid_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match="merge_ratio"):
        _teacher(merge_ratio=ratio)
    with pytest.raises(ValueError, match="merge_ratio"):
        _teacher().set_merge_ratio(ratio)
