"""A teacher whose text decoder starts from a local BERT-family checkpoint (issue 12 point 10), as BLIP builds its
captioner from bert-base: BERT's embeddings, self-attention, feed-forward and LayerNorms in each decoder layer, the
cross-attention added fresh, the coarse-to-fine schedule and the bi-directional loss kept.

The BERT directories are built here with `transformers` (`test_pretrained._bert_dir`), so the real loading runs.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_pretrained import _bert_dir
from test_tools import tool
from transformers import BertModel, GPT2Config, GPT2Model

from fastslow import stages
from fastslow.config import load_recipe
from fastslow.errors import CheckpointError
from fastslow.tokenizer import load_pretrained_tokenizer
from teachers import create_teacher

WORDS = "a the small large red blue green circle square triangle left right of above below and".split()


def _teacher(bert_dir, **kw):
    tok = load_pretrained_tokenizer(bert_dir)
    kw = {"vocab_size": tok.vocab_size, "max_length": 16, "text_pretrained_path": str(bert_dir), **kw}
    return create_teacher("captioner_tiny", **kw).eval(), tok


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _bert_dir(tmp_path_factory.mktemp("bert") / "bert", words=WORDS, layers=3)


@pytest.fixture(scope="module")
def perturbed_bert(tmp_path_factory, bert):
    """The same BERT with every tensor random (LayerNorms too: fresh ones are 1 and 0, which any LayerNorm holds)."""
    model = BertModel.from_pretrained(bert)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 else 0.0))
    out = tmp_path_factory.mktemp("perturbed") / "bert"
    shutil.copytree(bert, out)
    model.save_pretrained(out)
    return out


def test_decoder_holds_the_checkpoints_weights(perturbed_bert):
    teacher, _ = _teacher(perturbed_bert)
    w = BertModel.from_pretrained(perturbed_bert).state_dict()
    assert len(teacher.decoders) == 1 and teacher.config.embed_dim == 32 and teacher.config.num_heads == 4
    assert teacher.config.group_depths == (1, 1, 1)  # 3 BERT layers, one per visual scale, coarse to fine
    dec = teacher.decoders[0]
    e = "embeddings."
    assert torch.equal(dec.tok_embed.weight, w[e + "word_embeddings.weight"])
    pos = w[e + "position_embeddings.weight"][:16] + w[e + "token_type_embeddings.weight"][0]
    assert torch.equal(dec.pos_embed, pos)
    assert torch.equal(dec.embed_norm.weight, w[e + "LayerNorm.weight"])
    assert torch.equal(dec.embed_norm.bias, w[e + "LayerNorm.bias"])
    for i, layer in enumerate(dec.layers):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = getattr(layer.self_attn.qkv, kind).chunk(3)
            assert torch.equal(q, w[p + f"attention.self.query.{kind}"])
            assert torch.equal(k, w[p + f"attention.self.key.{kind}"])
            assert torch.equal(v, w[p + f"attention.self.value.{kind}"])
            pairs = [(layer.self_attn.proj, "attention.output.dense"), (layer.norm1, "attention.output.LayerNorm"),
                     (layer.mlp.fc1, "intermediate.dense"), (layer.mlp.fc2, "output.dense"),
                     (layer.norm3, "output.LayerNorm")]  # fmt: skip
            for module, name in pairs:
                assert torch.equal(getattr(module, kind), w[p + f"{name}.{kind}"]), (i, name, kind)
        # Cross-attention is new: nothing of the checkpoint in it.
        assert not any(torch.equal(layer.cross_attn.q.weight, t) for t in w.values() if t.shape == (32, 32))


def test_decoder_computes_what_the_causal_bert_computes(bert):
    """With its cross-attention silenced, the decoder is the checkpoint run causally (BERT as a decoder, as BLIP's
    text decoder is): the weights are not only copied but put where BERT uses them (q/k/v order, post-norm)."""
    teacher, tok = _teacher(bert)
    dec = teacher.decoders[0]
    with torch.no_grad():
        for layer in dec.layers:
            layer.cross_attn.proj.weight.zero_()
            layer.cross_attn.proj.bias.zero_()
        dec.dir_embed.zero_()
    ids, mask = tok.encode(["a small red circle left of a large blue square", "the green triangle"], 16)
    ids = ids[:, : int(mask.sum(1).max())]
    visual = teacher.encode_visual(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        ours = dec(dec.embed(ids, 0)[None], teacher._memories(visual)[0])[0]
        causal = BertModel.from_pretrained(bert, is_decoder=True).eval()
        want = causal(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-4)


def test_teacher_from_bert_scores_and_trains(bert):
    teacher, tok = _teacher(bert)
    ids, mask = tok.encode(["a red circle", "a blue square left of a green triangle", "the small circle"], 16)
    pixels = torch.randn(2, 3, 64, 64)
    visual = teacher.encode_visual(pixels)
    scores = teacher.score(visual, ids, mask)
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()
    torch.testing.assert_close(teacher.score_pairs(visual[[0, 1]], ids[:2], mask[:2]), scores[[0, 1], [0, 1]],
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    teacher.train()
    out = teacher.loss(teacher.encode_visual(pixels[[0, 1, 0]]), ids, mask)
    out["loss"].backward()
    assert out["r2l_loss"] > 0  # the bi-directional loss is kept
    assert teacher.decoders[0].layers[0].self_attn.qkv.weight.grad.abs().sum() > 0


def test_a_directory_of_another_architecture_is_refused(tmp_path, bert):
    gpt = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=50, n_positions=32)).save_pretrained(gpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (bert / name).is_file():
            shutil.copy(bert / name, gpt / name)
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        _teacher(gpt)


def test_a_size_mismatch_is_refused(tmp_path, bert):
    bad = tmp_path / "bad"
    shutil.copytree(bert, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))  # weights are 64 wide
    with pytest.raises(CheckpointError, match="does not load"):
        _teacher(bad)
    with pytest.raises(CheckpointError, match="cannot fill the decoder's 3 cross-attention groups"):
        _teacher(_bert_dir(tmp_path / "two", words=WORDS, layers=2))
    with pytest.raises(CheckpointError, match="max_position_embeddings"):
        _teacher(bert, max_length=128)


def test_recipe_teacher_from_bert_uses_its_tokenizer_and_loads_after_the_directory_moved(tmp_path, bert):
    moved = tmp_path / "bert"
    shutil.copytree(bert, moved)
    cfg = load_recipe(["recipe=smoke", f"output_dir={tmp_path / 'run'}", f"teacher.text_pretrained_path={moved}",
                       "data.max_length=16"])  # fmt: skip
    tok = stages.get_teacher_tokenizer(cfg, None)  # no captions needed: the BERT's own tokenizer
    assert tok.tokenizer.get_vocab() == load_pretrained_tokenizer(moved).tokenizer.get_vocab()
    assert not stages.teacher_shares_tokenizer(cfg)  # the student still trains its own on the captions
    teacher = stages.build_teacher(cfg, tok)
    d = tmp_path / "run" / "teacher"
    d.mkdir(parents=True)
    stages.save_run_config(cfg, d, model=teacher)
    tok.save(d / "tokenizer.json")
    save_file(teacher.state_dict(), d / "model.safetensors")
    shutil.rmtree(moved)  # the run went to another machine, without the BERT directory
    loaded, _, _ = stages.load_trained(d, "teacher")
    assert loaded.config.text_pretrained_path is None and loaded.config.bert_layout
    for name, t in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_train_teacher_from_bert_runs(tmp_path, bert):
    out = tmp_path / "run"
    proc = tool("train_teacher.py", "recipe=smoke", f"output_dir={out}", f"teacher.text_pretrained_path={bert}",
                "teacher_train.max_steps=2")  # fmt: skip
    assert "teacher saved" in proc.stdout
    assert (out / "teacher" / "text_config.json").is_file()
    assert json.loads((out / "teacher" / "text_config.json").read_text())["num_hidden_layers"] == 3
