"""Distillation from the Slow teacher into the Fast student (DESIGN.md stage 3).

Per text query, the teacher's scores over a candidate set become softmax(s_T / tau_T); the student's
scores over the same candidates are pulled to it by KL divergence, added to the symmetric InfoNCE loss.
Two candidate sets:

- **in-batch**: every (unique) item of the batch. Captions that fit several items (partial captions,
  near-duplicates) make some in-batch "negatives" positives; one-hot InfoNCE punishes the student for
  them, the teacher's soft scores do not.
- **listwise over mined hard negatives**: the student's own index over the training items returns each
  caption's top-K (refreshed every `mine_every` steps); the teacher ranks those K. The student scores
  them with its fresh text embedding against the item embeddings of the last refresh (a memory bank,
  no gradient on that side: encoding B*K extra items per step would cost K times the batch), except
  the positive, which uses the fresh, differentiable item embedding of the batch.

Teacher scores of (text, item) pairs are deterministic for a given teacher, so they are computed once,
batched, and kept in `TeacherScoreCache` stamped with the teacher's weights hash; a later run (another
student size, another loss weight) reuses them. The teacher's visual tokens for the training items are
computed once into a `TokenStore`, so scoring a pair never runs the backbone.

The frozen teacher is set up in exactly one place: `TeacherPairScorer.__init__`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from fastslow.data import RetrievalSplit
from fastslow.evaluation import encode_items_student, encode_texts_student, iter_items, visual_args
from fastslow.losses import ClipLoss, DistillLoss
from fastslow.mining import inbatch_candidates, listwise_candidates, mine_hard_negatives
from fastslow.score_cache import TeacherScoreCache
from fastslow.tokenizer import TextTokenizer


def split_hash(split: RetrievalSplit) -> str:
    """Identifies a split's content for caches: the ordered item ids and captions."""
    h = hashlib.sha256()
    h.update(json.dumps([split.item_ids, split.captions, split.text_to_visual]).encode())
    return h.hexdigest()[:16]


class TeacherPairScorer:
    """Scores (text, item) pairs of one split with the frozen teacher, from its stored visual tokens.

    Args:
        teacher: a trained teacher; frozen here (eval mode, no gradients) -- the one place it is set up.
        teacher_hash: hash of the teacher's weights file; stamps the token store.
        split: the split whose captions and items are scored (usually train).
        load_visual: the item loader (images or clip features).
        tokenizer, max_length: how captions become ids.
        store_dir: where the teacher's visual tokens for the split's items live (built when absent or
            built by another teacher).
        chunk: pairs per teacher call (bounds memory).
    """

    def __init__(
        self,
        teacher: nn.Module,
        teacher_hash: str,
        split: RetrievalSplit,
        load_visual,
        tokenizer: TextTokenizer,
        max_length: int,
        store_dir: str | Path,
        chunk: int = 2048,
        is_main: bool = True,
    ):
        from teachers import TokenStore

        self.teacher = teacher.eval().requires_grad_(False)
        self.device = next(teacher.parameters()).device
        self.chunk = chunk
        self.ids, self.mask = tokenizer.encode(split.captions, max_length)
        store_dir = Path(store_dir)
        stamp = {"teacher_hash": teacher_hash, "split_hash": split_hash(split)}
        meta_path = store_dir / "meta.json"
        built = json.loads(meta_path.read_text()).get("meta", {}) if meta_path.is_file() else {}
        if any(built.get(k) != v for k, v in stamp.items()) and is_main:  # absent, or made by another teacher
            with torch.no_grad():
                chunks = (
                    self.teacher.encode_visual(*args).to(device="cpu")
                    for _, args in iter_items(split, load_visual, 64, self.device)
                )
                TokenStore.write(store_dir, split.item_ids, chunks, meta=stamp, overwrite=True)
        self.store_dir = store_dir
        self._store = None

    @property
    def store(self):
        from teachers import TokenStore

        if self._store is None:
            self._store = TokenStore.open(self.store_dir)
        return self._store

    @torch.no_grad()
    def __call__(self, text_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Teacher scores of aligned pairs: text_idx [P], item_idx [P] -> [P] float32 (CPU)."""
        text_idx, item_idx = torch.as_tensor(text_idx).long(), torch.as_tensor(item_idx).long()
        out = torch.empty(len(text_idx), dtype=torch.float32)
        for s in range(0, len(text_idx), self.chunk):
            t, i = text_idx[s : s + self.chunk], item_idx[s : s + self.chunk]
            visual = self.store[i.numpy()].to(device=self.device)
            out[s : s + len(t)] = (
                self.teacher.score_pairs(visual, self.ids[t].to(self.device), self.mask[t].to(self.device))
                .float()
                .cpu()
            )
        return out


    @torch.no_grad()
    def block(self, text_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Teacher scores of every text against every item: [T] x [U] -> [T, U] float32 (CPU).

        Uses `teacher.score` (all pairs), which shares the per-text work across items: about twice
        the pairs per second of `score_pairs` on aligned pairs (docs/BENCHMARKS.md).
        """
        text_idx, item_idx = torch.as_tensor(text_idx).long(), torch.as_tensor(item_idx).long()
        visual = self.store[item_idx.numpy()].to(device=self.device)
        ids, mask = self.ids[text_idx].to(self.device), self.mask[text_idx].to(self.device)
        return self.teacher.score(visual, ids, mask).float().cpu()


class CandidateMiner:
    """Each training caption's top-K items by the current student (a memory bank of item embeddings).

    Every rank encodes the whole training split (simple and identical on every rank; the cost is
    one gallery encoding per refresh), so no collective is needed to look candidates up.
    """

    def __init__(self, split: RetrievalSplit, load_visual, tokenizer: TextTokenizer, max_length: int, k: int):
        self.split, self.load_visual, self.tokenizer, self.max_length, self.k = (
            split,
            load_visual,
            tokenizer,
            max_length,
            k,
        )
        self.item_emb: torch.Tensor | None = None
        self.mined: torch.Tensor | None = None
        self.rounds = 0

    @torch.no_grad()
    def refresh(self, student: nn.Module) -> None:
        was_training = student.training
        student.eval()
        self.item_emb = encode_items_student(student, self.split, self.load_visual)
        text_emb = encode_texts_student(student, self.tokenizer, self.split.captions, max_length=self.max_length)
        positives = torch.as_tensor(self.split.text_to_visual)
        self.mined = mine_hard_negatives(text_emb.numpy(), self.item_emb.numpy(), positives, self.k)
        self.rounds += 1
        student.train(was_training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bank travels with checkpoints: a resumed run must mine from the same embeddings."""
        if self.item_emb is None:
            return {}
        return {"item_emb": self.item_emb, "mined": self.mined, "rounds": torch.tensor(self.rounds)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.item_emb, self.mined, self.rounds = state["item_emb"], state["mined"], int(state["rounds"])

    def candidates(self, text_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cand [B, K+1] item indices with the positive first, mask [B, K+1]) for the batch's texts."""
        assert self.mined is not None, "call refresh() first"
        t = text_index.cpu()
        positive = torch.as_tensor(self.split.text_to_visual)[t]
        return listwise_candidates(self.mined[t], positive)


class DistillObjective(nn.Module):
    """forward(batch) -> {"loss", "contrastive_loss", "inbatch_distill_loss"?, "listwise_distill_loss"?}.

    The batch carries what `DistillBatcher` attached without gradients: `inbatch_teacher` [B, B] and
    `inbatch_mask`; `listwise_teacher` [B, K+1], `listwise_mask` and `listwise_emb` [B, K+1, E].
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        contrastive_weight: float = 1.0,
        distill_weight: float = 1.0,
        teacher_temperature: float = 1.0,
        student_temperature: float | None = None,
        fresh_positive: bool = True,
    ):
        super().__init__()
        self.model = student
        # fresh_positive=False scores the positive from the memory bank too: every candidate then comes
        # from the same (stale) encoder, so the softmax cannot separate the positive by staleness alone;
        # the price is no distillation gradient into the visual tower.
        self.fresh_positive = fresh_positive
        self.contrastive_weight, self.distill_weight = contrastive_weight, distill_weight
        self.clip = ClipLoss()
        self.kl = DistillLoss(teacher_temperature, student_temperature)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        v = self.model.encode_visual(*visual_args(batch))  # [B, E]
        t = self.model.encode_text(batch["input_ids"], batch["attention_mask"])  # [B, E]
        scale = self.model.inverse_temperature()
        out = dict(self.clip(v, t, scale, batch["item_index"]))
        loss = self.contrastive_weight * out["contrastive_loss"]
        if "inbatch_teacher" in batch:
            d = self.kl(t @ v.T, batch["inbatch_teacher"], batch["inbatch_mask"], student_logit_scale=scale)
            out["inbatch_distill_loss"] = d["distill_loss"]
            loss = loss + self.distill_weight * d["distill_loss"]
        if "listwise_teacher" in batch:
            bank = batch["listwise_emb"].to(t.dtype)  # [B, K+1, E], no gradient (memory bank)
            # the positive is fresh and differentiable unless fresh_positive=False
            cand = torch.cat([v.unsqueeze(1), bank[:, 1:]], dim=1) if self.fresh_positive else bank
            s = torch.einsum("be,bke->bk", t, cand)
            d = self.kl(s, batch["listwise_teacher"], batch["listwise_mask"], student_logit_scale=scale)
            out["listwise_distill_loss"] = d["distill_loss"]
            loss = loss + self.distill_weight * d["distill_loss"]
        out["loss"] = loss
        return out


class DistillBatcher:
    """Attaches teacher targets to each batch (the trainer's `prepare_batch`) and refreshes mined
    candidates (its `on_step_end`).

    Args:
        mode: "none" | "inbatch" | "listwise".
        scorer: the teacher pair scorer (None when mode is "none").
        cache: teacher-score cache for this candidate source (None: score online every time).
        miner: the candidate miner (listwise only).
        mine_every: steps between refreshes.
        inbatch_rows: in-batch mode: only the first this-many captions of each batch get teacher targets
            (the teacher's cost is rows x batch pairs per step); None: every caption.
    """

    def __init__(
        self,
        mode: str,
        scorer: TeacherPairScorer | None = None,
        cache: TeacherScoreCache | None = None,
        miner: CandidateMiner | None = None,
        mine_every: int = 500,
        inbatch_rows: int | None = None,
    ):
        if mode not in ("none", "inbatch", "listwise"):
            raise ValueError(f"loss.distill={mode!r} is not one of none, inbatch, listwise")
        self.mode, self.scorer, self.cache, self.miner, self.mine_every = mode, scorer, cache, miner, mine_every
        self.inbatch_rows = inbatch_rows
        self.pairs_scored = 0  # teacher calls actually made (cache misses)

    def _teacher(self, text_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        def compute(t, i):
            self.pairs_scored += len(t)
            return self.scorer(torch.as_tensor(t), torch.as_tensor(i))

        if self.cache is None:
            return compute(text_idx, item_idx)
        return torch.as_tensor(self.cache.get_or_compute(text_idx.numpy(), item_idx.numpy(), compute)).float()

    def _inbatch(self, text: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """[R, B] teacher scores of R captions against the batch's B items: from the cache when every pair is
        there, else one all-pairs teacher call for the block (cheaper than scoring the missing pairs one by one)."""
        r, b = len(text), len(item)
        rows, cols = text.repeat_interleave(b), item.repeat(r)
        if self.cache is not None:
            found_scores, found = self.cache.lookup(rows.numpy(), cols.numpy())
            if found.all():
                return torch.as_tensor(found_scores).float().view(r, b)
        scores = self.scorer.block(text, item)
        self.pairs_scored += r * b
        if self.cache is not None:
            self.cache.add(rows.numpy(), cols.numpy(), scores.flatten().numpy())
        return scores

    def __call__(self, batch: dict, step: int) -> dict:
        if self.mode == "none":
            return batch
        text, item = batch["text_index"].cpu(), batch["item_index"].cpu()
        device = batch["input_ids"].device
        if self.mode == "inbatch":
            mask = inbatch_candidates(item)
            r = len(text) if self.inbatch_rows is None else min(self.inbatch_rows, len(text))
            scores = torch.zeros(mask.shape)
            scores[:r] = self._inbatch(text[:r], item)
            mask[r:] = False  # rows without teacher targets contribute no KL term
            batch["inbatch_teacher"], batch["inbatch_mask"] = scores.to(device), mask.to(device)
        else:
            cand, mask = self.miner.candidates(text)
            safe = cand.clamp(min=0)  # -1 pads (tiny galleries) are masked; score a real item in their place
            rows = text.unsqueeze(1).expand_as(cand)
            scores = torch.zeros(cand.shape)
            scores[mask] = self._teacher(rows[mask], safe[mask])
            batch["listwise_teacher"], batch["listwise_mask"] = scores.to(device), mask.to(device)
            batch["listwise_emb"] = self.miner.item_emb[safe].to(device)
        return batch

    def on_step_end(self, trainer) -> None:
        if self.mode == "listwise" and trainer.state.step % self.mine_every == 0:
            self.miner.refresh(trainer.unwrapped().model)
