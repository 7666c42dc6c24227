"""Pretrained towers from local files (issue 12 point 3): Hugging Face text directories (sentence-transformers
snapshots too) with their own tokenizer, the tokenizer / tower check, and timm checkpoint files for image backbones.

Every fixture is built here: a small random BERT saved with `save_pretrained` beside a BERT tokenizer, tiny timm
models saved as safetensors and as torch state dicts, so the real loading code runs.
"""

import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

from fastslow import stages
from fastslow.config import load_recipe
from fastslow.errors import CheckpointError, ConfigError, MissingFileError
from fastslow.tokenizer import train_tokenizer
from students import create_student
from teachers import create_teacher

WORDS = "a an the dog cat red blue green square circle left right of is on two small big tree box runs".split()
TEXTS = ["a red dog left of the cat", "two small blue squares", "the big tree"]


def _bert_dir(directory, words=WORDS, seed=0, layers=2):
    """A random BERT (2 layers by default) and its WordPiece tokenizer, saved as a user's Hugging Face directory."""
    directory.mkdir(parents=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s"]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(directory)  # model.safetensors + config.json
    return directory


def _sentence_transformers(root):
    """A sentence-transformers v1-style snapshot: the HF model in 0_Transformer/, a pooling module beside it."""
    _bert_dir(root / "0_Transformer")
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    return root


def _student_from_recipe(tmp_path, text_dir, *extra):
    cfg = load_recipe(["recipe=smoke", f"output_dir={tmp_path / 'run'}", f"student.text_pretrained_path={text_dir}",
                       "data.max_length=16", *extra])  # fmt: skip
    tok = stages.get_tokenizer(cfg, None)  # tokenizer.path is null: the text tower's own
    return stages.build_student(cfg, tok).eval(), tok


@pytest.mark.parametrize("layout", ["save_pretrained", "sentence_transformers"])
def test_hf_directory_is_the_text_tower_with_its_own_tokenizer(tmp_path, layout):
    root = _bert_dir(tmp_path / "bert") if layout == "save_pretrained" else _sentence_transformers(tmp_path / "st")
    model_dir = root if layout == "save_pretrained" else root / "0_Transformer"
    student, tok = _student_from_recipe(tmp_path, root)
    assert tok.vocab_size == len(WORDS) + 6
    # transformers, directly: its tokenizer and model from the same directory.
    hf_tok, hf_model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    ids, mask = tok.encode(TEXTS, 16)
    width = batch["input_ids"].shape[1]
    assert torch.equal(ids[:, :width], batch["input_ids"]) and torch.equal(mask[:, :width], batch["attention_mask"])
    with torch.no_grad():
        expected = hf_model(**batch).last_hidden_state
        ours = student.text.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :width]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[real])
    assert student.encode_text(ids, mask).shape == (3, student.embed_dim)


def test_a_tokenizer_that_is_not_the_text_towers_is_refused_before_any_work(tmp_path):
    bert = _bert_dir(tmp_path / "bert")
    # A tokenizer trained on the captions (the old default), given as tokenizer.path.
    trained = train_tokenizer(TEXTS * 20, vocab_size=40)
    trained.save(tmp_path / "trained.json")
    with pytest.raises(ConfigError, match="is not the one of the text tower"):
        _student_from_recipe(tmp_path / "a", bert, f"tokenizer.path={tmp_path / 'trained.json'}")
    # Another BERT vocabulary of the same size (same words, other order): same size, other ids.
    other = _bert_dir(tmp_path / "other", words=WORDS[::-1])
    with pytest.raises(ConfigError, match="is not the one of the text tower"):
        _student_from_recipe(tmp_path / "b", bert, f"tokenizer.path={other}")
    # The tower's own tokenizer named explicitly is accepted.
    _student_from_recipe(tmp_path / "c", bert, f"tokenizer.path={bert}")
    # A tower saved without its tokenizer: the recipe must name one, and its vocabulary size must fit.
    bare = tmp_path / "bare"
    shutil.copytree(bert, bare)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="no tokenizer.json or vocab.txt"):
        _student_from_recipe(tmp_path / "d", bare)
    with pytest.raises(ConfigError, match="has 40 tokens but the text tower"):
        _student_from_recipe(tmp_path / "e", bare, f"tokenizer.path={tmp_path / 'trained.json'}")
    _student_from_recipe(tmp_path / "f", bare, f"tokenizer.path={bert}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="no Hugging Face model found"):
        _student_from_recipe(tmp_path / "g", tmp_path / "empty")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_timm_checkpoint_file_loads_into_the_image_backbones(tmp_path, suffix):
    torch.manual_seed(0)
    # The student's tower (classifier dropped) and the teacher's features_only backbone, from one file format each.
    for name, build, backbone in (
        ("test_efficientnet", lambda p: create_student("dual_encoder_tiny", image_pretrained_path=p),
         lambda m: m.visual.backbone),
        ("test_resnet", lambda p: create_teacher("captioner_tiny", pretrained_path=p), lambda m: m.visual.backbone),
    ):  # fmt: skip
        source = timm.create_model(name, pretrained=False, num_classes=10)
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".safetensors":
            save_file(source.state_dict(), path)
        else:  # a training checkpoint's layout: timm unwraps "state_dict" and the DDP "module." prefix
            torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
        loaded = backbone(build(str(path))).state_dict()
        assert loaded, name
        for key, value in loaded.items():
            assert torch.equal(value, source.state_dict()[key]), (name, key)


def test_a_bad_timm_file_is_refused_naming_it(tmp_path):
    other = timm.create_model("test_vit", pretrained=False)
    save_file(other.state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(CheckpointError, match=r"vit.safetensors.*lacks .* tensors of test_efficientnet"):
        create_student("dual_encoder_tiny", image_pretrained_path=str(tmp_path / "vit.safetensors"))
    small = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    first_conv = next(k for k, v in small.state_dict().items() if v.ndim == 4)
    state = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == first_conv else v
             for k, v in small.state_dict().items()}  # fmt: skip
    save_file(state, tmp_path / "resized.safetensors")
    with pytest.raises(CheckpointError, match=r"resized.safetensors.*does not fit test_resnet"):
        create_teacher("captioner_tiny", pretrained_path=str(tmp_path / "resized.safetensors"))
    torch.save({"model": small, "note": "a whole pickled module"}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"pickled.pth.*never unpickled"):
        create_teacher("captioner_tiny", pretrained_path=str(tmp_path / "pickled.pth"))
    (tmp_path / "weights.npz").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="is not a .safetensors"):
        create_teacher("captioner_tiny", pretrained_path=str(tmp_path / "weights.npz"))
    with pytest.raises(MissingFileError, match="teacher.pretrained_path"):
        create_teacher("captioner_tiny", pretrained_path=str(tmp_path / "gone.safetensors"))
