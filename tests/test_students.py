"""students: registry, every size and modality trains, padding invariance, checkpoints, local pretrained towers."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from students import DualEncoder, create_student, list_students

MODALITIES = ["image", "video"]
# The sweep shrinks only the inputs (as timm's test_models does), never the registered architecture.
SWEEP_INPUT = {"image_size": 32, "frames": 6, "length": 8}


def _texts(model: DualEncoder, lengths: list[int], length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (len(lengths), length), generator=g)
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask.long()


def _visual(model: DualEncoder, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if model.modality == "image":
        size = model.config.image_size
        return torch.randn(batch, 3, size, size, generator=g), None
    features = torch.randn(batch, SWEEP_INPUT["frames"], model.config.feature_dim, generator=g)
    frame_mask = torch.ones(batch, SWEEP_INPUT["frames"], dtype=torch.bool)
    frame_mask[0, -2:] = False
    return features, frame_mask


def test_registry():
    assert {"dual_encoder_tiny", "dual_encoder_small", "dual_encoder_base"} <= set(list_students())
    with pytest.raises(KeyError, match="dual_encoder_tiny"):
        create_student("dual_encoder_tinny")
    with pytest.raises(TypeError, match="embed_dim"):
        create_student("dual_encoder_tiny", embed_dims=8)
    with pytest.raises(ValueError, match="modality"):
        create_student("dual_encoder_tiny", modality="audio")


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("name", list_students())
def test_every_student_trains(name, modality):
    torch.manual_seed(0)
    overrides = {"image_size": SWEEP_INPUT["image_size"]} if name != "dual_encoder_tiny" else {}
    model = create_student(name, modality=modality, **overrides).train()
    assert model.modality == modality
    other = "visual.backbone" if modality == "video" else "visual.encoder"
    assert not any(n.startswith(other) for n, _ in model.named_parameters()), "built the other visual tower"

    visual, frame_mask = _visual(model, 2)
    input_ids, attention_mask = _texts(model, [SWEEP_INPUT["length"], 5], SWEEP_INPUT["length"])
    visual_emb, text_emb, scale = model(visual, input_ids, attention_mask, frame_mask)
    assert visual_emb.shape == text_emb.shape == (2, model.embed_dim)
    torch.testing.assert_close(visual_emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)

    def step():
        visual_emb, text_emb, scale = model(visual, input_ids, attention_mask, frame_mask)
        logits = scale * text_emb @ visual_emb.T
        target = torch.arange(2)
        (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)).backward()

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    step()
    assert not [n for n, p in trainable if p.grad is None], "parameters outside the graph"
    zero = [n for n, p in trainable if not p.grad.any()]
    if zero:
        # timm ResNets zero-init the last BatchNorm of each residual branch (Goyal et al. 2017), so the branch's
        # other weights get an exactly-zero gradient until one update has moved it: check after a second step.
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.zero_grad()
        step()
        zero = [n for n, p in trainable if p.grad is None or not p.grad.any()]
    assert not zero, f"no gradient for {zero}"


def test_logit_scale_is_clamped_at_100():
    model = create_student("dual_encoder_tiny")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.inverse_temperature().item() == pytest.approx(100.0)
    assert "logit_scale" in model.no_weight_decay()


@pytest.mark.parametrize("pool,diff", [("mean", False), ("cls", False), ("mean", True)])
def test_padding_frames_do_not_change_video_embedding(pool, diff):
    torch.manual_seed(0)
    model = create_student(
        "dual_encoder_tiny", modality="video", video_pool=pool, video_depth=2, video_frame_diff=diff
    ).eval()
    g = torch.Generator().manual_seed(1)
    lengths = [10, 4, 7]
    features = torch.randn(3, 10, model.config.feature_dim, generator=g)
    mask = torch.arange(10)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        emb = model.encode_video(features, mask)
        noisy = torch.where(mask[..., None], features, 100 * torch.randn(features.shape, generator=g))
        torch.testing.assert_close(model.encode_video(noisy, mask), emb, rtol=0, atol=1e-6)
        # And equal to each video encoded alone, with no padding at all.
        alone = torch.cat([model.encode_video(features[i : i + 1, :n]) for i, n in enumerate(lengths)])
        torch.testing.assert_close(alone, emb, rtol=0, atol=1e-5)
        # A real frame does matter (the check above can fail).
        changed = features.clone()
        changed[1, 2] += torch.randn(model.config.feature_dim, generator=g)
        assert (model.encode_video(changed, mask)[1] - emb[1]).abs().max() > 1e-4
        # A video with no real frame still gives a finite embedding.
        assert torch.isfinite(model.encode_video(features, torch.zeros_like(mask))).all()
    with pytest.raises(ValueError, match="max_frames"):
        model.encode_video(torch.randn(1, model.config.max_frames + 1, model.config.feature_dim))


@pytest.mark.parametrize("pool", ["mean", "first"])
def test_padding_tokens_do_not_change_text_embedding(pool):
    torch.manual_seed(0)
    model = create_student("dual_encoder_tiny", text_pool=pool, text_depth=2).eval()
    lengths = [12, 3, 7]
    input_ids, attention_mask = _texts(model, lengths, 12)
    with torch.no_grad():
        emb = model.encode_text(input_ids, attention_mask)
        other_pads = torch.where(attention_mask.bool(), input_ids, torch.randint_like(input_ids, 0, 512))
        torch.testing.assert_close(model.encode_text(other_pads, attention_mask), emb, rtol=0, atol=1e-6)
        alone = [
            model.encode_text(input_ids[i : i + 1, :n], attention_mask[i : i + 1, :n]) for i, n in enumerate(lengths)
        ]
        torch.testing.assert_close(torch.cat(alone), emb, rtol=0, atol=1e-5)
        changed = input_ids.clone()
        changed[1, 1] = (changed[1, 1] + 1) % 512
        assert (model.encode_text(changed, attention_mask)[1] - emb[1]).abs().max() > 1e-4

        raw = model.encode_text(input_ids, attention_mask, normalize=False)
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(F.normalize(raw, dim=-1), emb)


@pytest.mark.parametrize("modality", MODALITIES)
def test_safetensors_state_dict_reloads_to_identical_embeddings(tmp_path, modality):
    torch.manual_seed(0)
    model = create_student("dual_encoder_tiny", modality=modality)
    # A training step moves BatchNorm running statistics: buffers must round-trip too.
    visual, frame_mask = _visual(model, 4)
    model.encode_visual(visual, frame_mask)
    model.eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")

    torch.manual_seed(1)
    rebuilt = create_student("dual_encoder_tiny", **model.config_dict()).eval()
    input_ids, attention_mask = _texts(model, [8, 5, 2, 6], 8)
    with torch.no_grad():
        assert not torch.equal(
            rebuilt.encode_text(input_ids, attention_mask), model.encode_text(input_ids, attention_mask)
        )
        rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
        assert torch.equal(rebuilt.encode_text(input_ids, attention_mask), model.encode_text(input_ids, attention_mask))
        assert torch.equal(rebuilt.encode_visual(visual, frame_mask), model.encode_visual(visual, frame_mask))
    assert rebuilt.logit_scale.item() == model.logit_scale.item()


def test_text_tower_loads_local_pretrained_dir(tmp_path):
    torch.manual_seed(0)
    # A width other than the tiny config's 32: the tower must take its size from the saved model.
    config = BertConfig(
        vocab_size=300,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
    )
    bert = BertModel(config)  # saved with its pooler, which the student drops
    bert.save_pretrained(tmp_path / "bert")

    model = create_student("dual_encoder_tiny", text_pretrained_path=str(tmp_path / "bert"), vocab_size=300)
    assert model.text.encoder.pooler is None
    loaded = model.text.encoder.state_dict()
    saved = {k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key

    input_ids, attention_mask = _texts(model, [6, 3], 6)
    emb = model.encode_text(input_ids, attention_mask)
    assert emb.shape == (2, model.embed_dim)
    emb.sum().backward()
    assert all(p.grad is not None for p in model.text.parameters())

    with pytest.raises(ValueError, match="vocab_size"):
        create_student("dual_encoder_tiny", text_pretrained_path=str(tmp_path / "bert"), vocab_size=301)
    with pytest.raises(FileNotFoundError, match="text_pretrained_path"):
        create_student("dual_encoder_tiny", text_pretrained_path=str(tmp_path / "missing"))


def test_image_tower_loads_local_pretrained_file(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    model = create_student("dual_encoder_tiny", image_pretrained_path=str(tmp_path / "backbone.safetensors"))
    loaded = model.visual.backbone.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("classifier."):
            assert key not in loaded  # num_classes=0: the classifier is dropped, not loaded
        else:
            assert torch.equal(loaded[key], value), key


def test_wrong_modality_is_an_error():
    image_student = create_student("dual_encoder_tiny", modality="image")
    with pytest.raises(RuntimeError, match="no video tower"):
        image_student.encode_video(torch.randn(1, 4, 16), torch.ones(1, 4, dtype=torch.bool))
    video_student = create_student("dual_encoder_tiny", modality="video")
    with pytest.raises(RuntimeError, match="no image tower"):
        video_student.encode_image(torch.randn(1, 3, 32, 32))


def test_flatten_pooling_keeps_the_layout():
    """image_global_pool="flatten": the projection sees every cell of the final map, not their mean."""
    student = create_student("dual_encoder_tiny", modality="image", image_size=64, image_global_pool="flatten")
    tower = student.visual
    fmap = tower.backbone.forward_features(torch.zeros(1, 3, 64, 64))
    assert fmap.shape[-1] * fmap.shape[-2] > 1  # a map with a layout, else the test says nothing
    assert tower.proj.in_features == fmap[0].numel()
    emb = student.encode_image(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 32)
    emb.sum().backward()
    assert tower.proj.weight.grad is not None and tower.proj.weight.grad.abs().sum() > 0


def test_attention_pool_sees_where_features_are():
    """image_global_pool="attn": a map and its mirror image pool to different embeddings (a mean cannot)."""
    torch.manual_seed(0)
    student = create_student("dual_encoder_tiny", modality="image", image_size=64, image_global_pool="attn")
    pool = student.visual.attn_pool
    fmap = student.visual.backbone(torch.randn(2, 3, 64, 64))
    assert fmap.ndim == 4 and fmap.shape[-1] > 1  # a map with a layout, else the test says nothing
    mirror = fmap.flip(-1)
    assert torch.allclose(fmap.mean((2, 3)), mirror.mean((2, 3)))  # what average pooling would see: the same
    assert not torch.allclose(pool(fmap), pool(mirror), atol=1e-4)
    emb = student.encode_image(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 32)
    emb.sum().backward()
    assert pool.pos_embed.grad is not None and pool.pos_embed.grad.abs().sum() > 0


def test_output_stride_gives_a_finer_final_map():
    coarse = create_student("dual_encoder_small", modality="image").visual.backbone
    fine = create_student("dual_encoder_small", modality="image", image_output_stride=16).visual.backbone
    x = torch.zeros(1, 3, 64, 64)
    assert coarse.forward_features(x).shape[-2:] == (2, 2)
    assert fine.forward_features(x).shape[-2:] == (4, 4)


def test_frame_diff_input_is_the_motion_between_real_frames():
    """video_frame_diff: the input projection reads [x_t, x_t - x_{t-1}], zero at t=0 and on padding."""
    torch.manual_seed(0)
    model = create_student("dual_encoder_tiny", modality="video", video_frame_diff=True).eval()
    d = model.config.feature_dim
    seen = {}
    model.visual.input_proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    features = torch.randn(2, 5, d)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        model.encode_video(features, mask)
    x = seen["x"]
    assert x.shape == (2, 5, 2 * d)
    torch.testing.assert_close(x[..., :d], features)
    expected = features[:, 1:] - features[:, :-1]
    torch.testing.assert_close(x[0, 1:, d:], expected[0])
    torch.testing.assert_close(x[1, 1:3, d:], expected[1, :2])
    assert not x[:, 0, d:].any() and not x[1, 3:, d:].any()
