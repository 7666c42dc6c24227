"""The teacher's own tokenizer (issue 12 point 4): a student with a pretrained BERT text tower (its vocabulary) and a
teacher whose captioning softmax runs over a small vocabulary trained on the captions. Every stage that scores with
the teacher reads texts through the teacher's tokenizer, and the artefacts built from its scores are stamped with it.

One tiny pipeline runs the real tools (train_teacher, distill with swapped captions, build_index, rerank_eval) on
recipe=smoke with a small random BERT saved by `transformers` (`test_pretrained._bert_dir`, the same fixture the
student's pretrained tower is tested with).
"""

import json

import pytest
import torch
from test_pretrained import _bert_dir
from test_tools import tool

from fastslow import stages
from fastslow.artefacts import file_hash, read_stamp
from fastslow.config import load_recipe
from fastslow.distill import TeacherPairScorer, split_hash
from fastslow.errors import StaleArtefactError
from fastslow.query import FUSE_FILE, Retriever
from fastslow.score_cache import CacheMismatchError, TeacherScoreCache
from fastslow.tokenizer import TextTokenizer
from teachers import TokenStore


def _caption_words(cfg):
    """Every word of the smoke captions, as BERT's lower-casing pre-tokenizer splits them."""
    split = stages.load_split(cfg, "train")
    words = {w for text in split.captions for w in text.lower().replace(",", " ").replace(".", " ").split()}
    return sorted(words - {"s"})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tteach")
    out = root / "run"
    args = [
        "recipe=smoke",
        f"output_dir={out}",
        f"student.text_pretrained_path={root / 'bert'}",
        "loss.swaps=2",  # swapped captions reach the teacher as the student's ids: the path that must re-tokenize
        "loss.swap_similarity=null",
    ]
    cfg = load_recipe(args)
    stages.ensure_shapes(cfg)
    _bert_dir(root / "bert", words=_caption_words(cfg))
    logs = {name: tool(name, *args) for name in ("train_teacher.py", "distill.py", "build_index.py", "rerank_eval.py")}
    return cfg, out, logs


def test_the_teacher_and_the_student_keep_different_vocabularies(run):
    cfg, out, _ = run
    assert not stages.teacher_shares_tokenizer(cfg)
    student_tok = TextTokenizer.from_file(out / "student" / "tokenizer.json")
    teacher_tok = TextTokenizer.from_file(out / "teacher" / "tokenizer.json")
    assert student_tok.tokenizer.get_vocab() != teacher_tok.tokenizer.get_vocab()
    assert "[CLS]" in student_tok.tokenizer.get_vocab() and "[BOS]" in teacher_tok.tokenizer.get_vocab()
    # The teacher's file is the one made for it, its softmax as wide as its own vocabulary.
    assert file_hash(out / "teacher" / "tokenizer.json") == file_hash(out / "teacher_tokenizer.json")
    teacher, _, tok = stages.load_trained(out / "teacher", "teacher")
    assert teacher.decoders[0].tok_embed.num_embeddings == tok.vocab_size == teacher_tok.vocab_size


def _teacher_hash(out):
    return stages.weights_hash(out / "teacher" / "model.safetensors")


def _cache(cfg, out, train, tokenizer_hash):
    """The listwise score cache of the run, opened as distill.py opens it, with the tokenizer hash given."""
    return TeacherScoreCache(
        out / "cache" / "teacher_scores_listwise", teacher_hash=_teacher_hash(out), source="listwise",
        dataset_hash=split_hash(train), n_items=train.n_items, tokenizer_hash=tokenizer_hash,
        max_length=cfg.data.max_length, settings=stages.visual_stamp(cfg),
    )  # fmt: skip


def _direct_scores(teacher, store_tokens, teacher_tok, texts, items, max_length):
    """The teacher scoring raw captions tokenized by its own tokenizer, without any of the pipeline's code."""
    ids, mask = teacher_tok.encode(texts, max_length)
    return teacher.score_pairs(store_tokens[torch.as_tensor(items).numpy()], ids, mask).float()


def test_distillation_scores_the_captions_with_the_teachers_tokenizer(run):
    cfg, out, logs = run
    assert "teacher pairs scored this run" in logs["distill.py"].stdout
    teacher, _, teacher_tok = stages.load_trained(out / "teacher", "teacher")
    student_tok = TextTokenizer.from_file(out / "student" / "tokenizer.json")
    train = stages.load_split(cfg, "train")
    store = TokenStore.open(out / "cache" / "teacher_tokens_train")
    ml = cfg.data.max_length

    # What distill.py cached: every score it stored is the teacher's score of the raw caption in its own tokens.
    cache = _cache(cfg, out, train, file_hash(out / "teacher" / "tokenizer.json"))
    texts = torch.arange(train.n_texts).repeat_interleave(train.n_items)
    items = torch.arange(train.n_items).repeat(train.n_texts)
    found_scores, found = cache.lookup(texts.numpy(), items.numpy())
    found = torch.as_tensor(found)
    assert found.sum() >= 8  # the run scored (and cached) pairs
    t, i = texts[found], items[found]
    direct = _direct_scores(teacher, store, teacher_tok, [train.captions[j] for j in t], i, ml)
    torch.testing.assert_close(torch.as_tensor(found_scores)[found].float(), direct, atol=1e-4, rtol=1e-4)
    cache.close()

    # The scorer as distill.py builds it: split captions and captions handed over as the student's ids (swaps).
    scorer = TeacherPairScorer(teacher, _teacher_hash(out), train, stages.visual_loader(cfg, teacher), teacher_tok, ml,
                               out / "cache" / "teacher_tokens_train", settings=stages.visual_stamp(cfg),
                               ids_tokenizer=student_tok)  # fmt: skip
    some = torch.arange(min(6, train.n_texts))
    own = torch.as_tensor(train.text_to_visual)[some]
    want = _direct_scores(teacher, store, teacher_tok, [train.captions[j] for j in some], own, ml)
    torch.testing.assert_close(scorer(some, own), want, atol=1e-4, rtol=1e-4)
    s_ids, s_mask = student_tok.encode([train.captions[j] for j in some], ml)
    torch.testing.assert_close(scorer.score_ids(s_ids, s_mask, own), want, atol=1e-4, rtol=1e-4)


def test_rerank_scores_queries_with_the_teachers_tokenizer(run):
    cfg, out, logs = run
    rows = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"slow", "fast+slow@5", "fuse@5"} <= set(rows)
    retriever = Retriever.from_run(cfg)
    teacher_tok = TextTokenizer.from_file(out / "teacher" / "tokenizer.json")
    assert retriever.teacher_tokenizer.tokenizer.get_vocab() == teacher_tok.tokenizer.get_vocab()
    test = stages.load_split(cfg, "test")
    texts = test.captions[:4]
    res = retriever.search(texts, 3, mode="rerank")
    q = torch.arange(len(texts)).repeat_interleave(3)
    direct = _direct_scores(retriever.teacher, retriever.store, teacher_tok, [texts[j] for j in q],
                            res.ids.flatten(), cfg.data.max_length)  # fmt: skip
    torch.testing.assert_close(res.teacher_scores.flatten(), direct, atol=1e-4, rtol=1e-4)
    # The fusion weights carry the teacher's tokenizer in their stamp.
    stamp = read_stamp(out / "eval" / FUSE_FILE)["fields"]
    assert stamp["teacher_tokenizer_hash"] == file_hash(out / "teacher" / "tokenizer.json")


def test_artefacts_of_another_teacher_tokenizer_are_refused(run):
    cfg, out, _ = run
    train = stages.load_split(cfg, "train")
    other = file_hash(out / "student" / "tokenizer.json")  # any other tokenizer file
    with pytest.raises(CacheMismatchError, match="tokenizer_hash"):
        _cache(cfg, out, train, other)
    retriever = Retriever.from_run(cfg)
    stale = Retriever.open(
        out / "index", student=retriever.student, tokenizer=retriever.tokenizer, student_hash=retriever.student_hash,
        max_length=cfg.data.max_length, teacher=retriever.teacher, teacher_hash=retriever.teacher_hash,
        teacher_tokenizer=retriever.teacher_tokenizer, teacher_tokenizer_hash=other, settings=stages.visual_stamp(cfg),
        fuse_file=out / "eval" / FUSE_FILE,
    )  # fmt: skip
    with pytest.raises(StaleArtefactError, match="teacher_tokenizer_hash"):
        stale.alpha_for(5)


def test_a_teacher_tokenizer_made_with_other_settings_is_refused(run):
    cfg, out, _ = run
    bert = cfg.student.text_pretrained_path
    changed = load_recipe(["recipe=smoke", f"output_dir={out}", f"student.text_pretrained_path={bert}",
                           "teacher.tokenizer.vocab_size=150"])  # fmt: skip
    with pytest.raises(StaleArtefactError, match="teacher.tokenizer.vocab_size"):
        stages.get_teacher_tokenizer(changed, None)


def test_same_settings_share_one_file(tmp_path):
    """Default settings: the teacher's and the student's tokenizer are one file, as before (so the shapes recipes'
    runs, caches and figures are unchanged); a teacher with settings of its own gets its own file."""
    cfg = load_recipe(["recipe=smoke", f"output_dir={tmp_path}"])
    assert stages.teacher_shares_tokenizer(cfg)
    assert stages.teacher_tokenizer_path(cfg) == stages.tokenizer_path(cfg)
    own = load_recipe(["recipe=smoke", f"output_dir={tmp_path}", "teacher.tokenizer.vocab_size=150"])
    assert stages.teacher_tokenizer_path(own) == tmp_path / "teacher_tokenizer.json"
